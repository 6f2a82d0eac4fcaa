"""Images through `so8t serve` with the official `openai` Python client (run by
tests/serve/main.rs on the tiny Qwen2-VL fixture as an SO8T model).

    python openai_images.py BASE_URL MODEL_ID EXPECTED_JSON

EXPECTED_JSON holds the image paths and what `so8t run --image` answered for the same
prompts: {"one": {"image": PATH, "prompt": TEXT, "text": ANSWER}, "two": {...}}.
Every check asserts; the first failure exits non-zero with its message.
"""
import base64
import json
import sys

import openai
from openai import OpenAI

base, model_id, expected = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def image(path):
    return {"type": "image_url", "image_url": {"url": data_url(path)}}


one = expected["one"]
msgs = [{"role": "user", "content": [image(one["image"]), {"type": "text", "text": one["prompt"]}]}]
r = client.chat.completions.create(model=model_id, messages=msgs, max_tokens=8, temperature=0)
assert r.choices[0].message.content == one["text"], (r.choices[0].message.content, one["text"])
assert r.usage.prompt_tokens == one["prompt_tokens"], r.usage
so8t = r.model_extra["so8t"]
assert 0 <= so8t["prompt"]["p_unsafe"] <= 1, so8t

# streamed: the same text, a verdict per chunk
text = ""
for chunk in client.chat.completions.create(model=model_id, messages=msgs, max_tokens=8, temperature=0, stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
        assert 0 <= chunk.model_extra["so8t"]["p_unsafe"] <= 1, chunk
assert text == one["text"], (text, one["text"])

# two images in one message, text between them
two = expected["two"]
parts = [{"type": "text", "text": "Compare"}, image(two["images"][0]), {"type": "text", "text": "and"},
         image(two["images"][1]), {"type": "text", "text": "briefly."}]
r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": parts}], max_tokens=8,
                                   temperature=0)
assert r.usage.prompt_tokens == two["prompt_tokens"], r.usage

# refused: remote URLs (nothing is fetched), other formats, too large, not an image
bad = [
    ({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}, 400, "not fetched"),
    ({"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}}, 400, "image/gif"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * (44 << 20)}}, 413, "larger than"),
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"hello").decode()}}, 400,
     "not a PNG or JPEG"),
]
for part, status, words in bad:
    try:
        client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": [part]}], max_tokens=2)
    except openai.APIStatusError as e:
        assert e.status_code == status and words in e.message, (e.status_code, e.message)
    else:
        raise AssertionError(f"accepted {str(part)[:80]}")

print("all image checks passed")
