//! Training (spec §6): the heads alone on cached hidden states (`heads`), or the gates'
//! generators and the heads together by backpropagation through the frozen base
//! (`gates`). Both end the same way: thresholds chosen on the validation split, and the
//! SO8T directory's adapter and config replaced atomically.

pub mod data;
pub mod features;
pub mod gates;
pub mod logistic;

use crate::error::{Error, Result};
use crate::eval::metrics::{binary_metrics, threshold_for_fpr, BinaryMetrics};
use crate::so8::adapter::{
    rule_score, Adapter, Heads, HeadsConfig, So8tConfig, Thresholds, VerdictPosition,
    ADAPTER_FILE, CONFIG_FILE,
};
use crate::so8::convert::is_hf_model_file;
use crate::staging::{hidden_sibling, write_bytes, write_file};
use crate::Model;
use data::{Dataset, Example};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where a run keeps its log, checkpoint and summary, inside the output directory. The
/// `so8t_` prefix keeps it out of bake and convert copies.
pub const TRAIN_DIR: &str = "so8t_train";
pub const HEAD_NAMES: [&str; 2] = ["safety", "authority"];

/// What one feature row is: a prompt read at one verdict position, or one response token
/// (`token`-th of the response).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SampleKind {
    Prompt(VerdictPosition),
    Response { token: usize },
}

#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub row: usize,
    pub kind: SampleKind,
}

/// Hidden states of the tapped layers at every example's prompt verdict positions and
/// response tokens, with each head's labels.
pub struct Features {
    pub hidden: usize,
    pub layers: Vec<usize>,
    pub samples: Vec<Sample>,
    /// Per layer of `layers`, `[samples, hidden]` row-major.
    pub x: Vec<Vec<f32>>,
    pub examples: Vec<Example>,
}

impl Features {
    /// One pass over `data` tapping `layers`; with `response_cap`, at most that many tokens
    /// of each response (see [`features::positions`]). A prompt repeated with other
    /// responses adds its prompt samples once.
    pub fn compute(
        model: &mut Model,
        data: &Dataset,
        layers: &[usize],
        response_cap: Option<usize>,
        mut progress: impl FnMut(usize),
    ) -> Result<Features> {
        let (ids, prompt_lens) = features::dataset_ids(model, &data.examples, &data.path)?;
        let mut pos = Vec::with_capacity(ids.len());
        for (i, ex) in data.examples.iter().enumerate() {
            pos.push(features::positions(model, ex, &ids[i], prompt_lens[i], response_cap)?);
        }
        let hidden = model.config.hidden_size;
        let mut x = vec![Vec::new(); layers.len()];
        let mut samples = Vec::new();
        let mut seen_prompts = std::collections::HashSet::new();
        let from = features::first_positions(&pos);
        features::walk_layers(model, layers, &ids, &from, |i, start, tapped| {
            let p = &pos[i];
            let mut take = |kind: SampleKind, at: usize| -> Result<()> {
                for (xl, t) in x.iter_mut().zip(tapped) {
                    xl.extend(t.get(at - start)?.to_vec1::<f32>()?);
                }
                samples.push(Sample { row: i, kind });
                Ok(())
            };
            if seen_prompts.insert(&ids[i][..prompt_lens[i]]) {
                for v in [VerdictPosition::AssistantHeader, VerdictPosition::UserEnd] {
                    take(SampleKind::Prompt(v), p.prompt(v))?;
                }
            }
            for &at in &p.response {
                take(
                    SampleKind::Response {
                        token: at - prompt_lens[i],
                    },
                    at,
                )?;
            }
            progress(i + 1);
            Ok(())
        })?;
        Ok(Features {
            hidden,
            layers: layers.to_vec(),
            samples,
            x,
            examples: data.examples.clone(),
        })
    }

    /// The label of head `h` that sample `s` carries, if its rows are read at `position`.
    pub fn label(&self, s: &Sample, h: usize, position: VerdictPosition) -> Option<bool> {
        let e = &self.examples[s.row];
        match s.kind {
            SampleKind::Prompt(p) if p == position => e.label(h),
            SampleKind::Prompt(_) => None,
            SampleKind::Response { .. } => e.response_label(h),
        }
    }

