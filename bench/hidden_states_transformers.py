"""The heads pass in transformers: final normed hidden state at the last token of each
row's chat-templated prompt (the verdict position so8t uses), one row at a time."""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(2)
model_dir, rows = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model.eval()
prompts = [json.loads(l)["prompt"] for l in open(rows)]
t0 = time.time()
with torch.inference_mode():
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        out = model.model(input_ids=ids)
        h = out.last_hidden_state[0, -1]
print(f"transformers: {time.time() - t0:.2f} s of features (torch {torch.__version__}, 2 threads)")
