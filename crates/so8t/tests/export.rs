//! `export` against llama.cpp's own converter (`convert_hf_to_gguf.py`, which wrote the
//! fixtures' model-{f32,f16,q8_0}.gguf from the same HF directories): the same metadata and
//! the same tensor bytes.

mod common;
use candle_core::quantized::gguf_file::{Content, Value};
use common::*;
use so8t::artifact::export::{export, parse_quant};
use std::io::Cursor;
use std::path::Path;

struct Gguf {
    bytes: Vec<u8>,
    content: Content,
}

fn read_gguf(p: &Path) -> Gguf {
    let bytes = std::fs::read(p).unwrap();
    let content = Content::read(&mut Cursor::new(&bytes)).unwrap();
    Gguf { bytes, content }
}

impl Gguf {
    fn tensor_bytes(&self, name: &str) -> &[u8] {
        let i = &self.content.tensor_infos[name];
        let n = i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size();
        let start = (self.content.tensor_data_offset + i.offset) as usize;
        &self.bytes[start..start + n]
    }
}

fn value_string(v: &Value) -> String {
    format!("{v:?}")
}

/// Keys only one side writes, by design: llama.cpp derives a display name and size label;
/// we record the alignment, as the GGUF v3 convention asks.
const IGNORED: [&str; 3] = ["general.name", "general.size_label", "general.alignment"];

fn compare(ours: &Gguf, theirs: &Gguf, what: &str, exact_bytes: bool) {
    let keys = |g: &Gguf| {
        let mut k: Vec<String> = g
            .content
            .metadata
            .keys()
            .filter(|k| !IGNORED.contains(&k.as_str()))
            .cloned()
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(ours), keys(theirs), "{what}: metadata keys");
    for k in keys(ours) {
        assert_eq!(
            value_string(&ours.content.metadata[&k]),
            value_string(&theirs.content.metadata[&k]),
            "{what}: metadata `{k}`"
        );
    }
    let mut names: Vec<&String> = theirs.content.tensor_infos.keys().collect();
    names.sort();
    let mut ours_names: Vec<&String> = ours.content.tensor_infos.keys().collect();
    ours_names.sort();
    assert_eq!(ours_names, names, "{what}: tensor names");
    let mut differing = Vec::new();
    for n in names {
        let (a, b) = (
            &ours.content.tensor_infos[n],
            &theirs.content.tensor_infos[n],
        );
        assert_eq!(
            (a.ggml_dtype, a.shape.dims()),
            (b.ggml_dtype, b.shape.dims()),
            "{what}: tensor `{n}` type and shape"
        );
        if ours.tensor_bytes(n) != theirs.tensor_bytes(n) {
            differing.push(n.clone());
        }
    }
    if exact_bytes {
        assert!(
            differing.is_empty(),
            "{what}: tensors with different bytes: {differing:?}"
        );
    } else if !differing.is_empty() {
        eprintln!(
            "{what}: {} tensors differ in bytes: {differing:?}",
            differing.len()
        );
    }
    assert_eq!(
        ours.content.magic,
        candle_core::quantized::gguf_file::VersionedMagic::GgufV3
    );
    assert_eq!(
        ours.content.metadata["general.alignment"].to_u32().unwrap(),
        32
    );
}

#[test]
fn export_matches_llama_cpp_converter_f32_f16_q8_0() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial", "phi3-short"] {
        for ty in ["f32", "f16", "q8_0"] {
            let out = tmp.path().join(format!("{arch}-{ty}.gguf"));
            export(
                &fixtures().join(format!("tiny-{arch}")),
                &out,
                parse_quant(ty).unwrap(),
                |_, _, _| {},
            )
            .unwrap();
            let theirs = read_gguf(&fixtures().join(format!("tiny-{arch}/model-{ty}.gguf")));
            compare(&read_gguf(&out), &theirs, &format!("{arch} {ty}"), true);
        }
    }
}

