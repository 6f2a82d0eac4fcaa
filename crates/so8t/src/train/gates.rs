//! `train --mode gates`: backpropagation through the frozen base into the generators of
//! the chosen sites and factors and into both heads (spec §6):
//! `L = L_LM + α·CE_safety + β·CE_authority + λ(t)·L_PET`, AdamW, global-norm gradient
//! clipping. Deterministic for a seed and thread count: the example order comes from
//! `(seed, epoch)` and every op runs in a fixed order, so a run resumed from a checkpoint
//! (parameters, AdamW moments, step) ends where an uninterrupted run ends, bit for bit.

use super::data::Example;
use super::logistic::balanced_weights;
use super::TRAIN_DIR;
use crate::error::{Error, Result};
use crate::model::Site;
use crate::artifact::adapter::{generator_name, Adapter, So8tConfig};
use crate::so8::verdict::Heads;
use crate::so8::gates::{site_rotation, SiteShape};
use crate::staging::write_bytes;
use crate::Model;
use candle_core::{DType, Device, Tensor, Var, D};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GatesOptions {
    pub sites: Vec<Site>,
    /// Factors trained; the others stay frozen.
    pub factors: Vec<String>,
    pub epochs: usize,
    /// Learning rate of the generators.
    pub lr: f64,
    /// Learning rate of the heads. Adam moves every coordinate by about the learning rate,
    /// and a head's logit sums hidden_size coordinates of a hidden state whose entries are
    /// O(1) with outliers in the hundreds, so the heads need a rate ~100× smaller than
    /// the generators to move their logits by O(0.1) per step.
    pub head_lr: f64,
    pub batch: usize,
    pub pet_max: f64,
    pub alpha: f64,
    pub beta: f64,
    pub seed: u64,
    pub weight_decay: f64,
    /// Global gradient norm cap.
    pub clip: f64,
}

/// What a run may change without breaking an exact resume.
#[derive(Clone, Debug)]
pub struct RunControl {
    /// Stop after this global step (checkpointing), leaving the rest for `--resume`.
    pub stop_after: Option<usize>,
    pub checkpoint_every: usize,
    pub resume: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub total_steps: usize,
    pub lambda: f64,
    pub loss: f64,
    pub lm: f64,
    pub safety: f64,
    pub authority: f64,
    pub pet: f64,
    /// λ(t)·L_PET, the PET term as it enters the loss.
    pub pet_term: f64,
    pub grad_norm: f64,
    pub seconds: f64,
}

/// λ(t) of spec §6 at step `s` of `total`: linear ramp to `max` over the first 30% of
/// steps, hold, linear anneal to 0 over the last 20%.
pub fn pet_lambda(s: usize, total: usize, max: f64) -> f64 {
    if total <= 1 {
        return max;
    }
    let u = s as f64 / (total - 1) as f64;
    if u < 0.3 {
        max * u / 0.3
    } else if u <= 0.8 {
        max
    } else {
        max * (1.0 - u) / 0.2
    }
}

/// `L_PET = mean_t ‖h_{t+1} − 2h_t + h_{t−1}‖² / d` over the rows of `h` (`[len, d]`);
/// zero for fewer than three rows.
pub fn pet_loss(h: &Tensor) -> candle_core::Result<Tensor> {
    let (len, d) = h.dims2()?;
    if len < 3 {
        return Tensor::zeros((), h.dtype(), h.device());
    }
    let a = h.narrow(0, 2, len - 2)?;
    let b = h.narrow(0, 1, len - 2)?;
    let c = h.narrow(0, 0, len - 2)?;
    let acc = ((a - (b * 2.0)?)? + c)?;
    acc.sqr()?.sum(1)?.mean(0)? / d as f64
}

/// The trainable tensors, in a fixed order (generators by name, then heads).
struct Params {
    names: Vec<String>,
    vars: Vec<Var>,
}

impl Params {
    fn get(&self, name: &str) -> Option<&Var> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| &self.vars[i])
    }
}

pub struct Trainer<'a> {
    model: &'a mut Model,
    config: So8tConfig,
    adapter: Adapter,
    opts: GatesOptions,
    params: Params,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: usize,
    examples: Vec<Example>,
    ids: Vec<Vec<u32>>,
    /// Tokens before the response (where the LM loss starts for a row with one).
    prompt_lens: Vec<usize>,
    /// Each example's prompt verdict position (the config's setting).
    verdict_at: Vec<usize>,
    class_weights: [(f64, f64); 2],
    dir: PathBuf,
}

