//! `export`: any model path → a GGUF v3 file that llama.cpp loads as it is. An SO8T
//! directory is baked on the fly (each projection folded as it is read); the heads and the
//! SO8T config travel as `so8t.*` metadata (spec §7), which llama.cpp ignores.

use super::adapter::{Adapter, So8tConfig};
use crate::so8::verdict::Heads;
use super::bake::read_heads;
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::formats::gguf::{gguf_key, gguf_name, GgufFile, GgufStore};
use crate::formats::gguf_write::{encode, write, Meta, PlannedTensor};
use crate::formats::safetensors::SafetensorsStore;
use crate::formats::WeightStore;
use crate::formats::source::{open_source, Source};
use crate::model::Site;
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The `--quant` types. A plain type puts every tensor of two or more dimensions in that
/// type (1-D tensors stay f32), as llama.cpp's converter does for its `--outtype`; the
/// mixes choose per tensor as `llama-quantize` does.
pub const QUANT_TYPES: [&str; 16] = [
    "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k",
    "q6_k", "q4_k_m", "q5_k_m", "q4_k_s",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quant {
    Plain(GgmlDType),
    Q4KM,
    Q5KM,
    Q4KS,
}

pub fn parse_quant(s: &str) -> Result<Quant> {
    Ok(match s {
        "q4_k_m" => Quant::Q4KM,
        "q5_k_m" => Quant::Q5KM,
        "q4_k_s" => Quant::Q4KS,
        _ => Quant::Plain(parse_plain(s)?),
    })
}

fn parse_plain(s: &str) -> Result<GgmlDType> {
    Ok(match s {
        "f32" => GgmlDType::F32,
        "f16" => GgmlDType::F16,
        "bf16" => GgmlDType::BF16,
        "q8_0" => GgmlDType::Q8_0,
        "q4_0" => GgmlDType::Q4_0,
        "q4_1" => GgmlDType::Q4_1,
        "q5_0" => GgmlDType::Q5_0,
        "q5_1" => GgmlDType::Q5_1,
        "q2_k" => GgmlDType::Q2K,
        "q3_k" => GgmlDType::Q3K,
        "q4_k" => GgmlDType::Q4K,
        "q5_k" => GgmlDType::Q5K,
        "q6_k" => GgmlDType::Q6K,
        "iq1_s" | "iq1_m" | "iq2_xxs" | "iq2_xs" | "iq2_s" | "iq2_m" | "q2_k_s" => {
            return Err(Error::Invalid(format!(
                "quant type `{s}` needs an importance matrix (llama-quantize --imatrix), which so8t export does not compute"
            )))
        }
        _ => return Err(Error::Invalid(format!("unknown quant type `{s}` (expected one of {})", QUANT_TYPES.join(", ")))),
    })
}

/// llama.cpp's `llama_ftype`.
fn file_type(q: Quant) -> u32 {
    let t = match q {
        Quant::Q4KM => return 15,
        Quant::Q5KM => return 17,
        Quant::Q4KS => return 14,
        Quant::Plain(t) => t,
    };
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q5_0 => 8,
        GgmlDType::Q5_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        GgmlDType::Q6K => 18,
        GgmlDType::BF16 => 32,
        _ => 0,
    }
}