/// Qwen2-VL: the text GGUF (arch `qwen2vl`, M-RoPE sections) and its projector beside it
/// (`mmproj-NAME.gguf`: the vision tower, qkv and patch weights cut as the converter cuts
/// them), against `convert_hf_to_gguf.py` and `--mmproj` (scripts/reference/
/// qwen2vl_fixtures.py), metadata and bytes, at f32 and f16.
#[test]
fn qwen2vl_export_and_projector_match_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("tiny-qwen2vl");
    for ty in ["f32", "f16"] {
        let out = tmp.path().join(format!("tiny-{ty}.gguf"));
        let report = export(&dir, &out, parse_quant(ty).unwrap(), |_, _, _| {}).unwrap();
        let mmproj = tmp.path().join(format!("mmproj-tiny-{ty}.gguf"));
        assert_eq!(report.mmproj.as_ref().map(|m| m.0.clone()), Some(mmproj.clone()));
        compare(&read_gguf(&out), &read_gguf(&dir.join(format!("model-{ty}.gguf"))), &format!("qwen2vl {ty}"), true);
        compare(&read_gguf(&mmproj), &read_gguf(&dir.join(format!("mmproj-model-{ty}.gguf"))), &format!("qwen2vl mmproj {ty}"), true);
    }
}

/// A SentencePiece vocabulary (tokens, scores and types from tokenizer.model, Phi-3's
/// chat tokens added after it, padding to the model's vocabulary) exported as the
/// converter's Phi-3 path writes it.
#[test]
fn export_of_a_sentencepiece_vocabulary_matches_llama_cpp_converter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("spm.gguf");
    export(&fixtures().join("tiny-phi3-spm"), &out, parse_quant("f16").unwrap(), |_, _, _| {}).unwrap();
    let theirs = read_gguf(&fixtures().join("tiny-phi3-spm/model-f16.gguf"));
    compare(&read_gguf(&out), &theirs, "phi3 sentencepiece f16", true);
}

#[test]
fn exported_gguf_round_trips_through_the_runtime() {
    // HF → GGUF (f32) → our loader: the same logits as the HF directory, to the decoder tolerance.
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial", "phi3-short"] {
        let out = tmp.path().join(format!("{arch}.gguf"));
        export(
            &fixtures().join(format!("tiny-{arch}")),
            &out,
            parse_quant("f32").unwrap(),
            |_, _, _| {},
        )
        .unwrap();
        let exp = expected(&format!("tiny-{arch}"));
        let mut m = so8t::Model::open(&out).unwrap();
        for (i, ids) in exp.inputs.iter().enumerate() {
            let d = max_abs_diff(
                &m.decoder.forward_all(ids).unwrap(),
                &exp.logits[&format!("logits.{i}")],
            );
            assert!(d <= 1e-4, "{arch}: {d}");
        }
    }
}

#[test]
fn unknown_quant_types_are_refused() {
    let e = parse_quant("q7_x").unwrap_err().to_string();
    assert!(e.contains("unknown quant type `q7_x`"), "{e}");
    assert!(parse_quant("q4_k_m").is_ok());
    let e = parse_quant("iq2_xxs").unwrap_err().to_string();
    assert!(e.contains("needs an importance matrix"), "{e}");
}

/// Block bytes against ggml's own quantisers (fixtures/quant, from
/// scripts/reference/quant_fixtures.py). The issue asks for identity where ggml's
/// quantiser is deterministic from f32; the other types are reported, not asserted.
#[test]
fn quantised_bytes_equal_ggml_for_every_required_type() {
    let dir = fixtures().join("quant");
    let raw = std::fs::read(dir.join("input.f32")).unwrap();
    let x: Vec<f32> = raw
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let required = [
        "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q3_k", "q4_k", "q5_k", "q6_k",
    ];
    let mut report = Vec::new();
    for ty in [
        "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
        "q6_k",
    ] {
        let dtype = match parse_quant(ty).unwrap() {
            so8t::artifact::export::Quant::Plain(d) => d,
            q => panic!("{q:?}"),
        };
        let ours = so8t::formats::gguf_write::encode(&x, &[8, 1024], dtype).unwrap();
        let theirs = std::fs::read(dir.join(format!("{ty}.bin"))).unwrap();
        let same = ours == theirs;
        report.push(format!(
            "{ty}: {}",
            if same { "identical" } else { "differs" }
        ));
        if required.contains(&ty) {
            assert!(same, "{ty}: bytes differ from ggml's quantiser");
        }
    }
    eprintln!("{}", report.join(", "));
}

