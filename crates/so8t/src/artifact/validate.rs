//! `validate`: the checks an SO8T directory must pass, each named, so that a failure says
//! which one.

use super::adapter::{base_checksum, generator_name, is_so8t_dir, Adapter, So8tConfig, ADAPTER_FILE};
use crate::so8::algebra::{det, expm, matvec, orthogonality_error, skew, Mat8, N_GEN};
use crate::so8::triality::{family_generator, mul, Family};
use crate::load::Model;
use std::path::Path;

/// Spec §2: ‖RᵀR − I‖∞ ≤ 1e-6 for f32 rotations; det within 1e-5 of 1.
pub const ORTHOGONALITY_TOL: f64 = 1e-6;
pub const DET_TOL: f64 = 1e-5;
/// The group identity in f64 on the model's own generators (spec §3 sees 1e-13).
pub const TRIALITY_TOL: f64 = 1e-9;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

fn check(name: &'static str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name,
        ok,
        detail: detail.into(),
    }
}

pub fn validate(path: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let base = Model::open_base(path);
    match &base {
        Ok(m) => out.push(check(
            "base_loads",
            true,
            format!(
                "{} {} layers, tensor shapes match config.json",
                m.config.arch.name(),
                m.config.num_layers
            ),
        )),
        Err(e) => {
            out.push(check("base_loads", false, e.to_string()));
            return out;
        }
    }
    match non_finite_weights(path) {
        Ok(bad) if bad.is_empty() => out.push(check("base_finite", true, "no NaN or Inf in the weights")),
        Ok(bad) => {
            out.push(check(
                "base_finite",
                false,
                format!("NaN or Inf in {}", bad.join(", ")),
            ));
            return out;
        }
        Err(e) => {
            out.push(check("base_finite", false, e.to_string()));
            return out;
        }
    }
    let model_cfg = base.as_ref().unwrap().config.clone();
    if !is_so8t_dir(path) {
        if path.is_file() {
            let heads = crate::formats::gguf::GgufFile::open(path)
                .and_then(|g| super::export::read_gguf_heads(&g, &model_cfg));
            match heads {
                Ok(Some((_, c))) => out.push(check(
                    "baked_heads",
                    true,
                    format!(
                        "GGUF with SO8T heads ({}) in so8t.* metadata; sites {:?} baked",
                        if c.heads_trained {
                            "trained"
                        } else {
                            "untrained"
                        },
                        c.sites
                    ),
                )),
                Ok(None) => out.push(check(
                    "so8t",
                    true,
                    "no so8t.* metadata: a plain GGUF, nothing SO8T to check",
                )),
                Err(e) => out.push(check("baked_heads", false, e.to_string())),
            }
        } else if path.is_dir() && path.join(super::bake::HEADS_FILE).exists() {
            match super::bake::read_heads(path, &model_cfg) {
                Ok((_, c)) => out.push(check(
                    "baked_heads",
                    true,
                    format!(
                        "baked SO8T model: heads {}; gates of sites {:?} folded into the weights",
                        if c.heads_trained {
                            "trained"
                        } else {
                            "untrained"
                        },
                        c.sites
                    ),
                )),
                Err(e) => out.push(check("baked_heads", false, e.to_string())),
            }
        } else {
            out.push(check(
                "so8t",
                true,
                "no so8t_config.json: a plain model, nothing SO8T to check",
            ));
        }
        return out;
    }
    let cfg = match So8tConfig::read(path) {
        Ok(c) => c,
        Err(e) => {
            out.push(check("so8t_config", false, e.to_string()));
            return out;
        }
    };
    out.push(check(
        "so8t_config",
        true,
        format!(
            "sites {:?}, {:?}, factors {:?}",
            cfg.sites, cfg.granularity, cfg.factors
        ),
    ));
    match base_checksum(path) {
        Ok(sum) if sum == cfg.base.sha256 => out.push(check("base_checksum", true, sum)),
        Ok(sum) => out.push(check(
            "base_checksum",
            false,
            format!(
                "base files hash to {sum}, so8t_config.json records {} (the base changed)",
                cfg.base.sha256
            ),
        )),
        Err(e) => out.push(check("base_checksum", false, e.to_string())),
    }
    let adapter = match Adapter::read(path) {
        Ok(a) => a,
        Err(e) => {
            out.push(check("adapter_shapes", false, e.to_string()));
            return out;
        }
    };
    match adapter.check_shapes(&model_cfg, &cfg, &path.join(ADAPTER_FILE)) {
        Ok(()) => out.push(check(
            "adapter_shapes",
            true,
            format!(
                "{} generator tensors and 2 heads match the base config, all finite and in range",
                adapter.generators.len()
            ),
        )),
        Err(e) => {
            out.push(check("adapter_shapes", false, e.to_string()));
            return out;
        }
    }
    // Rotations as the runtime applies them (f32), per site, factors composed.
    let (mut worst_orth, mut worst_det, mut where_orth, mut where_det) =
        (0f64, 0f64, String::new(), String::new());
    let mut triality_worst = 0f64;
    for l in 0..model_cfg.num_layers {
        for &site in &cfg.sites {
            let r = match adapter
                .rotation(&model_cfg, &cfg, l, site)
                .and_then(|r| Ok(r.matrices()?.to_vec3::<f32>()?))
            {
                Ok(r) => r,
                Err(e) => {
                    out.push(check(
                        "orthogonality",
                        false,
                        format!("layer {l} {}: {e}", site.name()),
                    ));
                    return out;
                }
            };
            for (u, m) in r.iter().enumerate() {
                let m: Mat8 = std::array::from_fn(|i| std::array::from_fn(|j| m[i][j] as f64));
                // NaN compares false: count it as the worst error, not as none.
                let worst = |x: f64| if x.is_nan() { f64::INFINITY } else { x };
                let (e, d) = (worst(orthogonality_error(&m)), worst((det(&m) - 1.0).abs()));
                if e > worst_orth {
                    worst_orth = e;
                    where_orth = format!("layer {l} site {} unit {u}", site.name());
                }
                if d > worst_det {
                    worst_det = d;
                    where_det = format!("layer {l} site {} unit {u}", site.name());
                }
            }
            for f in &cfg.factors {
                let g = adapter.generators[&generator_name(l, site, f)]
                    .to_vec2::<f32>()
                    .unwrap_or_default();
                for row in &g {
                    let row: Vec<f64> = row.iter().map(|&x| x as f64).collect();
                    let r = triality_residual(&row);
                    triality_worst = if r.is_nan() { f64::INFINITY } else { triality_worst.max(r) };
                }
            }
        }
    }
    out.push(check(
        "orthogonality",
        worst_orth <= ORTHOGONALITY_TOL,
        format!(
            "max ‖RᵀR − I‖∞ = {worst_orth:.2e} (limit {ORTHOGONALITY_TOL:e}){}",
            if where_orth.is_empty() {
                String::new()
            } else {
                format!(" at {where_orth}")
            }
        ),
    ));
    out.push(check(
        "determinant",
        worst_det <= DET_TOL,
        format!(
            "max |det R − 1| = {worst_det:.2e} (limit {DET_TOL:e}){}",
            if where_det.is_empty() {
                String::new()
            } else {
                format!(" at {where_det}")
            }
        ),
    ));
    out.push(check("triality", triality_worst <= TRIALITY_TOL, format!("max |ρ_v(xy) − (ρ₊x)(ρ₋y)| = {triality_worst:.2e} over basis pairs (limit {TRIALITY_TOL:e})")));
    let n = model_cfg.num_layers;
    out.push(match cfg.heads.check(n, &path.join(super::adapter::CONFIG_FILE)) {
        Ok(()) => {
            let [s, a] = cfg.heads.layers(n);
            check(
                "heads",
                true,
                format!(
                    "{}; read layers {s} (safety) and {a} (authority) of {n}, prompts at {}, answers flagged after {} consecutive tokens",
                    if cfg.heads_trained {
                        "trained"
                    } else {
                        "untrained (zero weights: p = 0.5)"
                    },
                    cfg.verdict_position.name(),
                    cfg.thresholds.consecutive
                ),
            )
        }
        Err(e) => check("heads", false, e.to_string()),
    });
    out
}

