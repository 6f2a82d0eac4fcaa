//! Causal attention against the textbook computation in f64: scores q·k/√d over the
//! visible keys, softmax, weighted sum of values. Inputs are O(1), so f32 rounding over
//! at most a few hundred terms stays below 1e-4 absolute; a masking or head-mapping
//! mistake changes outputs by O(1).

use rand::{rngs::StdRng, Rng, SeedableRng};
use so8t_kernels::attention::{causal, Shape};

fn reference(q: &[f32], k: &[f32], v: &[f32], sh: Shape) -> Vec<f64> {
    let Shape {
        s,
        pos,
        heads,
        kv_heads,
        head_dim: hd,
    } = sh;
    let rep = heads / kv_heads;
    let mut out = vec![0f64; s * heads * hd];
    for i in 0..s {
        for h in 0..heads {
            let kvh = h / rep;
            let qv = &q[(i * heads + h) * hd..][..hd];
            let scores: Vec<f64> = (0..=pos + i)
                .map(|j| {
                    let kr = &k[(j * kv_heads + kvh) * hd..][..hd];
                    qv.iter()
                        .zip(kr)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|x| (x - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for (j, w) in e.iter().enumerate() {
                let vr = &v[(j * kv_heads + kvh) * hd..][..hd];
                for d in 0..hd {
                    out[(i * heads + h) * hd + d] += w / sum * vr[d] as f64;
                }
            }
        }
    }
    out
}

#[test]
fn causal_attention_matches_the_textbook_computation() {
    let mut rng = StdRng::seed_from_u64(9);
    // (s, pos, heads, kv_heads, head_dim): decoding and prompts, plain and grouped-query
    // heads (rep 1, 3, 7, and 20 > the 16 query vectors one task takes), head sizes with
    // and without a tail past 16, and sizes that take the worker pool.
    let shapes = [
        (1, 0, 4, 4, 16),
        (1, 37, 9, 3, 64),
        (5, 11, 14, 2, 64),
        (64, 0, 9, 3, 64),
        (17, 90, 20, 1, 24),
        (3, 200, 6, 6, 40),
        // The head sizes with register-resident kernels under AVX-512 (16 lanes × 2..8),
        // key counts that end in a partial block of sixteen.
        (9, 20, 8, 2, 128),
        (6, 31, 4, 4, 96),
        (4, 10, 4, 2, 80),
        (33, 0, 2, 1, 32),
    ];
    for (s, pos, heads, kv_heads, head_dim) in shapes {
        let sh = Shape {
            s,
            pos,
            heads,
            kv_heads,
            head_dim,
        };
        let mut r =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let q = r(s * heads * head_dim);
        let k = r((pos + s) * kv_heads * head_dim);
        let v = r((pos + s) * kv_heads * head_dim);
        let mut out = vec![f32::NAN; q.len()];
        causal(&q, &k, &v, sh, &mut out);
        let want = reference(&q, &k, &v, sh);
        let worst = out
            .iter()
            .zip(&want)
            .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
        assert!(worst < 1e-4, "{sh:?}: differs by {worst}");
    }
}

/// A position attended as part of a prompt and the same position decoded alone (the cache
/// already holding what came before) give the same bits: each score depends on its query
/// and key only, not on where the key falls among the ones a call reads.
#[test]
fn a_prompt_and_one_step_at_a_time_give_the_same_bits() {
    let mut rng = StdRng::seed_from_u64(21);
    // The last shape's later steps attend over enough keys to go to the worker pool, with
    // each KV head's query heads split among tasks.
    for (s, heads, kv_heads, head_dim) in [(37, 9, 3, 64), (21, 4, 2, 128), (19, 6, 6, 40), (160, 14, 2, 64)] {
        let mut r =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
        let q = r(s * heads * head_dim);
        let k = r(s * kv_heads * head_dim);
        let v = r(s * kv_heads * head_dim);
        let sh = |s, pos| Shape {
            s,
            pos,
            heads,
            kv_heads,
            head_dim,
        };
        let mut all = vec![0f32; q.len()];
        causal(&q, &k, &v, sh(s, 0), &mut all);
        let row = heads * head_dim;
        for i in 0..s {
            let mut one = vec![0f32; row];
            let kv = (i + 1) * kv_heads * head_dim;
            causal(&q[i * row..(i + 1) * row], &k[..kv], &v[..kv], sh(1, i), &mut one);
            assert_eq!(&all[i * row..(i + 1) * row], &one[..], "head_dim {head_dim}, position {i}");
        }
    }
}
