//! Reading model files. Every store answers in HF tensor names (`model.layers.0.self_attn.q_proj.weight`)
//! and HF layouts (`[out, in]`, "rotate half" RoPE rows), whatever the file holds, so the
//! decoder is written once.

pub mod gguf;
pub mod gguf_header;
pub mod gguf_write;
pub mod safetensors;
pub mod source;

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Module, Tensor};
use so8t_kernels::{QMatrix, QType};
use std::path::Path;
use std::sync::Arc;

/// A file's bytes: mapped, or (for fuzzing and tests) owned.
pub(crate) enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A weight matrix `[out, in]`.
#[derive(Clone)]
pub enum Matrix {
    /// f32, multiplied by candle's gemm.
    Dense(Tensor),
    /// ggml blocks (and F16/BF16), multiplied by our kernels with ggml's arithmetic.
    Quant(Arc<QMatrix>),
    /// ggml types we have no kernel for yet (Q2_K, Q3_K): candle's own.
    Candle(QMatMul),
}

impl Matrix {
    /// A quantised tensor as the best matrix for it.
    pub fn from_qtensor(q: Arc<QTensor>) -> candle_core::Result<Matrix> {
        let ty = kernel_type(q.dtype());
        match ty {
            Some(ty) => {
                let (rows, cols) = q.shape().dims2()?;
                let m = QMatrix::new(ty, rows, cols, q.data()?.into_owned())
                    .map_err(candle_core::Error::wrap)?;
                Ok(Matrix::Quant(Arc::new(m)))
            }
            None => Ok(match QMatMul::from_arc(q)? {
                QMatMul::Tensor(t) => Matrix::Dense(t),
                other => Matrix::Candle(other),
            }),
        }
    }

    /// The matrix cut into consecutive blocks of rows, `parts` rows each (a fused
    /// projection into its parts; quantisation blocks never cross a row).
    pub fn split_rows(&self, parts: &[usize]) -> candle_core::Result<Vec<Matrix>> {
        let mut out = Vec::with_capacity(parts.len());
        let mut start = 0;
        for &n in parts {
            out.push(match self {
                Matrix::Dense(w) => Matrix::Dense(w.narrow(0, start, n)?.contiguous()?),
                Matrix::Quant(m) => {
                    Matrix::Quant(Arc::new(m.row_range(start, n).map_err(candle_core::Error::wrap)?))
                }
                Matrix::Candle(QMatMul::QTensor(q)) => {
                    let (rows, cols) = q.shape().dims2()?;
                    if start + n > rows {
                        candle_core::bail!("rows {start}..{} of a {rows}-row matrix", start + n)
                    }
                    let data = q.data()?;
                    let row_bytes = data.len() / rows.max(1);
                    let part = data[start * row_bytes..(start + n) * row_bytes].to_vec();
                    let storage = candle_core::quantized::QStorage::from_data(
                        std::borrow::Cow::Owned(part),
                        &Device::Cpu,
                        q.dtype(),
                    )?;
                    Matrix::Candle(QMatMul::from_qtensor(QTensor::new(storage, (n, cols))?)?)
                }
                Matrix::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => {
                    Matrix::Dense(w.narrow(0, start, n)?.to_dtype(candle_core::DType::F32)?.contiguous()?)
                }
            });
            start += n;
        }
        Ok(out)
    }

    /// f16/bf16 kernel matrices as dense f32 (what training multiplies through); `None`
    /// for every other kind.
    pub fn widened(&self) -> candle_core::Result<Option<Matrix>> {
        let Matrix::Quant(m) = self else { return Ok(None) };
        if !matches!(m.qtype(), QType::F16 | QType::BF16) {
            return Ok(None);
        }
        let (rows, cols) = (m.rows(), m.cols());
        let mut data = vec![0f32; rows * cols];
        widen_into(m, &mut data);
        Ok(Some(Matrix::Dense(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)))
    }