    /// (features, labels, sample indices) of the samples labelled for `head`, from `layer`.
    pub fn labelled(
        &self,
        head: usize,
        layer: usize,
        position: VerdictPosition,
    ) -> (Vec<f32>, Vec<bool>, Vec<usize>) {
        let li = self.layer_index(layer);
        let (mut x, mut y, mut idx) = (Vec::new(), Vec::new(), Vec::new());
        for (k, s) in self.samples.iter().enumerate() {
            if let Some(l) = self.label(s, head, position) {
                x.extend_from_slice(&self.x[li][k * self.hidden..(k + 1) * self.hidden]);
                y.push(l);
                idx.push(k);
            }
        }
        (x, y, idx)
    }

    fn layer_index(&self, layer: usize) -> usize {
        self.layers
            .iter()
            .position(|&l| l == layer)
            .expect("features hold the layer asked for")
    }
}

/// p(class 1) of one head (`head` 0 safety, 1 authority) for every row of `x`.
pub fn head_scores(heads: &Heads, head: usize, x: &[f32], hidden: usize) -> Result<Vec<f32>> {
    let n = x.len() / hidden;
    let t = candle_core::Tensor::from_vec(x.to_vec(), (n, hidden), &candle_core::Device::Cpu)?;
    let v = heads.verdicts(&t)?;
    Ok(v.iter()
        .map(|v| if head == 0 { v.p_unsafe } else { v.p_escalate })
        .collect())
}

#[derive(Clone, Debug, Serialize)]
pub struct HeadFitReport {
    pub head: &'static str,
    pub layer: usize,
    pub rows: usize,
    pub positives: usize,
    pub weight_decay: f64,
    pub newton_iterations: usize,
    pub train_loss: f64,
    /// Validation loss per layer tried (weight decay 1e-2, on a sample of the training rows).
    pub layer_search: Vec<(usize, f64)>,
    /// Validation loss per weight decay tried (when a validation set was given).
    pub weight_decay_search: Vec<(f64, f64)>,
}

pub const WEIGHT_DECAYS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];
/// Training samples the layer search fits on (seeded subsample): the search compares
/// layers, the final fit uses every sample.
const LAYER_SEARCH_SAMPLES: usize = 20_000;

fn subsample(x: &[f32], y: &[bool], d: usize, n: usize) -> (Vec<f32>, Vec<bool>) {
    if y.len() <= n {
        return (x.to_vec(), y.to_vec());
    }
    use rand::{seq::SliceRandom, SeedableRng};
    let mut idx: Vec<usize> = (0..y.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0x5eed));
    idx.truncate(n);
    idx.sort_unstable();
    let xs = idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect();
    (xs, idx.iter().map(|&i| y[i]).collect())
}

fn val_loss(x: &[f32], y: &[bool], d: usize, wd: f64, val: (&[f32], &[bool])) -> Result<f64> {
    let f = logistic::fit(x, d, y, wd)?;
    Ok(logistic::weighted_loss(
        &f.logits(val.0, d),
        val.1,
        logistic::balanced_weights(val.1),
    ))
}

/// The heads-only fit, each head at the layer of `train.layers` with the lowest
/// class-weighted validation loss (the only layer without `val`), prompts read at
/// `position`. With `val`, the weight decay is the one of [`WEIGHT_DECAYS`] with the
/// lowest validation loss, unless `weight_decay` fixes it.
pub fn fit_heads(
    train: &Features,
    val: Option<&Features>,
    weight_decay: Option<f64>,
    position: VerdictPosition,
    current: (&Heads, &HeadsConfig),
) -> Result<(Heads, HeadsConfig, Vec<HeadFitReport>)> {
    let (mut heads, mut setting) = (current.0.clone(), current.1.clone());
    let d = train.hidden;
    let mut reports = Vec::new();
    let both = |y: &[bool]| y.iter().any(|&v| v) && y.iter().any(|&v| !v);
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let last = *train.layers.last().expect("at least one layer");
        let y: Vec<bool> = train
            .samples
            .iter()
            .filter_map(|s| train.label(s, h, position))
            .collect();
        if !both(&y) {
            tracing::warn!("no {name} labels of both classes in the training data: the {name} head is left as it was");
            continue;
        }
        let val_of = |layer: usize| {
            val.map(|v| v.labelled(h, layer, position))
                .filter(|(_, vy, _)| both(vy))
        };
        let mut layer_search = Vec::new();
        let mut layer = last;
        if train.layers.len() > 1 && val_of(last).is_some() {
            let mut best = f64::INFINITY;
            for &l in &train.layers {
                let (x, y, _) = train.labelled(h, l, position);
                let (xs, ys) = subsample(&x, &y, d, LAYER_SEARCH_SAMPLES);
                let (vx, vy, _) = val_of(l).expect("checked above");
                let loss = val_loss(&xs, &ys, d, 1e-2, (&vx, &vy))?;
                layer_search.push((l, loss));
                if loss < best {
                    (best, layer) = (loss, l);
                }
            }
        }
        let (x, y, _) = train.labelled(h, layer, position);
        let mut search = Vec::new();
        let chosen = match (weight_decay, val_of(layer)) {
            (Some(wd), _) => wd,
            (None, Some((vx, vy, _))) => {
                let mut best = (f64::INFINITY, 1e-2);
                for wd in WEIGHT_DECAYS {
                    let loss = val_loss(&x, &y, d, wd, (&vx, &vy))?;
                    search.push((wd, loss));
                    if loss < best.0 {
                        best = (loss, wd);
                    }
                }
                best.1
            }
            (None, None) => 1e-2,
        };
        let f = logistic::fit(&x, d, &y, chosen)?;
        let (w, b) = f.head()?;
        let stored_layer = Some(layer);
        if h == 0 {
            (heads.safety_w, heads.safety_b) = (w, b);
            setting.safety.layer = stored_layer;
        } else {
            (heads.authority_w, heads.authority_b) = (w, b);
            setting.authority.layer = stored_layer;
        }
        reports.push(HeadFitReport {
            head: name,
            layer,
            rows: y.len(),
            positives: y.iter().filter(|&&v| v).count(),
            weight_decay: chosen,
            newton_iterations: f.iterations,
            train_loss: f.loss,
            layer_search,
            weight_decay_search: search,
        });
    }
    Ok((heads, setting, reports))
}