/// The Go TEMPLATE of the Modelfile, evaluated for the constructs it uses (`if .System`,
/// `range .Messages`, `.Role`, `.Content`), gives the same prompt as the model's Jinja
/// template rendered by minijinja.
#[test]
fn modelfile_template_renders_like_the_chat_template() {
    use so8t::chat::{ChatTemplate, Message};
    let gguf = fixtures().join("tiny-qwen2/model-f16.gguf");
    let mf = so8t::artifact::modelfile::modelfile(
        &gguf,
        &so8t::artifact::modelfile::ModelfileOptions {
            from: "./model.gguf",
            system: None,
            generation: Default::default(),
        },
    )
    .unwrap();
    assert!(mf.starts_with("FROM ./model.gguf\n"));
    assert!(mf.contains("PARAMETER stop \"<|im_end|>\""));
    let go = mf
        .split("TEMPLATE \"\"\"")
        .nth(1)
        .unwrap()
        .split("\"\"\"")
        .next()
        .unwrap();
    let msgs = [
        Message::new("system", "Be brief."),
        Message::new("user", "Hi"),
        Message::new("assistant", "Hello"),
        Message::new("user", "Bye"),
    ];
    // Go side: .System is the system message, .Messages the rest
    let (sys, rest) = (&msgs[0].content, &msgs[1..]);
    let (if_open, if_end) = ("{{ if .System }}", "{{ end }}");
    let a = go.find(if_open).unwrap();
    let b = a + go[a..].find(if_end).unwrap();
    let mut out = go[..a].to_string() + &go[a + if_open.len()..b].replace("{{ .System }}", sys);
    let tail = &go[b + if_end.len()..];
    let (r_open, r_end) = ("{{ range .Messages }}", "{{ end }}");
    let c = tail.find(r_open).unwrap();
    let d = c + tail[c..].find(r_end).unwrap();
    out += &tail[..c];
    for m in rest {
        out += &tail[c + r_open.len()..d]
            .replace("{{ .Role }}", &m.role)
            .replace("{{ .Content }}", &m.content);
    }
    out += &tail[d + r_end.len()..];
    let tok =
        so8t::tokenizer::TextTokenizer::from_hf_dir(&fixtures().join("tiny-qwen2"), &[]).unwrap();
    let jinja = ChatTemplate::new(tok.chat_template.as_ref().unwrap(), "", "")
        .unwrap()
        .render(&msgs, true)
        .unwrap();
    assert_eq!(out, jinja);
}

