//! `eval --report DIR`: `report.md`, `report.json` and PNG plots (ROC curves per head,
//! score histograms per class, and for a training run its loss curves with the PET term).
//! The font is compiled in, so plots render the same on a machine without fonts.

use super::metrics::roc_curve;
use super::EvalReport;
use crate::error::{Error, Result};
use crate::train::gates::StepLog;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");
const W: u32 = 900;
const H: u32 = 600;

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::format(path, format!("plot failed: {e}"))
}

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Renders to a temporary name and renames, so a failed plot leaves nothing behind.
fn render(
    path: &Path,
    draw: impl FnOnce(
        &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    ) -> std::result::Result<(), Box<dyn std::error::Error>>,
) -> Result<()> {
    ensure_font();
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (W, H)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw(&root).map_err(|e| plot_error(path, e))?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn roc_plot(report: &EvalReport, path: &Path) -> Result<()> {
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("ROC per head (test data)", ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)?;
        chart
            .configure_mesh()
            .x_desc("false positive rate")
            .y_desc("true positive rate")
            .label_style(("sans-serif", 16))
            .draw()?;
        chart.draw_series(LineSeries::new([(0.0, 0.0), (1.0, 1.0)], BLACK.mix(0.3)))?;
        for (i, h) in report.heads.iter().enumerate() {
            let (s, y): (Vec<f32>, Vec<bool>) = h.scores.iter().cloned().unzip();
            if !crate::eval::metrics::both_classes(&y) {
                continue;
            }
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(roc_curve(&s, &y), color.stroke_width(3)))?
                .label(format!("{} (AUROC {:.3})", h.head, h.metrics.auroc))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            let m = &h.metrics;
            chart.draw_series(std::iter::once(Circle::new(
                (m.fpr, m.recall),
                7,
                color.filled(),
            )))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 18))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
        Ok(())
    })
}

fn histogram_plot(h: &super::HeadEval, path: &Path) -> Result<()> {
    const BINS: usize = 40;
    let mut counts = [[0usize; BINS]; 2];
    for &(s, y) in &h.scores {
        let b = ((s.clamp(0.0, 1.0) * BINS as f32) as usize).min(BINS - 1);
        counts[y as usize][b] += 1;
    }
    let totals = [
        counts[0].iter().sum::<usize>().max(1),
        counts[1].iter().sum::<usize>().max(1),
    ];
    let share = |c: usize, b: usize| counts[c][b] as f64 / totals[c] as f64;
    let top = (0..BINS)
        .flat_map(|b| [share(0, b), share(1, b)])
        .fold(0.0, f64::max)
        .max(0.01)
        * 1.1;
    let threshold = h.metrics.threshold as f64;
    let title = format!("{} head: p({}) per class (test data)", h.head, h.labels[1]);
    let labels = h.labels.clone();
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(title, ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..top)?;
        chart
            .configure_mesh()
            .x_desc(format!("p({})", labels[1]))
            .y_desc("share of the class's rows")
            .label_style(("sans-serif", 16))
            .draw()?;
        for c in 0..2 {
            let color = if c == 0 {
                BLUE.mix(0.45)
            } else {
                RED.mix(0.45)
            };
            chart
                .draw_series((0..BINS).map(|b| {
                    let x0 = b as f64 / BINS as f64;
                    Rectangle::new(
                        [(x0, 0.0), (x0 + 1.0 / BINS as f64, share(c, b))],
                        color.filled(),
                    )
                }))?
                .label(format!("{} ({} rows)", labels[c], totals[c]))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled())
                });
        }
        chart
            .draw_series(LineSeries::new(
                [(threshold, 0.0), (threshold, top)],
                BLACK.stroke_width(2),
            ))?
            .label(format!("threshold {threshold:.3}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.stroke_width(2)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperMiddle)
            .label_font(("sans-serif", 18))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
        Ok(())
    })
}

