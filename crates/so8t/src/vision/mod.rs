//! Qwen2-VL's vision side: the image processor ([`preprocess`]), the vision tower that
//! turns pixel rows into one feature per merged 2×2 patch block, and the multimodal RoPE
//! positions of a prompt with images (transformers' `modeling_qwen2_vl.py`:
//! `Qwen2VisionTransformerPretrainedModel`, `get_rope_index`). SO8T's gates and heads
//! belong to the text decoder; the tower runs as the checkpoint has it.

pub mod preprocess;

use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::formats::WeightStore;
use crate::model::Media;
use candle_core::{Device, Tensor, D};
use preprocess::{ImageProcessorConfig, PixelRows};
use serde::Deserialize;
use std::path::Path;

/// The vision tower's shape and the tokens that place images in a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    pub depth: usize,
    pub embed_dim: usize,
    pub num_heads: usize,
    pub mlp_ratio: f64,
    pub in_channels: usize,
    pub patch_size: usize,
    pub temporal_patch_size: usize,
    pub spatial_merge_size: usize,
    /// The merger's output width: the text decoder's hidden size.
    pub out_hidden_size: usize,
    pub rope_theta: f32,
    /// The placeholder an image's features replace (the chat template writes the
    /// `<|vision_start|>` and `<|vision_end|>` around it as text).
    pub image_token_id: u32,
}

#[derive(Deserialize)]
struct RawVision {
    depth: usize,
    embed_dim: usize,
    num_heads: usize,
    mlp_ratio: Option<f64>,
    in_channels: Option<usize>,
    in_chans: Option<usize>,
    patch_size: Option<usize>,
    temporal_patch_size: Option<usize>,
    spatial_merge_size: Option<usize>,
    hidden_size: usize,
    hidden_act: Option<String>,
}

#[derive(Deserialize)]
struct RawTop {
    vision_config: Option<RawVision>,
    image_token_id: Option<u32>,
}

impl VisionConfig {
    /// Reads the vision tower's settings from a Qwen2-VL `config.json`.
    pub fn from_hf_json(text: &str, path: &Path) -> Result<VisionConfig> {
        let raw: RawTop = crate::error::parse_json(text, path)?;
        let v = raw
            .vision_config
            .ok_or_else(|| Error::format(path, "qwen2_vl: missing field `vision_config`"))?;
        let need = |x: Option<u32>, name: &str| x.ok_or_else(|| Error::format(path, format!("qwen2_vl: missing field `{name}`")));
        let cfg = VisionConfig {
            depth: v.depth,
            embed_dim: v.embed_dim,
            num_heads: v.num_heads,
            mlp_ratio: v.mlp_ratio.unwrap_or(4.0),
            in_channels: v.in_channels.or(v.in_chans).unwrap_or(3),
            patch_size: v.patch_size.unwrap_or(14),
            temporal_patch_size: v.temporal_patch_size.unwrap_or(2),
            spatial_merge_size: v.spatial_merge_size.unwrap_or(2),
            out_hidden_size: v.hidden_size,
            rope_theta: 10_000.0,
            image_token_id: need(raw.image_token_id, "image_token_id")?,
        };
        let bad = |what: String| Err(Error::format(path, format!("vision_config: {what}")));
        if let Some(act) = v.hidden_act.as_deref().filter(|a| *a != "quick_gelu") {
            return bad(format!("hidden_act `{act}` is not supported (expected quick_gelu)"));
        }
        if cfg.in_channels != 3 {
            return bad(format!("in_channels is {}; images are RGB (3)", cfg.in_channels));
        }
        if cfg.num_heads == 0 || cfg.embed_dim % cfg.num_heads != 0 || (cfg.embed_dim / cfg.num_heads) % 4 != 0 {
            return bad(format!(
                "embed_dim {} over num_heads {} must give a head width that is a multiple of 4 (2-D rotary)",
                cfg.embed_dim, cfg.num_heads
            ));
        }
        if let Err(what) = cfg.check_sizes() {
            return bad(what);
        }
        if !(cfg.mlp_ratio.is_finite() && cfg.mlp_ratio > 0.0) {
            return bad(format!("mlp_ratio must be positive, got {}", cfg.mlp_ratio));
        }
        Ok(cfg)
    }

    fn head_dim(&self) -> usize {
        self.embed_dim / self.num_heads
    }

