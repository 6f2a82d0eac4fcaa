//! Weight quantisers that write exactly what ggml's reference quantisers write
//! (`quantize_row_q{8,5}_0_ref`, `quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, which
//! `llama-quantize` uses when no importance matrix is given). The f32 arithmetic follows
//! the C code operation for operation; ggml-base is compiled without FMA contraction, so
//! plain Rust f32 reproduces it bit for bit.

use crate::blocks::QK_K;

const GROUP_MAX_EPS: f32 = 1e-15;

fn nearest_int(f: f32) -> i32 {
    let v = f + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

fn f16_bits(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

fn f16_round(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    // ggml walks the candidate scales in order, and an accepted candidate changes `min`,
    // which the later candidates use. Here all remaining candidates are evaluated at once
    // for the current `min` (each one's sums still run over i in order, so every value is
    // ggml's f32 value, while the candidates fill the vector lanes); the walk stops at an
    // acceptance and the rest are evaluated again with the new `min`. Few candidates are
    // accepted, so this is about one pass.
    let nc = nstep as usize + 1;
    let mut start = 0;
    while start < nc {
        // Lane j holds candidate start + j.
        let c = candidates(
            x, weights, nmax, rmin, rdelta, start, nc, min, max, sum_w, sum_x,
        );
        let mut restart = nc;
        for k in start..nc {
            let j = k - start;
            if c.valid[j] && c.error[j] < best_error {
                for i in 0..n {
                    l[i] = c.q[i][j];
                }
                best_error = c.error[j];
                scale = c.scale[j];
                let changed = c.min[j] != min;
                min = c.min[j];
                if changed {
                    restart = k + 1;
                    break;
                }
            }
        }
        start = restart;
    }
    (scale, -min)
}

const LANES: usize = 32;

struct Candidates {
    q: [[u8; LANES]; 32],
    scale: [f32; LANES],
    min: [f32; LANES],
    error: [f32; LANES],
    valid: [bool; LANES],
}

multiversion! {
    /// The search step of `make_qkx2_quants` for every candidate scale at once, at one
    /// `min`; half the lanes when at most 16 candidates remain (after a restart, usually).
    #[allow(clippy::too_many_arguments)]
    fn candidates(x: &[f32], weights: &[f32], nmax: i32, rmin: f32, rdelta: f32, start: usize, nc: usize, min: f32, max: f32, sum_w: f32, sum_x: f32) -> Candidates = candidates_sized
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn candidates_sized(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    start: usize,
    nc: usize,
    min: f32,
    max: f32,
    sum_w: f32,
    sum_x: f32,
) -> Candidates {
    if nc - start <= 16 {
        candidates_body::<16>(
            x, weights, nmax, rmin, rdelta, start, nc, min, max, sum_w, sum_x,
        )
    } else {
        candidates_body::<LANES>(
            x, weights, nmax, rmin, rdelta, start, nc, min, max, sum_w, sum_x,
        )
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn candidates_body<const N: usize>(
    x: &[f32],
    weights: &[f32],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    start: usize,
    nc: usize,
    min: f32,
    max: f32,
    sum_w: f32,
    sum_x: f32,
) -> Candidates {
    let n = x.len();
    assert!(nc <= LANES && n <= 32 && start < nc);
    let mut isc = [0f32; N];
    for (j, v) in isc.iter_mut().enumerate() {
        *v = (rmin + rdelta * (start + j).min(nc - 1) as f32 + nmax as f32) / (max - min);
    }
    let mut q = [[0u8; N]; 32];
    let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; N], [0f32; N], [0f32; N]);
    for i in 0..n {
        let (xi, w) = (x[i], weights[i]);
        let row = &mut q[i];
        for c in 0..N {
            let qi = nearest_int(isc[c] * (xi - min)).clamp(0, nmax);
            row[c] = qi as u8;
            let lf = qi as f32;
            sum_l[c] += w * lf;
            sum_l2[c] += w * lf * lf;
            sum_xl[c] += w * lf * xi;
        }
    }
    let mut out = Candidates {
        q: [[0; LANES]; 32],
        scale: [0.0; LANES],
        min: [0.0; LANES],
        error: [0.0; LANES],
        valid: [false; LANES],
    };
    let (mut scale, mut mins) = ([0f32; N], [0f32; N]);
    for c in 0..N {
        let d = sum_w * sum_l2[c] - sum_l[c] * sum_l[c];
        out.valid[c] = d > 0.0;
        let mut this_scale = (sum_w * sum_xl[c] - sum_x * sum_l[c]) / d;
        let mut this_min = (sum_l2[c] * sum_x - sum_l[c] * sum_xl[c]) / d;
        if this_min > 0.0 {
            this_min = 0.0;
            this_scale = sum_xl[c] / sum_l2[c];
        }
        scale[c] = this_scale;
        mins[c] = this_min;
    }
    let mut error = [0f32; N];
    for i in 0..n {
        let (xi, w) = (x[i], weights[i]);
        for c in 0..N {
            let diff = scale[c] * q[i][c] as f32 + mins[c] - xi;
            error[c] += w * (diff * diff);
        }
    }
    for i in 0..n {
        out.q[i][..N].copy_from_slice(&q[i]);
    }
    out.scale[..N].copy_from_slice(&scale);
    out.min[..N].copy_from_slice(&mins);
    out.error[..N].copy_from_slice(&error);
    out
}

struct QxCandidates {
    q: [[i8; 32]; 16],
    sumlx: [f32; 32],
    suml2: [f32; 32],
}

multiversion! {
    /// The scale search of `make_qx_quants` for the 18 candidates −9…9 (without 0) at once.
    fn qx_candidates(x: &[f32], nmax: i32, max: f32) -> QxCandidates = qx_candidates_body
}

#[inline(always)]
fn qx_candidates_body(x: &[f32], nmax: i32, max: f32) -> QxCandidates {
    assert!(x.len() <= 16);
    let mut iscale = [0f32; 32];
    for (k, v) in iscale.iter_mut().enumerate() {
        let k = k.min(17) as i32;
        let is = if k < 9 { k - 9 } else { k - 8 };
        *v = -(nmax as f32 + 0.1 * is as f32) / max;
    }
    let mut out = QxCandidates {
        q: [[0; 32]; 16],
        sumlx: [0.0; 32],
        suml2: [0.0; 32],
    };
    for (i, &v) in x.iter().enumerate() {
        let w = v * v;
        for k in 0..32 {
            let q = nearest_int(iscale[k] * v).clamp(-nmax, nmax - 1);
            out.q[i][k] = q as i8;
            out.sumlx[k] += w * v * q as f32;
            out.suml2[k] += w * q as f32 * q as f32;
        }
    }
    out
}

/// `make_qx_quants` with `rmse_type = 1` and no importance weights (w = x²).
fn make_qx_quants(x: &[f32], nmax: i32, l: &mut [i8]) -> f32 {
    let n = x.len();
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..n].fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for i in 0..n {
        let q = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (q + nmax) as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * q as f32;
        suml2 += w * q as f32 * q as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    // The 18 candidate scales do not depend on each other (unlike make_qkx2_quants), so
    // all are evaluated at once, each sum over i in ggml's order, and then chosen in
    // ggml's order.
    let c = qx_candidates(x, nmax, max);
    // Lane k is candidate is = k − 9 for k < 9, k − 8 after (−9…−1, 1…9, ggml's order).
    for k in 0..18 {
        if c.suml2[k] > 0.0 && c.sumlx[k] * c.sumlx[k] > best * c.suml2[k] {
            for i in 0..n {
                l[i] = (c.q[i][k] as i32 + nmax) as i8;
            }
            scale = c.sumlx[k] / c.suml2[k];
            best = scale * c.sumlx[k];
        }
    }
    scale
}

/// One row (a multiple of 256 values) as Q4_K blocks (`quantize_row_q4_K_ref`).
pub fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    quantize_k45(x, false)
}

/// One row (a multiple of 256 values) as Q5_K blocks (`quantize_row_q5_K_ref`).
pub fn quantize_q5_k(x: &[f32]) -> Vec<u8> {
    quantize_k45(x, true)
}

/// Q4_K and Q5_K differ only in levels (15 or 31), the search (rmin −1 over 20 steps or
/// −0.5 over 15) and the fifth bit's packing.
fn quantize_k45(x: &[f32], five: bool) -> Vec<u8> {
    let (nmax, rmin, nstep) = if five { (31, -0.5, 15) } else { (15, -1.0, 20) };
    let mut out = Vec::with_capacity(x.len() / QK_K * if five { 176 } else { 144 });
    for x in x.chunks_exact(QK_K) {
        let mut l = [0u8; QK_K];
        let mut weights = [0f32; 32];
        let (mut mins, mut scales) = ([0f32; 8], [0f32; 8]);
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &x[32 * j..32 * j + 32];
            let mut sum_x2 = 0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, &v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            let (s, m) = make_qkx2_quants(
                xs,
                &weights,
                nmax,
                &mut l[32 * j..32 * j + 32],
                rmin,
                0.1,
                nstep,
            );
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 {
            63.0 / max_scale
        } else {
            0.0
        };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut sc = [0u8; 12];
        for j in 0..8 {
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                sc[j] = ls;
                sc[j + 4] = lm;
            } else {
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
                sc[j - 4] |= (ls >> 4) << 6;
                sc[j] |= (lm >> 4) << 6;
            }
        }
        let d = f16_round(max_scale / 63.0);
        let dmin = f16_round(max_min / 63.0);
        for j in 0..8 {
            let (s, m) = crate::blocks::scale_min_k4(j, &sc);
            let dd = d * s as f32;
            if dd == 0.0 {
                continue;
            }
            let dm = dmin * m as f32;
            for ii in 0..32 {
                l[32 * j + ii] = nearest_int((x[32 * j + ii] + dm) / dd).clamp(0, nmax) as u8;
            }
        }
        out.extend_from_slice(&f16_bits(max_scale / 63.0));
        out.extend_from_slice(&f16_bits(max_min / 63.0));
        out.extend_from_slice(&sc);
        if five {
            let mut qh = [0u8; 32];
            let mut ql = [0u8; 128];
            let (mut m1, mut m2) = (1u8, 2u8);
            for (c, n) in (0..QK_K).step_by(64).enumerate() {
                for j in 0..32 {
                    let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                    if l1 > 15 {
                        l1 -= 16;
                        qh[j] |= m1;
                    }
                    if l2 > 15 {
                        l2 -= 16;
                        qh[j] |= m2;
                    }
                    ql[32 * c + j] = l1 | (l2 << 4);
                }
                m1 <<= 2;
                m2 <<= 2;
            }
            out.extend_from_slice(&qh);
            out.extend_from_slice(&ql);
        } else {
            for j in (0..QK_K).step_by(64) {
                for k in 0..32 {
                    out.push(l[j + k] | (l[j + k + 32] << 4));
                }
            }
        }
    }
    out
}

/// One row (a multiple of 256 values) as Q6_K blocks.
pub fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / QK_K * 210);
    for x in x.chunks_exact(QK_K) {
        let mut l = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants(&x[16 * ib..16 * ib + 16], 32, &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend_from_slice(&[0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16_round(1.0 / iscale);
        let mut sc = [0i8; 16];
        for ib in 0..16 {
            sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        }
        for j in 0..16 {
            let dd = d * sc[j] as f32;
            if dd == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dd).clamp(-32, 31) + 32) as i8;
            }
        }
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (h, j) in (0..QK_K).step_by(128).enumerate() {
            for k in 0..32 {
                let q = |o: usize| l[j + k + o] as u8;
                ql[64 * h + k] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[64 * h + k + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[32 * h + k] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&f16_bits(1.0 / iscale));
    }
    out
}

/// Q8_0: per 32 values, d = amax/127 stored as f16 and q = round(x/d), half away from
/// zero (C `roundf`).
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for b in x.chunks_exact(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(b.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

multiversion! {
    /// Q5_0 (`quantize_row_q5_0_ref`): per 32 values, d = −max/16 for the value of largest
    /// magnitude, 5-bit q = min(31, trunc(x/d + 16.5)); low nibbles in `qs`, fifth bits in `qh`.
    pub fn quantize_q5_0(x: &[f32]) -> Vec<u8> = quantize_q5_0_body
}

#[inline(always)]
fn quantize_q5_0_body(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; x.len() / 32 * 22];
    for (b, o) in x.chunks_exact(32).zip(out.chunks_exact_mut(22)) {
        // ggml keeps the first value of largest magnitude; max() is exact, so find it after.
        let mut amax = 0f32;
        for v in b {
            // Not f32::max: its NaN rule keeps the loop scalar.
            amax = if v.abs() > amax { v.abs() } else { amax };
        }
        let max = if amax == 0.0 {
            0.0
        } else {
            b.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
        };
        let d = max / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut xi = [0u8; 32];
        for (q, &v) in xi.iter_mut().zip(b) {
            // In [0.5, 32.5] (|v·id| ≤ 16): truncation to i32 is C's (int8_t) cast here.
            *q = ((v * id + 16.5) as i32).min(31) as u8;
        }
        let mut qh = 0u32;
        for j in 0..16 {
            o[6 + j] = (xi[j] & 0x0f) | ((xi[16 + j] & 0x0f) << 4);
            qh |= (((xi[j] & 0x10) >> 4) as u32) << j;
            qh |= (((xi[16 + j] & 0x10) >> 4) as u32) << (j + 16);
        }
        o[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        o[2..6].copy_from_slice(&qh.to_le_bytes());
    }
    out
}

/// Rows of `cols` values → ggml blocks, rows in parallel. `None` for types these
/// quantisers do not cover.
pub fn quantize_rows(ty: crate::QType, data: &[f32], cols: usize) -> Option<Vec<u8>> {
    use rayon::prelude::*;
    let (f, block): (fn(&[f32]) -> Vec<u8>, usize) = match ty {
        crate::QType::Q8_0 => (quantize_q8_0, 32),
        crate::QType::Q5_0 => (quantize_q5_0, 32),
        crate::QType::Q4K => (quantize_q4_k, QK_K),
        crate::QType::Q5K => (quantize_q5_k, QK_K),
        crate::QType::Q6K => (quantize_q6_k, QK_K),
        _ => return None,
    };
    if cols == 0 || cols % block != 0 || data.len() % cols != 0 {
        return None;
    }
    let row_bytes = f(&data[..cols]).len();
    let mut out = vec![0u8; data.len() / cols * row_bytes];
    out.par_chunks_mut(row_bytes)
        .zip(data.par_chunks(cols))
        .for_each(|(o, x)| o.copy_from_slice(&f(x)));
    Some(out)
}
