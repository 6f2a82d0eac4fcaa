//! PEFT OFT adapters both ways, against PEFT itself (fixtures from
//! scripts/reference/peft_oft_fixtures.py, peft 0.21.2): an adapter PEFT trained imports as
//! SO8T gates that give PeftModel's logits, and the adapter `export --format peft-oft`
//! writes is the one PeftModel ran to give the SO8T model's logits. Tolerance 1e-4 on
//! logits, as for every transformers reference here: f32 forwards in another order, and
//! PEFT builds each rotation in f32 (`linalg.solve`) where SO8T takes a generator's exp.

use so8t::artifact::convert::{convert, ConvertOptions, Init};
use so8t::artifact::peft::{export_peft_oft, import_peft_oft};
use so8t::model::Site;
use so8t::Model;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// (ids, logits) PEFT recorded (`field`: `logits`, or `logits_f64` where PEFT also ran in f64).
fn peft_logits_of(name: &str, field: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("peft-oft").join(name)).unwrap()).unwrap();
    let ids = v["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    let logits = v[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    (ids, logits)
}

fn peft_logits(name: &str) -> (Vec<u32>, Vec<Vec<f32>>) {
    peft_logits_of(name, "logits")
}

fn worst_logit_gap(model: &Path, ids: &[u32], want: &[Vec<f32>]) -> f32 {
    let mut m = Model::open(model).unwrap();
    let got = m.decoder.forward_all(ids).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs())).fold(0.0, f32::max)
}

fn random_so8t(out: &Path) {
    let opts = ConvertOptions {
        sites: vec![Site::Q, Site::V, Site::O, Site::Mlp],
        init: Init::Random { seed: 21, scale: 0.2 },
        ..Default::default()
    };
    convert(&fixtures().join("tiny-qwen2"), out, &opts).unwrap();
}

#[test]
fn an_adapter_peft_trained_imports_as_gates_that_give_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("so8t");
    let cfg = import_peft_oft(&fixtures().join("peft-oft/import"), &fixtures().join("tiny-qwen2"), &out, false).unwrap();
    assert_eq!(cfg.sites, vec![Site::O, Site::Mlp]);
    let (ids, want) = peft_logits("import_logits.json");
    let gap = worst_logit_gap(&out, &ids, &want);
    assert!(gap <= 1e-4, "so8t on the imported gates vs PeftModel: {gap}");
    // The rotations matter: the base alone is far from PEFT's logits.
    let base_gap = worst_logit_gap(&fixtures().join("tiny-qwen2"), &ids, &want);
    assert!(base_gap > 1e-2, "the adapter changes nothing? {base_gap}");
    let failed: Vec<_> = so8t::artifact::validate::validate(&out).into_iter().filter(|c| !c.ok).map(|c| c.detail).collect();
    assert!(failed.is_empty(), "validate: {failed:?}");
}

