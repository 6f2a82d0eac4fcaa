//! The heads-only fit on cached hidden states (spec §5, §6): each head's layer, answer
//! weight and weight decay, chosen on validation data or on whole training families held
//! out in turn; and the scores those held-out fits give, for [`super::thresholds`].

use super::data::Example;
use super::thresholds::HeldOutScores;
use super::{logistic, Features, SampleKind, HEAD_NAMES};
use crate::eval::metrics::both_classes;
use crate::error::{Error, Result};
use crate::so8::verdict::{Heads, HeadsConfig, VerdictPosition};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

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

pub const WEIGHT_DECAYS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];
/// Training samples the layer search fits on (seeded subsample): the search compares
/// layers, the final fit uses every sample.
const LAYER_SEARCH_SAMPLES: usize = 20_000;

/// A labelled set for one head: features, labels and fit weights.
struct Labelled {
    x: Vec<f32>,
    y: Vec<bool>,
    w: Vec<f64>,
    /// The samples of the features the rows are.
    idx: Vec<usize>,
}

impl Labelled {
    /// At most `n` of the rows (seeded subsample).
    fn subsample(&self, d: usize, n: usize) -> Labelled {
        if self.y.len() <= n {
            return self.rows(d, 0..self.y.len());
        }
        use rand::{seq::SliceRandom, SeedableRng};
        let mut idx: Vec<usize> = (0..self.y.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0x5eed));
        idx.truncate(n);
        idx.sort_unstable();
        self.rows(d, idx)
    }

    fn rows(&self, d: usize, rows: impl IntoIterator<Item = usize>) -> Labelled {
        let mut l = Labelled { x: Vec::new(), y: Vec::new(), w: Vec::new(), idx: Vec::new() };
        for i in rows {
            l.x.extend_from_slice(&self.x[i * d..(i + 1) * d]);
            l.y.push(self.y[i]);
            l.w.push(self.w[i]);
            l.idx.push(self.idx[i]);
        }
        l
    }
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

/// The grid [`AnswerWeight::ByFamilies`] starts from. Fixed grids were outgrown twice (the
/// best point sat on their edge, the held-out-family loss still falling towards it), so
/// the search now walks outward by itself: see [`family_grid_search`].
pub const ANSWER_WEIGHTS: [f64; 4] = [1.0, 4.0, 16.0, 64.0];
pub const FAMILY_FOLDS: usize = 5;
/// The upper part of [`WEIGHT_DECAYS`]; each value costs a fit per fold and answer weight.
const FAMILY_WEIGHT_DECAYS: [f64; 3] = [1e-2, 1e-1, 1.0];
/// How far the walk may go: answer weights are multiplied or divided by 4 a step, weight
/// decays by 10, within these bounds (a bound is an edge the search may end on).
const ANSWER_WEIGHT_RANGE: (f64, f64) = (1.0 / 16.0, 4096.0);
const WEIGHT_DECAY_RANGE: (f64, f64) = (1e-4, 10.0);

/// The fold of each family (or source) of the examples labelled for head `h`: in sorted
/// order, dealt round [`FAMILY_FOLDS`] folds, so a family is never split across folds.
/// `None` with fewer families than folds.
pub fn family_folds(examples: &[Example], h: usize) -> Option<HashMap<&str, usize>> {
    let families: BTreeSet<&str> = examples
        .iter()
        .filter(|e| e.label(h).is_some() || e.response_label(h).is_some())
        .map(Example::group)
        .collect();
    (families.len() >= FAMILY_FOLDS)
        .then(|| families.into_iter().enumerate().map(|(i, g)| (g, i % FAMILY_FOLDS)).collect())
}

