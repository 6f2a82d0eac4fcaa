use anyhow::Result;
use so8t::artifact::export::{export, parse_quant};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// HF directory, baked directory, SO8T directory or GGUF file.
    path: PathBuf,
    /// The .gguf file to write (`--format vllm`: the directory).
    #[arg(long)]
    out: PathBuf,
    /// gguf: one file for llama.cpp and Ollama. vllm: a directory with the baked model,
    /// the heads' classifier view(s) for vLLM's pooling runner, and so8t_heads.json.
    /// peft-oft: a PEFT OFT adapter directory of the o, v and mlp gates (q and k gates
    /// baked into its base/).
    #[arg(long, default_value = "gguf", value_parser = ["gguf", "vllm", "peft-oft"])]
    format: String,
    /// Weight type: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k, or a
    /// llama.cpp mix: q4_k_m q5_k_m q4_k_s (gguf only; default f16).
    #[arg(long)]
    quant: Option<String>,
    /// Replace --out if it exists.
    #[arg(long)]
    force: bool,
    /// Labelled JSONL rows (the validation split, never the test split) on which to move
    /// the SO8T thresholds so that the export decides as the source does: the export is
    /// scored beside the source, each threshold moved by the median logit change of the
    /// scores near it, and the file written again with them (gguf only).
    #[arg(long, value_name = "ROWS")]
    calibrate: Option<PathBuf>,
}

pub fn main(a: Args) -> Result<()> {
    if a.calibrate.is_some() && a.format != "gguf" {
        anyhow::bail!("--calibrate applies to GGUF exports");
    }
    if a.format == "peft-oft" {
        if a.quant.is_some() {
            anyhow::bail!("--quant applies to GGUF exports; a PEFT adapter is f32");
        }
        let e = so8t::artifact::peft::export_peft_oft(&a.path, &a.out, a.force)?;
        println!("{}", a.out.display());
        eprintln!(
            "PEFT OFT adapter on {} (block size 8, exact Cayley), applying to {}{}; the heads are not part of it (so8t_adapter.safetensors keeps them)",
            e.targets.join(", "),
            e.base.display(),
            if e.base.starts_with(std::path::absolute(&a.out)?) { " (the q/k gates baked in: PEFT has no form for them)" } else { "" }
        );
        return Ok(());
    }
    if a.format == "vllm" {
        if a.quant.is_some() {
            anyhow::bail!("--quant applies to GGUF exports; a vLLM export keeps the baked model's dtype");
        }
        let views = so8t::artifact::vllm::export_vllm(&a.path, &a.out, a.force)?;
        println!("{}", a.out.display());
        eprintln!(
            "model/ (baked, for generation), {} (heads as vLLM pooling models), so8t_heads.json (biases, thresholds, how to apply them)",
            views.join(", ")
        );
        return Ok(());
    }
    let quant_name = a.quant.as_deref().unwrap_or("f16");
    let quant = parse_quant(quant_name)?;
    if a.out.exists() && !a.force {
        anyhow::bail!(
            "{}: already exists (use --force to replace it)",
            a.out.display()
        );
    }
    // A vision model writes its projector beside the file, which --force governs too.
    let mmproj = so8t::artifact::mmproj::mmproj_path(&a.out);
    if mmproj.exists() && !a.force && so8t::artifact::mmproj::writes_projector(&a.path)? {
        anyhow::bail!("{}: already exists (use --force to replace it)", mmproj.display());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors, {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let progress = |done: usize, total: usize, bytes: u64| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64));
    };
    let (report, calibration) = match &a.calibrate {
        None => (export(&a.path, &a.out, quant, progress)?, None),
        Some(rows) => {
            let (report, c) = so8t::eval::calibrate::export_calibrated(&a.path, &a.out, quant, rows, progress)?;
            (report, Some((rows, c)))
        }
    };
    bar.finish_and_clear();
    if let Some((rows, c)) = calibration {
        eprintln!("thresholds calibrated on {} rows of {}:", c.rows, rows.display());
        for s in &c.shifts {
            eprintln!(
                "  {:<16} {:.4} -> {:.4} (flags differing from the source's: {} -> {} of {})",
                s.score, s.source, s.export, s.differ_before, s.differ_after, s.rows
            );
        }
    }
    println!("{}  {}", report.sha256, a.out.display());
    eprintln!(
        "{} tensors, {:.1} MiB of tensor data ({})",
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        quant_name
    );
    if let Some((path, tensors, bytes)) = &report.mmproj {
        eprintln!(
            "vision projector: {} ({tensors} tensors, {:.1} MiB; pass it to llama.cpp with --mmproj)",
            path.display(),
            *bytes as f64 / (1 << 20) as f64
        );
    }
    Ok(())
}
