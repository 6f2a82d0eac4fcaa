use anyhow::Result;
use so8t::Model;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory or .gguf file.
    path: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let model = Model::open(&a.path)?;
    let c = &model.config;
    let tok = model.tokenizer.as_ref();
    let v = serde_json::json!({
        "path": model.path,
        "format": model.kind,
        "architecture": c.arch,
        "config": c,
        "tensors": model.weights.tensor_names().len(),
        "tensor_types": model.weights.dtype_counts().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
        "tokenizer": tok.map(|t| serde_json::json!({
            "vocab_size": t.vocab_size(),
            "bos": t.bos,
            "end_of_generation": t.eog,
            "chat_template": t.chat_template.is_some(),
        })),
        "vision": model.vision.as_ref().map(|v| {
            let (t, p) = (v.tower.config(), &v.processor);
            serde_json::json!({
                "depth": t.depth, "embed_dim": t.embed_dim, "heads": t.num_heads, "patch_size": t.patch_size,
                "merge_size": t.spatial_merge_size, "out_hidden_size": t.out_hidden_size,
                "image_token_id": t.image_token_id, "min_pixels": p.min_pixels, "max_pixels": p.max_pixels,
            })
        }),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("path:          {}", model.path.display());
    println!("format:        {:?}", model.kind);
    println!("architecture:  {}", c.arch.name());
    println!("layers:        {}", c.num_layers);
    println!(
        "hidden:        {} (intermediate {})",
        c.hidden_size, c.intermediate_size
    );
    println!(
        "heads:         {} query, {} key/value, head_dim {}",
        c.num_heads, c.num_kv_heads, c.head_dim
    );
    println!("vocab:         {}", c.vocab_size);
    match c.sliding_window {
        Some(w) if w < c.max_position_embeddings => {
            println!("context:       {} (attention window {w}: runs up to {w})", c.max_position_embeddings)
        }
        _ => println!("context:       {}", c.max_position_embeddings),
    }
    let scaling = match &c.rope_scaling {
        so8t::config::RopeScaling::None => "none".to_string(),
        so8t::config::RopeScaling::Llama3 { .. } => "llama3".into(),
        so8t::config::RopeScaling::Divisors(_) => "per-frequency factors".into(),
        so8t::config::RopeScaling::LongRope { attention_factor, .. } => format!(
            "longrope (long factors past {} tokens, attention factor {attention_factor})",
            c.original_context.unwrap_or_default()
        ),
    };
    println!(
        "rope:          theta {} over {} of {} dims per head, scaling {scaling}{}",
        c.rope_theta,
        c.rotary_dim,
        c.head_dim,
        c.mrope_section.map(|s| format!(", multimodal sections {s:?} (temporal, height, width)")).unwrap_or_default()
    );
    println!(
        "flags:         qkv_bias={} qk_norm={} tied_embeddings={}",
        c.qkv_bias, c.qk_norm, c.tie_word_embeddings
    );
    let types: Vec<String> = model
        .weights
        .dtype_counts()
        .iter()
        .map(|(t, n)| format!("{t}×{n}"))
        .collect();
    println!(
        "tensors:       {} ({})",
        model.weights.tensor_names().len(),
        types.join(", ")
    );
    match tok {
        Some(t) => println!(
            "tokenizer:     {} tokens, chat template {}",
            t.vocab_size(),
            if t.chat_template.is_some() {
                "present"
            } else {
                "absent"
            }
        ),
        None => println!("tokenizer:     absent"),
    }
    if let Some(v) = &model.vision {
        let (t, p) = (v.tower.config(), &v.processor);
        println!(
            "vision:        {} blocks of width {} ({} heads), patch {}, {}×{} merged into {}; images resized to {}..{} pixels",
            t.depth, t.embed_dim, t.num_heads, t.patch_size, t.spatial_merge_size, t.spatial_merge_size, t.out_hidden_size, p.min_pixels, p.max_pixels
        );
    }
    Ok(())
}
