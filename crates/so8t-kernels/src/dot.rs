//! One weight row against one quantised activation row, per ggml type. The integer
//! inner loops are written plainly and compiled three times (AVX-512, AVX2, baseline) so
//! that LLVM vectorises them for the CPU found at run time.

use crate::blocks::{bf16_at, f16_at, q6k_quad, scale_min_k4, ActRow, Q8Block, Q8KBlock, QType};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Base,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Base
    }
}

pub fn row_dot(isa: Isa, ty: QType, w: &[u8], a: ActRow) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found these features on this CPU.
        Isa::Avx512 => unsafe { row_dot_avx512(ty, w, a) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { row_dot_avx2(ty, w, a) },
        _ => row_dot_generic(ty, w, a),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn row_dot_avx512(ty: QType, w: &[u8], a: ActRow) -> f32 {
    row_dot_generic(ty, w, a)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_dot_avx2(ty: QType, w: &[u8], a: ActRow) -> f32 {
    row_dot_generic(ty, w, a)
}

#[inline(always)]
fn row_dot_generic(ty: QType, w: &[u8], a: ActRow) -> f32 {
    match (ty, a) {
        (QType::Q4_0, ActRow::Q8(a)) => dot_q4(w, a, false),
        (QType::Q4_1, ActRow::Q8(a)) => dot_q4(w, a, true),
        (QType::Q5_0, ActRow::Q8(a)) => dot_q5(w, a, false),
        (QType::Q5_1, ActRow::Q8(a)) => dot_q5(w, a, true),
        (QType::Q8_0, ActRow::Q8(a)) => dot_q8_0(w, a),
        (QType::Q4K, ActRow::Q8K(a)) => dot_qk45(w, a, false),
        (QType::Q5K, ActRow::Q8K(a)) => dot_qk45(w, a, true),
        (QType::Q6K, ActRow::Q8K(a)) => dot_q6k(w, a),
        (QType::F16, ActRow::F32(a)) => dot_half(w, a, f16_at),
        (QType::BF16, ActRow::F32(a)) => dot_half(w, a, bf16_at),
        _ => unreachable!("activations are quantised for the weight type"),
    }
}

/// Q4_0·Q8_0 (`(q−8)·d`) and Q4_1·Q8_1 (`q·d + m`, whose `m` term meets `s = d_y·Σq_y`).
#[inline(always)]
fn dot_q4(w: &[u8], a: &[Q8Block], with_min: bool) -> f32 {
    let ts = if with_min { 20 } else { 18 };
    let off = if with_min { 0 } else { 8 };
    let mut sumf = 0f32;
    for (blk, y) in w.chunks_exact(ts).zip(a) {
        let qs = &blk[ts - 16..ts];
        let mut s = 0i32;
        for j in 0..16 {
            s += ((qs[j] & 0xF) as i32 - off) * y.qs[j] as i32
                + ((qs[j] >> 4) as i32 - off) * y.qs[j + 16] as i32;
        }
        sumf += f16_at(blk, 0) * y.d * s as f32;
        if with_min {
            sumf += f16_at(blk, 2) * y.s;
        }
    }
    sumf
}

#[inline(always)]
fn dot_q5(w: &[u8], a: &[Q8Block], with_min: bool) -> f32 {
    let ts = if with_min { 24 } else { 22 };
    let off = if with_min { 0 } else { 16 };
    let mut sumf = 0f32;
    for (blk, y) in w.chunks_exact(ts).zip(a) {
        let h = &blk[ts - 20..ts - 16];
        let qh = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let qs = &blk[ts - 16..ts];
        let mut s = 0i32;
        for j in 0..16 {
            let h0 = (((qh >> j) << 4) & 0x10) as i32;
            let h1 = ((qh >> (j + 12)) & 0x10) as i32;
            s += (((qs[j] & 0xF) as i32 | h0) - off) * y.qs[j] as i32
                + (((qs[j] >> 4) as i32 | h1) - off) * y.qs[j + 16] as i32;
        }
        sumf += f16_at(blk, 0) * y.d * s as f32;
        if with_min {
            sumf += f16_at(blk, 2) * y.s;
        }
    }
    sumf
}

#[inline(always)]
fn dot_q8_0(w: &[u8], a: &[Q8Block]) -> f32 {
    let mut sumf = 0f32;
    for (blk, y) in w.chunks_exact(34).zip(a) {
        let q = &blk[2..34];
        let mut s = 0i32;
        for j in 0..32 {
            s += q[j] as i8 as i32 * y.qs[j] as i32;
        }
        sumf += f16_at(blk, 0) * y.d * s as f32;
    }
    sumf
}

/// Q4_K and Q5_K: eight 32-wide sub-blocks with 6-bit scales and mins; the mins meet the
/// activation block sums (`bsums`) instead of the values.
#[inline(always)]
fn dot_qk45(w: &[u8], a: &[Q8KBlock], five: bool) -> f32 {
    let ts = if five { 176 } else { 144 };
    let mut sumf = 0f32;
    for (blk, y) in w.chunks_exact(ts).zip(a) {
        let scales = &blk[4..16];
        let (qh, ql) = if five {
            (&blk[16..48], &blk[48..176])
        } else {
            (&blk[0..0], &blk[16..144])
        };
        let mut isum = 0i32;
        let mut msum = 0i32;
        for c in 0..4 {
            let (s1, m1) = scale_min_k4(2 * c, scales);
            let (s2, m2) = scale_min_k4(2 * c + 1, scales);
            let q = &ql[32 * c..32 * c + 32];
            let (y1, y2) = (&y.qs[64 * c..64 * c + 32], &y.qs[64 * c + 32..64 * c + 64]);
            let (mut d1, mut d2) = (0i32, 0i32);
            for l in 0..32 {
                let (h1, h2) = if five {
                    (
                        (((qh[l] >> (2 * c)) & 1) << 4) as i32,
                        (((qh[l] >> (2 * c + 1)) & 1) << 4) as i32,
                    )
                } else {
                    (0, 0)
                };
                d1 += ((q[l] & 0xF) as i32 + h1) * y1[l] as i32;
                d2 += ((q[l] >> 4) as i32 + h2) * y2[l] as i32;
            }
            isum += s1 as i32 * d1 + s2 as i32 * d2;
            msum += m1 as i32 * (y.bsums[4 * c] as i32 + y.bsums[4 * c + 1] as i32)
                + m2 as i32 * (y.bsums[4 * c + 2] as i32 + y.bsums[4 * c + 3] as i32);
        }
        sumf += y.d * f16_at(blk, 0) * isum as f32 - y.d * f16_at(blk, 2) * msum as f32;
    }
    sumf
}

#[inline(always)]
fn dot_q6k(w: &[u8], a: &[Q8KBlock]) -> f32 {
    let mut sumf = 0f32;
    for (blk, y) in w.chunks_exact(210).zip(a) {
        let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
        let mut isum = 0i32;
        for half in 0..2 {
            let (ql, qh, sc) = (
                &ql[64 * half..64 * half + 64],
                &qh[32 * half..32 * half + 32],
                &sc[8 * half..8 * half + 8],
            );
            let q8 = &y.qs[128 * half..128 * half + 128];
            let mut part = [0i32; 8];
            for l in 0..32 {
                let q = q6k_quad(ql, qh, l);
                for (k, qk) in q.iter().enumerate() {
                    part[l / 16 + 2 * k] += qk * q8[l + 32 * k] as i32;
                }
            }
            for k in 0..8 {
                isum += sc[k] as i8 as i32 * part[k];
            }
        }
        sumf += f16_at(blk, 208) * y.d * isum as f32;
    }
    sumf
}

/// F16/BF16 weights against f32 activations, eight running sums as the SIMD kernels keep.
#[inline(always)]
fn dot_half(w: &[u8], a: &[f32], at: fn(&[u8], usize) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    for (c, &x) in a.iter().enumerate() {
        acc[c % 8] += at(w, 2 * c) * x;
    }
    acc.iter().sum()
}