    /// Every size within what a vision tower has (Qwen2-VL-2B: depth 32, width 1280,
    /// patch 14), so that no product of them overflows and no loop runs on a wild value.
    fn check_sizes(&self) -> std::result::Result<(), String> {
        for (name, v, max) in [
            ("depth", self.depth, 1024),
            ("embed_dim", self.embed_dim, 1 << 16),
            ("num_heads", self.num_heads, 1024),
            ("patch_size", self.patch_size, 1024),
            ("temporal_patch_size", self.temporal_patch_size, 16),
            ("spatial_merge_size", self.spatial_merge_size, 16),
            ("hidden_size", self.out_hidden_size, 1 << 20),
            ("MLP width", self.mlp_width(), 1 << 20),
        ] {
            if v == 0 || v > max {
                return Err(format!("{name} is {v}; expected 1..={max}"));
            }
        }
        Ok(())
    }

    pub(crate) fn mlp_width(&self) -> usize {
        // transformers: int(embed_dim * mlp_ratio).
        (self.embed_dim as f64 * self.mlp_ratio) as usize
    }

    /// The merger's input width: a merge block's patches side by side.
    pub(crate) fn merged_width(&self) -> usize {
        self.embed_dim * self.spatial_merge_size * self.spatial_merge_size
    }
}

struct Linear {
    w: Tensor,
    b: Tensor,
}

/// A tensor of the checkpoint by its HF name, as dense f32 of the shape given (checked).
type Get<'a> = &'a dyn Fn(&str, &[usize]) -> Result<Tensor>;

