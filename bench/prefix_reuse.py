#!/usr/bin/env python3
"""Time to first token with a shared system prompt: `so8t serve` against `llama-server`
(its slots keep their prompt cache too) on the same GGUF, in alternating rounds.

Each round gives each server a system prompt it has not seen (so the first request of the
round runs it all: "cold") and then `--warm` more requests with the same system prompt and
other questions ("warm": a server that reuses the prefix runs only the question). One
client, streaming, `max_tokens` 1; the time to the first content chunk.

    bench/prefix_reuse.sh   (starts both servers, then runs this)
"""
import argparse
import json
import statistics
import time
import urllib.request

QUESTIONS = ["What is the capital of France?", "Name a prime number.", "Write one word about the sea.",
             "What colour is the sky?", "Say hello.", "Count to three.", "What is 2 + 2?", "Name a fruit."]


def system_prompt(round_no: int, words: int) -> str:
    base = ("You are a careful assistant for the SO8T project. Answer briefly and politely, refuse anything "
            "harmful, and escalate questions about accounts or payments to a human. ")
    text = f"Session {round_no}. " + base * (words // len(base.split()) + 1)
    return " ".join(text.split()[:words])


def ttft(url: str, system: str, question: str) -> float:
    body = json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                       "max_tokens": 1, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                return time.perf_counter() - t0
    raise RuntimeError(f"{url}: no content in the stream")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("servers", nargs="+", help="label=url, in the order each round visits them")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--words", type=int, default=300)
    a = ap.parse_args()
    servers = [s.split("=", 1) for s in a.servers]
    res = {label: {"cold": [], "warm": []} for label, _ in servers}
    for r in range(a.rounds):
        for label, url in servers:
            sp = system_prompt(r, a.words)
            res[label]["cold"].append(ttft(url, sp, QUESTIONS[0]))
            warm = [ttft(url, sp, QUESTIONS[1 + k % (len(QUESTIONS) - 1)]) for k in range(a.warm)]
            res[label]["warm"].append(statistics.median(warm))
        print(f"round {r + 1}: " + ", ".join(
            f"{l} cold {res[l]['cold'][-1] * 1e3:.0f} ms warm {res[l]['warm'][-1] * 1e3:.0f} ms" for l, _ in servers),
            flush=True)
    (first, _), (second, _) = servers[0], servers[1]
    for kind in ("cold", "warm"):
        ratios = [b / a_ for a_, b in zip(res[first][kind], res[second][kind])]
        print(f"{kind}: {first} median {statistics.median(res[first][kind]) * 1e3:.0f} ms, "
              f"{second} median {statistics.median(res[second][kind]) * 1e3:.0f} ms; "
              f"{second}/{first} per round: median {statistics.median(ratios):.2f} "
              f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    own = [c / w for c, w in zip(res[first]["cold"], res[first]["warm"])]
    print(f"{first} cold/warm per round: median {statistics.median(own):.2f} (range {min(own):.2f}-{max(own):.2f})")


if __name__ == "__main__":
    main()
