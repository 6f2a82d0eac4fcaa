//! `kill -9` at random moments of every command that writes a model or a report (issue
//! 18): convert, bake, export, train (in place, and to `--out` with a features cache),
//! modelfile and eval `--report`. After every kill the target holds the complete old
//! state or the complete new one (nothing, where there was nothing before), never a mix
//! or a partial file; the rerun that follows succeeds and gives the new state; and once
//! it has, nothing of the killed run is left beside the target.
//!
//! Kills are drawn uniformly over 1.2 × the command's uninterrupted run time, so they
//! land anywhere from process start to after the final rename. `SO8T_KILLS` sets the
//! kills per command (default 50); `SO8T_KILL_BASE` replaces the tiny fixture model with
//! a real one (a GGUF or an HF directory, e.g. SmolLM2), whose writes take seconds
//! instead of milliseconds. The serve audit database has its own test in `serve.rs`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn run(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_so8t")).args(args).output().unwrap()
}

fn ok(args: &[String]) {
    let out = run(args);
    assert!(
        out.status.success(),
        "so8t {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

/// What a path holds: every file's digest by relative path (directories as entries of
/// their own), or `None` when there is nothing. The run time a JSON file records
/// (`seconds`, `fit_seconds`, …, and the eval report's `time: 0.1 s`) is left out: it
/// differs between two runs of the same command, and it is not what a kill could tear.
fn state(path: &Path) -> Option<BTreeMap<String, String>> {
    fn walk(root: &Path, p: &Path, into: &mut BTreeMap<String, String>) {
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
        let meta = std::fs::symlink_metadata(p).unwrap();
        if meta.is_dir() {
            into.insert(format!("{rel}/"), "dir".into());
            for e in std::fs::read_dir(p).unwrap() {
                walk(root, &e.unwrap().path(), into);
            }
        } else {
            let bytes = std::fs::read(p).unwrap();
            let digest = match serde_json::from_slice::<serde_json::Value>(&bytes) {
                Ok(mut v) if p.extension().is_some_and(|e| e == "json") => {
                    drop_timings(&mut v);
                    sha256(v.to_string().as_bytes())
                }
                _ if p.extension().is_some_and(|e| e == "md") => {
                    let text = String::from_utf8_lossy(&bytes);
                    let lines: Vec<&str> =
                        text.lines().map(|l| l.split("; time: ").next().unwrap()).collect();
                    sha256(lines.join("\n").as_bytes())
                }
                _ => sha256(&bytes),
            };
            into.insert(rel, digest);
        }
    }
    fn drop_timings(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|k, _| !k.ends_with("seconds"));
                m.values_mut().for_each(drop_timings);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(drop_timings),
            _ => {}
        }
    }
    std::fs::symlink_metadata(path).ok()?;
    let mut m = BTreeMap::new();
    walk(path, path, &mut m);
    Some(m)
}

fn copy_tree(from: &Path, to: &Path) {
    if from.is_dir() {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            copy_tree(&e.path(), &to.join(e.file_name()));
        }
    } else {
        std::fs::copy(from, to).unwrap();
    }
}

fn remove(path: &Path) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).unwrap(),
        Ok(_) => std::fs::remove_file(path).unwrap(),
        Err(_) => {}
    }
}

/// Names in `dir` other than `keep`: what a run left beside its target.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    let mut left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    left.sort();
    left
}

struct Case {
    name: &'static str,
    /// Each case writes into a directory of its own, so that anything a killed run leaves
    /// beside its target shows.
    target: PathBuf,
    /// Puts the old state at the target.
    old: Vec<String>,
    /// The command under test, replacing the old state.
    new: Vec<String>,
    /// Rounds alternate between starting from the old state and from nothing, where the
    /// command can start from nothing (training in place cannot).
    from_nothing: bool,
    /// A directory the command also writes into (a features cache): after any kill, each
    /// entry in it is complete.
    also_writes: Option<PathBuf>,
}

#[derive(Default, Debug)]
struct Outcomes {
    old: usize,
    new: usize,
    nothing: usize,
}

