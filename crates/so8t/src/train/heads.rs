//! The heads-only fit on cached hidden states (spec §5, §6): each head's layer, answer
//! weight and weight decay, and the decision thresholds, chosen on validation data or on
//! whole training families held out in turn.

use super::{logistic, Features, SampleKind, HEAD_NAMES};
use crate::error::{Error, Result};
use crate::eval::metrics::{binary_metrics, threshold_for_fpr, BinaryMetrics};
use crate::so8::adapter::{rule_score, Heads, HeadsConfig, Thresholds, VerdictPosition};
use serde::Serialize;

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
    /// What one answer's tokens weigh together, against one prompt (`null`: each token
    /// as much as a prompt).
    pub answer_weight: Option<f64>,
    pub weight_decay: f64,
    pub newton_iterations: usize,
    pub train_loss: f64,
    /// Validation loss per layer tried (weight decay 1e-2, on a sample of the training rows).
    pub layer_search: Vec<(usize, f64)>,
    /// With `--answer-weight auto`: (answer weight, weight decay, held-out-family loss)
    /// per pair tried ([`family_criterion`]); the lowest is used.
    pub family_search: Vec<(f64, f64, f64)>,
    /// Validation loss per weight decay tried (when a validation set was given).
    pub weight_decay_search: Vec<(f64, f64)>,
    /// When asked for: the head's scores on its training samples, each predicted by a fit
    /// (same layer, answer weight and weight decay) that never saw its family.
    #[serde(skip)]
    pub held_out: Option<HeldOutScores>,
}

/// Scores of training samples predicted with their family held out ([`fit_heads`]).
#[derive(Clone, Debug)]
pub struct HeldOutScores {
    /// Samples of the training features, and p(class 1) of each.
    pub idx: Vec<usize>,
    pub scores: Vec<f32>,
}

pub const WEIGHT_DECAYS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];
/// Training samples the layer search fits on (seeded subsample): the search compares
/// layers, the final fit uses every sample.
const LAYER_SEARCH_SAMPLES: usize = 20_000;

fn subsample(x: &[f32], y: &[bool], w: &[f64], d: usize, n: usize) -> (Vec<f32>, Vec<bool>, Vec<f64>) {
    if y.len() <= n {
        return (x.to_vec(), y.to_vec(), w.to_vec());
    }
    use rand::{seq::SliceRandom, SeedableRng};
    let mut idx: Vec<usize> = (0..y.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0x5eed));
    idx.truncate(n);
    idx.sort_unstable();
    let xs = idx.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect();
    (xs, idx.iter().map(|&i| y[i]).collect(), idx.iter().map(|&i| w[i]).collect())
}

/// A labelled set for one head: features, labels and fit weights.
struct Labelled {
    x: Vec<f32>,
    y: Vec<bool>,
    w: Vec<f64>,
    /// The samples of the features the rows are.
    idx: Vec<usize>,
}

fn val_loss(train: &Labelled, d: usize, wd: f64, val: &Labelled) -> Result<f64> {
    let f = logistic::fit(&train.x, d, &train.y, Some(&train.w), wd)?;
    Ok(logistic::weighted_loss(
        &f.logits(&val.x, d),
        &val.y,
        &logistic::balanced_sample_weights(&val.y, Some(&val.w)),
    ))
}

/// What one answer's read tokens weigh together against one prompt in a heads fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum AnswerWeight {
    /// Every read token weighs as much as a prompt.
    Tokens,
    /// An answer's read tokens together weigh this many prompts.
    Fixed(f64),
    /// Chosen with the weight decay from [`ANSWER_WEIGHTS`] × [`FAMILY_WEIGHT_DECAYS`] by
    /// [`family_criterion`]: the validation split shares its families with the training
    /// rows and rewards source recognition, which does not carry to new families.
    ByFamilies,
}

pub const ANSWER_WEIGHTS: [f64; 4] = [0.25, 1.0, 4.0, 16.0];
const FAMILY_FOLDS: usize = 5;
/// The middle of [`WEIGHT_DECAYS`]: the ends were never chosen on validation, and each
/// value costs a fit per fold and answer weight.
const FAMILY_WEIGHT_DECAYS: [f64; 3] = [1e-3, 1e-2, 1e-1];

/// The fold of each of the samples `idx`: their families (or sources) in sorted order dealt
/// round the `k` folds, so a family is never split across folds. `None` with fewer than
/// `k` families among them.
fn family_folds(f: &Features, idx: &[usize], k: usize) -> Option<Vec<usize>> {
    let group = |i: usize| f.examples[f.samples[i].row].group();
    let families: std::collections::BTreeSet<&str> = idx.iter().map(|&i| group(i)).collect();
    if families.len() < k {
        return None;
    }
    let fold: std::collections::HashMap<&str, usize> =
        families.into_iter().enumerate().map(|(i, g)| (g, i % k)).collect();
    Some(idx.iter().map(|&i| fold[group(i)]).collect())
}