/// A system prompt holding `"""` would end Ollama's quoted value early and inject lines
/// (issue 18): refused with the file named.
#[test]
fn modelfile_refuses_a_system_prompt_it_cannot_quote() {
    let gguf = fixtures().join("tiny-qwen2/model-f16.gguf");
    let err = so8t::artifact::modelfile::modelfile(
        &gguf,
        &so8t::artifact::modelfile::ModelfileOptions {
            from: "./model.gguf",
            system: Some("Be kind.\"\"\"\nFROM /etc/passwd\nSYSTEM \"\"\"x"),
            generation: Default::default(),
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model-f16.gguf") && err.contains("cannot quote"), "{err}");
}

/// A directory's whole name is the model's `general.name`, as llama.cpp's converter takes
/// it: `tiny-0.5b` is not cut at its dot (it was, to `tiny-0`, when the name came from the
/// path's stem).
#[test]
fn a_directory_name_with_a_dot_is_the_whole_model_name() {
    use so8t::artifact::convert::{convert, ConvertOptions};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tiny-0.5b");
    convert(&fixtures().join("tiny-qwen3"), &dir, &ConvertOptions::default()).unwrap();
    let out = tmp.path().join("m.gguf");
    export(&dir, &out, parse_quant("f32").unwrap(), |_, _, _| {}).unwrap();
    let g = read_gguf(&out);
    assert_eq!(g.content.metadata["general.name"].to_string().unwrap(), "tiny-0.5b");
}

#[test]
fn exported_so8t_gguf_carries_heads_and_validates() {
    use so8t::artifact::convert::{convert, ConvertOptions, Init};
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    convert(
        &fixtures().join("tiny-qwen3"),
        &s,
        &ConvertOptions {
            init: Init::Random {
                seed: 9,
                scale: 0.3,
            },
            ..Default::default()
        },
    )
    .unwrap();
    let out = tmp.path().join("m.gguf");
    export(&s, &out, parse_quant("f32").unwrap(), |_, _, _| {}).unwrap();
    let g = read_gguf(&out);
    for k in [
        "so8t.version",
        "so8t.rotation_dim",
        "so8t.sites",
        "so8t.baked",
        "so8t.head.safety.weight",
        "so8t.head.safety.labels",
        "so8t.head.authority.bias",
    ] {
        assert!(g.content.metadata.contains_key(k), "{k}");
    }
    assert!(
        g.content.tensor_infos.keys().all(|n| !n.contains("so8t")),
        "no SO8T tensor: llama.cpp rejects unknown tensors"
    );
    let checks = so8t::artifact::validate::validate(&out);
    assert!(
        checks.iter().all(|c| c.ok) && checks.iter().any(|c| c.name == "baked_heads"),
        "{checks:?}"
    );
    // gated (SO8T dir) and exported (baked GGUF) give the same logits
    let ids = &expected("tiny-qwen3").inputs[0];
    let a = so8t::Model::open(&s)
        .unwrap()
        .decoder
        .forward_all(ids)
        .unwrap();
    let b = so8t::Model::open(&out)
        .unwrap()
        .decoder
        .forward_all(ids)
        .unwrap();
    assert!(max_abs_diff(&a, &b) <= 1e-4);
}

/// The python `gguf` package read every export type of the tiny SO8T model
/// (scripts/reference/gguf_py_fixtures.py): the same export here must give, tensor by
/// tensor, the type, shape and bytes gguf-py saw, and the same metadata keys.
#[test]
fn gguf_py_reads_every_export_type() {
    use sha2::{Digest, Sha256};
    use so8t::artifact::convert::{convert, ConvertOptions, Init};
    let read: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("gguf-py/read.json")).unwrap(),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let s = tmp.path().join("s");
    convert(
        &fixtures().join("tiny-qwen3"),
        &s,
        &ConvertOptions {
            init: Init::Random {
                seed: 5,
                scale: 0.3,
            },
            ..Default::default()
        },
    )
    .unwrap();
    let types = read.as_object().unwrap();
    assert_eq!(
        types.len(),
        so8t::artifact::export::QUANT_TYPES.len(),
        "every --quant type was read by gguf-py"
    );
    for (ty, seen) in types {
        let out = tmp.path().join(format!("{ty}.gguf"));
        export(&s, &out, parse_quant(ty).unwrap(), |_, _, _| {}).unwrap();
        let g = read_gguf(&out);
        assert_eq!(seen["version"], 3);
        let mut keys: Vec<&String> = g.content.metadata.keys().collect();
        keys.sort();
        let want: Vec<String> = serde_json::from_value(seen["metadata_keys"].clone()).unwrap();
        assert_eq!(keys, want.iter().collect::<Vec<_>>(), "{ty}: metadata keys");
        let tensors = seen["tensors"].as_object().unwrap();
        assert_eq!(
            tensors.len(),
            g.content.tensor_infos.len(),
            "{ty}: tensor count"
        );
        for (name, t) in tensors {
            let info = &g.content.tensor_infos[name];
            let ours_type = format!("{:?}", info.ggml_dtype).replace('K', "_K");
            assert_eq!(t["type"].as_str().unwrap(), ours_type, "{ty} {name}: type");
            let mut shape: Vec<u64> = info.shape.dims().iter().map(|&d| d as u64).collect();
            shape.reverse();
            assert_eq!(
                serde_json::to_value(shape).unwrap(),
                t["shape"],
                "{ty} {name}: shape (ggml order)"
            );
            let sha = format!("{:x}", Sha256::digest(g.tensor_bytes(name)));
            assert_eq!(sha, t["sha256"].as_str().unwrap(), "{ty} {name}: bytes");
        }
    }
}

/// llama.cpp on Phi-3 exports of SO8T models with random gates (fixtures/llama-cpp/
/// export-tiny-phi3*.json, from scripts/reference/phi3_fixtures.py): the file llama.cpp
/// read holds the tensors `export` makes, its prompt tokens (chat template, Phi-3's right-strip
/// after special tokens) are ours, and its greedy steps are ours up to llama.cpp's own
/// near-ties (the same bound as the real models'). The prompts are past the original
/// context, where llama.cpp and so8t both take the long factors (see README: llama.cpp
/// takes them for any context it allocates past the original, even for short prompts).
#[test]
fn phi3_exports_run_in_llama_cpp_as_in_so8t() {
    use so8t::artifact::convert::{convert, ConvertOptions, Init};
    for name in ["tiny-phi3", "tiny-phi3-short"] {
        let fixture: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join(format!("llama-cpp/export-{name}.json"))).unwrap(),
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        // The directory's name is the file's general.name, as in the script.
        let dir = tmp.path().join(format!("{name}-so8t"));
        let init = Init::Random {
            seed: fixture["seed"].as_u64().unwrap(),
            scale: fixture["scale"].as_f64().unwrap(),
        };
        convert(&fixtures().join(name), &dir, &ConvertOptions { init, ..Default::default() }).unwrap();
        let n = fixture["n_tokens"].as_u64().unwrap() as usize;
        for (quant, rec) in fixture["exports"].as_object().unwrap() {
            let out = tmp.path().join(format!("{quant}.gguf"));
            export(&dir, &out, parse_quant(quant).unwrap(), |_, _, _| {}).unwrap();
            // The tensor data of the file llama.cpp ran (the metadata holds the base's path).
            use sha2::Digest;
            let g = read_gguf(&out);
            let data = &g.bytes[g.content.tensor_data_offset as usize..];
            let sha = format!("{:x}", sha2::Sha256::digest(data));
            assert_eq!(sha, rec["tensor_data_sha256"].as_str().unwrap(), "{name} {quant}: the tensors llama.cpp ran");
            let mut m = so8t::Model::open(&out).unwrap();
            check_against_llama_cpp(&format!("{name} {quant}"), &mut m, rec["cases"].as_array().unwrap(), n);
        }
    }
}

