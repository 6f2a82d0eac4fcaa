//! GGUF files (v2, v3) of arch `llama`, `qwen2`, `qwen3`: metadata, tensors in any ggml type
//! candle reads, mapped to HF names and layouts.

use super::{shape_error, Bytes, Embedding, Matrix, WeightStore};
use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::error::{Error, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{QStorage, QTensor};
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct GgufFile {
    pub path: PathBuf,
    mmap: Bytes,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = crate::files::open(path)?;
        // SAFETY: read-only mapping; the file is assumed not to change while loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_bytes(path, Bytes::Mapped(mmap))
    }

    /// A GGUF file held in memory; `path` names it in errors.
    pub fn from_vec(path: &Path, bytes: Vec<u8>) -> Result<GgufFile> {
        Self::from_bytes(path, Bytes::Owned(bytes))
    }

    fn from_bytes(path: &Path, bytes: Bytes) -> Result<GgufFile> {
        let content = super::gguf_header::read(&bytes)
            .map_err(|e| Error::format(path, format!("not a valid GGUF file: {e}")))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap: bytes,
            content,
        })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> Error {
        Error::format(&self.path, format!("missing metadata key `{key}`"))
    }

    /// A key's value if the file has it. A key present with another type is an error,
    /// as in llama.cpp's loader: read as a default instead, an `f32` epsilon stored as
    /// `u32` (its bits as an integer) or a head count stored as `f32` made a model that
    /// loaded and computed garbage. Integers of any width are one type here (the value
    /// must fit), floats of either width another.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.typed(key, "a non-negative integer", value_usize)
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        self.typed(key, "a float", |v| match v {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            _ => None,
        })
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", |v| match v {
            Value::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", |v| match v {
            Value::Bool(b) => Some(*b),
            _ => None,
        })
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        read(v).map(Some).ok_or_else(|| {
            Error::format(
                &self.path,
                format!("metadata `{key}` must be {expected}, got {}", value_kind(v)),
            )
        })
    }

    pub fn str_array(&self, key: &str) -> Result<Vec<&str>> {
        let bad = || {
            Error::format(
                &self.path,
                format!("metadata `{key}` must be an array of strings"),
            )
        };
        match self.get(key) {
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_str()),
                    _ => Err(bad()),
                })
                .collect(),
            Some(_) => Err(bad()),
            None => Err(Error::format(
                &self.path,
                format!("missing metadata key `{key}`"),
            )),
        }
    }

    pub fn f32_array(&self, key: &str) -> Option<Vec<f32>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| {
                    if let Value::F32(x) = v {
                        Some(*x)
                    } else {
                        None
                    }
                })
                .collect(),
            _ => None,
        }
    }

    pub fn i32_array(&self, key: &str) -> Option<Vec<i32>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .map(|v| value_usize(v).map(|x| x as i32))
                .collect(),
            _ => None,
        }
    }

    pub fn architecture(&self) -> Result<Arch> {
        let name = self
            .opt_str("general.architecture")?
            .ok_or_else(|| self.missing("general.architecture"))?;
        Arch::parse(name).ok_or_else(|| {
            Error::format(
                &self.path,
                format!(
                    "unsupported general.architecture `{name}` (expected llama, qwen2, qwen3, phi3 or qwen2vl)"
                ),
            )
        })
    }

    pub fn tensor_names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        n.sort();
        n
    }

    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    pub fn qtensor(&self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut Cursor::new(&self.mmap[..]), name, &Device::Cpu)
            .map_err(|e| {
                Error::format(
                    &self.path,
                    format!("tensor `{name}`: {}", crate::error::candle_message(&e)),
                )
            })
    }

    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.architecture()?;
        let a = arch.gguf_name();
        // One table names the keys for reading and for the errors about their values.
        let key = |field: &str| gguf_key(a, field);
        let hidden = self.usize(&key("hidden_size"))?;
        let heads = self.usize(&key("num_attention_heads"))?;
        if heads == 0 {
            return Err(Error::format(
                &self.path,
                format!("metadata `{}` must be positive", key("num_attention_heads")),
            ));
        }
        let embd = self
            .tensor_shape("token_embd.weight")
            .ok_or_else(|| Error::format(&self.path, "missing tensor `token_embd.weight`"))?;
        let vocab = embd[0];
        let head_dim = self
            .opt_usize(&key("head_dim"))?
            .unwrap_or(hidden / heads);
        let rotary_dim = self.opt_usize(&key("rotary_dim"))?.unwrap_or(head_dim);
        let max_position_embeddings = self.opt_usize(&key("max_position_embeddings"))?.unwrap_or(4096);
        let vector = |name: &str| -> Result<Vec<f32>> {
            let t = self.qtensor(name)?.dequantize(&Device::Cpu)?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let has = |name: &str| self.content.tensor_infos.contains_key(name);
        let rope_scaling = if has("rope_freqs.weight") {
            RopeScaling::Divisors(vector("rope_freqs.weight")?)
        } else if has("rope_factors_long.weight") || has("rope_factors_short.weight") {
            let original = self.usize(&key("original_max_position_embeddings"))?;
            RopeScaling::LongRope {
                short: vector("rope_factors_short.weight")?,
                long: vector("rope_factors_long.weight")?,
                attention_factor: match self.opt_f64(&key("attention_factor"))? {
                    Some(a) => a as f32,
                    None => ModelConfig::longrope_attention_factor(
                        max_position_embeddings as f64 / original.max(1) as f64,
                        original,
                    ),
                },
            }
        } else {
            RopeScaling::None
        };
        let mut eos = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some(id) = self.opt_usize(key)? {
                if !eos.contains(&(id as u32)) {
                    eos.push(id as u32);
                }
            }
        }
        let cfg = ModelConfig {
            arch,
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.usize(&key("intermediate_size"))?,
            num_layers: self.usize(&key("num_hidden_layers"))?,
            num_heads: heads,
            num_kv_heads: self
                .opt_usize(&key("num_key_value_heads"))?
                .unwrap_or(heads),
            head_dim,
            rotary_dim,
            // Required, as llama.cpp requires it: no default fits every family.
            rms_norm_eps: self.f64(&key("rms_norm_eps"))?,
            rope_theta: self
                .opt_f64(&key("rope_theta"))?
                .unwrap_or(10_000.0) as f32,
            rope_scaling,
            max_position_embeddings,
            original_context: self.opt_usize(&key("original_max_position_embeddings"))?,
            // llama.cpp writes 0 for "no window" (the converter's sign for Phi-4 in phi3 files).
            sliding_window: match arch {
                Arch::Phi3 => self.opt_usize(&key("sliding_window"))?.filter(|&w| w > 0),
                _ => None,
            },
            tie_word_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            qk_norm: self
                .content
                .tensor_infos
                .contains_key("blk.0.attn_q_norm.weight"),
            bos_token_id: self
                .opt_usize("tokenizer.ggml.bos_token_id")?
                .map(|v| v as u32),
            eos_token_ids: eos,
            // llama.cpp's M-RoPE sections: temporal, height, width and a fourth (0 for
            // Qwen2-VL).
            mrope_section: match arch {
                Arch::Qwen2Vl => {
                    let k = format!("{a}.rope.dimension_sections");
                    match self.i32_array(&k).as_deref() {
                        Some([t, h, w, ..]) if *t >= 0 && *h >= 0 && *w >= 0 => Some([*t as usize, *h as usize, *w as usize]),
                        _ => return Err(Error::format(&self.path, format!("metadata `{k}` must hold 4 non-negative integers"))),
                    }
                }
                _ => None,
            },
        };
        cfg.validate_fields(&self.path, &key)?;
        Ok(cfg)
    }
}

