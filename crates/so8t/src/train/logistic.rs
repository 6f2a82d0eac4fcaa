//! The heads-only fit: one L2-regularised, class-weighted logistic regression per head on
//! cached hidden states (each sample with its own weight, the classes balanced over the
//! weighted totals), solved by Newton's method (IRLS) to the optimum, so the result
//! does not depend on a learning rate or an epoch count.
//!
//! Features are standardised for the solve (hidden states have a few huge outlier
//! dimensions) and the scaling is folded back, so the head reads raw hidden states.
//! A `Linear(hidden, 2)` head with softmax gives p(class 1) = σ(z₁ − z₀); the fit sets
//! row 0 to zero and row 1 to the regression.

use crate::error::{Error, Result};
use candle_core::{Device, Tensor};

pub struct Fit {
    /// Weight per raw feature and bias: p = σ(w·x + b).
    pub w: Vec<f32>,
    pub b: f32,
    pub weight_decay: f64,
    pub iterations: usize,
    /// Class-weighted mean cross-entropy on the fitting data.
    pub loss: f64,
}

impl Fit {
    pub fn logits(&self, x: &[f32], d: usize) -> Vec<f64> {
        x.chunks(d)
            .map(|row| {
                row.iter()
                    .zip(&self.w)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum::<f64>()
                    + self.b as f64
            })
            .collect()
    }

    /// The `[2, hidden]` weight and `[2]` bias of a softmax head with the same p.
    pub fn head(&self) -> Result<(Tensor, Tensor)> {
        let d = self.w.len();
        let mut w = vec![0f32; 2 * d];
        w[d..].copy_from_slice(&self.w);
        Ok((
            Tensor::from_vec(w, (2, d), &Device::Cpu)?,
            Tensor::new(&[0f32, self.b], &Device::Cpu)?,
        ))
    }
}

/// Balanced class weights: each class carries half the total weight.
pub fn balanced_weights(y: &[bool]) -> (f64, f64) {
    let pos = y.iter().filter(|&&v| v).count() as f64;
    let neg = y.len() as f64 - pos;
    let n = y.len() as f64;
    (
        if neg > 0.0 { n / (2.0 * neg) } else { 1.0 },
        if pos > 0.0 { n / (2.0 * pos) } else { 1.0 },
    )
}

/// Per-sample weights scaled so that each class carries half the total weight and the
/// mean weight is 1 (`sample` `None`: every sample alike, as [`balanced_weights`]).
pub fn balanced_sample_weights(y: &[bool], sample: Option<&[f64]>) -> Vec<f64> {
    let w = |i: usize| sample.map_or(1.0, |s| s[i]);
    let (mut pos, mut neg) = (0f64, 0f64);
    for (i, &v) in y.iter().enumerate() {
        if v {
            pos += w(i);
        } else {
            neg += w(i);
        }
    }
    let n = y.len() as f64;
    let scale = |class_total: f64| if class_total > 0.0 { n / (2.0 * class_total) } else { 1.0 };
    let (sn, sp) = (scale(neg), scale(pos));
    y.iter()
        .enumerate()
        .map(|(i, &v)| w(i) * if v { sp } else { sn })
        .collect()
}

pub(crate) fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// −[y log p + (1−y) log(1−p)] from the logit, without overflow.
fn nll(z: f64, y: bool) -> f64 {
    let s = if y { -z } else { z };
    // log(1 + e^s)
    if s > 0.0 {
        s + (-s).exp().ln_1p()
    } else {
        s.exp().ln_1p()
    }
}

/// The cross-entropy of each logit against its label.
pub fn sample_losses(z: &[f64], y: &[bool]) -> Vec<f64> {
    z.iter().zip(y).map(|(&z, &v)| nll(z, v)).collect()
}

/// Weighted mean cross-entropy of logits against labels, one weight per sample.
pub fn weighted_loss(z: &[f64], y: &[bool], weights: &[f64]) -> f64 {
    let total: f64 = weights.iter().sum();
    z.iter()
        .zip(y)
        .zip(weights)
        .map(|((&z, &v), &w)| w * nll(z, v))
        .sum::<f64>()
        / total.max(1e-300)
}