/// `export --format vllm`: transformers' token classifier on each view (what vLLM's
/// pooling runner loads; fixtures/…/so8t-random/vllm-view.safetensors from
/// scripts/reference/vllm_view_fixtures.py) gives, per token, the head logits so8t
/// computes less the biases, for a head on the top layer and one on a middle layer (its
/// view cut there, the final norm of unit weight). Both sides f32; 1e-4 as for logits.
#[test]
fn vllm_views_score_tokens_as_the_heads_less_their_biases() {
    use so8t::artifact::vllm::export_vllm;
    for name in ["tiny-qwen2", "tiny-phi3"] {
        let base = fixtures().join(name);
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("so8t");
        std::fs::create_dir(&src).unwrap();
        for e in std::fs::read_dir(&base).unwrap() {
            let p = e.unwrap().path();
            let n = p.file_name().unwrap().to_string_lossy().to_string();
            if p.is_file() && !n.starts_with("expected") && !n.ends_with(".gguf") {
                std::fs::copy(&p, src.join(&n)).unwrap();
            }
        }
        std::fs::copy(base.join("so8t-random/so8t_adapter.safetensors"), src.join("so8t_adapter.safetensors")).unwrap();
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join("so8t-random/so8t_config.json")).unwrap()).unwrap();
        cfg["heads"] = serde_json::json!({"safety": {"layer": 1}});
        std::fs::write(src.join("so8t_config.json"), cfg.to_string()).unwrap();
        let out = tmp.path().join("vllm");
        let views = export_vllm(&src, &out, false).unwrap();
        assert_eq!(views, ["classifier-layer1", "classifier-layer2"]);
        let heads: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("so8t_heads.json")).unwrap()).unwrap();
        let recorded: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join("so8t-random/vllm-heads.json")).unwrap()).unwrap();
        assert_eq!(heads, recorded, "{name}: so8t_heads.json");
        let theirs = candle_core::safetensors::load(base.join("so8t-random/vllm-view.safetensors"), &candle_core::Device::Cpu).unwrap();
        let mut m = so8t::Model::open(&src).unwrap();
        let h = m.so8t.as_ref().unwrap().heads.clone();
        for (i, ids) in expected(name).inputs.iter().enumerate() {
            m.decoder.clear_cache();
            m.decoder.forward_hidden(ids, 0).unwrap();
            for (head, w, layer) in [("safety", &h.safety_w, 1), ("authority", &h.authority_w, 2)] {
                let ours = m.decoder.tap_of(layer).unwrap().matmul(&w.t().unwrap()).unwrap();
                let view = heads["heads"][head]["view"].as_str().unwrap();
                let row = heads["heads"][head]["score_rows"][0].as_u64().unwrap() as usize;
                let got = theirs[&format!("{view}.{i}")].narrow(1, row, 2).unwrap();
                let d = max_abs_diff(&ours, &got);
                assert!(d <= 1e-4, "{name} {head} input {i}: max |Δ| = {d}");
            }
        }
        // The files transformers read are the ones this export made.
        let files: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(base.join("so8t-random/vllm-files.json")).unwrap()).unwrap();
        for (f, sha) in files.as_object().unwrap() {
            use sha2::Digest;
            let got = format!("{:x}", sha2::Sha256::digest(std::fs::read(out.join(f)).unwrap()));
            assert_eq!(&got, sha.as_str().unwrap(), "{name}: {f}");
        }
        assert!(out.join("model/so8t_heads.safetensors").exists());
    }
}

