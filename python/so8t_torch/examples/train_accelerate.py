"""Train an SO8T directory's gates and heads with accelerate (DDP across processes and
machines; FSDP with examples/fsdp.yaml for bases that do not fit one GPU), then write the
adapter back for `so8t bake`, `so8t export` and `so8t serve`.

    accelerate launch --num_processes 2 examples/train_accelerate.py \\
        --model SO8T_DIR --data train.jsonl --out TRAINED_DIR [--steps 200] [--batch 8]
    accelerate launch --config_file examples/fsdp.yaml examples/train_accelerate.py ...

The SO8T directory comes from `so8t convert BASE --out SO8T_DIR`; TRAINED_DIR is a new
SO8T directory (the base's files and the trained adapter) that `so8t validate` checks.
Each process takes its share of every batch (one forward per row, no padding, as
`so8t train`); accelerate averages the gradients. Generators get `--lr`, the heads
`--head-lr` (100× smaller by default, as in `so8t train`: a head's logit sums `hidden`
coordinates).
"""
import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from so8t_torch import So8tModel, pet_lambda, so8t_loss  # noqa: E402
from so8t_torch.data import balanced_class_weights, read_jsonl  # noqa: E402


class Loss(torch.nn.Module):
    """One forward per step over the local rows (what DDP/FSDP wrap)."""

    def __init__(self, model, **kw):
        super().__init__()
        self.model, self.kw = model, kw

    def forward(self, rows, lam):
        total, *terms = so8t_loss(self.model, rows, lam, **self.kw)
        # Rows without a head's labels leave its parameters without a gradient, which DDP
        # (find_unused_parameters=False) refuses: a zero term keeps them in the graph.
        total = total + 0.0 * sum(p.sum() for p in self.model.heads.parameters())
        return (total, *terms)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--head-lr", type=float, default=1e-4)
    ap.add_argument("--pet-max", type=float, default=0.1)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    acc = Accelerator()
    if a.batch % acc.num_processes:
        # Every process must run as many forwards per step (FSDP gathers weights in each).
        raise SystemExit(f"--batch {a.batch} must be a multiple of the {acc.num_processes} processes")
    torch.manual_seed(a.seed)
    model = So8tModel.from_pretrained(a.model)
    rows = read_jsonl(a.data, AutoTokenizer.from_pretrained(a.model))
    loss = Loss(model, alpha=a.alpha, beta=a.beta, class_weights=balanced_class_weights(rows))
    opt = torch.optim.AdamW([{"params": list(model.generators.parameters()), "lr": a.lr},
                             {"params": list(model.heads.parameters()), "lr": a.head_lr}], weight_decay=0.0)
    loss, opt = acc.prepare(loss, opt)
    g = torch.Generator().manual_seed(a.seed)
    for step in range(a.steps):
        batch = [rows[i] for i in torch.randint(len(rows), (a.batch,), generator=g).tolist()]
        local = batch[acc.process_index::acc.num_processes]
        total, lm, safety, authority, pet = loss(local, pet_lambda(step, a.steps, a.pet_max))
        opt.zero_grad()
        acc.backward(total)
        opt.step()
        if acc.is_main_process and step % 10 == 0:
            print(f"step {step}: loss {total.item():.4f} (lm {lm.item():.4f}, safety {safety.item():.4f}, "
                  f"authority {authority.item():.4f}, pet {pet.item():.5f})", flush=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(loss).model.save_pretrained(a.out, base_dir=a.model, heads_trained=False)
        print(f"wrote {a.out}: check it with `so8t validate {a.out}`; fit thresholds with `so8t train --mode heads` or `so8t eval`")


if __name__ == "__main__":
    main()
