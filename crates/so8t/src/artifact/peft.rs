//! PEFT's OFT adapters, both ways (`export --format peft-oft`, `convert --from-peft`).
//!
//! PEFT OFT (peft ≥ 0.18, `oft_block_size` 8, `use_cayley_neumann: false`, no
//! `block_share`, no `coft`) rotates a Linear's *input*: each 8-block of input features,
//! as a row vector, becomes `x·P` with `P = (I − Q)(I + Q)⁻¹` (`torch.linalg.solve(I + Q,
//! I − Q, left=False)`), `Q` skew-symmetric from the parameter `oft_R.weight` `[blocks,
//! 28]`: its strict upper triangle, row-major, `Q[j][i] = −Q[i][j]`. An SO8T input gate is
//! `y = W·(R x)` on column vectors, so `P = Rᵀ` block by block, and `Q` is the Cayley
//! transform of `Rᵀ` (the transform is its own inverse).
//!
//! What maps exactly: the `o` gate (o_proj's input), the `mlp` gate (the input of gate_proj
//! and up_proj, or phi3's gate_up_proj), and the `v` gate, which reaches o_proj's input
//! unchanged through attention (a weighted sum of the values of the head's KV group), so
//! o_proj's rotation for query head h is `R_o(h)·R_v(kv(h))`. The `q` and `k` gates pass
//! through q/k norms and RoPE and have no PEFT form: an export with them writes a `base/`
//! directory with them baked in, which the adapter then applies to.
//! On import, each block's rotation becomes a generator (its logarithm; through σ± for
//! the spinor families) of a `per_head` SO8T directory with sites `o` and `mlp`.

use super::adapter::{Adapter, So8tConfig, ADAPTER_FILE};
use super::bake::{bake, BakeOptions};
use super::convert::{convert, ConvertOptions, Init};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::Site;
use crate::so8::algebra::{cayley, logm, transpose, unskew, Mat8, N_GEN};
use crate::so8::gates::{Granularity, SiteShape};
use crate::so8::triality::family_generator;
use crate::staging::StagingDir;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

pub const PEFT_CONFIG_FILE: &str = "adapter_config.json";
pub const PEFT_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The PEFT release whose OFT this follows (its config reader warns on older files).
const PEFT_VERSION: &str = "0.21.2";