fn value_kind(v: &Value) -> String {
    match v {
        Value::Array(items) => format!("an array of {}", items.len()),
        Value::String(_) => "a string".into(),
        v => format!("{:?}", v.value_type()).to_lowercase(),
    }
}

fn value_usize(v: &Value) -> Option<usize> {
    match *v {
        Value::U8(x) => Some(x as usize),
        Value::U16(x) => Some(x as usize),
        Value::U32(x) => Some(x as usize),
        Value::U64(x) => usize::try_from(x).ok(),
        Value::I8(x) => usize::try_from(x).ok(),
        Value::I16(x) => usize::try_from(x).ok(),
        Value::I32(x) => usize::try_from(x).ok(),
        Value::I64(x) => usize::try_from(x).ok(),
        _ => None,
    }
}

/// The GGUF key (llama.cpp's name) that holds a `config.json` field: what the reader
/// reads, the exporter writes and errors about a GGUF's values name.
pub fn gguf_key(arch: &str, hf_field: &str) -> String {
    match hf_field {
        "vocab_size" => "token_embd.weight".into(),
        "hidden_size" => format!("{arch}.embedding_length"),
        "intermediate_size" => format!("{arch}.feed_forward_length"),
        "num_hidden_layers" => format!("{arch}.block_count"),
        "num_attention_heads" => format!("{arch}.attention.head_count"),
        "num_key_value_heads" => format!("{arch}.attention.head_count_kv"),
        "head_dim" => format!("{arch}.attention.key_length"),
        "rope_theta" => format!("{arch}.rope.freq_base"),
        "rms_norm_eps" => format!("{arch}.attention.layer_norm_rms_epsilon"),
        "max_position_embeddings" => format!("{arch}.context_length"),
        "rope_scaling" => "rope_freqs.weight".into(),
        "rope_scaling.short_factor" => "rope_factors_short.weight".into(),
        "rope_scaling.long_factor" => "rope_factors_long.weight".into(),
        "rope_scaling.attention_factor" => format!("{arch}.rope.scaling.attn_factor"),
        "rotary_dim" | "partial_rotary_factor" => format!("{arch}.rope.dimension_count"),
        "original_max_position_embeddings" => format!("{arch}.rope.scaling.original_context_length"),
        "attention_factor" => format!("{arch}.rope.scaling.attn_factor"),
        "sliding_window" => format!("{arch}.attention.sliding_window"),
        other => other.into(),
    }
}

