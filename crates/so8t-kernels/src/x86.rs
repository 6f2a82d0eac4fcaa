//! Hand-written x86 kernels: one weight row against up to four activation rows at once,
//! so that a weight block is loaded and unpacked once per group of rows (matrix–vector for
//! decoding, matrix–matrix for prompts).
//!
//! Every quantised type is reduced to "unsigned 8-bit weights × signed 8-bit activations",
//! the shape of `vpdpbusd` (AVX-512 VNNI) and of `vpmaddubsw` + `vpmaddwd` (AVX2): 4- and
//! 5-bit weights are stored with an offset (`q − 8`, `q − 16`, `q − 32`), so the kernels
//! multiply the unsigned `q` and subtract offset × Σactivations, which the activation
//! quantiser has already summed; Q8_0 moves its signs onto the activations. The integer
//! sum of each block is exactly ggml's; block results are accumulated in eight float lanes
//! (as ggml's AVX2 code does), so only the order of float additions differs.

use crate::blocks::{scale_min_k4, ActRow, Q8Block, Q8KBlock, QType};
use std::arch::x86_64::*;

/// `out[r·n + i] = w_r · a[i]` for `i < n = a.len() ≤ 4` and each row `w_r` of `w` (consecutive
/// rows of `row_bytes`), compiled for AVX-512 VNNI. A call takes a tile of rows: a row of
/// a small matrix is decoded in tens of nanoseconds, which one call per row would spend
/// again on dispatch.
///
/// # Safety
/// The CPU must have avx512f, avx512bw, avx512vl, avx512vnni, avx2, fma and f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn rows_vnni(ty: QType, w: &[u8], row_bytes: usize, a: &[ActRow], out: &mut [f32]) {
    rows::<true>(ty, w, row_bytes, a, out)
}

/// The same with AVX2 only.
///
/// # Safety
/// The CPU must have avx2, fma and f16c.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_avx2(ty: QType, w: &[u8], row_bytes: usize, a: &[ActRow], out: &mut [f32]) {
    rows::<false>(ty, w, row_bytes, a, out)
}

#[inline(always)]
unsafe fn rows<const VNNI: bool>(ty: QType, w: &[u8], row_bytes: usize, a: &[ActRow], out: &mut [f32]) {
    macro_rules! each_row {
        ($n:literal) => {
            for (wr, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut($n)) {
                group::<VNNI, $n>(ty, wr, a, o)
            }
        };
    }
    match a.len() {
        4 => each_row!(4),
        3 => each_row!(3),
        2 => each_row!(2),
        1 => each_row!(1),
        n => unreachable!("{n} activation rows in a group"),
    }
}

#[inline(always)]
unsafe fn group<const VNNI: bool, const N: usize>(
    ty: QType,
    w: &[u8],
    a: &[ActRow],
    out: &mut [f32],
) {
    let r: [f32; N] = match ty {
        QType::Q4_0 => q32::<VNNI, N, Q4_0>(w, q8_rows(a)),
        QType::Q4_1 => q32::<VNNI, N, Q4_1>(w, q8_rows(a)),
        QType::Q5_0 => q32::<VNNI, N, Q5_0>(w, q8_rows(a)),
        QType::Q5_1 => q32::<VNNI, N, Q5_1>(w, q8_rows(a)),
        QType::Q8_0 => q32::<VNNI, N, Q8_0>(w, q8_rows(a)),
        QType::Q4K => q4k::<VNNI, N>(w, q8k_rows(a)),
        QType::Q6K => q6k::<VNNI, N>(w, q8k_rows(a)),
        QType::F16 => half::<N, false>(w, f32_rows(a)),
        QType::BF16 => half::<N, true>(w, f32_rows(a)),
        QType::Q5K => unreachable!("Q5_K has no SIMD kernel; `supported` says so"),
    };
    out[..N].copy_from_slice(&r);
}

/// Types with a kernel here (the others use the portable code).
pub fn supported(ty: QType) -> bool {
    ty != QType::Q5K
}