/// The modules of one layer an OFT adapter rotates, and the SO8T site each one is.
fn oft_modules(cfg: &ModelConfig) -> Vec<(&'static str, Site)> {
    let mlp: &[&'static str] = if cfg.arch.fused_projections() { &["mlp.gate_up_proj"] } else { &["mlp.gate_proj", "mlp.up_proj"] };
    std::iter::once(("self_attn.o_proj", Site::O)).chain(mlp.iter().map(|&m| (m, Site::Mlp))).collect()
}

fn weight_key(layer: usize, module: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{module}.oft_R.weight")
}

/// A gate's `[units, 8, 8]` f64 rotations as matrices.
fn mat8s(t: &Tensor) -> Result<Vec<Mat8>> {
    Ok(t.to_vec3::<f64>()?
        .into_iter()
        .map(|m| std::array::from_fn(|i| std::array::from_fn(|j| m[i][j])))
        .collect())
}

/// PEFT's OFT parameters `[blocks, 28]` for input rotations `r` (column convention):
/// each block's Cayley parameter of `Rᵀ`, packed as PEFT packs its skew matrices (the strict
/// upper triangle, row-major: SO8T's generator packing).
fn oft_parameters(r: &[Mat8], layer: usize, what: &str) -> Result<Tensor> {
    let mut packed = Vec::with_capacity(r.len() * N_GEN);
    for (u, r) in r.iter().enumerate() {
        let q = cayley(&transpose(r)).ok_or_else(|| {
            Error::Invalid(format!(
                "layer {layer} {what} block {u}: the rotation turns a plane by π, which has no Cayley parameter (PEFT OFT cannot hold it)"
            ))
        })?;
        packed.extend(unskew(&q).iter().map(|&v| v as f32));
    }
    Ok(Tensor::from_vec(packed, (r.len(), N_GEN), &Device::Cpu)?)
}

/// What `export_peft_oft` wrote.
pub struct PeftExport {
    /// The modules the adapter rotates (`target_modules`).
    pub targets: Vec<String>,
    /// The directory the adapter applies to: `OUT/base` when the q/k gates were baked
    /// there, else the SO8T directory itself (its base files are untouched).
    pub base: PathBuf,
}

/// Writes `out/` (`adapter_config.json`, `adapter_model.safetensors`, and `base/` when
/// the model has q or k gates) from the SO8T directory `src`.
pub fn export_peft_oft(src: &Path, out: &Path, force: bool) -> Result<PeftExport> {
    let cfg = So8tConfig::read(src)?;
    cfg.check_base(src)?;
    let model = ModelConfig::from_hf_file(&src.join("config.json"))?;
    let adapter = Adapter::read(src)?;
    adapter.check_shapes(&model, &cfg, &src.join(ADAPTER_FILE))?;
    let rotations = adapter.fold_rotations(&model, &cfg)?;
    let staging = StagingDir::new(out, force)?;
    let dir = staging.path();
    let qk: Vec<Site> = [Site::Q, Site::K].into_iter().filter(|s| cfg.sites.contains(s)).collect();
    let absolute = |p: &Path| std::path::absolute(p).map_err(|e| Error::io(p, e));
    let base = if qk.is_empty() {
        absolute(src)?
    } else {
        bake(src, &dir.join("base"), &BakeOptions { sites: Some(qk), ..Default::default() })?;
        absolute(out)?.join("base")
    };
    let bph = model.head_dim / 8;
    let group = model.num_heads / model.num_kv_heads;
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut targets = Vec::new();
    for l in 0..model.num_layers {
        let site = |s: Site| rotations.get(&(l, s)).map(mat8s).transpose();
        let (o, v, mlp) = (site(Site::O)?, site(Site::V)?, site(Site::Mlp)?);
        // o_proj's input rotation for query head h: R_o(h)·R_v(kv(h)), block by block.
        let attn: Option<Vec<Mat8>> = (o.is_some() || v.is_some()).then(|| {
            (0..model.num_heads * bph)
                .map(|u| {
                    let ro = o.as_ref().map(|o| o[u]);
                    let rv = v.as_ref().map(|v| v[(u / bph / group) * bph + u % bph]);
                    match (ro, rv) {
                        (Some(a), Some(b)) => crate::so8::algebra::matmul(&a, &b),
                        (Some(a), None) | (None, Some(a)) => a,
                        (None, None) => unreachable!("one of the two is present"),
                    }
                })
                .collect()
        });
        let packed = |r: &Option<Vec<Mat8>>, what: &str| r.as_deref().map(|r| oft_parameters(r, l, what)).transpose();
        let (attn, mlp) = (packed(&attn, "o_proj input")?, packed(&mlp, "mlp input")?);
        for (module, site) in oft_modules(&model) {
            let Some(t) = (if site == Site::Mlp { &mlp } else { &attn }) else { continue };
            tensors.insert(weight_key(l, module), t.clone());
            let name = module.rsplit('.').next().unwrap_or(module).to_string();
            if !targets.contains(&name) {
                targets.push(name);
            }
        }
    }
    if tensors.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: the model has no o, v or mlp gate, so a PEFT OFT adapter would hold nothing (its q/k gates are baked by `so8t bake`)",
            src.display()
        )));
    }
    targets.sort();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::formats::safetensors::write(&dir.join(PEFT_WEIGHTS_FILE), tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))?;
    let config = serde_json::json!({
        "auto_mapping": null,
        "base_model_name_or_path": base.display().to_string(),
        "bias": "none",
        "block_share": false,
        "coft": false,
        "eps": 6e-5,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "module_dropout": 0.0,
        "modules_to_save": null,
        "num_cayley_neumann_terms": 5,
        "oft_block_size": 8,
        "peft_type": "OFT",
        "peft_version": PEFT_VERSION,
        "r": 0,
        "revision": null,
        "target_modules": targets,
        "task_type": "CAUSAL_LM",
        "use_cayley_neumann": false,
    });
    let cfg_path = dir.join(PEFT_CONFIG_FILE);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| Error::io(&cfg_path, e))?;
    staging.commit()?;
    Ok(PeftExport { targets, base })
}

