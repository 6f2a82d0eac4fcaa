//! ggml block layouts (ggml-common.h), exact dequantisation, and the activation
//! quantisers each weight type is multiplied with.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QType {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
    /// Half-precision weights, multiplied with f32 activations (no activation rounding).
    F16,
    BF16,
}

/// The activation format a weight type is multiplied with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActKind {
    Q8,
    Q8K,
    F32,
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

impl QType {
    pub const ALL: [QType; 10] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q8_0,
        QType::Q4K,
        QType::Q5K,
        QType::Q6K,
        QType::F16,
        QType::BF16,
    ];

    pub fn act_kind(self) -> ActKind {
        match self {
            QType::Q4K | QType::Q5K | QType::Q6K => ActKind::Q8K,
            QType::F16 | QType::BF16 => ActKind::F32,
            _ => ActKind::Q8,
        }
    }

    pub fn block_size(self) -> usize {
        match self {
            QType::Q4K | QType::Q5K | QType::Q6K => QK_K,
            QType::F16 | QType::BF16 => 1,
            _ => QK,
        }
    }

    pub fn type_size(self) -> usize {
        match self {
            QType::Q4_0 => 18,
            QType::Q4_1 => 20,
            QType::Q5_0 => 22,
            QType::Q5_1 => 24,
            QType::Q8_0 => 34,
            QType::Q4K => 144,
            QType::Q5K => 176,
            QType::Q6K => 210,
            QType::F16 | QType::BF16 => 2,
        }
    }
}

fn f16_table() -> &'static [f32] {
    static T: OnceLock<Vec<f32>> = OnceLock::new();
    T.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| half::f16::from_bits(b).to_f32())
            .collect()
    })
}

#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    // SAFETY-free table lookup: every u16 is a valid index.
    f16_table()[u16::from_le_bytes([b[i], b[i + 1]]) as usize]
}

#[inline(always)]
pub fn bf16_at(b: &[u8], i: usize) -> f32 {
    f32::from_bits((u16::from_le_bytes([b[i], b[i + 1]]) as u32) << 16)
}

/// `d` is the f16-rounded scale as f32, exactly what ggml multiplies with; `s = fp16(d·Σq)`;
/// `sum = Σq` (the SIMD kernels multiply unsigned weights and subtract the offset times it).
#[derive(Clone, Copy)]
pub struct Q8Block {
    pub d: f32,
    pub s: f32,
    pub sum: i32,
    pub qs: [i8; QK],
}

#[derive(Clone, Copy)]
pub struct Q8KBlock {
    pub d: f32,
    pub qs: [i8; QK_K],
    pub bsums: [i16; QK_K / 16],
}

pub enum Activations {
    Q8(Vec<Q8Block>, usize),
    Q8K(Vec<Q8KBlock>, usize),
    F32(Vec<f32>, usize),
}

#[derive(Clone, Copy)]
pub enum ActRow<'a> {
    Q8(&'a [Q8Block]),
    Q8K(&'a [Q8KBlock]),
    F32(&'a [f32]),
}

impl Activations {
    pub fn row(&self, i: usize) -> ActRow<'_> {
        match self {
            Activations::Q8(v, per) => ActRow::Q8(&v[i * per..(i + 1) * per]),
            Activations::Q8K(v, per) => ActRow::Q8K(&v[i * per..(i + 1) * per]),
            Activations::F32(v, per) => ActRow::F32(&v[i * per..(i + 1) * per]),
        }
    }
}

pub(crate) fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// ggml x86 `quantize_row_q8_0` / `quantize_row_q8_1`.
#[inline(always)]
fn quantize_q8(x: &[f32]) -> Q8Block {
    // Eight running maxima (vector lanes), then theirs: max is exact in any order.
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for j in 0..8 {
            lanes[j] = lanes[j].max(c[j].abs());
        }
    }
    let amax = lanes.iter().fold(0f32, |m, &v| m.max(v));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut qs = [0i8; QK];
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round_ties_even() as i8;
        sum += *q as i32;
    }
    Q8Block {
        d: round_f16(d),
        s: round_f16(d * sum as f32),
        sum,
        qs,
    }
}

/// ggml `quantize_row_q8_K_ref`.
#[inline(always)]
fn quantize_q8k(x: &[f32]) -> Q8KBlock {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    let mut b = Q8KBlock {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    if amax == 0.0 {
        return b;
    }
    let iscale = -127.0 / max;
    for (q, &v) in b.qs.iter_mut().zip(x) {
        *q = nearest_int(iscale * v).min(127) as i8;
    }
    for (j, s) in b.bsums.iter_mut().enumerate() {
        *s = b.qs[j * 16..(j + 1) * 16].iter().map(|&q| q as i16).sum();
    }
    b.d = 1.0 / iscale;
    b
}

/// ggml's `nearest_int`: round half to even via the 1.5·2²³ trick.
#[inline(always)]
fn nearest_int(f: f32) -> i32 {
    let v = f + 12582912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

multiversion! {
    pub(crate) fn quantize_q8_blocks(x: &[f32], out: &mut [Q8Block]) -> () = quantize_q8_body
}

multiversion! {
    pub(crate) fn quantize_q8k_blocks(x: &[f32], out: &mut [Q8KBlock]) -> () = quantize_q8k_body
}

#[inline(always)]
fn quantize_q8_body(x: &[f32], out: &mut [Q8Block]) {
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK)) {
        *o = quantize_q8(c);
    }
}

