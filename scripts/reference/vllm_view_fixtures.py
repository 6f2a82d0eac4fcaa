#!/usr/bin/env python3
"""transformers on the classifier views `so8t export --format vllm` writes (what vLLM's
pooling runner loads): the per-token scores of `*ForTokenClassification` loading each view
as it is, recorded for tests/export.rs, which checks them against so8t's own head logits
less the biases. The SO8T models are the fixtures' random ones (make_fixtures.py), with
the safety head moved to layer 1 of 2 so that a view is cut below the top.

    cargo build --release -p so8t-cli && python scripts/reference/vllm_view_fixtures.py

Run it after make_fixtures.py and phi3_fixtures.py: they rewrite so8t-random/, where
this writes its files.
"""
import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
SO8T = ROOT / "target/release/so8t"
CASES = {"tiny-qwen2": "Qwen2ForTokenClassification", "tiny-phi3": "Phi3ForTokenClassification"}
SAFETY_LAYER = 1


def so8t_dir(base: Path, dst: Path):
    """The fixture's random SO8T model, with the safety head reading layer 1."""
    dst.mkdir()
    for f in base.iterdir():
        if f.is_file() and not f.name.startswith("expected") and f.suffix != ".gguf":
            shutil.copy(f, dst / f.name)
    for f in ("so8t_adapter.safetensors", "so8t_config.json"):
        shutil.copy(base / "so8t-random" / f, dst / f)
    cfg = json.loads((dst / "so8t_config.json").read_text())
    cfg["heads"] = {"safety": {"layer": SAFETY_LAYER}}
    (dst / "so8t_config.json").write_text(json.dumps(cfg, indent=2))


def main():
    for name, cls in CASES.items():
        base = FIX / name
        inputs = json.loads((base / "expected.json").read_text())["inputs"]
        out = {}
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "so8t"
            so8t_dir(base, src)
            view_root = Path(tmp) / "vllm"
            subprocess.run([str(SO8T), "export", str(src), "--out", str(view_root), "--format", "vllm"], check=True)
            heads = json.loads((view_root / "so8t_heads.json").read_text())
            for view in sorted(p.name for p in view_root.iterdir() if p.name.startswith("classifier")):
                model = getattr(transformers, cls).from_pretrained(view_root / view, dtype=torch.float32).eval()
                assert model.score.bias is None
                with torch.no_grad():
                    for i, ids in enumerate(inputs):
                        out[f"{view}.{i}"] = model(torch.tensor([ids])).logits[0].contiguous()
            (base / "so8t-random" / "vllm-heads.json").write_text(json.dumps(heads, indent=1))
            # The files transformers read, so the test knows its export made them.
            files = {f"{v.name}/{f}": hashlib.sha256((v / f).read_bytes()).hexdigest()
                     for v in sorted(view_root.glob("classifier*")) for f in ("config.json", "model.safetensors")}
            (base / "so8t-random" / "vllm-files.json").write_text(json.dumps(files, indent=1))
        save_file(out, str(base / "so8t-random" / "vllm-view.safetensors"))
        print(name, sorted(out))


if __name__ == "__main__":
    main()
