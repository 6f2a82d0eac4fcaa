//! The tensor backend: the decoder's steps as candle ops on a device. It runs the decoder
//! on a GPU (`--device cuda`), where candle's fused RMSNorm, RoPE and softmax kernels do
//! those steps, and gates training on any device, where gradients must flow (to the
//! gates' generators; the frozen weights get none): candle's fused kernels have no
//! backward pass and would silently stop them, so there the composed forms run.
//! Activations are `[1, positions, width]` f32 (a GPU's f16/bf16 weights take them in
//! their own type for the product: [`crate::formats::Matrix::forward`]).

use super::layer::{KvCache, Projection, Vector};
use super::ops::{rope_tables, Injected, Ops, Run, Span};
use super::rotation::BlockRotation;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::{matmul_frozen, Embedding};
use candle_core::{Device, Tensor, D};

/// One forward's run of the rows of one or more sequences.
pub(super) struct Tensors {
    run: Run,
    device: Device,
    differentiable: bool,
    /// Each sequence's first position and rows, in the run's order.
    spans: Vec<(usize, usize)>,
    /// RoPE tables `[s, rotary_dim / 2]`, each row at its sequence's position.
    cos: Tensor,
    sin: Tensor,
}

impl Tensors {
    pub(super) fn new(cfg: &ModelConfig, device: &Device, differentiable: bool, spans: &[Span]) -> Result<Self> {
        let s: usize = spans.iter().map(|sp| sp.len).sum();
        let half = cfg.rotary_dim / 2;
        let (mut cos, mut sin) = (vec![0f32; s * half], vec![0f32; s * half]);
        rope_tables(spans, half, cfg.rope_attention_factor(), cfg.mrope_section, &mut cos, &mut sin);
        Ok(Tensors {
            run: Run::new(cfg, s),
            device: device.clone(),
            differentiable,
            spans: spans.iter().map(|sp| (sp.pos, sp.len)).collect(),
            cos: Tensor::from_vec(cos, (s, half), device)?,
            sin: Tensor::from_vec(sin, (s, half), device)?,
        })
    }

    fn norm(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::rms_norm_slow(x, w, self.run.eps)
        } else {
            candle_nn::ops::rms_norm(&x.contiguous()?, w, self.run.eps)
        }
    }

    /// `[1, s, heads·hd]` as `[1, heads, s, hd]`.
    fn by_head(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        let s = x.dim(1)?;
        x.reshape((1, s, heads, self.run.head_dim))?.transpose(1, 2)?.contiguous()
    }

    /// Appends `[1, kv_heads, s, hd]` keys and values to layer `l`'s cache and returns all
    /// of them. The cache keeps them detached: the gradient of a step stops at positions an
    /// earlier forward computed (training always starts from an empty cache).
    fn append_kv(cache: &mut KvCache, l: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &cache.tensors[l] {
            _ if cache.len == 0 => (k, v),
            Some((ck, cv)) => (Tensor::cat(&[ck, &k], 2)?, Tensor::cat(&[cv, &v], 2)?),
            None => {
                return Err(Error::Invalid(
                    "decoder: this KV cache was filled on the CPU kernels, not on this device".into(),
                ))
            }
        };
        cache.tensors[l] = Some((k.detach(), v.detach()));
        Ok((k, v))
    }

    fn softmax(&self, att: &Tensor) -> candle_core::Result<Tensor> {
        if self.differentiable {
            candle_nn::ops::softmax(att, D::Minus1)
        } else {
            candle_nn::ops::softmax_last_dim(att)
        }
    }
}

impl Ops for Tensors {
    type X = Tensor;

