#!/usr/bin/env python3
"""Reference block bytes from ggml's quantisers (scripts/llama-ref/quantize.cpp) for a
small weight-like matrix, into fixtures/quant/: input.f32 (8×1024) and TYPE.bin."""
import os
import subprocess
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache/so8t"))
ROWS, COLS = 8, 1024


def main():
    rng = np.random.default_rng(7)
    x = rng.normal(0, 0.02, (ROWS, COLS)).astype(np.float32)
    x[:, rng.choice(COLS, 6, replace=False)] *= 25  # outlier columns, as real weights have
    x[3, 256:512] = 0  # an all-zero block
    x[5, :32] = 1e-9  # a tiny block
    x[6] = np.abs(x[6])  # a row with no negative values (min clamps to 0)
    out = ROOT / "fixtures/quant"
    out.mkdir(parents=True, exist_ok=True)
    (out / "input.f32").write_bytes(x.tobytes())
    subprocess.run([str(CACHE / "llama.cpp/build/bin/llama-ref-quantize"), str(ROWS), str(COLS), str(out)],
                   input=x.tobytes(), check=True)


if __name__ == "__main__":
    main()
