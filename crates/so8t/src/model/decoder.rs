//! One decoder for every supported Llama-family architecture (spec §1):
//! `embed → L × [x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x))] → RMSNorm → lm_head`.
//! Architecture differences are the flags in [`ModelConfig`]. Activations are f32. The
//! layer loop is [`Decoder::run`], once, over the steps of [`Ops`]: on plain buffers and
//! the kernels for inference on the CPU ([`Decoder::forward_hidden`]), on candle ops for
//! inference on a GPU and for gates training ([`Decoder::forward_hidden_autograd`]).

use super::layer::{KvCache, Layer, Projection, Vector};
use super::tensors::Tensors;
use super::buffers::{Buffers, Pool};
use super::ops::{Injected, Ops, Span};
use super::rotation::BlockRotation;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::formats::{matmul, matmul_frozen, Embedding, Matrix, WeightStore};
use candle_core::{Device, Tensor};

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

/// What a forward over a prompt with images takes besides its token ids (Qwen2-VL): the
/// images' features at their placeholder tokens and every token's multimodal RoPE position
/// (`crate::vision` computes both).
#[derive(Clone, Debug)]
pub struct Media {
    /// Indices into the run's ids of the placeholder tokens, in order.
    pub rows: Vec<usize>,
    /// The features that replace their embeddings, `[rows, hidden]` row-major.
    pub embeds: Vec<f32>,
    /// (temporal, height, width) RoPE position of every token of the run.
    pub positions: Vec<[u32; 3]>,
    /// What the RoPE positions of the text tokens after the run add to their cache
    /// positions (transformers' `rope_deltas`).
    pub delta: i64,
}

impl Media {
    /// The part of the run `from..to` covers (a chunk of a prompt read in pieces): its
    /// placeholders, features and positions; the delta is the whole run's.
    pub fn slice(&self, from: usize, to: usize) -> Media {
        let hidden = if self.rows.is_empty() { 0 } else { self.embeds.len() / self.rows.len() };
        let (mut rows, mut embeds) = (Vec::new(), Vec::new());
        for (k, &r) in self.rows.iter().enumerate() {
            if (from..to).contains(&r) {
                rows.push(r - from);
                embeds.extend_from_slice(&self.embeds[k * hidden..(k + 1) * hidden]);
            }
        }
        Media {
            rows,
            embeds,
            positions: self.positions[from.min(self.positions.len())..to.min(self.positions.len())].to_vec(),
            delta: self.delta,
        }
    }
}

