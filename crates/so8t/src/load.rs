//! Opening a model path: an HF directory or a `.gguf` file, into a decoder, its
//! tokenizer and its generation defaults.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgufFile, GgufStore};
use crate::formats::source::{open_source, Source};
use crate::formats::safetensors::SafetensorsStore;
use crate::formats::WeightStore;
use crate::model::Decoder;
use crate::artifact::adapter::{is_so8t_dir, Adapter, So8tConfig, ADAPTER_FILE};
use crate::so8::verdict::{Heads, Verdict};
use crate::artifact::bake::{read_heads, HEADS_FILE};
use crate::tokenizer::TextTokenizer;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Hf,
    Gguf,
}

pub use crate::sampling::GenerationDefaults;

/// The largest image file `so8t` reads (PNG or JPEG): 32 MiB.
pub const IMAGE_FILE_LIMIT: u64 = 32 << 20;

pub struct Model {
    pub path: PathBuf,
    pub kind: SourceKind,
    pub config: ModelConfig,
    pub decoder: Decoder,
    pub tokenizer: Option<TextTokenizer>,
    pub generation: GenerationDefaults,
    pub weights: Box<dyn WeightStore>,
    /// Present for an SO8T directory: its config and heads (the gates are in the decoder).
    pub so8t: Option<So8tState>,
    /// A vision-language checkpoint's image processor and vision tower (Qwen2-VL); shared,
    /// so that a server computes image features beside the thread that owns the decoder.
    pub vision: Option<std::sync::Arc<crate::vision::Vision>>,
}

pub struct So8tState {
    pub config: So8tConfig,
    pub heads: Heads,
    /// The gates are folded into the weights (a baked directory or export).
    pub baked: bool,
}

impl So8tState {
    /// The layers (1..=L) the safety and authority heads read.
    pub fn head_layers(&self, decoder: &Decoder) -> [usize; 2] {
        self.config.heads.layers(decoder.cfg.num_layers)
    }

    /// Makes every forward keep the states the heads read.
    pub fn install_taps(&self, decoder: &mut Decoder) -> Result<()> {
        let [a, b] = self.head_layers(decoder);
        decoder.set_taps(&if a == b { vec![a] } else { vec![a, b] })
    }

    /// The verdicts of row `row` of the decoder's last forward (or of every row, `None`),
    /// each head reading its layer. The layers must be among the decoder's taps.
    pub fn verdicts(&self, decoder: &Decoder, row: Option<usize>) -> Result<Vec<Verdict>> {
        let layers = self.head_layers(decoder);
        let mut inputs = Vec::with_capacity(2);
        for l in layers {
            let t = decoder.tap_of(l).ok_or_else(|| {
                Error::Invalid(format!("the decoder keeps no state of layer {l} for the heads"))
            })?;
            inputs.push(match row {
                Some(r) => t.get(r)?,
                None => t.clone(),
            });
        }
        self.heads.verdicts_of([&inputs[0], &inputs[1]])
    }
}

impl Model {
    /// Moves the decoder (weights, gates, cache) to `device`, f16/bf16 weights to
    /// multiply in `dtype` there; the heads stay in host memory, where the states they
    /// read come to them.
    pub fn to_device(&mut self, device: &candle_core::Device, dtype: crate::device::Dtype) -> Result<()> {
        self.decoder.to_device(device, dtype)
    }

    /// Opens a model; an SO8T directory comes with its gates installed and its heads.
    pub fn open(path: &Path) -> Result<Model> {
        let source = open_source(path)?;
        // An exported GGUF carries its heads in metadata; read them from the file already parsed.
        let gguf = match &source {
            Source::Gguf(f) => Some(f.clone()),
            Source::Hf { .. } => None,
        };
        let mut m = Self::from_source(source)?;
        if let Some(g) = gguf {
            if let Some((heads, config)) =
                crate::artifact::export::read_gguf_heads(&g, &m.config)?
            {
                m.so8t = Some(So8tState {
                    config,
                    heads,
                    baked: true,
                });
            }
        } else if is_so8t_dir(path) {
            let config = So8tConfig::read(path)?;
            let adapter = Adapter::read(path)?;
            adapter.check_shapes(&m.config, &config, &path.join(ADAPTER_FILE))?;
            adapter.install(&mut m.decoder, &config)?;
            m.so8t = Some(So8tState {
                config,
                heads: adapter.heads,
                baked: false,
            });
        } else if path.is_dir() && path.join(HEADS_FILE).exists() {
            let (heads, config) = read_heads(path, &m.config)?;
            m.so8t = Some(So8tState {
                config,
                heads,
                baked: true,
            });
        }
        // Every reader above has checked the heads against the model.
        if let Some(s) = &m.so8t {
            s.install_taps(&mut m.decoder)?;
        }
        Ok(m)
    }

    /// Opens only the base model of a path, ignoring any SO8T adapter beside it.
    pub fn open_base(path: &Path) -> Result<Model> {
        Self::from_source(open_source(path)?)
    }

