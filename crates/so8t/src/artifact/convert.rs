//! `convert`: a base model (HF directory or GGUF) → an SO8T directory: the base files
//! (for a GGUF, dequantised to f32 safetensors with an HF config and tokenizer), plus a
//! fresh adapter and `so8t_config.json`. Everything is written into a temporary directory
//! beside the target and renamed into place only when complete.

use super::adapter::{base_checksum, Adapter, BaseInfo, InitInfo, Labels, So8tConfig, ADAPTER_FILE, CONFIG_FILE, FORMAT_VERSION};
use crate::so8::verdict::Thresholds;
use crate::so8::gates::Granularity;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, GgufStore};
use crate::formats::WeightStore;
use crate::formats::source::{is_hf_model_file, open_source, Source};
use crate::model::Site;
use crate::staging::StagingDir;
use crate::tokenizer::TextTokenizer;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub enum Init {
    Zero,
    /// Generator entries uniform in [−scale, scale], drawn from `seed`.
    Random {
        seed: u64,
        scale: f64,
    },
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

pub fn convert(base: &Path, out: &Path, opts: &ConvertOptions) -> Result<So8tConfig> {
    if opts.factors.is_empty() || opts.sites.is_empty() {
        return Err(Error::Invalid(
            "convert needs at least one site and one factor".into(),
        ));
    }
    super::adapter::check_factors(&opts.factors).map_err(Error::Invalid)?;
    let staging = StagingDir::new(out, opts.force)?;
    let tmp_path = staging.path().to_path_buf();

    let arch = match open_source(base)? {
        Source::Hf { dir, config, fp8_block } => {
            // The weight files' headers and tensor table (offsets, sizes, dtypes) must hold
            // before they are copied and their checksum recorded as the base.
            crate::formats::safetensors::SafetensorsStore::open(&dir, fp8_block)?;
            copy_base_files(&dir, &tmp_path)?;
            config.arch
        }
        Source::Gguf(file) => write_hf_from_gguf(&file, &tmp_path)?,
    };
    let model_cfg = crate::config::ModelConfig::from_hf_file(&tmp_path.join("config.json"))?;
    let config = So8tConfig {
        version: FORMAT_VERSION,
        base: BaseInfo {
            architecture: arch.name().into(),
            source: base.display().to_string(),
            sha256: base_checksum(&tmp_path)?,
        },
        sites: opts.sites.clone(),
        granularity: opts.granularity,
        factors: opts.factors.clone(),
        labels: Labels::default(),
        heads_trained: false,
        init: match opts.init {
            Init::Zero => InitInfo {
                kind: "zero".into(),
                seed: None,
                scale: None,
            },
            Init::Random { seed, scale } => InitInfo {
                kind: "random".into(),
                seed: Some(seed),
                scale: Some(scale),
            },
        },
        thresholds: Thresholds::default(),
        heads: Default::default(),
        verdict_position: Default::default(),
    };
    let random = match opts.init {
        Init::Zero => None,
        Init::Random { seed, scale } => Some((seed, scale)),
    };
    let adapter = Adapter::init(&model_cfg, &config, random)?;
    // A --scale that no reader would accept fails here, not at the next command.
    adapter
        .check_shapes(&model_cfg, &config, &tmp_path.join(ADAPTER_FILE))
        .map_err(|e| Error::Invalid(format!("the initial generators are out of range (a smaller --scale): {e}")))?;
    adapter.write(&tmp_path.join(ADAPTER_FILE))?;
    let cfg_path = tmp_path.join(CONFIG_FILE);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&config).unwrap())
        .map_err(|e| Error::io(&cfg_path, e))?;

    staging.commit()?;
    Ok(config)
}

fn copy_base_files(src: &Path, dst: &Path) -> Result<()> {
    for e in std::fs::read_dir(src).map_err(|e| Error::io(src, e))? {
        let e = e.map_err(|e| Error::io(src, e))?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().is_file() && is_hf_model_file(&name, true) {
            std::fs::copy(e.path(), dst.join(&name)).map_err(|err| Error::io(e.path(), err))?;
        }
    }
    Ok(())
}

/// An HF directory from a GGUF: config.json, f32 model.safetensors (llama q/k rows back in
/// HF order), tokenizer.json and tokenizer_config.json from the `tokenizer.ggml.*` metadata,
/// generation_config.json.
fn write_hf_from_gguf(file: &std::sync::Arc<GgufFile>, dir: &Path) -> Result<crate::config::Arch> {
    let cfg = file.config()?;
    let hf = cfg.to_hf_json()?;
    let w = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).map_err(|e| Error::io(dir.join(name), e))
    };
    w("config.json", serde_json::to_string_pretty(&hf).unwrap())?;
    let store = GgufStore::new(file.clone(), &cfg);
    let mut tensors = HashMap::new();
    for (name, shape) in cfg.hf_tensors() {
        tensors.insert(name.clone(), store.dense(&name, &shape)?);
    }
    let st = dir.join("model.safetensors");
    crate::formats::safetensors::write(&st, &tensors, None)?;
    drop(tensors);
    if file.get("tokenizer.ggml.tokens").is_some() {
        let tok = TextTokenizer::from_gguf(file)?;
        let tj = dir.join("tokenizer.json");
        tok.inner
            .save(&tj, false)
            .map_err(|e| Error::format(&tj, e.to_string()))?;
        let tc = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": if tok.bos_text.is_empty() { serde_json::Value::Null } else { tok.bos_text.clone().into() },
            "eos_token": tok.eos_text,
            "chat_template": tok.chat_template,
        });
        w(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tc).unwrap(),
        )?;
        w(
            "generation_config.json",
            serde_json::to_string_pretty(&serde_json::json!({
                "bos_token_id": cfg.bos_token_id, "eos_token_id": tok.eog,
            }))
            .unwrap(),
        )?;
    }
    Ok(cfg.arch)
}
