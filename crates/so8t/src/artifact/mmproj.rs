//! A vision-language model's projector file for llama.cpp (`mmproj-NAME.gguf`, which its
//! `mtmd` library loads beside the text GGUF): the Qwen2-VL vision tower and merger as
//! `convert_hf_to_gguf.py --mmproj` writes them (its `Qwen2VLVisionModel`): architecture
//! `clip`, projector type `qwen2vl_merger`, the fused qkv cut into q, k and v, and the
//! Conv3d patch embedding cut into its two temporal slices. The tower is not gated (spec
//! §4 places gates in the text decoder), so it is written as the checkpoint has it.

use crate::error::{Error, Result};
use crate::formats::gguf_write::{encode, write, Meta, PlannedTensor};
use crate::formats::WeightStore;
use crate::vision::{mmproj_name, VisionConfig};
use candle_core::quantized::GgmlDType;
use std::path::{Path, PathBuf};

/// Where the projector of a text GGUF at `text` goes, and where `run` looks for it:
/// `mmproj-` before the file name, as llama.cpp's converter and model repositories name it.
pub fn mmproj_path(text: &Path) -> PathBuf {
    let name = text.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    text.with_file_name(format!("mmproj-{name}"))
}

/// Whether exporting the model at `src` writes a projector beside the GGUF (a Qwen2-VL
/// directory); reads only its config.
pub fn writes_projector(src: &Path) -> Result<bool> {
    Ok(match crate::formats::source::open_source(src)? {
        crate::formats::source::Source::Hf { config, .. } => config.arch == crate::config::Arch::Qwen2Vl,
        crate::formats::source::Source::Gguf(_) => false,
    })
}

/// The projector's tensor type: f32 for an f32 export, f16 otherwise. llama.cpp's
/// converter writes projectors at f32 or f16 (its `--outtype`), and quantised projectors
/// are neither what Qwen2-VL's repositories ship nor what every mtmd backend takes.
pub fn projector_type(text_type: GgmlDType) -> GgmlDType {
    if text_type == GgmlDType::F32 {
        GgmlDType::F32
    } else {
        GgmlDType::F16
    }
}

/// One tensor of the file: its GGUF name, HF-order dims, and how its values come from the
/// checkpoint.
struct Planned {
    name: String,
    dims: Vec<usize>,
    source: Source,
}

enum Source {
    /// A checkpoint tensor as it is.
    Whole(String),
    /// Rows `from..from + rows` of a checkpoint tensor (a third of the fused qkv).
    Rows { name: String, from: usize, rows: usize },
    /// Temporal slice `t` of the Conv3d patch weight `[out, channels, T, p, p]`.
    PatchSlice(usize),
}

fn plan(v: &VisionConfig) -> Result<Vec<Planned>> {
    let (d, mlp, merged) = (v.embed_dim, v.mlp_width(), v.merged_width());
    // The tensors kept whole, by HF name (the file's order is ours; llama.cpp reads by name).
    let mut whole: Vec<(String, Vec<usize>)> = Vec::new();
    for b in 0..v.depth {
        let h = format!("visual.blocks.{b}");
        for (m, o, i) in [("attn.proj", d, d), ("mlp.fc1", mlp, d), ("mlp.fc2", d, mlp)] {
            whole.push((format!("{h}.{m}.weight"), vec![o, i]));
            whole.push((format!("{h}.{m}.bias"), vec![o]));
        }
        for m in ["norm1", "norm2"] {
            whole.push((format!("{h}.{m}.weight"), vec![d]));
            whole.push((format!("{h}.{m}.bias"), vec![d]));
        }
    }
    whole.push(("visual.merger.ln_q.weight".into(), vec![d]));
    whole.push(("visual.merger.ln_q.bias".into(), vec![d]));
    for (m, o, i) in [("merger.mlp.0", merged, merged), ("merger.mlp.2", v.out_hidden_size, merged)] {
        whole.push((format!("visual.{m}.weight"), vec![o, i]));
        whole.push((format!("visual.{m}.bias"), vec![o]));
    }
    let mut out = Vec::new();
    for (hf, dims) in whole {
        let name = mmproj_name(&hf).ok_or_else(|| Error::Invalid(format!("no projector name for `{hf}`")))?;
        out.push(Planned { name, dims, source: Source::Whole(hf) });
    }
    for b in 0..v.depth {
        for (k, part) in ["attn_q", "attn_k", "attn_v"].into_iter().enumerate() {
            let name = format!("visual.blocks.{b}.attn.qkv");
            out.push(Planned {
                name: format!("v.blk.{b}.{part}.weight"),
                dims: vec![d, d],
                source: Source::Rows { name: format!("{name}.weight"), from: k * d, rows: d },
            });
            out.push(Planned {
                name: format!("v.blk.{b}.{part}.bias"),
                dims: vec![d],
                source: Source::Rows { name: format!("{name}.bias"), from: k * d, rows: d },
            });
        }
    }
    let p = v.patch_size;
    for t in 0..v.temporal_patch_size {
        let name = if t == 0 { "v.patch_embd.weight".to_string() } else { format!("v.patch_embd.weight.{t}") };
        out.push(Planned { name, dims: vec![d, v.in_channels, p, p], source: Source::PatchSlice(t) });
    }
    Ok(out)
}