/// max over basis pairs of |ρ_v(e_i e_j) − (ρ₊e_i)(ρ₋e_j)| for one generator, in f64.
pub fn triality_residual(g: &[f64]) -> f64 {
    debug_assert_eq!(g.len(), N_GEN);
    let v = expm(&skew(g));
    let p = expm(&skew(&family_generator(Family::SpinorPlus, g)));
    let m = expm(&skew(&family_generator(Family::SpinorMinus, g)));
    let mut worst: f64 = 0.0;
    for i in 0..8 {
        for j in 0..8 {
            let (mut x, mut y) = ([0.0; 8], [0.0; 8]);
            x[i] = 1.0;
            y[j] = 1.0;
            let lhs = matvec(&v, &mul(&x, &y));
            let rhs = mul(&matvec(&p, &x), &matvec(&m, &y));
            for k in 0..8 {
                worst = worst.max((lhs[k] - rhs[k]).abs());
            }
        }
    }
    worst
}

/// Every weight of the base model at `path` (GGUF or HF safetensors, quantised blocks
/// dequantised) that holds a NaN or an Inf, as `FILE: tensor `NAME``. Loading does not
/// scan the weights (a cost at every start, as llama.cpp decides too, unless
/// `--check-tensors`); `validate` is where a damaged file is found.
fn non_finite_weights(path: &Path) -> crate::error::Result<Vec<String>> {
    let mut bad = Vec::new();
    let mut scan = |file: &Path, name: &str, values: Vec<f32>| {
        if values.iter().any(|x| !x.is_finite()) {
            bad.push(format!("{}: tensor `{name}`", file.display()));
        }
    };
    match crate::formats::source::open_source(path)? {
        crate::formats::source::Source::Gguf(g) => {
            for name in g.tensor_names() {
                let t = g.qtensor(&name)?.dequantize(&candle_core::Device::Cpu)?;
                scan(path, &name, t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
        crate::formats::source::Source::Hf { dir, fp8_block, .. } => {
            let store = crate::formats::safetensors::SafetensorsStore::open(&dir, fp8_block)?;
            for name in store.names() {
                // Integer buffers (a checkpoint may carry some the decoder never reads)
                // have no NaN to find.
                use safetensors::Dtype::*;
                if !matches!(store.dtype(&name), Some(F64 | F32 | F16 | BF16 | F8_E4M3 | F8_E5M2)) {
                    continue;
                }
                let t = store.load_f32(&name)?;
                let file = store.file_holding(&name).unwrap_or(path).to_path_buf();
                scan(&file, &name, t.flatten_all()?.to_vec1::<f32>()?);
            }
        }
    }
    Ok(bad)
}
