use anyhow::{Context, Result};
use so8t::load::GenerationDefaults;
use so8t::artifact::modelfile::{modelfile, ModelfileOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The GGUF the Modelfile is for.
    gguf: PathBuf,
    /// Write here instead of standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// SYSTEM prompt (default: the one the chat template adds, if any).
    #[arg(long)]
    system: Option<String>,
    /// generation_config.json for PARAMETER defaults (default: one beside the GGUF, if any).
    #[arg(long)]
    generation_config: Option<PathBuf>,
}

pub fn main(a: Args) -> Result<()> {
    let gc = a.generation_config.clone().or_else(|| {
        let p = a.gguf.with_file_name("generation_config.json");
        p.exists().then_some(p)
    });
    let generation: GenerationDefaults = match &gc {
        Some(p) => serde_json::from_str(
            &so8t::files::read_text(p, so8t::files::SETTINGS_LIMIT)?,
        )
        .with_context(|| p.display().to_string())?,
        None => GenerationDefaults::default(),
    };
    let from = match &a.out {
        // FROM is resolved relative to the Modelfile
        Some(out) => pathdiff(&a.gguf, out.parent().unwrap_or(std::path::Path::new("."))),
        None => a.gguf.display().to_string(),
    };
    let text = modelfile(
        &a.gguf,
        &ModelfileOptions {
            from: &from,
            system: a.system.as_deref(),
            generation,
        },
    )?;
    match &a.out {
        Some(p) => so8t::staging::write_bytes(p, text.as_bytes())?,
        None => print!("{text}"),
    }
    Ok(())
}

fn pathdiff(target: &std::path::Path, base: &std::path::Path) -> String {
    let t = std::fs::canonicalize(target).unwrap_or_else(|_| target.to_path_buf());
    let b = std::fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    match t.strip_prefix(&b) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => t.display().to_string(),
    }
}
