//! `export` against llama.cpp's own converter (`convert_hf_to_gguf.py`, which wrote the
//! fixtures' model-{f32,f16,q8_0}.gguf from the same HF directories): the same metadata and
//! the same tensor bytes.

mod common;
use candle_core::quantized::gguf_file::{Content, Value};
use common::*;
use so8t::so8::export::{export, parse_quant};
use std::io::Cursor;
use std::path::Path;

struct Gguf {
    bytes: Vec<u8>,
    content: Content,
}

fn read(p: &Path) -> Gguf {
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
        let mut k: Vec<String> = g.content.metadata.keys().filter(|k| !IGNORED.contains(&k.as_str())).cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(ours), keys(theirs), "{what}: metadata keys");
    for k in keys(ours) {
        assert_eq!(value_string(&ours.content.metadata[&k]), value_string(&theirs.content.metadata[&k]), "{what}: metadata `{k}`");
    }
    let mut names: Vec<&String> = theirs.content.tensor_infos.keys().collect();
    names.sort();
    let mut ours_names: Vec<&String> = ours.content.tensor_infos.keys().collect();
    ours_names.sort();
    assert_eq!(ours_names, names, "{what}: tensor names");
    let mut differing = Vec::new();
    for n in names {
        let (a, b) = (&ours.content.tensor_infos[n], &theirs.content.tensor_infos[n]);
        assert_eq!((a.ggml_dtype, a.shape.dims()), (b.ggml_dtype, b.shape.dims()), "{what}: tensor `{n}` type and shape");
        if ours.tensor_bytes(n) != theirs.tensor_bytes(n) {
            differing.push(n.clone());
        }
    }
    if exact_bytes {
        assert!(differing.is_empty(), "{what}: tensors with different bytes: {differing:?}");
    } else if !differing.is_empty() {
        eprintln!("{what}: {} tensors differ in bytes: {differing:?}", differing.len());
    }
    assert_eq!(ours.content.magic, candle_core::quantized::gguf_file::VersionedMagic::GgufV3);
    assert_eq!(ours.content.metadata["general.alignment"].to_u32().unwrap(), 32);
}

#[test]
fn export_matches_llama_cpp_converter_f32_f16_q8_0() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3"] {
        for ty in ["f32", "f16", "q8_0"] {
            let out = tmp.path().join(format!("{arch}-{ty}.gguf"));
            export(&fixtures().join(format!("tiny-{arch}")), &out, parse_quant(ty).unwrap(), |_, _, _| {}).unwrap();
            let theirs = read(&fixtures().join(format!("tiny-{arch}/model-{ty}.gguf")));
            compare(&read(&out), &theirs, &format!("{arch} {ty}"), true);
        }
    }
}

#[test]
fn exported_gguf_round_trips_through_the_runtime() {
    // HF → GGUF (f32) → our loader: the same logits as the HF directory, to the decoder tolerance.
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3"] {
        let out = tmp.path().join(format!("{arch}.gguf"));
        export(&fixtures().join(format!("tiny-{arch}")), &out, parse_quant("f32").unwrap(), |_, _, _| {}).unwrap();
        let exp = expected(&format!("tiny-{arch}"));
        let mut m = so8t::Model::open(&out).unwrap();
        for (i, ids) in exp.inputs.iter().enumerate() {
            let d = max_abs_diff(&m.decoder.forward_all(ids).unwrap(), &exp.logits[&format!("logits.{i}")]);
            assert!(d <= 1e-4, "{arch}: {d}");
        }
    }
}

#[test]
fn unknown_quant_types_are_refused() {
    let e = parse_quant("q7_x").unwrap_err().to_string();
    assert!(e.contains("unknown quant type `q7_x`"), "{e}");
    assert!(parse_quant("q4_k_m").is_ok());
}

/// Block bytes against ggml's own quantisers (fixtures/quant, from
/// scripts/reference/quant_fixtures.py). The issue asks for identity where ggml's
/// quantiser is deterministic from f32; the other types are reported, not asserted.
#[test]
fn quantised_bytes_equal_ggml_for_every_required_type() {
    let dir = fixtures().join("quant");
    let raw = std::fs::read(dir.join("input.f32")).unwrap();
    let x: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let t = candle_core::Tensor::from_vec(x, (8, 1024), &candle_core::Device::Cpu).unwrap();
    let required = ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k"];
    let mut report = Vec::new();
    for ty in ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"] {
        let dtype = match parse_quant(ty).unwrap() {
            so8t::so8::export::Quant::Plain(d) => d,
            q => panic!("{q:?}"),
        };
        let ours = so8t::so8::export::encode(&t, dtype).unwrap();
        let theirs = std::fs::read(dir.join(format!("{ty}.bin"))).unwrap();
        let same = ours == theirs;
        report.push(format!("{ty}: {}", if same { "identical" } else { "differs" }));
        if required.contains(&ty) {
            assert!(same, "{ty}: bytes differ from ggml's quantiser");
        }
    }
    eprintln!("{}", report.join(", "));
}