/// llama.cpp's `llama-mtmd-cli` on this export of the tiny Qwen2-VL (fixtures/llama-cpp/
/// mtmd-qwen2vl.json, from scripts/reference/qwen2vl_fixtures.py): the two files it read
/// are the ones `export` writes (sha256 of each), and its greedy answers to a prompt with
/// one image and with two are ours. Its answer is raw bytes (a random tiny vocabulary
/// splits UTF-8 sequences); both sides are compared as text with invalid bytes replaced.
#[test]
fn llama_cpp_mtmd_answers_image_prompts_on_our_export_as_we_do() {
    use so8t::chat::{Message, Part};
    use so8t::generate::{generate, Control, GenerateRequest};
    use sha2::{Digest, Sha256};
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("llama-cpp/mtmd-qwen2vl.json")).unwrap()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-qwen2vl");
    let out = tmp.path().join("tiny-qwen2vl.gguf");
    export(&src, &out, parse_quant("f32").unwrap(), |_, _, _| {}).unwrap();
    for (file, sha) in record["sha256"].as_object().unwrap() {
        let got = format!("{:x}", Sha256::digest(std::fs::read(tmp.path().join(file)).unwrap()));
        assert_eq!(&got, sha.as_str().unwrap(), "{file}: the bytes llama.cpp read");
    }
    let mut model = so8t::Model::open(&src).unwrap();
    for case in record["cases"].as_array().unwrap() {
        let names: Vec<String> = serde_json::from_value(case["images"].clone()).unwrap();
        let images: Vec<_> = names
            .iter()
            .map(|n| model.read_image(&fixtures().join(format!("qwen2vl-images/{n}.png"))).unwrap())
            .collect();
        // mtmd-cli puts each image's marker before the prompt's text.
        let mut parts = vec![Part::Image; images.len()];
        parts.push(Part::Text(case["prompt"].as_str().unwrap().to_string()));
        let ids = model.prompt_ids(&[Message::with_parts("user", parts)]).unwrap();
        let (ids, _, media) = model.vision().unwrap().expanded_prompt(&ids, None, &images).unwrap();
        let req = GenerateRequest {
            prompt_ids: ids,
            max_tokens: 12,
            sampling: so8t::sampling::SamplingParams { temperature: 0.0, ..Default::default() },
            stop: vec![],
            top_logprobs: 0,
            verdict_every_token: false,
            verdict_position: None,
            media: Some(std::sync::Arc::new(media)),
        };
        let gen = generate(&mut model, &req, |_| Control::Continue).unwrap();
        let tok = model.tokenizer().unwrap();
        let ours = tok.decode(&gen.tokens).unwrap();
        let theirs = String::from_utf8_lossy(&hex(case["answer_hex"].as_str().unwrap())).to_string();
        assert_eq!(ours, theirs, "{names:?}: llama-mtmd-cli's answer");
    }
}

