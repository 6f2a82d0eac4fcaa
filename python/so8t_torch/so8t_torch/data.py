"""so8t's labelled JSONL rows as `Example`s: `prompt` (or `messages`), optional `response`,
labels `safety` (safe/unsafe), `authority` (handle/escalate), `response_safety`,
`response_authority`. The prompt is the chat template's rendering with the assistant
header (spec §5's default verdict position is its last token); the response follows it,
ended by the template's end-of-turn token."""
import json

from .loss import Example

LABELS = {"safe": False, "unsafe": True, "handle": False, "escalate": True}


def read_jsonl(path, tokenizer, max_len=512):
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            messages = r.get("messages") or [{"role": "user", "content": r["prompt"]}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids = list(prompt)
            if r.get("response"):
                ids += tokenizer(r["response"], add_special_tokens=False)["input_ids"]
                if tokenizer.eos_token_id is not None:
                    ids.append(tokenizer.eos_token_id)
            if len(ids) > max_len:
                raise ValueError(f"{path}:{n}: {len(ids)} tokens, over max_len {max_len}")
            label = lambda k: LABELS[r[k]] if r.get(k) is not None else None
            rows.append(Example(ids=ids, prompt_len=len(prompt), verdict_at=len(prompt) - 1,
                                safety=label("safety"), authority=label("authority"),
                                response_safety=label("response_safety"),
                                response_authority=label("response_authority")))
    return rows


def balanced_class_weights(rows):
    """Per head, (weight of class 0, weight of class 1): n / (2·n_c) over the labelled rows."""
    out = []
    for k in ("safety", "authority"):
        labels = [getattr(r, k) for r in rows if getattr(r, k) is not None]
        n1 = sum(labels)
        n0 = len(labels) - n1
        out.append((len(labels) / (2 * n0) if n0 else 1.0, len(labels) / (2 * n1) if n1 else 1.0))
    return tuple(out)