    /// The matrix on `device` in the form candle's kernels there take: dense f32, f16
    /// and bf16 as they are (cuBLAS), ggml blocks as candle's quantised tensors (its
    /// quantised matmul); f16/bf16 widened to f32 there with [`Dtype::F32`]. On the CPU,
    /// the matrix as it is.
    pub fn to_device(&self, device: &Device, dtype: crate::device::Dtype) -> Result<Matrix> {
        let half = |t: Tensor| -> candle_core::Result<Tensor> {
            match dtype {
                crate::device::Dtype::Auto => Ok(t),
                crate::device::Dtype::F32 => t.to_dtype(candle_core::DType::F32),
            }
        };
        if device.is_cpu() {
            return Ok(self.clone());
        }
        Ok(match self {
            Matrix::Dense(w) => Matrix::Dense(w.to_device(device)?),
            Matrix::Quant(m) => {
                let (rows, cols) = (m.rows(), m.cols());
                let bytes = m.file_bytes();
                match m.qtype() {
                    ty @ (QType::F16 | QType::BF16) => {
                        let stored = if ty == QType::F16 { candle_core::DType::F16 } else { candle_core::DType::BF16 };
                        Matrix::Dense(half(Tensor::from_raw_buffer(&bytes, stored, &[rows, cols], device)?)?)
                    }
                    ty => {
                        let q = QTensor::new(QStorage::from_data(bytes, device, candle_type(ty))?, (rows, cols))?;
                        Matrix::Candle(QMatMul::QTensor(Arc::new(q)))
                    }
                }
            }
            Matrix::Candle(QMatMul::QTensor(q)) => {
                let moved = QTensor::new(QStorage::from_data(q.data()?, device, q.dtype())?, q.shape())?;
                Matrix::Candle(QMatMul::QTensor(Arc::new(moved)))
            }
            Matrix::Candle(QMatMul::Tensor(w) | QMatMul::TensorF16(w)) => Matrix::Dense(half(w.to_device(device)?)?),
        })
    }

    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // f16/bf16 weights on a GPU: the product in their type (cuBLAS accumulates in
            // f32), the activations staying f32 around it.
            Matrix::Dense(w) if w.dtype() != x.dtype() => {
                x.to_dtype(w.dtype())?.broadcast_matmul(&w.t()?)?.to_dtype(x.dtype())
            }
            Matrix::Dense(w) => match dense_product(w, x)? {
                Some(y) => Ok(y),
                None => x.broadcast_matmul(&w.t()?),
            },
            Matrix::Candle(m) => m.forward(x),
            // Many rows of half-precision weights (a prompt): candle's gemm, which blocks for
            // cache reuse, on the weights widened for this product beats the kernels' rows.
            Matrix::Quant(m) if x.dims().last() == Some(&m.cols()) && widens_for(m, x.elem_count() / m.cols().max(1)) => {
                half_gemm(m, x)
            }
            Matrix::Quant(m) => {
                let mut dims = x.dims().to_vec();
                let cols = dims.pop().unwrap_or(0);
                if cols != m.cols() {
                    candle_core::bail!(
                        "matmul: activations have {cols} features, the matrix {}",
                        m.cols()
                    )
                }
                let n = x.elem_count() / cols.max(1);
                let xs = x
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut out = vec![0f32; n * m.rows()];
                m.matmul(&xs, n, &mut out);
                dims.push(m.rows());
                Tensor::from_vec(out, dims, &Device::Cpu)
            }
        }
    }
}

/// Activation rows up to which a dense product runs on the kernels' f32 matrix–vector
/// code; from here on gemm, which blocks for cache reuse, is faster (prompts).
const DENSE_KERNEL_ROWS: usize = 16;

/// Activation rows from which a product with f16/bf16 weights widens them to f32 for gemm,
/// for that product only (pp512 of a bf16 SmolLM2 against the f32 gemm of before: 0.75× on
/// the kernels alone, 0.85× widened; BENCHMARKS.md).
const HALF_GEMM_ROWS: usize = 64;

