//! The audit log: one SQLite row per answered request and its decision. WAL journal, and
//! each row is committed before the client gets the end of its answer, so a crash of the
//! server (kill -9) loses no answered request and leaves a consistent database.

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    request_id TEXT NOT NULL UNIQUE,
    endpoint TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    prompt_sha256 TEXT NOT NULL,
    prompt_text TEXT,
    prompt_p_unsafe REAL,
    prompt_p_escalate REAL,
    response_p_unsafe REAL,
    response_p_escalate REAL,
    decision TEXT,
    moderation TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    duration_ms REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
";

/// One request as the log keeps it. `time` is RFC 3339 UTC with milliseconds, so text
/// order is time order.
#[derive(Clone, Debug, Serialize)]
pub struct Record {
    pub time: String,
    pub request_id: String,
    pub endpoint: String,
    pub model_sha256: String,
    pub prompt_sha256: String,
    pub prompt_text: Option<String>,
    pub prompt_p_unsafe: Option<f32>,
    pub prompt_p_escalate: Option<f32>,
    pub response_p_unsafe: Option<f32>,
    pub response_p_escalate: Option<f32>,
    pub decision: Option<String>,
    pub moderation: String,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub duration_ms: f64,
}

pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub struct Audit {
    path: PathBuf,
    conn: Mutex<Connection>,
}

fn open(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)
        .with_context(|| format!("{}: cannot open the audit database", path.display()))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .with_context(|| format!("{}: not an SQLite database, or unreadable", path.display()))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "{}: could not switch the audit database to WAL (journal_mode is {mode})",
            path.display()
        );
    }
    // NORMAL in WAL mode: a committed row survives a crash of this process; only a crash
    // of the operating system may lose the last transactions, never corrupt the file.
    conn.execute_batch("PRAGMA synchronous=NORMAL;")?;
    Ok(conn)
}

impl Audit {
    pub fn open(path: &Path) -> Result<Audit> {
        let conn = open(path)?;
        conn.execute_batch(SCHEMA)
            .with_context(|| format!("{}: cannot create the requests table", path.display()))?;
        Ok(Audit {
            path: path.to_path_buf(),
            conn: Mutex::new(conn),
        })
    }

    pub fn insert(&self, r: &Record) -> Result<()> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| anyhow::anyhow!("audit database lock poisoned"))?;
        conn.execute(
            "INSERT INTO requests (time, request_id, endpoint, model_sha256, prompt_sha256, prompt_text,
                prompt_p_unsafe, prompt_p_escalate, response_p_unsafe, response_p_escalate, decision,
                moderation, finish_reason, prompt_tokens, completion_tokens, duration_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            params![
                r.time,
                r.request_id,
                r.endpoint,
                r.model_sha256,
                r.prompt_sha256,
                r.prompt_text,
                r.prompt_p_unsafe,
                r.prompt_p_escalate,
                r.response_p_unsafe,
                r.response_p_escalate,
                r.decision,
                r.moderation,
                r.finish_reason,
                r.prompt_tokens as i64,
                r.completion_tokens as i64,
                r.duration_ms,
            ],
        )
        .with_context(|| format!("{}: cannot write the audit row for {}", self.path.display(), r.request_id))?;
        Ok(())
    }
}

/// What `so8t audit` selects.
#[derive(Default)]
pub struct Query {
    /// RFC 3339 time (`2026-11-22T10:00:00Z`, or a date) or a duration back from now (`2h`).
    pub since: Option<String>,
    pub decision: Option<String>,
    pub limit: Option<usize>,
}

/// The earliest time `since` means, in the log's format.
fn since_time(since: &str) -> Result<String> {
    if let Ok(d) = humantime::parse_duration(since) {
        let t = SystemTime::now()
            .checked_sub(d)
            .context("--since: the duration reaches before 1970")?;
        return Ok(humantime::format_rfc3339_millis(t).to_string());
    }
    let full = if since.len() == 10 {
        format!("{since}T00:00:00Z")
    } else {
        since.to_string()
    };
    let t = humantime::parse_rfc3339_weak(&full)
        .with_context(|| format!("--since `{since}`: expected an RFC 3339 time (2026-11-22T10:00:00Z), a date (2026-11-22) or a duration (2h, 30min)"))?;
    Ok(humantime::format_rfc3339_millis(t).to_string())
}