/// Out-of-fold logits with whole families held out: each fold of families is predicted by a
/// fit (weight decay `wd`, on at most `max_samples` samples) on the other folds. A fold
/// whose other folds hold one class only is not predicted (`None`). `x`, `y`, `w` as one
/// head's labelled set, `folds` per row.
#[allow(clippy::too_many_arguments)]
fn family_oof_logits(
    x: &[f32],
    y: &[bool],
    w: &[f64],
    folds: &[usize],
    d: usize,
    wd: f64,
    max_samples: usize,
) -> Result<Vec<Option<f64>>> {
    let mut logits = vec![None; y.len()];
    for j in 0..FAMILY_FOLDS {
        let (mut tx, mut ty, mut tw) = (Vec::new(), Vec::new(), Vec::new());
        let mut held = Vec::new();
        for (i, &fold) in folds.iter().enumerate() {
            if fold == j {
                held.push(i);
            } else {
                tx.extend_from_slice(&x[i * d..(i + 1) * d]);
                ty.push(y[i]);
                tw.push(w[i]);
            }
        }
        if held.is_empty() || !(ty.iter().any(|&v| v) && ty.iter().any(|&v| !v)) {
            continue;
        }
        let (sx, sy, sw) = subsample(&tx, &ty, &tw, d, max_samples);
        let fit = logistic::fit(&sx, d, &sy, Some(&sw), wd)?;
        let hx: Vec<f32> = held.iter().flat_map(|&i| x[i * d..(i + 1) * d].iter().copied()).collect();
        for (&i, z) in held.iter().zip(fit.logits(&hx, d)) {
            logits[i] = Some(z);
        }
    }
    Ok(logits)
}

/// [`family_oof_logits`] (at most [`LAYER_SEARCH_SAMPLES`] samples per fit) scored as half
/// the class-balanced loss on prompts and half on answers (each answer's tokens together
/// one unit), so that the score does not depend on the answer weight being compared. Rows
/// not predicted are not scored; `None` when none could be. `idx`: the rows' samples.
#[allow(clippy::too_many_arguments)]
fn family_criterion(
    f: &Features,
    x: &[f32],
    y: &[bool],
    w: &[f64],
    idx: &[usize],
    folds: &[usize],
    d: usize,
    wd: f64,
) -> Result<Option<f64>> {
    let oof = family_oof_logits(x, y, w, folds, d, wd, LAYER_SEARCH_SAMPLES)?;
    let predicted: Vec<bool> = oof.iter().map(Option::is_some).collect();
    let logits: Vec<f64> = oof.iter().map(|z| z.unwrap_or(0.0)).collect();
    let prompt = |i: usize| matches!(f.samples[idx[i]].kind, SampleKind::Prompt(_));
    let part = |keep: &dyn Fn(usize) -> bool, unit_w: &dyn Fn(usize) -> f64| {
        let sel: Vec<usize> = (0..y.len()).filter(|&i| predicted[i] && keep(i)).collect();
        let sy: Vec<bool> = sel.iter().map(|&i| y[i]).collect();
        if !(sy.iter().any(|&v| v) && sy.iter().any(|&v| !v)) {
            return None;
        }
        let sw: Vec<f64> = sel.iter().map(|&i| unit_w(i)).collect();
        let z: Vec<f64> = sel.iter().map(|&i| logits[i]).collect();
        Some(logistic::weighted_loss(&z, &sy, &logistic::balanced_sample_weights(&sy, Some(&sw))))
    };
    let per_answer = f.sample_weights(idx, Some(1.0));
    let p = part(&|i| prompt(i), &|_| 1.0);
    let a = part(&|i| !prompt(i), &|i| per_answer[i]);
    Ok(match (p, a) {
        (Some(p), Some(a)) => Some((p + a) / 2.0),
        (Some(l), None) | (None, Some(l)) => Some(l),
        (None, None) => None,
    })
}