impl<'a> Trainer<'a> {
    pub fn new(
        model: &'a mut Model,
        config: So8tConfig,
        adapter: Adapter,
        opts: GatesOptions,
        examples: Vec<Example>,
        data_path: &Path,
        out: &Path,
    ) -> Result<Trainer<'a>> {
        if opts.batch == 0 || opts.epochs == 0 {
            return Err(Error::Invalid(
                "--batch and --epochs must be at least 1".into(),
            ));
        }
        for s in &opts.sites {
            if !config.sites.contains(s) {
                return Err(Error::Invalid(format!(
                    "site `{}` has no gate in this model (its sites: {:?})",
                    s.name(),
                    config.sites.iter().map(|s| s.name()).collect::<Vec<_>>()
                )));
            }
        }
        for f in &opts.factors {
            if !config.factors.contains(f) {
                return Err(Error::Invalid(format!(
                    "factor `{f}` is not one of the model's factors {:?}",
                    config.factors
                )));
            }
        }
        // Gradients flow through the frozen weights by candle's gemm on f32.
        model.decoder.widen_half_precision()?;
        // The trained tensors and their optimiser state live where the decoder runs.
        let device = model.decoder.device().clone();
        let mut names = Vec::new();
        let mut vars = Vec::new();
        for l in 0..model.config.num_layers {
            for &site in &opts.sites {
                for f in &opts.factors {
                    let name = generator_name(l, site, f);
                    vars.push(Var::from_tensor(&adapter.generators[&name].to_device(&device)?)?);
                    names.push(name);
                }
            }
        }
        for (name, t) in adapter.heads.tensors() {
            vars.push(Var::from_tensor(&t.to_device(&device)?)?);
            names.push(name.to_string());
        }
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        let (ids, prompt_lens) = super::features::dataset_ids(model, &examples, data_path)?;
        let mut verdict_at = Vec::with_capacity(ids.len());
        for (i, ex) in examples.iter().enumerate() {
            let p = super::features::positions(model, ex, &ids[i], prompt_lens[i], Some(0))?;
            verdict_at.push(p.prompt(config.verdict_position));
        }
        let labels = |h: usize| Example::head_labels(&examples, h);
        let class_weights = [balanced_weights(&labels(0)), balanced_weights(&labels(1))];
        Ok(Trainer {
            model,
            config,
            adapter,
            opts,
            params: Params { names, vars },
            m,
            v,
            step: 0,
            examples,
            ids,
            prompt_lens,
            verdict_at,
            class_weights,
            dir: out.join(TRAIN_DIR),
        })
    }

    pub fn steps_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.opts.batch)
    }

    pub fn total_steps(&self) -> usize {
        self.steps_per_epoch() * self.opts.epochs
    }

    pub fn step(&self) -> usize {
        self.step
    }

    /// Example indices of global step `s`.
    fn batch_of(&self, s: usize) -> Vec<usize> {
        let spe = self.steps_per_epoch();
        let epoch = s / spe;
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.opts.seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        let start = (s % spe) * self.opts.batch;
        order[start..(start + self.opts.batch).min(order.len())].to_vec()
    }

    /// Puts every site's gate into the decoder, trained factors from the variables (so the
    /// graph reaches them), frozen ones as constants.
    fn install_gates(&mut self) -> Result<()> {
        let cfg = self.model.config.clone();
        for l in 0..cfg.num_layers {
            for &site in &self.config.sites {
                let factors: Vec<Tensor> = self
                    .config
                    .factors
                    .iter()
                    .map(|f| {
                        let name = generator_name(l, site, f);
                        match self.params.get(&name) {
                            Some(v) => Ok(v.as_tensor().clone()),
                            None => self.adapter.generators[&name].to_device(self.model.decoder.device()),
                        }
                    })
                    .collect::<candle_core::Result<_>>()?;
                let r = site_rotation(
                    &factors,
                    SiteShape::of(&cfg, site)?,
                    site,
                    self.config.granularity,
                )?;
                *self.model.decoder.gates[l].slot(site) = Some(r);
            }
        }
        Ok(())
    }

    /// Class-weighted cross-entropy of head `head` on states `[rows, hidden]` that all
    /// carry `label`, averaged over the rows.
    fn head_ce(&self, rows: &Tensor, head: usize, label: bool) -> candle_core::Result<Tensor> {
        let param = |name: &str| {
            self.params
                .get(name)
                .map(Var::as_tensor)
                .ok_or_else(|| candle_core::Error::Msg(format!("no trainable `{name}`")))
        };
        let w = param(Heads::NAMES[2 * head])?;
        let b = param(Heads::NAMES[2 * head + 1])?;
        let z = rows.matmul(&w.t()?)?.broadcast_add(b)?;
        let logp = candle_nn::ops::log_softmax(&z, D::Minus1)?;
        let cw = if label {
            self.class_weights[head].1
        } else {
            self.class_weights[head].0
        };
        logp.narrow(1, label as usize, 1)?.mean_all()?.neg()? * cw
    }

    /// Loss terms of one batch as graph tensors: (total, lm, safety, authority, pet).
    fn batch_loss(&mut self, batch: &[usize], lambda: f64) -> Result<[Tensor; 5]> {
        self.install_gates()?;
        let device = self.model.decoder.device().clone();
        let zero = || Tensor::zeros((), DType::F32, &device);
        let (mut lm, mut pet) = (zero()?, zero()?);
        let mut ce = [zero()?, zero()?];
        let mut ce_weight = [0f64; 2];
        for &i in batch {
            let ids = self.ids[i].clone();
            let len = ids.len();
            self.model.decoder.clear_cache();
            let h = self.model.decoder.forward_hidden_autograd(&ids, 0)?;
            // Next-token loss on the response when there is one, else on the prompt.
            let start = if self.examples[i].response.is_some() {
                self.prompt_lens[i] - 1
            } else {
                0
            };
            if len > start + 1 {
                let logits = self
                    .model
                    .decoder
                    .logits_autograd(&h.narrow(0, start, len - 1 - start)?)?;
                let targets = Tensor::new(&ids[start + 1..], &device)?;
                let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
                lm = (lm + candle_nn::loss::nll(&logp, &targets)?)?;
            }
            // Each head reads its layer: the prompt at its verdict position, and every
            // token of the response (their mean counts as one more labelled row).
            let layers = self.config.heads.layers(self.model.config.num_layers);
            let (at, plen) = (self.verdict_at[i], self.prompt_lens[i]);
            for head in 0..2 {
                let states = self.model.decoder.tap_of(layers[head]).ok_or_else(|| {
                    Error::Invalid(format!("the decoder keeps no state of layer {}", layers[head]))
                })?;
                let ex = &self.examples[i];
                let parts = [
                    (ex.label(head), states.narrow(0, at, 1)?),
                    (ex.response_label(head), states.narrow(0, plen, len - plen)?),
                ];
                for (label, rows) in parts {
                    if let (Some(label), true) = (label, rows.dim(0)? > 0) {
                        ce[head] = (&ce[head] + self.head_ce(&rows, head, label)?)?;
                        let (w0, w1) = self.class_weights[head];
                        ce_weight[head] += if label { w1 } else { w0 };
                    }
                }
            }
            pet = (pet + pet_loss(&h)?)?;
        }
        self.model.decoder.clear_cache();
        let n = batch.len() as f64;
        let lm = (lm / n)?;
        let pet = (pet / n)?;
        let safety = if ce_weight[0] > 0.0 {
            (&ce[0] / ce_weight[0])?
        } else {
            ce[0].clone()
        };
        let authority = if ce_weight[1] > 0.0 {
            (&ce[1] / ce_weight[1])?
        } else {
            ce[1].clone()
        };
        let total = (((&lm + (&safety * self.opts.alpha)?)? + (&authority * self.opts.beta)?)?
            + (&pet * lambda)?)?;
        Ok([total, lm, safety, authority, pet])
    }

    /// The loss of a batch without updating anything (for gradient checks).
    pub fn loss_at(&mut self, batch: &[usize], lambda: f64) -> Result<f64> {
        Ok(self.batch_loss(batch, lambda)?[0].to_scalar::<f32>()? as f64)
    }

    /// Gradients of the batch loss for every parameter, in parameter order.
    pub fn gradients(&mut self, batch: &[usize], lambda: f64) -> Result<Vec<Tensor>> {
        let loss = self.batch_loss(batch, lambda)?;
        self.gradients_of(&loss[0])
    }

    /// ∂loss/∂parameter for every parameter, in order (zero where the graph does not reach).
    fn gradients_of(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let grads = loss.backward()?;
        self.params
            .vars
            .iter()
            .map(|v| Ok(grads.get(v).cloned().unwrap_or(v.zeros_like()?)))
            .collect()
    }

    pub fn param_names(&self) -> &[String] {
        &self.params.names
    }

    pub fn param(&self, i: usize) -> &Var {
        &self.params.vars[i]
    }

    /// One optimiser step; returns its log line.
    pub fn train_step(&mut self) -> Result<StepLog> {
        let t0 = std::time::Instant::now();
        let s = self.step;
        let total_steps = self.total_steps();
        let lambda = pet_lambda(s, total_steps, self.opts.pet_max);
        let batch = self.batch_of(s);
        let terms = self.batch_loss(&batch, lambda)?;
        let grads = self.gradients_of(&terms[0])?;
        let mut sq = 0f64;
        for g in &grads {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        let grad_norm = sq.sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Invalid(format!(
                "step {}: gradient is not finite (lower --lr)",
                s + 1
            )));
        }
        let clip = if grad_norm > self.opts.clip {
            self.opts.clip / grad_norm
        } else {
            1.0
        };
        // AdamW (decoupled weight decay), β = (0.9, 0.999), ε = 1e-8.
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8f64);
        let t = (s + 1) as i32;
        for (i, g) in grads.iter().enumerate() {
            let g = (g * clip)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let mhat = (&self.m[i] / (1.0 - b1.powi(t)))?;
            let vhat = (&self.v[i] / (1.0 - b2.powi(t)))?;
            let var = &self.params.vars[i];
            let lr = if Heads::NAMES.contains(&self.params.names[i].as_str()) {
                self.opts.head_lr
            } else {
                self.opts.lr
            };
            let update =
                ((mhat / (vhat.sqrt()? + eps)?)? + (var.as_tensor() * self.opts.weight_decay)?)?;
            var.set(&(var.as_tensor() - (update * lr)?)?)?;
        }
        self.step += 1;
        let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_scalar::<f32>()? as f64) };
        let pet = scalar(&terms[4])?;
        Ok(StepLog {
            step: self.step,
            epoch: s / self.steps_per_epoch() + 1,
            total_steps,
            lambda,
            loss: scalar(&terms[0])?,
            lm: scalar(&terms[1])?,
            safety: scalar(&terms[2])?,
            authority: scalar(&terms[3])?,
            pet,
            pet_term: lambda * pet,
            grad_norm,
            seconds: t0.elapsed().as_secs_f64(),
        })
    }

    /// Runs to the end (or `stop_after`), logging each step to `so8t_train/log.jsonl` and
    /// checkpointing every `checkpoint_every` steps and at the stop.
    pub fn run(&mut self, control: &RunControl, mut on_step: impl FnMut(&StepLog)) -> Result<bool> {
        std::fs::create_dir_all(&self.dir).map_err(|e| Error::io(&self.dir, e))?;
        let log_path = self.dir.join("log.jsonl");
        if control.resume {
            self.load_checkpoint()?;
            // Keep the log lines up to the checkpoint; later ones are redone.
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let kept: String = text
                .lines()
                .filter(|l| serde_json::from_str::<StepLog>(l).is_ok_and(|s| s.step <= self.step))
                .map(|l| format!("{l}\n"))
                .collect();
            write_bytes(&log_path, kept.as_bytes())?;
        } else {
            write_bytes(&log_path, b"")?;
        }
        let mut log = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .map_err(|e| Error::io(&log_path, e))?;
        let total = self.total_steps();
        let end = control.stop_after.map_or(total, |s| s.min(total));
        while self.step < end {
            let line = self.train_step()?;
            writeln!(log, "{}", serde_json::to_string(&line).unwrap())
                .map_err(|e| Error::io(&log_path, e))?;
            on_step(&line);
            if control.checkpoint_every > 0
                && self.step % control.checkpoint_every == 0
                && self.step < end
            {
                self.save_checkpoint()?;
            }
        }
        self.save_checkpoint()?;
        Ok(self.step == total)
    }

    fn checkpoint_paths(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.join("checkpoint.safetensors"),
            self.dir.join("checkpoint.json"),
        )
    }

    fn fingerprint(&self) -> serde_json::Value {
        serde_json::json!({ "options": self.opts, "examples": self.examples.len(), "data": data_digest(&self.ids) })
    }

    fn save_checkpoint(&self) -> Result<()> {
        let (tensors_path, meta_path) = self.checkpoint_paths();
        let mut all = HashMap::new();
        for (i, n) in self.params.names.iter().enumerate() {
            let host = |t: &Tensor| t.to_device(&Device::Cpu);
            all.insert(format!("param.{n}"), host(self.params.vars[i].as_tensor())?);
            all.insert(format!("adam_m.{n}"), host(&self.m[i])?);
            all.insert(format!("adam_v.{n}"), host(&self.v[i])?);
        }
        crate::formats::safetensors::write(&tensors_path, &all, None)?;
        let meta = serde_json::json!({ "step": self.step, "fingerprint": self.fingerprint() });
        write_bytes(
            &meta_path,
            serde_json::to_string_pretty(&meta).unwrap().as_bytes(),
        )
    }

    fn load_checkpoint(&mut self) -> Result<()> {
        let (tensors_path, meta_path) = self.checkpoint_paths();
        let text = std::fs::read_to_string(&meta_path).map_err(|e| Error::io(&meta_path, e))?;
        let meta: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(&meta_path, e.to_string()))?;
        if meta["fingerprint"] != self.fingerprint() {
            return Err(Error::format(
                &meta_path,
                "was written by a run with other options or data; resume with the same arguments",
            ));
        }
        let step = meta["step"]
            .as_u64()
            .ok_or_else(|| Error::format(&meta_path, "field `step` must be a number"))?
            as usize;
        let mut t = candle_core::safetensors::load(&tensors_path, self.model.decoder.device())
            .map_err(|e| Error::format(&tensors_path, crate::error::candle_message(&e)))?;
        for (i, n) in self.params.names.iter().enumerate() {
            let mut take = |k: String| {
                t.remove(&k)
                    .ok_or_else(|| Error::format(&tensors_path, format!("missing tensor `{k}`")))
            };
            let p = take(format!("param.{n}"))?;
            if p.dims() != self.params.vars[i].dims() {
                return Err(Error::format(
                    &tensors_path,
                    format!(
                        "tensor `param.{n}` has shape {:?}, expected {:?}",
                        p.dims(),
                        self.params.vars[i].dims()
                    ),
                ));
            }
            self.params.vars[i].set(&p)?;
            self.m[i] = take(format!("adam_m.{n}"))?;
            self.v[i] = take(format!("adam_v.{n}"))?;
        }
        self.step = step;
        Ok(())
    }

    /// The adapter and config with the trained tensors, heads marked trained.
    pub fn result(&self) -> Result<(Adapter, So8tConfig)> {
        let mut generators = self.adapter.generators.clone();
        let mut named = HashMap::new();
        for (i, n) in self.params.names.iter().enumerate() {
            let t = self.params.vars[i].as_tensor().to_device(&Device::Cpu)?.copy()?;
            if generators.contains_key(n) {
                generators.insert(n.clone(), t);
            } else {
                named.insert(n.clone(), t);
            }
        }
        let heads = Heads::from_named(|n| {
            named
                .remove(n)
                .ok_or_else(|| Error::Invalid(format!("head tensor `{n}` missing")))
        })?;
        let mut config = self.config.clone();
        config.heads_trained = true;
        Ok((Adapter { generators, heads }, config))
    }
}