#[inline(always)]
fn q8_rows<'a, const N: usize>(a: &[ActRow<'a>]) -> [&'a [Q8Block]; N] {
    std::array::from_fn(|i| match a[i] {
        ActRow::Q8(r) => r,
        _ => unreachable!("activations are quantised for the weight type"),
    })
}

#[inline(always)]
fn q8k_rows<'a, const N: usize>(a: &[ActRow<'a>]) -> [&'a [Q8KBlock]; N] {
    std::array::from_fn(|i| match a[i] {
        ActRow::Q8K(r) => r,
        _ => unreachable!("activations are quantised for the weight type"),
    })
}

#[inline(always)]
fn f32_rows<'a, const N: usize>(a: &[ActRow<'a>]) -> [&'a [f32]; N] {
    std::array::from_fn(|i| match a[i] {
        ActRow::F32(r) => r,
        _ => unreachable!("activations are f32 for half-precision weights"),
    })
}

/// `acc + Σ₄ u·s` per 32-bit lane (u unsigned, s signed bytes). Without VNNI the pairwise
/// 16-bit sums cannot saturate: every caller keeps |u·s| ≤ 128·127.
#[inline(always)]
unsafe fn dot_us<const VNNI: bool>(acc: __m256i, u: __m256i, s: __m256i) -> __m256i {
    if VNNI {
        _mm256_dpbusd_epi32(acc, u, s)
    } else {
        let p = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)))
    }
}

/// `acc + Σ₄ u·s·scale` per 32-bit lane, with `scale` in 16-bit lanes (one per pair).
/// |u·s| pairs stay within 16 bits for the ≤ 6-bit weights that call this.
#[inline(always)]
unsafe fn dot_us_scaled<const VNNI: bool>(
    acc: __m256i,
    u: __m256i,
    s: __m256i,
    scale: __m256i,
) -> __m256i {
    let p = _mm256_maddubs_epi16(u, s);
    if VNNI {
        _mm256_dpwssd_epi32(acc, p, scale)
    } else {
        _mm256_add_epi32(acc, _mm256_madd_epi16(p, scale))
    }
}

#[inline(always)]
unsafe fn f16(p: *const u8) -> f32 {
    f16_bits((p as *const u16).read_unaligned())
}

#[inline(always)]
unsafe fn f16_bits(h: u16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
}

