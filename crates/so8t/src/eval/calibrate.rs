//! Thresholds for a quantised export that decide as its source does (issue #13, item 6).
//!
//! Quantising the weights moves every score a little, and mostly one way (Qwen2.5-Coder's
//! Q4_K_M export lowers p_unsafe: 14 of its 16 changed decisions on the test split were
//! refuse → allow), so the rows near a threshold change their decision. `export
//! --calibrate ROWS` scores labelled rows with the source and with the export, and moves
//! each of the export's four thresholds (prompt and answer, per head) by the median
//! change of the scores near it ([`shifted_threshold`]). The rows are the
//! validation split, never the test split: what the test split shows is then whether the
//! shift carries to rows it was not fitted on.

use crate::artifact::export::{export, export_with_thresholds, ExportReport, Quant};
use crate::error::Result;
use crate::so8::verdict::Thresholds;
use crate::train::data::read_jsonl;
use crate::Model;
use serde::Serialize;
use std::path::Path;

/// What calibration did to one threshold.
#[derive(Clone, Debug, Serialize)]
pub struct ThresholdShift {
    /// `prompt_unsafe`, `prompt_escalate`, `answer_unsafe` or `answer_escalate`.
    pub score: &'static str,
    pub source: f32,
    pub export: f32,
    /// Rows scored (answers only for the answer thresholds), and of them those whose flag
    /// differs from the source's, at the source's threshold and at the calibrated one.
    pub rows: usize,
    pub differ_before: usize,
    pub differ_after: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct Calibration {
    pub rows: usize,
    pub thresholds: Thresholds,
    pub shifts: Vec<ThresholdShift>,
}

/// Rows whose source score lies within this many logits of the threshold estimate the
/// shift there (e² in odds either way); with fewer than [`MIN_NEAR`] of them, every row.
const NEAR_LOGITS: f64 = 2.0;
const MIN_NEAR: usize = 20;

fn logit(p: f32) -> f64 {
    let p = (p as f64).clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

/// The threshold on `export` scores for `source` scores flagged at `threshold`: moved by
/// the median change, in logits, of the rows' scores near the threshold. One number
/// estimated from many rows follows the export's systematic shift without chasing
/// single rows (a search for the threshold with the fewest differing flags would fit
/// the calibration rows' noise). Returns it with the number of rows whose flag differs
/// from the source's at `threshold` and at the moved threshold. A threshold of 0 or 1
/// (nothing or everything flagged) stays.
pub fn shifted_threshold(source: &[f32], export: &[f32], threshold: f32) -> (f32, usize, usize) {
    let differ = |t: f32| {
        source.iter().zip(export).filter(|(&s, &e)| (s >= threshold) != (e >= t)).count()
    };
    let before = differ(threshold);
    if !(threshold > 0.0 && threshold < 1.0) || source.is_empty() {
        return (threshold, before, before);
    }
    let at = logit(threshold);
    let change = |near: bool| -> Vec<f64> {
        source
            .iter()
            .zip(export)
            .filter(|(&s, _)| !near || (logit(s) - at).abs() <= NEAR_LOGITS)
            .map(|(&s, &e)| logit(e) - logit(s))
            .collect()
    };
    let mut d = change(true);
    if d.len() < MIN_NEAR {
        d = change(false);
    }
    d.sort_by(f64::total_cmp);
    let median = if d.len() % 2 == 1 { d[d.len() / 2] } else { (d[d.len() / 2 - 1] + d[d.len() / 2]) / 2.0 };
    let moved = crate::train::logistic::sigmoid(at + median) as f32;
    (moved, before, differ(moved))
}

/// `source`'s thresholds moved for `export`, from both models' scores of the same rows:
/// per head, the prompt threshold over every row's first occurrence of its prompt, the
/// answer threshold over the rows with an answer (the streaming rule's scores).
pub fn calibrate(
    source: &[super::RowScore],
    export: &[super::RowScore],
    has_answer: &[bool],
    thresholds: &Thresholds,
) -> Calibration {
    let mut t = thresholds.clone();
    let mut shifts = Vec::new();
    let (prompt, answer) = (thresholds.prompt(), thresholds.response());
    let mut shift = |score: &'static str, pairs: Vec<(f32, f32)>, at: f32| {
        let (s, e): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
        let (moved, differ_before, differ_after) = shifted_threshold(&s, &e, at);
        shifts.push(ThresholdShift { score, source: at, export: moved, rows: s.len(), differ_before, differ_after });
        moved
    };
    for h in 0..2 {
        let prompts = source
            .iter()
            .zip(export)
            .filter(|(s, _)| s.first_of_prompt)
            .map(|(s, e)| (s.prompt.head(h), e.prompt.head(h)))
            .collect();
        let moved = shift(["prompt_unsafe", "prompt_escalate"][h], prompts, prompt[h]);
        let answers = source
            .iter()
            .zip(export)
            .zip(has_answer)
            .filter(|(_, &a)| a)
            .map(|((s, e), _)| (s.rule_score[h], e.rule_score[h]))
            .collect();
        let moved_answer = shift(["answer_unsafe", "answer_escalate"][h], answers, answer[h]);
        t.set_head(h, moved, Some(moved_answer));
    }
    Calibration { rows: source.len(), thresholds: t, shifts }
}

/// Exports `src` at `quant` to `out` with thresholds calibrated on the labelled `rows`
/// (see the module's comment): a first export is scored beside `src` (both through the
/// runtime path, as `eval` scores), then `out` is written with the moved thresholds. The
/// first export lives in `out`'s hidden staging directory and goes with it.
pub fn export_calibrated(
    src: &Path,
    out: &Path,
    quant: Quant,
    rows: &Path,
    mut progress: impl FnMut(usize, usize, u64),
) -> Result<(ExportReport, Calibration)> {
    let mut model = Model::open(src)?;
    let Some(state) = model.so8t.as_ref() else {
        return Err(crate::error::Error::format(src, "has no SO8T heads to calibrate"));
    };
    let (labels, thresholds) = (state.config.labels.clone(), state.config.thresholds.clone());
    let data = read_jsonl(rows, &labels, false)?;
    let has_answer: Vec<bool> = data.examples.iter().map(|e| e.response.is_some()).collect();
    let source = super::score_rows(&mut model, &data, |_| {})?;
    drop(model);
    crate::staging::write_file(out, |tmp| {
        let first = tmp.with_file_name("calibration.gguf");
        export(src, &first, quant, &mut progress)?;
        let exported = super::score_rows(&mut Model::open(&first)?, &data, |_| {})?;
        std::fs::remove_file(&first).map_err(|e| crate::error::Error::io(&first, e))?;
        let c = calibrate(&source, &exported, &has_answer, &thresholds);
        let report = export_with_thresholds(src, tmp, quant, Some(&c.thresholds), &mut progress)?;
        Ok((report, c))
    })
}

#[cfg(test)]
mod tests {
    use super::{logit, shifted_threshold};

