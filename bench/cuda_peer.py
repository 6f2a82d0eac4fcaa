"""The GPU peer of `so8t bench --device cuda` (issue #20): transformers on the same checkpoint.

`make DIR`: a checkpoint of Qwen2.5-0.5B's configuration (24 layers, hidden 896, 14/2 heads,
qkv biases, vocabulary 151936, tied embeddings) with random weights in bf16, written by
transformers; the real weights cannot reach the GPU machine (its tree travels in 64 MiB), and
speed does not depend on the values.
`bench DIR PP TG ROUNDS SO8T`: alternating rounds of `SO8T bench --device cuda` and
transformers, a JSON line each: tokens/s of one forward over PP prompt tokens (`ppN`) and
of TG single-token steps through the KV cache after one start token (`tgN`), each token
chosen by argmax as `so8t bench` does (transformers warmed up once first; so8t bench warms
up each test itself).
"""
import json
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM


def make(out):
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151645,
    )
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        # transformers initialises biases to zero; random ones make the adds count.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out)


def bench(path, pp, tg, rounds, so8t):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda").eval()
    sync = torch.cuda.synchronize

    def prompt():
        ids = torch.randint(0, 32000, (1, pp), device="cuda")
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            model(ids, use_cache=True).logits[:, -1].argmax(-1).item()
        return pp / (time.perf_counter() - t0)

    def generate():
        tok = torch.tensor([[151643]], device="cuda")
        with torch.no_grad():
            out = model(tok, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t0 = time.perf_counter()
            for _ in range(tg):
                out = model(tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            tok.item()
        return tg / (time.perf_counter() - t0)

    prompt(), generate()
    peer = "transformers " + __import__("transformers").__version__ + ", torch " + torch.__version__
    for r in range(1, rounds + 1):
        out = subprocess.run([so8t, "bench", "-m", path, "--device", "cuda", "-p", str(pp), "-n", str(tg),
                              "-r", "1", "--json", "--no-probe"], capture_output=True, text=True, check=True)
        ours = {t["test"]: t["avg_ts"] for t in json.loads(out.stdout)["tests"]}
        print(json.dumps({"round": r, "who": "so8t", **ours}), flush=True)
        print(json.dumps({"round": r, "who": peer, f"pp{pp}": prompt(), f"tg{tg}": generate()}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        bench(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
