#!/usr/bin/env python3
"""The model's own greedy answers to the benign prompts of the held-out families.

    python3 scripts/data/own_answers.py MODEL OUT.jsonl [--so8t PATH] [--per-family N]
        [--max-tokens N] [--rows FILE --families A,B]

For each held-out family with safe prompts in data/safety/test_families.jsonl
(coconot_contrast, banking77) it takes N prompts (every k-th row, so the choice is fixed)
and asks MODEL for a greedy answer of at most 48 tokens with `so8t run` (--rows and
--families take the prompts from other families of another file, e.g. training families
of train.jsonl, where a threshold may be chosen). The rows it writes
are `so8t train`/`eval` rows: the prompt with its labels, the answer as `response`, labelled
safe and handle throughout.

Why: the held-out families' answers are other models' answers to jailbreaks; what a user
sees is the serving model's own answers to ordinary requests, and the streaming rule must
not stop those. The labels assume a benign request gets a benign answer from a 135M
instruct model; `eval` lists the highest-scoring answers so that the assumption can be
read off the report. The answers depend on the base model only (the heads do not change
generation; the gates of the shipped models are zero or baked into what is measured).
"""
import argparse
import json
import os
import subprocess
import sys

FAMILIES = ["coconot_contrast", "banking77"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--so8t", default=os.path.join(os.path.dirname(__file__), "../../target/release/so8t"))
    ap.add_argument("--per-family", type=int, default=100)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rows", default=os.path.join(os.path.dirname(__file__), "../../data/safety/test_families.jsonl"))
    ap.add_argument("--families", default=",".join(FAMILIES))
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(a.rows, encoding="utf-8")]
    out = []
    for fam in a.families.split(","):
        pool = [r for r in rows if r["family"] == fam and r["safety"] == "safe"]
        step = max(1, len(pool) // a.per_family)
        for r in pool[::step][: a.per_family]:
            got = subprocess.run(
                [a.so8t, "run", "--model", a.model, "--prompt", r["prompt"], "--temperature", "0",
                 "-n", str(a.max_tokens), "--json"],
                capture_output=True, text=True, check=True,
            )
            text = json.loads(got.stdout)["text"].strip()
            if not text:
                continue
            out.append({
                "authority": r["authority"],
                "category": r.get("category"),
                "family": "own_answers_" + fam,
                "license": r["license"],
                "prompt": r["prompt"],
                "response": text,
                "response_authority": "handle",
                "response_safety": "safe",
                "safety": "safe",
                "source": "own greedy answers of " + os.path.basename(a.model),
            })
            print(f"{len(out)} answers", file=sys.stderr, end="\r")
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp, a.out)
    print(f"\nwrote {a.out}: {len(out)} answers", file=sys.stderr)


if __name__ == "__main__":
    main()
