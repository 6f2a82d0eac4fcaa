//! Block-diagonal rotations applied to activations: the slot where SO8T gates act
//! (spec §4). The decoder only knows "multiply each 8-wide block by its matrix"; where the
//! matrices come from (generators, triality, factors) is the gates module's business.

use candle_core::{Result, Tensor};

pub const BLOCK: usize = 8;

/// `units` 8×8 matrices; unit `u` acts on features `8u..8u+8` of the last dimension,
/// as a column-vector multiplication `y_u = R_u x_u`.
#[derive(Clone, Debug)]
pub struct BlockRotation {
    /// `[units, 8, 8]`, f32, already transposed for row-vector multiplication (`x Rᵀ`).
    rt: Tensor,
    /// The same matrices untransposed, row-major, for [`BlockRotation::apply_in_place`].
    r: Vec<f32>,
    units: usize,
}

impl BlockRotation {
    /// `r` is `[units, 8, 8]` with `r[u]` the matrix for block `u`.
    pub fn new(r: &Tensor) -> Result<Self> {
        let (units, a, b) = r.dims3()?;
        if a != BLOCK || b != BLOCK {
            candle_core::bail!("block rotation must be [units, 8, 8], got {:?}", r.dims())
        }
        Ok(BlockRotation {
            rt: r.transpose(1, 2)?.contiguous()?,
            r: r.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            units,
        })
    }

    /// The same rotation applied on `device`.
    pub fn to_device(&self, device: &candle_core::Device) -> Result<Self> {
        Ok(BlockRotation { rt: self.rt.to_device(device)?, r: self.r.clone(), units: self.units })
    }

    pub fn units(&self) -> usize {
        self.units
    }

    /// The matrices, `[units, 8, 8]`.
    pub fn matrices(&self) -> Result<Tensor> {
        self.rt.transpose(1, 2)?.contiguous()
    }

    /// `x`: `[.., units·8]`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let width = *dims.last().unwrap_or(&0);
        if width != self.units * BLOCK {
            candle_core::bail!(
                "rotation over {} blocks applied to width {width}",
                self.units
            )
        }
        let lead = x.elem_count() / width;
        let xs = x
            .reshape((lead, self.units, BLOCK))?
            .transpose(0, 1)?
            .contiguous()?;
        let ys = xs.matmul(&self.rt)?;
        ys.transpose(0, 1)?.contiguous()?.reshape(dims)
    }

    /// `x`: rows of `units·8` values, rotated where they lie (the inference path).
    pub fn apply_in_place(&self, x: &mut [f32]) {
        let width = self.units * BLOCK;
        for row in x.chunks_exact_mut(width) {
            for (u, v) in row.chunks_exact_mut(BLOCK).enumerate() {
                let m = &self.r[u * BLOCK * BLOCK..(u + 1) * BLOCK * BLOCK];
                let xin: [f32; BLOCK] = std::array::from_fn(|b| v[b]);
                for (a, out) in v.iter_mut().enumerate() {
                    *out = (0..BLOCK).map(|b| m[a * BLOCK + b] * xin[b]).sum();
                }
            }
        }
    }
}
