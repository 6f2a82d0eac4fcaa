//! One decoder for every supported Llama-family architecture (spec §1):
//! `embed → L × [x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))] → RMSNorm → lm_head`.
//! Architecture differences are the flags in [`ModelConfig`]. Activations are f32.

use super::rotation::BlockRotation;
use inference::Scratch;

#[path = "inference.rs"]
mod inference;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::formats::{matmul, matmul_frozen, Embedding, Matrix, WeightStore};
use candle_core::{DType, Device, Tensor};

/// The places in a layer where a gate can multiply a vector (spec §4).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Site {
    Q,
    K,
    V,
    O,
    Mlp,
}

impl Site {
    pub const ALL: [Site; 5] = [Site::Q, Site::K, Site::V, Site::O, Site::Mlp];

    pub fn name(self) -> &'static str {
        match self {
            Site::Q => "q",
            Site::K => "k",
            Site::V => "v",
            Site::O => "o",
            Site::Mlp => "mlp",
        }
    }

    pub fn parse(s: &str) -> Option<Site> {
        Site::ALL.into_iter().find(|x| x.name() == s)
    }
}

#[derive(Clone, Default, Debug)]
pub struct LayerGates {
    pub q: Option<BlockRotation>,
    pub k: Option<BlockRotation>,
    pub v: Option<BlockRotation>,
    pub o: Option<BlockRotation>,
    pub mlp: Option<BlockRotation>,
}

impl LayerGates {
    pub fn slot(&mut self, site: Site) -> &mut Option<BlockRotation> {
        match site {
            Site::Q => &mut self.q,
            Site::K => &mut self.k,
            Site::V => &mut self.v,
            Site::O => &mut self.o,
            Site::Mlp => &mut self.mlp,
        }
    }
}

/// `x·Wᵀ`; in training, through the op that passes gradients to `x` only.
fn product(w: &Matrix, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
    if differentiable {
        matmul_frozen(w, x)
    } else {
        matmul(w, x)
    }
}

fn gate(g: &Option<BlockRotation>, x: Tensor) -> candle_core::Result<Tensor> {
    match g {
        Some(r) => r.apply(&x),
        None => Ok(x),
    }
}

struct Projection {
    w: Matrix,
    b: Option<Tensor>,
    /// `b` as plain values, for the inference path.
    b_vec: Option<Vec<f32>>,
}

impl Projection {
    fn load(
        ws: &dyn WeightStore,
        prefix: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = ws.matrix(&format!("{prefix}.weight"), rows, cols)?;
        let b = if bias {
            Some(ws.vector(&format!("{prefix}.bias"), rows)?)
        } else {
            None
        };
        let b_vec = b.as_ref().map(|b| b.to_vec1::<f32>()).transpose()?;
        Ok(Projection { w, b, b_vec })
    }

