#!/usr/bin/env python3
"""Builds the tiny reference models and the expected outputs the Rust tests compare to.

Everything here comes from the real peers: the models are HF `transformers` models with
random weights, their logits and greedy tokens come from transformers' own forward pass,
and their GGUF versions come from llama.cpp's `convert_hf_to_gguf.py`. Run it with the
reference venv (see scripts/setup-reference.sh); CI never runs it, it only reads what it
wrote into fixtures/.

    python scripts/reference/make_fixtures.py --llama-cpp ~/.cache/so8t/llama.cpp
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers, Regex
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "fixtures"

# llama.cpp's qwen2 pre-tokenizer regex; the tiny tokenizer uses it so that the GGUF
# (which records pre = "qwen2") and tokenizer.json split text the same way.
QWEN2_REGEX = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    """Deterministic training text for the tiny BPE: the spec and the safety SOURCES."""
    texts = []
    for p in [ROOT.parent / "shared" / "SO8T_SPEC.md", ROOT.parent / "shared" / "data" / "safety" / "raw" / "SOURCES.md"]:
        if p.exists():
            texts.append(p.read_text())
    texts.append("The quick brown fox jumps over the lazy dog. 0123456789 Hello, world! What is the capital of France?")
    return texts


def make_tokenizer(dst: Path, specials=SPECIALS, config=None):
    """A byte-level BPE with llama.cpp's qwen2 pre-tokenizer, trained on corpus(), with
    `specials` (texts or AddedTokens) first; `config` is its tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=448, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(config or {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "add_bos_token": False,
    }, indent=2))
    return tok


