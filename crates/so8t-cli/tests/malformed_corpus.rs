//! The malformed-input corpus (`fixtures/malformed/cases.json`, written by
//! `scripts/fuzz/make-corpus.py` from the real fixture models) through every command that
//! reads a model. Each run is bounded: 2 GiB of address space (an allocation sized by a
//! corrupt field fails the run instead of passing by luck on a big machine) and 30 s
//! (these are 150-530 KB models: anything slower is a hang). For every case and command:
//! no panic, no signal, no hang, exit 0 or 1, a failure is one line that names the edited
//! file, and a failed writing command leaves nothing at or beside its output path. The
//! commands a case lists under `refuse` must fail, and their line must contain the
//! case's `expect` text too (the field at fault).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Deserialize;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[derive(Deserialize)]
struct Corpus {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    base: String,
    edits: Vec<Edit>,
    refuse: Vec<String>,
    expect: String,
    /// The file the error must name when not the edited one.
    names: Option<String>,
}

#[derive(Deserialize)]
struct Edit {
    file: String,
    truncate: Option<u64>,
    write_at: Option<u64>,
    hex: Option<String>,
    json_set: Option<Vec<String>>,
    value: Option<serde_json::Value>,
    json_del: Option<Vec<String>>,
    text: Option<String>,
    #[serde(default)]
    delete: bool,
}

const COMMANDS: &[(&str, &[&str])] = &[
    ("gguf", &["inspect", "validate", "run", "bench", "convert", "export", "modelfile", "serve"]),
    ("hf", &["inspect", "validate", "run", "bench", "convert", "export", "serve"]),
    ("so8t", &["inspect", "validate", "run", "bench", "bake", "export", "eval", "serve"]),
    ("vl", &["inspect", "validate", "run", "bench", "convert", "export", "serve"]),
];

/// Copies the case's base into `dir` and applies its edits; returns the model path.
fn materialise(case: &Case, dir: &Path) -> PathBuf {
    let fixtures = root().join(if case.base == "vl" { "fixtures/tiny-qwen2vl" } else { "fixtures/tiny-qwen2" });
    let model = if case.base == "gguf" {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(fixtures.join("model-q8_0.gguf"), dir.join("model.gguf")).unwrap();
        dir.join("model.gguf")
    } else {
        let m = dir.join("m");
        std::fs::create_dir_all(&m).unwrap();
        for f in [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            std::fs::copy(fixtures.join(f), m.join(f)).unwrap();
        }
        if case.base == "vl" {
            std::fs::copy(fixtures.join("preprocessor_config.json"), m.join("preprocessor_config.json")).unwrap();
        }
        if case.base == "so8t" {
            for f in ["so8t_adapter.safetensors", "so8t_config.json"] {
                std::fs::copy(fixtures.join("so8t-random").join(f), m.join(f)).unwrap();
            }
        }
        m
    };
    let at = |file: &str| {
        if case.base == "gguf" {
            model.clone()
        } else {
            model.join(file)
        }
    };
    for e in &case.edits {
        let path = at(&e.file);
        if e.delete {
            std::fs::remove_file(&path).unwrap();
        } else if let Some(len) = e.truncate {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(len)
                .unwrap();
        } else if let (Some(at), Some(hex)) = (e.write_at, &e.hex) {
            let mut b = std::fs::read(&path).unwrap();
            let bytes: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let at = at as usize;
            assert!(at + bytes.len() <= b.len(), "{}: edit past the end", case.name);
            b[at..at + bytes.len()].copy_from_slice(&bytes);
            std::fs::write(&path, b).unwrap();
        } else if let Some(text) = &e.text {
            std::fs::write(&path, text).unwrap();
        } else {
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let (keys, value) = match (&e.json_set, &e.json_del) {
                (Some(k), _) => (k, e.value.clone()),
                (None, Some(k)) => (k, None),
                _ => panic!("{}: an edit that does nothing", case.name),
            };
            let (last, parents) = keys.split_last().unwrap();
            let mut obj = &mut v;
            for k in parents {
                obj = obj
                    .as_object_mut()
                    .unwrap()
                    .entry(k.clone())
                    .or_insert_with(|| serde_json::json!({}));
            }
            let obj = obj.as_object_mut().unwrap();
            match value {
                Some(value) => obj.insert(last.clone(), value),
                None => obj.remove(last),
            };
            std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
        }
    }
    model
}

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

/// `so8t ARGS` under the memory and time bounds. `serve` is stopped once it listens
/// (it accepted the model) or when it exits (it refused it); no server outlives the test.
fn so8t(args: &[&str], serve: bool) -> Outcome {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 2097152; exec timeout -s KILL 30 \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_so8t"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap());
    if serve {
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            if line.contains("so8t serve: listening on ") {
                // SIGTERM to `timeout`, which passes it on to the server (a SIGKILL
                // would stop `timeout` alone and leave the server running, orphaned).
                let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
                let _ = child.wait();
                return Outcome {
                    code: Some(0),
                    stderr,
                };
            }
            stderr.push_str(&line);
            line.clear();
        }
    } else {
        lines.read_to_string(&mut stderr).unwrap();
    }
    let status = child.wait().unwrap();
    Outcome {
        code: status.code(),
        stderr,
    }
}

