//! The decoder's inference path (everything but training): the same arithmetic as the
//! candle ops in `decoder.rs`, on plain f32 buffers that live as long as the decoder,
//! with the KV cache appended in place. Matrix products and attention are the kernels'
//! (`so8t_kernels`), on their worker pool; the small per-token
//! ops (RMSNorm, RoPE, SwiGLU, residual adds) run where they are, fused into one pass each.

use super::{Decoder, Projection};
use crate::error::Result;
use crate::formats::Matrix;
use candle_core::{Device, Tensor};

/// Buffers reused from call to call (resized to the number of positions).
#[derive(Default)]
pub(super) struct Scratch {
    x: Vec<f32>,
    normed: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    out: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

fn resize(v: &mut Vec<f32>, len: usize) {
    v.resize(len, 0.0);
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

/// HF "rotate half" RoPE on `[s, heads, hd]` with tables `[s, hd/2]`.
fn rope(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32]) {
    let half = hd / 2;
    for (p, row) in x.chunks_exact_mut(heads * hd).enumerate() {
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for h in row.chunks_exact_mut(hd) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * c[i] - x2 * s[i];
                b[i] = x2 * c[i] + x1 * s[i];
            }
        }
    }
}

/// `x·Wᵀ (+ b)` for `x: [n, in]` into `out: [n, out]`.
fn project(p: &Projection, x: &[f32], n: usize, out: &mut Vec<f32>) -> Result<()> {
    project_all([p], x, n, [out])
}

/// [`project`] for several projections of the same input: quantised matrices share one
/// quantisation of it; others (f32, candle's types) go through candle one by one.
fn project_all<const K: usize>(
    ps: [&Projection; K],
    x: &[f32],
    n: usize,
    outs: [&mut Vec<f32>; K],
) -> Result<()> {
    let quant: Option<Vec<&so8t_kernels::QMatrix>> = ps
        .iter()
        .map(|p| match &p.w {
            Matrix::Quant(m) => Some(m.as_ref()),
            _ => None,
        })
        .collect();
    let Some(ms) = quant else {
        for (p, out) in ps.into_iter().zip(outs) {
            let cols = x.len() / n.max(1);
            let t = Tensor::from_slice(x, (n, cols), &Device::Cpu)?;
            *out = crate::formats::matmul(&p.w, &t)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            add_bias(p, out);
        }
        return Ok(());
    };
    let mut outs = outs;
    for (m, out) in ms.iter().zip(outs.iter_mut()) {
        resize(out, n * m.rows());
    }
    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    so8t_kernels::QMatrix::matmul_many(&ms, x, n, &mut slices);
    for (p, out) in ps.iter().zip(outs.iter_mut()) {
        add_bias(p, out);
    }
    Ok(())
}

fn add_bias(p: &Projection, out: &mut [f32]) {
    if let Some(b) = &p.b_vec {
        for row in out.chunks_exact_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(o, &v)| *o += v);
        }
    }
}