#[inline(always)]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[inline(always)]
unsafe fn load(p: *const i8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// Sixteen bytes of nibbles as 32 bytes: low nibbles first (elements 0..16), then high.
#[inline(always)]
unsafe fn nibbles(p: *const u8) -> __m256i {
    let v = _mm_loadu_si128(p as *const __m128i);
    let both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Bit `e` of the 32-bit word at `p` as byte `e`: 0x10 where set (ggml `bytes_from_bits_32`).
#[inline(always)]
unsafe fn high_bits(p: *const u8) -> __m256i {
    let x = (p as *const u32).read_unaligned();
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0x0000000000000000,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(x as i32), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    let set = _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

/// How far ahead of the block being multiplied the weights are prefetched, in bytes.
const PREFETCH: usize = 4096;

/// Prefetches the cache lines of a `len`-byte block [`PREFETCH`] bytes ahead.
#[inline(always)]
unsafe fn prefetch_lines(blk: *const u8, len: usize) {
    let mut off = 0;
    while off < len {
        _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH + off) as *const i8);
        off += 64;
    }
}

/// The 32-wide types, as the const `T` of [`q32`].
const Q4_0: u8 = 0;
const Q4_1: u8 = 1;
const Q5_0: u8 = 2;
const Q5_1: u8 = 3;
const Q8_0: u8 = 4;

/// Q4_0/Q5_0 (`(q − off)·d`), Q4_1/Q5_1 (`q·d + m`, whose `m` meets `s = d_y·Σq_y`) and
/// Q8_0 (signed `q·d`). Two blocks per iteration, each into its own accumulators, so
/// that one block's float additions do not wait for the previous block's.
#[inline(always)]
unsafe fn q32<const VNNI: bool, const N: usize, const T: u8>(
    w: &[u8],
    a: [&[Q8Block]; N],
) -> [f32; N] {
    let ts = [18, 20, 22, 24, 34][T as usize];
    let nb = w.len() / ts;
    let mut acc = [[_mm256_setzero_ps(); 2]; N];
    let mut mins = [0f32; N];
    let mut b = 0;
    while b + 1 < nb {
        q32_block::<VNNI, N, T>(w.as_ptr().add(b * ts), &a, b, &mut acc, 0, &mut mins);
        q32_block::<VNNI, N, T>(
            w.as_ptr().add((b + 1) * ts),
            &a,
            b + 1,
            &mut acc,
            1,
            &mut mins,
        );
        b += 2;
    }
    if b < nb {
        q32_block::<VNNI, N, T>(w.as_ptr().add(b * ts), &a, b, &mut acc, 0, &mut mins);
    }
    std::array::from_fn(|i| hsum(_mm256_add_ps(acc[i][0], acc[i][1])) + mins[i])
}

#[inline(always)]
unsafe fn q32_block<const VNNI: bool, const N: usize, const T: u8>(
    blk: *const u8,
    a: &[&[Q8Block]; N],
    b: usize,
    acc: &mut [[__m256; 2]; N],
    j: usize,
    mins: &mut [f32; N],
) {
    // Weights stream from memory once per token: ask for them well before they are needed
    // (each call covers only a few kilobytes per thread, too short for the hardware
    // prefetcher to get ahead).
    _mm_prefetch::<_MM_HINT_T0>(blk.add(PREFETCH) as *const i8);
    let d = f16(blk);
    let (u, signs) = match T {
        Q4_0 => (nibbles(blk.add(2)), None),
        Q4_1 => (nibbles(blk.add(4)), None),
        Q5_0 => (
            _mm256_or_si256(nibbles(blk.add(6)), high_bits(blk.add(2))),
            None,
        ),
        Q5_1 => (
            _mm256_or_si256(nibbles(blk.add(8)), high_bits(blk.add(4))),
            None,
        ),
        _ => {
            let q = load(blk.add(2) as *const i8);
            (_mm256_sign_epi8(q, q), Some(q))
        }
    };
    let offset = match T {
        Q4_0 => -8,
        Q5_0 => -16,
        _ => 0,
    };
    for i in 0..N {
        let y = a[i].get_unchecked(b);
        let mut s = load(y.qs.as_ptr());
        if let Some(q) = signs {
            s = _mm256_sign_epi8(s, q);
        }
        let init = _mm256_setr_epi32(offset * y.sum, 0, 0, 0, 0, 0, 0, 0);
        let p = dot_us::<VNNI>(init, u, s);
        acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(p), acc[i][j]);
        if T == Q4_1 || T == Q5_1 {
            mins[i] += f16(blk.add(2)) * y.s;
        }
    }
}

/// Q4_K: eight 32-wide sub-blocks with 6-bit scales and mins; the mins meet the
/// activation's 16-wide sums (`bsums`) instead of the values.
#[inline(always)]
unsafe fn q4k<const VNNI: bool, const N: usize>(w: &[u8], a: [&[Q8KBlock]; N]) -> [f32; N] {
    let nb = w.len() / 144;
    let mut acc = [_mm256_setzero_ps(); N];
    let mut accm = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let blk = w.as_ptr().add(b * 144);
        prefetch_lines(blk, 144);
        let blk_s = std::slice::from_raw_parts(blk, 144);
        let (d, dmin) = (f16(blk), f16(blk.add(2)));
        let mut sc = [0i16; 8];
        let mut mn = [0i16; 16];
        for j in 0..8 {
            let (s, m) = scale_min_k4(j, &blk_s[4..16]);
            sc[j] = s as i16;
            mn[2 * j] = m as i16;
            mn[2 * j + 1] = m as i16;
        }
        let mins = _mm256_loadu_si256(mn.as_ptr() as *const __m256i);
        let mut sumi = [_mm256_setzero_si256(); N];
        for c in 0..4 {
            let q = _mm256_loadu_si256(blk.add(16 + 32 * c) as *const __m256i);
            let lo = _mm256_and_si256(q, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            let (s1, s2) = (
                _mm256_set1_epi16(sc[2 * c]),
                _mm256_set1_epi16(sc[2 * c + 1]),
            );
            for i in 0..N {
                let y = a[i].get_unchecked(b).qs.as_ptr().add(64 * c);
                sumi[i] = dot_us_scaled::<VNNI>(sumi[i], lo, load(y), s1);
                sumi[i] = dot_us_scaled::<VNNI>(sumi[i], hi, load(y.add(32)), s2);
            }
        }
        for i in 0..N {
            let y = a[i].get_unchecked(b);
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let pm = _mm256_madd_epi16(bs, mins);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(sumi[i]), acc[i]);
            accm[i] = _mm256_fmadd_ps(_mm256_set1_ps(dmin * y.d), _mm256_cvtepi32_ps(pm), accm[i]);
        }
    }
    std::array::from_fn(|i| hsum(acc[i]) - hsum(accm[i]))
}