/// The largest matrix (values) [`half_gemm`] widens: its scratch buffer lives as long as its
/// thread, and a large LM head (151936 × 2560 for Qwen3-4B: 1.6 GB in f32) would pin the
/// memory half precision saves; bigger matrices stay on the kernels.
const HALF_WIDEN_MAX: usize = 64 << 20;

/// Whether a product of `m` with `rows` activation rows widens it to f32 for gemm.
pub(crate) fn widens_for(m: &QMatrix, rows: usize) -> bool {
    matches!(m.qtype(), QType::F16 | QType::BF16) && rows >= HALF_GEMM_ROWS && m.rows() * m.cols() <= HALF_WIDEN_MAX
}

/// Every row of `m` as f32 into `out` (`[rows, cols]`), rows shared out on the kernels' pool.
fn widen_into(m: &QMatrix, out: &mut [f32]) {
    let cols = m.cols();
    let pool = so8t_kernels::pool::global();
    let per = m.rows().div_ceil(pool.threads() * 4).max(1) * cols;
    pool.chunks(out, per, &|start, chunk| {
        for (k, row) in chunk.chunks_exact_mut(cols).enumerate() {
            m.dequantize_row(start / cols + k, row);
        }
    });
}

/// `x·Wᵀ` for half-precision `m` and many activation rows: `m` widened into this thread's
/// scratch buffer (kept between products, so no weight-sized allocation or fresh pages per
/// product; it holds the largest matrix widened so far) and multiplied by gemm.
fn half_gemm(m: &QMatrix, x: &Tensor) -> candle_core::Result<Tensor> {
    thread_local! {
        static WIDE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (rows, cols) = (m.rows(), m.cols());
    let mut dims = x.dims().to_vec();
    let n = x.elem_count() / cols.max(1);
    let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = vec![0f32; n * rows];
    WIDE.with(|wide| {
        let mut wide = wide.borrow_mut();
        if wide.len() < rows * cols {
            wide.resize(rows * cols, 0.0);
        }
        let w = &mut wide[..rows * cols];
        widen_into(m, w);
        pool_gemm(n, rows, cols, &xs, w, &mut out);
    });
    dims.pop();
    dims.push(rows);
    Tensor::from_vec(out, dims, &Device::Cpu)
}

/// `out[n, rows] = x[n, cols]·w[rows, cols]ᵀ` by gemm, the weight's rows (the output's
/// columns) shared out on the kernels' pool, single-threaded gemm on each share. Through
/// candle's product, gemm ran on the calling thread while the pool's worker spun for the
/// next kernel: a third of the heads pass's time (`perf`, BENCHMARKS.md).
fn pool_gemm(n: usize, rows: usize, cols: usize, x: &[f32], w: &[f32], out: &mut [f32]) {
    assert!(x.len() >= n * cols && w.len() >= rows * cols && out.len() >= n * rows);
    struct Dst(*mut f32);
    // SAFETY: the tasks write disjoint columns of `out`, which outlives `run`.
    unsafe impl Sync for Dst {}
    let dst = Dst(out.as_mut_ptr());
    let pool = so8t_kernels::pool::global();
    // Shares of at least 64 weight rows: below that gemm's packing costs more than a
    // thread saves.
    let tasks = pool.threads().min(rows.div_ceil(64)).max(1);
    let per = rows.div_ceil(tasks);
    pool.run(tasks, &|t| {
        let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
        if r0 >= r1 {
            return;
        }
        let dst = &dst;
        // SAFETY: checked above: x is [n, cols], w [rows, cols], out [n, rows], all
        // row-major; this task writes out[.., r0..r1] (row stride `rows`) from
        // w[r0..r1, ..] (rhs = wᵀ: column stride `cols`).
        unsafe {
            gemm::gemm(
                n, r1 - r0, cols,
                dst.0.add(r0), 1, rows as isize, false,
                x.as_ptr(), 1, cols as isize,
                w.as_ptr().add(r0 * cols), cols as isize, 1,
                0.0, 1.0, false, false, false, gemm::Parallelism::None,
            )
        }
    });
}

/// `x·Wᵀ` for an f32 `w` and f32 activations on the CPU: a few rows (decoding) on the
/// kernels' matrix–vector code, more (prompts) by [`pool_gemm`]; `None` where candle
/// should do it (other devices and types, strided tensors).
fn dense_product(w: &Tensor, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
    let (rows, cols) = w.dims2()?;
    let mut dims = x.dims().to_vec();
    let n = x.elem_count() / cols.max(1);
    if dims.last() != Some(&cols) || n == 0 || w.dtype() != candle_core::DType::F32 || x.dtype() != candle_core::DType::F32 || !w.device().is_cpu() {
        return Ok(None);
    }
    let (ws, wl) = w.storage_and_layout();
    let (candle_core::Storage::Cpu(ws), Some((w0, w1))) = (&*ws, wl.contiguous_offsets()) else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let (xs, xl) = x.storage_and_layout();
    let (candle_core::Storage::Cpu(xs), Some((x0, x1))) = (&*xs, xl.contiguous_offsets()) else {
        return Ok(None);
    };
    let mut out = vec![0f32; n * rows];
    let (w, x) = (&ws.as_slice::<f32>()?[w0..w1], &xs.as_slice::<f32>()?[x0..x1]);
    if n <= DENSE_KERNEL_ROWS {
        so8t_kernels::dense::matmul_f32(w, rows, cols, x, n, &mut out);
    } else {
        pool_gemm(n, rows, cols, x, w, &mut out);
    }
    dims.pop();
    dims.push(rows);
    Ok(Some(Tensor::from_vec(out, dims, &Device::Cpu)?))
}

/// ggml's type ids (`enum ggml_type`) of the types candle holds, and the kernels' type of
/// each where they have one: the one table the GGUF reader, the GGUF writer and the
/// kernels' dispatch go through.
const GGML_TYPES: [(u32, GgmlDType, Option<QType>); 15] = [
    (0, GgmlDType::F32, None),
    (1, GgmlDType::F16, Some(QType::F16)),
    (2, GgmlDType::Q4_0, Some(QType::Q4_0)),
    (3, GgmlDType::Q4_1, Some(QType::Q4_1)),
    (6, GgmlDType::Q5_0, Some(QType::Q5_0)),
    (7, GgmlDType::Q5_1, Some(QType::Q5_1)),
    (8, GgmlDType::Q8_0, Some(QType::Q8_0)),
    (9, GgmlDType::Q8_1, None),
    (10, GgmlDType::Q2K, None),
    (11, GgmlDType::Q3K, None),
    (12, GgmlDType::Q4K, Some(QType::Q4K)),
    (13, GgmlDType::Q5K, Some(QType::Q5K)),
    (14, GgmlDType::Q6K, Some(QType::Q6K)),
    (15, GgmlDType::Q8K, None),
    (30, GgmlDType::BF16, Some(QType::BF16)),
];

/// The type of ggml type id `id`, if candle holds it.
pub fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    GGML_TYPES.iter().find(|row| row.0 == id).map(|row| row.1)
}

