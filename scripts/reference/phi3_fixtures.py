#!/usr/bin/env python3
"""Tiny random Phi-3 models (transformers' `Phi3ForCausalLM`) and what the Rust tests
compare them to: transformers' logits, greedy tokens and generate() across LongRoPE's
switch; random SO8T gates applied by hooks on the fused projections; llama.cpp's
`convert_hf_to_gguf.py` conversions. Run with the reference venv, after
`cargo build --release -p so8t-cli` (for the baked-model check):

    python scripts/reference/phi3_fixtures.py --llama-cpp ~/.cache/so8t/llama.cpp

Three models, the cases issue #15 names:
- tiny-phi3: the released Phi-3.5 config layout (`rope_scaling: {type: longrope, ...}`,
  top-level `rope_theta` and `original_max_position_embeddings`), full rotary;
- tiny-phi3-partial: the layout transformers 5 writes (`rope_parameters` with the theta,
  the factors and `partial_rotary_factor` 0.5 inside);
- tiny-phi3-short: no long factors (plain RoPE over 0.75 of each head, as Phi-4-mini's
  rotary split) and an attention window, as Phi-3-mini-4k has.

The tokenizer is a byte-level BPE trained here with Phi-3's special tokens and chat
template. Phi-3.5 itself ships a SentencePiece (llama) vocabulary; its converter class
takes the GPT-2 vocabulary path when `tokenizer_class` is `GPT2Tokenizer` (Phi-4-mini's
path), which is what these fixtures use, so no SentencePiece model has to be built.
"""
import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, Phi3Config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402
import llama_cpp_fixtures as lf  # noqa: E402

OUT = mf.OUT
# Phi-3's: <unk>, <s>, </s> first (llama.cpp looks them up by text in any model named
# phi3), then the chat tokens. Whitespace after a special token is stripped (tokenizer.json
# `rstrip`) except after <unk>, <s> and <|endoftext|>, the rule llama.cpp applies to Phi-3.
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
NO_RSTRIP = {"<unk>", "<s>", "<|endoftext|>"}
# Phi-3.5-mini-instruct's chat template.
TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
ORIGINAL = 32  # original_max_position_embeddings: short prompts stay below, long ones cross


def make_tokenizer(dst: Path):
    specials = [AddedToken(t, special=True, rstrip=t not in NO_RSTRIP, normalized=False) for t in SPECIALS]
    return mf.make_tokenizer(dst, specials, {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE, "add_bos_token": False,
    })


def factors(g, n, lo, hi):
    return [round(float(x), 4) for x in (lo + (hi - lo) * torch.rand(n, generator=g))]


def make_config(case: str, vocab: int, eos: int, g):
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, initializer_range=0.1,
                  eos_token_id=eos, bos_token_id=None, pad_token_id=eos, tie_word_embeddings=False, torch_dtype="float32")
    hd = 16
    if case == "tiny-phi3":
        half = hd // 2
        return Phi3Config(original_max_position_embeddings=ORIGINAL, rope_theta=10000.0, sliding_window=None,
                          rope_scaling={"type": "longrope", "short_factor": factors(g, half, 1.0, 1.5),
                                        "long_factor": factors(g, half, 1.0, 6.0)}, **common)
    if case == "tiny-phi3-partial":
        half = hd // 4
        return Phi3Config(original_max_position_embeddings=ORIGINAL, sliding_window=None,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 250000.0, "partial_rotary_factor": 0.5,
                                           "original_max_position_embeddings": ORIGINAL,
                                           "short_factor": factors(g, half, 1.0, 1.5),
                                           "long_factor": factors(g, half, 1.0, 6.0)}, **common)
    if case == "tiny-phi3-short":
        return Phi3Config(original_max_position_embeddings=ORIGINAL, sliding_window=64, partial_rotary_factor=0.75,
                          rope_theta=10000.0, **common)
    raise ValueError(case)


def rewrite_released_layout(d: Path):
    """transformers 5 saves every config as `rope_parameters`; the released Phi-3.5
    config.json has `rope_scaling` and a top-level `rope_theta`: write that layout back."""
    cfg = json.loads((d / "config.json").read_text())
    rp = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rp["rope_theta"]
    cfg["rope_scaling"] = {"type": "longrope", "short_factor": rp["short_factor"], "long_factor": rp["long_factor"]}
    cfg.pop("partial_rotary_factor", None)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))


