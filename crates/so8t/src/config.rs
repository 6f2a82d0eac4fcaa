//! The decoder's hyper-parameters, read from an HF `config.json` or from GGUF metadata.
//! One struct for every supported architecture; the differences between them are flags
//! (spec §1), not separate model types.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    /// Phi-3/3.5/4-mini: fused `qkv_proj` and `gate_up_proj`, partial rotary, LongRoPE.
    Phi3,
    /// Qwen2-VL's text decoder: Qwen2 with multimodal RoPE (`mrope_section`); its vision
    /// tower is [`crate::vision`]'s.
    #[serde(rename = "qwen2_vl")]
    Qwen2Vl,
}

impl Arch {
    pub fn parse(name: &str) -> Option<Arch> {
        match name {
            "llama" => Some(Arch::Llama),
            "qwen2" => Some(Arch::Qwen2),
            "qwen3" => Some(Arch::Qwen3),
            "phi3" => Some(Arch::Phi3),
            // transformers' model_type, and llama.cpp's name for its text GGUF.
            "qwen2_vl" | "qwen2vl" => Some(Arch::Qwen2Vl),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
            Arch::Phi3 => "phi3",
            Arch::Qwen2Vl => "qwen2_vl",
        }
    }

    /// The architecture's name in GGUF files (`general.architecture`, the key prefix).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Qwen2Vl => "qwen2vl",
            other => other.name(),
        }
    }

    /// Whether q, k, v come from one `qkv_proj` and gate, up from one `gate_up_proj`
    /// (llama.cpp keeps them fused too: `attn_qkv`, `ffn_up` of twice the width).
    pub fn fused_projections(self) -> bool {
        self == Arch::Phi3
    }
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    None,
    /// Llama 3.x frequency-dependent scaling, as transformers' `_compute_llama3_parameters`.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position: f32,
    },
    /// Per-frequency divisors, as llama.cpp stores them in a `rope_freqs.weight` tensor.
    Divisors(Vec<f32>),
    /// LongRoPE (Phi-3), as transformers' `_compute_longrope_parameters`: per-frequency
    /// divisors `short` for a sequence of at most [`ModelConfig::original_context`]
    /// tokens, `long` beyond, and cos and sin multiplied by `attention_factor` either way.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        attention_factor: f32,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// The leading dims of each head that RoPE rotates (`head_dim · partial_rotary_factor`).
    pub rotary_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    /// The context the model was pretrained at (phi3's `original_max_position_embeddings`,
    /// llama.cpp's `rope.scaling.original_context_length`), where LongRoPE switches sets.
    pub original_context: Option<usize>,
    /// Attention window (phi3): a position sees at most this many keys, itself included.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (qwen2, or `attention_bias` in llama/qwen3 configs).
    pub qkv_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Multimodal RoPE (Qwen2-VL): how many of the rotary frequencies follow a token's
    /// temporal, height and width position, in that order (they sum to `rotary_dim / 2`).
    /// A text token has one position on all three, so text alone is ordinary RoPE.
    pub mrope_section: Option<[usize; 3]>,
}

