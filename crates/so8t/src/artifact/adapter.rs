//! The SO8T checkpoint files (spec §7): `so8t_config.json` and `so8t_adapter.safetensors`
//! beside an untouched base model, and the triality heads (spec §5).

use crate::so8::algebra::N_GEN;
use crate::so8::gates::{site_rotation, Granularity, SiteShape};
use crate::so8::verdict::{Decision, Heads, HeadsConfig, ResponseJudge, Thresholds, Verdict, VerdictPosition};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{BlockRotation, Decoder, Site};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
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
    #[serde(default)]
    pub thresholds: Thresholds,
    /// Where each head reads (spec §5 "Where a head reads").
    #[serde(default)]
    pub heads: HeadsConfig,
    /// Where a prompt's verdict is read.
    #[serde(default)]
    pub verdict_position: VerdictPosition,
}

/// Largest generator entry an adapter may hold. A generator entry is an angle in
/// radians (spec §3) and training moves it by fractions of one; f32 resolves an angle of
/// 1e4 only to about 1e-3, so a larger entry carries nothing a trained one would: the
/// file is damaged. (The exponential itself stays orthogonal to 3e-7 up to 1e8 and breaks
/// down by 1e12, which is what `bake` used to write without a word.)
pub const GENERATOR_LIMIT: f32 = 1e4;

/// Factor names become tensor names (`layers.L.SITE.FACTOR.generators`): identifiers,
/// each once.
pub fn check_factors(factors: &[String]) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    match factors.iter().find(|f| {
        f.is_empty()
            || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            || !seen.insert(f.as_str())
    }) {
        Some(f) => Err(format!("factors must be distinct identifiers, got `{f}`")),
        None => Ok(()),
    }
}

impl So8tConfig {
    /// One verdict (a prompt's) reaches the unsafe threshold.
    pub fn is_unsafe(&self, v: Verdict) -> bool {
        self.thresholds.prompt_unsafe(v)
    }

    /// The policy of spec §5 ([`Thresholds::decide`]); `None` while the heads are
    /// untrained (they sit at p = 0.5 and mean nothing).
    pub fn decide(&self, prompt: Option<Verdict>, response: &ResponseJudge) -> Option<Decision> {
        self.heads_trained.then(|| self.thresholds.decide(prompt, response))
    }
}

impl So8tConfig {
    pub fn read(dir: &Path) -> Result<So8tConfig> {
        let path = dir.join(CONFIG_FILE);
        let text = crate::files::read_text(&path, crate::files::SETTINGS_LIMIT)?;
        let c: So8tConfig = crate::error::parse_json(&text, &path)?;
        if c.version != FORMAT_VERSION {
            return Err(Error::format(
                &path,
                format!(
                    "version {} is not supported (expected {FORMAT_VERSION})",
                    c.version
                ),
            ));
        }
        c.check(&path)?;
        Ok(c)
    }

    /// What every reader of a config (directory, baked heads, GGUF metadata) requires;
    /// errors name `path`.
    pub fn check(&self, path: &Path) -> Result<()> {
        if self.factors.is_empty() {
            return Err(Error::format(
                path,
                "factors must name at least one factor",
            ));
        }
        check_factors(&self.factors).map_err(|e| Error::format(path, e))?;
        let t = &self.thresholds;
        let named = [
            ("unsafe", Some(t.unsafe_)),
            ("escalate", Some(t.escalate)),
            ("response_unsafe", t.response_unsafe),
            ("response_escalate", t.response_escalate),
        ];
        if let Some((name, Some(bad))) = named
            .into_iter()
            .find(|(_, p)| p.is_some_and(|p| !(0.0..=1.0).contains(&p)))
        {
            return Err(Error::format(
                path,
                format!("thresholds.{name} must be a probability in [0, 1], got {bad}"),
            ));
        }
        if t.consecutive == 0 {
            return Err(Error::format(
                path,
                "thresholds.consecutive must be at least 1 (tokens in a row that flag an answer)",
            ));
        }
        Ok(())
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
        .filter(|n| n == "config.json" || crate::formats::source::is_weight_file(n))
        .collect();
    names.sort();
    crate::files::sha256_named(dir, &names)
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
        crate::formats::safetensors::write(path, &all, None)
    }

    /// The adapter at `path` against the base and the settings beside it: every tensor's
    /// shape (each mismatch named), heads finite, generators finite and within
    /// [`GENERATOR_LIMIT`], and the heads' layers (every reader of an SO8T directory
    /// comes through here).
    pub fn check_shapes(&self, model: &ModelConfig, cfg: &So8tConfig, path: &Path) -> Result<()> {
        cfg.heads
            .check(model.num_layers, &path.with_file_name(CONFIG_FILE))?;
        self.heads.check(model.hidden_size, path)?;
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
                    let big = t
                        .flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .find(|x| !(x.abs() <= GENERATOR_LIMIT));
                    if let Some(x) = big {
                        return Err(Error::format(
                            path,
                            format!("tensor `{name}` holds {x}: generators must be finite and within ±{GENERATOR_LIMIT}"),
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
                let r = self.rotation(&model, cfg, l, site)?;
                // NaN, Inf or huge generators (1e30) give a rotation that is not a
                // number; the model would answer with NaN verdicts instead of an error.
                let finite = r
                    .matrices()?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|x| x.is_finite());
                if !finite {
                    return Err(Error::Invalid(format!(
                        "{ADAPTER_FILE}: the generators of layer {l} site {} give a rotation that is not finite (NaN, Inf or far too large generators)",
                        site.name()
                    )));
                }
                *decoder.gates[l].slot(site) = Some(r);
            }
        }
        Ok(())
    }
}

pub fn is_so8t_dir(path: &Path) -> bool {
    path.is_dir() && path.join(CONFIG_FILE).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_follow_the_policy() {
        let mut c: So8tConfig = serde_json::from_str(
            r#"{"version":1,"base":{"architecture":"llama","source":"x","sha256":"0"},
                "sites":["q"],"granularity":"shared","factors":["safe"],
                "labels":{"safety":["safe","unsafe"],"authority":["handle","escalate"]},
                "heads_trained":true,"init":{"kind":"zero","seed":null,"scale":null},
                "thresholds":{"unsafe":0.5,"escalate":0.6}}"#,
        )
        .unwrap();
        // a config from before the streaming rule and head layers reads with their defaults
        assert_eq!(c.thresholds.consecutive, 2);
        assert_eq!(c.heads.layers(30), [30, 30]);
        assert_eq!(c.verdict_position, VerdictPosition::AssistantHeader);
        let quiet = ResponseJudge::default();
        let mut loud = ResponseJudge::default();
        loud.push(Verdict::new(0.9, 0.0), &c.thresholds);
        loud.push(Verdict::new(0.9, 0.0), &c.thresholds);
        assert_eq!(c.decide(Some(Verdict::new(0.1, 0.1)), &quiet), Some(Decision::Allow));
        assert_eq!(c.decide(Some(Verdict::new(0.1, 0.7)), &quiet), Some(Decision::Escalate));
        assert_eq!(c.decide(Some(Verdict::new(0.6, 0.7)), &quiet), Some(Decision::Refuse));
        assert_eq!(c.decide(Some(Verdict::new(0.1, 0.1)), &loud), Some(Decision::Refuse));
        c.heads_trained = false;
        assert_eq!(c.decide(Some(Verdict::new(0.9, 0.9)), &loud), None);
        c.heads.safety.layer = Some(31);
        assert!(c.heads.check(30, Path::new("so8t_config.json")).is_err());
    }
}