/// HF tensor name → llama.cpp tensor name.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.qkv_proj" => "attn_qkv",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        // phi3: llama.cpp's `ffn_up` holds the fused gate | up, as HF's gate_up_proj.
        "mlp.up_proj" | "mlp.gate_up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's converter reorders the rows of each `llama` q/k head from HF's "rotate
/// half" layout (two halves) to interleaved pairs. This undoes it on the raw rows, which
/// works for every ggml type because quantisation blocks never cross a row.
fn unpermute_rows(q: QTensor, n_head: usize, path: &Path, name: &str) -> Result<QTensor> {
    let (rows, _) = q.shape().dims2()?;
    if n_head == 0 || rows % n_head != 0 || (rows / n_head) % 2 != 0 {
        return Err(Error::format(
            path,
            format!(
                "tensor `{name}`: {rows} rows cannot be split into {n_head} heads of even size"
            ),
        ));
    }
    let data = q.data()?;
    let row_bytes = data.len() / rows;
    let hd = rows / n_head;
    let mut out = vec![0u8; data.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..hd / 2 {
                let hf_row = h * hd + j * (hd / 2) + i;
                let gguf_row = h * hd + i * 2 + j;
                out[hf_row * row_bytes..(hf_row + 1) * row_bytes]
                    .copy_from_slice(&data[gguf_row * row_bytes..(gguf_row + 1) * row_bytes]);
            }
        }
    }
    let storage = QStorage::from_data(Cow::Owned(out), &Device::Cpu, q.dtype())?;
    Ok(QTensor::new(storage, q.shape().clone())?)
}

pub struct GgufStore {
    pub file: Arc<GgufFile>,
    arch: Arch,
    n_head: usize,
    n_kv_head: usize,
}

impl GgufStore {
    pub fn new(file: Arc<GgufFile>, config: &ModelConfig) -> GgufStore {
        GgufStore {
            file,
            arch: config.arch,
            n_head: config.num_heads,
            n_kv_head: config.num_kv_heads,
        }
    }

    fn resolve(&self, hf: &str) -> Result<String> {
        let name = gguf_name(hf)
            .ok_or_else(|| Error::Invalid(format!("no GGUF name for tensor `{hf}`")))?;
        if !self.file.content.tensor_infos.contains_key(&name) {
            return Err(Error::format(
                &self.file.path,
                format!("missing tensor `{name}`"),
            ));
        }
        Ok(name)
    }

    fn load(&self, hf: &str, want: &[usize]) -> Result<QTensor> {
        let name = self.resolve(hf)?;
        let got = self.file.tensor_shape(&name).unwrap_or(&[]);
        if got != want {
            return Err(shape_error(&self.file.path, &name, want, got));
        }
        let q = self.file.qtensor(&name)?;
        if self.arch == Arch::Llama && hf.ends_with(".weight") {
            if hf.ends_with("self_attn.q_proj.weight") {
                return unpermute_rows(q, self.n_head, &self.file.path, &name);
            }
            if hf.ends_with("self_attn.k_proj.weight") {
                return unpermute_rows(q, self.n_kv_head, &self.file.path, &name);
            }
        }
        Ok(q)
    }
}

impl WeightStore for GgufStore {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.content.tensor_infos.contains_key(&g))
    }

    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        Ok(Matrix::from_qtensor(Arc::new(
            self.load(name, &[rows, cols])?,
        ))?)
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        Ok(self.load(name, &[len])?.dequantize(&Device::Cpu)?)
    }

    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        Ok(Embedding::Quant(Arc::new(self.load(name, &[rows, cols])?)))
    }

    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.load(name, shape)?.dequantize(&Device::Cpu)?)
    }

    fn dtype_counts(&self) -> Vec<(String, usize)> {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for info in self.file.content.tensor_infos.values() {
            *m.entry(format!("{:?}", info.ggml_dtype)).or_default() += 1;
        }
        m.into_iter().collect()
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.file.content.tensor_infos.keys().cloned().collect();
        v.sort();
        v
    }

    fn size(&self) -> (usize, u64) {
        self.file
            .content
            .tensor_infos
            .values()
            .fold((0, 0), |(p, b), i| {
                let n = i.shape.elem_count();
                (
                    p + n,
                    b + (n / i.ggml_dtype.block_size() * i.ggml_dtype.type_size()) as u64,
                )
            })
    }
}
