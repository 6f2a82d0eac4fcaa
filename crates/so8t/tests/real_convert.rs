//! `convert` on the real GGUFs: the SO8T directory holds the base dequantised to f32
//! safetensors with an HF config and a tokenizer.json rebuilt from GGUF metadata; the
//! zero-init model computes exactly what that base computes, and tokenises exactly as the
//! GGUF (and so llama.cpp) does.

mod common;
use common::{greedy_with_logits, real_model};
use so8t::artifact::convert::{convert, ConvertOptions};
use so8t::Model;

fn check(which: &str, file: &str, prompt: &str) {
    let Some(gguf) = real_model(which, file) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("so8t");
    convert(&gguf, &dir, &ConvertOptions::default()).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "so8t_config.json",
        "so8t_adapter.safetensors",
    ] {
        assert!(dir.join(f).exists(), "{which}: {f} written");
    }
    let mut original = Model::open(&gguf).unwrap();
    let mut so8t = Model::open(&dir).unwrap();
    let mut base = Model::open_base(&dir).unwrap();
    let ids = original.tokenizer().unwrap().encode(prompt, true).unwrap();
    assert_eq!(
        so8t.tokenizer().unwrap().encode(prompt, true).unwrap(),
        ids,
        "{which}: tokenizer.json rebuilt from GGUF"
    );
    let t = so8t.tokenizer().unwrap();
    assert!(
        t.chat_template.is_some() && !t.eog.is_empty(),
        "{which}: chat template and end-of-generation ids carried over"
    );

    let (a, la) = greedy_with_logits(&mut so8t, &ids, 12);
    let (b, lb) = greedy_with_logits(&mut base, &ids, 12);
    assert_eq!(
        a, b,
        "{which}: zero-init SO8T greedy tokens equal the base's"
    );
    assert!(
        la.iter()
            .flatten()
            .zip(lb.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "{which}: logits bit-identical"
    );
    let (c, _) = greedy_with_logits(&mut original, &ids, 12);
    let same = a.iter().zip(&c).take_while(|(x, y)| x == y).count();
    eprintln!("{which}: f32 base and original quantised GGUF agree on the first {same} of 12 greedy tokens");
    assert!(
        same >= 1,
        "{which}: the dequantised base must predict the GGUF's first token"
    );
}

#[test]
fn convert_smollm2_gguf() {
    check(
        "smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "The capital of France is",
    );
}

#[test]
fn convert_qwen25_coder_gguf() {
    check(
        "qwen25coder",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "def fibonacci(n):",
    );
}
