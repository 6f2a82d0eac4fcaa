//! Read bandwidth, for the roofline next to decoding speed: the pool's threads sum a
//! buffer much larger than the caches, as decoding streams weights, and we keep the best
//! of a few passes.

use std::time::Instant;

/// Bytes per second read by the pool's threads over a `bytes`-sized buffer (best of `passes`).
pub fn read_bandwidth(bytes: usize, passes: usize) -> f64 {
    let words = (bytes / 8).max(1 << 16);
    let buf: Vec<u64> = (0..words as u64).collect();
    let pool = crate::pool::global();
    let tasks = pool.threads() * 8;
    let per = words.div_ceil(tasks);
    let mut best = 0f64;
    let sink = std::sync::atomic::AtomicU64::new(0);
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        pool.run(tasks, &|i| {
            let part = &buf[(i * per).min(words)..((i + 1) * per).min(words)];
            sink.fetch_add(sum(part), std::sync::atomic::Ordering::Relaxed);
        });
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink.into_inner());
    best
}

multiversion! {
    fn sum(x: &[u64]) -> u64 = sum_body
}

#[inline(always)]
fn sum_body(x: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    for c in x.chunks_exact(8) {
        for j in 0..8 {
            acc[j] = acc[j].wrapping_add(c[j]);
        }
    }
    acc.iter().fold(0, |a, &b| a.wrapping_add(b))
}
