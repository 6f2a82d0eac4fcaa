//! Hidden states kept between training runs (`train --features-cache DIR`). The pass over
//! the data is nearly all of a heads fit's time (25 minutes of 28 for SmolLM2 on two
//! cores); refitting with another weight decay, answer weight or threshold rule should
//! not repeat it. An entry is found by a key over everything the states depend on: the
//! base weights, the gates' generators, the weight quantisation, the token ids and read
//! positions of every row (so the data, tokenizer and chat template), the layers and the
//! answer-token cap. Anything else changed makes a new key, never a stale hit. Each file
//! of the data (`--data` repeated) has its own entry, so a file added to the data costs
//! only its own pass.

use super::{Sample, SampleKind};
use crate::error::{Error, Result};
use crate::artifact::adapter::{base_checksum, Adapter, So8tConfig};
use crate::so8::verdict::VerdictPosition;
use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Bumped whenever what a cached state means changes (the tap's definition, the sample
/// encoding), so old entries stop matching.
const FORMAT: &str = "so8t-features-2";

pub struct FeatureCache {
    dir: PathBuf,
    model_key: String,
}

/// What a cache entry holds: the samples and, per layer, `[samples, hidden]` row-major.
pub struct Cached {
    pub samples: Vec<Sample>,
    pub x: Vec<Vec<f32>>,
}

impl FeatureCache {
    /// A cache in `dir` for the model in `model_dir` with `adapter`'s gates placed as
    /// `config` says, its weights quantised to `quant` (`None`: as stored). Reads the base
    /// weights once to hash them.
    pub fn new(
        dir: &Path,
        model_dir: &Path,
        config: &So8tConfig,
        adapter: &Adapter,
        quant: Option<&str>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut h = Sha256::new();
        // Every variable-length part is preceded by its length: no two keys' inputs can
        // run into each other.
        let part = |h: &mut Sha256, bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        part(&mut h, FORMAT.as_bytes());
        part(&mut h, env!("CARGO_PKG_VERSION").as_bytes());
        part(&mut h, base_checksum(model_dir)?.as_bytes());
        part(&mut h, quant.unwrap_or("as stored").as_bytes());
        // Where the gates sit and the order their factors multiply in (R_last·…·R_first).
        let placement = serde_json::json!({
            "sites": config.sites,
            "granularity": config.granularity,
            "factors": config.factors,
        });
        part(&mut h, placement.to_string().as_bytes());
        let mut names: Vec<&String> = adapter.generators.keys().collect();
        names.sort();
        for n in names {
            part(&mut h, n.as_bytes());
            let v = adapter.generators[n].flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            h.update((v.len() as u64).to_le_bytes());
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        Ok(FeatureCache {
            dir: dir.to_path_buf(),
            model_key: format!("{:x}", h.finalize()),
        })
    }

    /// The entry's file for these ids, read positions, layers and cap (one data file's).
    pub fn path(
        &self,
        ids: &[Vec<u32>],
        positions: &[super::features::Positions],
        layers: &[usize],
        cap: Option<usize>,
    ) -> PathBuf {
        let mut h = Sha256::new();
        h.update(&self.model_key);
        h.update((layers.len() as u64).to_le_bytes());
        for l in layers {
            h.update((*l as u64).to_le_bytes());
        }
        h.update(cap.map_or(u64::MAX, |c| c as u64).to_le_bytes());
        for (seq, p) in ids.iter().zip(positions) {
            h.update((seq.len() as u64).to_le_bytes());
            for t in seq {
                h.update(t.to_le_bytes());
            }
            for at in [p.assistant_header, p.user_end, p.response.len()]
                .into_iter()
                .chain(p.response.iter().copied())
            {
                h.update((at as u64).to_le_bytes());
            }
        }
        let key = format!("{:x}", h.finalize());
        self.dir.join(format!("features-{}.safetensors", &key[..32]))
    }

    /// The entry at `path` if there is one that fits (`rows` examples, `layers`, `hidden`
    /// wide); an unreadable or ill-fitting file is reported and treated as absent.
    pub fn load(path: &Path, rows: usize, layers: &[usize], hidden: usize) -> Option<Cached> {
        if !path.exists() {
            return None;
        }
        match Self::read(path, rows, layers, hidden) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!("{}: {e}; computing the hidden states again", path.display());
                None
            }
        }
    }

    fn read(path: &Path, rows: usize, layers: &[usize], hidden: usize) -> Result<Cached> {
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::format(path, e.to_string()))?;
        let bad = |what: String| Error::format(path, what);
        let samples = t
            .remove("samples")
            .ok_or_else(|| bad("no `samples` tensor".into()))?;
        let n = match samples.dims() {
            [n, 2] if samples.dtype() == DType::U32 => *n,
            d => return Err(bad(format!("`samples` is {:?} {d:?}, expected u32 [n, 2]", samples.dtype()))),
        };
        let mut out = Vec::with_capacity(n);
        for s in samples.to_vec2::<u32>()? {
            let row = s[0] as usize;
            if row >= rows {
                return Err(bad(format!("sample of row {row}, but the data has {rows} rows")));
            }
            let kind = match s[1] {
                // `token as u32 + 2`: see `store`
                0 => SampleKind::Prompt(VerdictPosition::AssistantHeader),
                1 => SampleKind::Prompt(VerdictPosition::UserEnd),
                c => SampleKind::Response { token: c as usize - 2 },
            };
            out.push(Sample { row, kind });
        }
        let mut x = Vec::with_capacity(layers.len());
        for l in layers {
            let name = format!("layer.{l}");
            let v = t.remove(&name).ok_or_else(|| bad(format!("no `{name}` tensor")))?;
            if v.dims() != [n, hidden] || v.dtype() != DType::F32 {
                return Err(bad(format!(
                    "`{name}` is {:?} {:?}, expected f32 [{n}, {hidden}]",
                    v.dtype(),
                    v.dims()
                )));
            }
            x.push(v.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Cached { samples: out, x })
    }

    /// Writes an entry (to a temporary name renamed into place).
    pub fn store(path: &Path, layers: &[usize], hidden: usize, c: &Cached) -> Result<()> {
        let n = c.samples.len();
        let codes: Vec<u32> = c
            .samples
            .iter()
            .flat_map(|s| {
                let code = match s.kind {
                    SampleKind::Prompt(VerdictPosition::AssistantHeader) => 0,
                    SampleKind::Prompt(VerdictPosition::UserEnd) => 1,
                    // A token index near 2^32 cannot occur: the context is far shorter.
                    SampleKind::Response { token } => u32::try_from(token + 2).unwrap_or(u32::MAX),
                };
                [s.row as u32, code]
            })
            .collect();
        let mut t = HashMap::new();
        t.insert("samples".to_string(), Tensor::from_vec(codes, (n, 2), &Device::Cpu)?);
        for (l, x) in layers.iter().zip(&c.x) {
            t.insert(format!("layer.{l}"), Tensor::from_slice(x, (n, hidden), &Device::Cpu)?);
        }
        crate::formats::safetensors::write(path, &t, None)
    }
}