/// Q6_K: 6-bit `q − 32` with a signed 8-bit scale per 16 values; the offset meets `bsums`.
#[inline(always)]
unsafe fn q6k<const VNNI: bool, const N: usize>(w: &[u8], a: [&[Q8KBlock]; N]) -> [f32; N] {
    let nb = w.len() / 210;
    let mut acc = [_mm256_setzero_ps(); N];
    let m4 = _mm256_set1_epi8(0x0F);
    for b in 0..nb {
        let blk = w.as_ptr().add(b * 210);
        prefetch_lines(blk, 210);
        let d = f16(blk.add(208));
        let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
        let sc16 = _mm256_cvtepi8_epi16(sc8);
        let mut sumi = [_mm256_setzero_si256(); N];
        for half in 0..2 {
            let ql = blk.add(64 * half);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * half) as *const __m256i);
            let la = _mm256_loadu_si256(ql as *const __m256i);
            let lb = _mm256_loadu_si256(ql.add(32) as *const __m256i);
            let q = [
                _mm256_or_si256(_mm256_and_si256(la, m4), high2::<0>(qh)),
                _mm256_or_si256(_mm256_and_si256(lb, m4), high2::<2>(qh)),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(la), m4),
                    high2::<4>(qh),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(lb), m4),
                    high2::<6>(qh),
                ),
            ];
            for (k, qk) in q.iter().enumerate() {
                let s = 8 * half + 2 * k;
                let (lo, hi) = (blk.add(192 + s).read() as i8, blk.add(193 + s).read() as i8);
                let scale = _mm256_set_m128i(_mm_set1_epi16(hi as i16), _mm_set1_epi16(lo as i16));
                for i in 0..N {
                    let y = a[i].get_unchecked(b).qs.as_ptr().add(128 * half + 32 * k);
                    sumi[i] = dot_us_scaled::<VNNI>(sumi[i], *qk, load(y), scale);
                }
            }
        }
        for i in 0..N {
            let y = a[i].get_unchecked(b);
            let bs = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let off = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);
            let s = _mm256_sub_epi32(sumi[i], off);
            acc[i] = _mm256_fmadd_ps(_mm256_set1_ps(d * y.d), _mm256_cvtepi32_ps(s), acc[i]);
        }
    }
    std::array::from_fn(|i| hsum(acc[i]))
}

/// Bits `S..S+2` of each byte of `qh`, as bits 4..6 (Q6_K's upper two bits).
#[inline(always)]
unsafe fn high2<const S: i32>(qh: __m256i) -> __m256i {
    let h = _mm256_srli_epi16::<S>(qh);
    _mm256_slli_epi16::<4>(_mm256_and_si256(h, _mm256_set1_epi8(3)))
}