/// The first head whose labels have both classes but span fewer families than
/// [`FAMILY_FOLDS`]: its held-out fits would have nothing to hold out.
pub fn head_short_of_families(examples: &[Example]) -> Option<&'static str> {
    (0..HEAD_NAMES.len()).find_map(|h| {
        let labels = Example::head_labels(examples, h);
        (both_classes(&labels) && family_folds(examples, h).is_none()).then_some(HEAD_NAMES[h])
    })
}

/// The fold of each of the samples `idx` of `f`.
fn sample_folds(f: &Features, folds: &HashMap<&str, usize>, idx: &[usize]) -> Vec<usize> {
    idx.iter()
        .map(|&k| folds[f.examples[f.samples[k].row].group()])
        .collect()
}

/// Out-of-fold logits with whole families held out: the rows `predict` (features, folds)
/// of each fold are predicted by a fit (weight decay `wd`, on at most `max_samples` rows)
/// on the rows of `fit` in the other folds. A fold whose other folds hold one class only
/// is not predicted (`None`).
fn family_oof_logits(
    fit: (&Labelled, &[usize]),
    predict: (&[f32], &[usize]),
    d: usize,
    wd: f64,
    max_samples: usize,
) -> Result<Vec<Option<f64>>> {
    let (px, pfolds) = predict;
    let mut logits = vec![None; pfolds.len()];
    for j in 0..FAMILY_FOLDS {
        let held: Vec<usize> = (0..pfolds.len()).filter(|&i| pfolds[i] == j).collect();
        let others = fit.0.rows(d, (0..fit.1.len()).filter(|&i| fit.1[i] != j));
        if held.is_empty() || !both_classes(&others.y) {
            continue;
        }
        let s = others.subsample(d, max_samples);
        let model = logistic::fit(&s.x, d, &s.y, Some(&s.w), wd)?;
        let hx: Vec<f32> = held.iter().flat_map(|&i| px[i * d..(i + 1) * d].iter().copied()).collect();
        for (&i, z) in held.iter().zip(model.logits(&hx, d)) {
            logits[i] = Some(z);
        }
    }
    Ok(logits)
}

/// [`family_oof_logits`] of `t` on itself (at most [`LAYER_SEARCH_SAMPLES`] rows per fit)
/// scored as half the class-balanced loss on prompts and half on answers (each answer's
/// tokens together one unit), so that the score does not depend on the answer weight
/// being compared. Rows not predicted are not scored; `None` when none could be.
fn family_criterion(f: &Features, t: &Labelled, folds: &[usize], d: usize, wd: f64) -> Result<Option<f64>> {
    let oof = family_oof_logits((t, folds), (&t.x, folds), d, wd, LAYER_SEARCH_SAMPLES)?;
    let prompt = |i: usize| matches!(f.samples[t.idx[i]].kind, SampleKind::Prompt(_));
    let per_answer = f.sample_weights(&t.idx, Some(1.0));
    let part = |keep: &dyn Fn(usize) -> bool, unit_w: &dyn Fn(usize) -> f64| {
        let sel: Vec<usize> = (0..t.y.len()).filter(|&i| oof[i].is_some() && keep(i)).collect();
        let sy: Vec<bool> = sel.iter().map(|&i| t.y[i]).collect();
        if !both_classes(&sy) {
            return None;
        }
        let sw: Vec<f64> = sel.iter().map(|&i| unit_w(i)).collect();
        let z: Vec<f64> = sel.iter().map(|&i| oof[i].expect("selected")).collect();
        Some(logistic::weighted_loss(&z, &sy, &logistic::balanced_sample_weights(&sy, Some(&sw))))
    };
    let p = part(&|i| prompt(i), &|_| 1.0);
    let a = part(&|i| !prompt(i), &|i| per_answer[i]);
    Ok(match (p, a) {
        (Some(p), Some(a)) => Some((p + a) / 2.0),
        (Some(l), None) | (None, Some(l)) => Some(l),
        (None, None) => None,
    })
}