/// The heads-only fit, each head at the layer of `train.layers` with the lowest
/// class-weighted validation loss (the only layer without `val`), prompts read at
/// `position`, an answer's tokens together weighing `answer_weight` prompts (in the fit
/// and in the validation loss alike). The weight decay is `weight_decay` if given, else
/// the one [`AnswerWeight::ByFamilies`] chose with the answer weight, else (with `val`)
/// the one of [`WEIGHT_DECAYS`] with the lowest validation loss, else 1e-2. With
/// `held_out_scores`, each head's [`HeldOutScores`] are computed with its final setting
/// (five more fits on all samples) for [`held_out_thresholds`].
pub fn fit_heads(
    train: &Features,
    val: Option<&Features>,
    weight_decay: Option<f64>,
    answer_weight: AnswerWeight,
    position: VerdictPosition,
    current: (&Heads, &HeadsConfig),
    held_out_scores: bool,
) -> Result<(Heads, HeadsConfig, Vec<HeadFitReport>)> {
    if let AnswerWeight::Fixed(w) = answer_weight {
        if !(w.is_finite() && w > 0.0) {
            return Err(Error::Invalid(format!(
                "answer weight {w}: expected a finite number > 0"
            )));
        }
    }
    let (mut heads, mut setting) = (current.0.clone(), current.1.clone());
    let d = train.hidden;
    let mut reports = Vec::new();
    let both = |y: &[bool]| y.iter().any(|&v| v) && y.iter().any(|&v| !v);
    // Until the families choose one, the weighting asked for (tokens for `ByFamilies`).
    let given = match answer_weight {
        AnswerWeight::Fixed(w) => Some(w),
        AnswerWeight::Tokens | AnswerWeight::ByFamilies => None,
    };
    let labelled = |f: &Features, h: usize, layer: usize, answer_weight: Option<f64>| {
        let (x, y, idx) = f.labelled(h, layer, position);
        let w = f.sample_weights(&idx, answer_weight);
        Labelled { x, y, w, idx }
    };
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
            val.map(|v| labelled(v, h, layer, given))
                .filter(|l| both(&l.y))
        };
        let mut layer_search = Vec::new();
        let mut layer = last;
        if train.layers.len() > 1 && val_of(last).is_some() {
            let mut best = f64::INFINITY;
            for &l in &train.layers {
                let t = labelled(train, h, l, given);
                let (x, y, w) = subsample(&t.x, &t.y, &t.w, d, LAYER_SEARCH_SAMPLES);
                let v = val_of(l).expect("checked above");
                let loss = val_loss(&Labelled { x, y, w, idx: Vec::new() }, d, 1e-2, &v)?;
                layer_search.push((l, loss));
                if loss < best {
                    (best, layer) = (loss, l);
                }
            }
        }
        // Answer weight and weight decay by held-out families, when asked.
        let mut family_search = Vec::new();
        let (answer_weight, family_wd) = match answer_weight {
            AnswerWeight::Fixed(_) | AnswerWeight::Tokens => (given, None),
            AnswerWeight::ByFamilies => {
                let (x, y, idx) = train.labelled(h, layer, position);
                let wds: Vec<f64> = match weight_decay {
                    Some(wd) => vec![wd],
                    None => FAMILY_WEIGHT_DECAYS.to_vec(),
                };
                let mut best = None;
                if let Some(folds) = family_folds(train, &idx, FAMILY_FOLDS) {
                    for &aw in &ANSWER_WEIGHTS {
                        let w = train.sample_weights(&idx, Some(aw));
                        for &wd in &wds {
                            let Some(c) = family_criterion(train, &x, &y, &w, &idx, &folds, d, wd)?
                            else {
                                continue;
                            };
                            family_search.push((aw, wd, c));
                            if best.is_none_or(|(b, _, _)| c < b) {
                                best = Some((c, aw, wd));
                            }
                        }
                    }
                }
                match best {
                    Some((_, aw, wd)) => (Some(aw), Some(wd)),
                    None => {
                        tracing::warn!("the {name} head's labelled rows do not span {FAMILY_FOLDS} families with both classes to hold out: every answer token weighs 1");
                        (None, None)
                    }
                }
            }
        };
        let t = labelled(train, h, layer, answer_weight);
        let mut search = Vec::new();
        let chosen = match (weight_decay.or(family_wd), val_of(layer)) {
            (Some(wd), _) => wd,
            (None, Some(v)) => {
                let mut best = (f64::INFINITY, 1e-2);
                for wd in WEIGHT_DECAYS {
                    let loss = val_loss(&t, d, wd, &v)?;
                    search.push((wd, loss));
                    if loss < best.0 {
                        best = (loss, wd);
                    }
                }
                best.1
            }
            (None, None) => 1e-2,
        };
        let f = logistic::fit(&t.x, d, &t.y, Some(&t.w), chosen)?;
        let held_out = match held_out_scores.then(|| family_folds(train, &t.idx, FAMILY_FOLDS)) {
            Some(Some(folds)) => {
                let z = family_oof_logits(&t.x, &t.y, &t.w, &folds, d, chosen, usize::MAX)?;
                let (idx, scores) = t
                    .idx
                    .iter()
                    .zip(z)
                    .filter_map(|(&k, z)| z.map(|z| (k, (1.0 / (1.0 + (-z).exp())) as f32)))
                    .unzip();
                Some(HeldOutScores { idx, scores })
            }
            Some(None) => {
                tracing::warn!("the {name} head's labelled rows span fewer than {FAMILY_FOLDS} families: no held-out scores");
                None
            }
            None => None,
        };
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
            rows: t.y.len(),
            positives: t.y.iter().filter(|&&v| v).count(),
            answer_weight,
            weight_decay: chosen,
            newton_iterations: f.iterations,
            train_loss: f.loss,
            layer_search,
            weight_decay_search: search,
            family_search,
            held_out,
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
    /// What the thresholds were chosen on: `validation` or `held-out families`.
    pub chosen_on: &'static str,
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

