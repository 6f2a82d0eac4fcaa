#!/usr/bin/env python3
"""Writes the fuzzing seed corpora (fuzz/seeds/TARGET/) from the repo's real files.

Usage: python3 scripts/fuzz/make-seeds.py [path/to/so8t]   (the binary exports an SO8T
GGUF for a seed carrying so8t.* metadata; default target/release/so8t)

Seeds are small on purpose (libFuzzer mutates whole inputs): tiny fixture models, a
metadata-only cut of a GGUF (no tensors, so the tokenizer and template paths are reached
fast), real configs, tokenizers, chat templates, training rows and request bodies.
"""
import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
FIX = os.path.join(ROOT, "fixtures")


def put(target, name, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read(*parts):
    with open(os.path.join(*parts), "rb") as f:
        return f.read()


def gguf_metadata_only(b):
    """The same file with tensor_count 0 and everything after the metadata cut."""
    assert b[:4] == b"GGUF" and struct.unpack_from("<I", b, 4)[0] in (2, 3)
    n_kv = struct.unpack_from("<Q", b, 16)[0]
    pos = 24

    def skip(pos, ty):
        fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
        if ty in fixed:
            return pos + fixed[ty]
        if ty == 8:
            return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
        if ty == 9:
            item, n = struct.unpack_from("<IQ", b, pos)
            pos += 12
            for _ in range(n):
                pos = skip(pos, item)
            return pos
        raise ValueError(ty)

    for _ in range(n_kv):
        pos += 8 + struct.unpack_from("<Q", b, pos)[0]
        ty = struct.unpack_from("<I", b, pos)[0]
        pos = skip(pos + 4, ty)
    out = bytearray(b[:pos])
    struct.pack_into("<Q", out, 8, 0)
    return bytes(out)


def main():
    so8t = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "so8t")
    shutil.rmtree(SEEDS, ignore_errors=True)

    # GGUF: a whole tiny model, metadata-only cuts, and an SO8T export with its heads.
    q8 = read(FIX, "tiny-qwen2", "model-q8_0.gguf")
    put("gguf", "tiny-qwen2-q8_0.gguf", q8)
    put("gguf", "tiny-qwen2-meta.gguf", gguf_metadata_only(q8))
    put("gguf", "tiny-llama-meta.gguf", gguf_metadata_only(read(FIX, "tiny-llama", "model-q8_0.gguf")))
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "so8t")
        g = os.path.join(tmp, "so8t.gguf")
        subprocess.run([so8t, "convert", os.path.join(FIX, "tiny-qwen3"), "--out", d,
                        "--init", "random", "--seed", "1"], check=True, capture_output=True)
        subprocess.run([so8t, "export", d, "--out", g, "--quant", "q8_0"], check=True,
                       capture_output=True)
        put("gguf", "tiny-qwen3-so8t-meta.gguf", gguf_metadata_only(read(g)))
        put("so8t_config", "converted.json", read(d, "so8t_config.json"))

    # safetensors: an adapter and a two-tensor file of mixed dtypes.
    put("safetensors", "adapter.safetensors",
        read(FIX, "tiny-qwen2", "so8t-random", "so8t_adapter.safetensors"))
    header = json.dumps({
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "BF16", "shape": [4], "data_offsets": [16, 24]},
        "__metadata__": {"format": "pt"},
    }).encode()
    put("safetensors", "two.safetensors", struct.pack("<Q", len(header)) + header + bytes(range(24)))

    for arch in ("tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-qwen3-fp8", "tiny-qwen2vl"):
        put("model_config", f"{arch}.json", read(FIX, arch, "config.json"))
    put("model_config", "qwen2vl-preprocessor.json", read(FIX, "tiny-qwen2vl", "preprocessor_config.json"))

    # Images (a vision model's processor): PNGs of the fixtures (RGB, grey), and a JPEG
    # made from one when Pillow is at hand.
    for name in ("d", "e"):
        put("image", f"{name}.png", read(FIX, "qwen2vl-images", f"{name}.png"))
    try:
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.open(os.path.join(FIX, "qwen2vl-images", "e.png")).resize((20, 28)).save(buf, "JPEG", quality=80)
        put("image", "e-small.jpg", buf.getvalue())
    except ImportError:
        pass

    put("so8t_config", "smollm2-trained.json",
        read(ROOT, "eval", "smollm2-135m", "model", "so8t_config.json"))

    for name, d in (("tiny-qwen2", os.path.join(FIX, "tiny-qwen2")), ("tokenizer", os.path.join(FIX, "tokenizer"))):
        put("hf_tokenizer", name, read(d, "tokenizer.json") + b"\0" + read(d, "tokenizer_config.json"))

    templates = {}
    for name in ("tiny-qwen2", "tokenizer"):
        cfg = json.loads(read(FIX, name, "tokenizer_config.json"))
        if isinstance(cfg.get("chat_template"), str):
            templates[name] = cfg["chat_template"]
    # Real templates of the supported families, from the model cache when it has them.
    cache = os.environ.get("SO8T_CACHE", os.path.expanduser("~/.cache/so8t"))
    qwen3 = os.path.join(cache, "qwen3-tokenizer", "tokenizer_config.json")
    if os.path.exists(qwen3):
        templates["qwen3"] = json.loads(read(qwen3))["chat_template"]
    cases = json.loads(read(FIX, "qwen3-template", "expected.json"))
    for name, src in templates.items():
        put("chat_template", name, src.encode() + b"\0" + b"Hi <think>x</think> there")
    put("chat_template", "qwen3-thinking-rendered",
        "{% for m in messages %}{{ m.content | trim }}{% endfor %}".encode() + b"\0" +
        cases[0]["rendered"].encode())

    put("jsonl", "tiny.jsonl", read(FIX, "train", "tiny.jsonl"))
    with open(os.path.join(ROOT, "data", "safety", "test.jsonl"), "rb") as f:
        put("jsonl", "safety-test-head.jsonl", b"".join(f.readlines()[:12]))

    for i, body in enumerate([
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "temperature": 0.7,
         "stream": True, "stream_options": {"include_usage": True}, "moderation": "stop"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         "logprobs": True, "top_logprobs": 3, "stop": ["\n", "END"], "seed": 7},
        {"prompt": "Once upon", "max_tokens": 16, "logprobs": 2},
        {"prompt": [1, 2, 3]},
        {"input": ["How do I bake bread?", "How do I make a bomb?"]},
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                read(FIX, "qwen2vl-images", "d.png")).decode()}},
            {"type": "text", "text": "what is this?"}]}]},
    ]):
        put("request", f"body{i}.json", json.dumps(body))


if __name__ == "__main__":
    main()