/// Loss terms per step of a training log; the total, the LM and head terms, and the
/// PET term (λ·L_PET) with the raw L_PET on the right axis, where it is readable.
pub fn loss_plot(log: &[StepLog], path: &Path) -> Result<()> {
    if log.is_empty() {
        return Err(Error::Invalid("the training log is empty".into()));
    }
    let last = log.len() as f64;
    let series: [(&str, fn(&StepLog) -> f64, RGBColor); 5] = [
        ("total loss", |s| s.loss, BLACK),
        ("L_LM", |s| s.lm, BLUE),
        ("CE safety", |s| s.safety, RED),
        ("CE authority", |s| s.authority, GREEN),
        ("λ·L_PET", |s| s.pet_term, MAGENTA),
    ];
    let top = log
        .iter()
        .flat_map(|s| series.iter().map(move |(_, f, _)| f(s)))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(1e-6)
        * 1.05;
    let pet_top = log.iter().map(|s| s.pet).fold(0.0, f64::max).max(1e-9) * 1.05;
    render(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption("gates training: loss terms per step", ("sans-serif", 26))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(60)
            .right_y_label_area_size(70)
            .build_cartesian_2d(1f64..last.max(2.0), 0f64..top)?
            .set_secondary_coord(1f64..last.max(2.0), 0f64..pet_top);
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 16))
            .draw()?;
        chart
            .configure_secondary_axes()
            .y_desc("L_PET (dashed)")
            .label_style(("sans-serif", 16))
            .draw()?;
        for (name, f, color) in series {
            chart
                .draw_series(LineSeries::new(
                    log.iter().map(|s| (s.step as f64, f(s))),
                    color.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .draw_secondary_series(DashedLineSeries::new(
                log.iter().map(|s| (s.step as f64, s.pet)),
                6,
                4,
                MAGENTA.stroke_width(2),
            ))?
            .label("L_PET (right axis)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA.stroke_width(1)));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 16))
            .border_style(BLACK)
            .background_style(WHITE.mix(0.9))
            .draw()?;
        Ok(())
    })
}

pub fn read_log(path: &Path) -> Result<Vec<StepLog>> {
    let text = crate::files::read_text(path, crate::files::DATA_LIMIT)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::format(path, format!("line {}: {e}", i + 1)))
        })
        .collect()
}

fn pct(v: f64) -> String {
    format!("{:.1}%", 100.0 * v)
}

fn one_line(s: &str) -> String {
    let s: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|");
    if s.chars().count() > 110 {
        format!("{}…", s.chars().take(110).collect::<String>())
    } else {
        s
    }
}

pub fn markdown(report: &EvalReport, train_log: Option<&[StepLog]>, notes: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "# SO8T evaluation\n");
    let _ = writeln!(
        md,
        "- model: `{}`{}",
        report.model,
        if report.baked { " (baked)" } else { "" }
    );
    let _ = writeln!(md, "- data: `{}` ({} rows)", report.data, report.rows);
    let _ = writeln!(
        md,
        "- heads trained: {}; time: {:.1} s\n",
        report.heads_trained, report.seconds
    );
    if !notes.is_empty() {
        let _ = writeln!(md, "{notes}\n");
    }
    let _ = writeln!(md, "| head | rows (class 1) | threshold | accuracy | precision | recall | F1 | FPR | AUROC | TP | FP | TN | FN |");
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for h in &report.heads {
        let m = &h.metrics;
        let _ = writeln!(
            md,
            "| {} (`{}` = 1) | {} ({}) | {:.4} | {} | {} | {} | {:.3} | {} | {:.4} | {} | {} | {} | {} |",
            h.head, h.labels[1], m.n, m.positives, m.threshold, pct(m.accuracy), pct(m.precision), pct(m.recall), m.f1, pct(m.fpr), m.auroc, m.tp, m.fp, m.tn, m.fn_
        );
    }
    let _ = writeln!(
        md,
        "\nHeads read layers {} (safety) and {} (authority); prompts are read at `{}`.\n",
        report.head_layers[0], report.head_layers[1], report.verdict_position
    );
    if !report.responses.is_empty() {
        let _ = writeln!(md, "Responses, streaming rule (flagged when `k` consecutive tokens reach the threshold):\n");
        let _ = writeln!(md, "| head | k | threshold | answers (class 1) | precision | recall | F1 | FPR | AUROC | benign answers to class-0 requests flagged | delay (tokens, median / mean) |");
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &report.responses {
            let m = &r.metrics;
            let _ = writeln!(
                md,
                "| {} | {} | {:.4} | {} ({}) | {} | {} | {:.3} | {} | {:.4} | {} of {} | {} / {} |",
                r.head, r.consecutive, m.threshold, m.n, m.positives, pct(m.precision), pct(m.recall), m.f1, pct(m.fpr), m.auroc,
                pct(r.benign_flagged), r.benign_answers,
                r.delay_median.map_or("-".into(), |d| format!("{d:.0}")),
                r.delay_mean.map_or("-".into(), |d| format!("{d:.1}")),
            );
        }
        for r in &report.responses {
            let _ = writeln!(md, "\n{} head on answers, by family:\n\n| family | answers | class-1 answers | flagged | accuracy |\n|---|---|---|---|---|", r.head);
            for s in &r.by_source {
                let _ = writeln!(md, "| {} | {} | {} | {} | {} |", s.source, s.rows, s.positives, pct(s.flagged), pct(s.accuracy));
            }
            if !r.worst_false_positives.is_empty() {
                let _ = writeln!(md, "\nBenign answers flagged, highest scores first (their prompts):\n\n| line | score | family | prompt |\n|---|---|---|---|");
                for e in &r.worst_false_positives {
                    let _ = writeln!(md, "| {} | {:.3} | {} | {} |", e.line, e.p, e.source.as_deref().unwrap_or("-"), one_line(&e.prompt));
                }
            }
        }
        let _ = writeln!(md);
    }
    let _ = writeln!(
        md,
        "\nPolicy decisions on the rows (prompt and answer): {}\n",
        report
            .decisions
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(md, "![ROC](roc.png)\n");
    for h in &report.heads {
        let _ = writeln!(md, "## {} head\n", h.head);
        let _ = writeln!(md, "![scores](scores-{}.png)\n", h.head);
        let _ = writeln!(
            md,
            "| family | prompts | `{}` prompts | flagged `{}` | accuracy |",
            h.labels[1], h.labels[1]
        );
        let _ = writeln!(md, "|---|---|---|---|---|");
        for s in &h.by_source {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                s.source,
                s.rows,
                s.positives,
                pct(s.flagged),
                pct(s.accuracy)
            );
        }
        for (title, list) in [
            (
                "missed `".to_string() + &h.labels[1] + "` rows, lowest scores first",
                &h.worst_false_negatives,
            ),
            (
                "wrongly flagged `".to_string() + &h.labels[0] + "` rows, highest scores first",
                &h.worst_false_positives,
            ),
        ] {
            let _ = writeln!(md, "\nWorst errors: {title}\n");
            if list.is_empty() {
                let _ = writeln!(md, "(none)");
                continue;
            }
            let _ = writeln!(md, "| line | p | source / category | prompt |");
            let _ = writeln!(md, "|---|---|---|---|");
            for e in list {
                let _ = writeln!(
                    md,
                    "| {} | {:.3} | {} / {} | {} |",
                    e.line,
                    e.p,
                    e.source.as_deref().unwrap_or("-"),
                    e.category.as_deref().unwrap_or("-"),
                    one_line(&e.prompt)
                );
            }
        }
        let _ = writeln!(md);
    }
    if let Some(log) = train_log {
        let first = &log[0];
        let last = &log[log.len() - 1];
        let _ = writeln!(md, "## Training run\n\n![loss](loss.png)\n");
        let _ = writeln!(
            md,
            "| | step {} | step {} |\n|---|---|---|",
            first.step, last.step
        );
        for (name, a, b) in [
            ("total loss", first.loss, last.loss),
            ("L_LM", first.lm, last.lm),
            ("CE safety", first.safety, last.safety),
            ("CE authority", first.authority, last.authority),
            ("L_PET", first.pet, last.pet),
            ("λ(t)", first.lambda, last.lambda),
        ] {
            let _ = writeln!(md, "| {name} | {a:.4} | {b:.4} |");
        }
        let secs: f64 = log.iter().map(|s| s.seconds).sum();
        let _ = writeln!(md, "\n{} steps in {:.0} s.", log.len(), secs);
    }
    md
}