/// ggml's type id of `t`.
pub fn ggml_type_id(t: GgmlDType) -> u32 {
    GGML_TYPES
        .iter()
        .find(|row| row.1 == t)
        .map(|row| row.0)
        .expect("every GgmlDType is in GGML_TYPES")
}

/// The kernels' type for candle's `t`, if they have a kernel for it.
pub fn kernel_type(t: GgmlDType) -> Option<QType> {
    GGML_TYPES.iter().find(|row| row.1 == t).and_then(|row| row.2)
}

/// candle's type for the kernels' `t`.
pub fn candle_type(t: QType) -> GgmlDType {
    GGML_TYPES
        .iter()
        .find(|row| row.2 == Some(t))
        .map(|row| row.1)
        .expect("every QType is in GGML_TYPES")
}

/// A token embedding table; quantised tables stay quantised and only the looked-up rows
/// are expanded.
#[derive(Clone, Debug)]
pub enum Embedding {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Embedding {
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Embedding::Dense(t) => {
                let (_, hidden) = t.dims2()?;
                let flat = ids.flatten_all()?;
                let mut shape = ids.dims().to_vec();
                shape.push(hidden);
                t.index_select(&flat, 0)?.reshape(shape)
            }
            Embedding::Quant(q) => q.embedding(ids),
        }
    }

    /// The same table as an output projection (tied embeddings).
    pub fn as_matrix(&self) -> candle_core::Result<Matrix> {
        match self {
            Embedding::Dense(t) => Ok(Matrix::Dense(t.clone())),
            Embedding::Quant(q) => Matrix::from_qtensor(q.clone()),
        }
    }

    pub fn dims(&self) -> Vec<usize> {
        match self {
            Embedding::Dense(t) => t.dims().to_vec(),
            Embedding::Quant(q) => q.shape().dims().to_vec(),
        }
    }
}

