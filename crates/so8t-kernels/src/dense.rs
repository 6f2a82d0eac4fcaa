//! f32 weights × f32 activations for the few activation rows of decoding (one sequence's
//! token, or a batch of sequences' tokens). candle's gemm is built for large products: on
//! a matrix–vector product it stays well below the memory bandwidth that bounds it (an
//! f32 SO8T directory decoded at 0.68× llama.cpp's f32 speed). Here each weight row is
//! streamed once per group of up to four activation rows, tiles of rows stay in cache
//! while the groups pass, FMA in eight-lane sums, on the kernels' worker pool.

use crate::pool;

/// Activation rows that share one pass over a weight row.
const GROUP: usize = 4;
/// Weight rows kept in cache while every group of activations passes over them.
const TILE: usize = 16;

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `out[i·rows + r] = Σ_c w[r·cols + c] · x[i·cols + c]`: `w` is `[rows, cols]`, `x` is
/// `[n, cols]`, `out` is `[n, rows]`, all row-major.
pub fn matmul_f32(w: &[f32], rows: usize, cols: usize, x: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(w.len(), rows * cols, "weights must be [rows, cols]");
    assert_eq!(x.len(), n * cols, "activations must be [n, cols]");
    assert_eq!(out.len(), n * rows, "output must be [n, rows]");
    let simd = simd_available();
    let out_ptr = SendPtr(out.as_mut_ptr());
    let pool = pool::global();
    let per_task = rows.div_ceil(pool.threads() * 4).max(TILE);
    pool.run(rows.div_ceil(per_task), &|t| {
        let p = &out_ptr;
        let (r0, r1) = (t * per_task, ((t + 1) * per_task).min(rows));
        for t0 in (r0..r1).step_by(TILE) {
            for i0 in (0..n).step_by(GROUP) {
                let g = (n - i0).min(GROUP);
                let a: [&[f32]; GROUP] =
                    std::array::from_fn(|k| &x[(i0 + k.min(g - 1)) * cols..][..cols]);
                for r in t0..(t0 + TILE).min(r1) {
                    let res = dot_rows(&w[r * cols..(r + 1) * cols], &a[..g], simd);
                    for (k, v) in res[..g].iter().enumerate() {
                        // SAFETY: each (i, r) is written by exactly one task (rows are
                        // partitioned), and `out` outlives the call.
                        unsafe { *p.0.add((i0 + k) * rows + r) = *v };
                    }
                }
            }
        }
    });
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `w · a[k]` for each of `a`'s one to four rows.
#[inline]
fn dot_rows(w: &[f32], a: &[&[f32]], simd: bool) -> [f32; GROUP] {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only true when the CPU has AVX2 and FMA.
        return unsafe {
            match a.len() {
                1 => pad(x86::dot::<1>(w, [a[0]])),
                2 => pad(x86::dot::<2>(w, [a[0], a[1]])),
                3 => pad(x86::dot::<3>(w, [a[0], a[1], a[2]])),
                _ => x86::dot::<4>(w, [a[0], a[1], a[2], a[3]]),
            }
        };
    }
    let _ = simd;
    let mut out = [0f32; GROUP];
    for (o, a) in out.iter_mut().zip(a) {
        *o = dot_portable(w, a);
    }
    out
}

fn pad<const N: usize>(r: [f32; N]) -> [f32; GROUP] {
    std::array::from_fn(|i| if i < N { r[i] } else { 0.0 })
}

/// Eight running sums, as the SIMD code keeps (only the order of additions differs).
fn dot_portable(w: &[f32], a: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    for (c, (&x, &y)) in w.iter().zip(a).enumerate() {
        acc[c % 8] = x.mul_add(y, acc[c % 8]);
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// `w · a[i]` for `N` activation rows: two eight-lane FMA chains per row, so that
    /// a lone row (decoding) is not bound by the FMA latency.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot<const N: usize>(w: &[f32], a: [&[f32]; N]) -> [f32; N] {
        let cols = w.len();
        let (pw, body) = (w.as_ptr(), cols / 16 * 16);
        let mut acc0 = [_mm256_setzero_ps(); N];
        let mut acc1 = [_mm256_setzero_ps(); N];
        let mut c = 0;
        while c < body {
            let w0 = _mm256_loadu_ps(pw.add(c));
            let w1 = _mm256_loadu_ps(pw.add(c + 8));
            for i in 0..N {
                let pa = a[i].as_ptr();
                acc0[i] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(pa.add(c)), acc0[i]);
                acc1[i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(pa.add(c + 8)), acc1[i]);
            }
            c += 16;
        }
        std::array::from_fn(|i| {
            let v = _mm256_add_ps(acc0[i], acc1[i]);
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            let mut total = _mm_cvtss_f32(s);
            for k in body..cols {
                total = w[k].mul_add(a[i][k], total);
            }
            total
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain f64 sum: every shape class (tails of the 16-wide body, one to
    /// seven activation rows, rows not a multiple of the tile), both code paths. f32 sums
    /// of 100–300 products of values in [-1, 1]: 1e-5 relative to the sum of |products|.
    #[test]
    fn matches_a_plain_sum() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        for &(rows, cols, n) in &[(37, 100, 1), (16, 16, 3), (70, 301, 4), (5, 7, 7), (130, 64, 2)] {
            let w: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
            let x: Vec<f32> = (0..n * cols).map(|_| next()).collect();
            let mut out = vec![0f32; n * rows];
            matmul_f32(&w, rows, cols, &x, n, &mut out);
            for i in 0..n {
                for r in 0..rows {
                    let (wr, xi) = (&w[r * cols..][..cols], &x[i * cols..][..cols]);
                    let exact: f64 = wr.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let scale: f64 = wr.iter().zip(xi).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let got = out[i * rows + r] as f64;
                    assert!((got - exact).abs() <= 1e-5 * scale, "{rows}x{cols}, n {n}: row {i}, {r}: {got} vs {exact}");
                    let portable = dot_portable(wr, xi) as f64;
                    assert!((portable - exact).abs() <= 1e-5 * scale);
                }
            }
        }
    }
}