/// The exported text GGUF with its projector beside it runs image prompts as the HF
/// directory does: logits at every position of the fixture's one- and two-image prompts
/// within 1e-4 of transformers' (f32 files: the same weights, the same f32 math), and the
/// same greedy tokens as transformers' generate().
#[test]
fn exported_qwen2vl_gguf_and_projector_run_images_as_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = fixtures().join("tiny-qwen2vl");
    let out = tmp.path().join("tiny.gguf");
    export(&dir, &out, parse_quant("f32").unwrap(), |_, _, _| {}).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let want = candle_core::safetensors::load(dir.join("expected.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut model = so8t::Model::open(&out).unwrap();
    // The projector keeps no pixel bounds: the HF directory's (a lowered max_pixels) are
    // put back so that image c is resized as transformers resized it.
    let hf = so8t::Model::open(&dir).unwrap();
    let found = model.vision.take().expect("the projector beside the file is loaded");
    let mut vision = std::sync::Arc::try_unwrap(found).ok().unwrap();
    assert_eq!(vision.processor.image_mean, hf.vision().unwrap().processor.image_mean);
    vision.processor = hf.vision().unwrap().processor.clone();
    model.vision = Some(std::sync::Arc::new(vision));
    for (i, p) in meta["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        let names: Vec<String> = serde_json::from_value(p["images"].clone()).unwrap();
        let images: Vec<_> = names.iter().map(|n| model.read_image(&fixtures().join(format!("qwen2vl-images/{n}.png"))).unwrap()).collect();
        let media = model.prompt_media(&ids, &images).unwrap();
        model.decoder.clear_cache();
        let mut h = model.decoder.forward_hidden_media(&ids, 0, &media).unwrap();
        let d = max_abs_diff(&model.decoder.logits(&h).unwrap(), &want[&format!("logits.{i}")]);
        assert!(d <= 1e-4, "prompt {i}: max |Δlogit| = {d}");
        let greedy: Vec<u32> = serde_json::from_value(p["greedy"].clone()).unwrap();
        let mut got = Vec::new();
        for _ in 0..greedy.len() {
            let last = h.get(h.dim(0).unwrap() - 1).unwrap().unsqueeze(0).unwrap();
            let t = model.decoder.logits(&last).unwrap().squeeze(0).unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap();
            got.push(t);
            let pos = model.decoder.cached_len();
            h = model.decoder.forward_hidden(&[t], pos).unwrap();
        }
        assert_eq!(got, greedy, "prompt {i}: greedy tokens");
    }
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