#[derive(Clone, Debug, Serialize)]
pub struct ThresholdReport {
    pub head: &'static str,
    pub target_fpr: f64,
    /// The threshold on prompts, and the streaming rule's on answers (when the
    /// validation rows have answers labelled for this head).
    pub prompt_threshold: f32,
    pub response_threshold: Option<f32>,
    /// Prompts at the prompt threshold; answers under the streaming rule at theirs.
    pub validation: BinaryMetrics,
    pub response_validation: Option<BinaryMetrics>,
}

/// Per response of `f`, the score at which the streaming rule of `k` consecutive tokens
/// fires ([`rule_score`]), with its label, for the responses labelled for `head`, less
/// the benign answers to requests labelled class 1 (a refusal of a harmful request: the
/// prompt's verdict decides those). `f` must hold every response token.
pub fn response_rule_scores(
    f: &Features,
    scores: &[f32],
    idx: &[usize],
    head: usize,
    k: usize,
) -> (Vec<f32>, Vec<bool>) {
    let mut per_row: std::collections::BTreeMap<usize, Vec<(usize, f32)>> = Default::default();
    for (&k_s, &sc) in idx.iter().zip(scores) {
        if let SampleKind::Response { token } = f.samples[k_s].kind {
            per_row.entry(f.samples[k_s].row).or_default().push((token, sc));
        }
    }
    let (mut out, mut labels) = (Vec::new(), Vec::new());
    for (row, mut toks) in per_row {
        let e = &f.examples[row];
        let Some(label) = e.response_label(head) else {
            continue;
        };
        // A benign answer to a flagged request (a refusal) is decided by the prompt; the
        // rule decides the answers to requests that pass, so those are its negatives.
        if !label && e.label(head) == Some(true) {
            continue;
        }
        toks.sort_by_key(|t| t.0);
        let p: Vec<f32> = toks.iter().map(|t| t.1).collect();
        out.push(rule_score(&p, k));
        labels.push(label);
    }
    (out, labels)
}

