use anyhow::Result;
use so8t_serve::audit::{query, to_csv, to_table, Query};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The audit database `so8t serve --audit` writes.
    #[arg(long, default_value = "so8t-audit.sqlite")]
    db: PathBuf,
    /// Only requests from this time on: RFC 3339 (2026-11-22T10:00:00Z), a date, or a
    /// duration back from now (2h, 30min).
    #[arg(long)]
    since: Option<String>,
    /// Only this decision: allow, refuse, escalate, or none (heads untrained).
    #[arg(long)]
    decision: Option<String>,
    /// At most this many rows (oldest first).
    #[arg(long)]
    limit: Option<usize>,
    /// One JSON object per line.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV with a header row.
    #[arg(long)]
    csv: bool,
}

pub fn main(a: Args) -> Result<()> {
    let rows = query(
        &a.db,
        &Query {
            since: a.since,
            decision: a.decision,
            limit: a.limit,
        },
    )?;
    if a.json {
        for r in &rows {
            println!("{}", serde_json::to_string(r)?);
        }
    } else if a.csv {
        print!("{}", to_csv(&rows));
    } else {
        print!("{}", to_table(&rows));
    }
    Ok(())
}
