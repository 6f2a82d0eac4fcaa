//! The GGUF header (magic, metadata, tensor table) read from untrusted bytes into
//! candle's `Content`, with the rules llama.cpp's `gguf_init_from_file` enforces and
//! candle's reader does not: the little-endian magic only, no duplicate key or tensor
//! name (else tools disagree on which one counts), `general.alignment` a power of two,
//! every tensor offset aligned and its data inside the file. Every count and length is checked
//! against the bytes left before anything is allocated for it.

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use std::collections::HashMap;

/// llama.cpp's limits (ggml/src/gguf.cpp; GGML_MAX_DIMS).
const MAX_DIMS: u32 = 4;
const MAX_DEPTH: usize = 8;
const DEFAULT_ALIGNMENT: u64 = 32;

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type Res<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Res<&'a [u8]> {
        let left = (self.bytes.len() - self.pos) as u64;
        if n > left {
            return Err(format!(
                "{what} needs {n} bytes at offset {} but only {left} remain (truncated?)",
                self.pos
            ));
        }
        let s = &self.bytes[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Res<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Res<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Res<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length.
    fn len(&mut self, what: &str) -> Res<u64> {
        self.u64(what)
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.pos) as u64
    }

    fn string(&mut self, what: &str) -> Res<String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not UTF-8"))
    }

    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Res<Value> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("{what}: bool byte {b} (expected 0 or 1)")),
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("{what}: arrays nested deeper than {MAX_DEPTH}"));
                }
                let item = self.u32(what)?;
                let n = self.len(what)?;
                let min = match item {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    10..=12 => 8,
                    8 => 8,
                    9 => 12,
                    t => return Err(format!("{what}: unknown array item type {t}")),
                };
                if n.saturating_mul(min) > self.left() {
                    return Err(format!(
                        "{what}: array of {n} items needs at least {} bytes but only {} remain",
                        n.saturating_mul(min),
                        self.left()
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => return Err(format!("{what}: unknown value type {t}")),
        })
    }
}

