//! HF checkpoints: `model.safetensors` or shards listed in `model.safetensors.index.json`,
//! memory-mapped; f32/f16/bf16 and block-scaled FP8 (e4m3) weights, dequantised to f32 one
//! tensor at a time.

use super::{shape_error, Embedding, Matrix, WeightStore};
use crate::error::{Error, InFile, Result};
use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

pub struct SafetensorsStore {
    dir: PathBuf,
    files: Vec<(PathBuf, super::Bytes)>,
    entries: HashMap<String, Entry>,
    /// `quantization_config.weight_block_size` for FP8 checkpoints.
    fp8_block: Option<(usize, usize)>,
}

/// A tensor's name as the decoder asks for it. Vision-language checkpoints saved by newer
/// transformers nest the text model under `model.language_model.` and the vision tower
/// under `model.visual.`; released Qwen2-VL checkpoints use `model.` and `visual.`, which
/// transformers itself maps the newer names back to when it saves.
fn canonical_name(name: String) -> String {
    if let Some(rest) = name.strip_prefix("model.language_model.") {
        format!("model.{rest}")
    } else if let Some(rest) = name.strip_prefix("model.visual.") {
        format!("visual.{rest}")
    } else {
        name
    }
}

impl SafetensorsStore {
    /// Opens the weights of an HF directory. `fp8_block` comes from `config.json`.
    pub fn open(dir: &Path, fp8_block: Option<(usize, usize)>) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let names: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = crate::files::read_text(&index, crate::files::SETTINGS_LIMIT)?;
            #[derive(serde::Deserialize)]
            struct Index {
                weight_map: BTreeMap<String, String>,
            }
            let idx: Index = serde_json::from_str(&text).in_file(&index)?;
            let mut shards: Vec<String> = idx.weight_map.into_values().collect();
            shards.sort();
            shards.dedup();
            for s in &shards {
                if s.contains('/') || s.contains("..") {
                    return Err(Error::format(
                        &index,
                        format!("shard name `{s}` is not a plain file name"),
                    ));
                }
            }
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json",
            ));
        };
        Self::open_files(dir, names, fp8_block)
    }

    pub fn open_files(
        dir: &Path,
        names: Vec<PathBuf>,
        fp8_block: Option<(usize, usize)>,
    ) -> Result<Self> {
        let mut files = Vec::new();
        for path in names {
            let file = crate::files::open(&path)?;
            // SAFETY: the file is opened read-only; like every mmap-based loader we assume
            // nobody truncates it while the model is loaded.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            files.push((path, super::Bytes::Mapped(mmap)));
        }
        Self::from_files(dir, files, fp8_block)
    }

    /// One safetensors file held in memory; `path` names it in errors.
    pub fn from_vec(path: &Path, bytes: Vec<u8>) -> Result<Self> {
        let dir = path.parent().unwrap_or(Path::new("."));
        Self::from_files(dir, vec![(path.to_path_buf(), super::Bytes::Owned(bytes))], None)
    }

    fn from_files(
        dir: &Path,
        files: Vec<(PathBuf, super::Bytes)>,
        fp8_block: Option<(usize, usize)>,
    ) -> Result<Self> {
        let mut entries = HashMap::new();
        for (i, (path, bytes)) in files.iter().enumerate() {
            // `deserialize` checks the header length against the file and every tensor's
            // offsets against the data section, before anything is allocated from them.
            let st = safetensors::SafeTensors::deserialize(bytes)
                .map_err(|e| Error::format(path, format!("not a valid safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let data = view.data();
                let start = data.as_ptr() as usize - bytes.as_ptr() as usize;
                entries.insert(
                    canonical_name(name),
                    Entry {
                        file: i,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + data.len(),
                    },
                );
            }
        }
        Ok(SafetensorsStore {
            dir: dir.to_path_buf(),
            files,
            entries,
            fp8_block,
        })
    }

    /// Names of every tensor, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.entries.keys().cloned().collect();
        n.sort();
        n
    }

    /// The file that holds tensor `name` (for errors about its values).
    pub fn file_holding(&self, name: &str) -> Option<&Path> {
        self.entries.get(name).map(|e| self.file_of(e))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries.get(name).ok_or_else(|| {
            // The one file, or the directory of the shards.
            let at = match self.files.as_slice() {
                [(path, _)] => path.as_path(),
                _ => self.dir.as_path(),
            };
            Error::format(
                at,
                format!("tensor `{name}` not found in the safetensors files"),
            )
        })
    }

    fn file_of(&self, e: &Entry) -> &Path {
        &self.files[e.file].0
    }

    /// The tensor as f32 with its stored shape; FP8 weights are multiplied by their
    /// `_scale_inv` blocks (spec §1).
    pub fn load_f32(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        let path = self.file_of(e);
        let bytes = &self.files[e.file].1[e.start..e.end];
        let t = match e.dtype {
            Dtype::F32 => Tensor::from_raw_buffer(bytes, DType::F32, &e.shape, &Device::Cpu)?,
            Dtype::F16 => Tensor::from_raw_buffer(bytes, DType::F16, &e.shape, &Device::Cpu)?
                .to_dtype(DType::F32)?,
            Dtype::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, &e.shape, &Device::Cpu)?
                .to_dtype(DType::F32)?,
            Dtype::F8_E4M3 => return self.load_fp8(name, e, bytes),
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has dtype {other:?}; expected F32, F16, BF16 or F8_E4M3"
                    ),
                ))
            }
        };
        Ok(t)
    }

    fn load_fp8(&self, name: &str, e: &Entry, bytes: &[u8]) -> Result<Tensor> {
        let path = self.file_of(e);
        let (rows, cols) = match e.shape[..] {
            [r, c] => (r, c),
            _ => {
                return Err(Error::format(
                    path,
                    format!("FP8 tensor `{name}` must be 2-D, has shape {:?}", e.shape),
                ))
            }
        };
        let (br, bc) = self.fp8_block.ok_or_else(|| {
            Error::format(path, format!("tensor `{name}` is FP8 but config.json has no quantization_config.weight_block_size"))
        })?;
        let scale_name = format!("{name}_scale_inv");
        let scale = self.load_f32(&scale_name)?;
        let want = [rows.div_ceil(br), cols.div_ceil(bc)];
        if scale.dims() != want {
            return Err(shape_error(
                self.file_of(self.entry(&scale_name)?),
                &scale_name,
                &want,
                scale.dims(),
            ));
        }
        let scale = scale.flatten_all()?.to_vec1::<f32>()?;
        let lut = fp8_e4m3_table();
        let mut out = Vec::with_capacity(rows * cols);
        for i in 0..rows {
            let srow = &scale[(i / br) * want[1]..(i / br + 1) * want[1]];
            out.extend(
                bytes[i * cols..(i + 1) * cols]
                    .iter()
                    .enumerate()
                    .map(|(j, &b)| lut[b as usize] * srow[j / bc]),
            );
        }
        Ok(Tensor::from_vec(out, (rows, cols), &Device::Cpu)?)
    }

    fn checked(&self, name: &str, want: &[usize]) -> Result<Tensor> {
        let e = self.entry(name)?;
        if e.shape != want {
            return Err(shape_error(self.file_of(e), name, want, &e.shape));
        }
        self.load_f32(name)
    }

    /// The stored dtype of a tensor.
    pub fn dtype(&self, name: &str) -> Option<Dtype> {
        self.entries.get(name).map(|e| e.dtype)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }
}