fn torture(case: &Case, kills: usize, seed: &mut u64) -> Outcomes {
    let bin = env!("CARGO_BIN_EXE_so8t");
    let parent = case.target.parent().unwrap();
    let name = case.target.file_name().unwrap().to_string_lossy().to_string();
    let keep = |extra: &[&str]| -> Vec<String> {
        let mut k = vec![name.clone()];
        k.extend(extra.iter().map(|s| s.to_string()));
        k
    };
    ok(&case.old);
    let old = state(&case.target).expect("the old state");
    let backup = parent.join("old-state");
    copy_tree(&case.target, &backup);
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        ok(&case.new);
        times.push(t0.elapsed());
    }
    times.sort();
    let took = times[1];
    let new = state(&case.target).expect("the new state");
    assert_ne!(old, new, "{}: the old and the new state must differ", case.name);
    let mut seen = Outcomes::default();
    for round in 0..kills {
        remove(&case.target);
        let from_nothing = case.from_nothing && round % 2 == 1;
        if !from_nothing {
            copy_tree(&backup, &case.target);
        }
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = took.mul_f64(1.2 * ((*seed >> 11) as f64 / (1u64 << 53) as f64));
        let mut child = Command::new(bin)
            .args(&case.new)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let after = state(&case.target);
        let at = format!("{}: kill {round} at {delay:?} of {took:?}", case.name);
        match &after {
            None if from_nothing => seen.nothing += 1,
            Some(s) if *s == new => seen.new += 1,
            Some(s) if *s == old && !from_nothing => seen.old += 1,
            other => panic!(
                "{at}: the target is neither the {} state nor the new one: {other:?}",
                if from_nothing { "empty" } else { "old" }
            ),
        }
        if let Some(dir) = &case.also_writes {
            for e in std::fs::read_dir(dir).into_iter().flatten() {
                let p = e.unwrap().path();
                let f = p.file_name().unwrap().to_string_lossy().to_string();
                if !f.starts_with('.') {
                    assert!(
                        candle_core::safetensors::load(&p, &candle_core::Device::Cpu).is_ok(),
                        "{at}: a torn entry {} in {}",
                        f,
                        dir.display()
                    );
                }
            }
        }
        // The rerun: from whatever the kill left, it succeeds and gives the new state.
        let out = run(&case.new);
        assert!(
            out.status.success(),
            "{at}: the rerun failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(state(&case.target).as_ref(), Some(&new), "{at}: the rerun's result");
        let k = keep(&["old-state", "cache"]);
        let k: Vec<&str> = k.iter().map(String::as_str).collect();
        assert_eq!(leftovers(parent, &k), Vec::<String>::new(), "{at}: left beside the target");
        if let Some(dir) = &case.also_writes {
            let hidden: Vec<String> =
                leftovers(dir, &[]).into_iter().filter(|n| n.starts_with('.')).collect();
            assert!(hidden.is_empty(), "{at}: left in {}: {hidden:?}", dir.display());
        }
    }
    // Kills that all landed before the swap (or all after it) would not test it.
    assert!(
        seen.new > 0 && seen.old + seen.nothing > 0,
        "{}: every kill landed on the same side of the swap: {seen:?}",
        case.name
    );
    seen
}

