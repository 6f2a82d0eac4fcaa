//! `export --format vllm`: what vLLM serves of an SO8T model. `model/` is the baked model
//! (generation); each `classifier…/` is a view of the same weights as a pooling model
//! with a `score` layer whose rows are the heads' (vLLM: `--runner pooling --convert
//! classify`, per-token scores with the `token_classify` task). A head reading layer
//! l < L (spec §5: the residual after block l, RMS-normed with unit weight) gets a view
//! cut after block l whose final norm has unit weight, which is that state exactly; heads
//! reading different layers get a view each. vLLM's score layer has no bias, so the
//! biases, thresholds and streaming rule are in `so8t_heads.json`, which says how a client
//! turns the scores into verdicts.

use super::adapter::So8tConfig;
use super::bake::{bake, read_heads, BakeOptions};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::safetensors::SafetensorsStore;
use crate::formats::WeightStore;
use crate::so8::verdict::Heads;
use crate::staging::StagingDir;
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

/// The rows of a view's `score.weight` and what they mean, by head.
const LABELS: [(&str, [&str; 2]); 2] = [("safety", ["safe", "unsafe"]), ("authority", ["handle", "escalate"])];

/// Writes `out/`: `model/` (the baked model), the classifier view(s) and
/// `so8t_heads.json`. `src` is an SO8T directory (the gates are baked on the way) or a
/// baked one.
pub fn export_vllm(src: &Path, out: &Path, force: bool) -> Result<Vec<String>> {
    let staging = StagingDir::new(out, force)?;
    let dir = staging.path();
    let model_dir = dir.join("model");
    if super::adapter::is_so8t_dir(src) {
        bake(src, &model_dir, &BakeOptions::default())?;
    } else {
        crate::staging::replace_dir(&copy_plain(src, dir)?, &model_dir)?;
    }
    let cfg_path = model_dir.join("config.json");
    let cfg = ModelConfig::from_hf_file(&cfg_path)?;
    let (heads, so8t_cfg) = read_heads(&model_dir, &cfg)?;
    let layers = so8t_cfg.heads.layers(cfg.num_layers);
    let store = SafetensorsStore::open(&model_dir, None)?;
    let mut views = Vec::new();
    let mut distinct: Vec<usize> = layers.to_vec();
    distinct.dedup();
    for &layer in &distinct {
        let name = if distinct.len() == 1 { "classifier".to_string() } else { format!("classifier-layer{layer}") };
        let which: Vec<usize> = (0..2).filter(|&h| layers[h] == layer).collect();
        write_view(&model_dir, &store, &cfg, &heads, &which, layer, &dir.join(&name))?;
        views.push((name, which));
    }
    write_heads_json(&dir.join("so8t_heads.json"), &heads, &so8t_cfg, &views)?;
    staging.commit()?;
    Ok(views.into_iter().map(|(n, _)| n).collect())
}

/// A baked directory's files, copied into a fresh directory under `parent`.
fn copy_plain(src: &Path, parent: &Path) -> Result<std::path::PathBuf> {
    if !src.join(super::bake::HEADS_FILE).exists() {
        return Err(Error::format(
            src,
            format!("neither an SO8T directory nor a baked one (no {})", super::bake::HEADS_FILE),
        ));
    }
    let dst = parent.join(".model-copy");
    std::fs::create_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(dst)
}

