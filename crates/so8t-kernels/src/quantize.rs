//! Weight quantisers that write exactly what ggml's reference quantisers write
//! (`quantize_row_q8_0_ref`, `quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, which
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
fn make_qkx2_quants(x: &[f32], weights: &[f32], nmax: i32, l: &mut [u8], laux: &mut [u8], rmin: f32, rdelta: f32, nstep: i32) -> (f32, f32) {
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
    let mut iscale = nmax as f32 / (max - min);
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
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let w = weights[i];
            let lf = q as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
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
    let mut iscale = -(nmax as f32) / max;
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
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let q = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
            let w = v * v;
            sumlx += w * v * q as f32;
            suml2 += w * q as f32 * q as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..n {
                l[i] = (nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
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
        let mut laux = [0u8; 32];
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
            let (s, m) = make_qkx2_quants(xs, &weights, nmax, &mut l[32 * j..32 * j + 32], &mut laux, rmin, 0.1, nstep);
            scales[j] = s;
            mins[j] = m;
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
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
                qh[32 * h + k] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&ql);
        out.extend_from_slice(&qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend_from_slice(&f16_bits(1.0 / iscale));
    }
    out
}

/// Rows of `cols` values → ggml blocks, rows in parallel. `None` for types these
/// quantisers do not cover.
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

pub fn quantize_rows(ty: crate::QType, data: &[f32], cols: usize) -> Option<Vec<u8>> {
    use rayon::prelude::*;
    let (f, block): (fn(&[f32]) -> Vec<u8>, usize) = match ty {
        crate::QType::Q8_0 => (quantize_q8_0, 32),
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
    out.par_chunks_mut(row_bytes).zip(data.par_chunks(cols)).for_each(|(o, x)| o.copy_from_slice(&f(x)));
    Some(out)
}