/// Applies a matrix to `[.., in]` activations.
pub fn matmul(m: &Matrix, x: &Tensor) -> candle_core::Result<Tensor> {
    m.forward(x)
}

/// `x·Wᵀ` for a frozen `W`, differentiable in `x` only. candle's own matmul backward also
/// computes the gradient of the weight, whether anything needs it or not: for gates
/// training that doubled the work of every step and held a weight-sized gradient for
/// every projection (16 GB for a SmolLM2 batch). Only dense weights can be trained
/// through (an SO8T directory's are).
struct FrozenMatmul(Matrix);

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul: input must be contiguous".into())
        })?;
        let x = Tensor::from_slice(
            &storage.as_slice::<f32>()?[start..end],
            layout.shape(),
            &Device::Cpu,
        )?;
        let y = self.0.forward(&x)?;
        Ok((
            candle_core::CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?),
            y.shape().clone(),
        ))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        match &self.0 {
            Matrix::Dense(w) => Ok(Some(grad.broadcast_matmul(w)?)),
            _ => candle_core::bail!("{TRAIN_DENSE_ONLY}"),
        }
    }
}

const TRAIN_DENSE_ONLY: &str =
    "training through quantised weights is not supported: convert the model to an f32/bf16 SO8T directory";

/// [`matmul`] that passes gradients to `x` (and never to the weight).
pub fn matmul_frozen(m: &Matrix, x: &Tensor) -> candle_core::Result<Tensor> {
    if !x.device().is_cpu() {
        // On a GPU, candle's own product: its backward also computes the unused gradient
        // of the weight, which a GPU affords (FrozenMatmul has a CPU forward only).
        return match m {
            Matrix::Dense(_) => m.forward(x),
            _ => candle_core::bail!("{TRAIN_DENSE_ONLY}"),
        };
    }
    x.contiguous()?.apply_op1(FrozenMatmul(m.clone()))
}

/// Where the decoder's weights come from.
pub trait WeightStore: Send + Sync {
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    /// A `[rows, cols]` matrix; the shape is checked against the file.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix>;
    /// A dense f32 vector of `len` (norm weights, biases).
    fn vector(&self, name: &str, len: usize) -> Result<Tensor>;
    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding>;
    /// Any tensor as dense f32 with its shape checked (dequantised exactly; HF layout).
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor>;
    /// The same values as a plain vector, row-major (export quantises from this).
    fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.dense(name, shape)?.flatten_all()?.to_vec1::<f32>()?)
    }
    /// Whether tensor `name` is stored in f16/bf16 (and so loads as a half-precision matrix).
    fn is_half_precision(&self, _name: &str) -> bool {
        false
    }
    /// Tensor counts by storage type, for `inspect`.
    fn dtype_counts(&self) -> Vec<(String, usize)>;
    fn tensor_names(&self) -> Vec<String>;
    /// (parameters, bytes of tensor data) over every tensor in the file(s).
    fn size(&self) -> (usize, u64);
}

pub(crate) fn shape_error(path: &Path, name: &str, want: &[usize], got: &[usize]) -> Error {
    Error::format(
        path,
        format!("tensor `{name}` has shape {got:?}, expected {want:?}"),
    )
}