fn data_digest(ids: &[Vec<u32>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for seq in ids {
        h.update((seq.len() as u64).to_le_bytes());
        for t in seq {
            h.update(t.to_le_bytes());
        }
    }
    format!("{:x}", h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pet_of_a_straight_line_is_zero() {
        // h_t = a + t·b with small integers: every second difference is exactly zero.
        let rows: Vec<f32> = (0..6)
            .flat_map(|t| (0..4).map(move |j| (j as f32 - 1.0) + t as f32 * (j as f32 + 2.0)))
            .collect();
        let h = Tensor::from_vec(rows, (6, 4), &Device::Cpu).unwrap();
        assert_eq!(pet_loss(&h).unwrap().to_scalar::<f32>().unwrap(), 0.0);
        // A bend is not: h = t² in one coordinate gives second difference 2 → 4/d.
        let bent = Tensor::from_vec(
            (0..5)
                .flat_map(|t| [(t * t) as f32, 0.0])
                .collect::<Vec<_>>(),
            (5, 2),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(pet_loss(&bent).unwrap().to_scalar::<f32>().unwrap(), 2.0);
    }

    #[test]
    fn lambda_schedule() {
        let total = 101;
        assert_eq!(pet_lambda(0, total, 2.0), 0.0);
        assert!((pet_lambda(15, total, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(pet_lambda(30, total, 2.0), 2.0);
        assert_eq!(pet_lambda(80, total, 2.0), 2.0);
        assert!((pet_lambda(90, total, 2.0) - 1.0).abs() < 1e-12);
        assert_eq!(pet_lambda(100, total, 2.0), 0.0);
    }
}