/// Per head, the lowest thresholds whose false positive rate on the validation split is at
/// most `target_fpr`: one on prompts (safe prompts flagged unsafe; handle requests
/// escalated), one on answers under the streaming rule (benign answers flagged). `val`
/// must hold every response token.
pub fn choose_thresholds(
    heads: &Heads,
    setting: &HeadsConfig,
    position: VerdictPosition,
    val: &Features,
    n_layers: usize,
    target_fpr: f64,
    current: &Thresholds,
) -> Result<(Thresholds, Vec<ThresholdReport>)> {
    let mut t = current.clone();
    let mut reports = Vec::new();
    let layers = setting.layers(n_layers);
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        if !val.layers.contains(&layers[h]) {
            tracing::warn!(
                "the validation pass did not read layer {} (the {name} head's): its threshold stays",
                layers[h]
            );
            continue;
        }
        let (x, _, idx) = val.labelled(h, layers[h], position);
        let scores = head_scores(heads, h, &x, val.hidden)?;
        let (ps, py): (Vec<f32>, Vec<bool>) = idx
            .iter()
            .zip(&scores)
            .filter(|(&k, _)| matches!(val.samples[k].kind, SampleKind::Prompt(_)))
            .map(|(&k, &s)| (s, val.label(&val.samples[k], h, position).unwrap()))
            .unzip();
        if py.iter().all(|&v| v) || py.iter().all(|&v| !v) {
            continue;
        }
        let prompt_threshold = threshold_for_fpr(&ps, &py, target_fpr);
        let (rs, ry) = response_rule_scores(val, &scores, &idx, h, current.consecutive);
        // Only where validation has answers of both classes: a threshold set from benign
        // answers alone would flag target_fpr of them for nothing it was shown to catch.
        // Otherwise the prompt's threshold applies to answers too.
        let response_threshold = (ry.iter().any(|&v| v) && ry.iter().any(|&v| !v))
            .then(|| threshold_for_fpr(&rs, &ry, target_fpr));
        // A benign score of exactly 1 (saturated softmax) puts the bound just above 1:
        // nothing can be flagged then, and 1 says the same as a probability.
        let prompt_threshold = prompt_threshold.min(1.0);
        let response_threshold = response_threshold.map(|r| r.min(1.0));
        if h == 0 {
            t.unsafe_ = prompt_threshold;
            t.response_unsafe = response_threshold;
        } else {
            t.escalate = prompt_threshold;
            t.response_escalate = response_threshold;
        }
        reports.push(ThresholdReport {
            head: name,
            target_fpr,
            prompt_threshold,
            response_threshold,
            validation: binary_metrics(&ps, &py, prompt_threshold),
            response_validation: response_threshold.map(|r| binary_metrics(&rs, &ry, r)),
        });
    }
    Ok((t, reports))
}

/// Where a training run writes. It works in `work`, the hidden sibling `.NAME.partial`
/// of its target (the base files hard-linked, and the checkpoint that `--resume` picks
/// up after a stop or a kill), and [`TrainOut::finish`] puts the complete directory at
/// `target` in one step. So the target is never a half-written directory that would
/// read as a plain model, and training in place swaps adapter and config together.
pub struct TrainOut {
    pub target: PathBuf,
    pub work: PathBuf,
}

impl TrainOut {
    /// `out` `None` (or the model directory itself) trains in place.
    pub fn prepare(model_dir: &Path, out: Option<&Path>, resume: bool) -> Result<TrainOut> {
        let in_place = out.is_none_or(|o| same_dir(o, model_dir));
        let target = match out {
            Some(o) if !in_place => o.to_path_buf(),
            _ => model_dir.to_path_buf(),
        };
        let work = hidden_sibling(&target, "partial")?;
        if resume {
            if !work.join(TRAIN_DIR).is_dir() {
                return Err(Error::format(
                    &work,
                    "no checkpoint to resume from here (run without --resume)",
                ));
            }
            return Ok(TrainOut { target, work });
        }
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        }
        std::fs::create_dir_all(&work).map_err(|e| Error::io(&work, e))?;
        // In place, the swap replaces the whole directory: carry everything but the last
        // run's training state. To a new directory, the base model's files.
        link_tree(model_dir, &work, &|name: &str, is_file: bool| {
            if in_place {
                name != TRAIN_DIR
            } else {
                is_file && is_hf_model_file(name, true)
            }
        })?;
        Ok(TrainOut { target, work })
    }

    /// Writes the adapter and the config into the work directory and puts it in place.
    pub fn finish(&self, adapter: &Adapter, config: &So8tConfig) -> Result<()> {
        write_result(&self.work, adapter, config)?;
        crate::staging::replace_dir(&self.work, &self.target)
    }
}

/// Hard-links (or, across filesystems, copies) the entries of `src` that `keep` accepts
/// (by name and whether it is a file) into `dst`, directories recursively.
fn link_tree(src: &Path, dst: &Path, keep: &dyn Fn(&str, bool) -> bool) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        let (from, to) = (e.path(), dst.join(&name));
        let ty = e.file_type().map_err(|err| Error::io(&from, err))?;
        if ty.is_dir() && keep(&name, false) {
            std::fs::create_dir_all(&to).map_err(|err| Error::io(&to, err))?;
            link_tree(&from, &to, &|_, _| true)?;
        } else if from.is_file() && keep(&name, true) && std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).map_err(|err| Error::io(&to, err))?;
        }
    }
    Ok(())
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Writes the adapter, then the config, each to a temporary name renamed into place.
pub fn write_result(out: &Path, adapter: &Adapter, config: &So8tConfig) -> Result<()> {
    write_file(&out.join(ADAPTER_FILE), |tmp| adapter.write(tmp))?;
    write_bytes(
        &out.join(CONFIG_FILE),
        serde_json::to_string_pretty(config).unwrap().as_bytes(),
    )
}