impl Linear {
    fn load(get: Get, name: &str, out: usize, inp: usize) -> Result<Linear> {
        Ok(Linear {
            w: get(&format!("{name}.weight"), &[out, inp])?.t()?.contiguous()?,
            b: get(&format!("{name}.bias"), &[out])?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.matmul(&self.w)?.broadcast_add(&self.b)
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    fn load(get: Get, name: &str, len: usize) -> Result<LayerNorm> {
        Ok(LayerNorm {
            w: get(&format!("{name}.weight"), &[len])?,
            b: get(&format!("{name}.bias"), &[len])?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // transformers' LayerNorm eps in every Qwen2-VL vision norm.
        candle_nn::ops::layer_norm(x, &self.w, &self.b, 1e-6)
    }
}

struct Block {
    norm1: LayerNorm,
    norm2: LayerNorm,
    qkv: Linear,
    proj: Linear,
    fc1: Linear,
    fc2: Linear,
}

/// The vision tower: patch embedding, `depth` pre-norm blocks of full (per-image)
/// attention with 2-D rotary, and the merger of 2×2 patch blocks into the text width.
pub struct VisionTower {
    cfg: VisionConfig,
    patch: Tensor,
    blocks: Vec<Block>,
    ln_q: LayerNorm,
    mlp0: Linear,
    mlp2: Linear,
    /// Inverse frequencies of the 2-D rotary, one set shared by rows and columns.
    inv_freq: Vec<f32>,
}

impl VisionTower {
    /// The tower from an HF checkpoint's `visual.*` weights.
    pub fn load(cfg: VisionConfig, ws: &dyn WeightStore) -> Result<VisionTower> {
        Self::load_with(cfg, &|name, shape| ws.dense(name, shape))
    }

    /// The tower from tensors `get` gives by their HF names.
    fn load_with(cfg: VisionConfig, get: Get) -> Result<VisionTower> {
        let (d, p, t) = (cfg.embed_dim, cfg.patch_size, cfg.temporal_patch_size);
        let row = cfg.in_channels * t * p * p;
        // Conv3d with kernel = stride = one patch is a product with its flattened weight,
        // whose (channel, time, y, x) order is the pixel rows'.
        let patch = get("visual.patch_embed.proj.weight", &[d, cfg.in_channels, t, p, p])?
            .reshape((d, row))?
            .t()?
            .contiguous()?;
        let mlp = cfg.mlp_width();
        let mut blocks = Vec::new();
        for i in 0..cfg.depth {
            let b = format!("visual.blocks.{i}");
            blocks.push(Block {
                norm1: LayerNorm::load(get, &format!("{b}.norm1"), d)?,
                norm2: LayerNorm::load(get, &format!("{b}.norm2"), d)?,
                qkv: Linear::load(get, &format!("{b}.attn.qkv"), 3 * d, d)?,
                proj: Linear::load(get, &format!("{b}.attn.proj"), d, d)?,
                fc1: Linear::load(get, &format!("{b}.mlp.fc1"), mlp, d)?,
                fc2: Linear::load(get, &format!("{b}.mlp.fc2"), d, mlp)?,
            });
        }
        let merged = cfg.merged_width();
        // transformers: 1 / θ^(arange(0, dim, 2) / dim) over half a head, in f32.
        let dim = cfg.head_dim() / 2;
        let inv_freq = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / cfg.rope_theta.powf(i as f32 / dim as f32))
            .collect();
        Ok(VisionTower {
            patch,
            blocks,
            ln_q: LayerNorm::load(get, "visual.merger.ln_q", d)?,
            mlp0: Linear::load(get, "visual.merger.mlp.0", merged, merged)?,
            mlp2: Linear::load(get, "visual.merger.mlp.2", cfg.out_hidden_size, merged)?,
            inv_freq,
            cfg,
        })
    }

    pub fn config(&self) -> &VisionConfig {
        &self.cfg
    }

    /// One image's features, `[merged patches, out_hidden_size]`, in the order of its
    /// placeholder tokens.
    pub fn forward(&self, image: &PixelRows) -> Result<Tensor> {
        let [t, gh, gw] = image.grid;
        let m = self.cfg.spatial_merge_size;
        let n = t * gh * gw;
        let width = self.patch.dims()[0];
        if gh % m != 0 || gw % m != 0 || image.rows.len() != n * width {
            return Err(Error::Invalid(format!(
                "vision: pixel rows for a {t}×{gh}×{gw} grid must be {} values of a grid divisible by {m}, got {}",
                n * width,
                image.rows.len()
            )));
        }
        let x = Tensor::from_slice(&image.rows, (n, width), &Device::Cpu)?;
        let mut x = x.matmul(&self.patch)?;
        let (cos, sin) = self.rotary(image.grid)?;
        let (heads, hd) = (self.cfg.num_heads, self.cfg.head_dim());
        let scale = (hd as f64).powf(-0.5);
        for b in &self.blocks {
            let h = b.norm1.forward(&x)?;
            let qkv = b.qkv.forward(&h)?.reshape((n, 3, heads, hd))?;
            let q = rotate(&qkv.narrow(1, 0, 1)?.squeeze(1)?, &cos, &sin)?;
            let k = rotate(&qkv.narrow(1, 1, 1)?.squeeze(1)?, &cos, &sin)?;
            let v = qkv.narrow(1, 2, 1)?.squeeze(1)?;
            // Every patch of the image attends to every other (the image is one block of
            // the block-diagonal mask; each image runs alone here).
            let (q, k, v) = (q.transpose(0, 1)?.contiguous()?, k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?);
            let att = (q.matmul(&k.t()?)? * scale)?;
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v)?.transpose(0, 1)?.reshape((n, heads * hd))?;
            x = (x + b.proj.forward(&y)?)?;
            let h = b.fc1.forward(&b.norm2.forward(&x)?)?;
            // quick_gelu: x · σ(1.702 x).
            let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
            x = (x + b.fc2.forward(&h)?)?;
        }
        let merged = self.ln_q.forward(&x)?.reshape((n / (m * m), self.cfg.merged_width()))?;
        Ok(self.mlp2.forward(&self.mlp0.forward(&merged)?.gelu_erf()?)?)
    }

    /// cos and sin `[patches, 1, head_dim]` of the 2-D rotary: each patch's row position
    /// on the first half of the frequencies, its column on the second, in the patches'
    /// merge-block order, the whole repeated for rotate-half.
    fn rotary(&self, [t, gh, gw]: [usize; 3]) -> Result<(Tensor, Tensor)> {
        let m = self.cfg.spatial_merge_size;
        let f = &self.inv_freq;
        let hd = self.cfg.head_dim();
        let (mut cos, mut sin) = (Vec::with_capacity(t * gh * gw * hd), Vec::with_capacity(t * gh * gw * hd));
        for _ in 0..t {
            for bh in 0..gh / m {
                for bw in 0..gw / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            let (r, c) = ((bh * m + mh) as f32, (bw * m + mw) as f32);
                            let angles: Vec<f32> = f.iter().map(|x| r * x).chain(f.iter().map(|x| c * x)).collect();
                            for _ in 0..2 {
                                cos.extend(angles.iter().map(|a| a.cos()));
                                sin.extend(angles.iter().map(|a| a.sin()));
                            }
                        }
                    }
                }
            }
        }
        let n = t * gh * gw;
        Ok((
            Tensor::from_vec(cos, (n, 1, hd), &Device::Cpu)?,
            Tensor::from_vec(sin, (n, 1, hd), &Device::Cpu)?,
        ))
    }
}

