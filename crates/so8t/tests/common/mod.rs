#![allow(dead_code)]
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

pub struct Expected {
    pub inputs: Vec<Vec<u32>>,
    pub greedy: Vec<Vec<u32>>,
    pub logits: HashMap<String, Tensor>,
}

pub fn expected(name: &str) -> Expected {
    let dir = fixtures().join(name);
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = |k: &str| -> Vec<Vec<u32>> { serde_json::from_value(meta[k].clone()).unwrap() };
    Expected {
        inputs: ids("inputs"),
        greedy: ids("greedy"),
        logits: candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap(),
    }
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Greedy continuation straight from the decoder (no end-of-generation stop, as the
/// reference recorded it).
pub fn greedy(model: &mut so8t::Model, prompt: &[u32], n: usize) -> Vec<u32> {
    model.decoder.clear_cache();
    let mut out = Vec::new();
    let mut h = model.decoder.forward_hidden(prompt, 0).unwrap();
    for _ in 0..n {
        let last = h.get(h.dim(0).unwrap() - 1).unwrap().unsqueeze(0).unwrap();
        let logits = model.decoder.logits(&last).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
        let t = so8t::sampling::argmax(&logits);
        out.push(t);
        h = model.decoder.forward_hidden(&[t], prompt.len() + out.len() - 1).unwrap();
    }
    out
}

/// Argmax at every position of `ids`, from one forward pass.
pub fn argmax_rows(model: &mut so8t::Model, ids: &[u32]) -> Vec<u32> {
    let logits = model.decoder.forward_all(ids).unwrap();
    logits.argmax(1).unwrap().to_vec1::<u32>().unwrap()
}

/// A real model from the cache, fetched by scripts/fetch-models.sh when missing; None
/// (after saying SKIPPED and why) only when the fetch is impossible.
pub fn real_model(which: &str, file: &str) -> Option<PathBuf> {
    let cache = std::env::var_os("SO8T_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/so8t"));
    let path = cache.join(file);
    if path.exists() {
        return Some(path);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-models.sh");
    match std::process::Command::new("bash").arg(script).arg(which).output() {
        Ok(o) if o.status.success() && path.exists() => Some(path),
        Ok(o) => {
            eprintln!("SKIPPED: {file} could not be fetched: {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: {file} could not be fetched: {e}");
            None
        }
    }
}