/// The lowest thresholds of head `h` whose false positive rate on the scored samples
/// `idx` of `f` is at most `target_fpr`: one on prompts (safe prompts flagged unsafe;
/// handle requests escalated), one on answers under the streaming rule of `consecutive`
/// tokens (benign answers flagged). `None` without prompts of both classes.
#[allow(clippy::too_many_arguments)]
fn head_thresholds(
    f: &Features,
    scores: &[f32],
    idx: &[usize],
    h: usize,
    position: VerdictPosition,
    consecutive: usize,
    target_fpr: f64,
    chosen_on: &'static str,
) -> Option<ThresholdReport> {
    let (ps, py): (Vec<f32>, Vec<bool>) = idx
        .iter()
        .zip(scores)
        .filter(|(&k, _)| matches!(f.samples[k].kind, SampleKind::Prompt(_)))
        .map(|(&k, &s)| (s, f.label(&f.samples[k], h, position).unwrap()))
        .unzip();
    if py.iter().all(|&v| v) || py.iter().all(|&v| !v) {
        return None;
    }
    let prompt_threshold = threshold_for_fpr(&ps, &py, target_fpr);
    let (rs, ry) = response_rule_scores(f, scores, idx, h, consecutive);
    // Only where there are answers of both classes: a threshold set from benign answers
    // alone would flag target_fpr of them for nothing it was shown to catch. Otherwise
    // the prompt's threshold applies to answers too.
    let response_threshold = (ry.iter().any(|&v| v) && ry.iter().any(|&v| !v))
        .then(|| threshold_for_fpr(&rs, &ry, target_fpr));
    // A benign score of exactly 1 (saturated softmax) puts the bound just above 1:
    // nothing can be flagged then, and 1 says the same as a probability.
    let prompt_threshold = prompt_threshold.min(1.0);
    let response_threshold = response_threshold.map(|r| r.min(1.0));
    Some(ThresholdReport {
        head: HEAD_NAMES[h],
        target_fpr,
        prompt_threshold,
        response_threshold,
        chosen_on,
        validation: binary_metrics(&ps, &py, prompt_threshold),
        response_validation: response_threshold.map(|r| binary_metrics(&rs, &ry, r)),
    })
}

fn set_thresholds(t: &mut Thresholds, h: usize, r: &ThresholdReport) {
    if h == 0 {
        t.unsafe_ = r.prompt_threshold;
        t.response_unsafe = r.response_threshold;
    } else {
        t.escalate = r.prompt_threshold;
        t.response_escalate = r.response_threshold;
    }
}

/// Per head, the thresholds of [`head_thresholds`] on the validation split. `val` must
/// hold every response token.
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
        let k = current.consecutive;
        if let Some(r) = head_thresholds(val, &scores, &idx, h, position, k, target_fpr, "validation") {
            set_thresholds(&mut t, h, &r);
            reports.push(r);
        }
    }
    Ok((t, reports))
}

