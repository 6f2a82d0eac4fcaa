use anyhow::{bail, Result};
use so8t::artifact::validate::validate;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// An SO8T directory (or any model path: then only its loading is checked).
    path: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let checks = validate(&a.path);
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "path": a.path, "ok": checks.iter().all(|c| c.ok), "checks": checks,
            }))?
        );
    } else {
        for c in &checks {
            println!(
                "{} {:<15} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    // The error line carries each failure's detail: it is often the only line a script
    // or a log keeps, and the detail names the file and the field.
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| format!("{} ({})", c.name, c.detail))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{}: failed check(s): {}",
            a.path.display(),
            failed.join("; ")
        );
    }
    Ok(())
}
