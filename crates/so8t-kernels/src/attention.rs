//! Causal attention over a KV cache, for the decoder's inference path: keys and values
//! `[positions, kv_heads, head_dim]` f32, queries `[s, heads, head_dim]` for positions
//! `pos..pos+s`, grouped-query heads sharing their KV head. A task is one KV head and a
//! few consecutive positions: all their query heads (up to 16 query vectors) share every
//! key and value row they read; a decoding step, which has too few such tasks to keep
//! every thread busy, splits each KV head's query heads among several. Tasks go to the
//! worker pool when there is enough work to share. Under AVX-512, for the usual head sizes, scores are computed sixteen keys at a
//! time and each output head stays in registers across its weighted sum: the plain loops
//! had spent 41% of a 512-token SmolLM2 prompt here, on one horizontal sum per score and
//! a load and store of the output per value row.

use crate::elementwise::exp;
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
/// Keys per block of the scores pass.
const KEYS: usize = 64;
/// Query-key pairs from which the tasks go to the pool.
const PARALLEL_CELLS: usize = 1024;

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
    let threads = pool::global().threads();
    // Query heads per task: all of a KV head's, which then share every key and value row
    // read, unless that leaves threads without a task (a decoding step has one task per
    // KV head); then fewer. A query's result does not depend on the others in its task.
    // Tasks with `h` query heads each: tiles of positions (as many as fill MAXQ query
    // vectors) × KV heads × groups of `h` of their query heads.
    let tasks_of = |h: usize| s.div_ceil(MAXQ / h) * kv_heads * rep.div_ceil(h);
    let mut per_task = rep.min(MAXQ);
    while per_task > 1 && tasks_of(per_task) < 2 * threads {
        per_task = per_task.div_ceil(2);
    }
    let per = MAXQ / per_task;
    let groups = rep.div_ceil(per_task);
    let out_ptr = crate::SendPtr(out.as_mut_ptr());
    let run = |t: usize| {
        let p = &out_ptr;
        let (unit, tile) = (t % (kv_heads * groups), t / (kv_heads * groups));
        let (kvh, g) = (unit / groups, unit % groups);
        let heads = (
            kvh * rep + g * per_task,
            kvh * rep + ((g + 1) * per_task).min(rep),
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
    let tasks = tasks_of(per_task);
    // A token over a short context is a few microseconds: not worth a hand-off.
    if s * (pos + s) * heads < PARALLEL_CELLS {
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

    /// `o = Σ_j w[j] · v[j·stride..][..o.len()]` as two running sums, one over the even
    /// `j` and one over the odd, each term after term in order with one fused multiply-add,
    /// added at the end (the order every implementation keeps, so they agree bit for bit).
    /// One sum per output value waited on the FMA latency at every value row: a decoding
    /// step over 640 keys spent half its attention there.
    #[inline(always)]
    fn weighted_sum(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
        weighted_sum(o, w, v, stride)
    }

    /// [`Dot::weighted_sum`] for two queries over the same value rows (`wa` and `wb` may
    /// differ in length): each output gets the bits it gets alone.
    #[inline(always)]
    fn weighted_sum2(oa: &mut [f32], ob: &mut [f32], wa: &[f32], wb: &[f32], v: &[f32], stride: usize) {
        Self::weighted_sum(oa, wa, v, stride);
        Self::weighted_sum(ob, wb, v, stride);
    }

    /// `s[j] = scale · q · k[j·stride..][..q.len()]`: each a function of `q` and key `j`
    /// alone (not of where the key falls in a call), so a prompt and the same positions
    /// decoded one by one give the same scores.
    #[inline(always)]
    fn scores(s: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
        for (j, x) in s.iter_mut().enumerate() {
            *x = Self::dot(q, &k[j * stride..][..q.len()]) * scale;
        }
    }
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

    /// With the output in registers for the whole sum (one vector per sixteen values of a
    /// head): the portable loop loads and stores the output once per value row, and those
    /// stores bounded a prompt's attention.
    #[inline(always)]
    fn weighted_sum(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
        use std::arch::x86_64::*;
        /// # Safety
        /// `o` holds `16·C` values and `v` every row `j < w.len()` of them.
        #[inline(always)]
        unsafe fn sum<const C: usize>(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
            let (mut even, mut odd) = ([_mm512_setzero_ps(); C], [_mm512_setzero_ps(); C]);
            rows_from(&mut even, &mut odd, 0, w, v, stride);
            for c in 0..C {
                _mm512_storeu_ps(o.as_mut_ptr().add(16 * c), _mm512_add_ps(even[c], odd[c]));
            }
        }
        let hd = o.len();
        if !w.is_empty() {
            assert!(v.len() >= (w.len() - 1) * stride + hd, "value rows out of range");
        }
        // SAFETY: `o` has `hd` values and `v` every row (the assert above).
        unsafe {
            match hd {
                32 => sum::<2>(o, w, v, stride),
                64 => sum::<4>(o, w, v, stride),
                80 => sum::<5>(o, w, v, stride),
                96 => sum::<6>(o, w, v, stride),
                128 => sum::<8>(o, w, v, stride),
                _ => weighted_sum(o, w, v, stride),
            }
        }
    }

    /// Both queries' sums in registers at once, so that each value row is loaded once for
    /// two queries (a prompt's tile passes the same rows for up to sixteen): the loads
    /// had bounded a 512-token prompt's weighted sums. Head sizes up to 96 (four sums of
    /// up to six vectors fit the registers); larger ones go one query at a time.
    #[inline(always)]
    fn weighted_sum2(oa: &mut [f32], ob: &mut [f32], wa: &[f32], wb: &[f32], v: &[f32], stride: usize) {
        use std::arch::x86_64::*;
        /// # Safety
        /// `oa`, `ob` hold `16·C` values and `v` every row below `max(wa.len(), wb.len())`.
        #[inline(always)]
        unsafe fn sum2<const C: usize>(oa: &mut [f32], ob: &mut [f32], wa: &[f32], wb: &[f32], v: &[f32], stride: usize) {
            let z = [_mm512_setzero_ps(); C];
            let (mut a_even, mut a_odd, mut b_even, mut b_odd) = (z, z, z, z);
            let both = wa.len().min(wb.len());
            let mut j = 0;
            while j + 1 < both {
                let (p0, p1) = (v.as_ptr().add(j * stride), v.as_ptr().add((j + 1) * stride));
                let (a0, a1) = (_mm512_set1_ps(wa[j]), _mm512_set1_ps(wa[j + 1]));
                let (b0, b1) = (_mm512_set1_ps(wb[j]), _mm512_set1_ps(wb[j + 1]));
                for c in 0..C {
                    let x0 = _mm512_loadu_ps(p0.add(16 * c));
                    a_even[c] = _mm512_fmadd_ps(a0, x0, a_even[c]);
                    b_even[c] = _mm512_fmadd_ps(b0, x0, b_even[c]);
                    let x1 = _mm512_loadu_ps(p1.add(16 * c));
                    a_odd[c] = _mm512_fmadd_ps(a1, x1, a_odd[c]);
                    b_odd[c] = _mm512_fmadd_ps(b1, x1, b_odd[c]);
                }
                j += 2;
            }
            // Each query's remaining rows alone.
            rows_from(&mut a_even, &mut a_odd, j, wa, v, stride);
            rows_from(&mut b_even, &mut b_odd, j, wb, v, stride);
            for c in 0..C {
                _mm512_storeu_ps(oa.as_mut_ptr().add(16 * c), _mm512_add_ps(a_even[c], a_odd[c]));
                _mm512_storeu_ps(ob.as_mut_ptr().add(16 * c), _mm512_add_ps(b_even[c], b_odd[c]));
            }
        }
        let hd = oa.len();
        assert_eq!(ob.len(), hd, "two outputs of one head size");
        let rows = wa.len().max(wb.len());
        if rows > 0 {
            assert!(v.len() >= (rows - 1) * stride + hd, "value rows out of range");
        }
        // SAFETY: both outputs have `hd` values and `v` every row (the asserts above).
        unsafe {
            match hd {
                32 => sum2::<2>(oa, ob, wa, wb, v, stride),
                64 => sum2::<4>(oa, ob, wa, wb, v, stride),
                80 => sum2::<5>(oa, ob, wa, wb, v, stride),
                96 => sum2::<6>(oa, ob, wa, wb, v, stride),
                _ => {
                    Self::weighted_sum(oa, wa, v, stride);
                    Self::weighted_sum(ob, wb, v, stride);
                }
            }
        }
    }

    /// Sixteen keys at a time, the query in registers: each key's sixteen-lane products,
    /// then the sixteen sums at once ([`sums16`]) instead of one horizontal sum per key.
    #[inline(always)]
    fn scores(s: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
        use std::arch::x86_64::*;
        /// # Safety
        /// `q` holds `16·C` values and `k` every row `j < s.len()` of them.
        #[inline(always)]
        unsafe fn scores_c<const C: usize>(s: &mut [f32], q: &[f32], k: &[f32], stride: usize, scale: f32) {
            let qv: [__m512; C] = std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(16 * c)));
            let scale = _mm512_set1_ps(scale);
            for j0 in (0..s.len()).step_by(16) {
                let len = (s.len() - j0).min(16);
                let acc: [__m512; 16] = std::array::from_fn(|i| {
                    // Past the last key, lanes repeat it: each lane's sum is its own key's.
                    let p = k.as_ptr().add((j0 + i.min(len - 1)) * stride);
                    let mut a = _mm512_mul_ps(qv[0], _mm512_loadu_ps(p));
                    for (c, qc) in qv.iter().enumerate().skip(1) {
                        a = _mm512_fmadd_ps(*qc, _mm512_loadu_ps(p.add(16 * c)), a);
                    }
                    a
                });
                let r = _mm512_mul_ps(sums16(acc), scale);
                let mask: __mmask16 = if len == 16 { !0 } else { (1u16 << len) - 1 };
                _mm512_mask_storeu_ps(s.as_mut_ptr().add(j0), mask, r);
            }
        }
        let hd = q.len();
        if !s.is_empty() {
            assert!(k.len() >= (s.len() - 1) * stride + hd, "key rows out of range");
        }
        // SAFETY: `q` has `hd` values and `k` every row (the assert above).
        unsafe {
            match hd {
                32 => scores_c::<2>(s, q, k, stride, scale),
                64 => scores_c::<4>(s, q, k, stride, scale),
                80 => scores_c::<5>(s, q, k, stride, scale),
                96 => scores_c::<6>(s, q, k, stride, scale),
                128 => scores_c::<8>(s, q, k, stride, scale),
                _ => {
                    for (j, x) in s.iter_mut().enumerate() {
                        *x = Self::dot(q, &k[j * stride..][..hd]) * scale;
                    }
                }
            }
        }
    }
}