/// Rotate-half RoPE of `x` `[n, heads, head_dim]` with tables `[n, 1, head_dim]`.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// The placeholder rows, multimodal RoPE positions and delta of a prompt `ids` holding
/// `grids.len()` images' placeholders (transformers' `get_rope_index`): text tokens take
/// consecutive positions on all three axes; an image's merged patches starting at
/// position s take (s, s + row, s + column), and the text after it continues from s + the
/// larger of its merged height and width. The delta makes the tokens generated after the
/// prompt continue from where it left off.
pub fn mrope_positions(
    ids: &[u32],
    image_token: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<(Vec<usize>, Vec<[u32; 3]>, i64)> {
    let mut positions = Vec::with_capacity(ids.len());
    let mut rows = Vec::new();
    let mut next: i64 = 0;
    let mut images = grids.iter();
    let at = |x: i64| -> Result<u32> {
        u32::try_from(x).map_err(|_| Error::Invalid(format!("vision: RoPE position {x} is out of range")))
    };
    let mut i = 0;
    while i < ids.len() {
        if ids[i] != image_token {
            positions.push([at(next)?; 3]);
            next += 1;
            i += 1;
            continue;
        }
        let run = ids[i..].iter().take_while(|&&t| t == image_token).count();
        let &[t, gh, gw] = images.next().ok_or_else(|| {
            Error::Invalid(format!(
                "{} images given, but the prompt has more image placeholder runs",
                grids.len()
            ))
        })?;
        let (h, w) = (gh / merge, gw / merge);
        if run != t * h * w {
            return Err(Error::Invalid(format!(
                "image {} takes {} placeholder tokens ({t}×{h}×{w} merged patches), but the prompt has {run} there",
                grids.len() - images.len(),
                t * h * w
            )));
        }
        for ti in 0..t {
            for r in 0..h {
                for c in 0..w {
                    positions.push([at(next + ti as i64)?, at(next + r as i64)?, at(next + c as i64)?]);
                }
            }
        }
        rows.extend(i..i + run);
        next += t.max(h).max(w) as i64;
        i += run;
    }
    if images.len() > 0 {
        return Err(Error::Invalid(format!(
            "{} images given, but the prompt has placeholders for {}",
            grids.len(),
            grids.len() - images.len()
        )));
    }
    let delta = next - ids.len() as i64;
    Ok((rows, positions, delta))
}

/// The GGUF name of a vision tensor `hf` (`visual.…`) in llama.cpp's projector file, for
/// the tensors it keeps whole (the fused qkv and the Conv3d patch weight are cut there).
pub fn mmproj_name(hf: &str) -> Option<String> {
    let rest = hf.strip_prefix("visual.")?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "merger.ln_q" => "v.post_ln".to_string(),
        "merger.mlp.0" => "mm.0".to_string(),
        "merger.mlp.2" => "mm.2".to_string(),
        _ => {
            let rest = module.strip_prefix("blocks.")?;
            let (b, m) = rest.split_once('.')?;
            let part = match m {
                "attn.proj" => "attn_out",
                "mlp.fc1" => "ffn_up",
                "mlp.fc2" => "ffn_down",
                "norm1" => "ln1",
                "norm2" => "ln2",
                _ => return None,
            };
            format!("v.blk.{b}.{part}")
        }
    };
    Some(format!("{g}.{kind}"))
}