/// Reads PEFT's `adapter_config.json` and refuses what is not an exact block rotation.
fn check_peft_config(dir: &Path) -> Result<()> {
    let path = dir.join(PEFT_CONFIG_FILE);
    let text = crate::files::read_text(&path, crate::files::SETTINGS_LIMIT)?;
    let v: serde_json::Value = crate::error::parse_json(&text, &path)?;
    let field = |k: &str| v.get(k).cloned().unwrap_or(serde_json::Value::Null);
    if field("peft_type") != "OFT" {
        return Err(Error::format(&path, format!("`peft_type` is {}, expected \"OFT\"", field("peft_type"))));
    }
    // peft's own default is true (a truncated series, not a rotation).
    if field("use_cayley_neumann") != false {
        return Err(Error::format(
            &path,
            "`use_cayley_neumann` is not false: the Neumann series only approximates a rotation, which SO(8) generators cannot hold exactly (train with use_cayley_neumann=False)",
        ));
    }
    for (k, what) in [("block_share", "one rotation shared by all blocks"), ("coft", "constrained OFT rescales the parameters at every forward")] {
        if field(k) == true {
            return Err(Error::format(&path, format!("`{k}` is true ({what}): not supported, SO8T gates are one exact rotation per block")));
        }
    }
    match field("oft_block_size").as_u64() {
        Some(8) => Ok(()),
        Some(0) | None if field("r").as_u64().is_some_and(|r| r > 0) => Ok(()), // checked per tensor
        other => Err(Error::format(&path, format!("`oft_block_size` is {other:?}, expected 8 (SO(8) blocks)"))),
    }
}