impl Decoder {
    pub(super) fn forward_inference(&mut self, ids: &[u32], pos: usize) -> Result<Tensor> {
        let s = ids.len();
        let cfg = &self.cfg;
        let (h, hd) = (cfg.hidden_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_heads, cfg.num_kv_heads);
        let eps = cfg.rms_norm_eps as f32;
        let kv_row = self.cache.row;
        let mut sc = std::mem::take(&mut self.scratch);
        let ids_t = Tensor::new(ids, &Device::Cpu)?;
        sc.x = self
            .embed
            .forward(&ids_t)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let half = hd / 2;
        resize(&mut sc.cos, s * half);
        resize(&mut sc.sin, s * half);
        for p in 0..s {
            for (i, f) in self.inv_freq_vec.iter().enumerate() {
                let a = (pos + p) as f32 * f;
                sc.cos[p * half + i] = a.cos();
                sc.sin[p * half + i] = a.sin();
            }
        }
        resize(&mut sc.normed, s * h);
        let total = pos + s;
        let n_layers = self.layers.len();
        let mut taps = Vec::new();
        for l in 0..n_layers {
            let layer = &self.layers[l];
            let gates = &self.gates[l];
            rms_norm_into(&sc.x, &layer.attn_norm_vec, eps, &mut sc.normed);
            project_all(
                [&layer.q, &layer.k, &layer.v],
                &sc.normed,
                s,
                [&mut sc.q, &mut sc.k, &mut sc.v],
            )?;
            for (g, buf) in [
                (&gates.q, &mut sc.q),
                (&gates.k, &mut sc.k),
                (&gates.v, &mut sc.v),
            ] {
                if let Some(r) = g {
                    r.apply_in_place(buf);
                }
            }
            if let (Some(qn), Some(kn)) = (&layer.q_norm_vec, &layer.k_norm_vec) {
                rms_norm(&mut sc.q, qn, eps);
                rms_norm(&mut sc.k, kn, eps);
            }
            let (cos, sin) = (&sc.cos, &sc.sin);
            for (buf, heads) in [(&mut sc.q, nh), (&mut sc.k, nkv)] {
                by_rows(buf, heads * hd, &|r, rows| {
                    rope(rows, heads, hd, &cos[r * half..], &sin[r * half..])
                });
            }
            let (ck, cv) = &mut self.cache.layers[l];
            ck.truncate(pos * kv_row);
            cv.truncate(pos * kv_row);
            ck.extend_from_slice(&sc.k);
            cv.extend_from_slice(&sc.v);
            resize(&mut sc.attn, s * nh * hd);
            let shape = so8t_kernels::attention::Shape {
                s,
                pos,
                heads: nh,
                kv_heads: nkv,
                head_dim: hd,
            };
            so8t_kernels::attention::causal(&sc.q, ck, cv, shape, &mut sc.attn);
            if let Some(r) = &gates.o {
                r.apply_in_place(&mut sc.attn);
            }
            project(&layer.o, &sc.attn, s, &mut sc.out)?;
            add_rows(&mut sc.x, &sc.out, h);
            rms_norm_into(&sc.x, &layer.ffn_norm_vec, eps, &mut sc.normed);
            if let Some(r) = &gates.mlp {
                r.apply_in_place(&mut sc.normed);
            }
            project_all(
                [&layer.gate, &layer.up],
                &sc.normed,
                s,
                [&mut sc.gate, &mut sc.up],
            )?;
            // SwiGLU: silu(g)·u, as candle's silu (x / (1 + e^-x)).
            let (up, inter) = (&sc.up, sc.up.len() / s);
            by_rows(&mut sc.gate, inter, &|r, g| {
                g.iter_mut()
                    .zip(&up[r * inter..])
                    .for_each(|(g, &u)| *g = *g / (1.0 + (-*g).exp()) * u)
            });
            project(&layer.down, &sc.gate, s, &mut sc.out)?;
            add_rows(&mut sc.x, &sc.out, h);
            if l + 1 < n_layers && self.taps.contains(&(l + 1)) {
                let mut t = sc.x[..s * h].to_vec();
                for row in t.chunks_exact_mut(h) {
                    let m = (row.iter().map(|v| v * v).sum::<f32>() / h as f32 + eps).sqrt();
                    row.iter_mut().for_each(|v| *v /= m);
                }
                taps.push((l + 1, Tensor::from_vec(t, (s, h), &Device::Cpu)?));
            }
        }
        self.cache.len = total;
        rms_norm_into(&sc.x, &self.norm_vec, eps, &mut sc.normed);
        let hidden = Tensor::from_slice(&sc.normed[..s * h], (s, h), &Device::Cpu)?;
        self.scratch = sc;
        if self.taps.contains(&n_layers) {
            taps.push((n_layers, hidden.clone()));
        }
        self.keep_taps(taps);
        Ok(hidden)
    }
}
