//! so(8) and SO(8) in f64 (spec §2): generators as 28 packed values, `exp` by scaling and
//! squaring of a Taylor polynomial, and the checks a rotation must pass.

pub type Mat8 = [[f64; 8]; 8];
pub const N_GEN: usize = 28;

/// Packed index of the strictly-upper entry (i, j), i < j, in row-major order.
pub fn pack_index(i: usize, j: usize) -> usize {
    debug_assert!(i < j && j < 8);
    i * 8 - i * (i + 1) / 2 + (j - i - 1)
}

pub fn skew(g: &[f64]) -> Mat8 {
    let mut a = [[0.0; 8]; 8];
    for i in 0..8 {
        for j in i + 1..8 {
            let v = g[pack_index(i, j)];
            a[i][j] = v;
            a[j][i] = -v;
        }
    }
    a
}

pub fn unskew(a: &Mat8) -> [f64; N_GEN] {
    let mut g = [0.0; N_GEN];
    for i in 0..8 {
        for j in i + 1..8 {
            g[pack_index(i, j)] = a[i][j];
        }
    }
    g
}

pub fn identity() -> Mat8 {
    let mut m = [[0.0; 8]; 8];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

pub fn matmul(a: &Mat8, b: &Mat8) -> Mat8 {
    let mut c = [[0.0; 8]; 8];
    for i in 0..8 {
        for k in 0..8 {
            let aik = a[i][k];
            for j in 0..8 {
                c[i][j] += aik * b[k][j];
            }
        }
    }
    c
}

pub fn transpose(a: &Mat8) -> Mat8 {
    let mut t = [[0.0; 8]; 8];
    for i in 0..8 {
        for j in 0..8 {
            t[j][i] = a[i][j];
        }
    }
    t
}

pub fn matvec(a: &Mat8, x: &[f64; 8]) -> [f64; 8] {
    let mut y = [0.0; 8];
    for i in 0..8 {
        y[i] = (0..8).map(|j| a[i][j] * x[j]).sum();
    }
    y
}

pub fn commutator(a: &Mat8, b: &Mat8) -> Mat8 {
    let (ab, ba) = (matmul(a, b), matmul(b, a));
    let mut c = [[0.0; 8]; 8];
    for i in 0..8 {
        for j in 0..8 {
            c[i][j] = ab[i][j] - ba[i][j];
        }
    }
    c
}

/// Taylor degree of the exponential; with ‖A/2ˢ‖ ≤ 1/2 its truncation error is below
/// 0.5¹⁷/17! ≈ 6e-21, far under f64 rounding.
pub const TAYLOR_DEGREE: usize = 16;

/// Squarings needed so that the scaled matrix has ∞-norm ≤ 1/2.
pub fn squarings(norm_inf: f64) -> u32 {
    if norm_inf <= 0.5 {
        0
    } else {
        (norm_inf / 0.5).log2().ceil() as u32
    }
}

pub fn norm_inf(a: &Mat8) -> f64 {
    a.iter()
        .map(|r| r.iter().map(|v| v.abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

/// `exp(A)`: matrix products only (Horner form of the Taylor polynomial, then squaring),
/// the same recipe the differentiable tensor version uses. A zero generator gives I exactly.
pub fn expm(a: &Mat8) -> Mat8 {
    let s = squarings(norm_inf(a));
    let scale = 0.5f64.powi(s as i32);
    let mut x = *a;
    for row in x.iter_mut() {
        for v in row.iter_mut() {
            *v *= scale;
        }
    }
    // I + X(I + X/2(I + X/3(… (I + X/n))))
    let mut r = identity();
    for k in (1..=TAYLOR_DEGREE).rev() {
        let mut t = matmul(&x, &r);
        for (i, row) in t.iter_mut().enumerate() {
            for v in row.iter_mut() {
                *v /= k as f64;
            }
            row[i] += 1.0;
        }
        r = t;
    }
    for _ in 0..s {
        r = matmul(&r, &r);
    }
    r
}

/// `m⁻¹` by Gauss–Jordan elimination with partial pivoting; `None` when `m` is singular
/// (a pivot below 1e-12).
pub fn inverse(m: &Mat8) -> Option<Mat8> {
    let (mut a, mut inv) = (*m, identity());
    for c in 0..8 {
        let p = (c..8).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() < 1e-12 {
            return None;
        }
        a.swap(c, p);
        inv.swap(c, p);
        let d = a[c][c];
        for j in 0..8 {
            a[c][j] /= d;
            inv[c][j] /= d;
        }
        for i in 0..8 {
            if i != c {
                let f = a[i][c];
                for j in 0..8 {
                    a[i][j] -= f * a[c][j];
                    inv[i][j] -= f * inv[c][j];
                }
            }
        }
    }
    Some(inv)
}

fn add_scaled(a: &Mat8, b: &Mat8, s: f64) -> Mat8 {
    std::array::from_fn(|i| std::array::from_fn(|j| a[i][j] + s * b[i][j]))
}

/// The Cayley transform `(I − M)(I + M)⁻¹`, its own inverse: a skew-symmetric `M` gives a
/// rotation and a rotation its skew-symmetric parameter (PEFT's OFT stores rotations so).
/// `None` when `I + M` is singular (a rotation by π has no parameter).
pub fn cayley(m: &Mat8) -> Option<Mat8> {
    let eye = identity();
    Some(matmul(&add_scaled(&eye, m, -1.0), &inverse(&add_scaled(&eye, m, 1.0))?))
}

/// The principal logarithm of a rotation, the generator `A` with `exp(A) = R`, skew-
/// symmetric: inverse scaling and squaring (square roots by the Denman–Beavers iteration
/// until `R` is near I, then the Mercator series). `None` where it does not exist or is
/// not unique (a rotation by π) or `r` is not a rotation.
pub fn logm(r: &Mat8) -> Option<Mat8> {
    if orthogonality_error(r) > 1e-4 || det(r) <= 0.0 {
        return None;
    }
    let eye = identity();
    let (mut y, mut roots) = (*r, 0);
    while norm_inf(&add_scaled(&y, &eye, -1.0)) > 0.2 {
        if roots == 40 {
            return None;
        }
        let mut z = eye;
        for _ in 0..60 {
            let (yi, zi) = (inverse(&y)?, inverse(&z)?);
            let next = add_scaled(&y, &zi, 1.0).map(|row| row.map(|v| v / 2.0));
            z = add_scaled(&z, &yi, 1.0).map(|row| row.map(|v| v / 2.0));
            let step = norm_inf(&add_scaled(&next, &y, -1.0));
            y = next;
            if step < 1e-15 {
                break;
            }
        }
        roots += 1;
    }
    // log(I + X) = X − X²/2 + X³/3 − …, ‖X‖ ≤ 0.2: 40 terms are below 1e-28.
    let x = add_scaled(&y, &eye, -1.0);
    let (mut term, mut log) = (x, [[0.0; 8]; 8]);
    for n in 1..=40 {
        let sign = if n % 2 == 1 { 1.0 } else { -1.0 };
        log = add_scaled(&log, &term, sign / n as f64);
        term = matmul(&term, &x);
    }
    let scale = 2f64.powi(roots);
    // Exactly skew-symmetric: rounding leaves a symmetric part of ~1e-16.
    let a: Mat8 = std::array::from_fn(|i| std::array::from_fn(|j| (log[i][j] - log[j][i]) / 2.0 * scale));
    (!a.iter().flatten().any(|v| !v.is_finite())).then_some(a)
}

/// ‖RᵀR − I‖∞ (largest absolute entry).
pub fn orthogonality_error(r: &Mat8) -> f64 {
    let p = matmul(&transpose(r), r);
    let mut e: f64 = 0.0;
    for i in 0..8 {
        for j in 0..8 {
            e = e.max((p[i][j] - if i == j { 1.0 } else { 0.0 }).abs());
        }
    }
    e
}

/// Determinant by Gaussian elimination with partial pivoting.
pub fn det(m: &Mat8) -> f64 {
    let mut a = *m;
    let mut d = 1.0;
    for c in 0..8 {
        let p = (c..8)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        if a[p][c] == 0.0 {
            return 0.0;
        }
        if p != c {
            a.swap(p, c);
            d = -d;
        }
        d *= a[c][c];
        for r in c + 1..8 {
            let f = a[r][c] / a[c][c];
            for k in c..8 {
                a[r][k] -= f * a[c][k];
            }
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn random_generator(rng: &mut StdRng, scale: f64) -> [f64; N_GEN] {
        std::array::from_fn(|_| rng.random_range(-scale..scale))
    }

    #[test]
    fn packing_is_row_major_strict_upper() {
        assert_eq!(pack_index(0, 1), 0);
        assert_eq!(pack_index(0, 7), 6);
        assert_eq!(pack_index(1, 2), 7);
        assert_eq!(pack_index(6, 7), 27);
        let g: [f64; N_GEN] = std::array::from_fn(|i| i as f64);
        assert_eq!(unskew(&skew(&g)), g);
    }

    #[test]
    fn zero_generator_is_exactly_identity() {
        assert_eq!(expm(&skew(&[0.0; N_GEN])), identity());
    }

    #[test]
    fn exp_is_a_rotation() {
        let mut rng = StdRng::seed_from_u64(1);
        for scale in [0.01, 0.5, 2.0, 10.0] {
            for _ in 0..20 {
                let r = expm(&skew(&random_generator(&mut rng, scale)));
                assert!(orthogonality_error(&r) < 1e-12, "scale {scale}");
                assert!((det(&r) - 1.0).abs() < 1e-12, "scale {scale}");
            }
        }
    }

    #[test]
    fn exp_of_a_plane_rotation_is_cos_sin() {
        let mut g = [0.0; N_GEN];
        g[pack_index(2, 5)] = 1.3;
        let r = expm(&skew(&g));
        assert!((r[2][2] - 1.3f64.cos()).abs() < 1e-14);
        assert!((r[2][5] - 1.3f64.sin()).abs() < 1e-14);
        assert!((r[5][2] + 1.3f64.sin()).abs() < 1e-14);
        assert_eq!(r[0][0], 1.0);
    }

    /// log inverts exp on rotations whose angles stay below π (random generators of
    /// entries up to 0.5: angles up to ~2.5): the generator comes back to 1e-10; Cayley is
    /// its own inverse and maps skew matrices to rotations.
    #[test]
    fn log_inverts_exp_and_cayley_inverts_itself() {
        let mut rng = StdRng::seed_from_u64(3);
        for scale in [1e-4, 0.05, 0.3, 0.5] {
            for _ in 0..20 {
                let a = skew(&random_generator(&mut rng, scale));
                let back = logm(&expm(&a)).expect("a log");
                let err = (0..8).flat_map(|i| (0..8).map(move |j| (i, j))).map(|(i, j)| (back[i][j] - a[i][j]).abs()).fold(0.0, f64::max);
                assert!(err < 1e-10, "scale {scale}: {err}");
                let r = cayley(&a).unwrap();
                assert!(orthogonality_error(&r) < 1e-12 && (det(&r) - 1.0).abs() < 1e-12);
                let q = cayley(&r).unwrap();
                let err = (0..8).flat_map(|i| (0..8).map(move |j| (i, j))).map(|(i, j)| (q[i][j] - a[i][j]).abs()).fold(0.0, f64::max);
                assert!(err < 1e-12, "scale {scale}: cayley twice {err}");
            }
        }
        assert_eq!(logm(&identity()), Some([[0.0; 8]; 8]));
        // A rotation by π in a plane: no principal log, no Cayley parameter.
        let mut g = [0.0; N_GEN];
        g[pack_index(0, 1)] = std::f64::consts::PI;
        let flip = expm(&skew(&g));
        assert!(cayley(&flip).is_none());
        let mut not_rotation = identity();
        not_rotation[0][0] = -1.0;
        assert!(logm(&not_rotation).is_none());
    }
}