/// F16/BF16 weights against f32 activations. Decoding reads each weight once per token, so
/// this is bound by memory if the arithmetic keeps up: two FMA chains per activation row
/// (one chain waits on the FMA latency; two decoded a bf16 SmolLM2 1.06–1.10× faster),
/// eight lanes each (sixteen-lane AVX-512 was slower on AMD Zen 4: 0.92×), then eight
/// lanes and single values for the tail. The order of additions is the same for every
/// `N`, so a batch gives each row the bits it gets alone.
#[inline(always)]
unsafe fn half<const N: usize, const BF16: bool>(w: &[u8], a: [&[f32]; N]) -> [f32; N] {
    let cols = w.len() / 2;
    let p = w.as_ptr() as *const u16;
    let mut c = 0;
    let mut acc0 = [_mm256_setzero_ps(); N];
    let mut acc1 = [_mm256_setzero_ps(); N];
    while c + 16 <= cols {
        let (x0, x1) = (widen8::<BF16>(p.add(c)), widen8::<BF16>(p.add(c + 8)));
        for i in 0..N {
            let pa = a[i].as_ptr().add(c);
            acc0[i] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(pa), acc0[i]);
            acc1[i] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(pa.add(8)), acc1[i]);
        }
        c += 16;
    }
    let wide: [f32; N] = std::array::from_fn(|i| hsum(_mm256_add_ps(acc0[i], acc1[i])));
    let mut acc = [_mm256_setzero_ps(); N];
    while c + 8 <= cols {
        let x = widen8::<BF16>(p.add(c));
        for i in 0..N {
            acc[i] = _mm256_fmadd_ps(x, _mm256_loadu_ps(a[i].as_ptr().add(c)), acc[i]);
        }
        c += 8;
    }
    let body = c;
    let mut tail = [[0f32; 8]; N];
    for c in body..cols {
        let bits = p.add(c).read_unaligned();
        let x = if BF16 {
            f32::from_bits((bits as u32) << 16)
        } else {
            f16_bits(bits)
        };
        for i in 0..N {
            tail[i][c % 8] = x.mul_add(a[i][c], tail[i][c % 8]);
        }
    }
    std::array::from_fn(|i| {
        let t = _mm256_loadu_ps(tail[i].as_ptr());
        wide[i] + hsum(_mm256_add_ps(acc[i], t))
    })
}

/// Eight F16/BF16 values at `p` as f32.
#[inline(always)]
unsafe fn widen8<const BF16: bool>(p: *const u16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    if BF16 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    } else {
        _mm256_cvtph_ps(h)
    }
}

/// Eight rows at once from the interleaved layout ([`crate::QMatrix`] packs Q8_0, Q4_0, Q5_0
/// so when this kernel is the best): per block, the eight rows' f16 scales, then their
/// quants in 4-byte runs, row after row (Q8_0 stored `q ^ 0x80`, i.e. `q + 128`
/// unsigned). One `vpdpbusd` then multiplies four weights of each of the eight rows by the
/// same four activations (a broadcast load), and the eight results land in the eight
/// lanes: no horizontal sums, no per-row scale broadcasts.
///
/// `out[i]` receives the eight rows' products with activation row `i`.
///
/// # Safety
/// As [`rows_vnni`]; `w` holds whole interleaved blocks of a Q8_0, Q4_0 or Q5_0 row group.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub unsafe fn group8_vnni(ty: QType, w: &[u8], a: &[ActRow], out: &mut [[f32; 8]]) {
    macro_rules! go {
        ($n:literal) => {
            match ty {
                QType::Q8_0 => packed8::<$n, Q8_0>(w, q8_rows(a), out),
                QType::Q4_0 => packed8::<$n, Q4_0>(w, q8_rows(a), out),
                QType::Q5_0 => packed8::<$n, Q5_0>(w, q8_rows(a), out),
                _ => unreachable!("only Q8_0, Q4_0 and Q5_0 are interleaved"),
            }
        };
    }
    match a.len() {
        4 => go!(4),
        3 => go!(3),
        2 => go!(2),
        1 => go!(1),
        n => unreachable!("{n} activation rows in a group"),
    }
}