pub struct Decoder {
    pub cfg: ModelConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vector,
    lm_head: Matrix,
    /// Where the weights, the gates and the KV caches live, and what f16/bf16 weights
    /// multiply in there ([`Decoder::to_device`]).
    device: Device,
    dtype: crate::device::Dtype,
    /// Inference on candle ops even on the CPU ([`Decoder::use_tensor_backend`]).
    tensor_backend: bool,
    inv_freq: Vec<f32>,
    /// LongRoPE's set for sequences past its original context.
    inv_freq_long: Option<Vec<f32>>,
    cache: KvCache,
    pool: Pool,
    pub gates: Vec<LayerGates>,
    /// Layers (1..=L) whose hidden state each forward keeps for the verdict heads (spec §5:
    /// the residual after that block, RMS-normed with unit weight; L is the final normed
    /// state), in this order, and what the last forward kept, `[len, hidden]` each.
    taps: Vec<usize>,
    tapped: Vec<Tensor>,
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
            let norm = |name: &str, len: usize| -> Result<Vector> {
                Ok(Vector::new(ws.vector(name, len)?.to_vec1::<f32>()?))
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(norm(&format!("{a}.q_norm.weight"), hd)?),
                    Some(norm(&format!("{a}.k_norm.weight"), hd)?),
                )
            } else {
                (None, None)
            };
            let ff = cfg.intermediate_size;
            // Fused projections are cut into their parts once, here, so the layer loop and
            // the gates see q, k, v and gate, up as every other architecture has them.
            let ([q, k, v], [gate, up]) = if cfg.arch.fused_projections() {
                let qkv = ws.matrix(&format!("{a}.qkv_proj.weight"), (nh + 2 * nkv) * hd, h)?;
                let gate_up = ws.matrix(&format!("{m}.gate_up_proj.weight"), 2 * ff, h)?;
                (
                    Projection::cut(ws, qkv, [nh * hd, nkv * hd, nkv * hd], &format!("{a}.qkv_proj.weight"))?,
                    Projection::cut(ws, gate_up, [ff, ff], &format!("{m}.gate_up_proj.weight"))?,
                )
            } else {
                (
                    [
                        Projection::load(ws, &format!("{a}.q_proj"), nh * hd, h, cfg.qkv_bias)?,
                        Projection::load(ws, &format!("{a}.k_proj"), nkv * hd, h, cfg.qkv_bias)?,
                        Projection::load(ws, &format!("{a}.v_proj"), nkv * hd, h, cfg.qkv_bias)?,
                    ],
                    [
                        Projection::load(ws, &format!("{m}.gate_proj"), ff, h, false)?,
                        Projection::load(ws, &format!("{m}.up_proj"), ff, h, false)?,
                    ],
                )
            };
            layers.push(Layer {
                attn_norm: norm(&format!("{p}.input_layernorm.weight"), h)?,
                q,
                k,
                v,
                o: Projection::load(ws, &format!("{a}.o_proj"), h, nh * hd, false)?,
                q_norm,
                k_norm,
                ffn_norm: norm(&format!("{p}.post_attention_layernorm.weight"), h)?,
                gate,
                up,
                down: Projection::load(
                    ws,
                    &format!("{m}.down_proj"),
                    h,
                    cfg.intermediate_size,
                    false,
                )?,
            });
        }
        let norm = Vector::new(ws.vector("model.norm.weight", h)?.to_vec1::<f32>()?);
        let lm_head = if cfg.tie_word_embeddings && !ws.contains("lm_head.weight") {
            // A half-precision table stays half as the LM head (half the bytes read per
            // token); the lookups use the embedding's own copy.
            if ws.is_half_precision("model.embed_tokens.weight") {
                ws.matrix("model.embed_tokens.weight", cfg.vocab_size, h)?
            } else {
                embed.as_matrix()?
            }
        } else {
            ws.matrix("lm_head.weight", cfg.vocab_size, h)?
        };
        Ok(Decoder {
            cache: KvCache::new(cfg.num_layers, cfg.num_kv_heads * cfg.head_dim),
            pool: Pool::default(),
            gates: vec![LayerGates::default(); cfg.num_layers],
            inv_freq: cfg.rope_inv_freq(false),
            inv_freq_long: cfg.rope_long_after().map(|_| cfg.rope_inv_freq(true)),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            device: Device::Cpu,
            dtype: crate::device::Dtype::Auto,
            tensor_backend: false,
            taps: Vec::new(),
            tapped: Vec::new(),
        })
    }

    /// Stores every f32 projection of the layers as `ty` blocks, made by ggml's quantiser
    /// (what an export at `ty` holds), so that prompts run on the kernels (on a GPU,
    /// candle's): the features of a `ty` export at its speed. Returns how many matrices
    /// changed.
    pub fn quantize_dense(&mut self, ty: so8t_kernels::QType) -> Result<usize> {
        let mut n = 0;
        for layer in &mut self.layers {
            for p in layer.projections_mut() {
                if let Some(wide) = p.w.widened()? {
                    p.w = wide;
                }
                if let Matrix::Dense(w) = &p.w {
                    let (rows, cols) = w.dims2()?;
                    let data = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let Some(bytes) = so8t_kernels::quantize::quantize_rows(ty, &data, cols) else {
                        continue;
                    };
                    let m = so8t_kernels::QMatrix::new(ty, rows, cols, bytes).map_err(|e| {
                        crate::error::Error::Invalid(format!("quantising a {rows}×{cols} matrix: {e}"))
                    })?;
                    // On a GPU, as candle's quantised tensor there.
                    p.w = Matrix::Quant(std::sync::Arc::new(m)).to_device(&self.device, self.dtype)?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }

    /// Every f16/bf16 matrix as dense f32: gates training differentiates through the
    /// weights with candle's gemm, which wants them so (inference keeps them half).
    /// Returns how many changed.
    pub fn widen_half_precision(&mut self) -> Result<usize> {
        let mut n = 0;
        let projections = self.layers.iter_mut().flat_map(|l| l.projections_mut().map(|p| &mut p.w));
        for w in projections.chain(std::iter::once(&mut self.lm_head)) {
            if let Some(dense) = w.widened()? {
                *w = dense;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Moves the weights, the gates and the cache to `device` (the embedding table stays in
    /// host memory: a forward looks up its rows there). On a GPU every forward runs on the
    /// tensor backend, and what it returns (states, taps) lives there; `dtype` is what f16
    /// and bf16 weights multiply in there.
    pub fn to_device(&mut self, device: &Device, dtype: crate::device::Dtype) -> Result<()> {
        if self.device.same_device(device) {
            return Ok(());
        }
        if !self.device.is_cpu() {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: already on {}; a decoder moves from the CPU once",
                crate::device::name(&self.device)
            )));
        }
        for layer in &mut self.layers {
            layer.to_device(device, dtype)?;
        }
        self.norm.to_device(device)?;
        self.lm_head = self.lm_head.to_device(device, dtype)?;
        for g in &mut self.gates {
            for site in Site::ALL {
                if let Some(r) = g.slot(site) {
                    *r = r.to_device(device)?;
                }
            }
        }
        self.cache = self.new_cache();
        self.device = device.clone();
        self.dtype = dtype;
        Ok(())
    }

    /// Runs inference on the CPU with the ops a GPU runs (candle's, fused where they
    /// exist) instead of the kernels: slower; the tests check the GPU's path against the
    /// kernels with it on machines without one.
    pub fn use_tensor_backend(&mut self, on: bool) {
        self.tensor_backend = on;
    }

    pub fn device(&self) -> &Device {
        &self.device
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

    pub fn clear_cache(&mut self) {
        self.cache.truncate(0);
    }

    /// An empty cache for this decoder, for a sequence of its own ([`Decoder::forward_batch`]).
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

    /// Runs `ids` at positions `pos..`, appending to the KV cache; returns the final
    /// normed hidden states `[len, hidden]` (what the LM head and the verdict heads read).
    pub fn forward_hidden(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        self.forward_own(ids, pos, false)
    }

    /// [`Decoder::forward_hidden`] of tokens among which are images' placeholders: their
    /// embeddings are `media`'s features, and every token rotates at its multimodal RoPE
    /// position; the text that follows continues from the positions `media` says.
    pub fn forward_hidden_media(&mut self, ids: &[u32], pos: usize, media: &Media) -> Result<Tensor> {
        self.check_media(ids, media)?;
        self.check_run(&self.cache, ids.len(), pos)?;
        let mut cache = std::mem::replace(&mut self.cache, KvCache::new(0, 0));
        let out = self.forward_on(&mut [&mut cache], &[ids], &[Some(media)], false);
        self.cache = cache;
        out
    }

    fn check_media(&self, ids: &[u32], media: &Media) -> Result<()> {
        if self.cfg.mrope_section.is_none() {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: a {} model takes no images",
                self.cfg.arch.name()
            )));
        }
        if media.positions.len() != ids.len()
            || media.embeds.len() != media.rows.len() * self.cfg.hidden_size
            || media.rows.iter().any(|&r| r >= ids.len())
        {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: image features for {} of {} tokens with {} positions do not fit the run",
                media.rows.len(),
                ids.len(),
                media.positions.len()
            )));
        }
        Ok(())
    }

    /// A forward of the decoder's own cache.
    fn forward_own(&mut self, ids: &[u32], pos: usize, differentiable: bool) -> Result<Tensor> {
        self.check_run(&self.cache, ids.len(), pos)?;
        let mut cache = std::mem::replace(&mut self.cache, KvCache::new(0, 0));
        let out = self.forward_on(&mut [&mut cache], &[ids], &[None], differentiable);
        self.cache = cache;
        out
    }

    /// [`Decoder::forward_hidden`] for several sequences in one pass over the weights
    /// (continuous batching): sequence `i` runs `ids[i]` after what `caches[i]` holds
    /// (caches from [`Decoder::new_cache`]). The rows of the result, and of
    /// [`Decoder::tapped`], are the sequences' in order.
    pub fn forward_batch(&mut self, caches: &mut [&mut KvCache], ids: &[&[u32]]) -> Result<Tensor> {
        self.forward_batch_media(caches, ids, &vec![None; ids.len()])
    }

    /// [`Decoder::forward_batch`] where sequence `i` may hold images (`media[i]`, as
    /// [`Decoder::forward_hidden_media`] takes them).
    pub fn forward_batch_media(
        &mut self,
        caches: &mut [&mut KvCache],
        ids: &[&[u32]],
        media: &[Option<&Media>],
    ) -> Result<Tensor> {
        if caches.len() != ids.len() || ids.is_empty() || media.len() != ids.len() {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: a batch of {} caches for {} sequences",
                caches.len(),
                ids.len()
            )));
        }
        for (cache, ids) in caches.iter().zip(ids) {
            if cache.layers.len() != self.layers.len() || cache.row != self.cache.row {
                return Err(crate::error::Error::Invalid(
                    "decoder: a KV cache made for another model".into(),
                ));
            }
            self.check_run(cache, ids.len(), cache.len)?;
        }
        for (m, ids) in media.iter().zip(ids) {
            if let Some(m) = m {
                self.check_media(ids, m)?;
            }
        }
        self.forward_on(caches, ids, media, false)
    }

    /// Runs sequence `i`'s `ids[i]` (with `media[i]`'s images) after what `caches[i]`
    /// holds, on the one choice of backend: the kernels on the CPU, candle ops on a GPU or
    /// where gradients must flow.
    fn forward_on(
        &mut self,
        caches: &mut [&mut KvCache],
        ids: &[&[u32]],
        media: &[Option<&Media>],
        differentiable: bool,
    ) -> Result<Tensor> {
        let on_kernels = self.device.is_cpu() && !differentiable && !self.tensor_backend;
        if on_kernels && caches.iter().any(|c| c.holds_tensors()) {
            return Err(crate::error::Error::Invalid(
                "decoder: this KV cache was filled by the tensor backend; clear it first".into(),
            ));
        }
        let runs: Vec<_> = caches
            .iter_mut()
            .zip(ids)
            .map(|(c, ids)| rope_restart(&self.cfg, c, ids))
            .collect();
        let mut pool = std::mem::take(&mut self.pool);
        let spans: Vec<Span> = caches
            .iter()
            .zip(&runs)
            .zip(media)
            .map(|((c, r), m)| Span {
                pos: c.len,
                len: r.len(),
                inv_freq: self.rope_set(c),
                mrope: m.map(|m| m.positions.as_slice()),
                delta: c.rope_delta(),
            })
            .collect();
        let (mut rows, mut values) = (Vec::new(), Vec::new());
        let mut start = 0;
        for (m, r) in media.iter().zip(&runs) {
            if let Some(m) = m {
                rows.extend(m.rows.iter().map(|&i| start + i));
                values.extend_from_slice(&m.embeds);
            }
            start += r.len();
        }
        let injected = Injected { rows: &rows, values: &values };
        let out = if on_kernels {
            let ops = Buffers::new(&mut pool, &self.cfg, &spans);
            drop(spans);
            self.run(ops, caches, &runs, &injected)
        } else {
            let ops = Tensors::new(&self.cfg, &self.device, differentiable, &spans);
            drop(spans);
            ops.and_then(|ops| self.run(ops, caches, &runs, &injected))
        };
        if out.is_ok() {
            for (c, m) in caches.iter_mut().zip(media) {
                if let Some(m) = m {
                    c.rope_deltas.push((c.len, m.delta));
                    if let Some(&first) = m.rows.first() {
                        let at = c.len - m.positions.len() + first;
                        c.media_from = Some(c.media_from.map_or(at, |f| f.min(at)));
                    }
                }
            }
        }
        self.pool = pool;
        let kept: Vec<(usize, usize)> = runs.iter().zip(ids).map(|(r, ids)| (r.len(), ids.len())).collect();
        self.keep_last(out?, &kept)
    }

    /// [`Decoder::forward_hidden`] on ops that gradients flow through, to the gates'
    /// generators (gates training): slower, and the same numbers to f32 rounding.
    pub fn forward_hidden_autograd(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        self.forward_own(ids, pos, true)
    }

    /// The inverse frequencies for the factor set `cache` was filled with.
    fn rope_set(&self, cache: &KvCache) -> &[f32] {
        match (&self.inv_freq_long, cache.long_rope) {
            (Some(long), true) => long,
            _ => &self.inv_freq,
        }
    }

    /// The last rows of a forward's states and taps, per sequence: `(ran, asked)` rows each,
    /// of which the last `asked` are kept (all of them unless the forward ran a sequence's
    /// cached positions again).
    fn keep_last(&mut self, hidden: Tensor, kept: &[(usize, usize)]) -> Result<Tensor> {
        if kept.iter().all(|(ran, asked)| ran == asked) {
            return Ok(hidden);
        }
        let mut rows = Vec::new();
        let mut start = 0;
        for &(ran, asked) in kept {
            rows.extend((start + ran - asked..start + ran).map(|r| r as u32));
            start += ran;
        }
        let rows = Tensor::new(rows.as_slice(), hidden.device())?;
        for t in self.tapped.iter_mut() {
            *t = t.index_select(&rows, 0)?;
        }
        Ok(hidden.index_select(&rows, 0)?)
    }

    fn check_run(&self, cache: &KvCache, len: usize, pos: usize) -> Result<()> {
        if pos != cache.len {
            return Err(crate::error::Error::Invalid(format!(
                "decoder: position {pos} given, but the KV cache holds {} positions",
                cache.len
            )));
        }
        if len == 0 {
            return Err(crate::error::Error::Invalid("decoder: no tokens to run".into()));
        }
        // RoPE tables and the KV cache are sized by the context; every caller (run,
        // serve, bench, train) gets this one check.
        let ctx = self.cfg.context();
        if pos.saturating_add(len) > ctx {
            return Err(crate::error::Error::Invalid(format!(
                "{len} tokens at position {pos} go past the model's context of {ctx}"
            )));
        }
        Ok(())
    }

    /// The layer loop: every step of a layer, and where each gate sits (spec §4), in order.
    /// Sequence `i` runs `ids[i]` after what `caches[i]` holds.
    fn run<B: Ops, I: AsRef<[u32]>>(
        &mut self,
        mut b: B,
        caches: &mut [&mut KvCache],
        ids: &[I],
        injected: &Injected,
    ) -> Result<Tensor> {
        let (nh, nkv) = (self.cfg.num_heads, self.cfg.num_kv_heads);
        let n_layers = self.layers.len();
        let mut taps = Vec::new();
        let all: Vec<u32> = ids.iter().flat_map(|i| i.as_ref().iter().copied()).collect();
        let mut x = b.embed(&self.embed, &all, injected)?;
        for l in 0..n_layers {
            let (layer, gates) = (&self.layers[l], &self.gates[l]);
            let h = b.rms_norm(&x, &layer.attn_norm)?;
            let [q, k, v] = b.project([&layer.q, &layer.k, &layer.v], h)?;
            let q = b.rotate(gates.q.as_ref(), q)?;
            let k = b.rotate(gates.k.as_ref(), k)?;
            let v = b.rotate(gates.v.as_ref(), v)?;
            let (q, k) = match (&layer.q_norm, &layer.k_norm) {
                (Some(qn), Some(kn)) => (b.head_norm(q, qn)?, b.head_norm(k, kn)?),
                _ => (q, k),
            };
            let (q, k) = (b.rope(q, nh)?, b.rope(k, nkv)?);
            let y = b.attend(caches, l, q, k, v)?;
            let y = b.rotate(gates.o.as_ref(), y)?;
            let [a] = b.project([&layer.o], y)?;
            x = b.add(x, a)?;
            let h = b.rms_norm(&x, &layer.ffn_norm)?;
            let h = b.rotate(gates.mlp.as_ref(), h)?;
            let [g, u] = b.project([&layer.gate, &layer.up], h)?;
            let m = b.swiglu(g, u)?;
            let [m] = b.project([&layer.down], m)?;
            x = b.add(x, m)?;
            if l + 1 < n_layers && self.taps.contains(&(l + 1)) {
                taps.push((l + 1, b.tap(&x)?));
            }
        }
        for (cache, ids) in caches.iter_mut().zip(ids) {
            let (pos, ids) = (cache.len, ids.as_ref());
            cache.len = pos + ids.len();
            cache.ids.truncate(pos);
            cache.ids.extend_from_slice(ids);
        }
        let out = b.rms_norm(&x, &self.norm)?;
        let hidden = b.finish(out)?;
        if self.taps.contains(&n_layers) {
            taps.push((n_layers, hidden.clone()));
        }
        self.keep_taps(taps);
        Ok(hidden)
    }

    /// Logits `[rows, vocab]` for hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(matmul(&self.lm_head, hidden)?)
    }

    /// [`Decoder::logits`] that passes gradients to `hidden` (gates training).
    pub fn logits_autograd(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(matmul_frozen(&self.lm_head, hidden)?)
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

/// LongRoPE: a sequence runs with one factor set throughout, the set for its length
/// (transformers drops its cache and runs the whole sequence again when generation first
/// passes the original context). When `ids` after what `cache` holds change the set the
/// cache was filled with, the cache is emptied and the tokens to run are the cached ones
/// and then `ids`; keys of two sets never share a cache.
fn rope_restart<'i>(cfg: &ModelConfig, cache: &mut KvCache, ids: &'i [u32]) -> std::borrow::Cow<'i, [u32]> {
    let pos = cache.len;
    let long = cfg.rope_long_after().is_some_and(|orig| pos + ids.len() > orig);
    if pos == 0 || long == cache.long_rope {
        cache.long_rope = long;
        return ids.into();
    }
    let mut all = cache.ids[..pos].to_vec();
    all.extend_from_slice(ids);
    cache.truncate(0);
    cache.long_rope = long;
    all.into()
}
