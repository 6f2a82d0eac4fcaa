//! `bake` (spec §4): folding the gates into the weights changes nothing the model
//! computes; the result is a plain HF directory that transformers loads as it is.

mod common;
use common::*;
use so8t::artifact::adapter::{ADAPTER_FILE, CONFIG_FILE};
use so8t::artifact::bake::{bake, BakeOptions, OutDType, HEADS_FILE};
use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::so8::gates::Granularity;
use so8t::Model;
use std::path::{Path, PathBuf};

fn gated_and_baked(
    base: &str,
    opts: &ConvertOptions,
    bake_opts: &BakeOptions,
    tmp: &tempfile::TempDir,
) -> (PathBuf, PathBuf) {
    let s = tmp.path().join(format!("{base}-s"));
    let b = tmp.path().join(format!("{base}-b"));
    convert(&fixtures().join(base), &s, opts).unwrap();
    bake(&s, &b, bake_opts).unwrap();
    (s, b)
}

/// Returns max |Δlogit| and max |Δp| between two models over the fixture inputs.
fn compare(a: &Path, b: &Path, inputs: &[Vec<u32>]) -> (f32, f32) {
    let (mut ma, mut mb) = (Model::open(a).unwrap(), Model::open(b).unwrap());
    let (ha, hb) = (
        ma.so8t.as_ref().unwrap().heads.clone(),
        mb.so8t.as_ref().unwrap().heads.clone(),
    );
    assert!(mb.so8t.as_ref().unwrap().baked && !ma.so8t.as_ref().unwrap().baked);
    assert!(
        mb.decoder
            .gates
            .iter()
            .all(|g| g.q.is_none() && g.mlp.is_none()),
        "a baked model runs without gates"
    );
    let (mut dl, mut dp) = (0f32, 0f32);
    for ids in inputs {
        ma.decoder.clear_cache();
        mb.decoder.clear_cache();
        let (xa, xb) = (
            ma.decoder.forward_hidden(ids, 0).unwrap(),
            mb.decoder.forward_hidden(ids, 0).unwrap(),
        );
        dl = dl.max(max_abs_diff(
            &ma.decoder.logits(&xa).unwrap(),
            &mb.decoder.logits(&xb).unwrap(),
        ));
        for (va, vb) in ha
            .verdicts(&xa)
            .unwrap()
            .iter()
            .zip(hb.verdicts(&xb).unwrap())
        {
            dp = dp
                .max((va.p_unsafe - vb.p_unsafe).abs())
                .max((va.p_escalate - vb.p_escalate).abs());
        }
    }
    (dl, dp)
}

fn random_heads(dir: &Path) {
    // heads at zero give p = 0.5 everywhere, which would hide a verdict mismatch
    let mut a = so8t::artifact::adapter::Adapter::read(dir).unwrap();
    let r =
        |s: &[usize]| candle_core::Tensor::randn(0f32, 0.5, s, &candle_core::Device::Cpu).unwrap();
    a.heads.safety_w = r(&[2, a.heads.safety_w.dim(1).unwrap()]);
    a.heads.authority_w = r(&[2, a.heads.authority_w.dim(1).unwrap()]);
    a.write(&dir.join(ADAPTER_FILE)).unwrap();
}

/// Baked and gated forward differ only by f32 rounding of W·x with W = R·W₀ folded in
/// f64 versus R·(W₀·x): a few ulps of each logit, far below the 1e-4 bound.
#[test]
fn baked_equals_gated_for_every_architecture_and_granularity() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial"] {
        for g in [Granularity::Shared, Granularity::PerHead] {
            let opts = ConvertOptions {
                init: Init::Random {
                    seed: 11,
                    scale: 0.4,
                },
                granularity: g,
                ..Default::default()
            };
            let base = format!("tiny-{arch}");
            let s = tmp.path().join(format!("{arch}-{g:?}-s"));
            let b = tmp.path().join(format!("{arch}-{g:?}-b"));
            convert(&fixtures().join(&base), &s, &opts).unwrap();
            random_heads(&s);
            // the heads changed, not the base: the checksum still matches
            bake(&s, &b, &BakeOptions::default()).unwrap();
            let (dl, dp) = compare(&s, &b, &expected(&base).inputs);
            assert!(
                dl <= 1e-4,
                "{arch} {g:?}: max |Δlogit| baked vs gated = {dl}"
            );
            assert!(dp <= 1e-5, "{arch} {g:?}: max |Δp| baked vs gated = {dp}");
        }
    }
}