    fn embed(&mut self, e: &Embedding, ids: &[u32], injected: &Injected) -> Result<Tensor> {
        // The table stays in host memory (one row per token crosses to the device).
        let mut x = e.forward(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?.to_dtype(candle_core::DType::F32)?;
        if !injected.rows.is_empty() {
            // No gradient flows into embeddings (the table and the vision tower are frozen).
            let (_, n, hidden) = x.dims3()?;
            let mut v = x.flatten_all()?.to_vec1::<f32>()?;
            injected.apply(&mut v, hidden);
            x = Tensor::from_vec(v, (1, n, hidden), &Device::Cpu)?;
        }
        Ok(x.to_device(&self.device)?)
    }

    fn rms_norm(&mut self, x: &Tensor, w: &Vector) -> Result<Tensor> {
        Ok(self.norm(x, &w.tensor(&self.device)?)?)
    }

    fn head_norm(&mut self, x: Tensor, w: &Vector) -> Result<Tensor> {
        let (_, s, width) = x.dims3()?;
        let heads = width / w.len();
        let y = self.norm(&x.reshape((1, s, heads, w.len()))?, &w.tensor(&self.device)?)?;
        Ok(y.reshape((1, s, width))?)
    }

    fn project<const K: usize>(&mut self, ps: [&Projection; K], x: Tensor) -> Result<[Tensor; K]> {
        let mut out = Vec::with_capacity(K);
        for p in ps {
            let y = if self.differentiable { matmul_frozen(&p.w, &x)? } else { p.w.forward(&x)? };
            out.push(match &p.b {
                Some(b) => y.broadcast_add(&b.tensor(&self.device)?)?,
                None => y,
            });
        }
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("one output per projection")))
    }

    fn rotate(&mut self, gate: Option<&BlockRotation>, x: Tensor) -> Result<Tensor> {
        Ok(match gate {
            Some(r) => r.apply(&x)?,
            None => x,
        })
    }

    fn rope(&mut self, x: Tensor, heads: usize) -> Result<Tensor> {
        let (hd, rot) = (self.run.head_dim, self.run.rotary_dim);
        let x = self.by_head(&x, heads)?;
        let turn = |x: &Tensor| {
            if self.differentiable {
                candle_nn::rotary_emb::rope_slow(x, &self.cos, &self.sin)
            } else {
                candle_nn::rotary_emb::rope(x, &self.cos, &self.sin)
            }
        };
        let y = if rot == hd {
            turn(&x)?
        } else {
            let turned = turn(&x.narrow(3, 0, rot)?.contiguous()?)?;
            Tensor::cat(&[&turned, &x.narrow(3, rot, hd - rot)?], 3)?
        };
        Ok(y.transpose(1, 2)?.reshape((1, self.run.s, heads * self.run.head_dim))?)
    }

    fn attend(&mut self, caches: &mut [&mut KvCache], layer: usize, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let (nh, nkv, hd) = (self.run.heads, self.run.kv_heads, self.run.head_dim);
        let rep = nh / nkv;
        let mut outs = Vec::with_capacity(caches.len());
        let mut start = 0;
        for (cache, &(pos, s)) in caches.iter_mut().zip(&self.spans) {
            let part = |t: &Tensor, heads| self.by_head(&t.narrow(1, start, s)?, heads);
            let q = part(&q, nh)?;
            let (k, v) = Self::append_kv(cache, layer, part(&k, nkv)?, part(&v, nkv)?)?;
            let total = pos + s;
            let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
                if rep == 1 {
                    return Ok(t.clone());
                }
                t.unsqueeze(2)?.broadcast_as((1, nkv, rep, total, hd))?.reshape((1, nh, total, hd))
            };
            let (k, v) = (expand(&k)?, expand(&v)?);
            let mut att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
            if s > 1 {
                let mask: Vec<f32> = (0..s)
                    .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
                    .collect();
                att = att.broadcast_add(&Tensor::from_vec(mask, (s, total), &self.device)?)?;
            }
            let att = self.softmax(&att)?;
            outs.push(att.matmul(&v)?.transpose(1, 2)?.reshape((1, s, nh * hd))?);
            start += s;
        }
        Ok(if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(&outs, 1)? })
    }

    fn add(&mut self, x: Tensor, y: Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn swiglu(&mut self, g: Tensor, u: Tensor) -> Result<Tensor> {
        Ok((candle_nn::ops::silu(&g)? * u)?)
    }

    fn tap(&mut self, x: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones(x.dim(2)?, candle_core::DType::F32, &self.device)?;
        Ok(self.norm(x, &ones)?.squeeze(0)?)
    }

    fn finish(&mut self, x: Tensor) -> Result<Tensor> {
        Ok(x.squeeze(0)?)
    }
}