/// One classifier view: blocks 1..=layer of the baked model, the final norm (unit weight
/// when the view is cut below the top), no LM head, and `score.weight` with the rows of
/// the heads `which` reads.
fn write_view(
    model_dir: &Path,
    store: &SafetensorsStore,
    cfg: &ModelConfig,
    heads: &Heads,
    which: &[usize],
    layer: usize,
    out: &Path,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let cut = layer < cfg.num_layers;
    // The baked model's, which bake wrote every tensor in.
    let dtype = super::bake::checkpoint_dtype(store, cfg).dtype();
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in store.tensor_names() {
        if name == "lm_head.weight" {
            continue;
        }
        let below_cut = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok())
            .is_none_or(|l| l < layer);
        if !below_cut {
            continue;
        }
        let t = if cut && name == "model.norm.weight" {
            Tensor::ones(cfg.hidden_size, DType::F32, &candle_core::Device::Cpu)?
        } else {
            store.load_f32(&name)?
        };
        tensors.push((name, t.to_dtype(dtype)?));
    }
    let rows: Vec<Tensor> = which.iter().map(|&h| if h == 0 { heads.safety_w.clone() } else { heads.authority_w.clone() }).collect();
    tensors.push(("score.weight".into(), Tensor::cat(&rows, 0)?.to_dtype(dtype)?));
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    crate::formats::safetensors::write(&out.join("model.safetensors"), tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))?;

    let cfg_path = model_dir.join("config.json");
    let text = crate::files::read_text(&cfg_path, crate::files::SETTINGS_LIMIT)?;
    let mut raw: serde_json::Value = crate::error::parse_json(&text, &cfg_path)?;
    let labels: Vec<String> = which
        .iter()
        .flat_map(|&h| LABELS[h].1.iter().map(move |l| format!("{}:{l}", LABELS[h].0)))
        .collect();
    let base_class = raw["architectures"][0].as_str().unwrap_or("").trim_end_matches("ForCausalLM").to_string();
    raw["architectures"] = json!([format!("{base_class}ForSequenceClassification")]);
    raw["num_hidden_layers"] = json!(layer);
    // Per-layer settings (transformers' `layer_types`) are cut with the layers.
    if let Some(types) = raw["layer_types"].as_array_mut() {
        types.truncate(layer);
    }
    raw["num_labels"] = json!(labels.len());
    raw["id2label"] = labels.iter().enumerate().map(|(i, l)| (i.to_string(), json!(l))).collect();
    raw["label2id"] = labels.iter().enumerate().map(|(i, l)| (l.clone(), json!(i))).collect();
    // vLLM's score layer has none; transformers' token classifier has one unless told.
    raw["token_classification_bias"] = json!(false);
    // No LM head to tie to: the embedding is the input's only.
    raw["tie_word_embeddings"] = json!(false);
    let out_cfg = out.join("config.json");
    std::fs::write(&out_cfg, serde_json::to_string_pretty(&raw).unwrap()).map_err(|e| Error::io(&out_cfg, e))?;
    for e in std::fs::read_dir(model_dir).map_err(|e| Error::io(model_dir, e))? {
        let e = e.map_err(|e| Error::io(model_dir, e))?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("tokenizer") || n == "chat_template.jinja" || n == "special_tokens_map.json" {
            std::fs::copy(e.path(), out.join(&n)).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

fn write_heads_json(path: &Path, heads: &Heads, c: &So8tConfig, views: &[(String, Vec<usize>)]) -> Result<()> {
    let bias = |t: &Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.to_vec1::<f32>()?) };
    let mut by_head = serde_json::Map::new();
    for (view, which) in views {
        for (row, &h) in which.iter().enumerate() {
            let (name, labels) = LABELS[h];
            let (b, threshold, response) = if h == 0 {
                (bias(&heads.safety_b)?, c.thresholds.unsafe_, c.thresholds.response_unsafe)
            } else {
                (bias(&heads.authority_b)?, c.thresholds.escalate, c.thresholds.response_escalate)
            };
            by_head.insert(name.into(), json!({
                "view": view,
                "score_rows": [2 * row, 2 * row + 1],
                "labels": labels,
                "bias": b,
                "prompt_threshold": threshold,
                "answer_threshold": response.unwrap_or(threshold),
            }));
        }
    }
    let doc = json!({
        "how": "For each head, with s = the view's scores for a token (the head's two score_rows): z = (s[1] + bias[1]) - (s[0] + bias[0]), p = 1 / (1 + exp(-z)). A prompt is flagged when p at the verdict position (the last prompt token) reaches prompt_threshold; an answer when `consecutive` answer tokens in a row reach answer_threshold.",
        "heads": by_head,
        "consecutive": c.thresholds.consecutive,
        "verdict_position": c.verdict_position,
    });
    std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()).map_err(|e| Error::io(path, e))
}
