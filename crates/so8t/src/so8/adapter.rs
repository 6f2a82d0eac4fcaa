//! The SO8T checkpoint files (spec §7): `so8t_config.json` and `so8t_adapter.safetensors`
//! beside an untouched base model, and the triality heads (spec §5).

use super::algebra::N_GEN;
use super::gates::{site_rotation, Granularity, SiteShape};
use crate::config::ModelConfig;
use crate::error::{Error, InFile, Result};
use crate::model::{BlockRotation, Decoder, Site};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

pub const CONFIG_FILE: &str = "so8t_config.json";
pub const ADAPTER_FILE: &str = "so8t_adapter.safetensors";
pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BaseInfo {
    pub architecture: String,
    /// Where the base came from when converted (informational).
    pub source: String,
    /// sha256 over the base files in this directory; see [`base_checksum`].
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Labels {
    pub safety: [String; 2],
    pub authority: [String; 2],
}

impl Default for Labels {
    fn default() -> Self {
        Labels {
            safety: ["safe".into(), "unsafe".into()],
            authority: ["handle".into(), "escalate".into()],
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct InitInfo {
    /// "zero" or "random".
    pub kind: String,
    pub seed: Option<u64>,
    /// Generator entries are drawn uniformly from [−scale, scale].
    pub scale: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct So8tConfig {
    pub version: u32,
    pub base: BaseInfo,
    pub sites: Vec<Site>,
    pub granularity: Granularity,
    /// In application order: the gate is R = R_last · … · R_first.
    pub factors: Vec<String>,
    pub labels: Labels,
    pub heads_trained: bool,
    pub init: InitInfo,
    /// Decision thresholds on p(unsafe) and p(escalate) (spec §5 policy).
    #[serde(default = "default_thresholds")]
    pub thresholds: Thresholds,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    #[serde(rename = "unsafe")]
    pub unsafe_: f32,
    pub escalate: f32,
}

fn default_thresholds() -> Thresholds {
    Thresholds {
        unsafe_: 0.5,
        escalate: 0.5,
    }
}

impl So8tConfig {
    pub fn read(dir: &Path) -> Result<So8tConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let c: So8tConfig = serde_json::from_str(&text).in_file(&path)?;
        if c.version != FORMAT_VERSION {
            return Err(Error::format(
                &path,
                format!(
                    "version {} is not supported (expected {FORMAT_VERSION})",
                    c.version
                ),
            ));
        }
        if c.factors.is_empty() {
            return Err(Error::format(
                &path,
                "factors must name at least one factor",
            ));
        }
        Ok(c)
    }

    /// Refuses a directory whose base files no longer hash to what conversion recorded.
    pub fn check_base(&self, dir: &Path) -> Result<()> {
        let sum = base_checksum(dir)?;
        if sum != self.base.sha256 {
            return Err(Error::format(
                dir,
                format!("the base model changed since conversion (sha256 {sum}, so8t_config.json records {})", self.base.sha256),
            ));
        }
        Ok(())
    }
}

/// The policy of spec §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Refuse,
    Escalate,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Refuse => "refuse",
            Decision::Escalate => "escalate",
        }
    }
}

impl So8tConfig {
    /// `refuse` if any verdict is unsafe, else `escalate` if any escalates, else `allow`;
    /// `None` while the heads are untrained (they sit at p = 0.5 and mean nothing).
    pub fn decide(&self, verdicts: &[Verdict]) -> Option<Decision> {
        if !self.heads_trained {
            return None;
        }
        let t = &self.thresholds;
        Some(if verdicts.iter().any(|v| v.p_unsafe >= t.unsafe_) {
            Decision::Refuse
        } else if verdicts.iter().any(|v| v.p_escalate >= t.escalate) {
            Decision::Escalate
        } else {
            Decision::Allow
        })
    }
}

pub fn generator_name(layer: usize, site: Site, factor: &str) -> String {
    format!("layers.{layer}.{}.{factor}.generators", site.name())
}

/// sha256 over `config.json` and the weight files (`model.safetensors`, its shards and
/// their index), in name order, each as its name, a NUL, its bytes. Changing any weight or
/// the architecture changes it; tokenizer files and SO8T files do not count.
pub fn base_checksum(dir: &Path) -> Result<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n == "config.json" || super::convert::is_weight_file(n))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for n in names {
        let path = dir.join(&n);
        h.update(n.as_bytes());
        h.update([0u8]);
        let mut f = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        loop {
            let k = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
            if k == 0 {
                break;
            }
            h.update(&buf[..k]);
        }
    }
    Ok(format!("{:x}", h.finalize()))
}

