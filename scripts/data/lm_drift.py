#!/usr/bin/env python3
"""How far trained gates moved the language model: perplexity and greedy answers.

    python3 scripts/data/lm_drift.py --base BASE.gguf --gated GATED.gguf \
        --base-answers A.jsonl --gated-answers B.jsonl --out drift.json

Perplexity is llama.cpp's own (`llama-perplexity`, built by scripts/build-llama-cpp.sh)
on text no fit saw: the benign answers of data/safety/test.jsonl (held-out rows),
joined, in windows of --ctx tokens. Greedy answers are the two models' answers to the
same prompts (scripts/data/own_answers.py, 48 tokens each): how many are identical, and
how long their common prefix is. Both models are the Q8_0 exports that ship, so the
quantisation is the same on both sides and what differs is the gates.
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

ROOT = os.path.join(os.path.dirname(__file__), "../..")


def heldout_text() -> str:
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/safety/test.jsonl"), encoding="utf-8")]
    return "\n\n".join(
        r["response"]
        for r in rows
        if r.get("response") and r.get("response_safety") == "safe" and r["safety"] == "safe"
    )


def perplexity(binary: str, model: str, text_path: str, ctx: int) -> dict:
    p = subprocess.run(
        [binary, "-m", model, "-f", text_path, "-c", str(ctx), "-b", str(ctx), "-t", "2"],
        capture_output=True,
        text=True,
    )
    out = p.stdout + p.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if p.returncode != 0 or not m:
        raise SystemExit(f"llama-perplexity on {model} failed (exit {p.returncode}):\n{out[-2000:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out)
    return {
        "ppl": float(m.group(1)),
        "ppl_err": float(m.group(2)),
        "chunks": int(chunks.group(1)) if chunks else None,
    }


def answers(path: str) -> dict:
    rows = [json.loads(l) for l in open(path, encoding="utf-8")]
    return {r["prompt"]: r["response"] for r in rows}


def common_prefix_words(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--gated", required=True)
    ap.add_argument("--base-answers", required=True)
    ap.add_argument("--gated-answers", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ctx", type=int, default=256)
    cache = os.environ.get("SO8T_CACHE", os.path.expanduser("~/.cache/so8t"))
    ap.add_argument("--llama-perplexity", default=os.path.join(cache, "llama.cpp/build/bin/llama-perplexity"))
    a = ap.parse_args()

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(heldout_text())
        text = f.name
    try:
        ppl = {k: perplexity(a.llama_perplexity, m, text, a.ctx) for k, m in (("base", a.base), ("gated", a.gated))}
    finally:
        os.unlink(text)

    base, gated = answers(a.base_answers), answers(a.gated_answers)
    prompts = [p for p in base if p in gated]
    if not prompts:
        raise SystemExit(f"{a.base_answers} and {a.gated_answers} share no prompt")
    same = sum(base[p] == gated[p] for p in prompts)
    prefixes = sorted(common_prefix_words(base[p], gated[p]) for p in prompts)
    words = sorted(len(base[p].split()) for p in prompts)
    report = {
        "perplexity": ppl,
        "perplexity_ratio": ppl["gated"]["ppl"] / ppl["base"]["ppl"],
        "text": "benign answers of data/safety/test.jsonl, windows of %d tokens" % a.ctx,
        "greedy": {
            "prompts": len(prompts),
            "identical": same,
            "median_common_prefix_words": prefixes[len(prefixes) // 2],
            "median_base_answer_words": words[len(words) // 2],
        },
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, a.out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
