#!/usr/bin/env python3
"""PEFT's own OFT on the tiny Qwen2 fixture, both ways, recorded for tests/peft.rs.

- import/: an OFT adapter made, trained for a few steps and saved by PEFT (oft_block_size
  8, exact Cayley, random init, target o_proj, gate_proj, up_proj; up_proj's rotations set
  to gate_proj's after training, as the one SO8T mlp gate requires), and the logits
  PeftModel gives with it.
- export/: what `so8t export --format peft-oft` writes for a random SO8T model with q, v, o
  and mlp gates (`so8t convert --sites q,v,o,mlp --init random --seed 21 --scale 0.2`), the
  logits PeftModel gives when PEFT loads that adapter onto the base/ it came with (in f32
  and in f64), and `merged.safetensors`: PEFT's `merge_and_unload()` weights of the
  rotated projections.

    cargo build --release -p so8t-cli && python scripts/reference/peft_oft_fixtures.py

(peft==0.21.2, torch, transformers in a venv.)
"""
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import peft
import torch
import transformers
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
FIX = ROOT / "fixtures"
OUT = FIX / "peft-oft"
SO8T = ROOT / "target/release/so8t"
BASE = FIX / "tiny-qwen2"
IDS = [3, 17, 42, 5, 99, 23, 8, 64, 11, 30, 2, 77]


def logits(model):
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].tolist()


def write_logits(path, values, **more):
    path.write_text(json.dumps({"peft": peft.__version__, "transformers": transformers.__version__,
                                "ids": IDS, "logits": values, **more}) + "\n")


def import_case():
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=["o_proj", "gate_proj", "up_proj"],
                         use_cayley_neumann=False, init_weights=False, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, cfg)
    # A few steps of next-token loss on fixed ids: a trained adapter, not only an initial one.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    batch = torch.tensor([IDS, IDS[::-1]])
    for _ in range(4):
        opt.zero_grad()
        model(batch, labels=batch).loss.backward()
        opt.step()
    with torch.no_grad():
        for layer in model.base_model.model.model.layers:
            layer.mlp.up_proj.oft_R["default"].weight.copy_(layer.mlp.gate_proj.oft_R["default"].weight)
    model.eval()
    dst = OUT / "import"
    shutil.rmtree(dst, ignore_errors=True)
    model.save_pretrained(dst)
    (dst / "README.md").unlink(missing_ok=True)
    write_logits(OUT / "import_logits.json", logits(model))


def export_case():
    with tempfile.TemporaryDirectory() as tmp:
        so8t_dir, exported = Path(tmp) / "so8t", Path(tmp) / "peft"
        subprocess.run([SO8T, "convert", BASE, "--out", so8t_dir, "--sites", "q,v,o,mlp", "--init", "random",
                        "--seed", "21", "--scale", "0.2"], check=True)
        subprocess.run([SO8T, "export", so8t_dir, "--format", "peft-oft", "--out", exported], check=True)
        base = transformers.AutoModelForCausalLM.from_pretrained(exported / "base", dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, exported)
        model.eval()
        dst = OUT / "export"
        shutil.rmtree(dst, ignore_errors=True)
        dst.mkdir(parents=True)
        for name in ["adapter_config.json", "adapter_model.safetensors"]:
            shutil.copy(exported / name, dst / name)
        f32 = logits(model)
        f64 = logits(peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(exported / "base", dtype=torch.float64), exported).eval())
        write_logits(OUT / "export_logits.json", f32, logits_f64=f64)
        merged = model.merge_and_unload().state_dict()
        keep = {k: v.contiguous() for k, v in merged.items() if k.endswith(("o_proj.weight", "gate_proj.weight", "up_proj.weight"))}
        save_file(keep, OUT / "merged.safetensors")


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    import_case()
    export_case()
