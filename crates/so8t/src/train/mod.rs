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
use crate::so8::adapter::{Adapter, Heads, So8tConfig, Thresholds, ADAPTER_FILE, CONFIG_FILE};
use crate::so8::convert::is_hf_model_file;
use crate::staging::{write_bytes, write_file};
use crate::Model;
use data::{Dataset, Example};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Where a run keeps its log, checkpoint and summary, inside the output directory. The
/// `so8t_` prefix keeps it out of bake and convert copies.
pub const TRAIN_DIR: &str = "so8t_train";
pub const HEAD_NAMES: [&str; 2] = ["safety", "authority"];

/// Hidden states at the verdict positions with each head's labelled rows.
pub struct Features {
    /// `[n, hidden]` row-major.
    pub x: Vec<f32>,
    pub hidden: usize,
    pub examples: Vec<Example>,
}

impl Features {
    pub fn compute(
        model: &mut Model,
        data: &Dataset,
        progress: impl FnMut(usize),
    ) -> Result<Features> {
        let (ids, _) = features::dataset_ids(model, &data.examples, &data.path)?;
        let h = features::verdict_hidden(model, &ids, progress)?;
        Ok(Features {
            x: h.flatten_all()?.to_vec1::<f32>()?,
            hidden: model.config.hidden_size,
            examples: data.examples.clone(),
        })
    }

    /// (features, labels) of the rows labelled for `head`.
    pub fn labelled(&self, head: usize) -> (Vec<f32>, Vec<bool>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for (i, e) in self.examples.iter().enumerate() {
            if let Some(l) = e.label(head) {
                x.extend_from_slice(&self.x[i * self.hidden..(i + 1) * self.hidden]);
                y.push(l);
            }
        }
        (x, y)
    }
}

/// p(class 1) of each head for every row of `x`.
pub fn head_scores(heads: &Heads, x: &[f32], hidden: usize) -> Result<[Vec<f32>; 2]> {
    let n = x.len() / hidden;
    let t = candle_core::Tensor::from_vec(x.to_vec(), (n, hidden), &candle_core::Device::Cpu)?;
    let v = heads.verdicts(&t)?;
    Ok([
        v.iter().map(|v| v.p_unsafe).collect(),
        v.iter().map(|v| v.p_escalate).collect(),
    ])
}

#[derive(Clone, Debug, Serialize)]
pub struct HeadFitReport {
    pub head: &'static str,
    pub rows: usize,
    pub positives: usize,
    pub weight_decay: f64,
    pub newton_iterations: usize,
    pub train_loss: f64,
    /// Validation loss per weight decay tried (when a validation set was given).
    pub weight_decay_search: Vec<(f64, f64)>,
}

pub const WEIGHT_DECAYS: [f64; 5] = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// The heads-only fit. With `val`, the weight decay is the one of [`WEIGHT_DECAYS`] with
/// the lowest class-weighted validation loss, unless `weight_decay` fixes it.
pub fn fit_heads(
    train: &Features,
    val: Option<&Features>,
    weight_decay: Option<f64>,
    current: &Heads,
) -> Result<(Heads, Vec<HeadFitReport>)> {
    let mut heads = current.clone();
    let mut reports = Vec::new();
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let (x, y) = train.labelled(h);
        if y.iter().all(|&v| v) || y.iter().all(|&v| !v) {
            tracing::warn!("no {name} labels of both classes in the training data: the {name} head is left as it was");
            continue;
        }
        let mut search = Vec::new();
        let chosen = match (weight_decay, val) {
            (Some(wd), _) => wd,
            (None, Some(v)) => {
                let (vx, vy) = v.labelled(h);
                if vy.iter().all(|&b| b) || vy.iter().all(|&b| !b) {
                    1e-2
                } else {
                    let mut best = (f64::INFINITY, 1e-2);
                    for wd in WEIGHT_DECAYS {
                        let f = logistic::fit(&x, train.hidden, &y, wd)?;
                        let loss = logistic::weighted_loss(
                            &f.logits(&vx, train.hidden),
                            &vy,
                            logistic::balanced_weights(&vy),
                        );
                        search.push((wd, loss));
                        if loss < best.0 {
                            best = (loss, wd);
                        }
                    }
                    best.1
                }
            }
            (None, None) => 1e-2,
        };
        let f = logistic::fit(&x, train.hidden, &y, chosen)?;
        let (w, b) = f.head()?;
        if h == 0 {
            (heads.safety_w, heads.safety_b) = (w, b);
        } else {
            (heads.authority_w, heads.authority_b) = (w, b);
        }
        reports.push(HeadFitReport {
            head: name,
            rows: y.len(),
            positives: y.iter().filter(|&&v| v).count(),
            weight_decay: chosen,
            newton_iterations: f.iterations,
            train_loss: f.loss,
            weight_decay_search: search,
        });
    }
    Ok((heads, reports))
}

#[derive(Clone, Debug, Serialize)]
pub struct ThresholdReport {
    pub head: &'static str,
    pub target_fpr: f64,
    pub threshold: f32,
    pub validation: BinaryMetrics,
}

/// Per head, the lowest threshold whose false positive rate on the validation split is at
/// most `target_fpr` (safe prompts flagged unsafe; handle requests escalated).
pub fn choose_thresholds(
    heads: &Heads,
    val: &Features,
    target_fpr: f64,
    current: &Thresholds,
) -> Result<(Thresholds, Vec<ThresholdReport>)> {
    let mut t = current.clone();
    let mut reports = Vec::new();
    for (h, name) in HEAD_NAMES.iter().enumerate() {
        let (x, y) = val.labelled(h);
        if y.iter().all(|&v| v) || y.iter().all(|&v| !v) {
            continue;
        }
        let scores = head_scores(heads, &x, val.hidden)?[h].clone();
        let threshold = threshold_for_fpr(&scores, &y, target_fpr);
        if h == 0 {
            t.unsafe_ = threshold;
        } else {
            t.escalate = threshold;
        }
        reports.push(ThresholdReport {
            head: name,
            target_fpr,
            threshold,
            validation: binary_metrics(&scores, &y, threshold),
        });
    }
    Ok((t, reports))
}

/// The output directory of a run: the model directory itself (in place), or a new
/// directory that gets the base files (hard links where the file system allows, else
/// copies) so that it is a complete SO8T directory once the adapter is written.
pub fn prepare_out(model_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let out = match out {
        Some(o) if !same_dir(o, model_dir) => o.to_path_buf(),
        _ => return Ok(model_dir.to_path_buf()),
    };
    std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
    for e in std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))? {
        let e = e.map_err(|e| Error::io(model_dir, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if !(e.path().is_file() && is_hf_model_file(&name, true)) {
            continue;
        }
        let dst = out.join(&name);
        let same = std::fs::metadata(&dst)
            .ok()
            .is_some_and(|m| Some(m.len()) == e.metadata().ok().map(|m| m.len()));
        if same {
            continue;
        }
        write_file(&dst, |tmp| {
            let _ = std::fs::remove_file(tmp);
            if std::fs::hard_link(e.path(), tmp).is_err() {
                std::fs::copy(e.path(), tmp).map_err(|err| Error::io(&dst, err))?;
            }
            Ok(())
        })?;
    }
    Ok(out)
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