/// Value rows `j0..w.len()` of [`Dot::weighted_sum`]'s two running sums (`j0` even): each
/// row's term in the sum of its parity, one fused multiply-add per vector.
///
/// # Safety
/// The CPU must have avx512f (callers are compiled for it); `v` holds `16·C` values at
/// every row below `w.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn rows_from<const C: usize>(
    even: &mut [std::arch::x86_64::__m512; C],
    odd: &mut [std::arch::x86_64::__m512; C],
    j0: usize,
    w: &[f32],
    v: &[f32],
    stride: usize,
) {
    use std::arch::x86_64::*;
    let add = |acc: &mut [__m512; C], j: usize| {
        let (b, p) = (_mm512_set1_ps(w[j]), v.as_ptr().add(j * stride));
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(b, _mm512_loadu_ps(p.add(16 * c)), *a);
        }
    };
    for j in (j0..w.len()).step_by(2) {
        add(even, j);
        if j + 1 < w.len() {
            add(odd, j + 1);
        }
    }
}

/// Lane `i` of the result is the sum of the sixteen lanes of `a[i]`: halving sums that
/// keep every vector's partial sums apart (quarters, then pairs of lanes), fifteen
/// shuffle-and-add steps and one permutation for sixteen sums.
///
/// # Safety
/// The CPU must have avx512f (callers are compiled for it).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn sums16(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // b[i]: quarters 0-1 hold a[2i]'s partial sums, 2-3 a[2i+1]'s.
    let b: [__m512; 8] = std::array::from_fn(|i| {
        let (x, y) = (a[2 * i], a[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x44>(x, y), _mm512_shuffle_f32x4::<0xEE>(x, y))
    });
    // c[i]: quarter q holds a[4i + q]'s.
    let c: [__m512; 4] = std::array::from_fn(|i| {
        let (x, y) = (b[2 * i], b[2 * i + 1]);
        _mm512_add_ps(_mm512_shuffle_f32x4::<0x88>(x, y), _mm512_shuffle_f32x4::<0xDD>(x, y))
    });
    // d[i], quarter q: lanes 0 and 2 hold a[8i + q]'s, lanes 1 and 3 a[8i + 4 + q]'s.
    let d: [__m512; 2] = std::array::from_fn(|i| {
        let (x, y) = (c[2 * i], c[2 * i + 1]);
        _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
    });
    // Quarter q, lane m: the sum of a[4m + q].
    let (x, y) = (_mm512_castps_pd(d[0]), _mm512_castps_pd(d[1]));
    let e = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
    );
    let idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _mm512_permutexvar_ps(idx, e)
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
    // Keys in blocks that stay in cache while every query of the task passes.
    for j0 in (0..n).step_by(KEYS) {
        let kb = &k[j0 * kv_row + kvh * hd..];
        for (t, qi) in qs.iter().enumerate() {
            let end = (j0 + KEYS).min(last(t) + 1);
            if j0 < end {
                D::scores(&mut scores[t * n + j0..t * n + end], qi, kb, kv_row, scale);
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
    let vh = &v[kvh * hd..];
    let w = |t: usize| &scores[t * n..t * n + last(t) + 1];
    for (pair, os) in outs[..nq].chunks_mut(2).enumerate() {
        let t = 2 * pair;
        match os {
            [oa, ob] => D::weighted_sum2(oa, ob, w(t), w(t + 1), vh, kv_row),
            [o] => D::weighted_sum(o, w(t), vh, kv_row),
            _ => unreachable!("chunks of two"),
        }
    }
}

/// [`Dot::weighted_sum`] as a plain loop.
#[inline(always)]
fn weighted_sum(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
    const WIDTH: usize = 64;
    for (c0, oc) in (0..).step_by(WIDTH).zip(o.chunks_mut(WIDTH)) {
        let (mut even, mut odd) = ([0f32; WIDTH], [0f32; WIDTH]);
        for (j, &wj) in w.iter().enumerate() {
            let acc = if j % 2 == 0 { &mut even } else { &mut odd };
            let vr = &v[j * stride + c0..][..oc.len()];
            acc.iter_mut().zip(vr).for_each(|(a, &x)| *a = wj.mul_add(x, *a));
        }
        for (k, o) in oc.iter_mut().enumerate() {
            *o = even[k] + odd[k];
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
    /// The AVX-512 weighted sum and the plain loop give the same bits (a model decodes
    /// the same tokens on AVX2 and AVX-512 machines), for every head size with its own
    /// register kernel and value-row counts odd and even.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn weighted_sums_agree_bit_for_bit_across_instruction_sets() {
        use super::{Avx512Dot, Dot};
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512(o: &mut [f32], w: &[f32], v: &[f32], stride: usize) {
            Avx512Dot::weighted_sum(o, w, v, stride)
        }
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512_2(oa: &mut [f32], ob: &mut [f32], wa: &[f32], wb: &[f32], v: &[f32], stride: usize) {
            Avx512Dot::weighted_sum2(oa, ob, wa, wb, v, stride)
        }
        if !matches!(crate::dot::Isa::detect(), crate::dot::Isa::Avx512) {
            eprintln!("SKIPPED: this CPU has no AVX-512");
            return;
        }
        let mut r = crate::test_values(7);
        for hd in [32, 64, 80, 96, 128] {
            for rows in [1, 2, 7, 64, 641] {
                let stride = 3 * hd;
                let w: Vec<f32> = (0..rows).map(|_| r()).collect();
                let v: Vec<f32> = (0..rows * stride).map(|_| r()).collect();
                let (mut plain, mut wide) = (vec![0f32; hd], vec![f32::NAN; hd]);
                super::weighted_sum(&mut plain, &w, &v, stride);
                // SAFETY: `Isa::detect` found AVX-512.
                unsafe { avx512(&mut wide, &w, &v, stride) };
                let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&plain), bits(&wide), "head size {hd}, {rows} rows");
                // Two queries at once, of equal and of different lengths, in either order.
                for other in [rows, rows / 2, rows + 3] {
                    let w2: Vec<f32> = (0..other).map(|_| r()).collect();
                    let v2: Vec<f32> = (0..rows.max(other) * stride).map(|_| r()).collect();
                    let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
                    super::weighted_sum(&mut a, &w, &v2, stride);
                    super::weighted_sum(&mut b, &w2, &v2, stride);
                    let (mut a2, mut b2) = (vec![f32::NAN; hd], vec![f32::NAN; hd]);
                    // SAFETY: `Isa::detect` found AVX-512.
                    unsafe { avx512_2(&mut a2, &mut b2, &w, &w2, &v2, stride) };
                    assert_eq!(bits(&a), bits(&a2), "head size {hd}, {rows} and {other} rows: first");
                    assert_eq!(bits(&b), bits(&b2), "head size {hd}, {rows} and {other} rows: second");
                    unsafe { avx512_2(&mut b2, &mut a2, &w2, &w, &v2, stride) };
                    assert_eq!(bits(&a), bits(&a2), "head size {hd}, {other} and {rows} rows: second");
                    assert_eq!(bits(&b), bits(&b2), "head size {hd}, {other} and {rows} rows: first");
                }
            }
        }
    }
}
