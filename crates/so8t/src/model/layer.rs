//! What the layer loop runs on: one layer's weights, and the KV cache its attention
//! appends to.

use crate::error::Result;
use crate::formats::{Matrix, WeightStore};
use candle_core::{Device, Tensor};

/// A weight vector of a layer (a norm's scale, a bias): its values, which the buffers
/// backend reads, and, once the decoder has moved to a GPU, their copy there, which the
/// tensor backend reads (so no vector crosses to the device per forward).
#[derive(Clone, Debug)]
pub(super) struct Vector {
    values: Vec<f32>,
    on_device: Option<Tensor>,
}

impl Vector {
    pub(super) fn new(values: Vec<f32>) -> Vector {
        Vector { values, on_device: None }
    }

    /// The values as a tensor on `device`.
    pub(super) fn tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        match &self.on_device {
            Some(t) if t.device().same_device(device) => Ok(t.clone()),
            _ => Tensor::new(self.values.as_slice(), device),
        }
    }

    pub(super) fn to_device(&mut self, device: &Device) -> candle_core::Result<()> {
        self.on_device = if device.is_cpu() { None } else { Some(Tensor::new(self.values.as_slice(), device)?) };
        Ok(())
    }
}

impl std::ops::Deref for Vector {
    type Target = [f32];

    fn deref(&self) -> &[f32] {
        &self.values
    }
}

pub(super) struct Projection {
    pub(super) w: Matrix,
    pub(super) b: Option<Vector>,
}

impl Projection {
    pub(super) fn load(
        ws: &dyn WeightStore,
        prefix: &str,
        rows: usize,
        cols: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = ws.matrix(&format!("{prefix}.weight"), rows, cols)?;
        let b = if bias {
            Some(Vector::new(ws.vector(&format!("{prefix}.bias"), rows)?.to_vec1::<f32>()?))
        } else {
            None
        };
        Ok(Projection { w, b })
    }
}

impl Projection {
    /// A fused matrix `w` (tensor `name` of `ws`) as its parts of `rows` rows each.
    pub(super) fn cut<const N: usize>(
        ws: &dyn WeightStore,
        w: Matrix,
        rows: [usize; N],
        name: &str,
    ) -> Result<[Projection; N]> {
        let parts = w.split_rows(&rows).map_err(|e| {
            crate::error::Error::format(ws.path(), format!("tensor `{name}`: {}", crate::error::candle_message(&e)))
        })?;
        let parts: Vec<Projection> = parts.into_iter().map(|w| Projection { w, b: None }).collect();
        Ok(parts.try_into().unwrap_or_else(|_| unreachable!("split_rows gives one part per size")))
    }
}

impl Layer {
    /// The layer's weights, norms and biases on `device` (matrices in the form its kernels
    /// take: [`Matrix::to_device`]).
    pub(super) fn to_device(&mut self, device: &Device, dtype: crate::device::Dtype) -> Result<()> {
        for p in self.projections_mut() {
            p.w = p.w.to_device(device, dtype)?;
            if let Some(b) = &mut p.b {
                b.to_device(device)?;
            }
        }
        let norms = [Some(&mut self.attn_norm), Some(&mut self.ffn_norm), self.q_norm.as_mut(), self.k_norm.as_mut()];
        for v in norms.into_iter().flatten() {
            v.to_device(device)?;
        }
        Ok(())
    }

    /// The seven projections, for passes that change how weights are stored.
    pub(super) fn projections_mut(&mut self) -> [&mut Projection; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

pub(super) struct Layer {
    pub(super) attn_norm: Vector,
    pub(super) q: Projection,
    pub(super) k: Projection,
    pub(super) v: Projection,
    pub(super) o: Projection,
    pub(super) q_norm: Option<Vector>,
    pub(super) k_norm: Option<Vector>,
    pub(super) ffn_norm: Vector,
    pub(super) gate: Projection,
    pub(super) up: Projection,
    pub(super) down: Projection,
}

/// Keys and values of the positions seen so far: per layer, `[len, kv_heads, head_dim]`
/// f32, appended in place (capacity doubles, so a token costs no allocation).
/// Made by [`Decoder::new_cache`], which knows its row width.
#[derive(Clone)]
pub struct KvCache {
    pub(super) layers: Vec<(Vec<f32>, Vec<f32>)>,
    /// What the tensor backend (a GPU, gates training) keeps instead: each layer's keys and
    /// values `[1, kv_heads, len, head_dim]` where they were computed.
    pub(super) tensors: Vec<Option<(Tensor, Tensor)>>,
    pub(super) len: usize,
    /// Values per position in one layer's K (or V): `kv_heads · head_dim`.
    pub(super) row: usize,
    /// The tokens of the cached positions (to run them again when LongRoPE switches sets).
    pub(super) ids: Vec<u32>,
    /// Whether the cached keys were rotated with LongRoPE's long factor set.
    pub(super) long_rope: bool,
    /// Multimodal RoPE: from cache position `.0` on, text positions are rotated at their
    /// place plus `.1` (an image before them took fewer positions than tokens), the last
    /// entry applying; kept as a list so that truncating past an image restores the delta
    /// before it.
    pub(super) rope_deltas: Vec<(usize, i64)>,
    /// The first cached position that holds an image's features: a prompt sharing this
    /// cache's token ids from there on need not share its images (every image's
    /// placeholders are the same token), so prefixes are matched only before it.
    pub(super) media_from: Option<usize>,
}

impl KvCache {
    pub(super) fn new(layers: usize, row: usize) -> KvCache {
        KvCache {
            layers: vec![(Vec::new(), Vec::new()); layers],
            tensors: vec![None; layers],
            len: 0,
            row,
            ids: Vec::new(),
            long_rope: false,
            rope_deltas: Vec::new(),
            media_from: None,
        }
    }

    /// What the RoPE position of the next text token adds to its cache position.
    pub(super) fn rope_delta(&self) -> i64 {
        self.rope_deltas.last().map_or(0, |d| d.1)
    }

    /// How many of the cached positions hold the first tokens of `ids`.
    pub fn shared_prefix(&self, ids: &[u32]) -> usize {
        let n = self.ids.iter().zip(ids).take_while(|(a, b)| a == b).count();
        self.media_from.map_or(n, |m| n.min(m))
    }

    /// Whether the positions held were computed by the tensor backend.
    pub(super) fn holds_tensors(&self) -> bool {
        self.len > 0 && self.tensors.iter().any(Option::is_some)
    }

    /// Drops the cached positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for (k, v) in self.layers.iter_mut() {
                k.truncate(len * self.row);
                v.truncate(len * self.row);
            }
            for kv in self.tensors.iter_mut() {
                // A narrowing within the cached positions cannot fail.
                *kv = match kv.take() {
                    Some((k, v)) if len > 0 => Some((k.narrow(2, 0, len).expect("len < cached"), v.narrow(2, 0, len).expect("len < cached"))),
                    _ => None,
                };
            }
            self.ids.truncate(len);
            self.rope_deltas.retain(|&(from, _)| from <= len);
            self.media_from = self.media_from.filter(|&m| m < len);
            self.len = len;
        }
    }
}
