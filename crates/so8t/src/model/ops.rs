//! The steps a decoder layer is made of, as the one layer loop ([`super::Decoder`]) calls
//! them. Two backends compute them: [`super::buffers::Buffers`] on plain f32 buffers and
//! the kernels (inference: run, serve, eval, the training pass over the data) and
//! [`super::tensors::Tensors`] on candle ops, on a GPU or with gradients flowing through
//! (gates training). The order of the steps and where the gates sit are the loop's, written once.

use super::layer::{KvCache, Projection, Vector};
use super::rotation::BlockRotation;
use crate::error::Result;
use crate::formats::Embedding;
use candle_core::Tensor;

/// What both backends know of one forward: `s` rows (positions of one or more sequences),
/// and the model's attention shape.
pub(super) struct Run {
    pub s: usize,
    pub eps: f32,
    pub head_dim: usize,
    /// The leading dims of each head RoPE rotates.
    pub rotary_dim: usize,
    pub heads: usize,
    pub kv_heads: usize,
}

impl Run {
    pub fn new(cfg: &crate::config::ModelConfig, s: usize) -> Run {
        Run {
            s,
            eps: cfg.rms_norm_eps as f32,
            head_dim: cfg.head_dim,
            rotary_dim: cfg.rotary_dim,
            heads: cfg.num_heads,
            kv_heads: cfg.num_kv_heads,
        }
    }
}

/// One sequence's rows in a forward: `len` positions from `pos` in its KV cache, rotated
/// with `inv_freq` (its RoPE factor set) at the positions [`Span::rope_position`] gives.
pub(super) struct Span<'f> {
    pub pos: usize,
    pub len: usize,
    pub inv_freq: &'f [f32],
    /// Multimodal RoPE's (temporal, height, width) position of each of the `len` rows,
    /// when an image is among them; else every row's three positions are its text position.
    pub mrope: Option<&'f [[u32; 3]]>,
    /// What a text row's RoPE position adds to its place in the cache: an image before it
    /// took fewer positions than tokens (transformers' `rope_deltas`), 0 otherwise.
    pub delta: i64,
}

impl Span<'_> {
    /// Row `p`'s (temporal, height, width) RoPE positions.
    fn rope_position(&self, p: usize) -> [f32; 3] {
        match self.mrope {
            Some(m) => m[p].map(|x| x as f32),
            None => [((self.pos + p) as i64 + self.delta) as f32; 3],
        }
    }
}

/// RoPE's tables for the rows of `spans` in order, `[rows, half]` each: every row at its
/// sequence's positions and with its factor set, scaled by `scale` (LongRoPE's attention
/// factor). With `mrope_section` the first frequencies follow the temporal position, the
/// next the height, the last the width (transformers' `mrope_section` split).
pub(super) fn rope_tables(
    spans: &[Span],
    half: usize,
    scale: f32,
    mrope_section: Option<[usize; 3]>,
    cos: &mut [f32],
    sin: &mut [f32],
) {
    let axis_of: Vec<usize> = match mrope_section {
        Some([t, h, _]) => (0..half).map(|i| if i < t { 0 } else if i < t + h { 1 } else { 2 }).collect(),
        None => vec![0; half],
    };
    let mut row = 0;
    for sp in spans {
        for p in 0..sp.len {
            let at = sp.rope_position(p);
            for (i, f) in sp.inv_freq.iter().take(half).enumerate() {
                let a = at[axis_of[i]] * f;
                cos[row * half + i] = a.cos() * scale;
                sin[row * half + i] = a.sin() * scale;
            }
            row += 1;
        }
    }
}

/// Rows of a forward that take given embeddings instead of their token's (an image's
/// features at its placeholder tokens): row indices within the run, and their values,
/// `[rows, hidden]` row-major.
pub(super) struct Injected<'a> {
    pub rows: &'a [usize],
    pub values: &'a [f32],
}

impl Injected<'_> {
    /// Writes the injected rows into embeddings `x` (`[positions, hidden]`).
    pub fn apply(&self, x: &mut [f32], hidden: usize) {
        for (k, &r) in self.rows.iter().enumerate() {
            x[r * hidden..(r + 1) * hidden].copy_from_slice(&self.values[k * hidden..(k + 1) * hidden]);
        }
    }
}

pub(super) trait Ops {
    /// Activations of the positions being run, one row of some width per position.
    type X;

    /// The embeddings of `ids`, `[positions, hidden]`, the `injected` rows replaced.
    fn embed(&mut self, e: &Embedding, ids: &[u32], injected: &Injected) -> Result<Self::X>;

    /// Each row RMS-normed and scaled by `w` (the row's width is `w.len()`).
    fn rms_norm(&mut self, x: &Self::X, w: &Vector) -> Result<Self::X>;

    /// The same norm over each head's `w.len()` values of a row (Qwen3's q and k norms).
    fn head_norm(&mut self, x: Self::X, w: &Vector) -> Result<Self::X>;

    /// `x·Wᵀ (+ b)` for each of several projections of one input.
    fn project<const K: usize>(&mut self, ps: [&Projection; K], x: Self::X) -> Result<[Self::X; K]>;

    /// The gate placed at a site (spec §4), if any.
    fn rotate(&mut self, gate: Option<&BlockRotation>, x: Self::X) -> Result<Self::X>;

    /// RoPE on each of a row's `heads` heads, at the run's positions.
    fn rope(&mut self, x: Self::X, heads: usize) -> Result<Self::X>;

    /// Causal attention of `q` over layer `layer`'s keys and values, sequence by sequence:
    /// the rows of sequence `i` (in the run's order) attend to what `caches[i]` holds, then
    /// to their own `k`, `v`, which are appended there.
    fn attend(&mut self, caches: &mut [&mut KvCache], layer: usize, q: Self::X, k: Self::X, v: Self::X) -> Result<Self::X>;

    /// `x + y`, the residual.
    fn add(&mut self, x: Self::X, y: Self::X) -> Result<Self::X>;

    /// SwiGLU: `silu(g)·u`.
    fn swiglu(&mut self, g: Self::X, u: Self::X) -> Result<Self::X>;

    /// What a verdict head reads below the last layer (spec §5): the residual RMS-normed
    /// with unit weight, `[positions, hidden]`.
    fn tap(&mut self, x: &Self::X) -> Result<Tensor>;

    /// `x` as a `[positions, width]` tensor.
    fn finish(&mut self, x: Self::X) -> Result<Tensor>;
}
