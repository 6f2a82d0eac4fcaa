//! `bake`: fold every gate into its projection (spec §4) and write a plain HF directory of
//! the base architecture, plus `so8t_heads.safetensors` with the heads and the SO8T config
//! in its metadata. Output sites (q, k, v): W' = R·W, b' = R·b. Input sites (o, mlp):
//! W' = W·R (for mlp, both gate_proj and up_proj). Fused projections (phi3) fold the same
//! way: `qkv_proj`'s three row blocks by the q, k, v rotations, `gate_up_proj` by the mlp
//! one. Products are computed in f64.

use super::adapter::{Adapter, So8tConfig, ADAPTER_FILE};
use crate::so8::verdict::Heads;
use crate::config::ModelConfig;
use crate::error::{Error, InFile, Result};
use crate::formats::safetensors::SafetensorsStore;
use crate::formats::WeightStore;
use crate::model::Site;
use crate::staging::StagingDir;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

pub const HEADS_FILE: &str = "so8t_heads.safetensors";
/// Metadata key in the heads file holding `so8t_config.json` as it was at bake time.
pub const CONFIG_KEY: &str = "so8t.config";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutDType {
    F32,
    F16,
    BF16,
}

impl OutDType {
    pub(crate) fn dtype(self) -> DType {
        match self {
            OutDType::F32 => DType::F32,
            OutDType::F16 => DType::F16,
            OutDType::BF16 => DType::BF16,
        }
    }

