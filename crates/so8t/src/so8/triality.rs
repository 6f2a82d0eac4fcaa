//! Octonions and local triality (spec §3). For every A ∈ so(8) there are unique
//! B, C ∈ so(8) with A(xy) = (Bx)y + x(Cy); σ₊: A ↦ B and σ₋: A ↦ C are found once, in
//! f64, by solving that identity over all basis pairs (512 equations, 56 unknowns).
//! Exponentiating the identity gives ρ_v(xy) = (ρ₊x)(ρ₋y) with ρ_v = exp(A),
//! ρ₊ = exp(σ₊A), ρ₋ = exp(σ₋A): the three representations of one Spin(8) element.

use super::algebra::{expm, matvec, skew, Mat8, N_GEN};
use std::sync::OnceLock;

/// The spec's Fano-plane triples: e_a·e_b = e_c, cyclically.
pub const TRIPLES: [[usize; 3]; 7] = [
    [1, 2, 3],
    [1, 4, 5],
    [1, 7, 6],
    [2, 4, 6],
    [2, 5, 7],
    [3, 4, 7],
    [3, 6, 5],
];

/// `table()[i][j] = (sign, k)` with e_i·e_j = sign·e_k.
pub fn table() -> &'static [[(f64, usize); 8]; 8] {
    static T: OnceLock<[[(f64, usize); 8]; 8]> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = [[(0.0, 0); 8]; 8];
        for i in 0..8 {
            t[0][i] = (1.0, i);
            t[i][0] = (1.0, i);
        }
        for i in 1..8 {
            t[i][i] = (-1.0, 0);
        }
        for [a, b, c] in TRIPLES {
            for (x, y, z) in [(a, b, c), (b, c, a), (c, a, b)] {
                t[x][y] = (1.0, z);
                t[y][x] = (-1.0, z);
            }
        }
        t
    })
}

pub fn mul(x: &[f64; 8], y: &[f64; 8]) -> [f64; 8] {
    let t = table();
    let mut z = [0.0; 8];
    for i in 0..8 {
        if x[i] == 0.0 {
            continue;
        }
        for j in 0..8 {
            let (s, k) = t[i][j];
            z[k] += s * x[i] * y[j];
        }
    }
    z
}

fn basis(i: usize) -> [f64; 8] {
    let mut e = [0.0; 8];
    e[i] = 1.0;
    e
}

fn basis_generator(n: usize) -> Mat8 {
    let mut g = [0.0; N_GEN];
    g[n] = 1.0;
    skew(&g)
}

/// σ₊ and σ₋ as 28×28 matrices acting on packed generators (`out = σ · g`), and the
/// largest residual of the identity over all basis pairs when they were solved.
pub struct TrialityMaps {
    pub plus: [[f64; N_GEN]; N_GEN],
    pub minus: [[f64; N_GEN]; N_GEN],
    pub residual: f64,
}

pub fn maps() -> &'static TrialityMaps {
    static M: OnceLock<TrialityMaps> = OnceLock::new();
    M.get_or_init(solve)
}

fn solve() -> TrialityMaps {
    // Rows: (i, j, component) over basis pairs; columns: 28 coefficients of B, then of C.
    let rows = 8 * 8 * 8;
    let mut m = vec![[0.0f64; 2 * N_GEN]; rows];
    let mut rhs = vec![[0.0f64; N_GEN]; rows];
    let gens: Vec<Mat8> = (0..N_GEN).map(basis_generator).collect();
    for i in 0..8 {
        for j in 0..8 {
            let (ei, ej) = (basis(i), basis(j));
            let eiej = mul(&ei, &ej);
            for n in 0..N_GEN {
                let b = mul(&matvec(&gens[n], &ei), &ej);
                let c = mul(&ei, &matvec(&gens[n], &ej));
                let a = matvec(&gens[n], &eiej);
                for k in 0..8 {
                    let r = (i * 8 + j) * 8 + k;
                    m[r][n] = b[k];
                    m[r][N_GEN + n] = c[k];
                    rhs[r][n] = a[k];
                }
            }
        }
    }
    // Normal equations (MᵀM) X = Mᵀ R, 56×56, solved by Gauss–Jordan with partial pivoting.
    let u = 2 * N_GEN;
    let mut a = vec![vec![0.0f64; u + N_GEN]; u];
    for r in 0..rows {
        for p in 0..u {
            if m[r][p] == 0.0 {
                continue;
            }
            for q in 0..u {
                a[p][q] += m[r][p] * m[r][q];
            }
            for q in 0..N_GEN {
                a[p][u + q] += m[r][p] * rhs[r][q];
            }
        }
    }
    for c in 0..u {
        let p = (c..u)
            .max_by(|&x, &y| a[x][c].abs().total_cmp(&a[y][c].abs()))
            .unwrap();
        assert!(
            a[p][c].abs() > 1e-9,
            "local triality system is singular (rank < 56)"
        );
        a.swap(p, c);
        let piv = a[c][c];
        for v in a[c].iter_mut() {
            *v /= piv;
        }
        for r in 0..u {
            if r != c && a[r][c] != 0.0 {
                let f = a[r][c];
                for k in 0..u + N_GEN {
                    a[r][k] -= f * a[c][k];
                }
            }
        }
    }
    let mut plus = [[0.0; N_GEN]; N_GEN];
    let mut minus = [[0.0; N_GEN]; N_GEN];
    for n in 0..N_GEN {
        for col in 0..N_GEN {
            // Coefficients are small integers or halves; clean round-off so that σ is exact.
            let clean = |v: f64| {
                if ((2.0 * v).round() - 2.0 * v).abs() < 1e-9 {
                    (2.0 * v).round() / 2.0
                } else {
                    v
                }
            };
            plus[n][col] = clean(a[n][u + col]);
            minus[n][col] = clean(a[N_GEN + n][u + col]);
        }
    }
    let mut residual: f64 = 0.0;
    for r in 0..rows {
        for col in 0..N_GEN {
            let fit: f64 = (0..N_GEN)
                .map(|n| m[r][n] * plus[n][col] + m[r][N_GEN + n] * minus[n][col])
                .sum();
            residual = residual.max((fit - rhs[r][col]).abs());
        }
    }
    TrialityMaps {
        plus,
        minus,
        residual,
    }
}