/// A tensor of a projector file by its HF name, dense f32: the whole ones by
/// [`mmproj_name`], the qkv as its q, k and v stacked, the patch weight as its temporal
/// slices stacked.
fn mmproj_tensor(file: &GgufFile, hf: &str, shape: &[usize]) -> Result<Tensor> {
    let read = |name: &str, want: &[usize]| -> Result<Tensor> {
        let got = file.tensor_shape(name).ok_or_else(|| Error::format(&file.path, format!("tensor `{name}` is missing")))?;
        if got != want {
            return Err(Error::format(&file.path, format!("tensor `{name}` has shape {got:?}, expected {want:?}")));
        }
        Ok(file.qtensor(name)?.dequantize(&Device::Cpu)?.to_dtype(candle_core::DType::F32)?)
    };
    if let Some(qkv) = hf.strip_suffix(".attn.qkv.weight").or(hf.strip_suffix(".attn.qkv.bias")) {
        let b = qkv.strip_prefix("visual.blocks.").unwrap_or(qkv);
        let kind = if hf.ends_with(".weight") { "weight" } else { "bias" };
        let part: Vec<usize> = std::iter::once(shape[0] / 3).chain(shape[1..].iter().copied()).collect();
        let parts = ["attn_q", "attn_k", "attn_v"]
            .iter()
            .map(|p| read(&format!("v.blk.{b}.{p}.{kind}"), &part))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::cat(&parts, 0)?);
    }
    if hf == "visual.patch_embed.proj.weight" {
        let [d, c, t, p, q] = shape else {
            return Err(Error::Invalid("vision: the patch weight has five dims".into()));
        };
        let slices = (0..*t)
            .map(|i| {
                let name = if i == 0 { "v.patch_embd.weight".to_string() } else { format!("v.patch_embd.weight.{i}") };
                read(&name, &[*d, *c, *p, *q])
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(Tensor::stack(&slices, 2)?);
    }
    let name = mmproj_name(hf).ok_or_else(|| Error::Invalid(format!("vision: no projector name for `{hf}`")))?;
    read(&name, shape)
}

impl VisionConfig {
    /// The tower's settings from llama.cpp's projector file and the text GGUF's vocabulary
    /// (the image tokens by their text, as mtmd finds them).
    pub fn from_mmproj(file: &GgufFile, text: &GgufFile) -> Result<VisionConfig> {
        let bad = |what: String| Err(Error::format(&file.path, what));
        match file.opt_str("clip.projector_type")? {
            Some("qwen2vl_merger") => {}
            other => return bad(format!("clip.projector_type is {other:?}; expected qwen2vl_merger (Qwen2-VL)")),
        }
        let embed_dim = file.usize("clip.vision.embedding_length")?;
        let mlp = file
            .tensor_shape("v.blk.0.ffn_up.weight")
            .map(|s| s[0])
            .ok_or_else(|| Error::format(&file.path, "tensor `v.blk.0.ffn_up.weight` is missing"))?;
        let temporal = 1 + (1..4).take_while(|i| file.tensor_shape(&format!("v.patch_embd.weight.{i}")).is_some()).count();
        let tokens = text.str_array("tokenizer.ggml.tokens")?;
        let id = |t: &str| -> Result<u32> {
            tokens
                .iter()
                .position(|x| *x == t)
                .map(|i| i as u32)
                .ok_or_else(|| Error::format(&text.path, format!("the vocabulary has no `{t}` token for images")))
        };
        let cfg = VisionConfig {
            depth: file.usize("clip.vision.block_count")?,
            embed_dim,
            num_heads: file.usize("clip.vision.attention.head_count")?,
            mlp_ratio: mlp as f64 / embed_dim.max(1) as f64,
            in_channels: 3,
            patch_size: file.usize("clip.vision.patch_size")?,
            temporal_patch_size: temporal,
            spatial_merge_size: file.opt_usize("clip.vision.spatial_merge_size")?.unwrap_or(2),
            out_hidden_size: file.usize("clip.vision.projection_dim")?,
            rope_theta: 10_000.0,
            image_token_id: id("<|image_pad|>")?,
        };
        if let Err(what) = cfg.check_sizes() {
            return bad(format!("clip.vision: {what}"));
        }
        if cfg.embed_dim % cfg.num_heads != 0 || (cfg.embed_dim / cfg.num_heads) % 4 != 0 {
            return bad(format!(
                "clip.vision: {} heads over width {} do not give a head width that is a multiple of 4",
                cfg.num_heads, cfg.embed_dim
            ));
        }
        Ok(cfg)
    }
}

/// The image processor of the checkpoint in `dir` (`preprocessor_config.json`, Qwen2-VL's
/// defaults without one), checked against the tower it feeds.
pub fn read_processor(dir: &Path, cfg: &VisionConfig) -> Result<ImageProcessorConfig> {
    let pre_path = dir.join("preprocessor_config.json");
    let processor = match crate::files::read_text_if_exists(&pre_path, crate::files::SETTINGS_LIMIT)? {
        Some(text) => ImageProcessorConfig::from_json(&text, &pre_path)?,
        None => ImageProcessorConfig::default(),
    };
    if (processor.patch_size, processor.temporal_patch_size, processor.merge_size)
        != (cfg.patch_size, cfg.temporal_patch_size, cfg.spatial_merge_size)
    {
        return Err(Error::format(
            &pre_path,
            format!(
                "patch {} / temporal patch {} / merge {} differ from config.json's vision_config ({} / {} / {})",
                processor.patch_size,
                processor.temporal_patch_size,
                processor.merge_size,
                cfg.patch_size,
                cfg.temporal_patch_size,
                cfg.spatial_merge_size
            ),
        ));
    }
    Ok(processor)
}

/// A Qwen2-VL checkpoint's vision side: its image processor and tower.
pub struct Vision {
    pub processor: ImageProcessorConfig,
    pub tower: VisionTower,
}

impl Vision {
    /// Loads the tower from the checkpoint's weights and the processor settings from
    /// `preprocessor_config.json` beside `config.json` (Qwen2-VL's defaults without one).
    pub fn load(dir: &Path, config_text: &str, ws: &dyn WeightStore) -> Result<Vision> {
        let cfg = VisionConfig::from_hf_json(config_text, &dir.join("config.json"))?;
        Ok(Vision {
            processor: read_processor(dir, &cfg)?,
            tower: VisionTower::load(cfg, ws)?,
        })
    }

    /// Loads the tower from llama.cpp's projector file `mmproj` for the text GGUF `text`.
    /// The file keeps the image mean and std but not the processor's pixel bounds, which
    /// are Qwen2-VL's defaults here.
    pub fn load_mmproj(mmproj: &Path, text: &GgufFile) -> Result<Vision> {
        let file = GgufFile::open(mmproj)?;
        let cfg = VisionConfig::from_mmproj(&file, text)?;
        let d = ImageProcessorConfig::default();
        let stats = |key: &str, default: [f32; 3]| -> Result<[f32; 3]> {
            match file.f32_array(key) {
                None => Ok(default),
                Some(v) if v.len() == 3 => Ok([v[0], v[1], v[2]]),
                Some(v) => Err(Error::format(mmproj, format!("metadata `{key}` has {} values, expected 3", v.len()))),
            }
        };
        let processor = ImageProcessorConfig {
            patch_size: cfg.patch_size,
            temporal_patch_size: cfg.temporal_patch_size,
            merge_size: cfg.spatial_merge_size,
            image_mean: stats("clip.vision.image_mean", d.image_mean)?,
            image_std: stats("clip.vision.image_std", d.image_std)?,
            ..d
        };
        let tower = VisionTower::load_with(cfg, &|name, shape| mmproj_tensor(&file, name, shape))?;
        Ok(Vision { processor, tower })
    }

    /// How many placeholder tokens an image takes: one per merged patch block.
    pub fn placeholders(&self, image: &PixelRows) -> usize {
        let m = self.tower.config().spatial_merge_size;
        let [t, h, w] = image.grid;
        t * (h / m) * (w / m)
    }

    /// A rendered prompt's ids with its one placeholder per image repeated once per
    /// merged patch block of that image (as transformers' processor expands the text), and
    /// where each old position went.
    pub fn expand(&self, ids: &[u32], images: &[PixelRows]) -> Result<(Vec<u32>, Vec<usize>)> {
        let token = self.tower.config().image_token_id;
        let found = ids.iter().filter(|&&t| t == token).count();
        if found != images.len() {
            return Err(Error::Invalid(format!(
                "{} images given, but the prompt has {found} image placeholders (the chat template places one per image part)",
                images.len()
            )));
        }
        let mut out = Vec::with_capacity(ids.len() + images.iter().map(|i| self.placeholders(i)).sum::<usize>());
        let mut map = Vec::with_capacity(ids.len());
        let mut next = images.iter();
        for &t in ids {
            map.push(out.len());
            if t == token {
                let image = next.next().expect("as many placeholders as images");
                out.extend(std::iter::repeat_n(token, self.placeholders(image)));
            } else {
                out.push(t);
            }
        }
        Ok((out, map))
    }

    /// A rendered prompt (one placeholder per image) made ready for the decoder: its ids
    /// expanded ([`Vision::expand`]), the verdict position `at` moved with them, and the
    /// images' [`Media`].
    pub fn expanded_prompt(&self, ids: &[u32], at: Option<usize>, images: &[PixelRows]) -> Result<(Vec<u32>, Option<usize>, Media)> {
        let (ids, moved) = self.expand(ids, images)?;
        let media = self.media(&ids, images)?;
        Ok((ids, at.map(|i| moved[i]), media))
    }

    /// What the decoder takes for a prompt `ids` with `images` in order: their features at
    /// the placeholders and every token's RoPE position. A prompt with images is read from
    /// its start (no cached prefix is reused for it).
    pub fn media(&self, ids: &[u32], images: &[PixelRows]) -> Result<Media> {
        let cfg = self.tower.config();
        let grids: Vec<[usize; 3]> = images.iter().map(|i| i.grid).collect();
        let (rows, positions, delta) = mrope_positions(ids, cfg.image_token_id, &grids, cfg.spatial_merge_size)?;
        let mut embeds = Vec::with_capacity(rows.len() * cfg.out_hidden_size);
        for image in images {
            embeds.extend(self.tower.forward(image)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(Media { rows, embeds, positions, delta })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Qwen2-VL-2B-Instruct's config.json as released (transformers 4.41 layout: the
    /// decoder's fields at the top level, `rope_scaling` of type `mrope`, `in_chans`).
    const RELEASED: &str = r#"{
      "architectures": ["Qwen2VLForConditionalGeneration"], "attention_dropout": 0.0,
      "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "vision_token_id": 151654, "image_token_id": 151655,
      "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
      "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 28,
      "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
      "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768,
      "tie_word_embeddings": true, "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
      "use_cache": true, "use_sliding_window": false,
      "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "in_chans": 3,
        "hidden_size": 1536, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
        "temporal_patch_size": 2},
      "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 151936
    }"#;

    #[test]
    fn the_released_qwen2_vl_2b_config_reads_as_its_model() {
        let path = Path::new("config.json");
        let c = crate::config::ModelConfig::from_hf_json(RELEASED, path).unwrap();
        assert_eq!(c.arch, crate::config::Arch::Qwen2Vl);
        assert_eq!((c.head_dim, c.rotary_dim, c.mrope_section), (128, 128, Some([16, 24, 24])));
        assert!(c.qkv_bias && c.tie_word_embeddings && c.sliding_window.is_none());
        let v = VisionConfig::from_hf_json(RELEASED, path).unwrap();
        assert_eq!((v.depth, v.embed_dim, v.num_heads, v.out_hidden_size, v.mlp_width()), (32, 1280, 16, 1536, 5120));
        assert_eq!(v.image_token_id, 151655);
        // A section that does not cover the rotary frequencies is named.
        let bad = RELEASED.replace("[16, 24, 24]", "[16, 24, 16]");
        let e = crate::config::ModelConfig::from_hf_json(&bad, path).unwrap_err().to_string();
        assert!(e.contains("mrope_section") && e.contains("sums to 56"), "{e}");
    }

    #[test]
    fn positions_follow_get_rope_index() {
        // 2 text tokens, an image of 1×4×6 patches (2×3 merged), 2 text tokens.
        let ids = [7, 8, 5, 5, 5, 5, 5, 5, 9, 10];
        let (rows, pos, delta) = mrope_positions(&ids, 5, &[[1, 4, 6]], 2).unwrap();
        assert_eq!(rows, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(&pos[..3], &[[0; 3], [1; 3], [2, 2, 2]]);
        assert_eq!(&pos[2..8], &[[2, 2, 2], [2, 2, 3], [2, 2, 4], [2, 3, 2], [2, 3, 3], [2, 3, 4]]);
        // Text after the image continues from its start + max(2, 3).
        assert_eq!(&pos[8..], &[[5; 3], [6; 3]]);
        assert_eq!(delta, 7 - 10);
        assert!(mrope_positions(&ids[..6], 5, &[[1, 4, 6]], 2).unwrap_err().to_string().contains("6 placeholder"));
        assert!(mrope_positions(&ids, 5, &[], 2).is_err());
    }
}