/// llama-quantize's `use_more_bits`: the first and last eighth of the layers and every
/// third layer between get more bits in the mixes.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The type of one tensor: llama-quantize's `llama_tensor_get_type` for the mixes
/// (without experts or an importance matrix), then its block-size fallback.
fn tensor_type(q: Quant, gguf: &str, dims: &[usize], n_layers: usize, tied: bool) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let cols = dims[1];
    let base = match q {
        Quant::Plain(t) => return fit(t, cols),
        Quant::Q4KM | Quant::Q4KS => GgmlDType::Q4K,
        Quant::Q5KM => GgmlDType::Q5K,
    };
    let layer = gguf
        .strip_prefix("blk.")
        .and_then(|r| r.split('.').next())
        .and_then(|l| l.parse::<usize>().ok());
    let t = if gguf == "output.weight" || (tied && gguf == "token_embd.weight") {
        if cols % 256 != 0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::Q6K
        }
    } else if gguf.ends_with(".attn_v.weight") {
        let l = layer.unwrap_or(0);
        match q {
            Quant::Q4KM | Quant::Q5KM if use_more_bits(l, n_layers) => GgmlDType::Q6K,
            Quant::Q4KS if l < 4 => GgmlDType::Q5K,
            _ => base,
        }
    } else if gguf.ends_with(".attn_qkv.weight") {
        // llama-quant.cpp's rule for fused attention (its ATTENTION_QKV category).
        match q {
            Quant::Q4KM => GgmlDType::Q5K,
            Quant::Q5KM => GgmlDType::Q6K,
            _ => base,
        }
    } else if gguf.ends_with(".ffn_down.weight") {
        let l = layer.unwrap_or(0);
        match q {
            Quant::Q4KM | Quant::Q5KM if use_more_bits(l, n_layers) => GgmlDType::Q6K,
            Quant::Q4KS if l < n_layers / 8 => GgmlDType::Q5K,
            _ => base,
        }
    } else {
        base
    };
    fit(t, cols)
}

/// llama.cpp's fallback when a row is not a whole number of blocks (llama-quant.cpp).
fn fit(t: GgmlDType, cols: usize) -> GgmlDType {
    if cols % t.block_size() == 0 {
        return t;
    }
    let f = match t {
        GgmlDType::Q2K | GgmlDType::Q3K => GgmlDType::Q4_0,
        GgmlDType::Q4K => GgmlDType::Q5_0,
        GgmlDType::Q5K => GgmlDType::Q5_1,
        GgmlDType::Q6K => GgmlDType::Q8_0,
        _ => GgmlDType::F16,
    };
    if cols % f.block_size() == 0 {
        f
    } else {
        GgmlDType::F16
    }
}

struct Input {
    config: ModelConfig,
    store: Box<dyn WeightStore>,
    rotations: HashMap<(usize, Site), Tensor>,
    heads: Option<(Heads, So8tConfig)>,
    tokenizer: Vec<(String, Meta)>,
    /// Whether the vocabulary drops whitespace after its special tokens (Phi-3's
    /// tokenizer.json, or a GGUF llama.cpp reads as Phi-3).
    strips_after_specials: bool,
}

pub struct ExportReport {
    pub tensors: usize,
    pub bytes: u64,
    pub sha256: String,
    /// A vision model's projector file written beside it: its path, tensors and bytes.
    pub mmproj: Option<(std::path::PathBuf, usize, u64)>,
}

pub fn export(
    src: &Path,
    out: &Path,
    quant: Quant,
    progress: impl FnMut(usize, usize, u64),
) -> Result<ExportReport> {
    export_with_thresholds(src, out, quant, None, progress)
}

