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
        SCORES.with_borrow_mut(|scores| attend_tile(q, k, v, &sh, heads, i0, i1, p.0, scores));
    };
    let tasks = tiles * kv_heads * groups;
    // A token over a short context is a few microseconds: not worth a hand-off.
    if s * (pos + s) * heads < 8192 {
        (0..tasks).for_each(run);
    } else {
        pool::global().run(tasks, &run);
    }
}

multiversion! {
    #[allow(clippy::too_many_arguments)]
    fn attend_tile(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        sh: &Shape,
        heads: (usize, usize),
        i0: usize,
        i1: usize,
        out: *mut f32,
        scores: &mut Vec<f32>,
    ) -> () = attend_tile_body
}

/// Query heads `heads.0..heads.1` (one KV head's) at positions `i0..i1` of the new ones.
/// Uses `mul_add`: fused on every CPU the SIMD variants run on (and on aarch64).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn attend_tile_body(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    sh: &Shape,
    heads: (usize, usize),
    i0: usize,
    i1: usize,
    out: *mut f32,
    scores: &mut Vec<f32>,
) {
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
                scores[t * n + j] = dot(qi, kr) * scale;
            }
        }
    }
    for t in 0..nq {
        let row = &mut scores[t * n..t * n + last(t) + 1];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
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
        for j in 0..16 {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    // Halving pairwise sums: vector adds, where a running sum over the lanes is a chain.
    let a8: [f32; 8] = std::array::from_fn(|j| acc[j] + acc[j + 8]);
    let a4: [f32; 4] = std::array::from_fn(|j| a8[j] + a8[j + 4]);
    (a4[0] + a4[2]) + (a4[1] + a4[3]) + tail
}