    fn forward(&self, x: &Tensor, differentiable: bool) -> candle_core::Result<Tensor> {
        let y = product(&self.w, x, differentiable)?;
        match &self.b {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

struct Layer {
    attn_norm: Tensor,
    q: Projection,
    k: Projection,
    v: Projection,
    o: Projection,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    gate: Projection,
    up: Projection,
    down: Projection,
    /// The norm weights as plain values, for the inference path.
    attn_norm_vec: Vec<f32>,
    ffn_norm_vec: Vec<f32>,
    q_norm_vec: Option<Vec<f32>>,
    k_norm_vec: Option<Vec<f32>>,
}

/// Keys and values of the positions seen so far: per layer, `[len, kv_heads, head_dim]`
/// f32, appended in place (capacity doubles, so a token costs no allocation).
/// Made by [`Decoder::new_cache`], which knows its row width.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
    /// Values per position in one layer's K (or V): `kv_heads · head_dim`.
    row: usize,
}

impl KvCache {
    fn new(layers: usize, row: usize) -> KvCache {
        KvCache {
            layers: vec![(Vec::new(), Vec::new()); layers],
            len: 0,
            row,
        }
    }

    fn truncate(&mut self, len: usize) {
        if len < self.len {
            for (k, v) in self.layers.iter_mut() {
                k.truncate(len * self.row);
                v.truncate(len * self.row);
            }
            self.len = len;
        }
    }
}

pub struct Decoder {
    pub cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Tensor,
    norm_vec: Vec<f32>,
    lm_head: Matrix,
    inv_freq: Tensor,
    inv_freq_vec: Vec<f32>,
    cache: KvCache,
    scratch: Scratch,
    pub gates: Vec<LayerGates>,
    /// Layers (1..=L) whose hidden state each forward keeps for the verdict heads (spec §5:
    /// the residual after that block, RMS-normed with unit weight; L is the final normed
    /// state), in this order, and what the last forward kept, `[len, hidden]` each.
    taps: Vec<usize>,
    tapped: Vec<Tensor>,
    /// Use ops that candle can differentiate (training). candle's fused RMSNorm, RoPE and
    /// softmax kernels have no backward pass: gradients would silently stop at them.
    pub differentiable: bool,
}

impl Decoder {
    pub fn load(cfg: ModelConfig, ws: &dyn WeightStore) -> Result<Decoder> {
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let embed = ws.embedding("model.embed_tokens.weight", cfg.vocab_size, h)?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let attn_norm = ws.vector(&format!("{p}.input_layernorm.weight"), h)?;
            let ffn_norm = ws.vector(&format!("{p}.post_attention_layernorm.weight"), h)?;
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(ws.vector(&format!("{a}.q_norm.weight"), hd)?),
                    Some(ws.vector(&format!("{a}.k_norm.weight"), hd)?),
                )
            } else {
                (None, None)
            };
            let vec_of = |t: &Option<Tensor>| -> Result<Option<Vec<f32>>> {
                Ok(t.as_ref().map(|t| t.to_vec1::<f32>()).transpose()?)
            };
            layers.push(Layer {
                attn_norm_vec: attn_norm.to_vec1::<f32>()?,
                ffn_norm_vec: ffn_norm.to_vec1::<f32>()?,
                q_norm_vec: vec_of(&q_norm)?,
                k_norm_vec: vec_of(&k_norm)?,
                attn_norm,
                q: Projection::load(ws, &format!("{a}.q_proj"), nh * hd, h, cfg.qkv_bias)?,
                k: Projection::load(ws, &format!("{a}.k_proj"), nkv * hd, h, cfg.qkv_bias)?,
                v: Projection::load(ws, &format!("{a}.v_proj"), nkv * hd, h, cfg.qkv_bias)?,
                o: Projection::load(ws, &format!("{a}.o_proj"), h, nh * hd, false)?,
                q_norm,
                k_norm,
                ffn_norm,
                gate: Projection::load(
                    ws,
                    &format!("{m}.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    false,
                )?,
                up: Projection::load(ws, &format!("{m}.up_proj"), cfg.intermediate_size, h, false)?,
                down: Projection::load(
                    ws,
                    &format!("{m}.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = ws.vector("model.norm.weight", h)?;
        let lm_head = if cfg.tie_word_embeddings && !ws.contains("lm_head.weight") {
            embed.as_matrix()?
        } else {
            ws.matrix("lm_head.weight", cfg.vocab_size, h)?
        };
        let inv_freq_vec = cfg.rope_inv_freq();
        let inv_freq = Tensor::new(inv_freq_vec.as_slice(), &Device::Cpu)?;
        let norm_vec = norm.to_vec1::<f32>()?;
        Ok(Decoder {
            cache: KvCache::new(cfg.num_layers, cfg.num_kv_heads * cfg.head_dim),
            scratch: Scratch::default(),
            gates: vec![LayerGates::default(); cfg.num_layers],
            cfg,
            embed,
            layers,
            norm,
            norm_vec,
            lm_head,
            inv_freq,
            inv_freq_vec,
            taps: Vec::new(),
            tapped: Vec::new(),
            differentiable: false,
        })
    }

    /// Stores every f32 projection of the layers as `ty` blocks, made by ggml's quantiser
    /// (what an export at `ty` holds), so that prompts run on the kernels: the features of
    /// a `ty` export at its speed. Returns how many matrices changed.
    pub fn quantize_dense(&mut self, ty: so8t_kernels::QType) -> Result<usize> {
        let mut n = 0;
        for layer in &mut self.layers {
            for p in [
                &mut layer.q,
                &mut layer.k,
                &mut layer.v,
                &mut layer.o,
                &mut layer.gate,
                &mut layer.up,
                &mut layer.down,
            ] {
                if let Matrix::Dense(w) = &p.w {
                    let (rows, cols) = w.dims2()?;
                    let data = w.flatten_all()?.to_vec1::<f32>()?;
                    let Some(bytes) = so8t_kernels::quantize::quantize_rows(ty, &data, cols) else {
                        continue;
                    };
                    let m = so8t_kernels::QMatrix::new(ty, rows, cols, bytes).map_err(|e| {
                        crate::error::Error::Invalid(format!("quantising a {rows}×{cols} matrix: {e}"))
                    })?;
                    p.w = Matrix::Quant(std::sync::Arc::new(m));
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Sets the layers (1..=L) whose states [`Decoder::tapped`] holds after each forward.
    pub fn set_taps(&mut self, layers: &[usize]) -> Result<()> {
        let n = self.layers.len();
        if let Some(bad) = layers.iter().find(|&&l| l == 0 || l > n) {
            return Err(crate::error::Error::Invalid(format!(
                "layer {bad} is not one of the model's layers 1..={n}"
            )));
        }
        self.taps = layers.to_vec();
        Ok(())
    }

    pub fn taps(&self) -> &[usize] {
        &self.taps
    }

    /// The states of the tapped layers at the positions of the last forward, in the order
    /// of [`Decoder::set_taps`].
    pub fn tapped(&self) -> &[Tensor] {
        &self.tapped
    }

    /// The state of tapped layer `layer` from the last forward.
    pub fn tap_of(&self, layer: usize) -> Option<&Tensor> {
        let i = self.taps.iter().position(|&l| l == layer)?;
        self.tapped.get(i)
    }

    /// Orders what a forward collected (by layer) as the taps were asked for.
    fn keep_taps(&mut self, by_layer: Vec<(usize, Tensor)>) {
        self.tapped = self
            .taps
            .iter()
            .map(|l| {
                let i = by_layer.iter().position(|(k, _)| k == l).expect("every tap is collected");
                by_layer[i].1.clone()
            })
            .collect();
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, w, eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)
        }
    }

    fn rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
        if self.differentiable {
            candle_nn::rotary_emb::rope_slow(x, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(x, cos, sin)
        }
    }

    fn softmax(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::softmax(x, candle_core::D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(x)
        }
    }

    pub fn clear_cache(&mut self) {
        self.cache.truncate(0);
    }

    /// Swaps the KV cache for `other` (several sequences take turns on one decoder).
    pub fn swap_cache(&mut self, other: &mut KvCache) {
        std::mem::swap(&mut self.cache, other);
    }

    /// An empty cache for this decoder, to hand to [`Decoder::swap_cache`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.layers.len(), self.cache.row)
    }

    /// Tokens already in the KV cache.
    pub fn cached_len(&self) -> usize {
        self.cache.len
    }

    /// Drops cached positions from `len` on (e.g. to reuse a shared prompt prefix).
    pub fn truncate_cache(&mut self, len: usize) -> Result<()> {
        self.cache.truncate(len);
        Ok(())
    }

    fn rope_tables(&self, pos: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let positions =
            Tensor::arange(pos as u32, (pos + len) as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
        let freqs = positions
            .unsqueeze(1)?
            .broadcast_mul(&self.inv_freq.unsqueeze(0)?)?;
        Ok((freqs.cos()?, freqs.sin()?))
    }

    /// Runs `ids` at positions `pos..`, appending to the KV cache; returns the final
    /// normed hidden states `[len, hidden]` (what the LM head and the verdict heads read).
    pub fn forward_hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        if pos != self.cache.len {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: position {pos} given, but the KV cache holds {} positions",
                self.cache.len
            )));
        }
        // RoPE tables and the KV cache are sized by the context; every caller (run,
        // serve, bench, train) gets this one check.
        let ctx = self.cfg.max_position_embeddings;
        if pos.saturating_add(ids.len()) > ctx {
            return Err(crate::error::Error::Invalid(format!(
                "{} tokens at position {pos} go past the model's context of {ctx}",
                ids.len()
            )));
        }
        if !self.differentiable {
            return self.forward_inference(ids, pos);
        }
        let s = ids.len();
        let ids_t = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let mut x = self.embed.forward(&ids_t)?;
        let (cos, sin) = self.rope_tables(pos, s)?;
        let mask = if s > 1 {
            Some(causal_mask(s, pos)?)
        } else {
            None
        };
        let n_layers = self.layers.len();
        let mut taps = Vec::new();
        for l in 0..n_layers {
            let r = x.clone();
            let h = self.rms_norm(&x, &self.layers[l].attn_norm)?;
            let a = self.attention(l, &h, &cos, &sin, mask.as_ref())?;
            x = (r + a)?;
            let r = x.clone();
            let layer = &self.layers[l];
            let h = self.rms_norm(&x, &layer.ffn_norm)?;
            let h = gate(&self.gates[l].mlp, h)?;
            let d = self.differentiable;
            let g = candle_nn::ops::silu(&layer.gate.forward(&h, d)?)?;
            let m = layer.down.forward(&(g * layer.up.forward(&h, d)?)?, d)?;
            x = (r + m)?;
            if l + 1 < n_layers && self.taps.contains(&(l + 1)) {
                let ones = Tensor::ones(self.cfg.hidden_size, DType::F32, &Device::Cpu)?;
                taps.push((l + 1, self.rms_norm(&x, &ones)?.squeeze(0)?));
            }
        }
        let x = self.rms_norm(&x, &self.norm)?.squeeze(0)?;
        if self.taps.contains(&n_layers) {
            taps.push((n_layers, x.clone()));
        }
        self.keep_taps(taps);
        Ok(x)
    }

    fn attention(
        &mut self,
        l: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = h.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_heads, self.cfg.num_kv_heads, self.cfg.head_dim);
        let layer = &self.layers[l];
        let gates = &self.gates[l];
        let d = self.differentiable;
        let q = gate(&gates.q, layer.q.forward(h, d)?)?;
        let k = gate(&gates.k, layer.k.forward(h, d)?)?;
        let v = gate(&gates.v, layer.v.forward(h, d)?)?;
        let mut q = q.reshape((b, s, nh, hd))?;
        let mut k = k.reshape((b, s, nkv, hd))?;
        if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
            q = self.rms_norm(&q, qn)?;
            k = self.rms_norm(&k, kn)?;
        }
        let q = self.rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = self.rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.reshape((b, s, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let (k, v) = self.append_kv(l, &k, &v)?;
        let (layer, gates) = (&self.layers[l], &self.gates[l]);
        let rep = nh / nkv;
        let total = k.dim(2)?;
        let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return Ok(t.clone());
            }
            t.unsqueeze(2)?
                .broadcast_as((b, nkv, rep, total, hd))?
                .reshape((b, nh, total, hd))
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let scale = 1.0 / (hd as f64).sqrt();
        let mut att = (q.matmul(&k.t()?)? * scale)?;
        if let Some(m) = mask {
            att = att.broadcast_add(m)?;
        }
        let att = self.softmax(&att)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, s, nh * hd))?;
        let y = gate(&gates.o, y)?;
        Ok(layer.o.forward(&y, d)?)
    }

