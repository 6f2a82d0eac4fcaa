#!/usr/bin/env python3
"""A tiny random Qwen2-VL (transformers' `Qwen2VLForConditionalGeneration`) and what the
Rust tests compare to: the PIL image processor's pixel rows for real PNG images of a few
sizes, the vision tower's merged features, and the model's logits and greedy generate()
on a text-only prompt, a prompt with one image and one with two. Run with the reference
venv (it needs Pillow):

    cargo build --release -p so8t-cli   # for `so8t bake`
    python scripts/reference/qwen2vl_fixtures.py --llama-cpp ~/.cache/so8t/llama.cpp

The shapes follow the real Qwen2-VL-2B layout at toy widths: text hidden 64 with 4 heads
of 16 (so `mrope_section` [2, 3, 3] covers the 8 rotary frequencies as [16, 24, 24]
covers 64), vision width 32 with 4 heads, depth 2, patch 14, temporal patch 2, merge 2.
The processor keeps Qwen2-VL's factor 28 and min_pixels, with max_pixels lowered to
28·28·16 so that one test image takes smart_resize's downscale branch.

The images (fixtures/qwen2vl-images/, written here once and committed) are chosen for
the pitfalls issue #16 names: 90×70 (70/28 = 2.5, which Python's round takes to 2),
120×40 (a merged grid of 1×4), 200×300 (downscaled: 4×3 merged), and a 20×20 greyscale
PNG (upscaled, and converted to RGB); and 84×112, a size both transformers' and llama.cpp's
mtmd keep as it is (a multiple of 28 within both's pixel bounds: mtmd asks for at least 8
merged patches), so that the two runtimes see the same pixels.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from jinja2 import Environment
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, Qwen2VLConfig, Qwen2VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_fixtures as mf  # noqa: E402

OUT = mf.OUT / "tiny-qwen2vl"
IMAGES = mf.OUT / "qwen2vl-images"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL-2B-Instruct's chat template, as its tokenizer_config.json ships it.
TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MAX_PIXELS = 28 * 28 * 16


def make_images():
    """Deterministic images with edges and gradients (bicubic overshoots at edges, which
    is where a resampler that rounds or clips differently shows)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    for seed, (name, (w, h)) in enumerate({"a": (90, 70), "b": (120, 40), "c": (200, 300), "e": (84, 112)}.items()):
        if (IMAGES / f"{name}.png").exists():
            continue
        rng = np.random.default_rng(7 + seed)
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([
            (255 * x / max(w - 1, 1)),
            (255 * ((x // 9 + y // 7) % 2)),
            (128 + 100 * np.sin(x / 5.0) * np.cos(y / 4.0)),
        ], axis=-1) + rng.normal(0, 12, (h, w, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(IMAGES / f"{name}.png")
    if not (IMAGES / "d.png").exists():
        rng = np.random.default_rng(6)
        grey = np.clip(rng.normal(128, 60, (20, 20)), 0, 255).astype(np.uint8)
        Image.fromarray(grey, "L").save(IMAGES / "d.png")


def make_model():
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=448, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         tie_word_embeddings=False, eos_token_id=2, bos_token_id=None),
        vision_config=dict(depth=3, embed_dim=32, hidden_size=64, mlp_ratio=4, num_heads=4, in_channels=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
        image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith(".weight") or name.endswith("ln_q.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif "patch_embed" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
    return model


def prompt_ids(tok, content, grids):
    """The chat template's text with each `<|image_pad|>` repeated once per merged patch,
    as Qwen2VLProcessor expands it; and the modality of each token (1 for image)."""
    text = Environment().from_string(TEMPLATE).render(messages=[{"role": "user", "content": content}],
                                                      add_generation_prompt=True)
    ids = tok.encode(text).ids
    pad = tok.token_to_id("<|image_pad|>")
    out, types, k = [], [], 0
    for t in ids:
        if t == pad:
            n = int(np.prod(grids[k])) // 4
            out += [pad] * n
            types += [1] * n
            k += 1
        else:
            out.append(t)
            types.append(0)
    assert k == len(grids)
    return text, out, types


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-cpp", type=Path, default=Path.home() / ".cache/so8t/llama.cpp")
    ap.add_argument("--so8t", type=Path, default=mf.ROOT / "target/release/so8t", help="the so8t binary, for baking")
    args = ap.parse_args()
    make_images()
    OUT.mkdir(parents=True, exist_ok=True)
    tok = mf.make_tokenizer(OUT, SPECIALS, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": TEMPLATE, "add_bos_token": False,
    })
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, s
    proc = Qwen2VLImageProcessorPil(max_pixels=MAX_PIXELS)
    proc.save_pretrained(str(OUT))
    model = make_model()
    model.config.eos_token_id = tok.token_to_id("<|im_end|>")
    model.save_pretrained(str(OUT), safe_serialization=True)

    tensors, meta = {}, {"images": {}, "prompts": []}
    pixels = {}
    for name in ["a", "b", "c", "d", "e"]:
        with Image.open(IMAGES / f"{name}.png") as im:
            feat = proc(images=[im], return_tensors="pt")
        pv, grid = feat["pixel_values"].float(), feat["image_grid_thw"]
        pixels[name] = (pv, grid)
        tensors[f"pixels.{name}"] = pv.contiguous()
        with torch.no_grad():
            vis = model.model.get_image_features(pv, grid).pooler_output[0]
        tensors[f"vision.{name}"] = vis.float().contiguous()
        meta["images"][name] = {"grid_thw": grid[0].tolist()}

    cases = [
        ("text", "Describe the sea in one sentence.", []),
        ("one image", [{"type": "image"}, {"type": "text", "text": "What is in this picture?"}], ["a"]),
        ("two images", [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "text", "text": "and"},
                        {"type": "image"}, {"type": "text", "text": "briefly."}], ["c", "b"]),
    ]
    for i, (label, content, images) in enumerate(cases):
        grids = [pixels[n][1][0].tolist() for n in images]
        text, ids, types = prompt_ids(tok, content, grids)
        kw = {}
        if images:
            kw = {"pixel_values": torch.cat([pixels[n][0] for n in images]),
                  "image_grid_thw": torch.cat([pixels[n][1] for n in images]),
                  "mm_token_type_ids": torch.tensor([types])}
        with torch.no_grad():
            model.model.rope_deltas = None
            logits = model(input_ids=torch.tensor([ids]), **kw).logits[0].float().contiguous()
            model.model.rope_deltas = None
            gen = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
        tensors[f"logits.{i}"] = logits
        meta["prompts"].append({"label": label, "content": content, "images": images, "text": text, "ids": ids,
                                "greedy": gen[0, len(ids):].tolist()})
    save_file(tensors, str(OUT / "expected.safetensors"))
    (OUT / "expected.json").write_text(json.dumps(meta, indent=1))

    # SO8T on the text decoder: random gates and heads through so8t_torch's hooks, then
    # `so8t bake` loaded by transformers with its vision tower as it was.
    inputs, extra = [], {}
    for i, p in enumerate(meta["prompts"]):
        inputs.append(p["ids"])
        if p["images"]:
            extra[i] = {"pixel_values": torch.cat([pixels[n][0] for n in p["images"]]),
                        "image_grid_thw": torch.cat([pixels[n][1] for n in p["images"]]),
                        "mm_token_type_ids": torch.tensor([[1 if t == 5 else 0 for t in p["ids"]]])}
    # llama.cpp's converter: the text GGUF and the mmproj, at f32 and f16.
    for ty in ("f32", "f16"):
        mf.to_gguf(args.llama_cpp, OUT, ty)
        mf.to_gguf(args.llama_cpp, OUT, ty, mmproj=True)
    mf.make_so8t_reference(OUT, inputs, seed=900, auto=AutoModelForImageTextToText, extra=extra)
    mf.check_baked_with_transformers(OUT, args.so8t, inputs, auto=AutoModelForImageTextToText, extra=extra)
    record_mtmd(args.llama_cpp, args.so8t)
    print("wrote", OUT)


MTMD_CASES = [
    {"images": ["e"], "prompt": "What is in this picture?"},
    {"images": ["e", "e"], "prompt": "Compare the two pictures."},
]


def record_mtmd(llama_cpp: Path, so8t_bin: Path):
    """llama.cpp's `llama-mtmd-cli` on `so8t export`'s text GGUF and projector (f32), greedy,
    with the GGUF's own chat template (--jinja): its answer's bytes, and the sha256 of the
    two files it read, for crates/so8t/tests/export.rs. The image is 84×112, which both
    runtimes keep as it is, so both see the same pixels. mtmd-cli writes the answer through
    its logger, so it is read from --log-file (its stdout is not reliable in a pipe)."""
    import hashlib, subprocess, tempfile
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "tiny-qwen2vl.gguf"
        subprocess.run([str(so8t_bin), "export", str(OUT), "--out", str(text), "--quant", "f32"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        mmproj = Path(tmp) / "mmproj-tiny-qwen2vl.gguf"
        record = {"sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (text, mmproj)}, "cases": []}
        for case in MTMD_CASES:
            log = Path(tmp) / "log.txt"
            cmd = [str(llama_cpp / "build/bin/llama-mtmd-cli"), "-m", str(text), "--mmproj", str(mmproj), "-p", case["prompt"],
                   "-n", "12", "--temp", "0", "--jinja", "-t", "2", "--log-file", str(log)]
            for name in case["images"]:
                cmd += ["--image", str(IMAGES / f"{name}.png")]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            lines = log.read_bytes().split(b"\n")
            done = max(i for i, l in enumerate(lines) if b"batch encoding done" in l)
            answer = b"\n".join(lines[done + 1:]).strip(b"\n")
            record["cases"].append({**case, "answer_hex": answer.hex()})
    (mf.OUT / "llama-cpp" / "mtmd-qwen2vl.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
