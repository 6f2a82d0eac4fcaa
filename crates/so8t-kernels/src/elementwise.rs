//! Elementwise maths that must vectorise: a softmax row's exponentials (attention) and
//! SwiGLU's. libm's `expf` is a call per value, which LLVM cannot vectorise: it had taken
//! 3% of a SmolLM2 prompt on its own, beside 3% for the SwiGLU loop around it.

/// `e^x` without a libm call, so that a loop over values is one vector loop: `x = n·ln2 + r`
/// with |r| ≤ ln2/2, `e^r` by its degree-6 Taylor polynomial (relative error below
/// 2·10⁻⁷ there, about one f32 step), `2^n` assembled in the exponent bits. `x` is clamped
/// to [−87, 88]: below, e^x is under 2·10⁻³⁸ and read as that; above, it saturates at
/// e^88 ≈ 1.7·10³⁸ instead of reaching f32's limit (or infinity past 88.7).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln2 split in two so that n·ln2 is subtracted without losing r's low bits.
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

multiversion! {
    /// SwiGLU in place: `g = silu(g) · u = g / (1 + e^−g) · u`, vectorised.
    pub fn swiglu(g: &mut [f32], u: &[f32]) -> () = swiglu_body
}

#[inline(always)]
fn swiglu_body(g: &mut [f32], u: &[f32]) {
    assert_eq!(g.len(), u.len(), "gate and up must have the same length");
    for (g, &u) in g.iter_mut().zip(u) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

#[cfg(test)]
mod tests {
    /// The polynomial exp against libm's over its whole range: within a few f32 steps
    /// relative, and exactly 1 at 0.
    #[test]
    fn exp_is_within_a_few_ulps_of_libm() {
        assert_eq!(super::exp(0.0), 1.0);
        let mut worst = 0f64;
        for i in 0..=400_000 {
            let x = -87.0 + 175.0 * i as f32 / 400_000.0;
            let (got, want) = (super::exp(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "relative error {worst}");
    }

    /// SwiGLU against libm's silu in f64, from deep negative (silu → −0) to large
    /// positive gates (silu → g), and every instruction set's build against the plain one.
    #[test]
    fn swiglu_matches_libm() {
        let g: Vec<f32> = (0..=4000).map(|i| -200.0 + 0.1 * i as f32).collect();
        let u: Vec<f32> = (0..g.len()).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut got = g.clone();
        super::swiglu(&mut got, &u);
        let mut plain = g.clone();
        super::swiglu_body(&mut plain, &u);
        assert_eq!(got, plain, "vectorised and plain builds differ");
        for ((&x, &u), &y) in g.iter().zip(&u).zip(&got) {
            let (x, u) = (x as f64, u as f64);
            let want = x / (1.0 + (-x).exp()) * u;
            assert!((y as f64 - want).abs() <= 1e-6 * want.abs() + 1e-30, "silu({x})·{u}: {y} vs {want}");
        }
    }
}