pub fn query(path: &Path, q: &Query) -> Result<Vec<Record>> {
    if !path.exists() {
        bail!("{}: no such audit database", path.display());
    }
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("{}: cannot open the audit database", path.display()))?;
    let since = q.since.as_deref().map(since_time).transpose()?;
    if let Some(d) = &q.decision {
        if !["allow", "refuse", "escalate", "none"].contains(&d.as_str()) {
            bail!("--decision `{d}`: expected allow, refuse, escalate or none (heads untrained)");
        }
    }
    let mut stmt = conn
        .prepare(
            "SELECT time, request_id, endpoint, model_sha256, prompt_sha256, prompt_text, prompt_p_unsafe,
                prompt_p_escalate, response_p_unsafe, response_p_escalate, decision, moderation,
                finish_reason, prompt_tokens, completion_tokens, duration_ms
             FROM requests
             WHERE (?1 IS NULL OR time >= ?1)
               AND (?2 IS NULL OR (?2 = 'none' AND decision IS NULL) OR decision = ?2)
             ORDER BY time, id LIMIT ?3",
        )
        .with_context(|| format!("{}: not an SO8T audit database (no requests table)", path.display()))?;
    let limit = q.limit.map_or(-1, |l| l as i64);
    let rows = stmt.query_map(params![since, q.decision, limit], |r| {
        Ok(Record {
            time: r.get(0)?,
            request_id: r.get(1)?,
            endpoint: r.get(2)?,
            model_sha256: r.get(3)?,
            prompt_sha256: r.get(4)?,
            prompt_text: r.get(5)?,
            prompt_p_unsafe: r.get(6)?,
            prompt_p_escalate: r.get(7)?,
            response_p_unsafe: r.get(8)?,
            response_p_escalate: r.get(9)?,
            decision: r.get(10)?,
            moderation: r.get(11)?,
            finish_reason: r.get(12)?,
            prompt_tokens: r.get::<_, i64>(13)? as usize,
            completion_tokens: r.get::<_, i64>(14)? as usize,
            duration_ms: r.get(15)?,
        })
    })?;
    rows.collect::<rusqlite::Result<Vec<_>>>()
        .with_context(|| format!("{}: reading requests", path.display()))
}