/// Little-endian values of `W` bytes into f32, in parallel chunks (generic, so the
/// conversion inlines into the loop).
fn convert_into<const W: usize>(out: &mut [f32], bytes: &[u8], f: impl Fn([u8; W]) -> f32 + Sync) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 16;
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * W))
        .for_each(|(o, b)| {
            for (v, x) in o.iter_mut().zip(b.chunks_exact(W)) {
                *v = f(x.try_into().expect("chunk of W bytes"));
            }
        });
}

/// Writes `tensors` (with string metadata) as a safetensors file, all at once: staged
/// and renamed by [`crate::staging::write_file`], so a kill leaves the old file or the
/// new one and no stray temporary, and the file gets the usual mode.
pub fn write<'a, S: AsRef<str> + Ord + std::fmt::Display>(
    path: &Path,
    tensors: impl IntoIterator<Item = (S, &'a Tensor)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    crate::staging::write_file(path, |tmp| {
        safetensors::serialize_to_file(tensors, metadata, tmp)
            .map_err(|e| Error::format(path, format!("cannot write: {e}")))
    })
}

/// All 256 e4m3fn values (1 sign, 4 exponent bits with bias 7, 3 mantissa bits, no
/// infinities, 0x7f/0xff are NaN).
pub fn fp8_e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (b, v) in t.iter_mut().enumerate() {
        let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
        let exp = ((b >> 3) & 0xf) as i32;
        let man = (b & 0x7) as f32;
        *v = if b & 0x7f == 0x7f {
            f32::NAN
        } else if exp == 0 {
            sign * man / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
        };
    }
    t
}

