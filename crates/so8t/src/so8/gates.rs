//! Rotation gates (spec §4): generators per site and factor → one block rotation per
//! site, as candle ops made of matrix products only, so that training can differentiate
//! through them.

use super::algebra::{pack_index, squarings, N_GEN, TAYLOR_DEGREE};
use super::triality::{maps, Family};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{BlockRotation, Site};
use candle_core::{DType, Device, Tensor, D};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// One generator per block position, shared by all heads of the site.
    Shared,
    /// One generator per (head, block position).
    PerHead,
}

/// How a site's feature vector is cut: `heads` heads of `blocks_per_head` 8-blocks. The
/// `mlp` site is `hidden/8` one-block "heads", so its families follow the block index.
#[derive(Clone, Copy, Debug)]
pub struct SiteShape {
    pub heads: usize,
    pub blocks_per_head: usize,
}

impl SiteShape {
    pub fn of(cfg: &ModelConfig, site: Site) -> Result<SiteShape> {
        if cfg.head_dim % 8 != 0 || cfg.hidden_size % 8 != 0 {
            return Err(Error::Invalid(format!(
                "SO(8) gates need head_dim and hidden_size divisible by 8 (got {} and {})",
                cfg.head_dim, cfg.hidden_size
            )));
        }
        let bph = cfg.head_dim / 8;
        Ok(match site {
            Site::Q | Site::O => SiteShape {
                heads: cfg.num_heads,
                blocks_per_head: bph,
            },
            Site::K | Site::V => SiteShape {
                heads: cfg.num_kv_heads,
                blocks_per_head: bph,
            },
            Site::Mlp => SiteShape {
                heads: cfg.hidden_size / 8,
                blocks_per_head: 1,
            },
        })
    }

    pub fn units(&self) -> usize {
        self.heads * self.blocks_per_head
    }

    pub fn generators(&self, site: Site, g: Granularity) -> usize {
        match (site, g) {
            (Site::Mlp, _) | (_, Granularity::PerHead) => self.units(),
            (_, Granularity::Shared) => self.blocks_per_head,
        }
    }

    /// (generator index, family) for unit `u`.
    pub fn unit(&self, site: Site, g: Granularity, u: usize) -> (usize, Family) {
        let head = u / self.blocks_per_head;
        let gen = match (site, g) {
            (Site::Mlp, _) | (_, Granularity::PerHead) => u,
            (_, Granularity::Shared) => u % self.blocks_per_head,
        };
        (gen, Family::of(head))
    }
}

/// `[28, 64]`: packed generator → flattened skew-symmetric 8×8.
fn skew_basis(dev: &Device) -> candle_core::Result<Tensor> {
    let mut m = vec![0f32; N_GEN * 64];
    for i in 0..8 {
        for j in i + 1..8 {
            let k = pack_index(i, j);
            m[k * 64 + i * 8 + j] = 1.0;
            m[k * 64 + j * 8 + i] = -1.0;
        }
    }
    Tensor::from_vec(m, (N_GEN, 64), dev)
}

/// `[28, 28]` σᵀ for right-multiplying row generators; entries are small integers and
/// halves, exact in f32.
fn sigma_t(f: Family, dev: &Device) -> candle_core::Result<Option<Tensor>> {
    let s = match f {
        Family::Vector => return Ok(None),
        Family::SpinorPlus => &maps().plus,
        Family::SpinorMinus => &maps().minus,
    };
    let mut t = vec![0f32; N_GEN * N_GEN];
    for n in 0..N_GEN {
        for k in 0..N_GEN {
            t[k * N_GEN + n] = s[n][k] as f32;
        }
    }
    Ok(Some(Tensor::from_vec(t, (N_GEN, N_GEN), dev)?))
}

/// exp of each generator row, `[n, 28] → [n, 8, 8]`, in the generators' dtype:
/// Horner-form Taylor polynomial of degree 16 on A/2ˢ, then s squarings (s from the
/// largest ∞-norm in the batch). A zero generator gives the identity exactly.
pub fn expm_batch(gens: &Tensor) -> candle_core::Result<Tensor> {
    let n = gens.dim(0)?;
    let dev = gens.device();
    let dt = gens.dtype();
    let a = gens
        .matmul(&skew_basis(dev)?.to_dtype(dt)?)?
        .reshape((n, 8, 8))?;
    let norm = if n == 0 {
        0.0
    } else {
        a.abs()?
            .sum(D::Minus1)?
            .max(D::Minus1)?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
    };
    if !norm.is_finite() {
        candle_core::bail!("generator is not finite")
    }
    let s = squarings(norm);
    let x = (a * 0.5f64.powi(s as i32))?;
    let eye = Tensor::eye(8, dt, dev)?
        .unsqueeze(0)?
        .broadcast_as((n, 8, 8))?
        .contiguous()?;
    let mut r = eye.clone();
    for k in (1..=TAYLOR_DEGREE).rev() {
        r = ((x.matmul(&r)? / k as f64)? + &eye)?;
    }
    for _ in 0..s {
        r = r.matmul(&r)?;
    }
    Ok(r)
}