def make_config(arch: str, vocab: int, eos: int):
    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1, eos_token_id=eos,
                  bos_token_id=None, torch_dtype="float32")
    if arch == "llama":
        # llama3 rope scaling with a short original context so that it changes frequencies.
        return LlamaConfig(intermediate_size=128, tie_word_embeddings=True, **common,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if arch == "qwen2":
        return Qwen2Config(intermediate_size=128, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    if arch == "qwen3":
        # explicit head_dim different from hidden/heads, as Qwen3 has; intermediate 192 gives
        # the FP8 variant a partial second 128-block.
        return Qwen3Config(intermediate_size=192, head_dim=32, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common)
    raise ValueError(arch)


def randomise(model, seed):
    """transformers initialises norms to 1 and biases to 0; random values make the
    tests see whether each one is applied."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                # Small enough that two layers stay near-linear: a random network with
                # larger weights amplifies Q8_0 rounding into top-1 flips at flat logits.
                p.copy_(0.06 * torch.randn(p.shape, generator=g))


def greedy(model, ids, n):
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1]
            t = int(torch.argmax(logits))
            out.append(t)
            ids.append(t)
    return out


def record(model, name, inputs, n_greedy=16):
    tensors = {}
    meta = {"inputs": [], "greedy": []}
    with torch.no_grad():
        for i, ids in enumerate(inputs):
            logits = model(torch.tensor([ids])).logits[0].float().contiguous()
            tensors[f"logits.{i}"] = logits
            meta["inputs"].append(ids)
            meta["greedy"].append(greedy(model, ids, n_greedy))
    save_file(tensors, str(OUT / name / "expected.safetensors"))
    (OUT / name / "expected.json").write_text(json.dumps(meta))


def fp8_quantise(w: torch.Tensor, block=128):
    """Block-wise e4m3 quantisation in the layout Qwen3-4B-Thinking-2507-FP8 ships:
    weight (float8_e4m3fn) and weight_scale_inv (f32, one per 128×128 block) with
    W ≈ weight · scale_inv."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    scale = torch.zeros(br, bc)
    q = torch.zeros_like(w)
    for i in range(br):
        for j in range(bc):
            blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            s = blk.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = blk / s
    q8 = q.to(torch.float8_e4m3fn)
    deq = q8.float() * scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return q8, scale, deq


def make_fp8(src_dir: Path, dst: Path, inputs):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src_dir, dst, ignore=shutil.ignore_patterns("expected.*", "*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.float32)
    sd = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = {}
    for k, v in sd.items():
        is_linear = k.endswith("_proj.weight")
        if is_linear:
            q8, scale, deq = fp8_quantise(v)
            out[k] = q8
            out[k + "_scale_inv"] = scale
            sd[k] = deq
        else:
            out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    # The reference forward uses the dequantised weights W = fp8 · scale_inv (spec §1) in
    # transformers' own qwen3 model.
    model.load_state_dict(sd, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    record(model, dst.name, inputs)


def to_gguf(llama_cpp: Path, hf_dir: Path, outtype: str, mmproj=False):
    """`convert_hf_to_gguf.py` of `hf_dir` at `outtype` into model-TYPE.gguf there; with
    `mmproj`, a vision model's projector file, mmproj-model-TYPE.gguf."""
    out = hf_dir / f"{'mmproj-' if mmproj else ''}model-{outtype}.gguf"
    # The tiny tokenizer is not one llama.cpp knows by hash; tell the converter it is a
    # qwen2-style BPE, which is what its pre-tokenizer is.
    code = (
        "import sys; sys.argv = sys.argv[1:];"
        f"sys.path.insert(0, {str(llama_cpp / 'gguf-py')!r}); sys.path.insert(0, {str(llama_cpp)!r});"
        "import convert_hf_to_gguf as c, conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'qwen2';"
        "c.main()"
    )
    subprocess.run([sys.executable, "-c", code, "convert_hf_to_gguf.py", str(hf_dir), "--outtype", outtype, "--outfile", str(out)]
                   + (["--mmproj"] if mmproj else []), check=True, stdout=subprocess.DEVNULL)


# ---- SO8T gates, implemented independently of the Rust code from SO8T_SPEC.md §2–§5 in
# python/so8t_torch (the package users train with): octonion triality solved with numpy
# least squares, exp by torch.linalg.matrix_exp, the gates as forward hooks on transformers.

def base_checksum(d: Path):
    import hashlib
    h = hashlib.sha256()
    names = sorted(p.name for p in d.iterdir() if p.is_file() and (p.name in ("config.json", "model.safetensors", "model.safetensors.index.json")
                   or (p.name.startswith("model-") and p.name.endswith(".safetensors"))))
    for n in names:
        h.update(n.encode() + b"\0")
        h.update((d / n).read_bytes())
    return h.hexdigest()


def make_so8t_reference(base: Path, inputs, seed, scale=0.3, auto=AutoModelForCausalLM, extra=None):
    """Random generators at all five sites (shared granularity, factors safe then cmd) and
    random heads; logits and verdicts recorded from so8t_torch (python/so8t_torch: the
    gates as forward hooks on the transformers model, triality by numpy least squares, exp
    by torch.linalg.matrix_exp), the package users train with. `auto` loads the base;
    `extra[i]` are input i's other arguments (a vision model's images)."""
    sys.path.insert(0, str(ROOT / "python" / "so8t_torch"))
    from so8t_torch import So8tModel
    from so8t_torch.model import generator_name

    model = auto.from_pretrained(base, dtype=torch.float32).eval()
    cfg = model.config.get_text_config()
    factors = ["safe", "cmd"]
    sites = ["q", "k", "v", "o", "mlp"]
    config = {
        "version": 1,
        "base": {"architecture": model.config.model_type, "source": base.name, "sha256": base_checksum(base)},
        "sites": sites, "granularity": "shared", "factors": factors,
        "labels": {"safety": ["safe", "unsafe"], "authority": ["handle", "escalate"]},
        "heads_trained": False,
        "init": {"kind": "random", "seed": seed, "scale": scale},
        "thresholds": {"unsafe": 0.5, "escalate": 0.5},
    }
    so8t = So8tModel(model, config).eval()
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for l in range(cfg.num_hidden_layers):
        for s in sites:
            n_gen = so8t.site_shape(s)[2]
            for f in factors:
                tensors[generator_name(l, s, f)] = ((torch.rand((n_gen, 28), generator=g) * 2 - 1) * scale).float()
    for name in ("safety", "authority"):
        tensors[f"heads.{name}.weight"] = torch.randn((2, cfg.hidden_size), generator=g) * 0.5
        tensors[f"heads.{name}.bias"] = torch.randn((2,), generator=g) * 0.5
    out = base / "so8t-random"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    save_file(tensors, str(out / "so8t_adapter.safetensors"))
    (out / "so8t_config.json").write_text(json.dumps(config, indent=2))
    so8t.load_adapter(out / "so8t_adapter.safetensors")
    exp = {}
    with torch.no_grad():
        for i, ids in enumerate(inputs):
            logits, _, heads = so8t(torch.tensor([ids]), **((extra or {}).get(i) or {}))
            exp[f"logits.{i}"] = logits[0].contiguous()
            v = so8t.verdicts(heads)
            for key in ("p_unsafe", "p_escalate"):
                exp[f"{key}.{i}"] = v[key][0].contiguous()
    save_file(exp, str(out / "expected.safetensors"))
    (out / "expected.json").write_text(json.dumps({"inputs": inputs}))


SO8T_REFERENCES = {"tiny-llama": 300, "tiny-qwen2": 301, "tiny-qwen3": 302,
                   "tiny-phi3": 700, "tiny-phi3-partial": 701, "tiny-phi3-short": 702}


def so8t_references_only(so8t_bin: Path):
    """Rewrites every so8t-random/ from its recorded inputs and seed (after a change to
    so8t_torch), with the transformers check of its baked model, leaving the base models
    as they are; vllm_view_fixtures.py must run again afterwards (it writes there too)."""
    for name, seed in SO8T_REFERENCES.items():
        d = OUT / name
        inputs = json.loads((d / "so8t-random" / "expected.json").read_text())["inputs"]
        make_so8t_reference(d, inputs, seed=seed)
        check_baked_with_transformers(d, so8t_bin, inputs)
        print(f"{name}/so8t-random: done", file=sys.stderr)


def check_baked_with_transformers(base: Path, so8t_bin: Path, inputs, auto=AutoModelForCausalLM, extra=None):
    """`so8t bake` of the reference SO8T model, loaded by transformers as a plain model:
    its logits must equal the hooked reference, and are recorded for the Rust test."""
    import tempfile
    ref = base / "so8t-random"
    with tempfile.TemporaryDirectory() as tmp:
        so8t_dir = Path(tmp) / "so8t"
        so8t_dir.mkdir()
        for f in base.iterdir():
            if f.is_file() and not f.name.startswith("expected") and f.suffix != ".gguf":
                shutil.copy(f, so8t_dir / f.name)
        for f in ("so8t_adapter.safetensors", "so8t_config.json"):
            shutil.copy(ref / f, so8t_dir / f)
        baked = Path(tmp) / "baked"
        subprocess.run([str(so8t_bin), "bake", str(so8t_dir), "--out", str(baked)], check=True)
        model = auto.from_pretrained(baked, dtype=torch.float32).eval()
        hooked = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(ref / "expected.safetensors"))
        out = {}
        with torch.no_grad():
            for i, ids in enumerate(inputs):
                logits = model(torch.tensor([ids]), **((extra or {}).get(i) or {})).logits[0].contiguous()
                d = (logits - hooked[f"logits.{i}"]).abs().max().item()
                assert d < 1e-4, f"{base.name}: baked model in transformers differs from the hooked reference by {d}"
                out[f"logits.{i}"] = logits
        save_file(out, str(ref / "transformers-baked.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/so8t/llama.cpp")
    ap.add_argument("--so8t", type=Path, default=ROOT / "target/release/so8t", help="the so8t binary, for baking")
    ap.add_argument("--so8t-references-only", action="store_true", help="only rewrite the so8t-random/ references")
    args = ap.parse_args()
    if args.so8t_references_only:
        return so8t_references_only(args.so8t)
    torch.manual_seed(0)
    tok_dir = OUT / "tokenizer"
    tok = make_tokenizer(tok_dir)
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|im_end|>")
    texts = ["What is the capital of France?", "The quick brown fox", "SO(8) rotation gates bake into weights exactly."]
    (OUT / "tokenizer" / "expected.json").write_text(json.dumps(
        {"texts": texts, "ids": [tok.encode(t).ids for t in texts]}))
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, vocab - len(SPECIALS), (n,), generator=g).tolist() for n in (7, 12)]
    inputs.append(tok.encode(texts[0]).ids)
    for i, arch in enumerate(["llama", "qwen2", "qwen3"]):
        d = OUT / f"tiny-{arch}"
        shutil.rmtree(d, ignore_errors=True)
        torch.manual_seed(100 + i)
        cfg = make_config(arch, vocab, eos)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        randomise(model, 200 + i)
        model.eval()
        model.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok_dir / f, d / f)
        record(model, d.name, inputs)
        for outtype in ("f32", "f16", "q8_0"):
            to_gguf(args.llama_cpp, d, outtype)
        print(f"{d.name}: done", file=sys.stderr)
    make_fp8(OUT / "tiny-qwen3", OUT / "tiny-qwen3-fp8", inputs)
    for i, arch in enumerate(["llama", "qwen2", "qwen3"]):
        make_so8t_reference(OUT / f"tiny-{arch}", inputs, seed=300 + i)
    print("so8t references: done", file=sys.stderr)
    if args.so8t.exists():
        for arch in ["llama", "qwen2", "qwen3"]:
            check_baked_with_transformers(OUT / f"tiny-{arch}", args.so8t, inputs)
        print("baked models in transformers: done", file=sys.stderr)
    else:
        print(f"{args.so8t} not built: skipped the transformers check of baked models", file=sys.stderr)
    print("tiny-qwen3-fp8: done", file=sys.stderr)


if __name__ == "__main__":
    main()
