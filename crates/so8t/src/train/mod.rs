//! Training (spec §6): the heads alone on cached hidden states (`heads`), or the gates'
//! generators and the heads together by backpropagation through the frozen base
//! (`gates`). Both end the same way: thresholds chosen on the validation split, and the
//! SO8T directory's adapter and config replaced atomically.

pub mod data;
pub mod feature_cache;
pub mod features;
pub mod gates;
pub mod heads;
pub mod logistic;
pub mod thresholds;

use crate::error::{Error, Result};
use crate::artifact::adapter::{Adapter, So8tConfig, ADAPTER_FILE, CONFIG_FILE};
use crate::so8::verdict::VerdictPosition;
use crate::formats::source::is_hf_model_file;
use crate::staging::{hidden_sibling, write_bytes};
use crate::Model;
use data::{Dataset, Example};
pub use heads::{fit_heads, AnswerWeight, FitOptions, HeadFitReport};
pub use thresholds::{
    choose_thresholds, held_out_answers_by_family, held_out_thresholds, response_rule_scores, FamilyAnswers, HeldOutScores, ThresholdReport,
};
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
    /// One pass over the rows of `parts`, read as one file in their order, tapping
    /// `layers`; with `response_cap`, at most that many tokens of each response (see
    /// [`features::positions`]). A prompt repeated with other responses adds its prompt
    /// samples once, across parts too. With `cache`, each part has its own entry (for
    /// exactly this model, part and reading), loaded instead of its pass, and a computed
    /// part is stored: adding a file to the data costs only that file's pass.
    pub fn compute(
        model: &mut Model,
        parts: &[Dataset],
        layers: &[usize],
        response_cap: Option<usize>,
        cache: Option<&feature_cache::FeatureCache>,
        mut progress: impl FnMut(usize),
    ) -> Result<Features> {
        // Every file's rows are tokenised and placed before any pass, so a bad row in a
        // later file stops the run before the earlier files' passes, not after.
        let mut read = Vec::with_capacity(parts.len());
        for data in parts {
            let (ids, prompt_lens) = features::dataset_ids(model, &data.examples, &data.path)?;
            let mut pos = Vec::with_capacity(ids.len());
            for (i, ex) in data.examples.iter().enumerate() {
                pos.push(features::positions(model, ex, &ids[i], prompt_lens[i], response_cap)?);
            }
            read.push((ids, prompt_lens, pos));
        }
        let hidden = model.config.hidden_size;
        let mut all = Features {
            hidden,
            layers: layers.to_vec(),
            samples: Vec::new(),
            x: vec![Vec::new(); layers.len()],
            examples: Vec::new(),
        };
        let mut earlier_prompts = std::collections::HashSet::new();
        for (n, (data, (ids, prompt_lens, pos))) in parts.iter().zip(&read).enumerate() {
            let offset = all.examples.len();
            let part = Self::part(model, data, ids, prompt_lens, pos, layers, response_cap, cache, |i| {
                progress(offset + i)
            })?;
            if all.samples.is_empty() {
                all.samples = part.samples;
                all.x = part.x;
            } else {
                for (k, s) in part.samples.iter().enumerate() {
                    let prompt = &ids[s.row][..prompt_lens[s.row]];
                    if matches!(s.kind, SampleKind::Prompt(_)) && earlier_prompts.contains(prompt) {
                        continue;
                    }
                    all.samples.push(Sample { row: s.row + offset, kind: s.kind });
                    for (to, from) in all.x.iter_mut().zip(&part.x) {
                        to.extend_from_slice(&from[k * hidden..(k + 1) * hidden]);
                    }
                }
            }
            if n + 1 < parts.len() {
                earlier_prompts.extend(ids.iter().zip(prompt_lens).map(|(s, &n)| s[..n].to_vec()));
            }
            all.examples.extend(data.examples.iter().cloned());
        }
        Ok(all)
    }

    /// The states of one part's rows (`row` of its samples counted within the part), from
    /// `cache` when it holds them.
    #[allow(clippy::too_many_arguments)]
    fn part(
        model: &mut Model,
        data: &Dataset,
        ids: &[Vec<u32>],
        prompt_lens: &[usize],
        pos: &[features::Positions],
        layers: &[usize],
        response_cap: Option<usize>,
        cache: Option<&feature_cache::FeatureCache>,
        mut progress: impl FnMut(usize),
    ) -> Result<feature_cache::Cached> {
        let hidden = model.config.hidden_size;
        let entry = cache.map(|c| c.path(ids, pos, layers, response_cap));
        let cached = entry
            .as_deref()
            .and_then(|p| feature_cache::FeatureCache::load(p, ids.len(), layers, hidden));
        if let Some(c) = cached {
            tracing::info!("hidden states of {} from the cache", data.path.display());
            progress(ids.len());
            return Ok(c);
        }
        let mut x = vec![Vec::new(); layers.len()];
        let mut samples = Vec::new();
        let mut seen_prompts = std::collections::HashSet::new();
        let from = features::first_positions(pos);
        features::walk_layers(model, layers, ids, &from, |i, start, tapped| {
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
        let c = feature_cache::Cached { samples, x };
        if let Some(path) = &entry {
            // The pass is done: a cache that cannot be written must not throw it away.
            if let Err(e) = feature_cache::FeatureCache::store(path, layers, hidden, &c) {
                tracing::warn!("{}: hidden states not cached: {e}", path.display());
            }
        }
        Ok(c)
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
        self.labelled_where(head, layer, position, |_| true)
    }

    /// [`Features::labelled`] of the samples `keep` accepts (by sample index).
    pub fn labelled_where(
        &self,
        head: usize,
        layer: usize,
        position: VerdictPosition,
        keep: impl Fn(usize) -> bool,
    ) -> (Vec<f32>, Vec<bool>, Vec<usize>) {
        let li = self.layer_index(layer);
        let (mut x, mut y, mut idx) = (Vec::new(), Vec::new(), Vec::new());
        for (k, s) in self.samples.iter().enumerate() {
            if !keep(k) {
                continue;
            }
            if let Some(l) = self.label(s, head, position) {
                x.extend_from_slice(&self.x[li][k * self.hidden..(k + 1) * self.hidden]);
                y.push(l);
                idx.push(k);
            }
        }
        (x, y, idx)
    }

    /// Fit weights of the samples `idx` (as [`Features::labelled`] lists them): a prompt
    /// weighs 1 and the read tokens of one answer together weigh `answer_weight`, however
    /// many of its tokens were read (`None`: every token weighs 1).
    pub fn sample_weights(&self, idx: &[usize], answer_weight: Option<f64>) -> Vec<f64> {
        let Some(answer_weight) = answer_weight else {
            return vec![1.0; idx.len()];
        };
        let mut per_row: std::collections::HashMap<usize, usize> = Default::default();
        for &k in idx {
            if let SampleKind::Response { .. } = self.samples[k].kind {
                *per_row.entry(self.samples[k].row).or_default() += 1;
            }
        }
        idx.iter()
            .map(|&k| match self.samples[k].kind {
                SampleKind::Prompt(_) => 1.0,
                SampleKind::Response { .. } => answer_weight / per_row[&self.samples[k].row] as f64,
            })
            .collect()
    }

    /// Per sample, whether it is one of the at most `cap` tokens of its answer that a pass
    /// with that cap would have read ([`features::picked_tokens`] over the answer's tokens
    /// held here); prompts always are.
    pub fn response_cap_mask(&self, cap: Option<usize>) -> Vec<bool> {
        let mut per_row: std::collections::HashMap<usize, Vec<(usize, usize)>> = Default::default();
        for (k, s) in self.samples.iter().enumerate() {
            if let SampleKind::Response { token } = s.kind {
                per_row.entry(s.row).or_default().push((token, k));
            }
        }
        let mut keep = vec![true; self.samples.len()];
        for mut toks in per_row.into_values() {
            toks.sort_unstable();
            let picked: std::collections::HashSet<usize> =
                features::picked_tokens(toks.len(), cap).into_iter().collect();
            for (rank, (_, k)) in toks.into_iter().enumerate() {
                keep[k] = picked.contains(&rank);
            }
        }
        keep
    }

    fn layer_index(&self, layer: usize) -> usize {
        self.layers
            .iter()
            .position(|&l| l == layer)
            .expect("features hold the layer asked for")
    }
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
    /// `out` `None` (or the model directory itself) trains in place. Another existing
    /// `out` is replaced only with `force` (the swap at the end would discard whatever
    /// directory was there); `resume` continues a run that already passed this check.
    pub fn prepare(model_dir: &Path, out: Option<&Path>, resume: bool, force: bool) -> Result<TrainOut> {
        let in_place = out.is_none_or(|o| same_dir(o, model_dir));
        let target = match out {
            Some(o) if !in_place => o.to_path_buf(),
            _ => model_dir.to_path_buf(),
        };
        if !in_place && !resume && !force && std::fs::symlink_metadata(&target).is_ok() {
            return Err(Error::format(&target, "already exists (use --force to replace it)"));
        }
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
        crate::staging::link_tree(model_dir, &work, &|name: &str, is_file: bool| {
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

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

/// Writes the adapter, then the config, each to a temporary name renamed into place.
pub fn write_result(out: &Path, adapter: &Adapter, config: &So8tConfig) -> Result<()> {
    adapter.write(&out.join(ADAPTER_FILE))?;
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