/// `convert --from-peft`: the SO8T directory `out` of `base` whose `o` and `mlp` gates are
/// the OFT rotations of the PEFT adapter in `peft_dir` (per-head generators; heads
/// untrained).
pub fn import_peft_oft(peft_dir: &Path, base: &Path, out: &Path, force: bool) -> Result<So8tConfig> {
    check_peft_config(peft_dir)?;
    let wpath = peft_dir.join(PEFT_WEIGHTS_FILE);
    // 28 floats per 8 input features of the rotated modules: a few MiB for a 4B model,
    // ~40 MiB for a 70B one.
    let bytes = crate::files::read(&wpath, crate::files::SETTINGS_LIMIT)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::format(&wpath, format!("not a valid safetensors file: {}", crate::error::candle_message(&e))))?;
    let staging = StagingDir::new(out, force)?;
    let opts = ConvertOptions {
        sites: vec![Site::O, Site::Mlp],
        granularity: Granularity::PerHead,
        factors: vec!["safe".into(), "cmd".into()],
        init: Init::Zero,
        force: true,
    };
    convert(base, staging.path(), &opts)?;
    let dir = staging.path();
    let model = ModelConfig::from_hf_file(&dir.join("config.json"))?;
    let cfg = So8tConfig::read(dir)?;
    let mut adapter = Adapter::read(dir)?;
    let modules = oft_modules(&model);
    // Every tensor must be one this reader maps; an unknown one would be dropped silently.
    for name in tensors.keys() {
        let known = (0..model.num_layers).any(|l| modules.iter().any(|(m, _)| &weight_key(l, m) == name));
        if !known {
            return Err(Error::format(
                &wpath,
                format!("tensor `{name}`: OFT on this module has no SO8T gate (SO8T maps o_proj's input and the MLP's input: {})", modules.iter().map(|(m, _)| *m).collect::<Vec<_>>().join(", ")),
            ));
        }
    }
    for l in 0..model.num_layers {
        let mlp_keys: Vec<String> = modules.iter().filter(|(_, s)| *s == Site::Mlp).map(|(m, _)| weight_key(l, m)).collect();
        let present = mlp_keys.iter().filter(|k| tensors.contains_key(*k)).count();
        if present != 0 && present != mlp_keys.len() {
            return Err(Error::format(
                &wpath,
                format!("layer {l}: {present} of {} rotated; gate_proj and up_proj must both be rotated, alike (SO8T's mlp gate rotates their shared input)", mlp_keys.join(" and ")),
            ));
        }
        let mut mlp: Option<(&str, Tensor)> = None;
        for (module, site) in &modules {
            let key = weight_key(l, module);
            let Some(t) = tensors.get(&key) else {
                continue;
            };
            let units = SiteShape::of(&model, *site)?.units();
            if t.dims() != [units, N_GEN] {
                let blocks = t.dims().first().copied().unwrap_or(0).max(1);
                return Err(Error::format(
                    &wpath,
                    format!("`{key}` has shape {:?}, expected [{units}, {N_GEN}]: 8-blocks of the module's input (this adapter's blocks: {} features each)", t.dims(), (units * 8) / blocks),
                ));
            }
            let t = t.to_dtype(DType::F64)?;
            if *site == Site::Mlp {
                if let Some((first, prev)) = &mlp {
                    let diff = (prev - &t)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
                    // NaN in one of them is a difference too.
                    if diff != 0.0 {
                        return Err(Error::format(
                            &wpath,
                            format!("layer {l}: {first} and {module} have different rotations (max difference {diff:e}); SO8T's mlp gate is one rotation of their shared input"),
                        ));
                    }
                    continue;
                }
                mlp = Some((module, t.clone()));
            }
            let gens = generators(&t, &model, *site).map_err(|e| Error::format(&wpath, format!("`{key}`: {e}")))?;
            adapter.generators.insert(super::adapter::generator_name(l, *site, "safe"), gens);
        }
    }
    if tensors.is_empty() {
        return Err(Error::format(&wpath, "holds no OFT rotation"));
    }
    adapter.check_shapes(&model, &cfg, &dir.join(ADAPTER_FILE))?;
    adapter.write(&dir.join(ADAPTER_FILE))?;
    staging.commit()?;
    Ok(cfg)
}

/// Per-head generators `[units, 28]` f32 for OFT parameters `q` `[units, 28]` (f64): unit
/// u's rotation is `Rᵀ` of PEFT's block, its generator `log R` taken back through the
/// unit's family map (σ± are involutions).
fn generators(q: &Tensor, model: &ModelConfig, site: Site) -> std::result::Result<Tensor, String> {
    let shape = SiteShape::of(model, site).map_err(|e| e.to_string())?;
    let rows = q.to_vec2::<f64>().map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(rows.len() * N_GEN);
    for (u, row) in rows.iter().enumerate() {
        if row.iter().any(|v| !v.is_finite()) {
            return Err(format!("block {u} is not finite"));
        }
        let skew = crate::so8::algebra::skew(row);
        let p = cayley(&skew).ok_or_else(|| format!("block {u}: I + Q is singular"))?;
        let a = logm(&transpose(&p)).ok_or_else(|| format!("block {u}: the rotation turns a plane by π (no unique generator)"))?;
        let (_, family) = shape.unit(site, Granularity::PerHead, u);
        let g = family_generator(family, &unskew(&a));
        out.extend(g.iter().map(|&v| v as f32));
    }
    Tensor::from_vec(out, (rows.len(), N_GEN), &Device::Cpu).map_err(|e| e.to_string())
}
