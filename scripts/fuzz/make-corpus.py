#!/usr/bin/env python3
"""Writes the malformed-input corpus, fixtures/malformed/cases.json, from the repo's real
fixture models (tiny Qwen2 as transformers saved it, its llama.cpp Q8_0 GGUF, and an
SO8T adapter made for it).

Usage: python3 scripts/fuzz/make-corpus.py

A case is a base and a list of edits, not a copy of the file: the bases are 150-530 KB
and the corpus has hundreds of cases, so `crates/so8t-cli/tests/malformed_corpus.rs`
applies the edits to a fresh copy of the base and runs every command that reads a model
on it. The edits are found by walking the real files, so each truncation lands on a
structure boundary of the real layout (every GGUF key and value, every tensor record,
the safetensors header and data) and each overwrite hits a real field.

Bases:
  gguf   fixtures/tiny-qwen2/model-q8_0.gguf (as one file, model.gguf)
  hf     fixtures/tiny-qwen2 (config.json, model.safetensors, tokenizer files)
  so8t   the hf base plus fixtures/tiny-qwen2/so8t-random/so8t_{adapter.safetensors,config.json}
  vl     fixtures/tiny-qwen2vl (Qwen2-VL: the hf files plus preprocessor_config.json; `run`
         gets an image)

Edits (all on one file of the base, named by `file`):
  truncate at / write at hex / json_set path value / json_del path / text / delete
Each case says which commands must refuse it (`refuse`, with the text their one error
line must contain besides the file's name) and is run through the other commands too:
those may accept it, but never panic, hang, exceed the memory bound or leave output.
"""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "fixtures")
OUT = os.path.join(FIX, "malformed", "cases.json")

# Commands by what they read (the test knows how to call each).
READ_GGUF = ["inspect", "validate", "run", "bench", "convert", "export", "modelfile", "serve"]
READ_HF = ["inspect", "validate", "run", "bench", "convert", "export", "serve"]
READ_SO8T = ["inspect", "validate", "run", "bench", "bake", "export", "eval", "serve"]
READ_VL = ["inspect", "validate", "run", "bench", "convert", "export", "serve"]
# Commands that load the weights' values, not only the header.
LOADS_WEIGHTS = ["run", "bench", "convert", "export", "serve"]

cases = []


def case(name, base, edits, refuse, expect, names=None):
    """`names`: the file the error must name, when not the edited one (an edit that makes
    two files disagree may be reported against the other)."""
    assert all(c in {"gguf": READ_GGUF, "hf": READ_HF, "so8t": READ_SO8T, "vl": READ_VL}[base] for c in refuse), name
    c = {"name": name, "base": base, "edits": edits, "refuse": refuse, "expect": expect}
    if names:
        c["names"] = names
    cases.append(c)


def u32(v):
    return struct.pack("<I", v).hex()


def u64(v):
    return struct.pack("<Q", v).hex()


# ---------------------------------------------------------------- GGUF

GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
GGUF_NAMES = {0: "u8", 1: "i8", 2: "u16", 3: "i16", 4: "u32", 5: "i32", 6: "f32", 7: "bool",
              8: "string", 9: "array", 10: "u64", 11: "i64", 12: "f64"}


