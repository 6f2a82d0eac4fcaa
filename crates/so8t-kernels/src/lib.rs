//! Matrix × activations for ggml-quantised weights on the CPU.
//!
//! The arithmetic is ggml's, step for step, so that a model gives the tokens llama.cpp
//! gives: activations are quantised per block to 8 bits exactly as ggml's x86 code does
//! (`Q8_0`/`Q8_1`: `id = 127/amax`, round half to even, `s = fp16(d·Σq)`; `Q8_K`: the
//! reference `-127/max` rule), each weight block meets its activation block in an
//! integer dot product, and only the per-block scales are floating point. What remains
//! different is the order of the float additions across blocks.
//!
//! Rows of the weight matrix are shared among rayon's worker threads (one pool for the
//! process, no per-call spawning); the integer loops are compiled once per instruction set
//! (AVX-512, AVX2, baseline) and chosen at run time.

/// `fn $name(args) -> T` that runs `$body(args)` compiled for the widest instruction set
/// [`dot::Isa::detect`] finds (AVX-512, AVX2, baseline): `$body` is `#[inline(always)]`
/// plain Rust, so LLVM vectorises it once per set. No FMA contraction follows from the
/// features: Rust never fuses a multiply and an add on its own, so f32 results stay
/// bit for bit what the baseline computes.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty = $body:ident) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                match $crate::dot::Isa::detect() {
                    // SAFETY: `Isa::detect` found these features on this CPU.
                    $crate::dot::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    $crate::dot::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::dot::Isa::Base => {}
                }
            }
            $body($($arg),*)
        }
    };
}

mod blocks;
mod dot;
pub mod quantize;

pub use blocks::QType;
use rayon::prelude::*;

/// A `[rows, cols]` weight matrix stored in ggml blocks, row-major, rows never sharing a block.
pub struct QMatrix {
    ty: QType,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

#[derive(Debug)]
pub struct ShapeError(pub String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl QMatrix {
    pub fn new(ty: QType, rows: usize, cols: usize, data: Vec<u8>) -> Result<QMatrix, ShapeError> {
        if cols % ty.block_size() != 0 {
            return Err(ShapeError(format!(
                "{cols} columns is not a multiple of the {ty:?} block size {}",
                ty.block_size()
            )));
        }
        let want = rows * (cols / ty.block_size()) * ty.type_size();
        if data.len() != want {
            return Err(ShapeError(format!(
                "{ty:?} [{rows}, {cols}] needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(QMatrix {
            ty,
            rows,
            cols,
            data,
        })
    }

    pub fn qtype(&self) -> QType {
        self.ty
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// Row `r` as f32 (exact: no activation quantisation involved).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let rb = self.row_bytes();
        blocks::dequantize(self.ty, &self.data[r * rb..(r + 1) * rb], out);
    }

    /// `out[i, r] = Σ_c W[r, c] · x[i, c]` for `x: [n, cols]`, `out: [n, rows]`.
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32]) {
        assert_eq!(x.len(), n * self.cols, "activations must be [n, cols]");
        assert_eq!(out.len(), n * self.rows, "output must be [n, rows]");
        let act = blocks::quantize_activations(self.ty, x, n, self.cols);
        let rb = self.row_bytes();
        let isa = dot::Isa::detect();
        // Enough rows per task to amortise scheduling; for decode (n = 1) a few hundred
        // rows keep both cores busy without stealing overhead dominating.
        let chunk = (16384 / (self.cols.max(1) / 32 + 1)).clamp(8, 256);
        let out_ptr = SendPtr(out.as_mut_ptr());
        let rows = self.rows;
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(rows);
            let p = &out_ptr;
            for r in r0..r1 {
                let w = &self.data[r * rb..(r + 1) * rb];
                for i in 0..n {
                    let v = dot::row_dot(isa, self.ty, w, act.row(i));
                    // SAFETY: each (i, r) is written by exactly one task (rows are
                    // partitioned), and `out` outlives the parallel loop.
                    unsafe { *p.0.add(i * rows + r) = v };
                }
            }
        });
    }
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