/// Cholesky solve of the symmetric positive definite `a` (`n×n`, row-major) against `b`.
fn cholesky_solve(mut a: Vec<f64>, b: &[f64]) -> Option<Vec<f64>> {
    let n = b.len();
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        let (upper, lower) = a.split_at_mut((j + 1) * n);
        let row_j = &upper[j * n..j * n + j];
        for i in j + 1..n {
            let row_i = &mut lower[(i - j - 1) * n..(i - j) * n];
            let s: f64 = row_i[..j].iter().zip(row_j).map(|(x, y)| x * y).sum();
            row_i[j] = (row_i[j] - s) / d;
        }
    }
    let mut y = b.to_vec();
    for i in 0..n {
        let s: f64 = (0..i).map(|k| a[i * n + k] * y[k]).sum();
        y[i] = (y[i] - s) / a[i * n + i];
    }
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| a[k * n + i] * y[k]).sum();
        y[i] = (y[i] - s) / a[i * n + i];
    }
    Some(y)
}

/// Fits p(y=1|x) = σ(w·x + b) on `x` (`n×d`, row-major) minimising the weighted mean
/// cross-entropy + (λ/2)‖w‖² (bias not penalised), the samples weighted by `sample`
/// (all alike if `None`) and the classes balanced ([`balanced_sample_weights`]).
pub fn fit(
    x: &[f32],
    d: usize,
    y: &[bool],
    sample: Option<&[f64]>,
    weight_decay: f64,
) -> Result<Fit> {
    let n = y.len();
    if n == 0 || x.len() != n * d {
        return Err(Error::Invalid(format!(
            "logistic fit: {} values for {n} rows of {d}",
            x.len()
        )));
    }
    if y.iter().all(|&v| v) || y.iter().all(|&v| !v) {
        return Err(Error::Invalid(
            "logistic fit needs examples of both classes".into(),
        ));
    }
    if let Some(s) = sample {
        if s.len() != n || s.iter().any(|w| !(w.is_finite() && *w >= 0.0)) {
            return Err(Error::Invalid(format!(
                "logistic fit: expected {n} finite, non-negative sample weights"
            )));
        }
        let class_total = |c: bool| y.iter().zip(s).filter(|(&v, _)| v == c).map(|(_, w)| w).sum::<f64>();
        if class_total(true) <= 0.0 || class_total(false) <= 0.0 {
            return Err(Error::Invalid(
                "logistic fit: one class has no weight (every sample of it weighs 0)".into(),
            ));
        }
    }
    // Standardise, with the samples' weights (so a weight of 2 is exactly a duplicate).
    let sw = |i: usize| sample.map_or(1.0, |s| s[i]);
    let sum_w: f64 = (0..n).map(sw).sum::<f64>().max(1e-300);
    let mut mean = vec![0f64; d];
    let mut var = vec![0f64; d];
    for (i, row) in x.chunks(d).enumerate() {
        for (m, &v) in mean.iter_mut().zip(row) {
            *m += sw(i) * v as f64;
        }
    }
    mean.iter_mut().for_each(|m| *m /= sum_w);
    for (i, row) in x.chunks(d).enumerate() {
        for ((s, &v), m) in var.iter_mut().zip(row).zip(&mean) {
            *s += sw(i) * (v as f64 - m).powi(2);
        }
    }
    let scale: Vec<f64> = var
        .iter()
        .map(|s| (s / sum_w).sqrt())
        .map(|s| if s > 1e-12 { s } else { 1.0 })
        .collect();
    // Design matrix with a trailing 1 for the bias, f64.
    let p = d + 1;
    let mut z = vec![0f64; n * p];
    for (i, row) in x.chunks(d).enumerate() {
        for j in 0..d {
            z[i * p + j] = (row[j] as f64 - mean[j]) / scale[j];
        }
        z[i * p + d] = 1.0;
    }
    let zt = Tensor::from_vec(z.clone(), (n, p), &Device::Cpu)?;
    let cw = balanced_sample_weights(y, sample);
    let total: f64 = cw.iter().sum();
    let objective = |beta: &[f64]| -> (Vec<f64>, f64) {
        let logits: Vec<f64> = z
            .chunks(p)
            .map(|r| r.iter().zip(beta).map(|(a, b)| a * b).sum())
            .collect();
        let reg: f64 = beta[..d].iter().map(|b| b * b).sum::<f64>() * weight_decay / 2.0;
        let loss = weighted_loss(&logits, y, &cw) + reg;
        (logits, loss)
    };
    let mut beta = vec![0f64; p];
    let (mut logits, mut loss) = objective(&beta);
    let mut iterations = 0;
    for _ in 0..100 {
        iterations += 1;
        // Gradient and Hessian of the objective.
        let probs: Vec<f64> = logits.iter().map(|&l| sigmoid(l)).collect();
        let mut grad = vec![0f64; p];
        for i in 0..n {
            let r = cw[i] * (probs[i] - if y[i] { 1.0 } else { 0.0 }) / total;
            for (g, v) in grad.iter_mut().zip(&z[i * p..(i + 1) * p]) {
                *g += r * v;
            }
        }
        for j in 0..d {
            grad[j] += weight_decay * beta[j];
        }
        let s: Vec<f64> = (0..n)
            .map(|i| (cw[i] * probs[i] * (1.0 - probs[i]) / total).sqrt())
            .collect();
        let zs = zt.broadcast_mul(&Tensor::from_vec(s, (n, 1), &Device::Cpu)?)?;
        let mut hess = zs.t()?.matmul(&zs)?.flatten_all()?.to_vec1::<f64>()?;
        for j in 0..p {
            hess[j * p + j] += if j < d { weight_decay } else { 1e-12 };
        }
        let step = cholesky_solve(hess, &grad).ok_or_else(|| {
            Error::Invalid(
                "logistic fit: Hessian is not positive definite (raise the weight decay)".into(),
            )
        })?;
        // Damped Newton: halve the step until the objective does not rise.
        let mut t = 1.0;
        let mut accepted = false;
        for _ in 0..30 {
            let cand: Vec<f64> = beta.iter().zip(&step).map(|(b, s)| b - t * s).collect();
            let (l, c) = objective(&cand);
            if c <= loss {
                let improvement = loss - c;
                beta = cand;
                logits = l;
                loss = c;
                accepted = true;
                if improvement < 1e-12 * loss.max(1.0) {
                    t = 0.0;
                }
                break;
            }
            t /= 2.0;
        }
        let max_step = step.iter().fold(0f64, |m, s| m.max(s.abs()));
        if !accepted || t == 0.0 || max_step < 1e-9 {
            break;
        }
    }
    let w: Vec<f32> = (0..d).map(|j| (beta[j] / scale[j]) as f32).collect();
    let b = beta[d] - (0..d).map(|j| beta[j] * mean[j] / scale[j]).sum::<f64>();
    Ok(Fit {
        w,
        b: b as f32,
        weight_decay,
        iterations,
        loss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Synthetic "hidden states" with hidden-state-like scales (one huge dimension) and
    /// labels from a known linear rule with logistic noise: the fit must recover the rule's
    /// direction and classify held-out points as well as the rule itself.
    #[test]
    fn recovers_a_known_linear_rule() {
        let (n, d) = (4000, 24);
        let mut rng = StdRng::seed_from_u64(5);
        let true_w: Vec<f64> = (0..d)
            .map(|j| {
                if j < 6 {
                    rng.random_range(-2.0..2.0)
                } else {
                    0.0
                }
            })
            .collect();
        let true_b = 0.7;
        let mut x = Vec::with_capacity(n * d);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let row: Vec<f64> = (0..d)
                .map(|j| rng.random_range(-1.0..1.0) * if j == 10 { 300.0 } else { 1.0 })
                .collect();
            let z: f64 = row.iter().zip(&true_w).map(|(a, b)| a * b).sum::<f64>() + true_b;
            let u: f64 = rng.random_range(1e-12..1.0);
            // y = 1 with probability σ(4z): a sharp but noisy rule.
            y.push(u < sigmoid(4.0 * z));
            x.extend(row.iter().map(|&v| v as f32));
        }
        let f = fit(&x, d, &y, None, 1e-4).unwrap();
        let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
        let got: Vec<f64> = f.w.iter().map(|&v| v as f64).collect();
        let cos =
            got.iter().zip(&true_w).map(|(a, b)| a * b).sum::<f64>() / (norm(&got) * norm(&true_w));
        assert!(cos > 0.99, "direction cosine {cos}");
        // The scale is 4× the rule (the noise model): within 15% with 4000 samples.
        let ratio = norm(&got) / (4.0 * norm(&true_w));
        assert!((ratio - 1.0).abs() < 0.15, "scale ratio {ratio}");
        assert!(
            (f.b as f64 / (4.0 * true_b) - 1.0).abs() < 0.25,
            "bias {} vs {}",
            f.b,
            4.0 * true_b
        );
        // The ignored huge dimension gets (almost) no weight in raw units.
        assert!(
            (f.w[10] as f64 * 300.0).abs() < 0.2,
            "weight on the outlier dimension {}",
            f.w[10]
        );
        // The head form gives the same probabilities.
        let (w, b) = f.head().unwrap();
        let h = crate::so8::verdict::Heads {
            safety_w: w.clone(),
            safety_b: b.clone(),
            authority_w: w,
            authority_b: b,
        };
        let xt = Tensor::from_vec(x[..5 * d].to_vec(), (5, d), &Device::Cpu).unwrap();
        let v = h.verdicts(&xt).unwrap();
        for (i, z) in f.logits(&x[..5 * d], d).iter().enumerate() {
            assert!((v[i].p_unsafe as f64 - sigmoid(*z)).abs() < 1e-5);
        }
    }

    #[test]
    fn refuses_one_class_data() {
        assert!(fit(&[1.0, 2.0], 1, &[true, true], None, 1e-3).is_err());
        assert!(fit(&[1.0, 2.0], 1, &[true, false], Some(&[1.0]), 1e-3).is_err());
        assert!(fit(&[1.0, 2.0], 1, &[true, false], Some(&[1.0, f64::NAN]), 1e-3).is_err());
        assert!(fit(&[1.0, 2.0], 1, &[true, false], Some(&[1.0, 0.0]), 1e-3).is_err());
    }

    /// Weights are what they say: a sample of weight 2 fits like the same sample twice.
    #[test]
    fn a_weight_of_two_is_a_duplicate() {
        let mut rng = StdRng::seed_from_u64(9);
        let (n, d) = (300, 3);
        let x: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let y: Vec<bool> = (0..n).map(|i| x[i * d] + 0.5 * rng.random_range(-1.0..1.0f32) > 0.2).collect();
        let w: Vec<f64> = (0..n).map(|i| if i % 3 == 0 { 2.0 } else { 1.0 }).collect();
        let weighted = fit(&x, d, &y, Some(&w), 1e-3).unwrap();
        let (mut xd, mut yd) = (x.clone(), y.clone());
        for i in (0..n).filter(|i| i % 3 == 0) {
            xd.extend_from_slice(&x[i * d..(i + 1) * d]);
            yd.push(y[i]);
        }
        let duplicated = fit(&xd, d, &yd, None, 1e-3).unwrap();
        // One problem solved twice: equal up to the Newton tolerance and f64 sums in
        // another order.
        for (a, b) in weighted.w.iter().zip(&duplicated.w) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        assert!((weighted.b - duplicated.b).abs() < 1e-4, "{} vs {}", weighted.b, duplicated.b);
    }
}