/// The header of the GGUF file `bytes`; errors name the field.
pub fn read(bytes: &[u8]) -> Res<Content> {
    let mut r = Reader { bytes, pos: 0 };
    let magic = r.array::<4>("magic")?;
    if &magic != b"GGUF" {
        return Err(if &magic == b"FUGG" {
            "magic is byte-swapped (`FUGG`: a big-endian GGUF); only little-endian files are supported".into()
        } else {
            format!("magic is {magic:02x?}, expected `GGUF`")
        });
    }
    let version = r.u32("version")?;
    // Version 1 (u32 counts) is refused, as llama.cpp refuses it: nothing has written
    // it since 2023, and a reader nobody exercises is attack surface.
    let magic = match version {
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        1 => return Err("version is 1, which is no longer supported (as in llama.cpp); expected 2 or 3".into()),
        v => return Err(format!("version is {v}, expected 2 or 3")),
    };
    let n_tensors = r.len("tensor_count")?;
    let n_kv = r.len("metadata_kv_count")?;
    // A key/value pair takes at least 13 bytes (v2+), a tensor entry at least 24.
    if n_kv.saturating_mul(13).saturating_add(n_tensors.saturating_mul(24)) > r.left() {
        return Err(format!(
            "header declares {n_tensors} tensors and {n_kv} metadata entries, more than the {} bytes left can hold",
            r.left()
        ));
    }
    let mut metadata = HashMap::with_capacity(n_kv as usize);
    for i in 0..n_kv {
        let key = r.string(&format!("metadata key #{i}"))?;
        let ty = r.u32(&format!("metadata `{key}` type"))?;
        let value = r.value(ty, &format!("metadata `{key}`"), 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(Value::U32(a)) if a.is_power_of_two() => u64::from(*a),
        Some(v) => {
            return Err(format!(
                "metadata `general.alignment` is {v:?}, expected a u32 power of two"
            ))
        }
    };
    let mut tensor_infos = HashMap::with_capacity(n_tensors as usize);
    // (name, data offset, bytes), in file order, for the bounds check once the data
    // section's start is known.
    let mut extents = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let name = r.string(&format!("tensor #{i} name"))?;
        let what = format!("tensor `{name}`");
        let n_dims = r.u32(&what)?;
        if n_dims > MAX_DIMS {
            return Err(format!("{what}: {n_dims} dimensions, at most {MAX_DIMS} allowed"));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.len(&what)?;
            dims.push(usize::try_from(d).map_err(|_| format!("{what}: dimension {d} too large"))?);
        }
        // ggml keeps element counts in int64_t.
        if dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&e| e <= i64::MAX as usize)
            .is_none()
        {
            return Err(format!("{what}: shape {dims:?} overflows"));
        }
        let t = r.u32(&what)?;
        let ggml_dtype = super::ggml_dtype(t).ok_or_else(|| format!("{what}: ggml type {t} is not supported"))?;
        let row = dims.first().copied().unwrap_or(1);
        if row % ggml_dtype.block_size() != 0 {
            return Err(format!(
                "{what}: rows of {row} elements are not a multiple of the {ggml_dtype:?} block size {}",
                ggml_dtype.block_size()
            ));
        }
        let offset = r.u64(&what)?;
        if offset % alignment != 0 {
            return Err(format!(
                "{what}: data offset {offset} is not a multiple of the alignment {alignment}"
            ));
        }
        let elems: usize = dims.iter().product();
        let size = ((elems / ggml_dtype.block_size()) as u64)
            .saturating_mul(ggml_dtype.type_size() as u64);
        extents.push((name.clone(), offset, size));
        dims.reverse();
        let info = TensorInfo {
            ggml_dtype,
            shape: candle_core::Shape::from(dims),
            offset,
        };
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(format!("tensor name `{name}` appears twice"));
        }
    }
    let tensor_data_offset = (r.pos as u64).div_ceil(alignment) * alignment;
    let len = bytes.len() as u64;
    for (name, offset, size) in extents {
        let start = tensor_data_offset.saturating_add(offset);
        let end = start.saturating_add(size);
        if end > len {
            return Err(format!(
                "tensor `{name}` needs bytes {start}..{end} but the file has {len} (truncated?)"
            ));
        }
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v3 header: `kvs` as (key, type, value bytes), tensors as (name, dims, type, offset).
    fn header(kvs: &[(&str, u32, Vec<u8>)], tensors: &[(&str, &[u64], u32, u64)]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kvs.len() as u64).to_le_bytes());
        let s = |b: &mut Vec<u8>, t: &str| {
            b.extend((t.len() as u64).to_le_bytes());
            b.extend(t.as_bytes());
        };
        for (k, ty, v) in kvs {
            s(&mut b, k);
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, off) in tensors {
            s(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(off.to_le_bytes());
        }
        b.resize(b.len() + 4096, 0);
        b
    }

    fn align(a: u32) -> (&'static str, u32, Vec<u8>) {
        ("general.alignment", 4, a.to_le_bytes().to_vec())
    }

    fn err(b: &[u8]) -> String {
        read(b).expect_err("accepted a bad header")
    }

    #[test]
    fn a_sound_header_reads() {
        let c = read(&header(&[align(64)], &[("w", &[32, 2], 0, 0), ("v", &[64], 8, 256)])).unwrap();
        assert_eq!(c.tensor_infos["w"].shape.dims(), &[2, 32]);
        assert_eq!(c.tensor_data_offset % 64, 0);
    }

    #[test]
    fn alignment_must_be_a_u32_power_of_two() {
        assert!(err(&header(&[align(0)], &[])).contains("general.alignment"));
        assert!(err(&header(&[align(3)], &[])).contains("power of two"));
        let u64_align = ("general.alignment", 10, 32u64.to_le_bytes().to_vec());
        assert!(err(&header(&[u64_align], &[])).contains("u32"));
    }

    #[test]
    fn duplicates_are_refused() {
        let name = ("general.name", 8, [&4u64.to_le_bytes()[..], b"test"].concat());
        assert!(err(&header(&[name.clone(), name], &[])).contains("`general.name` appears twice"));
        let t = ("w", &[32u64][..], 0, 0);
        assert!(err(&header(&[], &[t, t])).contains("`w` appears twice"));
    }

    #[test]
    fn offsets_shapes_and_types_are_checked() {
        assert!(err(&header(&[], &[("w", &[32], 0, 4)])).contains("not a multiple of the alignment 32"));
        assert!(err(&header(&[], &[("w", &[33], 8, 0)])).contains("block size 32"));
        assert!(err(&header(&[], &[("w", &[1 << 40, 1 << 40], 0, 0)])).contains("overflows"));
        assert!(err(&header(&[], &[("w", &[32], 99, 0)])).contains("ggml type 99"));
        assert!(err(&header(&[], &[("w", &[1, 1, 1, 1, 1], 0, 0)])).contains("5 dimensions"));
        assert!(err(&header(&[], &[("w", &[1 << 20], 0, 0)])).contains("(truncated?)"));
    }

    #[test]
    fn magic_counts_and_lengths_are_checked() {
        let mut b = header(&[], &[]);
        b[..4].copy_from_slice(b"FUGG");
        assert!(err(&b).contains("byte-swapped"));
        let mut b = header(&[], &[]);
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("more than the"));
        // An array claiming more items than bytes left, and nesting without end.
        let arr = [&4u32.to_le_bytes()[..], &(1u64 << 40).to_le_bytes()].concat();
        assert!(err(&header(&[("a", 9, arr)], &[])).contains("array of"));
        let mut deep = Vec::new();
        for _ in 0..100 {
            deep.extend(9u32.to_le_bytes());
            deep.extend(1u64.to_le_bytes());
        }
        assert!(err(&header(&[("a", 9, deep)], &[])).contains("nested deeper"));
        for cut in [3, 10, 20, 30] {
            let b = header(&[align(32)], &[("w", &[32], 0, 0)]);
            assert!(read(&b[..cut]).is_err());
        }
    }
}
