//! The inference backend: the decoder's steps on plain f32 buffers, the KV cache appended
//! in place. Matrix products and attention are the kernels' (`so8t_kernels`), on their
//! worker pool; the small per-token ops (RMSNorm, RoPE, SwiGLU, residual adds) run where
//! they are, one pass each. Buffers come from a pool the decoder keeps between calls, so
//! a generated token allocates none.

use super::layer::{KvCache, Projection, Vector};
use super::ops::{rope_tables, Injected, Ops, Run, Span};
use super::rotation::BlockRotation;
use crate::error::Result;
use crate::formats::{Embedding, Matrix};
use candle_core::{Device, Tensor};

/// Buffers handed back by the steps that consumed them, reused by length.
#[derive(Default)]
pub(super) struct Pool(Vec<Vec<f32>>);

/// More than a layer uses at once (about ten): beyond it, buffers of lengths that stopped
/// coming up (an earlier prompt's) are dropped.
const POOL_SIZE: usize = 24;

impl Pool {
    /// A buffer of `len` values: one given back with that length, else a new zeroed one.
    /// Its contents are whatever they were: every step writes all of its output.
    fn take(&mut self, len: usize) -> Vec<f32> {
        match self.0.iter().rposition(|v| v.len() == len) {
            Some(i) => self.0.swap_remove(i),
            None => vec![0.0; len],
        }
    }

    fn give(&mut self, v: Vec<f32>) {
        if self.0.len() == POOL_SIZE {
            self.0.remove(0);
        }
        self.0.push(v);
    }
}

/// One forward's run: the rows of one or more sequences, each after what its own KV cache
/// holds (several sequences' decode steps share one pass over the weights).
pub(super) struct Buffers<'a> {
    pool: &'a mut Pool,
    run: Run,
    /// Each sequence's `(pos, len)`, in row order.
    spans: Vec<(usize, usize)>,
    /// RoPE tables `[s, rotary_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl<'a> Buffers<'a> {
    pub(super) fn new(pool: &'a mut Pool, cfg: &crate::config::ModelConfig, spans: &[Span]) -> Self {
        let half = cfg.rotary_dim / 2;
        let s: usize = spans.iter().map(|sp| sp.len).sum();
        let scale = cfg.rope_attention_factor();
        let (mut cos, mut sin) = (pool.take(s * half), pool.take(s * half));
        rope_tables(spans, half, scale, cfg.mrope_section, &mut cos, &mut sin);
        Buffers {
            pool,
            run: Run::new(cfg, s),
            spans: spans.iter().map(|sp| (sp.pos, sp.len)).collect(),
            cos,
            sin,
        }
    }
}

impl Drop for Buffers<'_> {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.cos));
        self.pool.give(std::mem::take(&mut self.sin));
    }
}

/// `f(first_row, rows)` over `buf` taken as rows of `width`: on the worker pool for a
/// prompt's worth of rows, where this thread alone would keep the other one waiting.
fn by_rows(buf: &mut [f32], width: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
    let rows = buf.len() / width.max(1);
    if rows < 16 {
        return f(0, buf);
    }
    let pool = so8t_kernels::pool::global();
    let per = rows.div_ceil(pool.threads() * 2);
    pool.chunks(buf, per * width, &|i, chunk| f(i / width, chunk));
}

/// The residual: `x += y`, row by row.
fn add_rows(x: &mut [f32], y: &[f32], width: usize) {
    by_rows(x, width, &|r, xs| {
        xs.iter_mut()
            .zip(&y[r * width..])
            .for_each(|(a, b)| *a += b)
    });
}

/// `x = x / sqrt(mean(x²) + eps) · w` per row of `w.len()` values, in candle's order.
fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    let d = w.len();
    for xr in x.chunks_exact_mut(d) {
        let m = (xr.iter().map(|v| v * v).sum::<f32>() / d as f32 + eps).sqrt();
        for (v, &g) in xr.iter_mut().zip(w) {
            *v = *v / m * g;
        }
    }
}

/// `out` = [`rms_norm`] of `x`, rows shared out for prompts.
fn rms_norm_into(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let d = w.len();
    by_rows(out, d, &|r, o| {
        o.copy_from_slice(&x[r * d..r * d + o.len()]);
        rms_norm(o, w, eps)
    });
}

