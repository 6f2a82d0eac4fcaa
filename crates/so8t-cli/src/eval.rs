use anyhow::{Context, Result};
use so8t::eval::{evaluate, report};
use so8t::train::TRAIN_DIR;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    device: crate::DeviceArg,
    /// SO8T directory, baked directory or SO8T GGUF.
    #[arg(short, long)]
    model: PathBuf,
    /// Labelled JSONL.
    #[arg(long)]
    data: PathBuf,
    /// Print the whole result as JSON.
    #[arg(long)]
    json: bool,
    /// Write report.md, report.json and PNG plots into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// A gates training log to plot (default: MODEL/so8t_train/log.jsonl when present).
    #[arg(long)]
    train_log: Option<PathBuf>,
    /// Write each row's verdicts and decision here, one JSON object per line (`line`,
    /// `p_unsafe`, `p_escalate`, `answer_unsafe`, `answer_escalate`, `decision`): to
    /// compare two models row by row, e.g. an export against its directory.
    #[arg(long)]
    rows: Option<PathBuf>,
    /// Text put under the report's heading (e.g. how the model was trained).
    #[arg(long, default_value = "")]
    notes: String,
    #[arg(long)]
    skip_bad: bool,
}

pub fn main(a: Args) -> Result<()> {
    let mut model = a.device.open_model(&a.model)?;
    let labels = model
        .so8t
        .as_ref()
        .map(|s| s.config.labels.clone())
        .unwrap_or_default();
    let data = crate::train::read(&a.data, &labels, a.skip_bad)?;
    let bar = crate::train::bar(data.examples.len(), "rows");
    let r = evaluate(&mut model, &data, |i| bar.set_position(i as u64))?;
    bar.finish_and_clear();
    if let Some(dir) = &a.report {
        let log_path = a
            .train_log
            .clone()
            .or_else(|| Some(a.model.join(TRAIN_DIR).join("log.jsonl")).filter(|p| p.exists()));
        let log = log_path.as_deref().map(report::read_log).transpose()?;
        report::write(&r, log.as_deref(), &a.notes, dir)
            .with_context(|| format!("writing the report to {}", dir.display()))?;
        eprintln!("wrote {}", dir.join("report.md").display());
    }
    if let Some(path) = &a.rows {
        let mut lines = String::new();
        for row in &r.row_verdicts {
            lines.push_str(&serde_json::to_string(row)?);
            lines.push('\n');
        }
        so8t::staging::write_bytes(path, lines.as_bytes())
            .with_context(|| format!("writing the rows to {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} on {} ({} rows, {:.1} s)",
        r.model, r.data, r.rows, r.seconds
    );
    println!(
        "{:<10} {:>6} {:>9} {:>8} {:>9} {:>7} {:>6} {:>7} {:>7}",
        "head", "rows", "threshold", "accuracy", "precision", "recall", "F1", "FPR", "AUROC"
    );
    for h in &r.heads {
        let m = &h.metrics;
        println!(
            "{:<10} {:>6} {:>9.4} {:>8.3} {:>9.3} {:>7.3} {:>6.3} {:>7.3} {:>7.4}",
            h.head, m.n, m.threshold, m.accuracy, m.precision, m.recall, m.f1, m.fpr, m.auroc
        );
        println!(
            "           confusion: TP {} FP {} TN {} FN {}",
            m.tp, m.fp, m.tn, m.fn_
        );
    }
    println!(
        "heads read layers {} (safety) and {} (authority); prompts read at {}",
        r.head_layers[0], r.head_layers[1], r.verdict_position
    );
    for x in &r.responses {
        let m = &x.metrics;
        println!(
            "{:<10} answers {:>5} (class 1 {}), streaming rule k={}: precision {:.3} recall {:.3} F1 {:.3} FPR {:.3} AUROC {:.4}, benign answers to class-0 requests flagged {:.3} of {}, delay median {}",
            x.head, m.n, m.positives, x.consecutive, m.precision, m.recall, m.f1, m.fpr, m.auroc, x.benign_flagged, x.benign_answers,
            x.delay_median.map_or("-".into(), |d| format!("{d:.0} tokens"))
        );
    }
    println!(
        "decisions: {}",
        r.decisions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if !r.heads_trained {
        println!("note: the heads are untrained (p = 0.5 everywhere); run `so8t train` first");
    }
    Ok(())
}
