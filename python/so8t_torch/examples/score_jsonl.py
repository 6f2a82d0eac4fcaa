"""Batch scoring: the prompt verdicts of a JSONL of prompts from the classifier view(s) that
`so8t export --format vllm OUT` writes, with vLLM's offline pooling runner (the engine for
large jobs; **untested here: vLLM does not install on these machines**) or transformers
(the same numbers, slower; tested against `so8t run` in crates/so8t-cli/tests/so8t_torch.rs).

    python score_jsonl.py OUT prompts.jsonl scored.jsonl [--engine vllm|transformers] [--batch 64]

Each input row has `prompt` (a user message) or `messages`; each output row is the input
row plus `p_unsafe`, `p_escalate` and `decision` (refuse / escalate / allow under the
exported thresholds). The prompt is rendered with the model's chat template and the
assistant header, and read at its last token (`verdict_position` "assistant_header", the
default; rows are refused for "user_end"). so8t_heads.json says how scores become
probabilities: the view's score layer has no bias, so the biases are added here.
"""
import argparse
import json
import math
from pathlib import Path


def load_rows(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def render(tokenizer, row):
    messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def last_scores_transformers(view_dir, texts, batch):
    """The view's scores `[4]` (or `[2]`) at each text's last token."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(view_dir)
    model = AutoModelForTokenClassification.from_pretrained(view_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            for t in texts[i:i + batch]:  # one at a time: no padding to get wrong
                ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"]
                out.append(model(input_ids=ids).logits[0, -1].tolist())
    return out


def last_scores_vllm(view_dir, texts, batch):
    from vllm import LLM, PoolingParams

    llm = LLM(model=str(view_dir), runner="pooling", convert="classify")
    outs = llm.encode(texts, pooling_task="token_classify", pooling_params=PoolingParams(use_activation=False))
    return [o.outputs.data[-1].tolist() for o in outs]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("export_dir", type=Path)
    ap.add_argument("rows", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    spec = json.loads((a.export_dir / "so8t_heads.json").read_text())
    if spec.get("verdict_position", "assistant_header") != "assistant_header":
        raise SystemExit(f"{a.export_dir}/so8t_heads.json: verdict_position {spec['verdict_position']!r} is not supported by this recipe")
    rows = load_rows(a.rows)
    from transformers import AutoTokenizer

    heads = spec["heads"]
    views = sorted({h["view"] for h in heads.values()})
    texts = [render(AutoTokenizer.from_pretrained(a.export_dir / views[0]), r) for r in rows]
    engine = last_scores_vllm if a.engine == "vllm" else last_scores_transformers
    scores = {v: engine(a.export_dir / v, texts, a.batch) for v in views}
    with open(a.out, "w") as f:
        for i, row in enumerate(rows):
            p = {}
            for name, h in heads.items():
                s = scores[h["view"]][i]
                r0, r1 = h["score_rows"]
                z = (s[r1] + h["bias"][1]) - (s[r0] + h["bias"][0])
                p[name] = 1 / (1 + math.exp(-z))
            unsafe = p["safety"] >= heads["safety"]["prompt_threshold"]
            escalate = p["authority"] >= heads["authority"]["prompt_threshold"]
            decision = "refuse" if unsafe else "escalate" if escalate else "allow"
            f.write(json.dumps({**row, "p_unsafe": p["safety"], "p_escalate": p["authority"], "decision": decision}) + "\n")


if __name__ == "__main__":
    main()
