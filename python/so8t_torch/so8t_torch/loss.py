"""The training loss of SO8T_SPEC.md §6, as `so8t train --mode gates` computes it:
`L_LM + α·CE_safety + β·CE_authority + λ(t)·L_PET`, per example: next-token loss on the
response when there is one (else on the prompt), each head's class-weighted cross-entropy
at the prompt's verdict position and over every response token, PET over the final
hidden states; averaged over the batch (the heads' terms by their summed class weights).
"""
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Example:
    """One tokenised row: `ids` = prompt (+ response), `prompt_len`, the prompt's verdict
    position `verdict_at`, and labels (True = unsafe / escalate; None = unlabelled)."""
    ids: list
    prompt_len: int
    verdict_at: int
    safety: Optional[bool] = None
    authority: Optional[bool] = None
    response_safety: Optional[bool] = None
    response_authority: Optional[bool] = None

    def has_response(self):
        return len(self.ids) > self.prompt_len


def pet_lambda(step, total, lam_max):
    """λ(t): linear ramp to `lam_max` over the first 30% of steps, hold, anneal to 0 over the
    last 20%."""
    if total <= 1:
        return lam_max
    u = step / (total - 1)
    if u < 0.3:
        return lam_max * u / 0.3
    if u <= 0.8:
        return lam_max
    return lam_max * (1 - u) / 0.2


def pet_loss(h):
    """mean_t ‖h_{t+1} − 2h_t + h_{t−1}‖² / d over the rows of `h` `[len, d]`."""
    if h.shape[0] < 3:
        return h.new_zeros(())
    acc = h[2:] - 2 * h[1:-1] + h[:-2]
    return acc.pow(2).sum(-1).mean() / h.shape[1]


def so8t_loss(model, batch, lam, alpha=1.0, beta=1.0, class_weights=((1.0, 1.0), (1.0, 1.0))):
    """Loss terms `(total, lm, safety, authority, pet)` of `batch` (a list of `Example`),
    one forward per example (no padding, as so8t)."""
    if not batch:
        raise ValueError("so8t_loss: an empty batch")
    zero = lambda: torch.zeros((), device=model.heads["safety"].weight.device)
    lm, pet = zero(), zero()
    ce, ce_weight = [zero(), zero()], [0.0, 0.0]
    for ex in batch:
        ids = torch.tensor([ex.ids], device=model.heads["safety"].weight.device)
        logits, hidden, heads = model(ids)
        start = ex.prompt_len - 1 if ex.has_response() else 0
        n = len(ex.ids)
        if n > start + 1:
            logp = torch.log_softmax(logits[0, start:n - 1].float(), -1)
            lm = lm + torch.nn.functional.nll_loss(logp, ids[0, start + 1:])
        labels = ((ex.safety, ex.response_safety), (ex.authority, ex.response_authority))
        for k, name in enumerate(("safety", "authority")):
            z = heads[name][0].float()
            for label, rows in ((labels[k][0], z[ex.verdict_at:ex.verdict_at + 1]), (labels[k][1], z[ex.prompt_len:])):
                if label is None or rows.shape[0] == 0:
                    continue
                w = class_weights[k][int(label)]
                ce[k] = ce[k] - torch.log_softmax(rows, -1)[:, int(label)].mean() * w
                ce_weight[k] += w
        pet = pet + pet_loss(hidden[0].float())
    n = len(batch)
    lm, pet = lm / n, pet / n
    safety = ce[0] / ce_weight[0] if ce_weight[0] > 0 else ce[0]
    authority = ce[1] / ce_weight[1] if ce_weight[1] > 0 else ce[1]
    total = lm + alpha * safety + beta * authority + lam * pet
    return total, lm, safety, authority, pet
