//! The training backend: the decoder's steps as candle ops that gradients flow through
//! (to the gates' generators; the frozen weights get none). candle's fused RMSNorm, RoPE
//! and softmax kernels have no backward pass, so the slow forms are used: gradients would
//! silently stop at the fused ones. Activations are `[1, positions, width]`.

use super::layer::{KvCache, Projection};
use super::ops::{Ops, Run};
use super::rotation::BlockRotation;
use crate::config::ModelConfig;
use crate::error::Result;
use crate::formats::{matmul_frozen, Embedding};
use candle_core::{DType, Device, Tensor};

/// One forward's run of `s` positions of one sequence from position `pos`.
pub(super) struct Autograd {
    run: Run,
    pos: usize,
    /// RoPE tables `[s, rotary_dim / 2]`.
    cos: Tensor,
    sin: Tensor,
    /// Additive causal mask `[s, pos + s]` (none for one position).
    mask: Option<Tensor>,
}

impl Autograd {
    pub(super) fn new(cfg: &ModelConfig, inv_freq: &[f32], pos: usize, s: usize) -> Result<Self> {
        let positions = Tensor::arange(pos as u32, (pos + s) as u32, &Device::Cpu)?.to_dtype(DType::F32)?;
        let inv_freq = Tensor::new(inv_freq, &Device::Cpu)?;
        let freqs = positions.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        let mask = if s > 1 {
            let total = s + pos;
            let data: Vec<f32> = (0..s)
                .flat_map(|i| (0..total).map(move |j| if j > pos + i { f32::NEG_INFINITY } else { 0.0 }))
                .collect();
            Some(Tensor::from_vec(data, (s, total), &Device::Cpu)?)
        } else {
            None
        };
        let scale = cfg.rope_attention_factor() as f64;
        Ok(Autograd {
            run: Run::new(cfg, s),
            pos,
            cos: (freqs.cos()? * scale)?,
            sin: (freqs.sin()? * scale)?,
            mask,
        })
    }

    fn norm(&self, x: &Tensor, w: &[f32]) -> Result<Tensor> {
        let w = Tensor::new(w, &Device::Cpu)?;
        Ok(candle_nn::ops::rms_norm_slow(x, &w, self.run.eps)?)
    }

    /// `[1, s, heads·hd]` as `[1, heads, s, hd]`.
    fn by_head(&self, x: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
        x.reshape((1, self.run.s, heads, self.run.head_dim))?.transpose(1, 2)?.contiguous()
    }

    /// Appends `[1, kv_heads, s, hd]` keys and values to layer `l`'s cache and returns all
    /// of them; for positions already cached, the gradient stops there (training always
    /// starts from an empty cache).
    fn append_kv(&self, cache: &mut KvCache, l: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (nkv, hd, past, row) = (self.run.kv_heads, self.run.head_dim, self.pos, cache.row);
        let (ck, cv) = &mut cache.layers[l];
        let as_rows = |t: &Tensor| t.squeeze(0)?.transpose(0, 1)?.flatten_all()?.to_vec1::<f32>();
        let past_t = |c: &[f32]| -> candle_core::Result<Tensor> {
            Tensor::from_slice(&c[..past * row], (past, nkv, hd), &Device::Cpu)?
                .transpose(0, 1)?
                .unsqueeze(0)
        };
        let earlier = if past == 0 { None } else { Some((past_t(ck)?, past_t(cv)?)) };
        ck.truncate(past * row);
        cv.truncate(past * row);
        ck.extend(as_rows(k)?);
        cv.extend(as_rows(v)?);
        Ok(match earlier {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 2)?, Tensor::cat(&[&pv, v], 2)?),
        })
    }
}

impl Ops for Autograd {
    type X = Tensor;

    fn embed(&mut self, e: &Embedding, ids: &[u32]) -> Result<Tensor> {
        Ok(e.forward(&Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?)?)
    }

    fn rms_norm(&mut self, x: &Tensor, w: &[f32]) -> Result<Tensor> {
        self.norm(x, w)
    }

    fn head_norm(&mut self, x: Tensor, w: &[f32]) -> Result<Tensor> {
        let (_, s, width) = x.dims3()?;
        let heads = width / w.len();
        Ok(self.norm(&x.reshape((1, s, heads, w.len()))?, w)?.reshape((1, s, width))?)
    }

    fn project<const K: usize>(&mut self, ps: [&Projection; K], x: Tensor) -> Result<[Tensor; K]> {
        let mut out = Vec::with_capacity(K);
        for p in ps {
            let y = matmul_frozen(&p.w, &x)?;
            out.push(match &p.b {
                Some(b) => y.broadcast_add(&Tensor::new(b.as_slice(), &Device::Cpu)?)?,
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
        let y = if rot == hd {
            candle_nn::rotary_emb::rope_slow(&x, &self.cos, &self.sin)?
        } else {
            let turned = candle_nn::rotary_emb::rope_slow(&x.narrow(3, 0, rot)?.contiguous()?, &self.cos, &self.sin)?;
            Tensor::cat(&[&turned, &x.narrow(3, rot, hd - rot)?], 3)?
        };
        Ok(y.transpose(1, 2)?.reshape((1, self.run.s, heads * self.run.head_dim))?)
    }

    fn attend(&mut self, caches: &mut [&mut KvCache], layer: usize, q: Tensor, k: Tensor, v: Tensor) -> Result<Tensor> {
        let [cache] = caches else {
            unreachable!("the training backend runs one sequence (Decoder::forward_hidden_autograd)")
        };
        let (nh, nkv, hd, s) = (self.run.heads, self.run.kv_heads, self.run.head_dim, self.run.s);
        let q = self.by_head(&q, nh)?;
        let (k, v) = (self.by_head(&k, nkv)?, self.by_head(&v, nkv)?);
        let (k, v) = self.append_kv(cache, layer, &k, &v)?;
        let rep = nh / nkv;
        let total = k.dim(2)?;
        let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
            if rep == 1 {
                return Ok(t.clone());
            }
            t.unsqueeze(2)?
                .broadcast_as((1, nkv, rep, total, hd))?
                .reshape((1, nh, total, hd))
        };
        let (k, v) = (expand(&k)?, expand(&v)?);
        let mut att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        if let Some(m) = &self.mask {
            att = att.broadcast_add(m)?;
        }
        let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1)?;
        Ok(att.matmul(&v)?.transpose(1, 2)?.reshape((1, s, nh * hd))?)
    }

    fn add(&mut self, x: Tensor, y: Tensor) -> Result<Tensor> {
        Ok((x + y)?)
    }

    fn swiglu(&mut self, g: Tensor, u: Tensor) -> Result<Tensor> {
        Ok((candle_nn::ops::silu(&g)? * u)?)
    }

    fn tap(&mut self, x: &Tensor) -> Result<Tensor> {
        let ones = vec![1.0; x.dim(2)?];
        Ok(self.norm(x, &ones)?.squeeze(0)?)
    }

    fn finish(&mut self, x: Tensor) -> Result<Tensor> {
        Ok(x.squeeze(0)?)
    }
}
