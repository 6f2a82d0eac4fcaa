"""DistributedDataParallel (gloo, CPU) gives the gradients of one process: each of the
ranks runs half the batch through DDP, which averages their gradients; rank 0 also runs
the whole batch alone and compares (the halves hold the same label structure, so the mean
of the halves' losses is the whole batch's loss). Exits non-zero on a mismatch.

    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_gradients.py SO8T_DIR
"""
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from so8t_torch import Example, So8tModel, so8t_loss  # noqa: E402

ROWS = [
    Example(ids=[3, 17, 42, 5, 9, 28, 11, 30], prompt_len=6, verdict_at=5, safety=True, authority=False,
            response_safety=True, response_authority=False),
    Example(ids=[8, 64, 11, 2, 77, 23, 99], prompt_len=5, verdict_at=4, safety=True, authority=False,
            response_safety=True, response_authority=False),
    Example(ids=[12, 5, 40, 41, 7, 19, 6], prompt_len=4, verdict_at=3, safety=False, authority=True,
            response_safety=False, response_authority=True),
    Example(ids=[33, 2, 9, 14, 15, 60], prompt_len=4, verdict_at=3, safety=False, authority=True,
            response_safety=False, response_authority=True),
]
LAMBDA = 0.1


class Loss(torch.nn.Module):
    """One DDP forward per step: the whole (local) batch's loss."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rows):
        return so8t_loss(self.model, rows, LAMBDA)[0]


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node 2"
    model = So8tModel.from_pretrained(sys.argv[1])
    with torch.no_grad():  # non-zero heads, the same on every rank
        g = torch.Generator().manual_seed(0)
        for h in model.heads.values():
            h.weight.copy_(torch.randn(h.weight.shape, generator=g) * 0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(Loss(model))
    # Rank r takes rows r and r + 2: one of each label pattern.
    ddp(ROWS[rank::world]).backward()
    distributed = grads(model)
    if rank == 0:
        model.zero_grad()
        Loss(model)(ROWS).backward()
        alone = grads(model)
        worst = max(float(((distributed[n] - alone[n]).abs().max() / alone[n].abs().max().clamp_min(1e-12))) for n in alone)
        scale = max(float(g.abs().max()) for g in alone.values())
        print(f"DDP over {world} ranks vs one process: {len(alone)} gradients, largest relative difference {worst:.2e} (largest gradient {scale:.3f})")
        ok = worst <= 1e-5 and scale > 0
    else:
        ok = True
    flag = torch.tensor([int(ok)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    code = 0 if flag.item() else 1
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: gloo's worker threads (DDP's reducer still
    # holds work on them) can race it and abort the process ("terminate called without an
    # active exception", seen once in CI after the check had passed; pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
