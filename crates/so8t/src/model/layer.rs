//! What the layer loop runs on: one layer's weights, and the KV cache its attention
//! appends to.

use crate::error::Result;
use crate::formats::{Matrix, WeightStore};

pub(super) struct Projection {
    pub(super) w: Matrix,
    pub(super) b: Option<Vec<f32>>,
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
            Some(ws.vector(&format!("{prefix}.bias"), rows)?.to_vec1::<f32>()?)
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
    /// The seven projections, for passes that change how weights are stored.
    pub(super) fn projections_mut(&mut self) -> [&mut Projection; 7] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o, &mut self.gate, &mut self.up, &mut self.down]
    }
}

pub(super) struct Layer {
    pub(super) attn_norm: Vec<f32>,
    pub(super) q: Projection,
    pub(super) k: Projection,
    pub(super) v: Projection,
    pub(super) o: Projection,
    pub(super) q_norm: Option<Vec<f32>>,
    pub(super) k_norm: Option<Vec<f32>>,
    pub(super) ffn_norm: Vec<f32>,
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
    pub(super) len: usize,
    /// Values per position in one layer's K (or V): `kv_heads · head_dim`.
    pub(super) row: usize,
    /// The tokens of the cached positions (to run them again when LongRoPE switches sets).
    pub(super) ids: Vec<u32>,
    /// Whether the cached keys were rotated with LongRoPE's long factor set.
    pub(super) long_rope: bool,
}

impl KvCache {
    pub(super) fn new(layers: usize, row: usize) -> KvCache {
        KvCache {
            layers: vec![(Vec::new(), Vec::new()); layers],
            len: 0,
            row,
            ids: Vec::new(),
            long_rope: false,
        }
    }

    /// How many of the cached positions hold the first tokens of `ids`.
    pub fn shared_prefix(&self, ids: &[u32]) -> usize {
        self.ids.iter().zip(ids).take_while(|(a, b)| a == b).count()
    }

    /// Drops the cached positions from `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for (k, v) in self.layers.iter_mut() {
                k.truncate(len * self.row);
                v.truncate(len * self.row);
            }
            self.ids.truncate(len);
            self.len = len;
        }
    }
}
