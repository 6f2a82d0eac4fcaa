use so8t_kernels::{Kernel, QMatrix, QType};
use std::time::Instant;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rows: usize = args.get(1).map_or(49152, |s| s.parse().unwrap());
    let cols: usize = args.get(2).map_or(576, |s| s.parse().unwrap());
    for ty in [
        QType::Q8_0,
        QType::Q4_0,
        QType::Q4K,
        QType::Q6K,
        QType::Q5_0,
    ] {
        if cols % ty.block_size() != 0 {
            continue;
        }
        let bytes = rows * cols / ty.block_size() * ty.type_size();
        let mut data = vec![0u8; bytes];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 7 % 13) as u8;
        }
        let m = QMatrix::new(ty, rows, cols, data).unwrap();
        let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
        let mut out = vec![0f32; rows];
        for k in Kernel::available() {
            m.matmul_with(k, &x, 1, &mut out);
            let t = Instant::now();
            let reps = 20;
            for _ in 0..reps {
                m.matmul_with(k, &x, 1, &mut out);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{ty:?} {k:?}: {:.2} ms, {:.1} GB/s",
                s * 1e3,
                bytes as f64 / s / 1e9
            );
        }
    }
}
