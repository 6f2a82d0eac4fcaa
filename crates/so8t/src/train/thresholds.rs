//! Decision thresholds (spec §5): per head, one on prompts and one on answers under the
//! streaming rule, at a target false positive rate on validation data or on the scores
//! whole training families get from fits that never saw them.

use super::{Features, SampleKind, HEAD_NAMES};
use crate::error::Result;
use crate::eval::metrics::{auroc, binary_metrics, both_classes, threshold_for_fpr, BinaryMetrics};
use crate::so8::verdict::{rule_score, Heads, HeadsConfig, Thresholds, VerdictPosition};
use serde::Serialize;

/// Scores of training samples predicted with their family held out
/// ([`super::heads::fit_heads`]).
#[derive(Clone, Debug)]
pub struct HeldOutScores {
    /// The head (0 safety, 1 authority).
    pub head: usize,
    /// Samples of the training features, and p(class 1) of each.
    pub idx: Vec<usize>,
    pub scores: Vec<f32>,
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

/// Per answer of `f` labelled for `head`: its row, the score at which the streaming rule of
/// `k` consecutive tokens fires ([`rule_score`]) and its label. `f` must hold every
/// response token.
fn answers_under_rule(
    f: &Features,
    scores: &[f32],
    idx: &[usize],
    head: usize,
    k: usize,
) -> Vec<(usize, f32, bool)> {
    let mut per_row: std::collections::BTreeMap<usize, Vec<(usize, f32)>> = Default::default();
    for (&k_s, &sc) in idx.iter().zip(scores) {
        if let SampleKind::Response { token } = f.samples[k_s].kind {
            per_row.entry(f.samples[k_s].row).or_default().push((token, sc));
        }
    }
    per_row
        .into_iter()
        .filter_map(|(row, mut toks)| {
            let label = f.examples[row].response_label(head)?;
            toks.sort_by_key(|t| t.0);
            let p: Vec<f32> = toks.iter().map(|t| t.1).collect();
            Some((row, rule_score(&p, k), label))
        })
        .collect()
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
    answers_under_rule(f, scores, idx, head, k)
        .into_iter()
        // A benign answer to a flagged request (a refusal) is decided by the prompt; the
        // rule decides the answers to requests that pass, so those are its negatives.
        .filter(|&(row, _, label)| label || f.examples[row].label(head) != Some(true))
        .map(|(_, s, l)| (s, l))
        .unzip()
}

/// How one training family's answers fare under the streaming rule when scored by fits
/// that never saw the family: every answer, benign answers to class-1 requests included,
/// as `eval` counts a held-out family's answers.
#[derive(Clone, Debug, Serialize)]
pub struct FamilyAnswers {
    pub family: String,
    pub answers: usize,
    pub class_1: usize,
    /// Share flagged at the head's answer threshold.
    pub flagged: f64,
    /// Within the family (`null` with one class only).
    pub auroc: Option<f64>,
}

/// [`FamilyAnswers`] per family of the answers `s` scores, under the rule of `k` tokens at
/// `threshold`: the training-side counterpart of a held-out family's answer metrics, to
/// compare fitting choices without looking at the held-out test families.
pub fn held_out_answers_by_family(f: &Features, s: &HeldOutScores, k: usize, threshold: f32) -> Vec<FamilyAnswers> {
    let mut by: std::collections::BTreeMap<&str, (Vec<f32>, Vec<bool>)> = Default::default();
    for (row, score, label) in answers_under_rule(f, &s.scores, &s.idx, s.head, k) {
        let e = by.entry(f.examples[row].group()).or_default();
        e.0.push(score);
        e.1.push(label);
    }
    by.into_iter()
        .map(|(family, (sc, y))| FamilyAnswers {
            family: family.to_string(),
            answers: y.len(),
            class_1: y.iter().filter(|&&v| v).count(),
            flagged: sc.iter().filter(|&&v| v >= threshold).count() as f64 / y.len() as f64,
            auroc: both_classes(&y).then(|| auroc(&sc, &y)),
        })
        .collect()
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
    let response_threshold = both_classes(&ry)
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
    t.set_head(h, r.prompt_threshold, r.response_threshold);
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
        let scores = heads.scores(h, &x, val.hidden)?;
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
/// there sit too high or too low for new ones. The streaming rule runs over the answer
/// tokens `train` holds: all of them for a threshold that holds on whole answers. A head
/// without held-out scores keeps its thresholds.
pub fn held_out_thresholds(
    train: &Features,
    scores: &[&HeldOutScores],
    position: VerdictPosition,
    target_fpr: f64,
    current: &Thresholds,
) -> (Thresholds, Vec<ThresholdReport>) {
    let mut t = current.clone();
    let mut out = Vec::new();
    for s in scores {
        let (h, k) = (s.head, current.consecutive);
        let chosen = "held-out families";
        if let Some(r) = head_thresholds(train, &s.scores, &s.idx, h, position, k, target_fpr, chosen) {
            set_thresholds(&mut t, h, &r);
            out.push(r);
        }
    }
    (t, out)
}