pub fn apply(sigma: &[[f64; N_GEN]; N_GEN], g: &[f64]) -> [f64; N_GEN] {
    std::array::from_fn(|n| (0..N_GEN).map(|k| sigma[n][k] * g[k]).sum())
}

/// The three families of spec §3/§4: head h uses family h mod 3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Vector,
    SpinorPlus,
    SpinorMinus,
}

impl Family {
    pub fn of(index: usize) -> Family {
        [Family::Vector, Family::SpinorPlus, Family::SpinorMinus][index % 3]
    }
}

/// The generator that family `f` exponentiates: A, σ₊A or σ₋A.
pub fn family_generator(f: Family, g: &[f64]) -> [f64; N_GEN] {
    match f {
        Family::Vector => std::array::from_fn(|i| g[i]),
        Family::SpinorPlus => apply(&maps().plus, g),
        Family::SpinorMinus => apply(&maps().minus, g),
    }
}

pub fn rho(f: Family, g: &[f64]) -> Mat8 {
    expm(&skew(&family_generator(f, g)))
}

#[cfg(test)]
mod tests {
    use super::super::algebra::*;
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand8(rng: &mut StdRng) -> [f64; 8] {
        std::array::from_fn(|_| rng.random_range(-1.0..1.0))
    }

    fn rand_gen(rng: &mut StdRng) -> [f64; N_GEN] {
        std::array::from_fn(|_| rng.random_range(-1.0..1.0))
    }

    #[test]
    fn multiplication_table_is_the_octonions() {
        let mut rng = StdRng::seed_from_u64(2);
        for _ in 0..50 {
            let (x, y) = (rand8(&mut rng), rand8(&mut rng));
            // normed: |xy| = |x||y|; alternative: x(xy) = (xx)y
            let n = |v: &[f64; 8]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
            assert!((n(&mul(&x, &y)) - n(&x) * n(&y)).abs() < 1e-12);
            let l = mul(&x, &mul(&x, &y));
            let r = mul(&mul(&x, &x), &y);
            assert!(l.iter().zip(&r).all(|(a, b)| (a - b).abs() < 1e-12));
        }
        // and not associative
        let (e1, e2, e4) = (basis(1), basis(2), basis(4));
        assert_ne!(mul(&mul(&e1, &e2), &e4), mul(&e1, &mul(&e2, &e4)));
    }

    #[test]
    fn local_triality_is_solved_exactly() {
        assert!(maps().residual < 1e-12, "residual {}", maps().residual);
    }

    #[test]
    fn group_identity_holds_on_random_generators() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..50 {
            let g = rand_gen(&mut rng);
            let (v, p, m) = (
                rho(Family::Vector, &g),
                rho(Family::SpinorPlus, &g),
                rho(Family::SpinorMinus, &g),
            );
            for _ in 0..10 {
                let (x, y) = (rand8(&mut rng), rand8(&mut rng));
                let lhs = matvec(&v, &mul(&x, &y));
                let rhs = mul(&matvec(&p, &x), &matvec(&m, &y));
                let err = lhs
                    .iter()
                    .zip(&rhs)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-10, "ρ_v(xy) − (ρ₊x)(ρ₋y) = {err}");
            }
            for r in [v, p, m] {
                assert!((det(&r) - 1.0).abs() < 1e-12);
                assert!(orthogonality_error(&r) < 1e-12);
            }
        }
    }

    #[test]
    fn sigma_preserves_commutators() {
        let mut rng = StdRng::seed_from_u64(4);
        for sigma in [&maps().plus, &maps().minus] {
            for _ in 0..20 {
                let (a, b) = (rand_gen(&mut rng), rand_gen(&mut rng));
                let lhs = apply(sigma, &unskew(&commutator(&skew(&a), &skew(&b))));
                let rhs = unskew(&commutator(
                    &skew(&apply(sigma, &a)),
                    &skew(&apply(sigma, &b)),
                ));
                let err = lhs
                    .iter()
                    .zip(&rhs)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-12, "σ[A,B] − [σA,σB] = {err}");
            }
        }
    }

    #[test]
    fn sigma_squares_to_identity() {
        let mut rng = StdRng::seed_from_u64(5);
        for sigma in [&maps().plus, &maps().minus] {
            for _ in 0..20 {
                let a = rand_gen(&mut rng);
                let twice = apply(sigma, &apply(sigma, &a));
                let err = twice
                    .iter()
                    .zip(&a)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max);
                assert!(err < 1e-12, "σ²A − A = {err}");
            }
        }
    }

    #[test]
    fn families_cycle_by_head_index() {
        assert_eq!(Family::of(0), Family::Vector);
        assert_eq!(Family::of(4), Family::SpinorPlus);
        assert_eq!(Family::of(5), Family::SpinorMinus);
    }
}
