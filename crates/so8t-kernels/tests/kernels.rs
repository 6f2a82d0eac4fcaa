//! Every kernel against the straightforward result: dequantise the weights exactly, then
//! multiply in f64 with the unquantised activations. The difference is the 8-bit
//! activation rounding ggml also does: at most half a step (amax/254) per element, so
//! |Δ| ≤ Σ_c |w_c|·amax_block/254 per output; we assert that bound, and that a much
//! tighter typical error holds on average.

use rand::{rngs::StdRng, Rng, SeedableRng};
use so8t_kernels::{Kernel, QMatrix, QType};

/// Random but valid blocks: random bytes, with the f16 scale fields overwritten by
/// small positive values so that no NaN/Inf scale appears.
fn random_matrix(ty: QType, rows: usize, cols: usize, rng: &mut StdRng) -> QMatrix {
    let ts = ty.type_size();
    let nblk = rows * cols / ty.block_size();
    let mut data = vec![0u8; nblk * ts];
    rng.fill(&mut data[..]);
    if matches!(ty, QType::F16 | QType::BF16) {
        for (i, v) in data.chunks_exact_mut(2).enumerate() {
            let x = rng.random_range(-1.0f32..1.0) * if i % 7 == 0 { 4.0 } else { 0.1 };
            let bits = match ty {
                QType::F16 => half::f16::from_f32(x).to_bits(),
                _ => half::bf16::from_f32(x).to_bits(),
            };
            v.copy_from_slice(&bits.to_le_bytes());
        }
        return QMatrix::new(ty, rows, cols, data).unwrap();
    }
    let scale_offsets: &[usize] = match ty {
        QType::Q4_0 | QType::Q5_0 | QType::Q8_0 => &[0],
        QType::Q4_1 | QType::Q5_1 | QType::Q4K | QType::Q5K => &[0, 2],
        QType::Q6K => &[208],
        QType::F16 | QType::BF16 => unreachable!(),
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
    for (ty, (rows, cols, n)) in QType::ALL
        .into_iter()
        .flat_map(|ty| [(ty, (37, 512, 3)), (ty, (40, 512, 6))])
    {
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
                if ty.block_size() == 1 {
                    // f32 activations: only float rounding, ~cols·2⁻²⁴ relative to Σ|w·x|.
                    let mag: f64 = w
                        .iter()
                        .zip(xi)
                        .map(|(&a, &b)| (a as f64 * b as f64).abs())
                        .sum();
                    let got = out[i * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * mag + 1e-6,
                        "{ty:?} row {r} act {i}: {got} vs {exact}"
                    );
                    worst = worst.max((got - exact).abs() / (1e-5 * mag + 1e-6));
                    continue;
                }
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
        let (rows, cols, n) = (304, 256, 6);
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

/// The SIMD kernels compute each block's integer sum exactly as the portable code does
/// and differ only in the order of the float additions across blocks (eight lanes, FMA):
/// with at most 64 blocks per row here, the reassociation error is below
/// 64·2⁻²⁴·Σ|block terms| ≈ 4·10⁻⁶·Σ|w·x|; we allow 10⁻⁵·Σ|w·x| (from the dequantised
/// weights and the unquantised activations, which bound the block terms up to rounding).
#[test]
fn every_simd_kernel_matches_the_portable_one() {
    let kernels = Kernel::available();
    println!("kernels on this CPU: {kernels:?}");
    let mut rng = StdRng::seed_from_u64(11);
    for ty in QType::ALL {
        // Row counts that are multiples of 8 take the interleaved layout where it applies.
        for &(rows, cols) in &[
            (70usize, 512usize),
            (33, 1024),
            (9, 256 + 256),
            (64, 512),
            (24, 1024),
        ] {
            let m = random_matrix(ty, rows, cols, &mut rng);
            let packs = matches!(ty, QType::Q8_0 | QType::Q4_0 | QType::Q5_0) && rows % 8 == 0;
            assert_eq!(
                m.interleaved(),
                packs && Kernel::best() == Kernel::Avx512Vnni
            );
            for n in [1usize, 2, 3, 4, 5, 7, 9] {
                let x: Vec<f32> = (0..n * cols)
                    .map(|_| rng.random_range(-3.0f32..3.0))
                    .collect();
                let mut want = vec![0f32; n * rows];
                m.matmul_with(Kernel::Portable, &x, n, &mut want);
                let mut w = vec![0f32; cols];
                for &k in &kernels[1..] {
                    let mut got = vec![0f32; n * rows];
                    m.matmul_with(k, &x, n, &mut got);
                    for r in 0..rows {
                        m.dequantize_row(r, &mut w);
                        for i in 0..n {
                            let xi = &x[i * cols..(i + 1) * cols];
                            let mag: f32 = w.iter().zip(xi).map(|(a, b)| (a * b).abs()).sum();
                            let (g, e) = (got[i * rows + r], want[i * rows + r]);
                            assert!(
                                (g - e).abs() <= 1e-5 * mag + 1e-6,
                                "{k:?} {ty:?} [{rows}x{cols}] n={n} row {r} act {i}: {g} vs portable {e}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Matrices that share their input, quantised once: the same bits as one at a time.
#[test]
fn shared_activations_give_the_same_products() {
    let mut rng = StdRng::seed_from_u64(13);
    let (cols, n) = (512, 3);
    let ms: Vec<QMatrix> = [QType::Q5_0, QType::Q4K, QType::Q8_0, QType::F16, QType::Q6K]
        .iter()
        .enumerate()
        .map(|(i, &ty)| random_matrix(ty, 16 + 8 * i, cols, &mut rng))
        .collect();
    let x: Vec<f32> = (0..n * cols)
        .map(|_| rng.random_range(-1.0f32..1.0))
        .collect();
    let refs: Vec<&QMatrix> = ms.iter().collect();
    let mut outs: Vec<Vec<f32>> = ms.iter().map(|m| vec![0f32; n * m.rows()]).collect();
    let mut slices: Vec<&mut [f32]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
    QMatrix::matmul_many(&refs, &x, n, &mut slices);
    for (m, got) in ms.iter().zip(&outs) {
        let mut one = vec![0f32; n * m.rows()];
        m.matmul(&x, n, &mut one);
        assert_eq!(got, &one, "{:?}", m.qtype());
    }
}
