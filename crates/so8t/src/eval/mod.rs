//! `eval`: the heads of any SO8T-capable model (SO8T directory, baked directory, GGUF)
//! on labelled JSONL, with the thresholds the model carries.

pub mod calibrate;
pub mod metrics;
pub mod report;

use crate::error::{Error, Result};
use crate::so8::verdict::{rule_score, ResponseJudge, Verdict};
use crate::train::data::Dataset;
use crate::train::{features, HEAD_NAMES};
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

/// The streaming rule on the answers of one head (spec §5): an answer is flagged when
/// `consecutive` tokens in a row reach the threshold anywhere in it.
#[derive(Clone, Debug, Serialize)]
pub struct ResponseEval {
    pub head: &'static str,
    pub consecutive: usize,
    /// Score = the largest, over runs of `consecutive` tokens, of the run's smallest p.
    pub metrics: BinaryMetrics,
    pub by_source: Vec<SourceBreakdown>,
    /// For flagged class-1 answers (labelled from their first token): tokens generated
    /// before the rule fired, i.e. the token index at which it fired.
    pub delay_median: Option<f64>,
    pub delay_mean: Option<f64>,
    /// Benign answers to class-0 requests (what the rule alone decides), and the share of
    /// them flagged.
    pub benign_answers: usize,
    pub benign_flagged: f64,
    pub worst_false_positives: Vec<ErrorExample>,
}

#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub data: String,
    pub rows: usize,
    pub heads_trained: bool,
    pub baked: bool,
    /// The layers the safety and authority heads read, and the prompt verdict position.
    pub head_layers: [usize; 2],
    pub verdict_position: &'static str,
    /// Prompt level: each row's prompt verdict (a prompt repeated with other answers
    /// counts once).
    pub heads: Vec<HeadEval>,
    /// Response level, for rows with a response and a response label.
    pub responses: Vec<ResponseEval>,
    /// Policy decisions (spec §5) on the prompts with their answers.
    pub decisions: BTreeMap<String, usize>,
    pub seconds: f64,
    /// Each row's verdicts and decision, in the data's order (`eval --rows`).
    #[serde(skip)]
    pub row_verdicts: Vec<RowVerdict>,
}

/// One row's outcome, for comparing two models (e.g. an export against its directory)
/// row by row.
#[derive(Clone, Debug, Serialize)]
pub struct RowVerdict {
    /// The row's line in the data file.
    pub line: usize,
    pub p_unsafe: f32,
    pub p_escalate: f32,
    /// The streaming rule's scores over the answer ([`RowScore::rule_score`]).
    pub answer_unsafe: f32,
    pub answer_escalate: f32,
    pub decision: Option<crate::so8::verdict::Decision>,
}

fn breakdown(
    examples: &[&crate::train::data::Example],
    scores: &[f32],
    labels: &[bool],
    t: f32,
) -> Vec<SourceBreakdown> {
    let mut sources: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (k, e) in examples.iter().enumerate() {
        sources.entry(e.group().to_string()).or_default().push(k);
    }
    sources
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
        .collect()
}

fn example(e: &crate::train::data::Example, p: f32) -> ErrorExample {
    ErrorExample {
        line: e.line,
        p,
        source: Some(e.group().to_string()),
        category: e.category.clone(),
        prompt: e.user_text().to_string(),
    }
}

/// One row as the runtime sees it.
#[derive(Clone, Debug)]
pub struct RowScore {
    /// The prompt's verdict at the model's verdict position.
    pub prompt: Verdict,
    /// False for a row whose prompt an earlier row already had (same ids).
    pub first_of_prompt: bool,
    /// Every response token's verdict, and the streaming rule over them.
    pub response: Vec<Verdict>,
    pub judge: ResponseJudge,
    /// Per head, the largest over runs of `consecutive` response tokens of the run's
    /// smallest p (the rule fires when this reaches the threshold); 0 without a response.
    pub rule_score: [f32; 2],
    pub decision: Option<crate::so8::verdict::Decision>,
}

