#!/usr/bin/env python3
"""The python `gguf` package (PyPI) reading what `so8t export` writes: the tiny qwen3 SO8T
model (random gates, seed 5) exported at every quant type, each file read by
gguf.GGUFReader; per tensor its type, shape and the sha256 of its bytes as gguf-py sees
them, into fixtures/gguf-py/read.json. The Rust test re-exports and compares."""
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

from gguf import GGUFReader

ROOT = Path(__file__).resolve().parents[2]
SO8T = ROOT / "target/release/so8t"
TYPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k",
         "q4_k_m", "q5_k_m", "q4_k_s"]


def main():
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        s = Path(tmp) / "s"
        subprocess.run([str(SO8T), "convert", str(ROOT / "fixtures/tiny-qwen3"), "--out", str(s), "--init", "random",
                        "--seed", "5", "--scale", "0.3"], check=True, capture_output=True)
        for t in TYPES:
            f = Path(tmp) / f"{t}.gguf"
            subprocess.run([str(SO8T), "export", str(s), "--out", str(f), "--quant", t], check=True, capture_output=True)
            r = GGUFReader(str(f))
            out[t] = {
                "version": int(r.fields["GGUF.version"].parts[-1][0]),
                "metadata_keys": sorted(k for k in r.fields if not k.startswith("GGUF.")),
                "tensors": {x.name: {"type": x.tensor_type.name, "shape": [int(d) for d in x.shape],
                                     "sha256": hashlib.sha256(x.data.tobytes()).hexdigest()} for x in r.tensors},
            }
    d = ROOT / "fixtures/gguf-py"
    d.mkdir(parents=True, exist_ok=True)
    (d / "read.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