impl WeightStore for SafetensorsStore {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// f16/bf16 weights stay half precision, on the kernels (their values exactly, half the
    /// memory and bandwidth of f32: what HF checkpoints ship); gates training widens them
    /// ([`crate::model::Decoder::widen_half_precision`]). Others load as f32.
    fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        let e = self.entry(name)?;
        let ty = match e.dtype {
            Dtype::F16 => so8t_kernels::QType::F16,
            Dtype::BF16 => so8t_kernels::QType::BF16,
            _ => return Ok(Matrix::Dense(self.checked(name, &[rows, cols])?)),
        };
        if e.shape != [rows, cols] {
            return Err(shape_error(self.file_of(e), name, &[rows, cols], &e.shape));
        }
        let bytes = self.files[e.file].1[e.start..e.end].to_vec();
        let m = so8t_kernels::QMatrix::new(ty, rows, cols, bytes)
            .map_err(|err| Error::format(self.file_of(e), format!("tensor `{name}`: {err}")))?;
        Ok(Matrix::Quant(std::sync::Arc::new(m)))
    }

    fn is_half_precision(&self, name: &str) -> bool {
        matches!(self.dtype(name), Some(Dtype::F16 | Dtype::BF16))
    }

    fn vector(&self, name: &str, len: usize) -> Result<Tensor> {
        self.checked(name, &[len])
    }

    fn embedding(&self, name: &str, rows: usize, cols: usize) -> Result<Embedding> {
        Ok(Embedding::Dense(self.checked(name, &[rows, cols])?))
    }

    fn dense(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.checked(name, shape)
    }

    /// Straight from the mapped bytes into one f32 vector, in parallel: no intermediate
    /// tensors (export of a 0.5B model spent most of its time copying them).
    fn dense_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        if e.shape != shape {
            return Err(shape_error(self.file_of(e), name, shape, &e.shape));
        }
        let bytes = &self.files[e.file].1[e.start..e.end];
        let width = match e.dtype {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
            _ => return Ok(self.checked(name, shape)?.flatten_all()?.to_vec1::<f32>()?),
        };
        let n: usize = shape.iter().product();
        if bytes.len() != n * width {
            return Err(Error::format(
                self.file_of(e),
                format!(
                    "tensor `{name}` holds {} bytes, expected {}",
                    bytes.len(),
                    n * width
                ),
            ));
        }
        let mut out = vec![0f32; n];
        match e.dtype {
            Dtype::F32 => convert_into(&mut out, bytes, |b: [u8; 4]| f32::from_le_bytes(b)),
            Dtype::F16 => convert_into(&mut out, bytes, |b: [u8; 2]| {
                half::f16::from_le_bytes(b).to_f32()
            }),
            _ => convert_into(&mut out, bytes, |b: [u8; 2]| {
                half::bf16::from_le_bytes(b).to_f32()
            }),
        }
        Ok(out)
    }

    fn dtype_counts(&self) -> Vec<(String, usize)> {
        let mut m: BTreeMap<String, usize> = BTreeMap::new();
        for e in self.entries.values() {
            *m.entry(format!("{:?}", e.dtype)).or_default() += 1;
        }
        m.into_iter().collect()
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort();
        v
    }

    fn size(&self) -> (usize, u64) {
        self.entries.values().fold((0, 0), |(p, b), e| {
            (
                p + e.shape.iter().product::<usize>(),
                b + (e.end - e.start) as u64,
            )
        })
    }
}