#[inline(always)]
unsafe fn packed8<const N: usize, const T: u8>(w: &[u8], a: [&[Q8Block]; N], out: &mut [[f32; 8]]) {
    let stride = 8 * [18, 20, 22, 24, 34][T as usize];
    let nb = w.len() / stride;
    let m4 = _mm256_set1_epi8(0x0F);
    let zero = _mm256_setzero_si256();
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let base = w.as_ptr().add(b * stride);
        prefetch_lines(base, stride);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(base as *const __m128i));
        let q = base.add(if T == Q5_0 { 48 } else { 16 });
        // Weight vector k meets activation bytes `at[k]..at[k] + 4` of the block.
        let mut wv = [zero; 8];
        let mut at = [0usize; 8];
        if T == Q8_0 {
            for c in 0..8 {
                wv[c] = load(q.add(32 * c) as *const i8);
                at[c] = 4 * c;
            }
        } else {
            for c in 0..4 {
                let v = load(q.add(32 * c) as *const i8);
                wv[2 * c] = _mm256_and_si256(v, m4);
                wv[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), m4);
                at[2 * c] = 4 * c;
                at[2 * c + 1] = 16 + 4 * c;
            }
            if T == Q5_0 {
                // Bit j of each byte of the high-bit words is vector j's high bit.
                let qh = load(base.add(16) as *const i8);
                for (j, w) in wv.iter_mut().enumerate() {
                    let bit = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(j as i32));
                    let high = _mm256_and_si256(bit, _mm256_set1_epi8(1));
                    *w = _mm256_or_si256(*w, _mm256_slli_epi16::<4>(high));
                }
            }
        }
        for i in 0..N {
            let y = a[i].get_unchecked(b);
            let yq = y.qs.as_ptr();
            let sum = _mm256_set1_epi32(y.sum);
            let offset = match T {
                Q8_0 => _mm256_slli_epi32::<7>(sum),
                Q5_0 => _mm256_slli_epi32::<4>(sum),
                _ => _mm256_slli_epi32::<3>(sum),
            };
            // Four independent chains: `vpdpbusd` has a latency of several cycles.
            let mut s = [_mm256_sub_epi32(zero, offset), zero, zero, zero];
            for k in 0..8 {
                let x = _mm256_set1_epi32((yq.add(at[k]) as *const i32).read_unaligned());
                s[k % 4] = _mm256_dpbusd_epi32(s[k % 4], wv[k], x);
            }
            let isum = _mm256_add_epi32(_mm256_add_epi32(s[0], s[1]), _mm256_add_epi32(s[2], s[3]));
            let scale = _mm256_mul_ps(dw, _mm256_set1_ps(y.d));
            acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[i]);
        }
    }
    for i in 0..N {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
}

/// ggml's 8-bit activation blocks ([`crate::blocks`]' `quantize_q8`) with AVX-512: the
/// same maximum (NaN ignored), products and round-half-to-even, so the same bytes and
/// sums; a prompt had spent 7% of its time in the compiler's version.
///
/// # Safety
/// The CPU must have avx512f, avx512bw and avx512vl; `x` holds `32 · out.len()` values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub unsafe fn quantize_q8(x: &[f32], out: &mut [Q8Block]) {
    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    let abs = |v: __m512| _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fff_ffff)));
    for (o, c) in out.iter_mut().zip(x.chunks_exact(32)) {
        let (a, b) = (_mm512_loadu_ps(c.as_ptr()), _mm512_loadu_ps(c.as_ptr().add(16)));
        // `max` returns its second operand when either is NaN: the running maximum.
        let m = _mm512_max_ps(abs(b), _mm512_max_ps(abs(a), _mm512_setzero_ps()));
        let amax = _mm512_reduce_max_ps(m);
        let d = amax / 127.0;
        let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        // NaN converts to i32::MIN, whose low byte is 0, as `NaN as i8` is.
        let qa = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(a, id)));
        let qb = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(b, id)));
        _mm_storeu_si128(o.qs.as_mut_ptr() as *mut __m128i, qa);
        _mm_storeu_si128(o.qs.as_mut_ptr().add(16) as *mut __m128i, qb);
        let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(_mm512_cvtepi8_epi32(qa), _mm512_cvtepi8_epi32(qb)));
        o.d = crate::blocks::round_f16(d);
        o.s = crate::blocks::round_f16(d * sum as f32);
        o.sum = sum;
    }
}