    fn from_source(source: Source) -> Result<Model> {
        match source {
            Source::Hf {
                dir,
                config,
                fp8_block,
            } => {
                let weights = SafetensorsStore::open(&dir, fp8_block)?;
                let decoder = Decoder::load(config.clone(), &weights)?;
                let vision = if config.arch == crate::config::Arch::Qwen2Vl {
                    let cfg_path = dir.join("config.json");
                    let text = crate::files::read_text(&cfg_path, crate::files::SETTINGS_LIMIT)?;
                    Some(std::sync::Arc::new(crate::vision::Vision::load(&dir, &text, &weights)?))
                } else {
                    None
                };
                let tokenizer = if dir.join("tokenizer.json").exists() {
                    let t = TextTokenizer::from_hf_dir(&dir, &config.eos_token_ids)?.for_model(
                        config.vocab_size,
                        config.max_position_embeddings,
                        &dir.join("tokenizer.json"),
                    )?;
                    Some(t)
                } else {
                    None
                };
                let gen_path = dir.join("generation_config.json");
                let generation = match crate::files::read_text_if_exists(
                    &gen_path,
                    crate::files::SETTINGS_LIMIT,
                )? {
                    Some(text) => {
                        let g: GenerationDefaults = crate::error::parse_json(&text, &gen_path)?;
                        g.check()
                            .map_err(|b| Error::format(&gen_path, b.to_string()))?;
                        g
                    }
                    None => GenerationDefaults::default(),
                };
                Ok(Model {
                    path: dir,
                    kind: SourceKind::Hf,
                    config,
                    decoder,
                    tokenizer,
                    generation,
                    weights: Box::new(weights),
                    so8t: None,
                    vision,
                })
            }
            Source::Gguf(file) => {
                let config = file.config()?;
                let weights = GgufStore::new(file.clone(), &config);
                let decoder = Decoder::load(config.clone(), &weights)?;
                // A vision model's projector, where llama.cpp's converter puts it.
                let mmproj = crate::artifact::mmproj::mmproj_path(&file.path);
                let vision = if config.arch == crate::config::Arch::Qwen2Vl && mmproj.is_file() {
                    Some(std::sync::Arc::new(crate::vision::Vision::load_mmproj(&mmproj, &file)?))
                } else {
                    None
                };
                let tokenizer = if file.get("tokenizer.ggml.tokens").is_some() {
                    let t = TextTokenizer::from_gguf(&file)?.for_model(
                        config.vocab_size,
                        config.max_position_embeddings,
                        &file.path,
                    )?;
                    Some(t)
                } else {
                    None
                };
                Ok(Model {
                    path: file.path.clone(),
                    kind: SourceKind::Gguf,
                    config,
                    decoder,
                    tokenizer,
                    generation: GenerationDefaults::default(),
                    weights: Box::new(weights),
                    so8t: None,
                    vision,
                })
            }
        }
    }

    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            Error::format(
                &self.path,
                "the model has no tokenizer (tokenizer.json or tokenizer.ggml.*); use --prompt-ids",
            )
        })
    }

    /// The token ids of a conversation before the assistant answers
    /// ([`TextTokenizer::chat_ids`]).
    pub fn prompt_ids(&self, messages: &[crate::chat::Message]) -> Result<Vec<u32>> {
        self.tokenizer()?.chat_ids(messages)
    }

    /// The prompt token whose verdict is the prompt's, for `ids` = [`Model::prompt_ids`] of
    /// `messages`: `None` for the last (the default, after the assistant header).
    pub fn prompt_verdict_position(
        &self,
        messages: &[crate::chat::Message],
        ids: &[u32],
    ) -> Result<Option<usize>> {
        match &self.so8t {
            Some(s) => s.config.verdict_position.index(self.tokenizer()?, messages, ids),
            None => Ok(None),
        }
    }

    /// Loads a vision GGUF's projector from `mmproj` (llama.cpp's `--mmproj`), in place of
    /// any found beside the model.
    pub fn attach_mmproj(&mut self, mmproj: &Path) -> Result<()> {
        if self.kind != SourceKind::Gguf || self.config.arch != crate::config::Arch::Qwen2Vl {
            return Err(Error::format(
                mmproj,
                format!(
                    "a projector file goes with a qwen2vl GGUF; {} is a {} {}",
                    self.path.display(),
                    self.config.arch.name(),
                    if self.kind == SourceKind::Gguf { "GGUF" } else { "directory (its vision tower is in its weights)" }
                ),
            ));
        }
        let text = GgufFile::open(&self.path)?;
        self.vision = Some(std::sync::Arc::new(crate::vision::Vision::load_mmproj(mmproj, &text)?));
        Ok(())
    }

    /// A vision model's image, read and preprocessed; `path` names it in errors.
    pub fn read_image(&self, path: &Path) -> Result<crate::vision::preprocess::PixelRows> {
        let vision = self.vision()?;
        let bytes = crate::files::read(path, IMAGE_FILE_LIMIT)?;
        vision.processor.preprocess(&bytes, path)
    }

    /// The vision side, or an error naming the model for a text-only one.
    pub fn vision(&self) -> Result<&crate::vision::Vision> {
        self.vision.as_deref().ok_or_else(|| match (self.kind, self.config.arch) {
            (SourceKind::Gguf, crate::config::Arch::Qwen2Vl) => Error::format(
                &self.path,
                format!(
                    "no vision projector: give --mmproj FILE, or put {} beside the model",
                    crate::artifact::mmproj::mmproj_path(&self.path).file_name().unwrap_or_default().to_string_lossy()
                ),
            ),
            _ => Error::format(&self.path, format!("a {} model takes no images", self.config.arch.name())),
        })
    }

    /// What the decoder takes for a prompt's `ids` holding `images`' placeholders, each
    /// image's run of them already its full length.
    pub fn prompt_media(&self, ids: &[u32], images: &[crate::vision::preprocess::PixelRows]) -> Result<crate::model::Media> {
        self.vision()?.media(ids, images)
    }

    /// Ids that end generation: the tokenizer's, or the config's when there is none.
    pub fn eog_ids(&self) -> Vec<u32> {
        match &self.tokenizer {
            Some(t) => t.eog.clone(),
            None => self.config.eos_token_ids.clone(),
        }
    }
}
