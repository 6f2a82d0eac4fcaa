#!/usr/bin/env python3
"""llama.cpp on the trained SmolLM2 SO8T model exported at Q8_0: convert the real GGUF,
put the committed trained adapter and config (eval/smollm2-135m/model/) beside it, export,
and record the file's sha256 (the Rust test re-exports and checks it made the same file)
and llama.cpp's greedy tokens on it, into fixtures/llama-cpp/trained-smollm2.json.

    cargo build --release -p so8t-cli && python scripts/reference/llama_cpp_trained_fixture.py
"""
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache/so8t"))
REF = CACHE / "llama.cpp/build/bin/llama-ref-greedy"
SO8T = ROOT / "target/release/so8t"
MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
N_TOKENS = 32


def main():
    with tempfile.TemporaryDirectory() as tmp:
        so8t_dir = Path(tmp) / "so8t"
        subprocess.run([str(SO8T), "convert", str(CACHE / MODEL), "--out", str(so8t_dir)], check=True)
        for f in ("so8t_adapter.safetensors", "so8t_config.json"):
            shutil.copy(ROOT / "eval/smollm2-135m/model" / f, so8t_dir / f)
        gguf = Path(tmp) / "q8_0.gguf"
        subprocess.run([str(SO8T), "export", str(so8t_dir), "--out", str(gguf), "--quant", "q8_0"], check=True)
        cases = []
        for p in PROMPTS:
            run = lambda env: json.loads(subprocess.run([str(REF), str(gguf), str(N_TOKENS)], input=p.encode(),
                                                        capture_output=True, check=True, env=env).stdout)
            d = run(os.environ)
            precise = run({**os.environ, "LLAMA_REF_PRECISE": "1"})
            cases.append({"prompt": p, "chat": False, "rendered": p, "prompt_tokens": d["prompt_tokens"],
                          "steps": d["steps"], "steps_precise": precise["steps"]})
        record = {"model": MODEL, "quant": "q8_0", "n_tokens": N_TOKENS,
                  "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest(), "cases": cases}
    (ROOT / "fixtures/llama-cpp/trained-smollm2.json").write_text(json.dumps(record, indent=1))
    print(record["sha256"])


if __name__ == "__main__":
    main()
