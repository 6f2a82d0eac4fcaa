//! What a model path holds, read without loading tensors: an HF directory (its config
//! and FP8 block size) or a GGUF file. Every command that takes a model path asks here.

use crate::config::ModelConfig;
use crate::error::{Error, InFile, Result};
use crate::formats::gguf::GgufFile;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub enum Source {
    Hf {
        dir: PathBuf,
        config: ModelConfig,
        fp8_block: Option<(usize, usize)>,
    },
    Gguf(Arc<GgufFile>),
}

/// Reads what a path is without loading tensors.
pub fn open_source(path: &Path) -> Result<Source> {
    if !path.exists() {
        return Err(Error::format(path, "no such file or directory"));
    }
    if path.is_dir() {
        let cfg_path = path.join("config.json");
        if !cfg_path.exists() {
            return Err(Error::format(
                path,
                "not a model directory: config.json is missing",
            ));
        }
        let text = crate::files::read_text(&cfg_path, crate::files::SETTINGS_LIMIT)?;
        let config = ModelConfig::from_hf_json(&text, &cfg_path)?;
        let fp8_block = fp8_block_size(&text, &cfg_path)?;
        return Ok(Source::Hf {
            dir: path.to_path_buf(),
            config,
            fp8_block,
        });
    }
    Ok(Source::Gguf(Arc::new(GgufFile::open(path)?)))
}

pub(crate) fn fp8_block_size(config_text: &str, path: &Path) -> Result<Option<(usize, usize)>> {
    let v: serde_json::Value = serde_json::from_str(config_text).in_file(path)?;
    let q = &v["quantization_config"];
    if q.is_null() {
        return Ok(None);
    }
    let method = q["quant_method"].as_str().unwrap_or("");
    if method != "fp8" {
        return Err(Error::format(
            path,
            format!("quantization_config.quant_method `{method}` is not supported (expected fp8)"),
        ));
    }
    match q["weight_block_size"]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_u64()).collect::<Vec<_>>())
    {
        Some(b) if b.len() == 2 && b.iter().all(|x| x.is_some_and(|x| x > 0)) => {
            Ok(Some((b[0].unwrap() as usize, b[1].unwrap() as usize)))
        }
        _ => Err(Error::format(
            path,
            "quantization_config.weight_block_size must be two positive integers",
        )),
    }
}

/// Files of an HF model directory that belong to the model: config, weights, tokenizer,
/// templates. Anything else (other formats of the weights, notes, SO8T files) stays behind,
/// so that no stale copy of the weights travels with a converted or baked model.
pub fn is_hf_model_file(name: &str, with_weights: bool) -> bool {
    const FILES: [&str; 11] = [
        "config.json",
        // A vision model's image processor settings (Qwen2-VL).
        "preprocessor_config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
    ];
    if name.starts_with("so8t_") || name.starts_with('.') {
        return false;
    }
    FILES.contains(&name) || name.ends_with(".model") /* sentencepiece */ || (with_weights && is_weight_file(name))
}

/// HF's weight file names: `model.safetensors`, `model-00001-of-00002.safetensors`, and the index.
pub fn is_weight_file(name: &str) -> bool {
    name == "model.safetensors"
        || name == "model.safetensors.index.json"
        || (name.starts_with("model-") && name.ends_with(".safetensors"))
}
