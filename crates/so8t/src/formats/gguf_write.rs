//! A GGUF v3 writer that streams: the header is planned from the tensors' sizes, then each
//! tensor is produced, written and dropped in turn, so peak memory is about one tensor.
//! The file is written under a temporary name beside the target and renamed when complete.

use crate::error::{Error, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use sha2::{Digest, Sha256};
use std::io::{BufWriter, Write};
use std::path::Path;

pub const ALIGNMENT: u64 = 32;

pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    StrArray(Vec<String>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

pub struct PlannedTensor {
    pub name: String,
    /// HF order, `[rows, cols]` (written reversed, as ggml's `ne`).
    pub dims: Vec<usize>,
    pub dtype: GgmlDType,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        let n: usize = self.dims.iter().product();
        (n / self.dtype.block_size() * self.dtype.type_size()) as u64
    }
}

fn w_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn w_meta(w: &mut impl Write, key: &str, v: &Meta) -> std::io::Result<()> {
    w_str(w, key)?;
    match v {
        Meta::U32(x) => {
            w.write_all(&4u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::I32(x) => {
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::F32(x) => {
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&x.to_le_bytes())
        }
        Meta::Bool(x) => {
            w.write_all(&7u32.to_le_bytes())?;
            w.write_all(&[*x as u8])
        }
        Meta::Str(s) => {
            w.write_all(&8u32.to_le_bytes())?;
            w_str(w, s)
        }
        Meta::StrArray(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&8u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|s| w_str(w, s))
        }
        Meta::I32Array(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&5u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
        Meta::F32Array(a) => {
            w.write_all(&9u32.to_le_bytes())?;
            w.write_all(&6u32.to_le_bytes())?;
            w.write_all(&(a.len() as u64).to_le_bytes())?;
            a.iter().try_for_each(|x| w.write_all(&x.to_le_bytes()))
        }
    }
}

fn pad(w: &mut impl Write, written: u64) -> std::io::Result<u64> {
    let p = (ALIGNMENT - written % ALIGNMENT) % ALIGNMENT;
    w.write_all(&vec![0u8; p as usize])?;
    Ok(p)
}

/// A writer that hashes what passes through it, so the file's sha256 needs no second read.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes `path`; `produce(i)` returns tensor i's bytes (exactly its planned size) and is
/// called once per tensor, in order. `progress(i, bytes)` after each tensor. Returns the
/// file's sha256 (hex).
pub fn write(
    path: &Path,
    metadata: &[(String, Meta)],
    tensors: &[PlannedTensor],
    mut produce: impl FnMut(usize) -> Result<Vec<u8>>,
    mut progress: impl FnMut(usize, u64),
) -> Result<String> {
    crate::staging::write_file(path, |tmp| {
        let file = std::fs::File::create(tmp).map_err(|e| Error::io(path, e))?;
        let mut w = Hashing {
            inner: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
        };
        let io = |e| Error::io(path, e);
        let mut head = Vec::new();
        head.extend_from_slice(&0x4655_4747u32.to_le_bytes());
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            w_meta(&mut head, k, v).map_err(io)?;
        }
        let mut offset = 0u64;
        for t in tensors {
            w_str(&mut head, &t.name).map_err(io)?;
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in t.dims.iter().rev() {
                head.extend_from_slice(&(*d as u64).to_le_bytes());
            }
            head.extend_from_slice(&super::ggml_type_id(t.dtype).to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset += t.nbytes();
            offset += (ALIGNMENT - offset % ALIGNMENT) % ALIGNMENT;
        }
        w.write_all(&head).map_err(io)?;
        pad(&mut w, head.len() as u64).map_err(io)?;
        // Tensor i is written and hashed on a second thread while tensor i+1 is produced.
        let w = std::thread::scope(|scope| -> Result<Hashing<BufWriter<std::fs::File>>> {
            let (send, recv) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
            let writer = scope.spawn(
                move || -> std::io::Result<Hashing<BufWriter<std::fs::File>>> {
                    for bytes in recv {
                        w.write_all(&bytes)?;
                        pad(&mut w, bytes.len() as u64)?;
                    }
                    Ok(w)
                },
            );
            for (i, t) in tensors.iter().enumerate() {
                let bytes = produce(i)?;
                if bytes.len() as u64 != t.nbytes() {
                    return Err(Error::Invalid(format!(
                        "tensor `{}`: produced {} bytes, planned {}",
                        t.name,
                        bytes.len(),
                        t.nbytes()
                    )));
                }
                let n = bytes.len() as u64;
                if send.send(bytes).is_err() {
                    break; // the writer failed; its error is reported below
                }
                progress(i, n);
            }
            drop(send);
            writer
                .join()
                .map_err(|_| Error::Invalid("GGUF writer thread panicked".into()))?
                .map_err(io)
        })?;
        let sha = format!("{:x}", w.hash.finalize());
        let file = w
            .inner
            .into_inner()
            .map_err(|e| Error::io(path, e.into_error()))?;
        file.sync_all().map_err(io)?;
        Ok(sha)
    })
}

/// ggml blocks for a row-major f32 tensor of shape `dims`: our ggml-exact quantisers
/// (Q8_0, Q5_0, Q4_K, Q5_K, Q6_K) and parallel f16/bf16 conversion, candle's block encoders for
/// the other types.
pub fn encode(data: &[f32], dims: &[usize], dtype: GgmlDType) -> Result<Vec<u8>> {
    use rayon::prelude::*;
    let cols = *dims.last().unwrap_or(&1);
    let ours = match dtype {
        GgmlDType::Q8_0 => Some(so8t_kernels::QType::Q8_0),
        GgmlDType::Q5_0 => Some(so8t_kernels::QType::Q5_0),
        GgmlDType::Q4K => Some(so8t_kernels::QType::Q4K),
        GgmlDType::Q5K => Some(so8t_kernels::QType::Q5K),
        GgmlDType::Q6K => Some(so8t_kernels::QType::Q6K),
        _ => None,
    };
    if let Some(ty) = ours {
        if let Some(b) = so8t_kernels::quantize::quantize_rows(ty, data, cols) {
            return Ok(b);
        }
    }
    match dtype {
        GgmlDType::F32 => return Ok(to_bytes(data, |v| v.to_le_bytes())),
        GgmlDType::F16 => return Ok(to_bytes(data, |v| half::f16::from_f32(v).to_le_bytes())),
        GgmlDType::BF16 => return Ok(to_bytes(data, |v| half::bf16::from_f32(v).to_le_bytes())),
        _ => {}
    }
    // candle's encoders are single-threaded; blocks never cross rows, so chunks of rows
    // quantised in parallel and concatenated are the same bytes.
    let rows = data.len() / cols.max(1);
    let chunk = rows.div_ceil(rayon::current_num_threads() * 4).max(16);
    let parts: Vec<candle_core::Result<Vec<u8>>> = data
        .par_chunks(chunk * cols.max(1))
        .map(|part| {
            let t = Tensor::from_slice(
                part,
                (part.len() / cols.max(1), cols),
                &candle_core::Device::Cpu,
            )?;
            Ok(QTensor::quantize(&t, dtype)?.data()?.into_owned())
        })
        .collect();
    let mut out = Vec::new();
    for p in parts {
        out.extend(p?);
    }
    Ok(out)
}

/// Each value as `W` little-endian bytes, in parallel chunks (generic, so the conversion
/// inlines into the loop; the mirror of the safetensors reader's).
fn to_bytes<const W: usize>(data: &[f32], f: impl Fn(f32) -> [u8; W] + Sync) -> Vec<u8> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    let mut out = vec![0u8; data.len() * W];
    out.par_chunks_mut(CHUNK * W)
        .zip(data.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (b, &v) in o.chunks_exact_mut(W).zip(x) {
                b.copy_from_slice(&f(v));
            }
        });
    out
}
