//! The SO8T checkpoint files (spec §7): `so8t_config.json` and `so8t_adapter.safetensors`
//! beside an untouched base model, and the triality heads (spec §5).

use super::algebra::N_GEN;
use super::gates::{site_rotation, Granularity, SiteShape};
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

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    #[serde(rename = "unsafe")]
    pub unsafe_: f32,
    pub escalate: f32,
    /// The thresholds of the streaming rule on answer tokens, when they differ from the
    /// prompt's: a prompt's verdict and an answer token's come from other positions of
    /// the sequence and their scores are not on one scale (a refusal's tokens follow a
    /// harmful request). Absent: the prompt's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_unsafe: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_escalate: Option<f32>,
    /// Streaming rule (spec §5): an answer is judged unsafe (or escalated) once this many
    /// consecutive generated tokens reach the threshold.
    #[serde(default = "default_consecutive")]
    pub consecutive: usize,
}

impl Thresholds {
    /// The prompt's thresholds, [unsafe, escalate].
    pub fn prompt(&self) -> [f32; 2] {
        [self.unsafe_, self.escalate]
    }

    /// The streaming rule's thresholds on answer tokens, [unsafe, escalate].
    pub fn response(&self) -> [f32; 2] {
        [
            self.response_unsafe.unwrap_or(self.unsafe_),
            self.response_escalate.unwrap_or(self.escalate),
        ]
    }
}

fn default_consecutive() -> usize {
    2
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            unsafe_: 0.5,
            escalate: 0.5,
            response_unsafe: None,
            response_escalate: None,
            consecutive: default_consecutive(),
        }
    }
}

/// The layer one head reads: the residual stream after block `layer` (1..=L), RMS-normed
/// with unit weight; `None` (or L) is the final normed hidden state, the LM head's input.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeadSetting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeadsConfig {
    #[serde(default)]
    pub safety: HeadSetting,
    #[serde(default)]
    pub authority: HeadSetting,
}

impl HeadsConfig {
    /// The layers (1..=L) the safety and the authority head read, for a model of `n_layers`.
    pub fn layers(&self, n_layers: usize) -> [usize; 2] {
        [&self.safety, &self.authority].map(|h| h.layer.unwrap_or(n_layers))
    }

    /// Names the first layer outside 1..=L.
    pub fn check(&self, n_layers: usize, path: &Path) -> Result<()> {
        for (name, h) in [("safety", &self.safety), ("authority", &self.authority)] {
            if let Some(l) = h.layer {
                if l == 0 || l > n_layers {
                    return Err(Error::format(
                        path,
                        format!("heads.{name}.layer is {l}, expected 1..={n_layers} (the model has {n_layers} layers)"),
                    ));
                }
            }
        }
        Ok(())
    }
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

/// Which token of a prompt carries its verdict (spec §5).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VerdictPosition {
    /// The prompt's last token, after the chat template's assistant header: what the
    /// model sees right before it answers.
    #[default]
    AssistantHeader,
    /// The last token of the user's message.
    UserEnd,
}

impl VerdictPosition {
    pub fn name(self) -> &'static str {
        match self {
            VerdictPosition::AssistantHeader => "assistant_header",
            VerdictPosition::UserEnd => "user_end",
        }
    }

    /// The prompt token whose verdict is the prompt's, for `ids` = the chat prompt of
    /// `messages` ([`crate::tokenizer::TextTokenizer::chat_prompt`]): `None` for the last.
    pub fn index(
        self,
        tokenizer: &crate::tokenizer::TextTokenizer,
        messages: &[crate::chat::Message],
        ids: &[u32],
    ) -> Result<Option<usize>> {
        match self {
            VerdictPosition::AssistantHeader => Ok(None),
            VerdictPosition::UserEnd => Ok(Some(tokenizer.user_end_index(messages, ids)?)),
        }
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
    /// One verdict (a prompt's) reaches the unsafe threshold.
    pub fn is_unsafe(&self, v: Verdict) -> bool {
        v.p_unsafe >= self.thresholds.unsafe_
    }

    /// The policy of spec §5: `refuse` if the prompt is unsafe or the answer's streaming
    /// rule fired for unsafe, else `escalate` likewise, else `allow`; `None` while the
    /// heads are untrained (they sit at p = 0.5 and mean nothing).
    pub fn decide(&self, prompt: Option<Verdict>, response: &ResponseJudge) -> Option<Decision> {
        if !self.heads_trained {
            return None;
        }
        let prompt_unsafe = prompt.is_some_and(|v| self.is_unsafe(v));
        let prompt_escalate = prompt.is_some_and(|v| v.p_escalate >= self.thresholds.escalate);
        Some(if prompt_unsafe || response.unsafe_at.is_some() {
            Decision::Refuse
        } else if prompt_escalate || response.escalate_at.is_some() {
            Decision::Escalate
        } else {
            Decision::Allow
        })
    }
}

/// The streaming rule of spec §5 over one answer, fed one generated token's verdict at a
/// time: the answer is unsafe (escalated) from the token that completes a run of
/// `consecutive` tokens at or over the threshold. One lone token over it decides nothing.
#[derive(Clone, Debug, Default)]
pub struct ResponseJudge {
    run: [usize; 2],
    tokens: usize,
    /// Index of the token at which the unsafe rule fired.
    pub unsafe_at: Option<usize>,
    pub escalate_at: Option<usize>,
    /// The most unsafe and most escalating values seen (for reports).
    pub max: Option<Verdict>,
}