fn check(case: &Case, command: &str, dir: &Path) -> Result<(), String> {
    let model = materialise(case, &dir.join("in"));
    let out = dir.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let m = model.to_str().unwrap();
    let o = |name: &str| out.join(name).to_str().unwrap().to_string();
    let data = root().join("fixtures/train/tiny.jsonl");
    let image = root().join("fixtures/qwen2vl-images/e.png").to_str().unwrap().to_string();
    let args: Vec<String> = match command {
        "inspect" | "validate" => vec![command.into(), m.into()],
        // A vision model's run reads an image too.
        "run" if case.base == "vl" => ["run", "--model", m, "--image", &image, "--prompt", "hi", "-n", "2"]
            .map(String::from)
            .into(),
        "run" => ["run", "--model", m, "--prompt", "hi", "-n", "2"].map(String::from).into(),
        "bench" => ["bench", "-m", m, "-p", "8", "-n", "2", "-r", "1", "--no-probe"]
            .map(String::from)
            .into(),
        "convert" => vec!["convert".into(), m.into(), "--out".into(), o("converted")],
        "bake" => vec!["bake".into(), m.into(), "--out".into(), o("baked")],
        "export" => vec![
            "export".into(),
            m.into(),
            "--out".into(),
            o("model.gguf"),
            "--quant".into(),
            "q8_0".into(),
        ],
        "modelfile" => vec!["modelfile".into(), m.into(), "--out".into(), o("Modelfile")],
        "eval" => vec![
            "eval".into(),
            "--model".into(),
            m.into(),
            "--data".into(),
            data.to_str().unwrap().into(),
        ],
        "serve" => ["serve", "--model", m, "--port", "0"].map(String::from).into(),
        _ => unreachable!(),
    };
    let mut full = vec!["-t".to_string(), "1".to_string()];
    full.extend(args);
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let r = so8t(&full, command == "serve");
    let err = r.stderr.trim();
    let what = format!("{} | so8t {command}", case.name);
    match r.code {
        None => return Err(format!("{what}: killed by a signal (memory bound?): {err}")),
        Some(137) | Some(124) => return Err(format!("{what}: did not finish in 30 s")),
        Some(0) | Some(1) => {}
        Some(c) => return Err(format!("{what}: exit code {c}: {err}")),
    }
    if err.contains("panicked") {
        return Err(format!("{what}: panic: {err}"));
    }
    if r.code == Some(0) {
        if case.refuse.iter().any(|c| c == command) {
            return Err(format!("{what}: accepted, but must be refused"));
        }
        return Ok(());
    }
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.last().copied().unwrap_or("");
    if lines.len() != 1 {
        return Err(format!("{what}: {} lines of error, not one: {err}", lines.len()));
    }
    let file = match (&case.names, case.base.as_str()) {
        (Some(f), _) => f.as_str(),
        (None, "gguf") => "model.gguf",
        (None, _) => case.edits[0].file.as_str(),
    };
    if !last.contains(file) {
        return Err(format!("{what}: the error does not name {file}: {last}"));
    }
    if case.refuse.iter().any(|c| c == command) && !last.contains(&case.expect) {
        return Err(format!("{what}: the error does not say {:?}: {last}", case.expect));
    }
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    if !left.is_empty() {
        return Err(format!("{what}: failed but left {left:?} in its output directory"));
    }
    Ok(())
}

#[test]
fn every_command_on_every_malformed_case_fails_cleanly_or_succeeds() {
    let corpus: Corpus = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/malformed/cases.json")).unwrap(),
    )
    .unwrap();
    assert!(corpus.cases.len() >= 100, "{} cases", corpus.cases.len());
    let jobs: Vec<(&Case, &str)> = corpus
        .cases
        .iter()
        .flat_map(|c| {
            let commands = COMMANDS.iter().find(|(b, _)| *b == c.base).unwrap().1;
            commands.iter().map(move |cmd| (c, *cmd))
        })
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let t0 = Instant::now();
    let (mut failures, mut refused): (Vec<String>, usize) = (Vec::new(), 0);
    // Two at a time: each command runs on one thread (-t 1) and this machine has two.
    let results: Vec<Vec<(usize, Result<(), String>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some((case, cmd)) = jobs.get(i) else {
                            break mine;
                        };
                        let dir = tmp.path().join(i.to_string());
                        mine.push((i, check(case, cmd, &dir)));
                        let _ = std::fs::remove_dir_all(&dir);
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let mut results: Vec<_> = results.into_iter().flatten().collect();
    results.sort_by_key(|r| r.0);
    for (i, r) in results {
        match r {
            Ok(()) => refused += usize::from(jobs[i].0.refuse.iter().any(|c| c == jobs[i].1)),
            Err(e) => failures.push(e),
        }
    }
    eprintln!(
        "{} cases, {} runs ({refused} required refusals met) in {:.0?}",
        corpus.cases.len(),
        jobs.len(),
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {} runs failed:\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n")
    );
}