    fn torch_name(self) -> &'static str {
        match self {
            OutDType::F32 => "float32",
            OutDType::F16 => "float16",
            OutDType::BF16 => "bfloat16",
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct BakeOptions {
    /// Output dtype; default: the base's (bf16 for an FP8 base).
    pub dtype: Option<OutDType>,
    pub force: bool,
    /// Bake only these sites' gates (the others are left out: `export --format peft-oft`
    /// carries them in the adapter); all of them when `None`.
    pub sites: Option<Vec<Site>>,
}

/// Which gate acts on a base tensor, and from which side.
pub(crate) fn gate_of(name: &str) -> Option<(usize, Site, bool)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (site, output_side) = match rest {
        "self_attn.q_proj.weight" | "self_attn.q_proj.bias" => (Site::Q, true),
        "self_attn.k_proj.weight" | "self_attn.k_proj.bias" => (Site::K, true),
        "self_attn.v_proj.weight" | "self_attn.v_proj.bias" => (Site::V, true),
        "self_attn.o_proj.weight" => (Site::O, false),
        // gate_up_proj (phi3) is gate_proj and up_proj stacked: the same input.
        "mlp.gate_proj.weight" | "mlp.up_proj.weight" | "mlp.gate_up_proj.weight" => (Site::Mlp, false),
        _ => return None,
    };
    Some((layer, site, output_side))
}

/// The rotation folded into base tensor `name` (`[units, 8, 8]` f64) and whether it acts
/// on the output side: one site's, or, for a fused `qkv_proj` (phi3), the q, k and v
/// rotations stacked over its three row blocks (identity for a site without a gate).
pub(crate) fn rotation_of(
    name: &str,
    rotations: &HashMap<(usize, Site), Tensor>,
    cfg: &ModelConfig,
) -> Result<Option<(Tensor, bool)>> {
    if let Some((l, site, output_side)) = gate_of(name) {
        return Ok(rotations.get(&(l, site)).map(|r| (r.clone(), output_side)));
    }
    let Some(layer) = name
        .strip_prefix("model.layers.")
        .and_then(|r| r.strip_suffix(".self_attn.qkv_proj.weight"))
        .and_then(|l| l.parse::<usize>().ok())
    else {
        return Ok(None);
    };
    let blocks = [
        (Site::Q, cfg.num_heads * cfg.head_dim / 8),
        (Site::K, cfg.num_kv_heads * cfg.head_dim / 8),
        (Site::V, cfg.num_kv_heads * cfg.head_dim / 8),
    ];
    if blocks.iter().all(|(s, _)| !rotations.contains_key(&(layer, *s))) {
        return Ok(None);
    }
    let eye = Tensor::eye(8, DType::F64, &candle_core::Device::Cpu)?;
    let parts = blocks
        .iter()
        .map(|&(site, units)| match rotations.get(&(layer, site)) {
            Some(r) => Ok(r.clone()),
            None => eye.unsqueeze(0)?.repeat((units, 1, 1)),
        })
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    Ok(Some((Tensor::cat(&parts, 0)?, true)))
}

/// `r`: `[units, 8, 8]` f64. Output side: rows of `t` (or a bias) in 8-blocks; input side: columns.
pub(crate) fn fold(t: &Tensor, r: &Tensor, output_side: bool) -> candle_core::Result<Tensor> {
    let units = r.dim(0)?;
    let t = t.to_dtype(DType::F64)?;
    if output_side {
        let dims = t.dims().to_vec();
        let cols = t.elem_count() / (units * 8);
        r.matmul(&t.reshape((units, 8, cols))?)?.reshape(dims)
    } else {
        let (rows, cols) = t.dims2()?;
        let w = t.reshape((rows, units, 8))?.transpose(0, 1)?.contiguous()?;
        w.matmul(r)?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((rows, cols))
    }
}

/// A checkpoint's dtype: its projections' (norms are often kept in f32); bf16 for
/// anything else (FP8 blocks).
pub(crate) fn checkpoint_dtype(store: &SafetensorsStore, cfg: &ModelConfig) -> OutDType {
    let first_projection = cfg
        .hf_tensors()
        .into_iter()
        .find(|(n, _)| n.ends_with("_proj.weight"))
        .map(|(n, _)| n)
        .unwrap_or_default();
    match store.dtype(&first_projection) {
        Some(safetensors::Dtype::F32) => OutDType::F32,
        Some(safetensors::Dtype::F16) => OutDType::F16,
        _ => OutDType::BF16,
    }
}

pub fn bake(src: &Path, out: &Path, opts: &BakeOptions) -> Result<()> {
    let cfg = So8tConfig::read(src)?;
    cfg.check_base(src)?;
    let cfg_path = src.join("config.json");
    let cfg_text = crate::files::read_text(&cfg_path, crate::files::SETTINGS_LIMIT)?;
    let model_cfg = ModelConfig::from_hf_json(&cfg_text, &cfg_path)?;
    let adapter = Adapter::read(src)?;
    adapter.check_shapes(&model_cfg, &cfg, &src.join(ADAPTER_FILE))?;
    let mut raw: serde_json::Value = serde_json::from_str(&cfg_text).in_file(&cfg_path)?;
    let fp8 = raw["quantization_config"]["weight_block_size"]
        .as_array()
        .and_then(|b| Some((b.first()?.as_u64()? as usize, b.get(1)?.as_u64()? as usize)));
    let store = SafetensorsStore::open(src, fp8)?;
    let out_dtype = opts.dtype.unwrap_or_else(|| checkpoint_dtype(&store, &model_cfg));

    let mut rotations = adapter.fold_rotations(&model_cfg, &cfg)?;
    if let Some(only) = &opts.sites {
        rotations.retain(|(_, site), _| only.contains(site));
    }

    let staging = StagingDir::new(out, opts.force)?;
    let dir = staging.path();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in store.tensor_names() {
        if name.ends_with("_scale_inv") {
            continue; // FP8 scales are folded into the dequantised weights
        }
        let mut t = store.load_f32(&name)?;
        if let Some((r, output_side)) = rotation_of(&name, &rotations, &model_cfg)? {
            t = fold(&t, &r, output_side)?;
        }
        tensors.push((name, t.to_dtype(out_dtype.dtype())?));
    }
    let st = dir.join("model.safetensors");
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::formats::safetensors::write(&st, tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| e.at(out.join("model.safetensors")))?;
    drop(tensors);

    // config.json: the base's, in the output dtype and without FP8 quantisation.
    if let Some(o) = raw.as_object_mut() {
        o.remove("quantization_config");
        o.insert("torch_dtype".into(), out_dtype.torch_name().into());
        if o.contains_key("dtype") {
            o.insert("dtype".into(), out_dtype.torch_name().into());
        }
    }
    let out_cfg = dir.join("config.json");
    std::fs::write(&out_cfg, serde_json::to_string_pretty(&raw).unwrap())
        .map_err(|e| Error::io(&out_cfg, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let n = e.file_name().to_string_lossy().to_string();
        if e.path().is_file() && n != "config.json" && crate::formats::source::is_hf_model_file(&n, false) {
            std::fs::copy(e.path(), dir.join(&n)).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    write_heads(&adapter.heads, &cfg, &dir.join(HEADS_FILE))?;
    staging.commit()
}

fn write_heads(h: &Heads, cfg: &So8tConfig, path: &Path) -> Result<()> {
    let tensors = h.tensors();
    let meta = HashMap::from([(CONFIG_KEY.to_string(), serde_json::to_string(cfg).unwrap())]);
    crate::formats::safetensors::write(path, tensors, Some(meta))
}

/// Heads and the SO8T config of a baked directory.
/// The heads of a baked directory and their settings, checked against the model they
/// sit on (shapes, finite values, the layers they read).
pub fn read_heads(dir: &Path, model: &crate::config::ModelConfig) -> Result<(Heads, So8tConfig)> {
    let path = dir.join(HEADS_FILE);
    // Two rows of `hidden` floats each, and the config.
    let bytes = crate::files::read(&path, crate::files::SETTINGS_LIMIT)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
    let cfg_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(CONFIG_KEY))
        .ok_or_else(|| Error::format(&path, format!("metadata `{CONFIG_KEY}` missing")))?;
    let cfg: So8tConfig = crate::error::parse_json(cfg_json, &path)?;
    cfg.check(&path)?;
    let t =
        candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).in_file(&path)?;
    let heads = Heads::from_named(|n| {
        t.get(n)
            .cloned()
            .ok_or_else(|| Error::format(&path, format!("missing tensor `{n}`")))
    })?;
    heads.check(model.hidden_size, &path)?;
    cfg.heads.check(model.num_layers, &path)?;
    Ok((heads, cfg))
}
