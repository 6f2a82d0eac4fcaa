//! Reading model files. Every store answers in HF tensor names (`model.layers.0.self_attn.q_proj.weight`)
//! and HF layouts (`[out, in]`, "rotate half" RoPE rows), whatever the file holds, so the
//! decoder is written once.

pub mod gguf;
pub mod safetensors;

use crate::error::{Error, Result};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{Module, Tensor};
use std::path::Path;
use std::sync::Arc;

/// A weight matrix `[out, in]`: dense f32, or ggml-quantised blocks that candle multiplies as they are.
pub type Matrix = QMatMul;

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
        Ok(match self {
            Embedding::Dense(t) => QMatMul::Tensor(t.clone()),
            Embedding::Quant(q) => QMatMul::from_arc(q.clone())?,
        })
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

/// Where the decoder's weights come from.
pub trait WeightStore: Send + Sync {
    fn path(&self) -> &Path;
    fn contains(&self, name: &str) -> bool;
    /// A `[rows, cols]` matrix; the shape is checked against the file.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix>;
    /// A dense f32 vector of `len` (norm weights, biases).
    fn vector(&self, name: &str, len: usize) -> Result<Tensor>;
    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding>;
    /// Tensor counts by storage type, for `inspect`.
    fn dtype_counts(&self) -> Vec<(String, usize)>;
    fn tensor_names(&self) -> Vec<String>;
    /// (parameters, bytes of tensor data) over every tensor in the file(s).
    fn size(&self) -> (usize, u64);
}

pub(crate) fn shape_error(path: &Path, name: &str, want: &[usize], got: &[usize]) -> Error {
    Error::format(path, format!("tensor `{name}` has shape {got:?}, expected {want:?}"))
}