def walk_gguf(b):
    """The layout of a GGUF file: its key-value records and tensor records, with offsets."""
    assert b[:4] == b"GGUF" and struct.unpack_from("<I", b, 4)[0] == 3
    n_tensors, n_kv = struct.unpack_from("<QQ", b, 8)
    pos = 24
    kvs, tensors = [], []

    def skip(pos, ty):
        if ty in GGUF_FIXED:
            return pos + GGUF_FIXED[ty]
        if ty == 8:
            return pos + 8 + struct.unpack_from("<Q", b, pos)[0]
        item, n = struct.unpack_from("<IQ", b, pos)
        pos += 12
        for _ in range(n):
            pos = skip(pos, item)
        return pos

    for _ in range(n_kv):
        start = pos
        klen = struct.unpack_from("<Q", b, pos)[0]
        key = b[pos + 8: pos + 8 + klen].decode()
        ty_at = pos + 8 + klen
        ty = struct.unpack_from("<I", b, ty_at)[0]
        value_at = ty_at + 4
        end = skip(value_at, ty)
        kvs.append({"key": key, "start": start, "type_at": ty_at, "type": ty, "value_at": value_at, "end": end})
        pos = end
    for _ in range(n_tensors):
        start = pos
        nlen = struct.unpack_from("<Q", b, pos)[0]
        name = b[pos + 8: pos + 8 + nlen].decode()
        dims_at = pos + 8 + nlen
        n_dims = struct.unpack_from("<I", b, dims_at)[0]
        shape_at = dims_at + 4
        type_at = shape_at + 8 * n_dims
        offset_at = type_at + 4
        tensors.append({
            "name": name, "start": start, "n_dims_at": dims_at, "n_dims": n_dims, "shape_at": shape_at,
            "shape": list(struct.unpack_from(f"<{n_dims}Q", b, shape_at)),
            "type_at": type_at, "type": struct.unpack_from("<I", b, type_at)[0],
            "offset_at": offset_at, "offset": struct.unpack_from("<Q", b, offset_at)[0],
            "end": offset_at + 8,
        })
        pos = offset_at + 8
    align = 32
    data = (pos + align - 1) // align * align
    return kvs, tensors, pos, data