/// Safety and authority heads: `Linear(hidden, 2)` with bias on the final normed hidden state.
#[derive(Clone, Debug)]
pub struct Heads {
    pub safety_w: Tensor,
    pub safety_b: Tensor,
    pub authority_w: Tensor,
    pub authority_b: Tensor,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Verdict {
    pub p_unsafe: f32,
    pub p_escalate: f32,
}

impl Verdict {
    /// Each probability's larger value: the verdict of a span of tokens is its worst.
    pub fn max(self, other: Verdict) -> Verdict {
        Verdict {
            p_unsafe: self.p_unsafe.max(other.p_unsafe),
            p_escalate: self.p_escalate.max(other.p_escalate),
        }
    }
}

impl Heads {
    /// File and metadata names of the four tensors, in a fixed order.
    pub const NAMES: [&'static str; 4] = [
        "heads.safety.weight",
        "heads.safety.bias",
        "heads.authority.weight",
        "heads.authority.bias",
    ];

    pub fn tensors(&self) -> [(&'static str, &Tensor); 4] {
        let [a, b, c, d] = Self::NAMES;
        [
            (a, &self.safety_w),
            (b, &self.safety_b),
            (c, &self.authority_w),
            (d, &self.authority_b),
        ]
    }

    /// Heads from a lookup by name (f32).
    pub fn from_named(mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<Heads> {
        let [a, b, c, d] = Self::NAMES;
        Ok(Heads {
            safety_w: get(a)?.to_dtype(DType::F32)?,
            safety_b: get(b)?.to_dtype(DType::F32)?,
            authority_w: get(c)?.to_dtype(DType::F32)?,
            authority_b: get(d)?.to_dtype(DType::F32)?,
        })
    }

    /// `[2, hidden]` weights and `[2]` biases; names the first mismatch.
    pub fn check_shapes(&self, hidden: usize, path: &Path) -> Result<()> {
        for (name, t) in self.tensors() {
            let want: &[usize] = if name.ends_with(".weight") {
                &[2, hidden]
            } else {
                &[2]
            };
            if t.dims() != want {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {want:?}",
                        t.dims()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Shapes, and no NaN or Inf: what a runtime needs before trusting a verdict.
    pub fn check(&self, hidden: usize, path: &Path) -> Result<()> {
        self.check_shapes(hidden, path)?;
        for (name, t) in self.tensors() {
            if t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` holds NaN or Inf"),
                ));
            }
        }
        Ok(())
    }

    pub fn zeros(hidden: usize) -> Result<Heads> {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu);
        Ok(Heads {
            safety_w: z(&[2, hidden])?,
            safety_b: z(&[2])?,
            authority_w: z(&[2, hidden])?,
            authority_b: z(&[2])?,
        })
    }

    /// p(class 1) of each head for hidden states `[rows, hidden]` (or one `[hidden]`).
    pub fn verdicts(&self, hidden: &Tensor) -> Result<Vec<Verdict>> {
        let h = if hidden.rank() == 1 {
            hidden.unsqueeze(0)?
        } else {
            hidden.clone()
        };
        let p1 = |w: &Tensor, b: &Tensor| -> candle_core::Result<Vec<f32>> {
            let logits = h.matmul(&w.t()?)?.broadcast_add(b)?;
            candle_nn::ops::softmax_last_dim(&logits)?
                .narrow(1, 1, 1)?
                .squeeze(1)?
                .to_vec1::<f32>()
        };
        let unsafe_ = p1(&self.safety_w, &self.safety_b)?;
        let escalate = p1(&self.authority_w, &self.authority_b)?;
        Ok(unsafe_
            .into_iter()
            .zip(escalate)
            .map(|(p_unsafe, p_escalate)| Verdict {
                p_unsafe,
                p_escalate,
            })
            .collect())
    }
}

/// Generators and heads, as read from or written to `so8t_adapter.safetensors`.
pub struct Adapter {
    pub generators: HashMap<String, Tensor>,
    pub heads: Heads,
}

impl Adapter {
    /// Generators for every (layer, site, factor) of `cfg`, zero or uniform in
    /// [−scale, scale] from `seed`; heads at zero (p = 0.5, marked untrained).
    pub fn init(
        model: &ModelConfig,
        cfg: &So8tConfig,
        random: Option<(u64, f64)>,
    ) -> Result<Adapter> {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = random.map(|(seed, _)| StdRng::seed_from_u64(seed));
        let mut generators = HashMap::new();
        for l in 0..model.num_layers {
            for &site in &cfg.sites {
                let n = SiteShape::of(model, site)?.generators(site, cfg.granularity);
                for f in &cfg.factors {
                    let data: Vec<f32> = match (&mut rng, random) {
                        (Some(r), Some((_, scale))) => (0..n * N_GEN)
                            .map(|_| r.random_range(-scale..scale) as f32)
                            .collect(),
                        _ => vec![0.0; n * N_GEN],
                    };
                    generators.insert(
                        generator_name(l, site, f),
                        Tensor::from_vec(data, (n, N_GEN), &Device::Cpu)?,
                    );
                }
            }
        }
        Ok(Adapter {
            generators,
            heads: Heads::zeros(model.hidden_size)?,
        })
    }

    pub fn read(dir: &Path) -> Result<Adapter> {
        let path = dir.join(ADAPTER_FILE);
        if !path.exists() {
            return Err(Error::format(
                &path,
                "missing (an SO8T directory needs its adapter)",
            ));
        }
        let mut t = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            Error::format(
                &path,
                format!(
                    "not a valid safetensors file: {}",
                    crate::error::candle_message(&e)
                ),
            )
        })?;
        let heads = Heads::from_named(|name| {
            t.remove(name)
                .ok_or_else(|| Error::format(&path, format!("missing tensor `{name}`")))
        })?;
        let mut generators = HashMap::new();
        for (k, v) in t {
            generators.insert(k, v.to_dtype(DType::F32)?);
        }
        Ok(Adapter { generators, heads })
    }

    pub fn write(&self, path: &Path) -> Result<()> {
        let mut all: HashMap<String, Tensor> = self.generators.clone();
        all.extend(
            self.heads
                .tensors()
                .map(|(n, t)| (n.to_string(), t.clone())),
        );
        candle_core::safetensors::save(&all, path)
            .map_err(|e| Error::format(path, crate::error::candle_message(&e)))
    }

    /// Every tensor's shape against the base config; names each mismatch.
    pub fn check_shapes(&self, model: &ModelConfig, cfg: &So8tConfig, path: &Path) -> Result<()> {
        self.heads.check_shapes(model.hidden_size, path)?;
        let mut expected = 0;
        for l in 0..model.num_layers {
            for &site in &cfg.sites {
                let n = SiteShape::of(model, site)?.generators(site, cfg.granularity);
                for f in &cfg.factors {
                    let name = generator_name(l, site, f);
                    let t = self
                        .generators
                        .get(&name)
                        .ok_or_else(|| Error::format(path, format!("missing tensor `{name}`")))?;
                    if t.dims() != [n, N_GEN] {
                        return Err(Error::format(
                            path,
                            format!(
                                "tensor `{name}` has shape {:?}, expected [{n}, {N_GEN}]",
                                t.dims()
                            ),
                        ));
                    }
                    expected += 1;
                }
            }
        }
        if self.generators.len() != expected {
            let extra: Vec<&String> = self
                .generators
                .keys()
                .filter(|k| !k.starts_with("layers."))
                .take(3)
                .collect();
            return Err(Error::format(
                path,
                format!(
                    "{} generator tensors, expected {expected} from so8t_config.json {extra:?}",
                    self.generators.len()
                ),
            ));
        }
        Ok(())
    }

    /// The gate of one site of one layer, its factors composed in the config's order.
    /// The adapter must have passed `check_shapes`.
    pub fn rotation(
        &self,
        model: &ModelConfig,
        cfg: &So8tConfig,
        layer: usize,
        site: Site,
    ) -> Result<BlockRotation> {
        let factors: Vec<Tensor> = cfg
            .factors
            .iter()
            .map(|f| self.generators[&generator_name(layer, site, f)].clone())
            .collect();
        Ok(site_rotation(
            &factors,
            SiteShape::of(model, site)?,
            site,
            cfg.granularity,
        )?)
    }

    /// Every gate's matrices `[units, 8, 8]` in f64, for folding into weights (bake, export).
    pub fn fold_rotations(
        &self,
        model: &ModelConfig,
        cfg: &So8tConfig,
    ) -> Result<HashMap<(usize, Site), Tensor>> {
        let mut out = HashMap::new();
        for l in 0..model.num_layers {
            for &site in &cfg.sites {
                out.insert(
                    (l, site),
                    self.rotation(model, cfg, l, site)?
                        .matrices()?
                        .to_dtype(DType::F64)?,
                );
            }
        }
        Ok(out)
    }

    /// Puts every site's gate into the decoder.
    pub fn install(&self, decoder: &mut Decoder, cfg: &So8tConfig) -> Result<()> {
        let model = decoder.cfg.clone();
        for l in 0..model.num_layers {
            for &site in &cfg.sites {
                *decoder.gates[l].slot(site) = Some(self.rotation(&model, cfg, l, site)?);
            }
        }
        Ok(())
    }
}

pub fn is_so8t_dir(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).exists()
}
