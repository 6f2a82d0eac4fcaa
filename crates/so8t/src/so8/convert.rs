//! `convert`: a base model (HF directory or GGUF) → an SO8T directory: the base files
//! (for a GGUF, dequantised to f32 safetensors with an HF config and tokenizer), plus a
//! fresh adapter and `so8t_config.json`. Everything is written into a temporary directory
//! beside the target and renamed into place only when complete.

use super::adapter::{base_checksum, Adapter, BaseInfo, InitInfo, Labels, So8tConfig, Thresholds, ADAPTER_FILE, CONFIG_FILE, FORMAT_VERSION};
use super::gates::Granularity;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, GgufStore};
use crate::formats::WeightStore;
use crate::load::{open_source, Source};
use crate::model::Site;
use crate::tokenizer::TextTokenizer;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub enum Init {
    Zero,
    /// Generator entries uniform in [−scale, scale], drawn from `seed`.
    Random { seed: u64, scale: f64 },
}

#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub sites: Vec<Site>,
    pub granularity: Granularity,
    pub factors: Vec<String>,
    pub init: Init,
    pub force: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            sites: Site::ALL.to_vec(),
            granularity: Granularity::Shared,
            factors: vec!["safe".into(), "cmd".into()],
            init: Init::Zero,
            force: false,
        }
    }
}

/// A directory that removes itself unless kept.
struct TempDir(Option<PathBuf>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(p) = &self.0 {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

pub fn convert(base: &Path, out: &Path, opts: &ConvertOptions) -> Result<So8tConfig> {
    if opts.factors.is_empty() || opts.sites.is_empty() {
        return Err(Error::Invalid("convert needs at least one site and one factor".into()));
    }
    let mut seen = std::collections::HashSet::new();
    for f in &opts.factors {
        if f.is_empty() || !f.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || !seen.insert(f) {
            return Err(Error::Invalid(format!("factor names must be distinct identifiers, got `{f}`")));
        }
    }
    if out.exists() && !opts.force {
        return Err(Error::format(out, "already exists (use --force to replace it)"));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let name = out.file_name().ok_or_else(|| Error::format(out, "not a directory name"))?.to_string_lossy();
    let tmp_path = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp_path);
    std::fs::create_dir(&tmp_path).map_err(|e| Error::io(&tmp_path, e))?;
    let mut tmp = TempDir(Some(tmp_path.clone()));

    let arch = match open_source(base)? {
        Source::Hf { dir, config, .. } => {
            copy_base_files(&dir, &tmp_path)?;
            config.arch
        }
        Source::Gguf(file) => write_hf_from_gguf(&file, &tmp_path)?,
    };
    let model_cfg = crate::config::ModelConfig::from_hf_file(&tmp_path.join("config.json"))?;
    let config = So8tConfig {
        version: FORMAT_VERSION,
        base: BaseInfo { architecture: arch.name().into(), source: base.display().to_string(), sha256: base_checksum(&tmp_path)? },
        sites: opts.sites.clone(),
        granularity: opts.granularity,
        factors: opts.factors.clone(),
        labels: Labels::default(),
        heads_trained: false,
        init: match opts.init {
            Init::Zero => InitInfo { kind: "zero".into(), seed: None, scale: None },
            Init::Random { seed, scale } => InitInfo { kind: "random".into(), seed: Some(seed), scale: Some(scale) },
        },
        thresholds: Thresholds { unsafe_: 0.5, escalate: 0.5 },
    };
    let random = match opts.init {
        Init::Zero => None,
        Init::Random { seed, scale } => Some((seed, scale)),
    };
    Adapter::init(&model_cfg, &config, random)?.write(&tmp_path.join(ADAPTER_FILE))?;
    let cfg_path = tmp_path.join(CONFIG_FILE);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| Error::io(&cfg_path, e))?;

    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(&tmp_path, out).map_err(|e| Error::io(out, e))?;
    tmp.0 = None;
    Ok(config)
}

/// The base directory's files, as they are (SO8T files of an earlier conversion excluded).
fn copy_base_files(src: &Path, dst: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if !e.path().is_file() || name.starts_with("so8t_") || name.starts_with('.') {
            continue;
        }
        std::fs::copy(e.path(), dst.join(&name)).map_err(|err| Error::io(e.path(), err))?;
    }
    Ok(())
}

/// An HF directory from a GGUF: config.json, f32 model.safetensors (llama q/k rows back in
/// HF order), tokenizer.json and tokenizer_config.json from the `tokenizer.ggml.*` metadata,
/// generation_config.json.
fn write_hf_from_gguf(file: &std::sync::Arc<GgufFile>, dir: &Path) -> Result<crate::config::Arch> {
    let cfg = file.config()?;
    let hf = cfg.to_hf_json()?;
    let w = |name: &str, text: String| std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e));
    w("config.json", serde_json::to_string_pretty(&hf).unwrap())?;
    let store = GgufStore::new(file.clone(), &cfg);
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.hf_tensors() {
        tensors.insert(name.clone(), store.dense(&name, &shape)?);
    }
    let st = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &st).map_err(|e| Error::format(&st, crate::error::candle_message(&e)))?;
    drop(tensors);
    if file.get("tokenizer.ggml.tokens").is_some() {
        let tok = TextTokenizer::from_gguf(file)?;
        let tj = dir.join("tokenizer.json");
        tok.inner.save(&tj, false).map_err(|e| Error::format(&tj, e.to_string()))?;
        let tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": if tok.bos_text.is_empty() { serde_json::Value::Null } else { tok.bos_text.clone().into() },
            "eos_token": tok.eos_text,
            "chat_template": tok.chat_template,
        });
        w("tokenizer_config.json", serde_json::to_string_pretty(&tc).unwrap())?;
        w("generation_config.json", serde_json::to_string_pretty(&serde_json::json!({
            "bos_token_id": cfg.bos_token_id, "eos_token_id": tok.eog,
        })).unwrap())?;
    }
    Ok(cfg.arch)
}
