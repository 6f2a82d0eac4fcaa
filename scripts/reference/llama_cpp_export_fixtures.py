#!/usr/bin/env python3
"""llama.cpp on GGUFs exported by so8t from SO8T models with random gates: convert the
real model with a fixed seed, export, and record the file's sha256 (the Rust test
re-exports and checks it made the same file) and llama.cpp's greedy tokens on it, into
fixtures/llama-cpp/export-*.json.

    cargo build --release -p so8t-cli && python scripts/reference/llama_cpp_export_fixtures.py
"""
import hashlib
import json
import os
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache/so8t"))
REF = CACHE / "llama.cpp/build/bin/llama-ref-greedy"
SO8T = ROOT / "target/release/so8t"
MODELS = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "qwen25coder": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"}
QUANTS = ["f16", "q8_0", "q4_k_m"]
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):"]
SEED, SCALE = 42, 0.05
N_TOKENS = 32


def main():
    out_dir = ROOT / "fixtures/llama-cpp"
    for name, fname in MODELS.items():
        with tempfile.TemporaryDirectory() as tmp:
            so8t_dir = Path(tmp) / "so8t"
            subprocess.run([str(SO8T), "convert", str(CACHE / fname), "--out", str(so8t_dir), "--init", "random",
                            "--seed", str(SEED), "--scale", str(SCALE)], check=True)
            record = {"model": fname, "seed": SEED, "scale": SCALE, "n_tokens": N_TOKENS, "exports": {}}
            for q in QUANTS:
                gguf = Path(tmp) / f"{q}.gguf"
                r = subprocess.run([str(SO8T), "export", str(so8t_dir), "--out", str(gguf), "--quant", q])
                if r.returncode != 0:
                    print(f"{name} {q}: export failed, skipped")
                    continue
                sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
                cases = []
                for p in PROMPTS:
                    res = subprocess.run([str(REF), str(gguf), str(N_TOKENS)], input=p.encode(), capture_output=True, check=True)
                    d = json.loads(res.stdout)
                    precise = subprocess.run([str(REF), str(gguf), str(N_TOKENS)], input=p.encode(), capture_output=True,
                                             check=True, env={**os.environ, "LLAMA_REF_PRECISE": "1"})
                    cases.append({"prompt": p, "chat": False, "rendered": p, "prompt_tokens": d["prompt_tokens"],
                                  "steps": d["steps"], "steps_precise": json.loads(precise.stdout)["steps"]})
                record["exports"][q] = {"sha256": sha, "cases": cases}
                print(name, q, sha[:12])
        (out_dir / f"export-{name}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
