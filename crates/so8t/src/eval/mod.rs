//! `eval`: the heads of any SO8T-capable model (SO8T directory, baked directory, GGUF)
//! on labelled JSONL, with the thresholds the model carries.

pub mod metrics;
pub mod report;

use crate::error::{Error, Result};
use crate::so8::adapter::Verdict;
use crate::train::data::Dataset;
use crate::train::{head_scores, Features, HEAD_NAMES};
use crate::Model;
use metrics::{binary_metrics, BinaryMetrics};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Debug, Serialize)]
pub struct SourceBreakdown {
    pub source: String,
    pub rows: usize,
    pub positives: usize,
    /// Share of rows scored at or above the threshold.
    pub flagged: f64,
    pub accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ErrorExample {
    pub line: usize,
    pub p: f32,
    pub source: Option<String>,
    pub category: Option<String>,
    pub prompt: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct HeadEval {
    pub head: &'static str,
    pub labels: [String; 2],
    pub metrics: BinaryMetrics,
    pub by_source: Vec<SourceBreakdown>,
    /// Class-1 rows with the lowest scores that were missed.
    pub worst_false_negatives: Vec<ErrorExample>,
    /// Class-0 rows with the highest scores that were flagged.
    pub worst_false_positives: Vec<ErrorExample>,
    /// (score, label) per labelled row, for plots.
    #[serde(skip)]
    pub scores: Vec<(f32, bool)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub rows: usize,
    pub heads_trained: bool,
    pub baked: bool,
    pub heads: Vec<HeadEval>,
    /// Policy decisions (spec §5) on the prompts.
    pub decisions: BTreeMap<String, usize>,
    pub seconds: f64,
}

pub fn evaluate(
    model: &mut Model,
    data: &Dataset,
    progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let state = model.so8t.as_ref().ok_or_else(|| {
        Error::format(
            &model.path,
            "has no SO8T heads (not an SO8T directory, baked directory or SO8T GGUF)",
        )
    })?;
    let (heads, config, baked) = (state.heads.clone(), state.config.clone(), state.baked);
    let features = Features::compute(model, data, progress)?;
    let all = head_scores(&heads, &features.x, features.hidden)?;
    let thresholds = [config.thresholds.unsafe_, config.thresholds.escalate];
    let mut out = Vec::new();
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let rows: Vec<usize> = (0..data.examples.len())
            .filter(|&i| data.examples[i].label(h).is_some())
            .collect();
        let scores: Vec<f32> = rows.iter().map(|&i| all[h][i]).collect();
        let labels: Vec<bool> = rows
            .iter()
            .map(|&i| data.examples[i].label(h).unwrap())
            .collect();
        let t = thresholds[h];
        let mut sources: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (k, &i) in rows.iter().enumerate() {
            sources
                .entry(
                    data.examples[i]
                        .source
                        .clone()
                        .unwrap_or_else(|| "-".into()),
                )
                .or_default()
                .push(k);
        }
        let by_source = sources
            .into_iter()
            .map(|(source, ks)| {
                let flagged = ks.iter().filter(|&&k| scores[k] >= t).count();
                let right = ks
                    .iter()
                    .filter(|&&k| (scores[k] >= t) == labels[k])
                    .count();
                SourceBreakdown {
                    source,
                    rows: ks.len(),
                    positives: ks.iter().filter(|&&k| labels[k]).count(),
                    flagged: flagged as f64 / ks.len() as f64,
                    accuracy: right as f64 / ks.len() as f64,
                }
            })
            .collect();
        let example = |k: usize| {
            let e = &data.examples[rows[k]];
            ErrorExample {
                line: e.line,
                p: scores[k],
                source: e.source.clone(),
                category: e.category.clone(),
                prompt: e.user_text().to_string(),
            }
        };
        let mut fneg: Vec<usize> = (0..rows.len())
            .filter(|&k| labels[k] && scores[k] < t)
            .collect();
        fneg.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut fpos: Vec<usize> = (0..rows.len())
            .filter(|&k| !labels[k] && scores[k] >= t)
            .collect();
        fpos.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let labels_names = if h == 0 {
            config.labels.safety.clone()
        } else {
            config.labels.authority.clone()
        };
        out.push(HeadEval {
            head: name,
            labels: labels_names,
            metrics: binary_metrics(&scores, &labels, t),
            by_source,
            worst_false_negatives: fneg.into_iter().take(5).map(example).collect(),
            worst_false_positives: fpos.into_iter().take(5).map(example).collect(),
            scores: scores.into_iter().zip(labels).collect(),
        });
    }
    let mut decisions = BTreeMap::new();
    for (&p_unsafe, &p_escalate) in all[0].iter().zip(&all[1]) {
        let d = config
            .decide(&[Verdict {
                p_unsafe,
                p_escalate,
            }])
            .map_or("undecided (heads untrained)", |d| d.name());
        *decisions.entry(d.to_string()).or_insert(0) += 1;
    }
    Ok(EvalReport {
        model: model.path.display().to_string(),
        data: data.path.display().to_string(),
        rows: data.examples.len(),
        heads_trained: config.heads_trained,
        baked,
        heads: out,
        decisions,
        seconds: t0.elapsed().as_secs_f64(),
    })
}