/// Every row through the model's own runtime path: the prompt's verdict at the model's
/// verdict position and every response token's verdict, from the layers its heads read.
pub fn score_rows(
    model: &mut Model,
    data: &Dataset,
    mut progress: impl FnMut(usize),
) -> Result<Vec<RowScore>> {
    let state = model.so8t.as_ref().ok_or_else(|| {
        Error::format(
            &model.path,
            "has no SO8T heads (not an SO8T directory, baked directory or SO8T GGUF)",
        )
    })?;
    let (config, heads) = (state.config.clone(), state.heads.clone());
    let layers = state.head_layers(&model.decoder);
    let (ids, prompt_lens) = features::dataset_ids(model, &data.examples, &data.path)?;
    let mut pos = Vec::with_capacity(ids.len());
    for (i, ex) in data.examples.iter().enumerate() {
        pos.push(features::positions(model, ex, &ids[i], prompt_lens[i], None)?);
    }
    let from = features::first_positions(&pos);
    let taps = model.decoder.taps().to_vec();
    let k = config.thresholds.consecutive;
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(ids.len());
    features::walk(model, &ids, &from, |i, start, tapped| {
        let of = |l: usize| &tapped[taps.iter().position(|&t| t == l).expect("head layer tapped")];
        let v = heads.verdicts_of([of(layers[0]), of(layers[1])])?;
        let prompt = v[pos[i].prompt(config.verdict_position) - start];
        let response: Vec<Verdict> = pos[i].response.iter().map(|&p| v[p - start]).collect();
        let mut judge = ResponseJudge::default();
        for &r in &response {
            judge.push(r, &config.thresholds);
        }
        let rule_score = [0, 1].map(|h| {
            let p: Vec<f32> = response
                .iter()
                .map(|v| v.head(h))
                .collect();
            rule_score(&p, k)
        });
        out.push(RowScore {
            prompt,
            first_of_prompt: seen.insert(&ids[i][..prompt_lens[i]]),
            decision: config.decide(Some(prompt), &judge),
            response,
            judge,
            rule_score,
        });
        progress(i + 1);
        Ok(())
    })?;
    Ok(out)
}