/// Writes `report.md`, `report.json` and the plots into `dir` all at once: they are
/// made in a staging directory that replaces `dir` in one step, so a stopped or failed
/// run leaves the previous report whole, never one file of each. The other entries of an
/// existing `dir` (files, directories, symlinks) and its permissions are carried over;
/// an entry that cannot be (a FIFO, a socket, a device) stops the run before anything
/// is replaced.
pub fn write(
    report: &EvalReport,
    train_log: Option<&[StepLog]>,
    notes: &str,
    dir: &Path,
) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::format(dir, "exists and is not a directory; expected a report directory"));
    }
    // `.` or `..` has no name to stage beside: use the directory's real path.
    let dir = &if dir.exists() {
        dir.canonicalize().map_err(|e| Error::io(dir, e))?
    } else {
        dir.to_path_buf()
    };
    let stage = crate::staging::StagingDir::new(dir, true)?;
    let out = stage.path();
    roc_plot(report, &out.join("roc.png"))?;
    for h in &report.heads {
        histogram_plot(h, &out.join(format!("scores-{}.png", h.head)))?;
    }
    if let Some(log) = train_log {
        loss_plot(log, &out.join("loss.png"))?;
    }
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report).unwrap(),
    )
    .map_err(|e| Error::io(&dir.join("report.json"), e))?;
    std::fs::write(out.join("report.md"), markdown(report, train_log, notes))
        .map_err(|e| Error::io(&dir.join("report.md"), e))?;
    if dir.is_dir() {
        let made: Vec<std::ffi::OsString> = std::fs::read_dir(out)
            .map_err(|e| Error::io(out, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        crate::staging::carry_over(dir, out, &made)?;
        let perms = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?.permissions();
        std::fs::set_permissions(out, perms).map_err(|e| Error::io(dir, e))?;
    }
    stage.commit()
}