fn values(ws: &dyn WeightStore, v: &VisionConfig, src: &Source, dims: &[usize]) -> Result<Vec<f32>> {
    Ok(match src {
        Source::Whole(name) => ws.dense_f32(name, dims)?,
        Source::Rows { name, from, rows } => {
            let cols: usize = dims[1..].iter().product();
            let total = 3 * rows;
            let shape: Vec<usize> = std::iter::once(total).chain(dims[1..].iter().copied()).collect();
            let all = ws.dense_f32(name, &shape)?;
            all[from * cols..(from + rows) * cols].to_vec()
        }
        Source::PatchSlice(t) => {
            let (d, c, tt, p) = (v.embed_dim, v.in_channels, v.temporal_patch_size, v.patch_size);
            let all = ws.dense_f32("visual.patch_embed.proj.weight", &[d, c, tt, p, p])?;
            let mut out = Vec::with_capacity(d * c * p * p);
            for o in 0..d {
                for ch in 0..c {
                    let at = ((o * c + ch) * tt + t) * p * p;
                    out.extend_from_slice(&all[at..at + p * p]);
                }
            }
            out
        }
    })
}

/// Writes the projector of the Qwen2-VL checkpoint in `dir` (weights in `ws`) to `out`,
/// its matrices at `ty` ([`projector_type`]); returns (tensors, bytes, sha256).
pub fn write_mmproj(dir: &Path, ws: &dyn WeightStore, out: &Path, ty: GgmlDType, name: &str) -> Result<(usize, u64, String)> {
    let cfg_path = dir.join("config.json");
    let text = crate::files::read_text(&cfg_path, crate::files::SETTINGS_LIMIT)?;
    let v = VisionConfig::from_hf_json(&text, &cfg_path)?;
    let processor = crate::vision::read_processor(dir, &v)?;
    if v.temporal_patch_size != 2 {
        return Err(Error::format(
            &cfg_path,
            format!("vision_config.temporal_patch_size is {}; llama.cpp's qwen2vl projector takes 2", v.temporal_patch_size),
        ));
    }
    let file_type = if ty == GgmlDType::F32 { 0 } else { 1 };
    let meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str("clip".into())),
        ("general.type".into(), Meta::Str("mmproj".into())),
        ("general.name".into(), Meta::Str(name.into())),
        ("general.alignment".into(), Meta::U32(crate::formats::gguf_write::ALIGNMENT as u32)),
        ("general.file_type".into(), Meta::U32(file_type)),
        ("clip.has_vision_encoder".into(), Meta::Bool(true)),
        ("clip.vision.projection_dim".into(), Meta::U32(v.out_hidden_size as u32)),
        // The converter's default when the vision config names no image size (Qwen2-VL's
        // does not); mtmd resizes by its own bounds for this projector.
        ("clip.vision.image_size".into(), Meta::U32(560)),
        ("clip.vision.patch_size".into(), Meta::U32(v.patch_size as u32)),
        ("clip.vision.embedding_length".into(), Meta::U32(v.embed_dim as u32)),
        // The converter writes vision_config.hidden_size (the merger's output width) here
        // for Qwen2-VL; mtmd reads the MLP's width from the tensors.
        ("clip.vision.feed_forward_length".into(), Meta::U32(v.out_hidden_size as u32)),
        ("clip.vision.block_count".into(), Meta::U32(v.depth as u32)),
        ("clip.vision.attention.head_count".into(), Meta::U32(v.num_heads as u32)),
        ("clip.vision.image_mean".into(), Meta::F32Array(processor.image_mean.to_vec())),
        ("clip.vision.image_std".into(), Meta::F32Array(processor.image_std.to_vec())),
        ("clip.projector_type".into(), Meta::Str("qwen2vl_merger".into())),
        // transformers' LayerNorm eps in every vision norm (the converter writes the text
        // config's rms_norm_eps, 1e-6 in every Qwen2-VL).
        ("clip.vision.attention.layer_norm_epsilon".into(), Meta::F32(1e-6)),
        ("general.quantization_version".into(), Meta::U32(2)),
    ];
    let plan = plan(&v)?;
    let planned: Vec<PlannedTensor> = plan
        .iter()
        .map(|p| PlannedTensor {
            name: p.name.clone(),
            dims: p.dims.clone(),
            dtype: if p.dims.len() < 2 { GgmlDType::F32 } else { ty },
        })
        .collect();
    let mut bytes = 0u64;
    let sha = write(
        out,
        &meta,
        &planned,
        |i| {
            let data = values(ws, &v, &plan[i].source, &plan[i].dims)?;
            encode(&data, &planned[i].dims, planned[i].dtype)
        },
        |_, b| bytes += b,
    )?;
    Ok((planned.len(), bytes, sha))
}