/// HF "rotate half" RoPE on the first `rot` dims of each head of `[s, heads, hd]`, with
/// tables `[s, rot/2]`.
fn rope(x: &mut [f32], heads: usize, hd: usize, rot: usize, cos: &[f32], sin: &[f32]) {
    let half = rot / 2;
    for (p, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for h in row.chunks_exact_mut(hd) {
            let (a, b) = h[..rot].split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}


/// `x·Wᵀ (+ b)` for several projections of the same `x: [n, in]`: quantised matrices
/// share one quantisation of it; others (f32, candle's types) go through candle one by one.
fn project_all<const K: usize>(
    pool: &mut Pool,
    ps: [&Projection; K],
    x: &[f32],
    n: usize,
) -> Result<[Vec<f32>; K]> {
    let quant: Option<Vec<&so8t_kernels::QMatrix>> = ps
        .iter()
        .map(|p| match &p.w {
            Matrix::Quant(m) if !crate::formats::widens_for(m, n) => Some(m.as_ref()),
            _ => None,
        })
        .collect();
    let mut outs: [Vec<f32>; K] = match &quant {
        Some(ms) => std::array::from_fn(|i| pool.take(n * ms[i].rows())),
        None => std::array::from_fn(|_| Vec::new()),
    };
    match quant {
        Some(ms) => {
            let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            so8t_kernels::QMatrix::matmul_many(&ms, x, n, &mut slices);
        }
        None => {
            for (p, out) in ps.iter().zip(outs.iter_mut()) {
                let t = Tensor::from_slice(x, (n, x.len() / n.max(1)), &Device::Cpu)?;
                *out = crate::formats::matmul(&p.w, &t)?.flatten_all()?.to_vec1::<f32>()?;
            }
        }
    }
    for (p, out) in ps.iter().zip(outs.iter_mut()) {
        if let Some(b) = &p.b {
            for row in out.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(b.iter()).for_each(|(o, &v)| *o += v);
            }
        }
    }
    Ok(outs)
}

impl Ops for Buffers<'_> {
    type X = Vec<f32>;

    fn embed(&mut self, e: &Embedding, ids: &[u32], injected: &Injected) -> Result<Vec<f32>> {
        let n = ids.len();
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let mut x = e.forward(&ids)?.flatten_all()?.to_vec1::<f32>()?;
        let hidden = x.len() / n;
        injected.apply(&mut x, hidden);
        Ok(x)
    }

    fn rms_norm(&mut self, x: &Vec<f32>, w: &Vector) -> Result<Vec<f32>> {
        let mut out = self.pool.take(x.len());
        rms_norm_into(x, w, self.run.eps, &mut out);
        Ok(out)
    }

    fn head_norm(&mut self, mut x: Vec<f32>, w: &Vector) -> Result<Vec<f32>> {
        rms_norm(&mut x, w, self.run.eps);
        Ok(x)
    }

    fn project<const K: usize>(&mut self, ps: [&Projection; K], x: Vec<f32>) -> Result<[Vec<f32>; K]> {
        let outs = project_all(self.pool, ps, &x, self.run.s)?;
        self.pool.give(x);
        Ok(outs)
    }

    fn rotate(&mut self, gate: Option<&BlockRotation>, mut x: Vec<f32>) -> Result<Vec<f32>> {
        if let Some(r) = gate {
            r.apply_in_place(&mut x);
        }
        Ok(x)
    }

    fn rope(&mut self, mut x: Vec<f32>, heads: usize) -> Result<Vec<f32>> {
        let (hd, rot) = (self.run.head_dim, self.run.rotary_dim);
        let half = rot / 2;
        let (cos, sin) = (&self.cos, &self.sin);
        by_rows(&mut x, heads * hd, &|r, rows| {
            rope(rows, heads, hd, rot, &cos[r * half..], &sin[r * half..])
        });
        Ok(x)
    }

    fn attend(&mut self, caches: &mut [&mut KvCache], layer: usize, q: Vec<f32>, k: Vec<f32>, v: Vec<f32>) -> Result<Vec<f32>> {
        let (heads, hd) = (self.run.heads, self.run.head_dim);
        let (qw, kw) = (heads * hd, self.run.kv_heads * hd);
        let mut out = self.pool.take(self.run.s * qw);
        let mut row = 0;
        for (cache, &(pos, len)) in caches.iter_mut().zip(&self.spans) {
            let (ck, cv) = &mut cache.layers[layer];
            ck.truncate(pos * kw);
            cv.truncate(pos * kw);
            ck.extend_from_slice(&k[row * kw..(row + len) * kw]);
            cv.extend_from_slice(&v[row * kw..(row + len) * kw]);
            let shape = so8t_kernels::attention::Shape {
                s: len,
                pos,
                heads,
                kv_heads: self.run.kv_heads,
                head_dim: hd,
            };
            let rows = row * qw..(row + len) * qw;
            so8t_kernels::attention::causal(&q[rows.clone()], ck, cv, shape, &mut out[rows]);
            row += len;
        }
        for b in [q, k, v] {
            self.pool.give(b);
        }
        Ok(out)
    }

    fn add(&mut self, mut x: Vec<f32>, y: Vec<f32>) -> Result<Vec<f32>> {
        add_rows(&mut x, &y, y.len() / self.run.s.max(1));
        self.pool.give(y);
        Ok(x)
    }

    fn swiglu(&mut self, mut g: Vec<f32>, u: Vec<f32>) -> Result<Vec<f32>> {
        let inter = u.len() / self.run.s.max(1);
        by_rows(&mut g, inter, &|r, gs| {
            so8t_kernels::elementwise::swiglu(gs, &u[r * inter..r * inter + gs.len()])
        });
        self.pool.give(u);
        Ok(g)
    }

    fn tap(&mut self, x: &Vec<f32>) -> Result<Tensor> {
        let h = x.len() / self.run.s.max(1);
        let mut t = x.clone();
        // A weight of ones: `v / m · 1` is `v / m` exactly.
        rms_norm(&mut t, &vec![1.0; h], self.run.eps);
        Ok(Tensor::from_vec(t, (self.run.s, h), &Device::Cpu)?)
    }

    fn finish(&mut self, x: Vec<f32>) -> Result<Tensor> {
        let t = Tensor::from_slice(&x, (self.run.s, x.len() / self.run.s.max(1)), &Device::Cpu)?;
        self.pool.give(x);
        Ok(t)
    }
}