def gguf_cases():
    path = os.path.join(FIX, "tiny-qwen2", "model-q8_0.gguf")
    b = open(path, "rb").read()
    kvs, tensors, header_end, data = walk_gguf(b)
    f = "model.gguf"
    trunc = lambda at: [{"file": f, "truncate": at}]
    every = READ_GGUF

    # Truncations at every structure boundary of the header, and in the tensor data.
    for at, what in ((0, "empty"), (3, "in the magic"), (4, "after the magic"), (8, "after the version"),
                     (16, "after the tensor count"), (24, "after the key-value count")):
        case(f"gguf truncated {what}", "gguf", trunc(at), every, "")
    for kv in kvs:
        k = kv["key"]
        case(f"gguf truncated at the start of key {k}", "gguf", trunc(kv["start"]), every, "")
        case(f"gguf truncated inside the name of {k}", "gguf", trunc(kv["start"] + 8 + 2), every, "")
        case(f"gguf truncated before the type of {k}", "gguf", trunc(kv["type_at"]), every, "")
        case(f"gguf truncated before the value of {k}", "gguf", trunc(kv["value_at"]), every, "")
        if kv["end"] - kv["value_at"] > 2:
            case(f"gguf truncated inside the value of {k}", "gguf",
                 trunc((kv["value_at"] + kv["end"]) // 2), every, "")
    for t in tensors[:3] + tensors[-1:]:
        n = t["name"]
        for at, what in ((t["start"], "at the start of"), (t["n_dims_at"], "before the dimensions of"),
                         (t["shape_at"] + 4, "inside the shape of"), (t["type_at"], "before the type of"),
                         (t["offset_at"], "before the offset of")):
            case(f"gguf truncated {what} tensor {n}", "gguf", trunc(at), every, "")
    for t in tensors[3:-1]:
        case(f"gguf truncated at the record of tensor {t['name']}", "gguf", trunc(t["start"]), every, "")
    case("gguf truncated at the end of the tensor records", "gguf", trunc(header_end), every, "")
    case("gguf truncated at the start of the tensor data", "gguf", trunc(data), every, "")
    case("gguf truncated in the middle of the tensor data", "gguf", trunc((data + len(b)) // 2), every, "")
    case("gguf truncated one byte short", "gguf", trunc(len(b) - 1), every, "")

    w = lambda at, hexs: [{"file": f, "write_at": at, "hex": hexs}]
    # Absurd counts and sizes.
    case("gguf version 1", "gguf", w(4, u32(1)), every, "version")
    case("gguf version 99", "gguf", w(4, u32(99)), every, "version")
    case("gguf big-endian magic", "gguf", w(0, b"FUGG".hex()), every, "")
    case("gguf 2^63 tensors", "gguf", w(8, u64(1 << 63)), every, "tensor")
    case("gguf 2^40 key-values", "gguf", w(16, u64(1 << 40)), every, "")
    case("gguf key-value count one short", "gguf", w(16, u64(len(kvs) - 1)), every, "")
    case("gguf tensor count one more", "gguf", w(8, u64(len(tensors) + 1)), every, "")
    first = kvs[0]
    case("gguf key length 2^62", "gguf", w(first["start"], u64(1 << 62)), every, "")
    case("gguf key length zero", "gguf", w(first["start"], u64(0)), every, "")
    for kv in kvs:
        if kv["type"] == 8:
            case(f"gguf string length 2^62 in {kv['key']}", "gguf", w(kv["value_at"], u64(1 << 62)), every, "")
            break
    for kv in kvs:
        if kv["type"] == 9:
            k = kv["key"]
            case(f"gguf array count 2^60 in {k}", "gguf", w(kv["value_at"] + 4, u64(1 << 60)), every, "")
            case(f"gguf array of unknown item type in {k}", "gguf", w(kv["value_at"], u32(77)), every, "")
            case(f"gguf array of arrays in {k}", "gguf", w(kv["value_at"], u32(9)), every, "")
    # Wrong types: a value's type id changed (same size, so the rest still parses).
    # Keys SO8T does not read (general.file_type, general.quantization_version) may have
    # any type; every key it reads must have the type llama.cpp's loader requires.
    unread = ("general.file_type", "general.quantization_version", "tokenizer.ggml.padding_token_id")
    for kv in kvs:
        k = kv["key"]
        refuse, expect = ([], "") if k in unread else (every, k)
        if kv["type"] == 4:
            case(f"gguf {k} as f32", "gguf", [{"file": f, "write_at": kv["type_at"], "hex": u32(6)}], refuse, expect)
        if kv["type"] == 6:
            case(f"gguf {k} as u32", "gguf", [{"file": f, "write_at": kv["type_at"], "hex": u32(4)}], refuse, expect)
        if kv["type"] == 8 and k == "general.architecture":
            case(f"gguf {k} unknown", "gguf", [{"file": f, "write_at": kv["value_at"] + 8, "hex": b"zzzzz".hex()}],
                 every, "zzzzz")
    case("gguf unknown value type", "gguf", w(kvs[1]["type_at"], u32(13)), every, "")
    # Values out of range.
    for kv in kvs:
        k = kv["key"]
        if kv["type"] == 4 and k.endswith((".block_count", ".embedding_length", ".attention.head_count",
                                           ".context_length", ".feed_forward_length")):
            case(f"gguf {k} = 0", "gguf", w(kv["value_at"], u32(0)), every, k.split(".", 1)[1])
            # A context is a limit, not an allocation: 2^31 is absurd but harmless.
            case(f"gguf {k} = 2^31", "gguf", w(kv["value_at"], u32(1 << 31)),
                 [] if k.endswith(".context_length") else every, "")
        if kv["type"] == 6 and k.endswith(("rope.freq_base", "layer_norm_rms_epsilon")):
            for v, what in ((float("nan"), "NaN"), (0.0, "0"), (-1.0, "-1"), (float("inf"), "inf")):
                case(f"gguf {k} = {what}", "gguf", w(kv["value_at"], struct.pack("<f", v).hex()), every,
                     k.split(".", 1)[1])
        if k == "general.alignment":
            for v in (0, 3, 1 << 31):
                case(f"gguf alignment {v}", "gguf", w(kv["value_at"], u32(v)), every, "alignment")
    # Missing keys: one letter of the key changed (same length).
    for kv in kvs:
        k = kv["key"]
        if k.endswith((".block_count", ".embedding_length", ".attention.head_count", ".feed_forward_length",
                       "tokenizer.ggml.tokens", "tokenizer.ggml.model", "general.architecture",
                       ".attention.layer_norm_rms_epsilon")):
            at = kv["start"] + 8 + len(k) - 1
            # A GGUF without a vocabulary is a model all the same (convert writes it
            # without a tokenizer, export copies it); only what tokenises must refuse.
            refuse = ["run", "serve", "modelfile"] if k.startswith("tokenizer.") else every
            case(f"gguf without {k}", "gguf", w(at, b"~".hex()), refuse, "")
    # Duplicate names: a key renamed to the one before it, a tensor to the one before it.
    for a, c in zip(kvs, kvs[1:]):
        if len(a["key"]) == len(c["key"]):
            case(f"gguf duplicate key {a['key']}", "gguf", w(c["start"] + 8, a["key"].encode().hex()), every,
                 a["key"])
            break
    for a, c in zip(tensors, tensors[1:]):
        if len(a["name"]) == len(c["name"]) and a["name"] != c["name"]:
            case(f"gguf duplicate tensor {a['name']}", "gguf", w(c["start"] + 8, a["name"].encode().hex()),
                 every, a["name"])
            break
    # Tensor records: shapes, types, offsets.
    # `modelfile` reads the settings, not the weights: a tensor whose shape disagrees with
    # them is for the loaders to refuse.
    loaders = [c for c in every if c != "modelfile"]
    for t in (tensors[0], tensors[len(tensors) // 2], tensors[-1]):
        n = t["name"]
        case(f"gguf {n} with 1000 dimensions", "gguf", w(t["n_dims_at"], u32(1000)), every, "")
        case(f"gguf {n} with 0 dimensions", "gguf", w(t["n_dims_at"], u32(0)), every, "")
        case(f"gguf {n} dimension 2^40", "gguf", w(t["shape_at"], u64(1 << 40)), every, "")
        case(f"gguf {n} dimension 0", "gguf", w(t["shape_at"], u64(0)), loaders, "")
        if t["n_dims"] == 2:
            case(f"gguf {n} shape overflowing 64 bits", "gguf",
                 w(t["shape_at"], u64(1 << 33) + u64(1 << 33)), every, "")
        case(f"gguf {n} unknown ggml type", "gguf", w(t["type_at"], u32(99)), every, "")
        case(f"gguf {n} offset past the end", "gguf", w(t["offset_at"], u64(len(b))), every, "")
        case(f"gguf {n} offset 2^63", "gguf", w(t["offset_at"], u64(1 << 63)), every, "")
        case(f"gguf {n} misaligned offset", "gguf", w(t["offset_at"], u64(t["offset"] + 1)), every, "")
    big = max((t for t in tensors if t["type"] == 8), key=lambda t: t["offset"])
    case(f"gguf {big['name']} as f32 (data runs past the end)", "gguf", w(big["type_at"], u32(0)), every, "")
    emb = next(t for t in tensors if t["name"] == "token_embd.weight")
    renamed = "token_embd.weighx"
    case("gguf without token_embd.weight", "gguf", w(emb["start"] + 8, renamed.encode().hex()),
         LOADS_WEIGHTS, "token_embd.weight")
    # NaN and Inf weights: an f32 norm vector and a Q8_0 block's f16 scale.
    norm = next(t for t in tensors if t["type"] == 0)
    q8 = next(t for t in tensors if t["type"] == 8)
    # `validate` reads every weight; `run` stops at the first non-finite logits. Loading
    # does not scan the weights (as llama.cpp does not, unless --check-tensors): that
    # would cost every start of a large model seconds.
    # A NaN in one norm weight may not reach the logits: the Q8_0 kernels quantise the
    # activations to 8 bits first, which turns that NaN into 0 (ggml's do the same).
    nan_refuse = ["validate", "run"]
    case(f"gguf NaN in {norm['name']}", "gguf", w(data + norm["offset"], struct.pack("<f", float("nan")).hex()),
         ["validate"], "")
    case(f"gguf Inf in {norm['name']}", "gguf", w(data + norm["offset"], struct.pack("<f", float("inf")).hex()),
         ["validate"], "")
    case(f"gguf NaN scale in {q8['name']}", "gguf", w(data + q8["offset"], "ff7f"), nan_refuse, "")
    # Templates that loop or recurse, written over the real template (same length).
    tpl = next(kv for kv in kvs if kv["key"] == "tokenizer.chat_template")
    n = tpl["end"] - tpl["value_at"] - 8
    for name, src in LOOPING_TEMPLATES.items():
        assert len(src) <= n
        padded = src + " " * (n - len(src))
        case(f"gguf chat template: {name}", "gguf", w(tpl["value_at"] + 8, padded.encode().hex()),
             ["run"], "template")


# A template that doubles a string in a namespace reaches gigabytes in ~30 loop turns
# (minijinja's fuel counts instructions, not bytes): the render child's memory budget
# ends it (so8t::chat::sandbox).
LOOPING_TEMPLATES = {
    "nested loops of 10^8": "{% for a in range(100000000) %}{% for b in range(100000000) %}x{% endfor %}{% endfor %}",
    "unbounded recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "string doubling": "{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "syntax error": "{% for m in messages %}{{ m.content }",
}


# ---------------------------------------------------------------- HF directory and SO8T

def walk_safetensors(b):
    n = struct.unpack_from("<Q", b, 0)[0]
    header = json.loads(b[8: 8 + n])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    return n, tensors


def hf_cases():
    f = "model.safetensors"
    b = open(os.path.join(FIX, "tiny-qwen2", f), "rb").read()
    n, tensors = walk_safetensors(b)
    every = READ_HF
    weights = ["validate"] + LOADS_WEIGHTS
    for at, what in ((0, "empty"), (4, "inside the header length"), (8, "after the header length"),
                     (8 + n // 2, "inside the header"), (8 + n, "at the start of the data"),
                     (8 + n + (len(b) - 8 - n) // 2, "in the middle of the data"), (len(b) - 1, "one byte short")):
        case(f"safetensors truncated {what}", "hf", [{"file": f, "truncate": at}], weights, "")
    w = lambda at, hexs: [{"file": f, "write_at": at, "hex": hexs}]
    case("safetensors header length 2^62", "hf", w(0, u64(1 << 62)), weights, "")
    case("safetensors header length past the end", "hf", w(0, u64(len(b))), weights, "")
    case("safetensors header not JSON", "hf", w(8, b"[[[[".hex()), weights, "")
    header = b[8: 8 + n].decode()
    name, info = sorted(tensors.items(), key=lambda kv: kv[1]["data_offsets"][0])[-1]

    def header_edit(old, new, what, refuse=weights, expect=""):
        assert old in header, old
        assert len(new) <= len(old)
        new = new + " " * (len(old) - len(new))
        at = 8 + header.index(old)
        case(f"safetensors {what}", "hf", w(at, new.encode().hex()), refuse, expect)

    s, e = info["data_offsets"]
    offsets = f'"data_offsets":[{s},{e}]'
    header_edit(offsets, f'"data_offsets":[{s},{e + 4096}]', f"{name} data past the end")
    header_edit(offsets, f'"data_offsets":[{e},{s}]', f"{name} offsets backwards")
    shape = json.dumps(info["shape"], separators=(",", ":"))
    header_edit(f'"shape":{shape}', '"shape":[9999999999,9999999999]'[: len(f'"shape":{shape}')],
                f"{name} absurd shape")
    dtype = f'"dtype":"{info["dtype"]}"'
    header_edit(dtype, '"dtype":"ZZ"', f"{name} unknown dtype")
    header_edit(dtype, '"dtype":"F64"', f"{name} dtype larger than its data")
    first = sorted(tensors)[0]
    # convert checks the files' structure, not which tensors the architecture needs.
    header_edit(f'"{first}"', f'"{first[:-1]}~"', f"without {first}",
                [c for c in ["validate"] + LOADS_WEIGHTS if c != "convert"], first[:-1])
    # NaN in a norm weight.
    norm = next(k for k, v in tensors.items() if "norm" in k and v["dtype"] in ("F32", "BF16", "F16"))
    at = 8 + n + tensors[norm]["data_offsets"][0]
    nan = {"F32": "0000c07f", "BF16": "c07f", "F16": "007e"}[tensors[norm]["dtype"]]
    case(f"safetensors NaN in {norm}", "hf", w(at, nan), ["validate", "run"], "", names="/in/m")

    # config.json: missing keys, wrong types, absurd values.
    c = "config.json"
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size",
                "model_type"):
        case(f"config.json without {key}", "hf", [{"file": c, "json_del": [key]}], every, key)
        case(f"config.json {key} as a string", "hf", [{"file": c, "json_set": [key], "value": "64"}], every, key)
    for key, v in (("hidden_size", 1 << 40), ("num_hidden_layers", 1000000000), ("vocab_size", 0),
                   ("num_attention_heads", 7), ("num_key_value_heads", 3), ("max_position_embeddings", 0),
                   ("rope_theta", -1.0), ("rms_norm_eps", 0.0), ("intermediate_size", 1 << 40),
                   ("hidden_size", -64)):
        case(f"config.json {key} = {v}", "hf", [{"file": c, "json_set": [key], "value": v}], every, key)
    case("config.json model_type unknown", "hf", [{"file": c, "json_set": ["model_type"], "value": "gpt99"}], every,
         "gpt99")
    case("config.json not JSON", "hf", [{"file": c, "text": "{\"hidden_size\": 64,"}], every, "config.json")
    original = open(os.path.join(FIX, "tiny-qwen2", c)).read()
    case("config.json with text after the object", "hf", [{"file": c, "text": original + " {}"}], every,
         "trailing characters")
    case("config.json empty", "hf", [{"file": c, "text": ""}], every, "config.json")
    case("config.json an array", "hf", [{"file": c, "text": "[1, 2, 3]"}], every, "config.json")
    case("config.json missing", "hf", [{"file": c, "delete": True}], every, "config.json")
    case("config.json nested 100000 deep", "hf", [{"file": c, "text": "[" * 100000 + "]" * 100000}], every,
         "config.json")
    # Tokenizer files.
    t = "tokenizer.json"
    case("tokenizer.json not JSON", "hf", [{"file": t, "text": "{\"model\": "}], ["run", "serve"], "tokenizer.json")
    case("tokenizer.json without a model", "hf", [{"file": t, "json_del": ["model"]}], ["run", "serve"],
         "tokenizer.json")
    case("tokenizer.json vocabulary of a number", "hf", [{"file": t, "json_set": ["model", "vocab"], "value": 5}],
         ["run", "serve"], "tokenizer.json")
    tc = "tokenizer_config.json"
    for name, src in LOOPING_TEMPLATES.items():
        case(f"tokenizer_config.json chat template: {name}", "hf",
             [{"file": tc, "json_set": ["chat_template"], "value": src}], ["run"], "template")
    case("tokenizer_config.json chat template a number", "hf", [{"file": tc, "json_set": ["chat_template"],
                                                                 "value": 7}], ["run", "serve"], "chat_template")


def so8t_cases():
    a = "so8t_adapter.safetensors"
    b = open(os.path.join(FIX, "tiny-qwen2", "so8t-random", a), "rb").read()
    n, tensors = walk_safetensors(b)
    every = READ_SO8T
    loads = ["validate", "run", "bench", "bake", "export", "eval", "serve"]
    w = lambda at, hexs: [{"file": a, "write_at": at, "hex": hexs}]
    case("adapter truncated in the header", "so8t", [{"file": a, "truncate": 8 + n // 2}], loads, "")
    case("adapter truncated in the data", "so8t", [{"file": a, "truncate": len(b) - 3}], loads, "")
    case("adapter missing", "so8t", [{"file": a, "delete": True}], loads, a)
    gens = sorted((k for k in tensors if k.endswith(".generators")), key=lambda k: tensors[k]["data_offsets"][0])
    heads = sorted((k for k in tensors if k.startswith("heads.")), key=lambda k: tensors[k]["data_offsets"][0])
    for g, values in ((gens[0], ((float("nan"), "NaN"), (float("inf"), "Inf"), (1e30, "1e30"))),
                      (heads[0], ((float("nan"), "NaN"), (float("inf"), "Inf")))):
        at = 8 + n + tensors[g]["data_offsets"][0]
        for v, what in values:
            case(f"adapter {what} in {g}", "so8t", w(at, struct.pack("<f", v).hex() * 4), loads, "")
    header = b[8: 8 + n].decode()
    first = sorted(tensors)[0]
    old = f'"{first}"'
    case(f"adapter without {first}", "so8t", w(8 + header.index(old), f'"{first[:-1]}~"'.encode().hex()), loads,
         first[:-1])
    c = "so8t_config.json"
    for path, v, expect in ((["version"], 99, "version"), (["sites"], ["q", "zz"], "zz"),
                            (["factors"], ["safe", "nope"], "nope"), (["granularity"], "galaxy", "galaxy"),
                            (["thresholds", "unsafe"], 2.0, "unsafe"), (["thresholds", "escalate"], -0.5, "escalate"),
                            (["thresholds", "consecutive"], 0, "consecutive"),
                            (["heads", "safety", "layer"], 99, "layer"), (["verdict_position"], "nowhere", "nowhere"),
                            (["labels", "safety"], ["only one"], "safety"), (["sites"], "q", "sites")):
        # An unknown factor is a valid name the adapter has no generators for.
        case(f"so8t_config.json {'.'.join(path)} = {json.dumps(v)}", "so8t",
             [{"file": c, "json_set": path, "value": v}], every, expect,
             names=a if path == ["factors"] else None)
    for key in ("base", "sites", "labels"):
        case(f"so8t_config.json without {key}", "so8t", [{"file": c, "json_del": [key]}], every, key)
    case("so8t_config.json not JSON", "so8t", [{"file": c, "text": "{"}], every, c)


def vl_cases():
    """Qwen2-VL: the vision tower's settings, the image processor's, a missing tower tensor.
    Every command that opens the model (the tower and the processor load with it), and
    export (it writes the projector), must refuse them."""
    opens = ["inspect", "run", "bench", "export", "serve"]
    c, p = "config.json", "preprocessor_config.json"
    for path, v, expect in ((["vision_config", "depth"], 1 << 40, "depth"),
                            (["vision_config", "patch_size"], 1 << 40, "patch_size"),
                            (["vision_config", "embed_dim"], 33, "head width"),
                            (["vision_config", "num_heads"], 0, "num_heads"),
                            (["vision_config", "mlp_ratio"], 1e300, "MLP width"),
                            (["vision_config", "hidden_act"], "gelu", "hidden_act"),
                            (["vision_config", "depth"], "three", "depth"),
                            (["image_token_id"], -5, "image_token_id")):
        case(f"qwen2vl config.json {'.'.join(path)} = {json.dumps(v)}", "vl",
             [{"file": c, "json_set": path, "value": v}], opens, expect)
    for key in ("vision_config", "image_token_id"):
        case(f"qwen2vl config.json without {key}", "vl", [{"file": c, "json_del": [key]}], opens, key)
    for v in ([2, 3], [2, 3, 4]):
        case(f"qwen2vl config.json mrope_section = {v}", "vl",
             [{"file": c, "json_set": ["text_config", "rope_parameters", "mrope_section"], "value": v}],
             READ_VL, "mrope_section")
    for path, v, expect in ((["resample"], 2, "resample"), (["size", "longest_edge"], 1 << 40, "pixel bounds"),
                            (["size", "shortest_edge"], 1 << 30, "pixel bounds"), (["merge_size"], 3, "differ"),
                            (["image_std"], [0, 0, 0], "image_std"), (["do_normalize"], False, "do_normalize"),
                            (["patch_size"], 0, "patch_size")):
        case(f"qwen2vl preprocessor_config.json {'.'.join(path)} = {json.dumps(v)}", "vl",
             [{"file": p, "json_set": path, "value": v}], opens, expect)
    case("qwen2vl preprocessor_config.json not JSON", "vl", [{"file": p, "text": "{\"size\": "}], opens, p)
    f = "model.safetensors"
    b = open(os.path.join(FIX, "tiny-qwen2vl", f), "rb").read()
    n, _ = walk_safetensors(b)
    header = b[8: 8 + n].decode()
    old = '"visual.merger.mlp.2.weight"'
    case("qwen2vl safetensors without visual.merger.mlp.2.weight", "vl",
         [{"file": f, "write_at": 8 + header.index(old), "hex": '"visual.merger.mlp.2.weigh~"'.encode().hex()}],
         ["inspect", "run", "bench", "export", "serve"], "visual.merger.mlp.2.weight")


def main():
    gguf_cases()
    hf_cases()
    so8t_cases()
    vl_cases()
    names = [c["name"] for c in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT + ".tmp", "w") as f:
        json.dump({"generator": "scripts/fuzz/make-corpus.py", "cases": cases}, f, indent=0)
        f.write("\n")
    os.replace(OUT + ".tmp", OUT)
    print(f"{len(cases)} cases -> {os.path.relpath(OUT, ROOT)}")


if __name__ == "__main__":
    main()