/// The rotations of one factor for every unit of a site, `[units, 8, 8]`.
pub fn factor_rotations(
    gens: &Tensor,
    shape: SiteShape,
    site: Site,
    g: Granularity,
) -> candle_core::Result<Tensor> {
    let n = gens.dim(0)?;
    let dev = gens.device();
    let mut per_family = Vec::with_capacity(3);
    for f in [Family::Vector, Family::SpinorPlus, Family::SpinorMinus] {
        let gf = match sigma_t(f, dev)? {
            Some(st) => gens.matmul(&st.to_dtype(gens.dtype())?)?,
            None => gens.clone(),
        };
        per_family.push(expm_batch(&gf)?);
    }
    let all = Tensor::cat(&per_family, 0)?; // [3n, 8, 8]
    let index: Vec<u32> = (0..shape.units())
        .map(|u| {
            let (gen, fam) = shape.unit(site, g, u);
            let f = match fam {
                Family::Vector => 0,
                Family::SpinorPlus => 1,
                Family::SpinorMinus => 2,
            };
            (f * n + gen) as u32
        })
        .collect();
    all.index_select(&Tensor::new(index, dev)?, 0)
}

/// The gate of a site: `R = R_last · … · R_first` over its factors, in the given order
/// (spec default `["safe", "cmd"]`: R = R_cmd · R_safe). The exponentials and the product
/// are computed in f64 and rounded to f32 once, so that a gate of several factors still
/// meets the spec's f32 orthogonality bound; the casts keep it differentiable.
pub fn site_rotation(
    factors: &[Tensor],
    shape: SiteShape,
    site: Site,
    g: Granularity,
) -> candle_core::Result<BlockRotation> {
    let mut total: Option<Tensor> = None;
    for gens in factors {
        let r = factor_rotations(&gens.to_dtype(DType::F64)?, shape, site, g)?;
        total = Some(match total {
            None => r,
            Some(t) => r.matmul(&t)?,
        });
    }
    let total = match total {
        Some(t) => t.to_dtype(DType::F32)?,
        None => Tensor::eye(8, DType::F32, &Device::Cpu)?
            .unsqueeze(0)?
            .repeat((shape.units(), 1, 1))?,
    };
    BlockRotation::new(&total)
}

#[cfg(test)]
mod tests {
    use super::super::algebra::{expm, skew};
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn tensor_exp_matches_f64_exp() {
        let mut rng = StdRng::seed_from_u64(9);
        let g: Vec<f64> = (0..5 * N_GEN)
            .map(|_| rng.random_range(-0.8..0.8))
            .collect();
        let t = Tensor::from_vec(
            g.iter().map(|&v| v as f32).collect::<Vec<_>>(),
            (5, N_GEN),
            &Device::Cpu,
        )
        .unwrap();
        let r = expm_batch(&t).unwrap().to_vec3::<f32>().unwrap();
        for b in 0..5 {
            let want = expm(&skew(&g[b * N_GEN..(b + 1) * N_GEN]));
            for i in 0..8 {
                for j in 0..8 {
                    assert!((r[b][i][j] as f64 - want[i][j]).abs() < 2e-6);
                }
            }
        }
    }

    #[test]
    fn zero_generators_give_identity_exactly() {
        let r = expm_batch(&Tensor::zeros((3, N_GEN), DType::F32, &Device::Cpu).unwrap()).unwrap();
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .repeat((3, 1, 1))
            .unwrap();
        assert_eq!(r.to_vec3::<f32>().unwrap(), eye.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn f32_rotations_are_orthogonal_to_1e6() {
        // As the runtime computes them: exp in f64, rounded to f32 once.
        let t = Tensor::rand(-2f32, 2f32, (64, N_GEN), &Device::Cpu).unwrap();
        let r = expm_batch(&t.to_dtype(DType::F64).unwrap())
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let p = r.transpose(1, 2).unwrap().matmul(&r).unwrap();
        let eye = Tensor::eye(8, DType::F32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((64, 8, 8))
            .unwrap();
        let err = (p - eye)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(err <= 1e-6, "‖RᵀR − I‖∞ = {err}");
    }
}
