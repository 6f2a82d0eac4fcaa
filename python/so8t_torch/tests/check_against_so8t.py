"""so8t_torch against the so8t binary, on the tiny fixture models (run by
crates/so8t-cli/tests/so8t_torch.rs; exits non-zero on the first mismatch):

1. an SO8T directory made by `so8t convert --init random` (qwen2, and phi3's fused
   projections) loads here and gives what `so8t run` gives: the same greedy tokens, the
   top-5 log-probabilities of every step and the verdicts of the prompt and of every
   token within 1e-4 (f32 forwards in another order);
2. an SO8T directory loaded and saved again is byte-identical (adapter and config);
3. an adapter trained here (a few Adam steps of the spec's loss, heads included) loads in
   so8t: `so8t validate` passes and `so8t run` gives what so8t_torch gives (the trained
   heads make the verdict comparison non-trivial).

    python check_against_so8t.py SO8T_BIN FIXTURES_DIR WORK_DIR
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from so8t_torch import Example, So8tModel, pet_lambda, so8t_loss  # noqa: E402

TOL = 1e-4
PROMPT = [3, 17, 42, 5, 9, 28]
STEPS = 6


def so8t(binary, *args):
    out = subprocess.run([binary, *map(str, args)], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"so8t {' '.join(map(str, args))} failed:\n{out.stderr}")
    return out.stdout


def eos_ids(model):
    ids = set()
    for c in (model.base.config, getattr(model.base, "generation_config", None)):
        e = getattr(c, "eos_token_id", None)
        ids.update(e if isinstance(e, list) else [e] if e is not None else [])
    return ids


def ours(model):
    """Greedy tokens (to an end-of-generation id, as so8t stops), top-5 log-probs per
    step, prompt verdict and token verdicts."""
    ids, steps, eos = list(PROMPT), [], eos_ids(model)
    with torch.no_grad():
        for _ in range(STEPS):
            logits, _, heads = model(torch.tensor([ids]))
            logp = torch.log_softmax(logits[0, -1].double(), -1)
            steps.append(logp)
            if int(logp.argmax()) in eos:
                break
            ids.append(int(logp.argmax()))
        _, _, heads = model(torch.tensor([ids]))
    v = model.verdicts(heads)
    verdict = lambda i: (float(v["p_unsafe"][0, i]), float(v["p_escalate"][0, i]))
    n = len(ids) - len(PROMPT)
    return ids[len(PROMPT):], steps, verdict(len(PROMPT) - 1), [verdict(len(PROMPT) + t) for t in range(n)]


def compare(binary, model_dir, what):
    model = So8tModel.from_pretrained(model_dir).eval()
    tokens, steps, prompt_v, token_v = ours(model)
    run = json.loads(so8t(binary, "run", "--model", model_dir, "--prompt-ids", ",".join(map(str, PROMPT)),
                          "-n", STEPS, "--temperature", "0", "--json"))
    if run["tokens"] != tokens:
        sys.exit(f"{what}: so8t tokens {run['tokens']} vs so8t_torch {tokens}")
    worst = 0.0
    for t, alts in enumerate(run["top_logprobs"]):
        for a in alts:
            worst = max(worst, abs(a["logprob"] - float(steps[t][a["id"]])))
    pairs = [(prompt_v, run["prompt_verdict"])] + list(zip(token_v, run["verdicts"]))
    for (pu, pe), theirs in pairs:
        worst = max(worst, abs(pu - theirs["p_unsafe"]), abs(pe - theirs["p_escalate"]))
    if worst > TOL:
        sys.exit(f"{what}: log-probs and verdicts differ by {worst} (> {TOL})")
    print(f"{what}: {len(tokens)} tokens equal ({run['finish_reason']}); log-probs and verdicts within {worst:.2e}")
    return model


def train(model, steps=3):
    """A few Adam steps of the spec's loss on labelled rows (a prompt with a response)."""
    rows = [Example(ids=[3, 17, 42, 5, 9, 28, 11, 30], prompt_len=6, verdict_at=5, safety=True, authority=False,
                    response_safety=True, response_authority=False),
            Example(ids=[8, 64, 11, 2, 77, 23, 99], prompt_len=5, verdict_at=4, safety=False, authority=True,
                    response_safety=False, response_authority=True)]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    model.train()
    for s in range(steps):
        opt.zero_grad()
        total, *_ = so8t_loss(model, rows, pet_lambda(s, steps, 0.1))
        total.backward()
        opt.step()
    model.eval()
    moved = float(model.heads["safety"].weight.detach().abs().max())
    if moved == 0.0:
        sys.exit("training did not move the heads")


def main():
    binary, fixtures, work = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    for base in ["tiny-qwen2", "tiny-phi3"]:
        src = work / f"{base}-random"
        so8t(binary, "convert", fixtures / base, "--out", src, "--init", "random", "--seed", 5, "--scale", 0.2, "--force")
        model = compare(binary, src, f"{base}: so8t convert --init random")
    model = So8tModel.from_pretrained(work / "tiny-qwen2-random")
    model.save_pretrained(work / "resaved")
    for f in ("so8t_adapter.safetensors", "so8t_config.json"):
        if (work / "resaved" / f).read_bytes() != (work / "tiny-qwen2-random" / f).read_bytes():
            sys.exit(f"{f} written by so8t_torch differs from so8t's bytes")
    print("an adapter loaded and saved again: byte-identical to so8t's files")
    train(model)
    trained = work / "tiny-qwen2-trained"
    model.save_pretrained(trained, base_dir=work / "tiny-qwen2-random")
    report = json.loads(so8t(binary, "validate", trained, "--json"))
    checks = report["checks"] if isinstance(report, dict) else report
    failed = [c for c in checks if not c["ok"]]
    if failed:
        sys.exit(f"so8t validate on the trained adapter: {failed}")
    print(f"trained adapter: so8t validate passes ({len(checks)} checks)")
    model = compare(binary, trained, "trained adapter")
    _, _, prompt_v, _ = ours(model)
    if abs(prompt_v[0] - 0.5) < 1e-2 and abs(prompt_v[1] - 0.5) < 1e-2:
        sys.exit(f"the trained heads still say {prompt_v}: the verdict comparison tested nothing")


if __name__ == "__main__":
    main()