    /// Appends `[1, kv_heads, s, head_dim]` keys and values to layer `l`'s cache and returns
    /// all of them; for positions already cached, the gradient stops there (training
    /// always starts from an empty cache).
    fn append_kv(&mut self, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (nkv, hd) = (self.cfg.num_kv_heads, self.cfg.head_dim);
        let (past, row) = (self.cache.len, self.cache.row);
        let (ck, cv) = &mut self.cache.layers[l];
        let as_rows = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
            t.squeeze(0)?
                .transpose(0, 1)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let past_t = |c: &[f32]| -> candle_core::Result<Tensor> {
            Tensor::from_slice(&c[..past * row], (past, nkv, hd), &Device::Cpu)?
                .transpose(0, 1)?
                .unsqueeze(0)
        };
        let earlier = if past == 0 {
            None
        } else {
            Some((past_t(ck)?, past_t(cv)?))
        };
        ck.truncate(past * row);
        cv.truncate(past * row);
        ck.extend(as_rows(k)?);
        cv.extend(as_rows(v)?);
        if l + 1 == self.layers.len() {
            self.cache.len = past + k.dim(2)?;
        }
        Ok(match earlier {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        })
    }

    /// Logits `[rows, vocab]` for hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(product(&self.lm_head, hidden, self.differentiable)?)
    }

    /// Convenience for tests and scoring: logits for every position of `ids` from a
    /// fresh cache.
    pub fn forward_all(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.clear_cache();
        let h = self.forward_hidden(ids, 0)?;
        self.logits(&h)
    }

    pub fn embedding(&self) -> &Embedding {
        &self.embed
    }
}

fn causal_mask(s: usize, pos: usize) -> candle_core::Result<Tensor> {
    let total = s + pos;
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (s, total), &Device::Cpu)
}
