"""Abuse soak: a well-behaved client's latency on an idle server and on the same server
while abusive clients run beside it, in alternating rounds (idle, abused, idle, ...),
plus the server's resident memory before and after, and what /metrics counted as refused.

    python bench/abuse_soak.py URL PID [--rounds 6] [--requests 8] [--max-tokens 8]

The well-behaved client connects from 127.0.0.1, one fresh connection per request
(so connection admission is measured too). The abusers connect from 127.0.0.2:
slowloris (headers never finished), slow bodies (1 byte a second), floods of idle
connections, bodies declared at 1 GB, and a tight loop of malformed and deeply nested
JSON. Standard library only.
"""
import argparse
import http.client
import json
import socket
import statistics
import threading
import time
from urllib.parse import urlparse

from serve_load import rss_mib

ABUSER = ("127.0.0.2", 0)
WELL = ("127.0.0.1", 0)


def well_behaved_request(host, port, max_tokens, prompt, timeout):
    """(answered, seconds): a refused connection, an error status or no answer within
    `timeout` counts as not answered."""
    t0 = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=WELL)
        body = json.dumps({"messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": 0})
        conn.request("POST", "/v1/chat/completions", body,
                     {"Content-Type": "application/json", "Connection": "close"})
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status == 200, time.monotonic() - t0
    except OSError:
        return False, time.monotonic() - t0


def connect(host, port):
    s = socket.create_connection((host, port), timeout=5, source_address=ABUSER)
    return s


def slowloris(host, port, stop):
    """Opens a connection, sends half a request's headers, one more header line now and
    then, and reconnects when the server closes it."""
    while not stop.is_set():
        try:
            s = connect(host, port)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            while not stop.is_set():
                time.sleep(0.5)
                s.sendall(b"X-a: b\r\n")
        except OSError:
            time.sleep(0.05)


def slow_body(host, port, stop):
    while not stop.is_set():
        try:
            s = connect(host, port)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            while not stop.is_set():
                time.sleep(1)
                s.sendall(b" ")
        except OSError:
            time.sleep(0.05)


def idle_flood(host, port, stop):
    """Holds as many idle connections as the server lets it, reopening closed ones."""
    held = []
    while not stop.is_set():
        try:
            held.append(connect(host, port))
        except OSError:
            time.sleep(0.05)
        if len(held) > 64:
            held.pop(0).close()
        time.sleep(0.01)
    for s in held:
        s.close()


def junk(host, port, stop):
    """Bodies declared at 1 GB, malformed JSON and JSON nested 100,000 deep, as fast as
    the server answers them."""
    bodies = [
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 9\r\nConnection: close\r\n\r\n{\"messag",
    ]
    deep = b"[" * 100000
    bodies.append(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(deep)}\r\nConnection: close\r\n\r\n".encode() + deep)
    i = 0
    while not stop.is_set():
        try:
            s = connect(host, port)
            s.sendall(bodies[i % len(bodies)])
            s.settimeout(5)
            while s.recv(65536):
                pass
            s.close()
        except OSError:
            time.sleep(0.05)
        i += 1


def start_abuse(host, port):
    stop = threading.Event()
    kinds = [(slowloris, 24), (slow_body, 8), (idle_flood, 2), (junk, 2)]
    threads = [threading.Thread(target=f, args=(host, port, stop), daemon=True)
               for f, n in kinds for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(2)  # let the abuse reach its steady state
    return stop, threads


def p99(xs):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("pid", type=int)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=15, help="seconds before a request counts as not answered")
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    u = urlparse(a.url)
    host, port = u.hostname, u.port
    prompts = ["Name a colour.", "What is 2+2?", "Say hello.", "Name a fruit."]
    phase = lambda: [well_behaved_request(host, port, a.max_tokens, prompts[i % len(prompts)], a.timeout)
                     for i in range(a.requests)]
    phase()  # warm-up
    rss_before = rss_mib(a.pid)
    rounds = []
    for r in range(a.rounds):
        idle = phase()
        stop, threads = start_abuse(host, port)
        abused = phase()
        stop.set()
        for t in threads:
            t.join(timeout=10)
        # p99 over every request, one not answered counting as the time it was given up
        # after: a server that drops well-behaved clients cannot look fast.
        ip, ap99 = p99([t for _, t in idle]), p99([t for _, t in abused])
        rounds.append({"round": r + 1, "idle_p99_s": round(ip, 3), "abused_p99_s": round(ap99, 3),
                       "ratio": round(ap99 / ip, 3),
                       "idle_not_answered": sum(not ok for ok, _ in idle),
                       "abused_not_answered": sum(not ok for ok, _ in abused)})
        print(json.dumps(rounds[-1]), flush=True)
    time.sleep(3)  # the abusers' last connections close or time out
    rss_after = rss_mib(a.pid)
    try:
        conn = http.client.HTTPConnection(host, port, timeout=30, source_address=WELL)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
    except OSError:
        metrics = ""
    refused = {line.split("reason=\"")[1].split("\"")[0]: float(line.split()[-1])
               for line in metrics.splitlines() if line.startswith("so8t_refused_total{")}
    ratios = [x["ratio"] for x in rounds]
    print(json.dumps({
        "label": a.label, "rounds": len(rounds), "requests_per_phase": a.requests,
        "median_ratio_abused_over_idle_p99": round(statistics.median(ratios), 3),
        "ratio_min": min(ratios), "ratio_max": max(ratios),
        "not_answered_idle": sum(x["idle_not_answered"] for x in rounds),
        "not_answered_abused": sum(x["abused_not_answered"] for x in rounds),
        "rss_mib_before": round(rss_before, 1), "rss_mib_after": round(rss_after, 1),
        "refused": refused,
    }))


if __name__ == "__main__":
    main()