/// The model directory's config, checked to belong to a trainable SO8T directory.
pub fn so8t_parts(model: &Model) -> Result<(So8tConfig, Adapter)> {
    match &model.so8t {
        Some(s) if !s.baked => Ok((s.config.clone(), Adapter::read(&model.path)?)),
        Some(_) => Err(Error::format(
            &model.path,
            "is baked: train the SO8T directory it was baked from",
        )),
        None => Err(Error::format(
            &model.path,
            "is not an SO8T directory (so8t_config.json missing): run `so8t convert` first",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn example(unsafe_: bool, response: Option<bool>) -> Example {
        Example {
            line: 0,
            messages: vec![Message::new("user", "x")],
            response: response.map(|_| "r".into()),
            safety: Some(unsafe_),
            authority: Some(false),
            response_safety: response,
            response_authority: response.map(|_| false),
            source: None,
            family: None,
            category: None,
        }
    }

    /// Rows whose label shows in layer 2's states (feature 0, noisy) and not in layer 1's;
    /// every row has a prompt sample and three answer tokens, answers labelled like the row.
    fn synthetic(n: usize, seed: u64) -> Features {
        let d = 4;
        let mut rng = StdRng::seed_from_u64(seed);
        let (mut x1, mut x2, mut samples, mut examples) = (vec![], vec![], vec![], vec![]);
        for row in 0..n {
            let y = row % 2 == 1;
            examples.push(example(y, Some(y)));
            let kinds = [
                SampleKind::Prompt(VerdictPosition::AssistantHeader),
                SampleKind::Response { token: 0 },
                SampleKind::Response { token: 1 },
                SampleKind::Response { token: 2 },
            ];
            for kind in kinds {
                for _ in 0..d {
                    x1.push(rng.random_range(-1.0..1.0f32));
                }
                let signal = if y { 1.0 } else { -1.0 };
                x2.push(signal + rng.random_range(-0.8..0.8f32));
                for _ in 1..d {
                    x2.push(rng.random_range(-1.0..1.0f32));
                }
                samples.push(Sample { row, kind });
            }
        }
        Features {
            hidden: d,
            layers: vec![1, 2],
            samples,
            x: vec![x1, x2],
            examples,
        }
    }

    #[test]
    fn the_layer_with_the_signal_is_chosen_and_thresholds_hold_on_answers() {
        let (train, val) = (synthetic(400, 1), synthetic(200, 2));
        let heads = Heads::zeros(4).unwrap();
        let (heads, setting, reports) = fit_heads(
            &train,
            Some(&val),
            None,
            VerdictPosition::AssistantHeader,
            (&heads, &HeadsConfig::default()),
        )
        .unwrap();
        assert_eq!(setting.safety.layer, Some(2), "{reports:?}");
        let search = &reports[0].layer_search;
        assert!(search[1].1 < search[0].1 * 0.5, "{search:?}");
        let (t, reports) = choose_thresholds(
            &heads,
            &setting,
            VerdictPosition::AssistantHeader,
            &val,
            2,
            0.05,
            &Thresholds::default(),
        )
        .unwrap();
        let r = &reports[0];
        assert!(r.validation.fpr <= 0.05 && r.validation.recall > 0.8, "{r:?}");
        let rv = r.response_validation.as_ref().unwrap();
        assert!(rv.fpr <= 0.05 && rv.recall > 0.8, "{rv:?}");
        assert_eq!(t.unsafe_, r.prompt_threshold);
        assert_eq!(t.response_unsafe, r.response_threshold);
        // the streaming rule at that threshold flags at most 5% of the benign answers
        let (x, _, idx) = val.labelled(0, 2, VerdictPosition::AssistantHeader);
        let scores = head_scores(&heads, 0, &x, 4).unwrap();
        let (rs, ry) = response_rule_scores(&val, &scores, &idx, 0, 2);
        let benign: Vec<f32> = rs.iter().zip(&ry).filter(|(_, &y)| !y).map(|(&s, _)| s).collect();
        let flagged = benign.iter().filter(|&&s| s >= t.response()[0]).count();
        assert!(flagged as f64 <= 0.05 * benign.len() as f64, "{flagged} of {}", benign.len());
    }
}