#[test]
fn the_exported_adapter_is_what_peft_ran_and_imports_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (src, peft_dir) = (tmp.path().join("so8t"), tmp.path().join("peft"));
    random_so8t(&src);
    let (ids, want) = peft_logits("export_logits.json");
    let gap = worst_logit_gap(&src, &ids, &want);
    assert!(gap <= 1e-4, "so8t vs PeftModel on the exported adapter: {gap}");
    let (_, want64) = peft_logits_of("export_logits.json", "logits_f64");
    let gap64 = worst_logit_gap(&src, &ids, &want64);
    eprintln!("so8t (f32) vs PeftModel on the exported adapter: {gap:e} (PEFT in f32), {gap64:e} (PEFT in f64)");
    assert!(gap64 <= 1e-4, "so8t vs PeftModel in f64: {gap64}");
    // PEFT's merge_and_unload() of our adapter equals `so8t bake` (both f32 weights made
    // in higher precision or by one f32 product of rotation and weight: 1e-6).
    let baked = tmp.path().join("baked");
    so8t::artifact::bake::bake(&src, &baked, &Default::default()).unwrap();
    let baked = candle_core::safetensors::load(baked.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let merged = candle_core::safetensors::load(fixtures().join("peft-oft/merged.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(merged.len(), 3 * 2, "o, gate, up of both layers");
    // gate/up: the same weights. o_proj: PEFT's also holds the v gate, which `bake` folds
    // into v_proj's rows instead: PEFT's W_o' = bake's W_o · R_v(kv(h)) per head block.
    let model = so8t::config::ModelConfig::from_hf_file(&src.join("config.json")).unwrap();
    let cfg = so8t::artifact::adapter::So8tConfig::read(&src).unwrap();
    let rotations = so8t::artifact::adapter::Adapter::read(&src).unwrap().fold_rotations(&model, &cfg).unwrap();
    let (bph, group) = (model.head_dim / 8, model.num_heads / model.num_kv_heads);
    for (k, t) in &merged {
        let mut want = baked[k].to_vec2::<f32>().unwrap();
        if k.ends_with("o_proj.weight") {
            let l: usize = k.split('.').nth(2).unwrap().parse().unwrap();
            let rv = rotations[&(l, Site::V)].to_vec3::<f64>().unwrap();
            for row in want.iter_mut() {
                let orig = row.clone();
                for u in 0..model.num_heads * bph {
                    let r = &rv[(u / bph / group) * bph + u % bph];
                    for j in 0..8 {
                        row[u * 8 + j] = (0..8).map(|i| orig[u * 8 + i] as f64 * r[i][j]).sum::<f64>() as f32;
                    }
                }
            }
        }
        let got = t.to_vec2::<f32>().unwrap();
        let d = got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(d <= 1e-6, "{k}: PEFT merged vs so8t bake {d}");
    }
    let e = export_peft_oft(&src, &peft_dir, false).unwrap();
    assert_eq!(e.targets, ["gate_proj", "o_proj", "up_proj"]);
    assert_eq!(e.base, std::path::absolute(&peft_dir).unwrap().join("base"), "the q gates are baked into base/");
    // The same tensors as the adapter PEFT ran (written by this code at fixture time).
    let load = |d: &Path| candle_core::safetensors::load(d.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (ours, theirs) = (load(&peft_dir), load(&fixtures().join("peft-oft/export")));
    assert_eq!(ours.len(), theirs.len());
    for (k, t) in &theirs {
        let d = (t - &ours[k]).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-6, "{k}: {d}");
    }
    let cfg = |d: &Path| {
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("base_model_name_or_path");
        v
    };
    assert_eq!(cfg(&peft_dir), cfg(&fixtures().join("peft-oft/export")));
    // Back again: the adapter on its base/ imports to gates with the same logits.
    let back = tmp.path().join("back");
    import_peft_oft(&peft_dir, &e.base, &back, false).unwrap();
    let gap = worst_logit_gap(&back, &ids, &want);
    assert!(gap <= 1e-4, "round trip: {gap}");
}

#[test]
fn import_refuses_what_is_not_an_exact_block_rotation() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-qwen2");
    let case = |name: &str, edit: &dyn Fn(&Path)| -> String {
        let dir = tmp.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(fixtures().join("peft-oft/import").join(f), dir.join(f)).unwrap();
        }
        edit(&dir);
        let out = tmp.path().join(format!("{name}-out"));
        let err = import_peft_oft(&dir, &base, &out, false).unwrap_err().to_string();
        assert!(!out.exists(), "{name}: nothing written");
        err
    };
    let set = |key: &'static str, value: serde_json::Value| {
        move |dir: &Path| {
            let p = dir.join("adapter_config.json");
            let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            v[key] = value.clone();
            std::fs::write(&p, v.to_string()).unwrap();
        }
    };
    let err = case("neumann", &set("use_cayley_neumann", true.into()));
    assert!(err.contains("adapter_config.json") && err.contains("use_cayley_neumann"), "{err}");
    let err = case("shared", &set("block_share", true.into()));
    assert!(err.contains("block_share"), "{err}");
    let err = case("block16", &set("oft_block_size", 16.into()));
    assert!(err.contains("oft_block_size") && err.contains("expected 8"), "{err}");
    let edit_tensors = |f: &'static dyn Fn(&mut std::collections::HashMap<String, candle_core::Tensor>)| {
        move |dir: &Path| {
            let p = dir.join("adapter_model.safetensors");
            let mut t = candle_core::safetensors::load(&p, &candle_core::Device::Cpu).unwrap();
            f(&mut t);
            candle_core::safetensors::save(&t, &p).unwrap();
        }
    };
    let err = case(
        "gate-up",
        &edit_tensors(&|t| {
            let k = "base_model.model.model.layers.1.mlp.up_proj.oft_R.weight".to_string();
            t.insert(k.clone(), (&t[&k] * 0.5).unwrap());
        }),
    );
    assert!(err.contains("layer 1") && err.contains("different rotations"), "{err}");
    let err = case(
        "q-proj",
        &edit_tensors(&|t| {
            let o = t["base_model.model.model.layers.0.self_attn.o_proj.oft_R.weight"].clone();
            t.insert("base_model.model.model.layers.0.self_attn.q_proj.oft_R.weight".into(), o);
        }),
    );
    assert!(err.contains("q_proj") && err.contains("no SO8T gate"), "{err}");
    let err = case(
        "up-missing",
        &edit_tensors(&|t| {
            t.remove("base_model.model.model.layers.0.mlp.up_proj.oft_R.weight");
        }),
    );
    assert!(err.contains("layer 0") && err.contains("must both be rotated"), "{err}");
}
