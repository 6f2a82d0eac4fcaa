#!/usr/bin/env python3
"""Records llama.cpp's tokenisation and greedy decoding of the real test models, with
and without their chat template, into fixtures/llama-cpp/*.json.

The chat prompt is rendered the way transformers renders chat templates (Jinja2 with
trim_blocks and lstrip_blocks, add_generation_prompt=True); the Rust test checks that
its own minijinja rendering gives the same text before comparing tokens.

    scripts/fetch-models.sh && scripts/build-llama-cpp.sh
    python scripts/reference/llama_cpp_fixtures.py
"""
import json
import os
import subprocess
from pathlib import Path

import jinja2
import jinja2.ext
from gguf import GGUFReader
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("SO8T_CACHE", Path.home() / ".cache/so8t"))
REF = CACHE / "llama.cpp/build/bin/llama-ref-greedy"
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "qwen25coder": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
}
# Raw prompts are continuations (a question without a template often ends at once).
RAW_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers and explain why they are prime.",
]
N_TOKENS = 32


def field_str(r, key):
    f = r.fields.get(key)
    return bytes(f.parts[f.data[0]]).decode() if f else None


def field_int(r, key):
    f = r.fields.get(key)
    return int(f.parts[f.data[0]][0]) if f else None


def render(template, bos, eos, user):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(template).render(messages=[{"role": "user", "content": user}], add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def main():
    out_dir = ROOT / "fixtures/llama-cpp"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, fname in MODELS.items():
        path = CACHE / fname
        r = GGUFReader(str(path))
        tokens = r.fields["tokenizer.ggml.tokens"]
        tok = lambda i: bytes(tokens.parts[tokens.data[i]]).decode() if i is not None else ""
        template = field_str(r, "tokenizer.chat_template")
        bos, eos = tok(field_int(r, "tokenizer.ggml.bos_token_id")), tok(field_int(r, "tokenizer.ggml.eos_token_id"))
        cases = []
        for chat, prompts in ((False, RAW_PROMPTS), (True, CHAT_PROMPTS)):
            for prompt in prompts:
                text = render(template, bos, eos, prompt) if chat else prompt
                runs = {}
                for variant, env in (("default", {}), ("precise", {"LLAMA_REF_PRECISE": "1"})):
                    res = subprocess.run([str(REF), str(path), str(N_TOKENS)], input=text.encode(), capture_output=True,
                                         check=True, env={**os.environ, **env})
                    runs[variant] = json.loads(res.stdout)
                d = runs["default"]
                assert d["prompt_tokens"] == runs["precise"]["prompt_tokens"]
                # steps: llama.cpp's defaults (f16 KV cache, flash attention); steps_precise: f32
                # KV cache, no flash attention. Their disagreement is llama.cpp's own noise.
                cases.append({"prompt": prompt, "chat": chat, "rendered": text, "prompt_tokens": d["prompt_tokens"],
                              "steps": d["steps"], "steps_precise": runs["precise"]["steps"]})
        (out_dir / f"{name}.json").write_text(json.dumps({"model": fname, "n_tokens": N_TOKENS, "cases": cases}, indent=1))
        print(name, "done")


if __name__ == "__main__":
    main()