/// The (answer weight, weight decay) pair of the lowest `criterion`, over a grid that
/// starts as `aws` × `wds` and, while the best pair lies on an edge of it, grows one step
/// past that edge (×4 or ÷4 for answer weights, ×10 or ÷10 for weight decays, within
/// [`ANSWER_WEIGHT_RANGE`] and [`WEIGHT_DECAY_RANGE`]; a single weight decay stays as
/// given): a fixed grid would report its own edge as the optimum. Returns the best pair
/// and every pair scored with its criterion, in the order scored.
fn family_grid_search(
    mut aws: Vec<f64>,
    mut wds: Vec<f64>,
    mut criterion: impl FnMut(f64, f64) -> Result<Option<f64>>,
) -> Result<(Option<(f64, f64)>, Vec<(f64, f64, f64)>)> {
    let mut tried = std::collections::HashSet::new();
    let mut scored: Vec<(f64, f64, f64)> = Vec::new();
    let walk_wd = wds.len() > 1;
    loop {
        for &aw in &aws {
            for &wd in &wds {
                if tried.insert((aw.to_bits(), wd.to_bits())) {
                    if let Some(c) = criterion(aw, wd)? {
                        scored.push((aw, wd, c));
                    }
                }
            }
        }
        let Some(&(aw, wd, _)) = scored.iter().min_by(|a, b| a.2.total_cmp(&b.2)) else {
            return Ok((None, scored));
        };
        let edge = |v: &[f64], x: f64, hi: bool| {
            let m = if hi { v.iter().copied().fold(f64::MIN, f64::max) } else { v.iter().copied().fold(f64::MAX, f64::min) };
            x == m
        };
        let before = (aws.len(), wds.len());
        if edge(&aws, aw, true) && aw * 4.0 <= ANSWER_WEIGHT_RANGE.1 {
            aws.push(aw * 4.0);
        }
        if edge(&aws, aw, false) && aw / 4.0 >= ANSWER_WEIGHT_RANGE.0 {
            aws.push(aw / 4.0);
        }
        if walk_wd && edge(&wds, wd, true) && wd * 10.0 <= WEIGHT_DECAY_RANGE.1 * (1.0 + 1e-9) {
            wds.push(wd * 10.0);
        }
        if walk_wd && edge(&wds, wd, false) && wd / 10.0 >= WEIGHT_DECAY_RANGE.0 * (1.0 - 1e-9) {
            wds.push(wd / 10.0);
        }
        if (aws.len(), wds.len()) == before {
            return Ok((Some((aw, wd)), scored));
        }
    }
}

/// How [`fit_heads`] fits.
#[derive(Clone, Copy, Debug)]
pub struct FitOptions {
    /// `None`: the one [`AnswerWeight::ByFamilies`] chose with the answer weight, else
    /// (with validation rows) the one of [`WEIGHT_DECAYS`] with the lowest validation
    /// loss, else 1e-2.
    pub weight_decay: Option<f64>,
    /// What an answer's fitted tokens weigh together against a prompt (in the fit and in
    /// the validation loss alike).
    pub answer_weight: AnswerWeight,
    /// Where prompts are read.
    pub position: VerdictPosition,
    /// At most this many tokens of each training answer are fitted on
    /// ([`Features::response_cap_mask`]); held-out scores cover every token held.
    pub response_tokens: Option<usize>,
    /// Compute each head's [`HeldOutScores`] with its final setting (five more fits).
    pub held_out_scores: bool,
}