def generate_across(model, prompt, n):
    """transformers' own generate() (greedy, with its KV cache and Phi-3's re-prefill when
    the sequence first passes `original_max_position_embeddings`)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.eos_token_id, output_logits=True, return_dict_in_generate=True)
    # The raw logits each token was chosen from (before min_new_tokens masks the EOS).
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits, 0).float().contiguous()


LLAMA_SEED, LLAMA_SCALE, LLAMA_TOKENS = 42, 0.3, 16
# Longer than the original context of 32 once tokenised, so that llama.cpp (which takes
# the long factors whenever the context it allocates is past the original, and pads
# every context to 256) and so8t (the set for the sequence's length, as transformers)
# rotate with the same set.
LONG_TEXT = "The quick brown fox jumps over the lazy dog. Hello, world!"  # 41 tokens: within 64 with the answer


def record_llama_cpp(base: Path, so8t: Path):
    """An SO8T model with random gates made from `base` by so8t, exported by so8t at f32
    and Q8_0, and llama.cpp's tokens and greedy steps on each export, as
    llama_cpp_export_fixtures.py records them for the real models."""
    import hashlib
    import subprocess
    import tempfile
    from gguf import GGUFReader
    record = {"model": base.name, "seed": LLAMA_SEED, "scale": LLAMA_SCALE, "n_tokens": LLAMA_TOKENS, "exports": {}}
    with tempfile.TemporaryDirectory() as tmp:
        # The directory's name becomes general.name, which tells llama.cpp it is a Phi-3.
        so8t_dir = Path(tmp) / f"{base.name}-so8t"
        subprocess.run([str(so8t), "convert", str(base), "--out", str(so8t_dir), "--init", "random", "--seed", str(LLAMA_SEED),
                        "--scale", str(LLAMA_SCALE)], check=True, stdout=subprocess.DEVNULL)
        for q in ("f32", "q8_0"):
            gguf = Path(tmp) / f"{q}.gguf"
            subprocess.run([str(so8t), "export", str(so8t_dir), "--out", str(gguf), "--quant", q], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            r = GGUFReader(str(gguf))
            tokens = r.fields["tokenizer.ggml.tokens"]
            tok = lambda i: bytes(tokens.parts[tokens.data[i]]).decode() if i is not None else ""
            template = lf.field_str(r, "tokenizer.chat_template")
            bos, eos = tok(lf.field_int(r, "tokenizer.ggml.bos_token_id")), tok(lf.field_int(r, "tokenizer.ggml.eos_token_id"))
            cases = []
            for chat, prompt in ((False, LONG_TEXT), (True, LONG_TEXT)):
                text = lf.render(template, bos, eos, prompt) if chat else prompt
                runs = {}
                for variant, env in (("steps", {}), ("steps_precise", {"LLAMA_REF_PRECISE": "1"})):
                    res = subprocess.run([str(lf.REF), str(gguf), str(LLAMA_TOKENS)], input=text.encode(), capture_output=True,
                                         check=True, env={**os.environ, **env})
                    runs[variant] = json.loads(res.stdout)
                assert len(runs["steps"]["prompt_tokens"]) > ORIGINAL
                cases.append({"prompt": prompt, "chat": chat, "rendered": text, "prompt_tokens": runs["steps"]["prompt_tokens"],
                              "steps": runs["steps"]["steps"], "steps_precise": runs["steps_precise"]["steps"]})
            # The tensor data, not the whole file: the metadata records the base's path.
            data = gguf.read_bytes()[r.data_offset:]
            record["exports"][q] = {"tensor_data_sha256": hashlib.sha256(data).hexdigest(), "cases": cases}
    out = OUT / "llama-cpp" / f"export-{base.name}.json"
    out.write_text(json.dumps(record, indent=1))


SPM_TEXTS = ["Hello world", "  two  spaces, 12345 and ünïcödé", "The quick brown fox\njumps over\tthe lazy dog.",
             "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat is the capital of France?<|end|>\n<|assistant|>\n"]


def make_spm_case(llama_cpp: Path):
    """tiny-phi3-spm: Phi-3.5's kind of vocabulary, a SentencePiece BPE model (byte
    fallback, digits split, dummy prefix) trained here, with its tokenizer.json as
    transformers converts it and Phi-3's chat tokens added after it; converted by
    convert_hf_to_gguf.py through its SentencePiece path (tokenizer.ggml.model = llama).
    Records transformers' ids for SPM_TEXTS, llama.cpp's ids for them on the GGUF, and
    transformers' logits and greedy tokens."""
    import subprocess
    import sentencepiece as spm
    from transformers import AutoTokenizer
    d = OUT / "tiny-phi3-spm"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    lines = [line for line in "\n".join(mf.corpus()).split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(d / "spm"), vocab_size=440,
                                   model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, add_dummy_prefix=True, normalization_rule_name="identity",
                                   split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
                                   minloglevel=2)
    (d / "spm.model").rename(d / "tokenizer.model")
    (d / "spm.vocab").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                                                         "legacy": False}))
    tok = AutoTokenizer.from_pretrained(d)
    chat = [t for t in SPECIALS if t not in ("<unk>", "<s>", "</s>")]
    tok.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "additional_special_tokens": [
        AddedToken(t, special=True, rstrip=t not in NO_RSTRIP, normalized=False) for t in chat]})
    tok.chat_template = TEMPLATE
    tok.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    eos, end = tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|end|>")
    g = torch.Generator().manual_seed(16)
    cfg = make_config("tiny-phi3", 448, eos, g)
    torch.manual_seed(520)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    mf.randomise(model, 620)
    model.eval()
    model.save_pretrained(d)
    rewrite_released_layout(d)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eos], "pad_token_id": eos}))
    # Then lines of the training text and text it never saw (code, emoji, CJK, odd spaces).
    texts = SPM_TEXTS + lines[::7][:30] + ["def f(x):\n    return x**2  # 🙂", "日本語のテキスト、そして Ελληνικά",
                                          "   leading and trailing   ", "tabs\t\tand\n\nnewlines", "<s> and </s> as text"]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    inputs = [ids[0], ids[2], ids[3]]
    mf.record(model, d.name, inputs)
    mf.to_gguf(llama_cpp, d, "f16")
    llama = []
    for t in texts:
        res = subprocess.run([str(lf.REF), str(d / "model-f16.gguf"), "1"], input=t.encode(), capture_output=True, check=True)
        llama.append(json.loads(res.stdout)["prompt_tokens"])
    meta = json.loads((d / "expected.json").read_text())
    meta["texts"], meta["transformers_ids"], meta["llama_cpp_ids"] = texts, ids, llama
    (d / "expected.json").write_text(json.dumps(meta))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/so8t/llama.cpp")
    ap.add_argument("--so8t", type=Path, default=mf.ROOT / "target/release/so8t")
    args = ap.parse_args()
    tok_dir = OUT / "tokenizer-phi3"
    tok = make_tokenizer(tok_dir)
    vocab, eos, end = tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"), tok.token_to_id("<|end|>")
    g = torch.Generator().manual_seed(15)
    # Below the original context (short factors), past it (long factors), and a text.
    inputs = [torch.randint(len(SPECIALS), vocab, (n,), generator=g).tolist() for n in (7, 20, ORIGINAL + 9)]
    inputs.append(tok.encode("What is the capital of France?").ids)
    crossing_prompt = torch.randint(len(SPECIALS), vocab, (ORIGINAL - 4,), generator=g).tolist()
    for i, case in enumerate(["tiny-phi3", "tiny-phi3-partial", "tiny-phi3-short"]):
        d = OUT / case
        shutil.rmtree(d, ignore_errors=True)
        torch.manual_seed(500 + i)
        cfg = make_config(case, vocab, eos, g)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        mf.randomise(model, 600 + i)
        model.eval()
        model.save_pretrained(d)
        if case == "tiny-phi3":
            rewrite_released_layout(d)
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [end, eos], "pad_token_id": eos}))
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / f, d / f)
        mf.record(model, d.name, inputs)
        meta = json.loads((d / "expected.json").read_text())
        tokens, logits = generate_across(model, crossing_prompt, 12)
        meta["crossing"] = {"prompt": crossing_prompt, "generate": tokens, "original": ORIGINAL}
        (d / "expected.json").write_text(json.dumps(meta))
        exp = load_file(str(d / "expected.safetensors"))
        exp["crossing.logits"] = logits
        save_file(exp, str(d / "expected.safetensors"))
        for outtype in ("f32", "f16", "q8_0"):
            mf.to_gguf(args.llama_cpp, d, outtype)
        mf.make_so8t_reference(d, inputs, seed=700 + i)
        if args.so8t.exists():
            mf.check_baked_with_transformers(d, args.so8t, inputs)
            if case != "tiny-phi3-partial":
                record_llama_cpp(d, args.so8t)
        else:
            print(f"{args.so8t} not built: skipped the transformers check of baked models", file=sys.stderr)
        print(f"{d.name}: done", file=sys.stderr)
    make_spm_case(args.llama_cpp)
    print("tiny-phi3-spm: done", file=sys.stderr)


if __name__ == "__main__":
    main()
