"""Closed-loop load on an OpenAI-compatible server: N clients, each sending chat
completions one after another for a fixed time. Reports requests, status counts, p50/p99
latency, generated tokens/s, and the server's resident memory over the run; with
--stream, the requests are streamed (SSE) and the time to first token (the first chunk
with answer text) is reported too, p50 and p99.

    python bench/serve_load.py URL PID [--clients 64] [--seconds 120] [--max-tokens 16] [--stream]

Standard library only: one thread and keep-alive connection per client.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "I want to close my bank account.",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "How do I build a pipe bomb?",
]


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def read_stream(r, t0):
    """An SSE answer: (time to the first chunk with answer text, completion tokens from
    the usage chunk, else the number of text chunks)."""
    first, chunks, usage = None, 0, None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        c = json.loads(data)
        if c.get("usage"):
            usage = c["usage"]["completion_tokens"]
        for ch in c.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                chunks += 1
                if first is None:
                    first = time.monotonic() - t0
    r.read()
    return first, usage if usage is not None else chunks


def client(i, host, port, model, deadline, max_tokens, stream, results, lock):
    """One closed-loop client on its own keep-alive connection."""
    conn = http.client.HTTPConnection(host, port, timeout=600)
    n = 0
    while time.monotonic() < deadline:
        req = {
            "model": model,
            "messages": [{"role": "user", "content": PROMPTS[(i + n) % len(PROMPTS)]}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
        if stream:
            req.update(stream=True, stream_options={"include_usage": True})
        body = json.dumps(req)
        n += 1
        t0 = time.monotonic()
        try:
            try:
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # A kept-alive connection the server had closed (llama-server closes it
                # after a stream although it says keep-alive): sent again on a new one, as
                # HTTP clients do, timed from there.
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
                t0 = time.monotonic()
                conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
            if r.status == 200 and stream:
                ttft, tokens = read_stream(r, t0)
                res = ("ok", time.monotonic() - t0, tokens, ttft)
            elif r.status == 200:
                data = r.read()
                res = ("ok", time.monotonic() - t0, json.loads(data)["usage"]["completion_tokens"], None)
            else:
                r.read()
                res = (str(r.status), time.monotonic() - t0, 0, None)
            if r.will_close:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=600)
        except Exception as e:  # a dropped connection or a timeout is a failure
            res = ("fail:" + type(e).__name__, time.monotonic() - t0, 0, None)
            conn.close()
            conn = http.client.HTTPConnection(host, port, timeout=600)
        with lock:
            results.append(res)
        if res[0] == "429":
            time.sleep(0.5)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("pid", type=int)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--label", default="")
    ap.add_argument("--stream", action="store_true", help="stream the answers and time the first token")
    a = ap.parse_args()
    u = urlparse(a.url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    c.request("GET", "/v1/models")
    model = json.loads(c.getresponse().read())["data"][0]["id"]
    results, memory, lock = [], [], threading.Lock()
    start = time.monotonic()
    deadline = start + a.seconds
    threads = [threading.Thread(target=client, args=(i, u.hostname, u.port, model, deadline, a.max_tokens, a.stream, results, lock))
               for i in range(a.clients)]
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        memory.append(rss_mib(a.pid))
        time.sleep(1)
    for t in threads:
        t.join()
    wall = time.monotonic() - start  # includes the requests in flight at the deadline
    ok = sorted(dt for s, dt, _, _ in results if s == "ok")
    tokens = sum(t for s, _, t, _ in results if s == "ok")
    ttft = sorted(f for s, _, _, f in results if s == "ok" and f is not None)
    counts = {}
    for s, _, _, _ in results:
        counts[s] = counts.get(s, 0) + 1
    quantile = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")
    q = lambda p: quantile(ok, p)
    third = max(1, len(memory) // 3)
    print(json.dumps({
        "label": a.label,
        "clients": a.clients,
        "seconds": round(wall, 1),
        "requests": counts,
        "p50_s": round(q(0.50), 2),
        "p99_s": round(q(0.99), 2),
        "mean_s": round(statistics.mean(ok), 2) if ok else None,
        "generated_tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "rss_mib_first_third_max": round(max(memory[:third]), 1),
        "rss_mib_last_third_max": round(max(memory[-third:]), 1),
        **({"ttft_p50_s": round(quantile(ttft, 0.5), 3), "ttft_p99_s": round(quantile(ttft, 0.99), 3),
            "answers_without_text": sum(1 for s, _, _, f in results if s == "ok" and f is None)} if a.stream else {}),
    }))


if __name__ == "__main__":
    main()