impl ResponseJudge {
    /// Takes the next token's verdict; true when this token makes the unsafe rule fire.
    pub fn push(&mut self, v: Verdict, t: &Thresholds) -> bool {
        let k = t.consecutive.max(1);
        let i = self.tokens;
        self.tokens += 1;
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        let r = t.response();
        let over = [v.p_unsafe >= r[0], v.p_escalate >= r[1]];
        for (run, o) in self.run.iter_mut().zip(over) {
            *run = if o { *run + 1 } else { 0 };
        }
        if self.escalate_at.is_none() && self.run[1] >= k {
            self.escalate_at = Some(i);
        }
        if self.unsafe_at.is_none() && self.run[0] >= k {
            self.unsafe_at = Some(i);
            return true;
        }
        false
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The score at which the streaming rule fires on an answer whose tokens score `p` (one
/// head): the largest, over runs of `k` consecutive tokens, of the run's smallest score;
/// 0 for an answer shorter than `k`, on which the rule never fires. The rule fires at a
/// threshold `t` exactly when this is ≥ `t`.
pub fn rule_score(p: &[f32], k: usize) -> f32 {
    p.windows(k.max(1))
        .map(|w| w.iter().copied().fold(f32::INFINITY, f32::min))
        .fold(0.0, f32::max)
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

/// Safety and authority heads: `Linear(hidden, 2)` with bias on the hidden state of the
/// layer each reads ([`HeadsConfig`]).
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

    /// p(class 1) of each head for hidden states `[rows, hidden]` (or one `[hidden]`),
    /// both heads reading the same states.
    pub fn verdicts(&self, hidden: &Tensor) -> Result<Vec<Verdict>> {
        self.verdicts_of([hidden, hidden])
    }

    /// p(class 1) of each head, the safety head reading `inputs[0]` and the authority head
    /// `inputs[1]` (each `[rows, hidden]` or one `[hidden]`): the states of the layers
    /// they read.
    pub fn verdicts_of(&self, inputs: [&Tensor; 2]) -> Result<Vec<Verdict>> {
        let rows = |t: &Tensor| -> candle_core::Result<Tensor> {
            if t.rank() == 1 {
                t.unsqueeze(0)
            } else {
                Ok(t.clone())
            }
        };
        let p1 = |h: &Tensor, w: &Tensor, b: &Tensor| -> candle_core::Result<Vec<f32>> {
            let h = rows(h)?;
            let logits = h.matmul(&w.t()?)?.broadcast_add(b)?;
            candle_nn::ops::softmax_last_dim(&logits)?
                .narrow(1, 1, 1)?
                .squeeze(1)?
                .to_vec1::<f32>()
        };
        let unsafe_ = p1(inputs[0], &self.safety_w, &self.safety_b)?;
        let escalate = p1(inputs[1], &self.authority_w, &self.authority_b)?;
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
mod judge_tests {
    use super::*;

    fn v(u: f32, e: f32) -> Verdict {
        Verdict {
            p_unsafe: u,
            p_escalate: e,
        }
    }

    fn t(k: usize) -> Thresholds {
        Thresholds {
            unsafe_: 0.5,
            escalate: 0.6,
            response_unsafe: None,
            response_escalate: None,
            consecutive: k,
        }
    }

    #[test]
    fn the_rule_fires_on_k_consecutive_tokens_only() {
        let mut j = ResponseJudge::default();
        // one lone token over the line, then a run of two
        let fired: Vec<bool> = [0.9, 0.1, 0.7, 0.8, 0.9]
            .iter()
            .map(|&u| j.push(v(u, 0.0), &t(2)))
            .collect();
        assert_eq!(fired, [false, false, false, true, false]);
        assert_eq!(j.unsafe_at, Some(3));
        assert_eq!(j.escalate_at, None);
        assert_eq!(j.max.unwrap().p_unsafe, 0.9);
        let mut j1 = ResponseJudge::default();
        assert!(j1.push(v(0.5, 0.0), &t(1)), "k = 1 is the per-token rule");
        let mut j3 = ResponseJudge::default();
        for e in [0.7, 0.7, 0.2, 0.7, 0.7, 0.7] {
            j3.push(v(0.0, e), &t(3));
        }
        assert_eq!(j3.escalate_at, Some(5));
        // rule_score agrees with the judge: fires at t iff score >= t; never below k tokens
        let p = [0.9, 0.1, 0.7, 0.8, 0.9];
        assert_eq!(rule_score(&p, 2), 0.8);
        assert_eq!(rule_score(&p, 1), 0.9);
        assert_eq!(rule_score(&[0.9], 2), 0.0);
    }

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
        loud.push(v(0.9, 0.0), &c.thresholds);
        loud.push(v(0.9, 0.0), &c.thresholds);
        assert_eq!(c.decide(Some(v(0.1, 0.1)), &quiet), Some(Decision::Allow));
        assert_eq!(c.decide(Some(v(0.1, 0.7)), &quiet), Some(Decision::Escalate));
        assert_eq!(c.decide(Some(v(0.6, 0.7)), &quiet), Some(Decision::Refuse));
        assert_eq!(c.decide(Some(v(0.1, 0.1)), &loud), Some(Decision::Refuse));
        c.heads_trained = false;
        assert_eq!(c.decide(Some(v(0.9, 0.9)), &loud), None);
        c.heads.safety.layer = Some(31);
        assert!(c.heads.check(30, Path::new("so8t_config.json")).is_err());
    }
}