    fn sigmoid(z: f64) -> f32 {
        (1.0 / (1.0 + (-z).exp())) as f32
    }

    /// An export that lowers every score by 0.3 logits gets a threshold 0.3 logits lower,
    /// and then flags what the source flags; scores that do not move leave it where it
    /// was; noise that goes both ways barely moves it.
    #[test]
    fn the_threshold_follows_a_shift_of_the_scores() {
        let source: Vec<f32> = (0..200).map(|i| sigmoid(-4.0 + 8.0 * i as f64 / 199.0)).collect();
        let export: Vec<f32> = source.iter().map(|&s| sigmoid(logit(s) - 0.3)).collect();
        let (t, before, after) = shifted_threshold(&source, &export, 0.6);
        assert!(before > 0 && after == 0, "{before} {after}");
        assert!((logit(t) - (logit(0.6) - 0.3)).abs() < 1e-4, "{t}");
        assert_eq!(shifted_threshold(&source, &source, 0.6), (0.6, 0, 0));
        let noisy: Vec<f32> = source
            .iter()
            .enumerate()
            .map(|(i, &s)| sigmoid(logit(s) + if i % 2 == 0 { 0.2 } else { -0.2 }))
            .collect();
        let (t, _, _) = shifted_threshold(&source, &noisy, 0.6);
        assert!((logit(t) - logit(0.6)).abs() <= 0.2 + 1e-6, "{t}");
        assert_eq!(shifted_threshold(&source, &export, 1.0).0, 1.0);
    }
}