#[inline(always)]
fn quantize_q8k_body(x: &[f32], out: &mut [Q8KBlock]) {
    for (o, c) in out.iter_mut().zip(x.chunks_exact(QK_K)) {
        *o = quantize_q8k(c);
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The four signed 6-bit values of a Q6_K half-block at offset `l` (0..32): elements
/// l, l+32, l+64 and l+96 of that 128-wide half.
#[inline(always)]
pub fn q6k_quad(ql: &[u8], qh: &[u8], l: usize) -> [i32; 4] {
    [
        ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32,
        ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32,
        ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32,
        ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32,
    ]
}

/// Exact dequantisation of one row (ggml `dequantize_row_*`).
pub fn dequantize(ty: QType, row: &[u8], out: &mut [f32]) {
    // One-value "blocks": a plain loop, not a dispatch per value (widening a bf16 matrix for
    // a prompt's gemm spent more time in the dispatch than in the product).
    match ty {
        QType::BF16 => {
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
            }
            return;
        }
        QType::F16 => {
            let table = f16_table();
            for (o, c) in out.iter_mut().zip(row.chunks_exact(2)) {
                *o = table[u16::from_le_bytes([c[0], c[1]]) as usize];
            }
            return;
        }
        _ => {}
    }
    let ts = ty.type_size();
    for (b, blk) in row.chunks_exact(ts).enumerate() {
        let y = &mut out[b * ty.block_size()..(b + 1) * ty.block_size()];
        match ty {
            QType::Q4_0 | QType::Q4_1 => {
                let d = f16_at(blk, 0);
                let (m, qs, off) = if ty == QType::Q4_1 {
                    (f16_at(blk, 2), &blk[4..20], 0.0)
                } else {
                    (0.0, &blk[2..18], 8.0)
                };
                for j in 0..16 {
                    y[j] = ((qs[j] & 0xF) as f32 - off) * d + m;
                    y[j + 16] = ((qs[j] >> 4) as f32 - off) * d + m;
                }
            }
            QType::Q5_0 | QType::Q5_1 => {
                let d = f16_at(blk, 0);
                let (m, rest, off) = if ty == QType::Q5_1 {
                    (f16_at(blk, 2), &blk[4..], 0.0)
                } else {
                    (0.0, &blk[2..], 16.0)
                };
                let qh = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                let qs = &rest[4..20];
                for j in 0..16 {
                    let h0 = ((qh >> j) << 4) & 0x10;
                    let h1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0xF) as u32 | h0) as f32 - off) * d + m;
                    y[j + 16] = (((qs[j] >> 4) as u32 | h1) as f32 - off) * d + m;
                }
            }
            QType::Q8_0 => {
                let d = f16_at(blk, 0);
                for j in 0..32 {
                    y[j] = blk[2 + j] as i8 as f32 * d;
                }
            }
            QType::Q4K | QType::Q5K => {
                let d = f16_at(blk, 0);
                let dmin = f16_at(blk, 2);
                let scales = &blk[4..16];
                let (qh, ql) = if ty == QType::Q5K {
                    (Some(&blk[16..48]), &blk[48..176])
                } else {
                    (None, &blk[16..144])
                };
                for c in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * c, scales);
                    let (s2, m2) = scale_min_k4(2 * c + 1, scales);
                    let q = &ql[32 * c..32 * c + 32];
                    for l in 0..32 {
                        let (h1, h2) = match qh {
                            Some(h) => (
                                ((h[l] >> (2 * c)) & 1) as u32 * 16,
                                ((h[l] >> (2 * c + 1)) & 1) as u32 * 16,
                            ),
                            None => (0, 0),
                        };
                        y[64 * c + l] =
                            d * s1 as f32 * ((q[l] & 0xF) as u32 + h1) as f32 - dmin * m1 as f32;
                        y[64 * c + 32 + l] =
                            d * s2 as f32 * ((q[l] >> 4) as u32 + h2) as f32 - dmin * m2 as f32;
                    }
                }
            }
            QType::F16 => y[0] = f16_at(blk, 0),
            QType::BF16 => y[0] = bf16_at(blk, 0),
            QType::Q6K => {
                let (ql, qh, sc) = (&blk[0..128], &blk[128..192], &blk[192..208]);
                let d = f16_at(blk, 208);
                for half in 0..2 {
                    let (ql, qh, sc) = (&ql[64 * half..], &qh[32 * half..], &sc[8 * half..]);
                    let y = &mut y[128 * half..];
                    for l in 0..32 {
                        let q = q6k_quad(ql, qh, l);
                        for (k, qk) in q.iter().enumerate() {
                            y[l + 32 * k] = d * (sc[l / 16 + 2 * k] as i8) as f32 * *qk as f32;
                        }
                    }
                }
            }
        }
    }
}