#[test]
fn kill_9_at_random_moments_leaves_the_old_or_the_new_state() {
    let kills: usize = std::env::var("SO8T_KILLS")
        .ok()
        .map(|v| v.parse().expect("SO8T_KILLS: a number of kills"))
        .unwrap_or(50);
    let base = std::env::var_os("SO8T_KILL_BASE")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixtures().join("tiny-qwen3"));
    let data = fixtures().join("train/tiny.jsonl");
    let tmp = tempfile::tempdir().unwrap();
    let s = |p: &Path| p.to_string_lossy().to_string();
    let args = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<String>>();

    // Inputs: two SO8T directories (different gates) and a GGUF of one.
    let inputs = tmp.path().join("inputs");
    std::fs::create_dir(&inputs).unwrap();
    let (a, b) = (inputs.join("a"), inputs.join("b"));
    for (dir, seed) in [(&a, "3"), (&b, "4")] {
        ok(&args(&[
            "convert", &s(&base), "--out", &s(dir), "--init", "random", "--seed", seed,
            "--scale", "0.1",
        ]));
    }
    ok(&args(&["train", "--model", &s(&a), "--data", &s(&data), "--mode", "heads"]));
    let gguf = inputs.join("a.gguf");
    ok(&args(&["export", &s(&a), "--out", &s(&gguf), "--quant", "q8_0"]));
    let half = inputs.join("half.jsonl");
    let rows = std::fs::read_to_string(&data).unwrap();
    std::fs::write(&half, rows.lines().step_by(2).collect::<Vec<_>>().join("\n")).unwrap();

    let place = |case: &str, name: &str| {
        let d = tmp.path().join(case);
        std::fs::create_dir(&d).unwrap();
        d.join(name)
    };
    let mut cases = Vec::new();
    let t = place("convert", "so8t");
    cases.push(Case {
        name: "convert",
        old: args(&["convert", &s(&base), "--out", &s(&t), "--init", "random", "--seed", "4", "--scale", "0.1"]),
        new: args(&["convert", &s(&base), "--out", &s(&t), "--init", "random", "--seed", "3", "--scale", "0.1", "--force"]),
        target: t,
        from_nothing: true,
        also_writes: None,
    });
    let t = place("bake", "baked");
    cases.push(Case {
        name: "bake",
        old: args(&["bake", &s(&b), "--out", &s(&t)]),
        new: args(&["bake", &s(&a), "--out", &s(&t), "--force"]),
        target: t,
        from_nothing: true,
        also_writes: None,
    });
    let t = place("export", "m.gguf");
    cases.push(Case {
        name: "export",
        old: args(&["export", &s(&b), "--out", &s(&t), "--quant", "q4_0"]),
        new: args(&["export", &s(&a), "--out", &s(&t), "--quant", "q8_0", "--force"]),
        target: t,
        from_nothing: true,
        also_writes: None,
    });
    let t = place("train-in-place", "so8t");
    cases.push(Case {
        name: "train in place",
        old: args(&["convert", &s(&base), "--out", &s(&t), "--init", "random", "--seed", "3", "--scale", "0.1", "--force"]),
        new: args(&["train", "--model", &s(&t), "--data", &s(&data), "--mode", "heads"]),
        target: t,
        from_nothing: false,
        also_writes: None,
    });
    let t = place("train-out", "trained");
    let cache = t.with_file_name("cache");
    cases.push(Case {
        name: "train --out",
        old: args(&["convert", &s(&base), "--out", &s(&t), "--force"]),
        new: args(&[
            "train", "--model", &s(&b), "--data", &s(&data), "--mode", "heads", "--out", &s(&t),
            "--force", "--features-cache", &s(&cache),
        ]),
        target: t,
        from_nothing: true,
        also_writes: Some(cache),
    });
    let t = place("modelfile", "Modelfile");
    cases.push(Case {
        name: "modelfile",
        old: args(&["modelfile", &s(&gguf), "--out", &s(&t), "--system", "old"]),
        new: args(&["modelfile", &s(&gguf), "--out", &s(&t), "--system", "new"]),
        target: t,
        from_nothing: true,
        also_writes: None,
    });
    let t = place("eval", "report");
    cases.push(Case {
        name: "eval --report",
        old: args(&["eval", "--model", &s(&a), "--data", &s(&half), "--report", &s(&t)]),
        new: args(&["eval", "--model", &s(&a), "--data", &s(&data), "--report", &s(&t)]),
        target: t,
        from_nothing: true,
        also_writes: None,
    });

    let mut seed = 0x5eed_u64;
    for case in &cases {
        let t0 = Instant::now();
        let seen = torture(case, kills, &mut seed);
        eprintln!(
            "{}: {kills} kills in {:.1} s: {} left the old state, {} the new one, {} nothing; every rerun gave the new state",
            case.name,
            t0.elapsed().as_secs_f64(),
            seen.old,
            seen.new,
            seen.nothing
        );
    }
}