/// `PRAGMA integrity_check`'s answer ("ok" for a sound file).
pub fn integrity_check(path: &Path) -> Result<String> {
    let conn =
        Connection::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    Ok(conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
}

const COLUMNS: [&str; 16] = [
    "time",
    "request_id",
    "endpoint",
    "model_sha256",
    "prompt_sha256",
    "prompt_text",
    "prompt_p_unsafe",
    "prompt_p_escalate",
    "response_p_unsafe",
    "response_p_escalate",
    "decision",
    "moderation",
    "finish_reason",
    "prompt_tokens",
    "completion_tokens",
    "duration_ms",
];

fn fields(r: &Record) -> [String; 16] {
    let o = |x: Option<f32>| x.map(|v| format!("{v:.6}")).unwrap_or_default();
    [
        r.time.clone(),
        r.request_id.clone(),
        r.endpoint.clone(),
        r.model_sha256.clone(),
        r.prompt_sha256.clone(),
        r.prompt_text.clone().unwrap_or_default(),
        o(r.prompt_p_unsafe),
        o(r.prompt_p_escalate),
        o(r.response_p_unsafe),
        o(r.response_p_escalate),
        r.decision.clone().unwrap_or_default(),
        r.moderation.clone(),
        r.finish_reason.clone(),
        r.prompt_tokens.to_string(),
        r.completion_tokens.to_string(),
        format!("{:.1}", r.duration_ms),
    ]
}

/// RFC 4180: quote a field that holds a comma, a quote or a line break.
fn csv_field(s: &str) -> String {
    // A cell that starts like a formula is run by spreadsheets when the file is opened
    // (`=HYPERLINK(…)` in a prompt); OWASP's rule: prefix it with `'`. Numbers stay numbers.
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err();
    let s = if formula { format!("'{s}") } else { s.to_string() };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

pub fn to_csv(rows: &[Record]) -> String {
    let mut out = COLUMNS.join(",") + "\n";
    for r in rows {
        out += &fields(r)
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(",");
        out += "\n";
    }
    out
}

/// A fixed-width table of the columns people read first.
pub fn to_table(rows: &[Record]) -> String {
    let mut out = format!(
        "{:<24} {:<36} {:<20} {:>8} {:>8} {:>8} {:>8} {:<9} {:<14} {:>6} {:>6}\n",
        "time",
        "request_id",
        "endpoint",
        "p_unsafe",
        "p_esc",
        "r_unsafe",
        "r_esc",
        "decision",
        "finish",
        "prompt",
        "gen"
    );
    let o = |x: Option<f32>| x.map(|v| format!("{v:.3}")).unwrap_or_else(|| "-".into());
    for r in rows {
        out += &format!(
            "{:<24} {:<36} {:<20} {:>8} {:>8} {:>8} {:>8} {:<9} {:<14} {:>6} {:>6}\n",
            r.time,
            r.request_id,
            r.endpoint,
            o(r.prompt_p_unsafe),
            o(r.prompt_p_escalate),
            o(r.response_p_unsafe),
            o(r.response_p_escalate),
            r.decision.as_deref().unwrap_or("-"),
            r.finish_reason,
            r.prompt_tokens,
            r.completion_tokens
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, time: &str, decision: Option<&str>) -> Record {
        Record {
            time: time.into(),
            request_id: id.into(),
            endpoint: "/v1/chat/completions".into(),
            model_sha256: "m".into(),
            prompt_sha256: "p".into(),
            prompt_text: Some("a \"quoted\", text\nline".into()),
            prompt_p_unsafe: Some(0.9),
            prompt_p_escalate: None,
            response_p_unsafe: Some(0.1),
            response_p_escalate: Some(0.2),
            decision: decision.map(String::from),
            moderation: "flag".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 5,
            completion_tokens: 7,
            duration_ms: 12.5,
        }
    }

    #[test]
    fn rows_round_trip_and_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.sqlite");
        let a = Audit::open(&path).unwrap();
        a.insert(&record("r1", "2026-01-01T00:00:00.000Z", Some("refuse")))
            .unwrap();
        a.insert(&record("r2", "2026-06-01T00:00:00.000Z", Some("allow")))
            .unwrap();
        a.insert(&record("r3", "2026-07-01T00:00:00.000Z", None))
            .unwrap();
        assert!(
            a.insert(&record("r1", "2026-08-01T00:00:00.000Z", None))
                .is_err(),
            "request ids are unique"
        );
        let all = query(&path, &Query::default()).unwrap();
        assert_eq!(
            all.iter()
                .map(|r| r.request_id.as_str())
                .collect::<Vec<_>>(),
            ["r1", "r2", "r3"]
        );
        assert_eq!(all[0].prompt_p_unsafe, Some(0.9));
        assert_eq!(all[0].prompt_p_escalate, None);
        let q = |since: Option<&str>, decision: Option<&str>| {
            query(
                &path,
                &Query {
                    since: since.map(String::from),
                    decision: decision.map(String::from),
                    limit: None,
                },
            )
            .unwrap()
            .into_iter()
            .map(|r| r.request_id)
            .collect::<Vec<_>>()
        };
        assert_eq!(q(Some("2026-05-01"), None), ["r2", "r3"]);
        assert_eq!(q(None, Some("refuse")), ["r1"]);
        assert_eq!(q(None, Some("none")), ["r3"]);
        assert_eq!(q(Some("1h"), None), Vec::<String>::new());
        assert!(query(
            &path,
            &Query {
                since: Some("yesterday-ish".into()),
                ..Default::default()
            }
        )
        .is_err());
        assert!(query(
            &path,
            &Query {
                decision: Some("deny".into()),
                ..Default::default()
            }
        )
        .is_err());
        assert_eq!(integrity_check(&path).unwrap(), "ok");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        let csv = to_csv(&[record("r1", "t", Some("allow"))]);
        let line = csv.lines().nth(1).unwrap();
        assert!(line.contains("\"a \"\"quoted\"\", text"), "{csv}");
        assert_eq!(csv.lines().next().unwrap().split(',').count(), 16);
    }

    /// Issue 18: a prompt `=HYPERLINK(…)` was written as a live formula.
    #[test]
    fn csv_defuses_formulas_but_keeps_numbers() {
        assert_eq!(csv_field("=HYPERLINK(\"http://x\",\"y\")"), "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\"");
        assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_field("-0.25"), "-0.25");
        assert_eq!(csv_field("+cmd|' /C calc'!A0"), "'+cmd|' /C calc'!A0");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.sqlite");
        std::fs::write(
            &path,
            b"this is not a database, it is a text file of some length......",
        )
        .unwrap();
        let e = Audit::open(&path).err().expect("must fail");
        assert!(format!("{e:#}").contains("junk.sqlite"), "{e:#}");
    }
}