/// Prompt-level and response-level metrics of the model's heads on `data`, with the
/// thresholds the model carries.
pub fn evaluate(
    model: &mut Model,
    data: &Dataset,
    progress: impl FnMut(usize),
) -> Result<EvalReport> {
    let t0 = std::time::Instant::now();
    let rows_scored = score_rows(model, data, progress)?;
    let state = model.so8t.as_ref().expect("score_rows checked it");
    let (config, baked) = (state.config.clone(), state.baked);
    let head_layers = state.head_layers(&model.decoder);
    let n = rows_scored.len();
    let prompt_v: Vec<Option<Verdict>> = rows_scored
        .iter()
        .map(|r| r.first_of_prompt.then_some(r.prompt))
        .collect();
    let judges: Vec<&ResponseJudge> = rows_scored.iter().map(|r| &r.judge).collect();
    let rule: Vec<[f32; 2]> = rows_scored.iter().map(|r| r.rule_score).collect();
    let thresholds = config.thresholds.prompt();
    let response_thresholds = config.thresholds.response();
    let mut out = Vec::new();
    let mut responses = Vec::new();
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let t = thresholds[h];
        let rows: Vec<usize> = (0..n)
            .filter(|&i| prompt_v[i].is_some() && data.examples[i].label(h).is_some())
            .collect();
        let scores: Vec<f32> = rows.iter().map(|&i| prompt_v[i].unwrap().head(h)).collect();
        let labels: Vec<bool> = rows.iter().map(|&i| data.examples[i].label(h).unwrap()).collect();
        let exs: Vec<_> = rows.iter().map(|&i| &data.examples[i]).collect();
        let mut fneg: Vec<usize> = (0..rows.len()).filter(|&k| labels[k] && scores[k] < t).collect();
        fneg.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let mut fpos: Vec<usize> = (0..rows.len()).filter(|&k| !labels[k] && scores[k] >= t).collect();
        fpos.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        out.push(HeadEval {
            head: name,
            labels: if h == 0 {
                config.labels.safety.clone()
            } else {
                config.labels.authority.clone()
            },
            metrics: binary_metrics(&scores, &labels, t),
            by_source: breakdown(&exs, &scores, &labels, t),
            worst_false_negatives: fneg.into_iter().take(5).map(|k| example(exs[k], scores[k])).collect(),
            worst_false_positives: fpos.into_iter().take(5).map(|k| example(exs[k], scores[k])).collect(),
            scores: scores.iter().copied().zip(labels.iter().copied()).collect(),
        });
        let rrows: Vec<usize> = (0..n)
            .filter(|&i| !rows_scored[i].response.is_empty() && data.examples[i].response_label(h).is_some())
            .collect();
        // Answers of one class still measure something: benign answers flagged (a set of
        // the model's own benign answers is exactly that), or harmful ones caught.
        if rrows.is_empty() {
            continue;
        }
        let t = response_thresholds[h];
        let rs: Vec<f32> = rrows.iter().map(|&i| rule[i][h]).collect();
        let ry: Vec<bool> = rrows.iter().map(|&i| data.examples[i].response_label(h).unwrap()).collect();
        let rex: Vec<_> = rrows.iter().map(|&i| &data.examples[i]).collect();
        let mut delays: Vec<f64> = rrows
            .iter()
            .zip(&ry)
            .filter(|(_, &y)| y)
            .filter_map(|(&i, _)| if h == 0 { judges[i].unsafe_at } else { judges[i].escalate_at })
            .map(|d| d as f64)
            .collect();
        delays.sort_by(f64::total_cmp);
        let benign: Vec<usize> = (0..rrows.len())
            .filter(|&k| !ry[k] && rex[k].label(h) == Some(false))
            .collect();
        let benign_flagged = benign.iter().filter(|&&k| rs[k] >= t).count() as f64
            / benign.len().max(1) as f64;
        let mut rfpos: Vec<usize> = (0..rrows.len()).filter(|&k| !ry[k] && rs[k] >= t).collect();
        rfpos.sort_by(|&a, &b| rs[b].total_cmp(&rs[a]));
        responses.push(ResponseEval {
            head: name,
            consecutive: config.thresholds.consecutive,
            metrics: binary_metrics(&rs, &ry, t),
            by_source: breakdown(&rex, &rs, &ry, t),
            delay_median: (!delays.is_empty()).then(|| delays[delays.len() / 2]),
            delay_mean: (!delays.is_empty()).then(|| delays.iter().sum::<f64>() / delays.len() as f64),
            benign_answers: benign.len(),
            benign_flagged,
            worst_false_positives: rfpos.into_iter().take(5).map(|k| example(rex[k], rs[k])).collect(),
        });
    }
    let mut decisions = BTreeMap::new();
    for r in &rows_scored {
        let d = r.decision.map_or("undecided (heads untrained)", |d| d.name());
        *decisions.entry(d.to_string()).or_insert(0) += 1;
    }
    Ok(EvalReport {
        model: model.path.display().to_string(),
        data: data.path.display().to_string(),
        rows: data.examples.len(),
        heads_trained: config.heads_trained,
        baked,
        head_layers,
        verdict_position: config.verdict_position.name(),
        heads: out,
        responses,
        decisions,
        seconds: t0.elapsed().as_secs_f64(),
        row_verdicts: rows_scored
            .iter()
            .zip(&data.examples)
            .map(|(r, ex)| RowVerdict {
                line: ex.line,
                p_unsafe: r.prompt.p_unsafe,
                p_escalate: r.prompt.p_escalate,
                answer_unsafe: r.rule_score[0],
                answer_escalate: r.rule_score[1],
                decision: r.decision,
            })
            .collect(),
    })
}
