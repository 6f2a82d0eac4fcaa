//! Causal attention over a KV cache, for the decoder's inference path: keys and values
//! `[positions, kv_heads, head_dim]` f32, queries `[s, heads, head_dim]` for positions
//! `pos..pos+s`, grouped-query heads sharing their KV head. A task is one KV head and a
//! few consecutive positions: all their query heads (up to 16 query vectors) share every
//! key and value row they read. Tasks go to the worker pool when there is enough work to
//! share.

use crate::pool;

#[derive(Clone, Copy, Debug)]
pub struct Shape {
    /// New queries.
    pub s: usize,
    /// Positions cached before them (the cache holds `pos + s`).
    pub pos: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Query vectors per task.
const MAXQ: usize = 16;

/// `out[i, h] = softmax_j≤pos+i(q[i, h]·k[j, h/rep] / √hd) · v[j, h/rep]`.
pub fn causal(q: &[f32], k: &[f32], v: &[f32], sh: Shape, out: &mut [f32]) {
    let Shape {
        s,
        pos,
        heads,
        kv_heads,
        head_dim,
    } = sh;
    assert!(
        heads % kv_heads.max(1) == 0,
        "heads must be a multiple of KV heads"
    );
    assert_eq!(
        q.len(),
        s * heads * head_dim,
        "queries must be [s, heads, head_dim]"
    );
    assert!(
        k.len() >= (pos + s) * kv_heads * head_dim,
        "keys must cover pos + s positions"
    );
    assert!(
        v.len() >= (pos + s) * kv_heads * head_dim,
        "values must cover pos + s positions"
    );
    assert_eq!(out.len(), q.len(), "output must be [s, heads, head_dim]");
    thread_local! {
        /// Each thread's score rows, kept between calls (no allocation per token).
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let rep = heads / kv_heads;
    // Positions per task: all `rep` query heads of each; one when `rep` alone fills a task.
    let per = (MAXQ / rep).max(1);
    let groups = rep.div_ceil(MAXQ);
    let tiles = s.div_ceil(per);
    let out_ptr = crate::SendPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let p = &out_ptr;
        let (unit, tile) = (t % (kv_heads * groups), t / (kv_heads * groups));
        let (kvh, g) = (unit / groups, unit % groups);
        let heads = (
            kvh * rep + g * MAXQ,
            (kvh * rep + ((g + 1) * MAXQ).min(rep)),
        );
        let (i0, i1) = (tile * per, ((tile + 1) * per).min(s));
        let tile = Tile {
            q,
            k,
            v,
            sh: &sh,
            heads,
            i0,
            i1,
            out: p.0,
        };
        SCORES.with_borrow_mut(|scores| attend_tile(&tile, scores));
    };
    let tasks = tiles * kv_heads * groups;
    // A token over a short context is a few microseconds: not worth a hand-off.
    if s * (pos + s) * heads < 8192 {
        (0..tasks).for_each(run);
    } else {
        pool::global().run(tasks, &run);
    }
}

/// One task's share: query heads `heads.0..heads.1` (one KV head's) at positions
/// `i0..i1` of the new ones, written to their rows of `out`.
struct Tile<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    sh: &'a Shape,
    heads: (usize, usize),
    i0: usize,
    i1: usize,
    out: *mut f32,
}

/// [`attend_tile_body`] for the widest instruction set here: with AVX-512 the dot
/// products are explicit 16-lane FMAs (the compiler does not vectorise a reduction over
/// 64 values well on its own); otherwise the portable dot compiled for AVX2 or the baseline.
fn attend_tile(t: &Tile, scores: &mut Vec<f32>) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512(t: &Tile, scores: &mut Vec<f32>) {
            attend_tile_body::<Avx512Dot>(t, scores)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(t: &Tile, scores: &mut Vec<f32>) {
            attend_tile_body::<PlainDot>(t, scores)
        }
        match crate::dot::Isa::detect() {
            // SAFETY: `Isa::detect` found these features on this CPU.
            crate::dot::Isa::Avx512 => return unsafe { avx512(t, scores) },
            crate::dot::Isa::Avx2 => return unsafe { avx2(t, scores) },
            crate::dot::Isa::Base => {}
        }
    }
    attend_tile_body::<PlainDot>(t, scores)
}

trait Dot {
    fn dot(a: &[f32], b: &[f32]) -> f32;
}

struct PlainDot;

impl Dot for PlainDot {
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        dot(a, b)
    }
}

#[cfg(target_arch = "x86_64")]
struct Avx512Dot;

