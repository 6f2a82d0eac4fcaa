//! Activations made ready for a product: kept f32 for half-precision weights, else
//! quantised to ggml's 8-bit blocks for the weight type, on the worker pool when there are
//! many rows, with the fastest quantiser this CPU has.

use crate::blocks::{quantize_q8_blocks, quantize_q8k_blocks, ActKind, Activations, Q8Block, Q8KBlock, QType, QK, QK_K};

/// The activation rows for a product with `ty` weights. Blocks are quantised on the
/// worker pool when there are many (prompts); each block's result does not depend on
/// which thread made it.
pub fn quantize_activations(ty: QType, x: &[f32], n: usize, cols: usize) -> Activations {
    match ty.act_kind() {
        ActKind::F32 => Activations::F32(x[..n * cols].to_vec(), cols),
        ActKind::Q8K => {
            let empty = Q8KBlock {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
            };
            let mut v = vec![empty; n * cols / QK_K];
            in_parallel(&x[..n * cols], &mut v, QK_K, quantize_q8k_blocks);
            Activations::Q8K(v, cols / QK_K)
        }
        ActKind::Q8 => {
            let empty = Q8Block {
                d: 0.0,
                s: 0.0,
                sum: 0,
                qs: [0; QK],
            };
            let mut v = vec![empty; n * cols / QK];
            in_parallel(&x[..n * cols], &mut v, QK, quantize_q8_fastest);
            Activations::Q8(v, cols / QK)
        }
    }
}

/// `f(x_chunk, out_chunk)` over the pool, `width` values per output block.
fn in_parallel<B: Send>(x: &[f32], out: &mut [B], width: usize, f: fn(&[f32], &mut [B])) {
    const PER_TASK: usize = 64;
    if out.len() < 4 * PER_TASK {
        return f(x, out);
    }
    crate::pool::global().chunks(out, PER_TASK, &|b0, o| {
        f(&x[b0 * width..(b0 + o.len()) * width], o)
    });
}

/// [`quantize_q8_blocks`], by hand with AVX-512 where the CPU has it (the same bytes).
fn quantize_q8_fastest(x: &[f32], out: &mut [Q8Block]) {
    #[cfg(target_arch = "x86_64")]
    if crate::dot::Isa::detect() == crate::dot::Isa::Avx512 {
        // SAFETY: `Isa::detect` found avx512f/bw/vl; `in_parallel` hands whole blocks.
        return unsafe { crate::x86::quantize_q8(x, out) };
    }
    quantize_q8_blocks(x, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX-512 quantiser gives the bytes, sums and scales of the portable one, on
    /// ordinary blocks and on zeros, ties, huge values, infinities and NaNs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn hand_written_q8_quantiser_gives_the_same_blocks() {
        if crate::dot::Isa::detect() != crate::dot::Isa::Avx512 {
            eprintln!("SKIPPED: this CPU has no AVX-512");
            return;
        }
        let mut r = crate::test_values(11);
        let mut x: Vec<f32> = (0..32 * 200).map(|i| r() * [1.0, 1e-3, 40.0, 3e30][i / 32 % 4]).collect();
        x[32..64].fill(0.0);
        for (i, v) in x[64..96].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5; // ties after scaling by 127/amax
        }
        x[100] = f32::NAN;
        x[140] = f32::INFINITY;
        x[170] = f32::NEG_INFINITY;
        x[200] = f32::NAN;
        x[201] = 2.0;
        let empty = Q8Block { d: 0.0, s: 0.0, sum: 0, qs: [0; QK] };
        let (mut want, mut got) = (vec![empty; 200], vec![empty; 200]);
        quantize_q8_blocks(&x, &mut want);
        // SAFETY: AVX-512 was found above.
        unsafe { crate::x86::quantize_q8(&x, &mut got) };
        for (b, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(w.qs, g.qs, "block {b}");
            assert_eq!(w.sum, g.sum, "block {b}");
            assert_eq!(w.d.to_bits(), g.d.to_bits(), "block {b}");
            assert_eq!(w.s.to_bits(), g.s.to_bits(), "block {b}");
        }
    }
}
