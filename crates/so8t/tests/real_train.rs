//! The trained SmolLM2-135M SO8T model (eval/smollm2-135m/model: heads fitted, then a
//! short gates run, by scripts/train-eval.sh) gives the same verdicts baked and exported
//! to GGUF Q8_0 as unbaked, on the held-out test split, and llama.cpp runs the Q8_0 file
//! (fixture: scripts/reference/llama_cpp_trained_fixture.py records the file's sha256 and
//! llama.cpp's greedy tokens on it).

mod common;
use common::{check_against_llama_cpp, fixtures, real_model};
use sha2::{Digest, Sha256};
use so8t::so8::adapter::{So8tConfig, ADAPTER_FILE, CONFIG_FILE};
use so8t::so8::bake::{bake, BakeOptions};
use so8t::so8::convert::{convert, ConvertOptions};
use so8t::so8::export::{export, parse_quant};
use so8t::train::data::{read_jsonl, Dataset};
use so8t::train::{head_scores, Features};
use so8t::Model;
use std::path::Path;

/// (p_unsafe, p_escalate, decision) per row.
fn verdicts(path: &Path, data: &Dataset) -> Vec<(f32, f32, &'static str)> {
    let mut m = Model::open(path).unwrap();
    let state = m.so8t.as_ref().expect("SO8T heads");
    let (heads, config) = (state.heads.clone(), state.config.clone());
    assert!(config.heads_trained, "{}: heads untrained", path.display());
    let f = Features::compute(&mut m, data, |_| {}).unwrap();
    let [u, e] = head_scores(&heads, &f.x, f.hidden).unwrap();
    u.iter()
        .zip(&e)
        .map(|(&u, &e)| {
            (
                u,
                e,
                config
                    .decide(&[so8t::so8::adapter::Verdict {
                        p_unsafe: u,
                        p_escalate: e,
                    }])
                    .unwrap()
                    .name(),
            )
        })
        .collect()
}

/// Every p within `tol`; rows whose decisions differ must sit within `tol` of a threshold
/// in the reference, and at most `max_flips` of all rows may differ.
fn compare(
    what: &str,
    a: &[(f32, f32, &str)],
    b: &[(f32, f32, &str)],
    cfg: &So8tConfig,
    tol: f32,
    max_flips: f64,
) {
    let margin = tol;
    let mut max = 0f32;
    let mut differ = 0;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        max = max.max((x.0 - y.0).abs()).max((x.1 - y.1).abs());
        if x.2 != y.2 {
            differ += 1;
            let near = (x.0 - cfg.thresholds.unsafe_).abs() <= margin
                || (x.1 - cfg.thresholds.escalate).abs() <= margin;
            assert!(
                near,
                "{what}: row {i} decides {} vs {} away from the thresholds ({x:?} vs {y:?})",
                x.2, y.2
            );
        }
    }
    eprintln!(
        "{what}: {} rows, max |Δp| {max:.2e}, {differ} decisions differ",
        a.len()
    );
    assert!(max <= tol, "{what}: max |Δp| {max} > {tol}");
    assert!(
        differ as f64 <= max_flips * a.len() as f64,
        "{what}: {differ} of {} decisions differ",
        a.len()
    );
}

#[test]
fn trained_verdicts_survive_bake_and_q8_0_export() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-cpp/trained-smollm2.json")).unwrap(),
    )
    .unwrap();
    let Some(base) = real_model("smollm2", fixture["model"].as_str().unwrap()) else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("so8t");
    convert(&base, &dir, &ConvertOptions::default()).unwrap();
    let trained = fixtures().join("../eval/smollm2-135m/model");
    let config: So8tConfig =
        serde_json::from_str(&std::fs::read_to_string(trained.join(CONFIG_FILE)).unwrap()).unwrap();
    let converted = So8tConfig::read(&dir).unwrap();
    assert_eq!(
        config.base.sha256, converted.base.sha256,
        "the converter no longer makes the base the model was trained on"
    );
    for f in [ADAPTER_FILE, CONFIG_FILE] {
        std::fs::copy(trained.join(f), dir.join(f)).unwrap();
    }
    let labels = config.labels.clone();
    let data = read_jsonl(
        &fixtures().join("../data/safety/test.jsonl"),
        &labels,
        false,
    )
    .unwrap();
    let reference = verdicts(&dir, &data);

    // Baked at f32: the same function up to f32 rounding of W·R (bake's own tests hold
    // logits to 1e-4); a probability moves by at most p(1−p)·Δlogit ≤ Δlogit/4.
    let baked = tmp.path().join("baked");
    bake(&dir, &baked, &BakeOptions::default()).unwrap();
    compare(
        "baked f32",
        &reference,
        &verdicts(&baked, &data),
        &config,
        1e-3,
        0.0,
    );

    // Q8_0: weights and activations rounded to 8 bits move the final hidden state by ~1%,
    // and the trained heads are sharp (large weights), so p moves most near 0.5. How far
    // depends on which activations land on the other side of a rounding boundary, and
    // that changes with the order of float additions anywhere upstream: over all 460 test
    // rows, max |Δp| was 0.124 with the first kernels (7 decisions differ), and with the
    // current code 0.162 with the portable kernel (6), 0.159 with AVX2 (7) and 0.222 with
    // AVX-512 VNNI (10; `SO8T_KERNEL` picks one). Each differing decision is at a row whose
    // unbaked p lies within that distance of a threshold. The bounds: |Δp| ≤ 0.3 and at
    // most 3% of decisions.
    let gguf = tmp.path().join("q8_0.gguf");
    export(&dir, &gguf, parse_quant("q8_0").unwrap(), |_, _, _| {}).unwrap();
    let sha = format!("{:x}", Sha256::digest(std::fs::read(&gguf).unwrap()));
    assert_eq!(
        sha,
        fixture["sha256"].as_str().unwrap(),
        "the export is the file llama.cpp was run on"
    );
    compare(
        "gguf q8_0",
        &reference,
        &verdicts(&gguf, &data),
        &config,
        0.3,
        0.03,
    );

    let mut m = Model::open(&gguf).unwrap();
    check_against_llama_cpp(
        "trained smollm2 q8_0",
        &mut m,
        fixture["cases"].as_array().unwrap(),
        fixture["n_tokens"].as_u64().unwrap() as usize,
    );
}