#[cfg(target_arch = "x86_64")]
impl Dot for Avx512Dot {
    /// Only called from functions compiled with avx512f (see `attend_tile`).
    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        use std::arch::x86_64::*;
        let n = a.len().min(b.len());
        // SAFETY: every load stays within `a` and `b` (the tail load is masked).
        unsafe {
            let mut acc = _mm512_setzero_ps();
            let mut i = 0;
            while i + 16 <= n {
                acc = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(b.as_ptr().add(i)),
                    acc,
                );
                i += 16;
            }
            if i < n {
                let m: __mmask16 = (1u16 << (n - i)) - 1;
                let x = _mm512_maskz_loadu_ps(m, a.as_ptr().add(i));
                let y = _mm512_maskz_loadu_ps(m, b.as_ptr().add(i));
                acc = _mm512_fmadd_ps(x, y, acc);
            }
            _mm512_reduce_add_ps(acc)
        }
    }
}

/// Uses `mul_add`: fused on every CPU the SIMD variants run on (and on aarch64).
#[inline(always)]
fn attend_tile_body<D: Dot>(t: &Tile, scores: &mut Vec<f32>) {
    let Tile {
        q,
        k,
        v,
        sh,
        heads,
        i0,
        i1,
        out,
    } = *t;
    let hd = sh.head_dim;
    let kvh = heads.0 / (sh.heads / sh.kv_heads);
    let kv_row = sh.kv_heads * hd;
    let scale = 1.0 / (hd as f32).sqrt();
    let nhq = heads.1 - heads.0;
    let nq = (i1 - i0) * nhq;
    // Query vector t is head heads.0 + t % nhq at position i0 + t / nhq; it sees keys
    // 0..=last(t).
    let last = |t: usize| sh.pos + i0 + t / nhq;
    let n = sh.pos + i1;
    scores.clear();
    scores.resize(MAXQ * n, 0.0);
    let row_of = |t: usize| ((i0 + t / nhq) * sh.heads + heads.0 + t % nhq) * hd;
    let qs: [&[f32]; MAXQ] = std::array::from_fn(|t| &q[row_of(t.min(nq - 1))..][..hd]);
    let qs = &qs[..nq];
    for j in 0..n {
        let kr = &k[j * kv_row + kvh * hd..][..hd];
        for (t, qi) in qs.iter().enumerate() {
            if j <= last(t) {
                scores[t * n + j] = D::dot(qi, kr) * scale;
            }
        }
    }
    for t in 0..nq {
        let row = &mut scores[t * n..t * n + last(t) + 1];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        row.iter_mut().for_each(|x| *x = exp(*x - max));
        let sum = lane_sum(row);
        row.iter_mut().for_each(|x| *x /= sum);
    }
    // SAFETY: this task alone writes these rows of `out` (tasks partition heads ×
    // positions), and `out` outlives the call.
    let mut outs: [&mut [f32]; MAXQ] = std::array::from_fn(|t| {
        if t < nq {
            unsafe { std::slice::from_raw_parts_mut(out.add(row_of(t)), hd) }
        } else {
            &mut []
        }
    });
    let outs = &mut outs[..nq];
    outs.iter_mut().for_each(|o| o.fill(0.0));
    for j in 0..n {
        let vr = &v[j * kv_row + kvh * hd..][..hd];
        for (t, o) in outs.iter_mut().enumerate() {
            if j <= last(t) {
                let w = scores[t * n + j];
                o.iter_mut()
                    .zip(vr)
                    .for_each(|(o, &x)| *o = w.mul_add(x, *o));
            }
        }
    }
}

/// Sixteen running sums: a shape the compiler vectorises as it is written.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        let (x, y): (&[f32; 16], &[f32; 16]) = (x.try_into().unwrap(), y.try_into().unwrap());
        acc = std::array::from_fn(|j| x[j].mul_add(y[j], acc[j]));
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    lanes_total(acc) + tail
}

/// `e^x` for `x ≤ 0` without a libm call, so that a row of scores is one vector loop:
/// `x = n·ln2 + r` with |r| ≤ ln2/2, `e^r` by its degree-6 Taylor polynomial (relative
/// error below 2·10⁻⁷ there, about one f32 step), `2^n` assembled in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln2 split in two so that n·ln2 is subtracted without losing r's low bits.
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Σx in sixteen lanes, then pairwise.
#[inline(always)]
fn lane_sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut c = x.chunks_exact(16);
    for v in &mut c {
        for j in 0..16 {
            acc[j] += v[j];
        }
    }
    lanes_total(acc) + c.remainder().iter().sum::<f32>()
}

/// The sixteen lanes' total by halving pairwise sums: vector adds, where a running sum
/// over the lanes would be a chain.
#[inline(always)]
fn lanes_total(acc: [f32; 16]) -> f32 {
    let a8: [f32; 8] = std::array::from_fn(|j| acc[j] + acc[j + 8]);
    let a4: [f32; 4] = std::array::from_fn(|j| a8[j] + a8[j + 4]);
    (a4[0] + a4[2]) + (a4[1] + a4[3])
}

#[cfg(test)]
mod tests {
    /// The polynomial exp against libm's over the range softmax uses (x ≤ 0): within a few
    /// f32 steps relative, and exactly 1 at 0.
    #[test]
    fn exp_is_within_a_few_ulps_of_libm() {
        assert_eq!(super::exp(0.0), 1.0);
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }
}