/// Per head, the thresholds of [`head_thresholds`] on its [`HeldOutScores`]: the score
/// distribution of families the head has not seen, which is what a new source of traffic
/// is. The validation split shares its families with the training rows, and thresholds set
/// there sit too high or too low for new ones. The training pass reads at most
/// `--response-tokens` of each answer, so the streaming rule runs over those. A head
/// without held-out scores keeps its thresholds.
pub fn held_out_thresholds(
    train: &Features,
    reports: &[HeadFitReport],
    position: VerdictPosition,
    target_fpr: f64,
    current: &Thresholds,
) -> (Thresholds, Vec<ThresholdReport>) {
    let mut t = current.clone();
    let mut out = Vec::new();
    for r in reports {
        let Some(s) = &r.held_out else { continue };
        let h = HEAD_NAMES.iter().position(|&n| n == r.head).expect("a head's name");
        let k = current.consecutive;
        let chosen = "held-out families";
        if let Some(r) = head_thresholds(train, &s.scores, &s.idx, h, position, k, target_fpr, chosen) {
            set_thresholds(&mut t, h, &r);
            out.push(r);
        }
    }
    (t, out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::train::{data::Example, Sample};
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

    /// With families to hold out, `ByFamilies` tries every answer weight and weight decay
    /// and uses the pair with the lowest held-out-family loss; with one family it falls
    /// back to token weights.
    #[test]
    fn answer_weight_by_families_searches_the_grid() {
        let mut train = synthetic(400, 3);
        let heads = Heads::zeros(4).unwrap();
        let fit = |train: &Features| {
            fit_heads(
                train,
                None,
                None,
                AnswerWeight::ByFamilies,
                VerdictPosition::AssistantHeader,
                (&heads, &HeadsConfig::default()),
                false,
            )
            .unwrap()
            .2
        };
        let r = &fit(&train)[0];
        assert!(r.family_search.is_empty() && r.answer_weight.is_none(), "{r:?}");
        for (i, e) in train.examples.iter_mut().enumerate() {
            e.family = Some(format!("family {}", i % 12));
        }
        let r = &fit(&train)[0];
        assert_eq!(r.family_search.len(), ANSWER_WEIGHTS.len() * FAMILY_WEIGHT_DECAYS.len());
        let best = r
            .family_search
            .iter()
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .unwrap();
        assert_eq!((r.answer_weight, r.weight_decay), (Some(best.0), best.1));
        assert!(best.2 < 0.5, "the signal is linear and shared by every family: {best:?}");
    }

    #[test]
    fn the_layer_with_the_signal_is_chosen_and_thresholds_hold_on_answers() {
        let (train, val) = (synthetic(400, 1), synthetic(200, 2));
        let heads = Heads::zeros(4).unwrap();
        let (heads, setting, reports) = fit_heads(
            &train,
            Some(&val),
            None,
            AnswerWeight::Fixed(1.0),
            VerdictPosition::AssistantHeader,
            (&heads, &HeadsConfig::default()),
            false,
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

    /// Scores of families held out in turn set thresholds that hold on a family never
    /// seen: at most about the target's share of its benign prompts flagged.
    #[test]
    fn held_out_family_scores_set_thresholds_for_new_families() {
        let mut train = synthetic(600, 4);
        for (i, e) in train.examples.iter_mut().enumerate() {
            e.family = Some(format!("family {}", i % 10));
        }
        let heads = Heads::zeros(4).unwrap();
        let position = VerdictPosition::AssistantHeader;
        let (heads, _, reports) = fit_heads(
            &train,
            None,
            Some(1e-2),
            AnswerWeight::Fixed(1.0),
            position,
            (&heads, &HeadsConfig::default()),
            true,
        )
        .unwrap();
        let held = reports[0].held_out.as_ref().unwrap();
        let (_, _, idx) = train.labelled(0, 2, position);
        assert_eq!(held.idx, idx, "every labelled sample is predicted");
        // each prediction comes from a fit without its family, not from the final head
        let (x, _, _) = train.labelled(0, 2, position);
        let own = head_scores(&heads, 0, &x, 4).unwrap();
        assert!(own.iter().zip(&held.scores).any(|(a, b)| (a - b).abs() > 1e-4));
        let (t, r) = held_out_thresholds(&train, &reports, position, 0.05, &Thresholds::default());
        assert_eq!((r.len(), r[0].chosen_on), (1, "held-out families"));
        assert!(r[0].validation.fpr <= 0.05, "{r:?}");
        assert_eq!((t.unsafe_, t.response_unsafe), (r[0].prompt_threshold, r[0].response_threshold));
        let new = synthetic(400, 5);
        let (x, y, idx) = new.labelled(0, 2, position);
        let scores = head_scores(&heads, 0, &x, 4).unwrap();
        let prompts: Vec<(f32, bool)> = idx
            .iter()
            .zip(scores.iter().zip(&y))
            .filter(|(&k, _)| matches!(new.samples[k].kind, SampleKind::Prompt(_)))
            .map(|(_, (&s, &y))| (s, y))
            .collect();
        let (s, y): (Vec<f32>, Vec<bool>) = prompts.into_iter().unzip();
        let on_new = binary_metrics(&s, &y, t.unsafe_);
        assert!(on_new.fpr <= 0.10 && on_new.recall > 0.8, "{on_new:?}");
    }
}