#[test]
fn baked_directory_is_plain_and_matches_transformers_on_it() {
    let tmp = tempfile::tempdir().unwrap();
    for arch in ["llama", "qwen2", "qwen3", "phi3", "phi3-partial"] {
        let base = fixtures().join(format!("tiny-{arch}"));
        let s = tmp.path().join(format!("{arch}-ref"));
        std::fs::create_dir_all(&s).unwrap();
        for f in [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            std::fs::copy(base.join(f), s.join(f)).unwrap();
        }
        for f in [ADAPTER_FILE, CONFIG_FILE] {
            std::fs::copy(base.join("so8t-random").join(f), s.join(f)).unwrap();
        }
        let b = tmp.path().join(format!("{arch}-baked"));
        bake(&s, &b, &BakeOptions::default()).unwrap();
        let names: Vec<String> = std::fs::read_dir(&b)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert!(
            !names.iter().any(|n| n == ADAPTER_FILE || n == CONFIG_FILE),
            "{names:?}"
        );
        assert!(names.iter().any(|n| n == HEADS_FILE));
        let st = std::fs::read(b.join("model.safetensors")).unwrap();
        let baked = safetensors::SafeTensors::deserialize(&st).unwrap();
        let orig_bytes = std::fs::read(base.join("model.safetensors")).unwrap();
        let orig = safetensors::SafeTensors::deserialize(&orig_bytes).unwrap();
        let mut a: Vec<String> = baked.names().into_iter().map(str::to_string).collect();
        let mut o: Vec<String> = orig.names().into_iter().map(str::to_string).collect();
        a.sort();
        o.sort();
        assert_eq!(
            a, o,
            "{arch}: the baked checkpoint has exactly the base's tensors"
        );

        // transformers ran this same bake (scripts/reference/make_fixtures.py) and recorded
        // its logits; ours on the baked directory must agree.
        let tb = candle_core::safetensors::load(
            base.join("so8t-random/transformers-baked.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let mut m = Model::open(&b).unwrap();
        for (i, ids) in expected(&format!("tiny-{arch}")).inputs.iter().enumerate() {
            let d = max_abs_diff(
                &m.decoder.forward_all(ids).unwrap(),
                &tb[&format!("logits.{i}")],
            );
            assert!(
                d <= 1e-4,
                "{arch} input {i}: so8t vs transformers on the baked directory: {d}"
            );
        }
    }
}

#[test]
fn fp8_base_bakes_to_bf16_by_default_and_exactly_to_f32_on_request() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = ConvertOptions {
        init: Init::Random {
            seed: 2,
            scale: 0.3,
        },
        ..Default::default()
    };
    let (s, b) = gated_and_baked("tiny-qwen3-fp8", &opts, &BakeOptions::default(), &tmp);
    let bytes = std::fs::read(b.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(
        st.tensor("model.layers.0.mlp.up_proj.weight")
            .unwrap()
            .dtype(),
        safetensors::Dtype::BF16
    );
    assert!(st.names().iter().all(|n| !n.ends_with("_scale_inv")));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(b.join("config.json")).unwrap()).unwrap();
    assert!(cfg["quantization_config"].is_null());
    let b32 = tmp.path().join("f32");
    bake(
        &s,
        &b32,
        &BakeOptions {
            dtype: Some(OutDType::F32),
            ..Default::default()
        },
    )
    .unwrap();
    let (dl, _) = compare(&s, &b32, &expected("tiny-qwen3-fp8").inputs);
    assert!(dl <= 1e-4, "FP8 base baked to f32 vs gated: {dl}");
}

#[test]
fn bake_refuses_an_existing_target_and_a_changed_base() {
    let tmp = tempfile::tempdir().unwrap();
    let (s, b) = gated_and_baked(
        "tiny-qwen2",
        &ConvertOptions::default(),
        &BakeOptions::default(),
        &tmp,
    );
    let err = bake(&s, &b, &BakeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
    bake(
        &s,
        &b,
        &BakeOptions {
            force: true,
            ..Default::default()
        },
    )
    .unwrap();

    let mut w = std::fs::read(s.join("model.safetensors")).unwrap();
    let n = w.len();
    w[n - 1] ^= 1;
    std::fs::write(s.join("model.safetensors"), w).unwrap();
    let target = tmp.path().join("again");
    let err = bake(&s, &target, &BakeOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the base model changed since conversion"),
        "{err}"
    );
    assert!(!target.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        leftovers
            .iter()
            .all(|n| !n.to_string_lossy().starts_with('.')),
        "no staging directory left: {leftovers:?}"
    );
}