/// The heads-only fit, each head at the layer of `train.layers` with the lowest
/// class-weighted validation loss (the only layer without `val`).
pub fn fit_heads(
    train: &Features,
    val: Option<&Features>,
    opts: &FitOptions,
    current: (&Heads, &HeadsConfig),
) -> Result<(Heads, HeadsConfig, Vec<HeadFitReport>)> {
    if let AnswerWeight::Fixed(w) = opts.answer_weight {
        if !(w.is_finite() && w > 0.0) {
            return Err(Error::Invalid(format!(
                "answer weight {w}: expected a finite number > 0"
            )));
        }
    }
    let (mut heads, mut setting) = (current.0.clone(), current.1.clone());
    let (d, position) = (train.hidden, opts.position);
    let mut reports = Vec::new();
    // Until the families choose one, the weighting asked for (tokens for `ByFamilies`).
    let given = match opts.answer_weight {
        AnswerWeight::Fixed(w) => Some(w),
        AnswerWeight::Tokens | AnswerWeight::ByFamilies => None,
    };
    let fitted = train.response_cap_mask(opts.response_tokens);
    // The head's rows of `layer` that are fitted on, weighted for `answer_weight`.
    let fit_rows = |h: usize, layer: usize, answer_weight: Option<f64>| {
        let (x, y, idx) = train.labelled_where(h, layer, position, |k| fitted[k]);
        let w = train.sample_weights(&idx, answer_weight);
        Labelled { x, y, w, idx }
    };
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let last = *train.layers.last().expect("at least one layer");
        let y: Vec<bool> = train
            .samples
            .iter()
            .filter_map(|s| train.label(s, h, position))
            .collect();
        if !both_classes(&y) {
            tracing::warn!("no {name} labels of both classes in the training data: the {name} head is left as it was");
            continue;
        }
        let val_of = |layer: usize| {
            val.map(|v| {
                let (x, y, idx) = v.labelled(h, layer, position);
                let w = v.sample_weights(&idx, given);
                Labelled { x, y, w, idx }
            })
            .filter(|l| both_classes(&l.y))
        };
        let mut layer_search = Vec::new();
        let mut layer = last;
        if train.layers.len() > 1 && val_of(last).is_some() {
            let mut best = f64::INFINITY;
            for &l in &train.layers {
                let t = fit_rows(h, l, given).subsample(d, LAYER_SEARCH_SAMPLES);
                let loss = val_loss(&t, d, 1e-2, &val_of(l).expect("checked above"))?;
                layer_search.push((l, loss));
                if loss < best {
                    (best, layer) = (loss, l);
                }
            }
        }
        let mut t = fit_rows(h, layer, given);
        let needs_folds = opts.answer_weight == AnswerWeight::ByFamilies || opts.held_out_scores;
        let folds = needs_folds.then(|| family_folds(&train.examples, h)).flatten();
        if needs_folds && folds.is_none() {
            tracing::warn!("the {name} head's rows span fewer than {FAMILY_FOLDS} families: none is held out");
        }
        let t_folds = folds.as_ref().map(|f| sample_folds(train, f, &t.idx));
        // Answer weight and weight decay by held-out families, when asked.
        let mut family_search = Vec::new();
        let (answer_weight, family_wd) = match (opts.answer_weight, &t_folds) {
            (AnswerWeight::ByFamilies, Some(t_folds)) => {
                let wds = opts.weight_decay.map_or(FAMILY_WEIGHT_DECAYS.to_vec(), |wd| vec![wd]);
                let (best, searched) = family_grid_search(ANSWER_WEIGHTS.to_vec(), wds, |aw, wd| {
                    t.w = train.sample_weights(&t.idx, Some(aw));
                    family_criterion(train, &t, t_folds, d, wd)
                })?;
                family_search = searched;
                match best {
                    Some((aw, wd)) => (Some(aw), Some(wd)),
                    None => (None, None),
                }
            }
            _ => (given, None),
        };
        t.w = train.sample_weights(&t.idx, answer_weight);
        let mut search = Vec::new();
        let chosen = match (opts.weight_decay.or(family_wd), val_of(layer)) {
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
        let held_out = match (opts.held_out_scores, &folds, &t_folds) {
            (true, Some(folds), Some(t_folds)) => {
                // Every token held is scored, also those not fitted on: the streaming rule
                // runs over whole answers.
                let (x, _, idx) = train.labelled(h, layer, position);
                let z = family_oof_logits((&t, t_folds), (&x, &sample_folds(train, folds, &idx)), d, chosen, usize::MAX)?;
                let (idx, scores) = idx
                    .iter()
                    .zip(z)
                    .filter_map(|(&k, z)| z.map(|z| (k, (1.0 / (1.0 + (-z).exp())) as f32)))
                    .unzip();
                Some(HeldOutScores { head: h, idx, scores })
            }
            _ => None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Message;
    use crate::train::{data::Example, Sample};
    use crate::eval::metrics::binary_metrics;
    use crate::so8::verdict::Thresholds;
    use crate::train::thresholds::{choose_thresholds, held_out_answers_by_family, held_out_thresholds, response_rule_scores};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn options(weight_decay: Option<f64>, answer_weight: AnswerWeight, held_out_scores: bool) -> FitOptions {
        FitOptions {
            weight_decay,
            answer_weight,
            position: VerdictPosition::AssistantHeader,
            response_tokens: None,
            held_out_scores,
        }
    }

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

    /// A cap keeps the first half of an answer's tokens and spreads the rest; prompts and
    /// answers within the cap are kept whole.
    #[test]
    fn response_cap_keeps_the_tokens_a_capped_pass_reads() {
        assert_eq!(super::super::features::picked_tokens(10, Some(4)), vec![0, 1, 2, 6]);
        assert_eq!(super::super::features::picked_tokens(3, Some(4)), vec![0, 1, 2]);
        let f = synthetic(2, 0);
        let kept = |cap| f.response_cap_mask(cap);
        assert_eq!(kept(None), vec![true; 8]);
        // each row: prompt, tokens 0, 1, 2 → with cap 2, tokens 0 and 1
        assert_eq!(kept(Some(2)), [true, true, true, false].repeat(2));
    }

    /// With families to hold out, `ByFamilies` tries every answer weight and weight decay
    /// and uses the pair with the lowest held-out-family loss; with one family it falls
    /// back to token weights.
    #[test]
    fn answer_weight_by_families_searches_the_grid() {
        let mut train = synthetic(400, 3);
        let heads = Heads::zeros(4).unwrap();
        let fit = |train: &Features| {
            let opts = options(None, AnswerWeight::ByFamilies, false);
            fit_heads(train, None, &opts, (&heads, &HeadsConfig::default()))
            .unwrap()
            .2
        };
        let r = &fit(&train)[0];
        assert!(r.family_search.is_empty() && r.answer_weight.is_none(), "{r:?}");
        for (i, e) in train.examples.iter_mut().enumerate() {
            e.family = Some(format!("family {}", i % 12));
        }
        let r = &fit(&train)[0];
        assert!(r.family_search.len() >= ANSWER_WEIGHTS.len() * FAMILY_WEIGHT_DECAYS.len(), "{r:?}");
        let best = r
            .family_search
            .iter()
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .unwrap();
        assert_eq!((r.answer_weight, r.weight_decay), (Some(best.0), best.1));
        assert!(best.2 < 0.5, "the signal is linear and shared by every family: {best:?}");
    }

    /// The grid walks past its edges to an optimum outside it, and stops at the bounds.
    #[test]
    fn family_grid_walks_to_an_optimum_outside_the_start() {
        let bowl = |aw0: f64, wd0: f64| {
            move |aw: f64, wd: f64| -> Result<Option<f64>> {
                Ok(Some((aw / aw0).ln().powi(2) + (wd / wd0).ln().powi(2)))
            }
        };
        let start = || (ANSWER_WEIGHTS.to_vec(), FAMILY_WEIGHT_DECAYS.to_vec());
        let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-9;
        let (aws, wds) = start();
        let (best, scored) = family_grid_search(aws, wds, bowl(1024.0, 1e-3)).unwrap();
        let (aw, wd) = best.unwrap();
        assert!(close(aw, 1024.0) && close(wd, 1e-3), "{best:?} {scored:?}");
        // every pair once
        let mut keys: Vec<_> = scored.iter().map(|s| (s.0.to_bits(), s.1.to_bits())).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), scored.len());
        // an optimum beyond the bounds: the search ends on them
        let (aws, wds) = start();
        let (best, _) = family_grid_search(aws, wds, bowl(1e9, 1e-9)).unwrap();
        let (aw, wd) = best.unwrap();
        assert!(close(aw, ANSWER_WEIGHT_RANGE.1) && close(wd, WEIGHT_DECAY_RANGE.0), "{best:?}");
        // inside the start grid: nothing more is tried
        let (aws, wds) = start();
        let (best, scored) = family_grid_search(aws, wds, bowl(4.0, 0.1)).unwrap();
        assert_eq!((best, scored.len()), (Some((4.0, 0.1)), 12));
        // one given weight decay is kept
        let (best, _) = family_grid_search(ANSWER_WEIGHTS.to_vec(), vec![0.5], bowl(4.0, 1e-3)).unwrap();
        assert_eq!(best, Some((4.0, 0.5)));
    }

    #[test]
    fn the_layer_with_the_signal_is_chosen_and_thresholds_hold_on_answers() {
        let (train, val) = (synthetic(400, 1), synthetic(200, 2));
        let heads = Heads::zeros(4).unwrap();
        let opts = options(None, AnswerWeight::Fixed(1.0), false);
        let (heads, setting, reports) =
            fit_heads(&train, Some(&val), &opts, (&heads, &HeadsConfig::default())).unwrap();
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
        let scores = heads.scores(0, &x, 4).unwrap();
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
            // Row pairs share a family, so each family holds both classes.
            e.family = Some(format!("family {}", (i / 2) % 10));
        }
        let heads = Heads::zeros(4).unwrap();
        let position = VerdictPosition::AssistantHeader;
        // Fitted on two of each answer's three tokens; every token is scored.
        let opts = FitOptions {
            response_tokens: Some(2),
            ..options(Some(1e-2), AnswerWeight::Fixed(1.0), true)
        };
        let (heads, _, reports) = fit_heads(&train, None, &opts, (&heads, &HeadsConfig::default())).unwrap();
        let held = reports[0].held_out.as_ref().unwrap();
        let (_, _, idx) = train.labelled(0, 2, position);
        assert_eq!(reports[0].rows, 600 * 3);
        assert_eq!(held.idx, idx, "every labelled sample is predicted");
        // each prediction comes from a fit without its family, not from the final head
        let (x, _, _) = train.labelled(0, 2, position);
        let own = heads.scores(0, &x, 4).unwrap();
        assert!(own.iter().zip(&held.scores).any(|(a, b)| (a - b).abs() > 1e-4));
        let (t, r) = held_out_thresholds(&train, &[held], position, 0.05, &Thresholds::default());
        assert_eq!((r.len(), r[0].chosen_on), (1, "held-out families"));
        assert!(r[0].validation.fpr <= 0.05, "{r:?}");
        assert_eq!((t.unsafe_, t.response_unsafe), (r[0].prompt_threshold, r[0].response_threshold));
        // The same scores per family, as `train` reports them: every answer of each family,
        // separated within it as the signal allows.
        let fams = held_out_answers_by_family(&train, held, t.consecutive, t.response()[0]);
        assert_eq!(fams.len(), 10);
        for f in &fams {
            assert_eq!((f.answers, f.class_1), (60, 30), "{f:?}");
            assert!(f.auroc.unwrap() > 0.9 && (0.3..0.7).contains(&f.flagged), "{f:?}");
        }
        let new = synthetic(400, 5);
        let (x, y, idx) = new.labelled(0, 2, position);
        let scores = heads.scores(0, &x, 4).unwrap();
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