/// [`export`], the SO8T thresholds in the file replaced by `thresholds` when given (an
/// export calibrated to decide as its source: `eval::calibrate`).
pub fn export_with_thresholds(
    src: &Path,
    out: &Path,
    quant: Quant,
    thresholds: Option<&crate::so8::verdict::Thresholds>,
    mut progress: impl FnMut(usize, usize, u64),
) -> Result<ExportReport> {
    let mut input = open_input(src)?;
    if let (Some(t), Some((_, c))) = (thresholds, input.heads.as_mut()) {
        c.thresholds = t.clone();
    }
    let cfg = &input.config;
    // A vision model's projector is written from the HF checkpoint beside the text file.
    let vision = cfg.arch == Arch::Qwen2Vl;
    if vision && !src.is_dir() {
        return Err(Error::format(
            src,
            "exporting a qwen2vl GGUF again would leave its vision tower behind; export the HF or SO8T directory",
        ));
    }
    let mut planned: Vec<PlannedTensor> = Vec::new();
    let mut sources: Vec<Option<String>> = Vec::new();
    let rope = rope_factors(cfg);
    for (name, f) in &rope {
        planned.push(PlannedTensor {
            name: name.to_string(),
            dims: vec![f.len()],
            dtype: GgmlDType::F32,
        });
        sources.push(None);
    }
    for (name, dims) in cfg.hf_tensors() {
        let g =
            gguf_name(&name).ok_or_else(|| Error::Invalid(format!("no GGUF name for `{name}`")))?;
        let dtype = tensor_type(quant, &g, &dims, cfg.num_layers, cfg.tie_word_embeddings);
        planned.push(PlannedTensor {
            name: g,
            dims,
            dtype,
        });
        sources.push(Some(name));
    }
    // The model's name, as llama.cpp's converter takes it: a directory's whole name (the
    // stem of `qwen2.5-0.5b` would be `qwen2`), a file's name without its extension.
    let name_part = if src.is_dir() { src.file_name() } else { src.file_stem() };
    let mut name = name_part.map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    // llama.cpp right-strips after special tokens, as Phi-3's tokenizer.json asks, only in
    // files whose general.name says Phi-3 (llama-vocab.cpp); under any other name its
    // prompts would keep the newlines transformers drops.
    if input.strips_after_specials && !crate::tokenizer::llama_cpp_reads_as_phi3(&name) {
        name = format!("{name} (phi3)");
    }
    let mut meta = model_metadata(cfg, quant, &name);
    meta.extend(std::mem::take(&mut input.tokenizer));
    if let Some((h, c)) = &input.heads {
        meta.extend(so8t_metadata(h, c, cfg.num_layers)?);
    }
    let total = planned.len();
    let mut bytes = 0u64;
    let mut write_text = || {
        write(
            out,
            &meta,
            &planned,
            |i| {
                let data = match &sources[i] {
                    None => rope[i].1.clone(),
                    Some(name) => prepare(&input, name, &planned[i].dims)?,
                };
                encode(&data, &planned[i].dims, planned[i].dtype)
            },
            |i, b| {
                bytes += b;
                progress(i + 1, total, bytes)
            },
        )
    };
    // A vision model's two files appear together: the projector is written first (every
    // fault of the vision side shows before the text file is begun) under a temporary
    // name, renamed into place only after the text file is.
    let (sha256, mmproj) = if vision {
        let path = super::mmproj::mmproj_path(out);
        let text_type = match quant {
            Quant::Plain(t) => t,
            _ => GgmlDType::F16,
        };
        let ty = super::mmproj::projector_type(text_type);
        let (sha256, n, b) = crate::staging::write_file(&path, |tmp| {
            let (n, b, _) = super::mmproj::write_mmproj(src, input.store.as_ref(), tmp, ty, &name)?;
            Ok((write_text()?, n, b))
        })?;
        (sha256, Some((path, n, b)))
    } else {
        (write_text()?, None)
    };
    Ok(ExportReport {
        tensors: total,
        bytes,
        sha256,
        mmproj,
    })
}


