//! Binary classification metrics for one head: scores are p(class 1), labels true for
//! class 1 (unsafe, escalate); a score at or above the threshold predicts class 1.

use serde::Serialize;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BinaryMetrics {
    pub n: usize,
    pub positives: usize,
    pub negatives: usize,
    pub threshold: f32,
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    #[serde(rename = "fn")]
    pub fn_: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// False positive rate: share of class-0 rows scored at or above the threshold.
    pub fpr: f64,
    pub auroc: f64,
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Whether `labels` hold both classes (what a fit, an ROC curve or an FPR-bound threshold
/// needs).
pub fn both_classes(labels: &[bool]) -> bool {
    labels.iter().any(|&v| v) && labels.iter().any(|&v| !v)
}

pub fn binary_metrics(scores: &[f32], labels: &[bool], threshold: f32) -> BinaryMetrics {
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (&s, &y) in scores.iter().zip(labels) {
        match (s >= threshold, y) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    BinaryMetrics {
        n: labels.len(),
        positives: tp + fn_,
        negatives: tn + fp,
        threshold,
        tp,
        fp,
        tn,
        fn_,
        accuracy: ratio(tp + tn, labels.len()),
        precision,
        recall,
        f1: if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        },
        fpr: ratio(fp, fp + tn),
        auroc: auroc(scores, labels),
    }
}

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative, ties counting half (Mann–Whitney U). NaN without both classes.
pub fn auroc(scores: &[f32], labels: &[bool]) -> f64 {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg_rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += (i..=j).filter(|&k| labels[idx[k]]).count() as f64 * avg_rank;
        i = j + 1;
    }
    let pos = labels.iter().filter(|&&y| y).count() as f64;
    let neg = labels.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return f64::NAN;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// ROC points (fpr, tpr) from the highest threshold down, starting at (0, 0).
pub fn roc_curve(scores: &[f32], labels: &[bool]) -> Vec<(f64, f64)> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let pos = labels.iter().filter(|&&y| y).count().max(1) as f64;
    let neg = (labels.len() - labels.iter().filter(|&&y| y).count()).max(1) as f64;
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut out = vec![(0.0, 0.0)];
    let mut i = 0;
    while i < idx.len() {
        let s = scores[idx[i]];
        while i < idx.len() && scores[idx[i]] == s {
            if labels[idx[i]] {
                tp += 1.0;
            } else {
                fp += 1.0;
            }
            i += 1;
        }
        out.push((fp / neg, tp / pos));
    }
    out
}

/// The lowest threshold whose false positive rate on `labels`' negatives is at most
/// `target`: at most ⌊target·negatives⌋ negatives score at or above it.
pub fn threshold_for_fpr(scores: &[f32], labels: &[bool], target: f64) -> f32 {
    let mut neg: Vec<f32> = scores
        .iter()
        .zip(labels)
        .filter(|(_, &y)| !y)
        .map(|(&s, _)| s)
        .collect();
    neg.sort_by(|a, b| b.total_cmp(a));
    let allowed = (target * neg.len() as f64).floor() as usize;
    match neg.get(allowed) {
        // Just above the first negative that must not pass.
        Some(&s) => next_up(s),
        None => 0.0,
    }
}

fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_rates() {
        let s = [0.9, 0.8, 0.3, 0.6, 0.1, 0.2];
        let y = [true, true, true, false, false, false];
        let m = binary_metrics(&s, &y, 0.5);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_), (2, 1, 2, 1));
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-12 && (m.recall - 2.0 / 3.0).abs() < 1e-12);
        assert!((m.fpr - 1.0 / 3.0).abs() < 1e-12);
        // Pairs (pos, neg) ranked right: 0.9 > all 3, 0.8 > all 3, 0.3 > 0.1 and 0.2 → 8/9.
        assert!((m.auroc - 8.0 / 9.0).abs() < 1e-12);
        assert!((auroc(&[0.5, 0.5], &[true, false]) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn threshold_meets_the_target_rate() {
        let s: Vec<f32> = (0..100).map(|i| i as f32 / 100.0).collect();
        let y: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
        for target in [0.0, 0.05, 0.1, 0.5] {
            let t = threshold_for_fpr(&s, &y, target);
            assert!(
                binary_metrics(&s, &y, t).fpr <= target + 1e-12,
                "target {target}"
            );
        }
        // With 50 negatives and a 10% target, exactly 5 negatives may pass.
        assert_eq!(binary_metrics(&s, &y, threshold_for_fpr(&s, &y, 0.1)).fp, 5);
        let roc = roc_curve(&s, &y);
        assert_eq!((roc[0], *roc.last().unwrap()), ((0.0, 0.0), (1.0, 1.0)));
    }
}