impl ModelConfig {
    /// Inverse RoPE frequencies for the "rotate half" layout over the rotated dims,
    /// computed in f32 the way transformers computes them, so positions match the
    /// reference bit for bit as far as `powf` allows. `long`: LongRoPE's set for sequences
    /// past its original context (the other scalings have one set).
    pub fn rope_inv_freq(&self, long: bool) -> Vec<f32> {
        let dim = self.rotary_dim;
        let base: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / self.rope_theta.powf((2 * i) as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Divisors(d) => base.iter().zip(d).map(|(f, d)| f / d).collect(),
            RopeScaling::LongRope { short, long: long_f, .. } => {
                let ext = if long { long_f } else { short };
                // transformers: 1 / (ext · θ^(2j/dim)), the product rounded first.
                (0..dim / 2)
                    .zip(ext)
                    .map(|(i, e)| 1.0 / (e * self.rope_theta.powf((2 * i) as f32 / dim as f32)))
                    .collect()
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position,
            } => {
                let low_wavelen = original_max_position / low_freq_factor;
                let high_wavelen = original_max_position / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
                        if medium {
                            let smooth = (original_max_position / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }

    /// The attention factor transformers derives when a LongRoPE config names none:
    /// `sqrt(1 + ln(s) / ln(original))`, s = context / original context, 1 when s ≤ 1.
    pub fn derived_attention_factor(&self) -> f32 {
        match self.rope_long_after() {
            Some(orig) => Self::longrope_attention_factor(self.max_position_embeddings as f64 / orig as f64, orig),
            None => 1.0,
        }
    }

    /// transformers' default LongRoPE attention factor for a context extended `scale`
    /// times from `original` (llama.cpp's converter writes the same number).
    pub fn longrope_attention_factor(scale: f64, original: usize) -> f32 {
        if scale <= 1.0 {
            1.0
        } else {
            (1.0 + scale.ln() / (original as f64).ln()).sqrt() as f32
        }
    }

    /// LongRoPE's switch: sequences longer than this take the long factor set.
    pub fn rope_long_after(&self) -> Option<usize> {
        match &self.rope_scaling {
            RopeScaling::LongRope { .. } => self.original_context,
            _ => None,
        }
    }

    /// What cos and sin are multiplied by (LongRoPE's attention factor; 1 otherwise).
    pub fn rope_attention_factor(&self) -> f32 {
        match &self.rope_scaling {
            RopeScaling::LongRope { attention_factor, .. } => *attention_factor,
            _ => 1.0,
        }
    }

    /// The longest sequence the decoder runs: the context, or a shorter attention window
    /// (within it, windowed attention is plain causal attention, so this is exact).
    pub fn context(&self) -> usize {
        self.sliding_window
            .map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// Every tensor the decoder reads, in HF names and `[out, in]` shapes.
    pub fn hf_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, hd, i) = (self.hidden_size, self.head_dim, self.intermediate_size);
        let (q, kv) = (self.num_heads * hd, self.num_kv_heads * hd);
        let mut v = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.input_layernorm.weight"), vec![h]));
            if self.arch.fused_projections() {
                v.push((format!("{p}.self_attn.qkv_proj.weight"), vec![q + 2 * kv, h]));
            } else {
                for (n, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
                    v.push((format!("{p}.self_attn.{n}.weight"), vec![rows, h]));
                    if self.qkv_bias {
                        v.push((format!("{p}.self_attn.{n}.bias"), vec![rows]));
                    }
                }
            }
            v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.qk_norm {
                v.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
                v.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
            }
            v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            if self.arch.fused_projections() {
                v.push((format!("{p}.mlp.gate_up_proj.weight"), vec![2 * i, h]));
            } else {
                v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
                v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            }
            v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        v.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            v.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        v
    }

    /// An HF `config.json` for this model (what `convert` writes for a GGUF base).
    pub fn to_hf_json(&self) -> Result<serde_json::Value> {
        let (model_type, class) = match self.arch {
            Arch::Llama => ("llama", "LlamaForCausalLM"),
            Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
            Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
            Arch::Phi3 => ("phi3", "Phi3ForCausalLM"),
            Arch::Qwen2Vl => {
                return Err(Error::Invalid(
                    "a Qwen2-VL config.json carries its vision tower's settings, which a GGUF of the text decoder does not hold".into(),
                ))
            }
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => serde_json::json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": *original_max_position as usize,
            }),
            // The released Phi-3.5 layout; the attention factor is implied by the two
            // contexts unless it differs from what transformers would derive.
            RopeScaling::LongRope { short, long, attention_factor, .. } => {
                let mut r = serde_json::json!({"type": "longrope", "short_factor": short, "long_factor": long});
                if *attention_factor != self.derived_attention_factor() {
                    r["attention_factor"] = (*attention_factor).into();
                }
                r
            }
            RopeScaling::Divisors(_) => {
                return Err(Error::Invalid(
                    "this GGUF stores RoPE scaling as per-frequency factors (rope_freqs), which an HF config.json cannot express yet".into(),
                ))
            }
        };
        let mut v = serde_json::json!({
            "architectures": [class],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids,
        });
        if !matches!(self.arch, Arch::Qwen2 | Arch::Phi3) {
            v["attention_bias"] = self.qkv_bias.into();
        }
        if self.arch == Arch::Phi3 {
            v["partial_rotary_factor"] = (self.rotary_dim as f64 / self.head_dim as f64).into();
            v["sliding_window"] = self.sliding_window.into();
            if let Some(o) = self.original_context {
                v["original_max_position_embeddings"] = o.into();
            }
        }
        Ok(v)
    }

    /// Checks the invariants the decoder relies on, so a bad file fails here with the
    /// field named instead of deep inside a matmul.
    pub fn validate(&self, path: &Path) -> Result<()> {
        self.validate_fields(path, &|field| field.to_string())
    }

    /// As `validate`, naming each field as the file at `path` spells it (`field` maps a
    /// `config.json` name to, say, its GGUF key).
    pub fn validate_fields(&self, path: &Path, field: &dyn Fn(&str) -> String) -> Result<()> {
        let bad = |what: String| Err(Error::format(path, what));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("field `{}` must be positive, got 0", field(name)));
            }
            // Bounds well above any real model; they keep an edited header from sizing
            // an allocation. (A context is only a limit, never an allocation's size.)
            if v > (1 << 24) && name != "max_position_embeddings" {
                return bad(format!("field `{}` = {v} is implausibly large", field(name)));
            }
        }
        if self.sliding_window == Some(0) {
            return bad(format!("field `{}` must be positive, got 0", field("sliding_window")));
        }
        if self.num_layers > 1024 {
            return bad(format!(
                "field `{}` = {} is implausibly large",
                field("num_hidden_layers"),
                self.num_layers
            ));
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "{} ({}) must be a multiple of {} ({})",
                field("num_attention_heads"),
                self.num_heads,
                field("num_key_value_heads"),
                self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!(
                "{} must be even for RoPE, got {}",
                field("head_dim"),
                self.head_dim
            ));
        }
        // NaN, zero or negative here gives NaN logits, not an error, further on.
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad(format!(
                "field `{}` must be a positive number, got {}",
                field("rope_theta"),
                self.rope_theta
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!(
                "field `{}` must be a positive number, got {}",
                field("rms_norm_eps"),
                self.rms_norm_eps
            ));
        }
        if self.rotary_dim % 2 != 0 || self.rotary_dim == 0 || self.rotary_dim > self.head_dim {
            return bad(format!(
                "{} gives {} rotated dims per head; expected an even number in 2..={}",
                field("partial_rotary_factor"),
                self.rotary_dim,
                self.head_dim
            ));
        }
        if self.original_context == Some(0) {
            return bad(format!("field `{}` must be positive, got 0", field("original_max_position_embeddings")));
        }
        if let Some(sec) = self.mrope_section {
            if sec.iter().sum::<usize>() != self.rotary_dim / 2 {
                return bad(format!(
                    "`{}` {sec:?} sums to {}, expected rotary dims / 2 = {}",
                    field("rope_scaling.mrope_section"),
                    sec.iter().sum::<usize>(),
                    self.rotary_dim / 2
                ));
            }
        }
        if let RopeScaling::LongRope { short, long, attention_factor } = &self.rope_scaling {
            for (which, f) in [("rope_scaling.short_factor", short), ("rope_scaling.long_factor", long)] {
                let name = field(which);
                if let Some(x) = f.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                    return bad(format!("`{name}` must hold positive numbers, got {x}"));
                }
                if f.len() != self.rotary_dim / 2 {
                    return bad(format!(
                        "`{name}` has {} entries, expected rotary dims / 2 = {}",
                        f.len(),
                        self.rotary_dim / 2
                    ));
                }
            }
            if self.original_context.is_none() {
                return bad(format!("LongRoPE needs field `{}`", field("original_max_position_embeddings")));
            }
            if !(attention_factor.is_finite() && *attention_factor > 0.0) {
                return bad(format!(
                    "`{}` must be a positive number, got {attention_factor}",
                    field("rope_scaling.attention_factor")
                ));
            }
        }
        if let RopeScaling::Divisors(d) = &self.rope_scaling {
            let name = field("rope_scaling");
            if let Some(x) = d.iter().find(|x| !(x.is_finite() && **x > 0.0)) {
                return bad(format!("{name} must hold positive numbers, got {x}"));
            }
            if d.len() != self.rotary_dim / 2 {
                return bad(format!(
                    "{name} has {} entries, expected rotary dims / 2 = {}",
                    d.len(),
                    self.rotary_dim / 2
                ));
            }
        }
        Ok(())
    }

    pub fn from_hf_file(path: &Path) -> Result<ModelConfig> {
        let text = crate::files::read_text(path, crate::files::SETTINGS_LIMIT)?;
        Self::from_hf_json(&text, path)
    }

    pub fn from_hf_json(text: &str, path: &Path) -> Result<ModelConfig> {
        let mut top: serde_json::Value = crate::error::parse_json(text, path)?;
        // Composite configs (Qwen2-VL as transformers 5 writes it) keep the decoder's
        // fields in `text_config`; they win over the top level, whose `model_type` stays.
        if let Some(serde_json::Value::Object(inner)) = top.get("text_config").cloned() {
            if let serde_json::Value::Object(outer) = &mut top {
                for (k, v) in inner {
                    if k != "model_type" {
                        outer.insert(k, v);
                    }
                }
            }
        }
        let raw: HfConfig = crate::error::from_json_value(top, path)?;
        let arch = Arch::parse(&raw.model_type).ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "unsupported model_type `{}` (expected llama, qwen2, qwen3, phi3 or qwen2_vl)",
                    raw.model_type
                ),
            )
        })?;
        let need = |v: Option<usize>, name: &str| {
            v.ok_or_else(|| Error::format(path, format!("missing field `{name}`")))
        };
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        if num_heads == 0 {
            return Err(Error::format(
                path,
                "field `num_attention_heads` must be positive, got 0",
            ));
        }
        let rope = raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref());
        let rope_theta = raw
            .rope_theta
            .or_else(|| raw.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10_000.0) as f32;
        let max_position_embeddings = raw.max_position_embeddings.unwrap_or(4096);
        let head_dim = raw.head_dim.unwrap_or(hidden_size / num_heads);
        // Top level in released configs, inside `rope_parameters` as transformers 5 writes them.
        let partial = raw
            .partial_rotary_factor
            .or_else(|| rope.and_then(|r| r.partial_rotary_factor))
            .unwrap_or(1.0);
        if !(partial.is_finite() && partial > 0.0 && partial <= 1.0) {
            return Err(Error::format(
                path,
                format!("field `partial_rotary_factor` must be in (0, 1], got {partial}"),
            ));
        }
        // transformers: int(head_dim · partial_rotary_factor).
        let rotary_dim = (head_dim as f64 * partial) as usize;
        // Top level wins, as transformers gives it priority; Phi3Config defaults it to 4096.
        let original_context = raw
            .original_max_position_embeddings
            .or_else(|| rope.and_then(|r| r.original_max_position_embeddings))
            .or(if arch == Arch::Phi3 { Some(4096) } else { None });
        let mrope_section = match rope.and_then(|r| r.mrope_section.as_ref()) {
            _ if arch != Arch::Qwen2Vl => None,
            Some(s) if s.len() == 3 => Some([s[0], s[1], s[2]]),
            Some(s) => {
                return Err(Error::format(
                    path,
                    format!("rope_scaling.mrope_section must have 3 entries (temporal, height, width), got {}", s.len()),
                ))
            }
            None => return Err(Error::format(path, "qwen2_vl: missing field `rope_scaling.mrope_section`")),
        };
        let rope_scaling = match rope.and_then(|r| r.kind()) {
            // Qwen2-VL's released configs name M-RoPE as the type; its frequencies are the
            // default ones.
            None | Some("default") | Some("mrope") => RopeScaling::None,
            Some("llama3") => {
                let r = rope.unwrap();
                let f = |v: Option<f64>, name: &str| {
                    v.map(|x| x as f32).ok_or_else(|| {
                        Error::format(path, format!("rope_scaling: missing field `{name}`"))
                    })
                };
                RopeScaling::Llama3 {
                    factor: f(r.factor, "factor")?,
                    low_freq_factor: f(r.low_freq_factor, "low_freq_factor")?,
                    high_freq_factor: f(r.high_freq_factor, "high_freq_factor")?,
                    original_max_position: f(
                        r.original_max_position_embeddings.map(|v| v as f64),
                        "original_max_position_embeddings",
                    )?,
                }
            }
            // "su" is the name the first Phi-3 128k configs used.
            Some("longrope") | Some("su") => {
                let r = rope.unwrap();
                let factors = |v: &Option<Vec<f64>>, name: &str| {
                    v.as_ref()
                        .map(|f| f.iter().map(|&x| x as f32).collect::<Vec<f32>>())
                        .ok_or_else(|| Error::format(path, format!("rope_scaling: missing field `{name}`")))
                };
                // transformers: an explicit attention factor, else one from `factor`, else
                // from the ratio of the two contexts. Without a positive original context
                // `validate` refuses the config below.
                let derived = original_context.filter(|&o| o > 0).map(|o| {
                    let scale = r.factor.unwrap_or(max_position_embeddings as f64 / o as f64);
                    ModelConfig::longrope_attention_factor(scale, o)
                });
                RopeScaling::LongRope {
                    short: factors(&r.short_factor, "short_factor")?,
                    long: factors(&r.long_factor, "long_factor")?,
                    attention_factor: r.attention_factor.map(|a| a as f32).or(derived).unwrap_or(1.0),
                }
            }
            Some(other) => {
                return Err(Error::format(
                    path,
                    format!(
                        "rope_scaling type `{other}` is not supported (expected llama3, longrope or none)"
                    ),
                ))
            }
        };
        let eos_token_ids = match raw.eos_token_id {
            None => vec![],
            Some(OneOrMany::One(v)) => vec![v],
            Some(OneOrMany::Many(v)) => v,
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.intermediate_size, "intermediate_size")?,
            num_layers: need(raw.num_hidden_layers, "num_hidden_layers")?,
            num_heads,
            num_kv_heads: raw.num_key_value_heads.unwrap_or(num_heads),
            head_dim,
            rotary_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            original_context,
            // Qwen2 configs carry a window that `use_sliding_window: false` turns off.
            sliding_window: if arch == Arch::Phi3 { raw.sliding_window } else { None },
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: matches!(arch, Arch::Qwen2 | Arch::Qwen2Vl) || (arch != Arch::Phi3 && raw.attention_bias.unwrap_or(false)),
            qk_norm: arch == Arch::Qwen3,
            bos_token_id: raw.bos_token_id,
            eos_token_ids,
            mrope_section,
        };
        if raw.mlp_bias.unwrap_or(false) {
            return Err(Error::format(path, "mlp_bias = true is not supported"));
        }
        cfg.validate(path)?;
        Ok(cfg)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