/// A tensor as row-major f32 in the GGUF's layout: gates folded, llama q/k rows permuted.
fn prepare(input: &Input, name: &str, dims: &[usize]) -> Result<Vec<f32>> {
    let cfg = &input.config;
    let rotation = super::bake::rotation_of(name, &input.rotations, cfg)?;
    let permute_heads = match cfg.arch {
        Arch::Llama if name.ends_with("self_attn.q_proj.weight") => Some(cfg.num_heads),
        Arch::Llama if name.ends_with("self_attn.k_proj.weight") => Some(cfg.num_kv_heads),
        _ => None,
    };
    if rotation.is_none() && permute_heads.is_none() {
        return input.store.dense_f32(name, dims);
    }
    let mut t = input.store.dense(name, dims)?;
    if let Some((r, output_side)) = rotation {
        t = super::bake::fold(&t, &r, output_side)?.to_dtype(DType::F32)?;
    }
    if let Some(h) = permute_heads {
        // llama.cpp's converter: reshape(h, 2, hd/2, cols).swapaxes(1, 2)
        let (rows, cols) = t.dims2()?;
        t = t
            .reshape((h, 2, rows / h / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The RoPE factor tensors llama.cpp reads, by name; they come first in the file.
fn rope_factors(cfg: &ModelConfig) -> Vec<(&'static str, Vec<f32>)> {
    let divisors = match &cfg.rope_scaling {
        RopeScaling::None => None,
        RopeScaling::LongRope { short, long, .. } => {
            return vec![("rope_factors_long.weight", long.clone()), ("rope_factors_short.weight", short.clone())]
        }
        RopeScaling::Divisors(d) => Some(d.clone()),
        RopeScaling::Llama3 { .. } => {
            let plain = ModelConfig {
                rope_scaling: RopeScaling::None,
                ..cfg.clone()
            }
            .rope_inv_freq(false);
            Some(
                plain
                    .iter()
                    .zip(cfg.rope_inv_freq(false))
                    .map(|(p, s)| p / s)
                    .collect(),
            )
        }
    };
    divisors.map(|d| vec![("rope_freqs.weight", d)]).unwrap_or_default()
}

fn model_metadata(cfg: &ModelConfig, quant: Quant, name: &str) -> Vec<(String, Meta)> {
    let a = cfg.arch.gguf_name();
    let k = |s: &str| format!("{a}.{s}");
    let key = |field: &str| gguf_key(a, field);
    let mut m = vec![
        ("general.architecture".to_string(), Meta::Str(a.into())),
        ("general.type".into(), Meta::Str("model".into())),
        ("general.name".into(), Meta::Str(name.into())),
        (
            "general.alignment".into(),
            Meta::U32(crate::formats::gguf_write::ALIGNMENT as u32),
        ),
        (key("num_hidden_layers"), Meta::U32(cfg.num_layers as u32)),
        (
            key("max_position_embeddings"),
            // Saturating: a context past u32 (absurd, but a limit, not an allocation)
            // must not wrap to a small or zero one.
            Meta::U32(u32::try_from(cfg.max_position_embeddings).unwrap_or(u32::MAX)),
        ),
        (key("hidden_size"), Meta::U32(cfg.hidden_size as u32)),
        (
            key("intermediate_size"),
            Meta::U32(cfg.intermediate_size as u32),
        ),
        (key("num_attention_heads"), Meta::U32(cfg.num_heads as u32)),
        (
            key("num_key_value_heads"),
            Meta::U32(cfg.num_kv_heads as u32),
        ),
        (key("rope_theta"), Meta::F32(cfg.rope_theta)),
        (
            key("rms_norm_eps"),
            Meta::F32(cfg.rms_norm_eps as f32),
        ),
        ("general.file_type".into(), Meta::U32(file_type(quant))),
        ("general.quantization_version".into(), Meta::U32(2)),
    ];
    if let Some([t, h, w]) = cfg.mrope_section {
        m.push((k("rope.dimension_sections"), Meta::I32Array(vec![t as i32, h as i32, w as i32, 0])));
    }
    if !matches!(cfg.arch, Arch::Qwen2 | Arch::Qwen2Vl | Arch::Phi3) {
        m.push((key("head_dim"), Meta::U32(cfg.head_dim as u32)));
        m.push((k("attention.value_length"), Meta::U32(cfg.head_dim as u32)));
    }
    if cfg.arch == Arch::Phi3 {
        // As convert_hf_to_gguf.py's Phi3MiniModel writes them.
        m.push((key("rotary_dim"), Meta::U32(cfg.rotary_dim as u32)));
        if let Some(o) = cfg.original_context {
            m.push((key("original_max_position_embeddings"), Meta::U32(o as u32)));
        }
        m.push((key("sliding_window"), Meta::U32(cfg.sliding_window.unwrap_or(0) as u32)));
        if let RopeScaling::LongRope { attention_factor, .. } = &cfg.rope_scaling {
            m.push((key("attention_factor"), Meta::F32(*attention_factor)));
        }
    }
    if cfg.arch == Arch::Llama {
        m.push((k("vocab_size"), Meta::U32(cfg.vocab_size as u32)));
        m.push((k("rope.dimension_count"), Meta::U32(cfg.head_dim as u32)));
    }
    m
}

fn so8t_metadata(h: &Heads, c: &So8tConfig, n_layers: usize) -> Result<Vec<(String, Meta)>> {
    let flat = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
    let [safety_layer, authority_layer] = c.heads.layers(n_layers);
    Ok(vec![
        ("so8t.version".to_string(), Meta::U32(c.version)),
        ("so8t.rotation_dim".into(), Meta::U32(8)),
        (
            "so8t.sites".into(),
            Meta::StrArray(c.sites.iter().map(|s| s.name().to_string()).collect()),
        ),
        ("so8t.baked".into(), Meta::Bool(true)),
        ("so8t.heads_trained".into(), Meta::Bool(c.heads_trained)),
        (
            "so8t.threshold.unsafe".into(),
            Meta::F32(c.thresholds.unsafe_),
        ),
        (
            "so8t.threshold.escalate".into(),
            Meta::F32(c.thresholds.escalate),
        ),
        (
            "so8t.threshold.response_unsafe".into(),
            Meta::F32(c.thresholds.response()[0]),
        ),
        (
            "so8t.threshold.response_escalate".into(),
            Meta::F32(c.thresholds.response()[1]),
        ),
        (
            "so8t.threshold.consecutive".into(),
            Meta::U32(c.thresholds.consecutive as u32),
        ),
        (
            "so8t.verdict_position".into(),
            Meta::Str(c.verdict_position.name().into()),
        ),
        (
            "so8t.head.safety.layer".into(),
            Meta::U32(safety_layer as u32),
        ),
        (
            "so8t.head.authority.layer".into(),
            Meta::U32(authority_layer as u32),
        ),
        (
            "so8t.head.safety.weight".into(),
            Meta::F32Array(flat(&h.safety_w)?),
        ),
        (
            "so8t.head.safety.bias".into(),
            Meta::F32Array(flat(&h.safety_b)?),
        ),
        (
            "so8t.head.safety.labels".into(),
            Meta::StrArray(c.labels.safety.to_vec()),
        ),
        (
            "so8t.head.authority.weight".into(),
            Meta::F32Array(flat(&h.authority_w)?),
        ),
        (
            "so8t.head.authority.bias".into(),
            Meta::F32Array(flat(&h.authority_b)?),
        ),
        (
            "so8t.head.authority.labels".into(),
            Meta::StrArray(c.labels.authority.to_vec()),
        ),
        (
            "so8t.config".into(),
            Meta::Str(serde_json::to_string(c).unwrap()),
        ),
    ])
}

/// Heads and SO8T config from an exported GGUF's `so8t.*` metadata, if any.
/// Checked against the model the file holds (shapes, finite values, the layers read).
pub fn read_gguf_heads(
    g: &GgufFile,
    model: &crate::config::ModelConfig,
) -> Result<Option<(Heads, So8tConfig)>> {
    let hidden = model.hidden_size;
    let Some(cfg_json) = g.opt_str("so8t.config")? else {
        return Ok(None);
    };
    let cfg: So8tConfig = crate::error::parse_json(cfg_json, &g.path)?;
    cfg.check(&g.path)?;
    let arr = |key: &str, len: usize| -> Result<Tensor> {
        let v = g.f32_array(key).ok_or_else(|| {
            Error::format(&g.path, format!("metadata `{key}` missing or not f32"))
        })?;
        if v.iter().any(|x| !x.is_finite()) {
            return Err(Error::format(&g.path, format!("metadata `{key}` holds NaN or Inf")));
        }
        if v.len() != len {
            return Err(Error::format(
                &g.path,
                format!("metadata `{key}` has {} values, expected {len}", v.len()),
            ));
        }
        Ok(Tensor::from_vec(v, len, &candle_core::Device::Cpu)?)
    };
    let heads = Heads {
        safety_w: arr("so8t.head.safety.weight", 2 * hidden)?.reshape((2, hidden))?,
        safety_b: arr("so8t.head.safety.bias", 2)?,
        authority_w: arr("so8t.head.authority.weight", 2 * hidden)?.reshape((2, hidden))?,
        authority_b: arr("so8t.head.authority.bias", 2)?,
    };
    heads.check(hidden, &g.path)?;
    cfg.heads.check(model.num_layers, &g.path)?;
    Ok(Some((heads, cfg)))
}

fn open_input(src: &Path) -> Result<Input> {
    match open_source(src)? {
        Source::Gguf(file) => {
            let config = file.config()?;
            let heads = read_gguf_heads(&file, &config)?;
            // The vocabulary as it is: every tokenizer.* key of the source, verbatim.
            let mut tokenizer = Vec::new();
            let mut keys: Vec<&String> = file
                .content
                .metadata
                .keys()
                .filter(|k| k.starts_with("tokenizer."))
                .collect();
            keys.sort();
            for k in keys {
                if let Some(v) = meta_from_value(&file.content.metadata[k]) {
                    tokenizer.push((k.clone(), v));
                }
            }
            let strips_after_specials = crate::tokenizer::llama_cpp_reads_as_phi3(
                file.opt_str("general.name")?.unwrap_or(""),
            );
            let store = GgufStore::new(file.clone(), &config);
            Ok(Input {
                config,
                store: Box::new(store),
                rotations: HashMap::new(),
                heads,
                tokenizer,
                strips_after_specials,
            })
        }
        Source::Hf {
            dir,
            config,
            fp8_block,
        } => {
            let store = SafetensorsStore::open(&dir, fp8_block)?;
            let mut rotations = HashMap::new();
            let mut heads = None;
            if super::adapter::is_so8t_dir(&dir) {
                let c = So8tConfig::read(&dir)?;
                c.check_base(&dir)?;
                let adapter = Adapter::read(&dir)?;
                adapter.check_shapes(&config, &c, &dir.join(super::adapter::ADAPTER_FILE))?;
                rotations = adapter.fold_rotations(&config, &c)?;
                heads = Some((adapter.heads, c));
            } else if dir.join(super::bake::HEADS_FILE).exists() {
                heads = Some(read_heads(&dir, &config)?);
            }
            let tokenizer = super::export_tokenizer::from_hf_dir(&dir, config.vocab_size)?;
            let strips_after_specials = super::export_tokenizer::strips_after_specials(&dir)?;
            Ok(Input {
                config,
                store: Box::new(store),
                rotations,
                heads,
                tokenizer,
                strips_after_specials,
            })
        }
    }
}

fn meta_from_value(v: &candle_core::quantized::gguf_file::Value) -> Option<Meta> {
    use candle_core::quantized::gguf_file::Value as V;
    Some(match v {
        V::U8(x) => Meta::U32(*x as u32),
        V::U16(x) => Meta::U32(*x as u32),
        V::U32(x) => Meta::U32(*x),
        V::I32(x) => Meta::I32(*x),
        V::F32(x) => Meta::F32(*x),
        V::Bool(x) => Meta::Bool(*x),
        V::String(s) => Meta::Str(s.clone()),
        V::Array(a) => match a.first() {
            Some(V::String(_)) => Meta::StrArray(
                a.iter()
                    .filter_map(|x| {
                        if let V::String(s) = x {
                            Some(s.clone())
                        } else {
                            None
                        }
                    })
                    .collect(),
            ),
            Some(V::I32(_)) => Meta::I32Array(
                a.iter()
                    .filter_map(|x| if let V::I32(s) = x { Some(*s) } else { None })
                    .collect(),
            ),
            Some(V::F32(_)) => Meta::F32Array(
                a.iter()
                    .filter_map(|x| if let V::F32(s) = x { Some(*s) } else { None })
                    .collect(),
            ),
            _ => return None,
        },
        _ => return None,
    })
}