#[derive(Deserialize)]
struct HfRope {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    type_: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<usize>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    attention_factor: Option<f64>,
    partial_rotary_factor: Option<f64>,
    mrope_section: Option<Vec<usize>>,
}

impl HfRope {
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.type_.as_deref())
    }
}

#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<HfRope>,
    rope_parameters: Option<HfRope>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
    sliding_window: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Phi-3.5-style config.json with `rope` as its rope_scaling (or rope_parameters) and
    /// `extra` top-level fields.
    fn phi3(rope: serde_json::Value, extra: serde_json::Value) -> Result<ModelConfig> {
        let mut v = serde_json::json!({
            "model_type": "phi3", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
            "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rope_scaling": rope,
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        ModelConfig::from_hf_json(&v.to_string(), Path::new("config.json"))
    }

    fn factors(n: usize) -> Vec<f64> {
        (0..n).map(|i| 1.0 + i as f64 / 4.0).collect()
    }

    #[test]
    fn longrope_configs_in_every_layout() {
        let long: Vec<f64> = factors(8).iter().map(|f| 2.0 * f).collect();
        let rope = serde_json::json!({"type": "su", "short_factor": factors(8), "long_factor": long});
        let c = phi3(rope, serde_json::json!({})).unwrap();
        assert_eq!(c.arch, Arch::Phi3);
        assert_eq!((c.rotary_dim, c.rope_long_after()), (16, Some(4096)));
        // Phi-3.5-mini's numbers: sqrt(1 + ln 32 / ln 4096) = 1.1902381.
        assert!((c.rope_attention_factor() - 1.190_238_1).abs() < 1e-6);
        assert!(c.rope_inv_freq(true)[7] < c.rope_inv_freq(false)[7]);
        // transformers 5: everything inside rope_parameters; an explicit attention factor wins.
        let rope = serde_json::json!({"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 4096, "short_factor": factors(4), "long_factor": factors(4),
            "attention_factor": 1.5});
        let c = phi3(serde_json::Value::Null, serde_json::json!({"rope_parameters": rope})).unwrap();
        assert_eq!((c.rotary_dim, c.rope_attention_factor()), (8, 1.5));
        // `factor` replaces the ratio of the two contexts.
        let rope = serde_json::json!({"type": "longrope", "short_factor": factors(8), "long_factor": factors(8), "factor": 1.0});
        assert_eq!(phi3(rope, serde_json::json!({})).unwrap().rope_attention_factor(), 1.0);
    }

    #[test]
    fn bad_longrope_fields_are_named() {
        let err = |rope: serde_json::Value, extra: serde_json::Value| phi3(rope, extra).unwrap_err().to_string();
        let rope = serde_json::json!({"type": "longrope", "short_factor": factors(7), "long_factor": factors(8)});
        let e = err(rope, serde_json::json!({}));
        assert!(e.contains("rope_scaling.short_factor") && e.contains("expected rotary dims / 2 = 8"), "{e}");
        let rope = serde_json::json!({"type": "longrope", "short_factor": factors(8), "long_factor": vec![0.0; 8]});
        assert!(err(rope, serde_json::json!({})).contains("rope_scaling.long_factor` must hold positive"));
        let rope = serde_json::json!({"type": "longrope", "long_factor": factors(8)});
        assert!(err(rope, serde_json::json!({})).contains("short_factor"));
        let e = err(serde_json::Value::Null, serde_json::json!({"partial_rotary_factor": 1.5}));
        assert!(e.contains("partial_rotary_factor"), "{e}");
        // 16 · 0.1 rounds down to one dim: RoPE turns pairs.
        let e = err(serde_json::Value::Null, serde_json::json!({"partial_rotary_factor": 0.1}));
        assert!(e.contains("partial_rotary_factor") && e.contains("1 rotated dims"), "{e}");
        let e = err(serde_json::Value::Null, serde_json::json!({"sliding_window": 0}));
        assert!(e.contains("sliding_window"), "{e}");
        // Only Phi-3 defaults the original context; elsewhere LongRoPE needs it.
        let v = serde_json::json!({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
            "rope_scaling": {"type": "longrope", "short_factor": factors(8), "long_factor": factors(8)}});
        let e = ModelConfig::from_hf_json(&v.to_string(), Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("original_max_position_embeddings"), "{e}");
    }

    #[test]
    fn an_attention_window_below_the_context_bounds_the_run() {
        let c = phi3(serde_json::Value::Null, serde_json::json!({"sliding_window": 2047})).unwrap();
        assert_eq!((c.context(), c.max_position_embeddings), (2047, 131072));
        let c = phi3(serde_json::Value::Null, serde_json::json!({"sliding_window": 262144})).unwrap();
        assert_eq!(c.context(), 131072);
    }
}
