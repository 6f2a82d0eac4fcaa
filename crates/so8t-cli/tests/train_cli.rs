//! `so8t train` and `so8t eval` end to end on the tiny Qwen3 fixture: bad data, heads and
//! gates modes, stop and resume, validation, and the report files.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn so8t(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(args: &[&str]) -> String {
    let out = so8t(args);
    assert!(
        out.status.success(),
        "so8t {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn tiny_so8t(tmp: &Path) -> String {
    let dir = tmp.join("so8t");
    ok(&[
        "convert",
        fixtures().join("tiny-qwen3").to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--init",
        "random",
        "--seed",
        "3",
        "--scale",
        "0.1",
    ]);
    dir.to_str().unwrap().to_string()
}

fn data() -> String {
    fixtures()
        .join("train/tiny.jsonl")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn bad_rows_stop_the_run_with_their_line_unless_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let bad = tmp.path().join("bad.jsonl");
    let mut text = std::fs::read_to_string(data()).unwrap();
    text = text.replacen("\"safety\": \"unsafe\"", "\"safety\": \"harmful\"", 1);
    text.push_str("{\"prompt\": \"unterminated\n");
    std::fs::write(&bad, text).unwrap();
    let out_dir = tmp.path().join("out");
    let out = so8t(&[
        "train",
        "--model",
        &model,
        "--data",
        bad.to_str().unwrap(),
        "--mode",
        "heads",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("bad.jsonl")
            && err.contains("line 2")
            && err.contains("unknown safety label `harmful`"),
        "{err}"
    );
    assert!(!err.contains("panicked"));
    assert!(
        !out_dir.exists(),
        "a refused run wrote {}",
        out_dir.display()
    );

    let out = so8t(&[
        "train",
        "--model",
        &model,
        "--data",
        bad.to_str().unwrap(),
        "--mode",
        "heads",
        "--skip-bad",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("skipped 2 bad rows"), "{err}");
}

#[test]
fn training_needs_an_so8t_directory() {
    let out = so8t(&[
        "train",
        "--model",
        fixtures().join("tiny-qwen3").to_str().unwrap(),
        "--data",
        &data(),
        "--mode",
        "heads",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.contains("not an SO8T directory") && err.contains("so8t convert"),
        "{err}"
    );
    let out = so8t(&[
        "eval",
        "--model",
        fixtures().join("tiny-qwen3").to_str().unwrap(),
        "--data",
        &data(),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no SO8T heads"));
}

#[test]
fn heads_then_eval_with_report() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let trained = tmp.path().join("trained");
    let summary: serde_json::Value = serde_json::from_str(&ok(&[
        "train",
        "--model",
        &model,
        "--data",
        &data(),
        "--val",
        &data(),
        "--mode",
        "heads",
        "--out",
        trained.to_str().unwrap(),
    ]))
    .unwrap();
    assert_eq!(summary["heads"].as_array().unwrap().len(), 2);
    // Thresholds chosen on the validation data are stored with the model.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trained.join("so8t_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["heads_trained"], true);
    assert_eq!(
        cfg["thresholds"]["unsafe"].as_f64().unwrap() as f32,
        summary["thresholds"][0]["prompt_threshold"].as_f64().unwrap() as f32
    );
    // The source directory is untouched.
    let src: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&model).join("so8t_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(src["heads_trained"], false);

    let report = tmp.path().join("report");
    let rows = tmp.path().join("rows.jsonl");
    let r: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        trained.to_str().unwrap(),
        "--data",
        &data(),
        "--json",
        "--report",
        report.to_str().unwrap(),
        "--rows",
        rows.to_str().unwrap(),
    ]))
    .unwrap();
    // --rows: one line per data row, in order, whose decisions add up to the report's.
    let per_row: Vec<serde_json::Value> = std::fs::read_to_string(&rows)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(per_row.len() as u64, r["rows"].as_u64().unwrap());
    let lines: Vec<u64> = per_row.iter().map(|v| v["line"].as_u64().unwrap()).collect();
    assert!(lines.windows(2).all(|w| w[0] < w[1]), "{lines:?}");
    for (decision, n) in r["decisions"].as_object().unwrap() {
        let got = per_row.iter().filter(|v| v["decision"] == *decision).count();
        assert_eq!(got as u64, n.as_u64().unwrap(), "{decision}");
    }
    assert!(per_row.iter().all(|v| (0.0..=1.0).contains(&v["p_unsafe"].as_f64().unwrap())));
    let safety = &r["heads"][0];
    assert_eq!(safety["head"], "safety");
    assert_eq!(safety["metrics"]["n"], 9);
    assert_eq!(safety["metrics"]["positives"], 3);
    let m = &safety["metrics"];
    assert_eq!(
        m["tp"].as_u64().unwrap()
            + m["fp"].as_u64().unwrap()
            + m["tn"].as_u64().unwrap()
            + m["fn"].as_u64().unwrap(),
        9
    );
    // A linear probe fits 9 points in 64 dimensions: training data is separated.
    assert_eq!(m["auroc"], 1.0);
    for f in [
        "report.md",
        "report.json",
        "roc.png",
        "scores-safety.png",
        "scores-authority.png",
    ] {
        let bytes = std::fs::read(report.join(f)).unwrap_or_else(|_| panic!("{f} missing"));
        if f.ends_with(".png") {
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{f} is not a PNG");
            assert!(bytes.len() > 5000, "{f} is nearly empty");
        }
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    assert!(md.contains("| safety (`unsafe` = 1) | 9 (3) |"), "{md}");
    // A second report replaces the first in one step, keeps the user's own files, and
    // leaves no staging directory behind.
    std::fs::write(report.join("notes.txt"), "mine").unwrap();
    std::os::unix::fs::symlink("notes.txt", report.join("link")).unwrap();
    std::fs::write(report.join("report.md"), "old").unwrap();
    ok(&[
        "eval", "--model", trained.to_str().unwrap(), "--data", &data(),
        "--report", report.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read_to_string(report.join("notes.txt")).unwrap(), "mine");
    assert_eq!(std::fs::read_link(report.join("link")).unwrap(), Path::new("notes.txt"));
    assert!(std::fs::read_to_string(report.join("report.md")).unwrap().contains("| safety"));
    let hidden: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(hidden.is_empty(), "{hidden:?}");
    // A file where the report directory should be is an error, and stays as it was.
    let file = tmp.path().join("report-file");
    std::fs::write(&file, "x").unwrap();
    let out = so8t(&[
        "eval", "--model", trained.to_str().unwrap(), "--data", &data(),
        "--report", file.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a directory"));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

/// The feature cache's entries with their modification times, sorted: a hit must leave
/// them as they were.
fn cache_entries(cache: &Path) -> Vec<(PathBuf, std::time::SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.clone(), std::fs::metadata(&p).unwrap().modified().unwrap()))
        .collect();
    v.sort();
    v
}

/// The hidden states cached by one heads fit serve the next one with the same model and
/// data (same heads, bit for bit, no new entry), a damaged entry is computed again, and
/// other data gets its own entries.
#[test]
fn features_cache_reuses_states_only_for_the_same_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let cache = tmp.path().join("cache");
    let train = |data: &str, out: &str| {
        let out = tmp.path().join(out);
        ok(&[
            "train", "--model", &model, "--data", data, "--val", data, "--mode", "heads",
            "--features-cache", cache.to_str().unwrap(), "--out", out.to_str().unwrap(),
        ]);
        std::fs::read(out.join("so8t_adapter.safetensors")).unwrap()
    };
    let entries = || cache_entries(&cache);
    let first = train(&data(), "a");
    let stored = entries();
    // train rows (16 answer tokens) and val rows (all): two readings of one file
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(train(&data(), "b"), first);
    assert_eq!(entries(), stored, "a hit must not rewrite the entry");
    // A damaged entry is reported and replaced, with the same result.
    let damaged = &stored[0].0;
    let bytes = std::fs::read(damaged).unwrap();
    std::fs::write(damaged, &bytes[..bytes.len() / 2]).unwrap();
    assert_eq!(train(&data(), "c"), first);
    assert_eq!(std::fs::read(damaged).unwrap().len(), bytes.len());
    // Other rows, other entries.
    let fewer = tmp.path().join("fewer.jsonl");
    let text = std::fs::read_to_string(data()).unwrap();
    let kept: Vec<&str> = text.lines().skip(1).collect();
    std::fs::write(&fewer, kept.join("\n") + "\n").unwrap();
    train(fewer.to_str().unwrap(), "d");
    assert_eq!(entries().len(), 4);
    // Gates change the states as they train: no cache there.
    let out = so8t(&[
        "train", "--model", &model, "--data", &data(), "--mode", "gates",
        "--features-cache", cache.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--features-cache is for --mode heads"));
}

/// `--data` repeated trains on the files as on their concatenation: a prompt the second file
/// repeats (with an answer) adds its prompt samples once, as it does within one file. With
/// --features-cache each file has its own entry, so adding a file computes only its rows.
#[test]
fn several_data_files_train_as_their_concatenation_with_an_entry_per_file() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let cache = tmp.path().join("cache");
    let text = std::fs::read_to_string(data()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let write = |name: &str, rows: &[&str]| {
        let p = tmp.path().join(name);
        std::fs::write(&p, rows.join("\n") + "\n").unwrap();
        p.to_str().unwrap().to_string()
    };
    let again = r#"{"prompt": "How do I bake bread?", "response": "Mix flour, water, yeast and salt, knead, let it rise and bake it.", "safety": "safe", "authority": "handle"}"#;
    assert!(lines[0].contains("How do I bake bread?"));
    let first = write("first.jsonl", &lines[..8]);
    let second = write("second.jsonl", &[&lines[8..], &[again]].concat());
    let joined = write("joined.jsonl", &[&lines[..], &[again]].concat());
    let train = |files: &[&str], out: &str, cached: bool| {
        let out = tmp.path().join(out);
        let mut args = vec!["train", "--model", &model, "--val", &joined, "--mode", "heads"];
        for f in files {
            args.extend(["--data", f]);
        }
        let c = cache.to_str().unwrap().to_string();
        if cached {
            args.extend(["--features-cache", &c]);
        }
        args.extend(["--out", out.to_str().unwrap()]);
        let summary: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
        let adapter = std::fs::read(out.join("so8t_adapter.safetensors")).unwrap();
        (summary, adapter)
    };
    let samples = |summary: &serde_json::Value| -> Vec<(u64, u64)> {
        summary["heads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| (h["rows"].as_u64().unwrap(), h["positives"].as_u64().unwrap()))
            .collect()
    };
    let (whole, _) = train(&[&joined], "joined", false);
    let (parts, parts_adapter) = train(&[&first, &second], "parts", false);
    assert_eq!(parts["train_rows"], 11);
    assert_eq!(samples(&parts), samples(&whole));
    // The same states: each head's fit loss as on the one file. Not bit for bit: `walk`
    // batches rows and shares prompt prefixes across a batch, and a file boundary moves
    // the batches, which changes f32 rounding (~1e-7 relative) and nothing else; a state
    // paired with another row's sample moves the loss by orders of magnitude more.
    for (p, w) in parts["heads"].as_array().unwrap().iter().zip(whole["heads"].as_array().unwrap()) {
        let (p, w) = (p["train_loss"].as_f64().unwrap(), w["train_loss"].as_f64().unwrap());
        assert!((p - w).abs() < 1e-4, "train loss {p} split, {w} joined");
    }
    // A third file that only repeats a prompt of the first adds a row and no sample.
    assert!(lines[1].contains("bomb") && !lines[1].contains("response"));
    let (repeated, _) = train(&[&first, &second, &write("repeat.jsonl", &[lines[1]])], "repeat", false);
    assert_eq!(repeated["train_rows"], 12);
    assert_eq!(samples(&repeated), samples(&parts));

    let entries = || cache_entries(&cache);
    train(&[&first], "first", true);
    let before = entries();
    assert_eq!(before.len(), 2, "first.jsonl's train reading and the val file's: {before:?}");
    let (_, cached_adapter) = train(&[&first, &second], "cached", true);
    let after = entries();
    assert_eq!(after.len(), 3, "only second.jsonl's entry is new: {after:?}");
    assert!(before.iter().all(|e| after.contains(e)), "the entries there are not rewritten");
    assert_eq!(cached_adapter, parts_adapter, "states from the cache are the computed ones");
    assert_eq!(train(&[&first, &second], "again", true).1, parts_adapter);
    assert_eq!(entries(), after);
    // Gates read one file.
    let out = so8t(&["train", "--model", &model, "--data", &first, "--data", &second, "--mode", "gates"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--mode gates reads one --data file"));
}

/// `--thresholds-from families`: with fewer than five families it stops before the pass,
/// leaving nothing behind; with six, each head's thresholds come from its held-out-family
/// scores, prompts and whole answers (longer than the 16 tokens fitted on).
#[test]
fn thresholds_from_held_out_families() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let trained = tmp.path().join("trained");
    let train = |data: &str| {
        so8t(&[
            "train", "--model", &model, "--data", data, "--mode", "heads", "--layer", "2",
            "--thresholds-from", "families", "--out", trained.to_str().unwrap(),
        ])
    };
    let out = train(&data());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tiny.jsonl") && err.contains("safety head") && err.contains("at least 5 families"),
        "{err}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("so8t")], "nothing written: {left:?}");

    let rows = tmp.path().join("families.jsonl");
    let long = "word ".repeat(30);
    let text: String = (0..36)
        .map(|i| {
            let (unsafe_, escalate) = (i % 2 == 1, i % 3 == 0);
            serde_json::json!({
                "prompt": format!("request {i} {}", if unsafe_ { "harm" } else { "help" }),
                "safety": if unsafe_ { "unsafe" } else { "safe" },
                "authority": if escalate { "escalate" } else { "handle" },
                "response": format!("answer {i} {long}"),
                "response_safety": if unsafe_ { "unsafe" } else { "safe" },
                "family": format!("family {}", i % 6),
            })
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(&rows, text).unwrap();
    let out = train(rows.to_str().unwrap());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let chosen = summary["thresholds"].as_array().unwrap();
    assert_eq!(chosen.len(), 2, "{summary}");
    assert!(chosen.iter().all(|t| t["chosen_on"] == "held-out families"), "{summary}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trained.join("so8t_config.json")).unwrap()).unwrap();
    let stored = |key: &str| cfg["thresholds"][key].as_f64().unwrap() as f32;
    let reported = |h: usize, key: &str| chosen[h][key].as_f64().unwrap() as f32;
    assert_eq!(stored("unsafe"), reported(0, "prompt_threshold"));
    assert_eq!(stored("response_unsafe"), reported(0, "response_threshold"));
    assert_eq!(stored("escalate"), reported(1, "prompt_threshold"));
    // The answers of each training family, held out: all 6 answers of each (the odd
    // families' unsafe), at the stored rule; and the same at each compared rule length, the
    // stored one agreeing.
    let families = summary["held_out_answers"]["safety"].as_array().unwrap();
    assert_eq!(families.len(), 6, "{summary}");
    let unsafe_answers: Vec<_> = families.iter().map(|f| (f["answers"].as_u64(), f["class_1"].as_u64())).collect();
    assert_eq!(unsafe_answers, [0, 6, 0, 6, 0, 6].map(|c| (Some(6), Some(c))), "{summary}");
    let by_rule = summary["held_out_answers_by_consecutive"].as_array().unwrap();
    let ks: Vec<_> = by_rule.iter().map(|r| r["consecutive"].as_u64().unwrap()).collect();
    assert_eq!(ks, [1, 2, 4, 8]);
    let k2 = &by_rule[1];
    assert_eq!(k2["families"]["safety"], summary["held_out_answers"]["safety"]);
    assert_eq!(k2["thresholds"][0]["response_threshold"], chosen[0]["response_threshold"]);
}

#[test]
fn gates_stop_resume_validate_and_plot_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let out = tmp.path().join("g");
    let data = data();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "train",
            "--model",
            &model,
            "--data",
            &data,
            "--mode",
            "gates",
            "--epochs",
            "2",
            "--batch",
            "4",
            "--lr",
            "0.01",
            "--freeze",
            "cmd",
            "--sites",
            "q,v,mlp",
            "--out",
            out.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let stopped = so8t(
        &args(&["--stop-after", "2"])
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    );
    let err = String::from_utf8_lossy(&stopped.stderr);
    assert!(stopped.status.success(), "{err}");
    assert!(err.contains("stopped at step 2 of 6"), "{err}");
    assert!(
        !out.join("so8t_config.json").exists(),
        "a stopped run must not look finished"
    );
    // Other options than the checkpoint's are refused.
    let mut changed = args(&["--resume"]);
    let lr = changed.iter().position(|a| a == "0.01").unwrap();
    changed[lr] = "0.02".into();
    let refused = so8t(&changed.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("other options or data"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ok(&args(&["--resume"])
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>());
    let v = so8t(&["validate", out.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // The frozen factor and the untrained sites kept their generators.
    let before = candle_core::safetensors::load(
        Path::new(&model).join("so8t_adapter.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let after = candle_core::safetensors::load(
        out.join("so8t_adapter.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let same = |k: &str| {
        before[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
            == after[k].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert!(
        same("layers.0.q.cmd.generators")
            && same("layers.1.k.safe.generators")
            && same("layers.0.o.safe.generators")
    );
    assert!(
        !same("layers.0.q.safe.generators")
            && !same("layers.1.mlp.safe.generators")
            && !same("heads.safety.weight")
    );
    let report = tmp.path().join("r");
    ok(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--data",
        &data,
        "--report",
        report.to_str().unwrap(),
    ]);
    assert!(std::fs::metadata(report.join("loss.png")).unwrap().len() > 5000);
    assert!(std::fs::read_to_string(report.join("report.md"))
        .unwrap()
        .contains("L_PET"));
}

/// sha256 of the adapter and the config together: which run's result a directory holds.
fn result_of(dir: &Path) -> Option<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for f in ["so8t_adapter.safetensors", "so8t_config.json"] {
        h.update(std::fs::read(dir.join(f)).ok()?);
    }
    Some(format!("{:x}", h.finalize()))
}

/// `kill -9` at spread-out moments of a training run leaves the target with the complete
/// old result or the complete new one, never a mix (adapter and config are swapped in
/// together) and never a directory that reads as a plain model; the rerun succeeds.
#[test]
fn killed_training_leaves_the_old_or_the_new_result() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let old = result_of(Path::new(&model)).unwrap();
    let orig = tmp.path().join("orig");
    std::fs::create_dir(&orig).unwrap();
    for f in ["so8t_adapter.safetensors", "so8t_config.json"] {
        std::fs::copy(Path::new(&model).join(f), orig.join(f)).unwrap();
    }
    let train = |dir: &str, out: Option<&Path>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_so8t"));
        c.args(["train", "--model", dir, "--data", &data(), "--mode", "heads"]);
        if let Some(o) = out {
            c.arg("--out").arg(o);
        }
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
        c
    };
    // The new result, from a finished run on a copy (training is deterministic).
    let copy = tmp.path().join("copy");
    std::fs::create_dir(&copy).unwrap();
    for e in std::fs::read_dir(&model).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), copy.join(e.file_name())).unwrap();
        }
    }
    assert!(train(copy.to_str().unwrap(), None).status().unwrap().success());
    let new = result_of(&copy).unwrap();
    assert_ne!(old, new);
    let out = tmp.path().join("out");
    let mut seed = 12345u64;
    let (mut saw_old, mut saw_new) = (0, 0);
    for _ in 0..24 {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let delay = std::time::Duration::from_micros((seed >> 33) % 150_000);
        for out in [None, Some(&out)] {
            let mut run = train(&model, out.map(|p| p.as_path())).spawn().unwrap();
            std::thread::sleep(delay);
            let _ = run.kill();
            let _ = run.wait();
        }
        let in_place = result_of(Path::new(&model));
        assert!(in_place == Some(old.clone()) || in_place == Some(new.clone()), "in place after a kill at {delay:?}: {in_place:?}");
        if in_place == Some(old.clone()) { saw_old += 1 } else { saw_new += 1 }
        // Reset, so that every round can catch the swap.
        if in_place == Some(new.clone()) {
            for f in ["so8t_adapter.safetensors", "so8t_config.json"] {
                let to = Path::new(&model).join(f);
                std::fs::remove_file(&to).unwrap();
                std::fs::copy(orig.join(f), to).unwrap();
            }
        }
        match result_of(&out) {
            None => assert!(!out.join("config.json").exists(), "a partial --out directory at {delay:?}"),
            Some(r) => assert_eq!(r, new, "--out after a kill at {delay:?}"),
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    eprintln!("kills: {saw_old} left the old result in place, {saw_new} the new");
    assert!(train(&model, None).status().unwrap().success());
    assert_eq!(result_of(Path::new(&model)), Some(new.clone()));
    assert!(train(&model, Some(&out)).status().unwrap().success());
    assert_eq!(result_of(&out), Some(new));
    let v = so8t(&["validate", out.to_str().unwrap()]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
    // Nothing of the killed runs is left beside the targets once a run has finished.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .chain(
            std::fs::read_dir(&model)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .filter(|n| n.starts_with('.')),
        )
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// `--out` naming an existing directory other than the model is replaced only with
/// `--force` (the final swap would discard it), as convert, bake and export do.
#[test]
fn train_out_replaces_an_existing_directory_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_so8t(tmp.path());
    let out = tmp.path().join("mine");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep me").unwrap();
    let (d, o) = (data(), out.to_str().unwrap().to_string());
    let run = |force: bool| {
        let mut a = vec!["train", "--model", &model, "--data", &d, "--mode", "heads", "--out", &o];
        if force {
            a.push("--force");
        }
        so8t(&a)
    };
    let refused = run(false);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("mine: already exists (use --force to replace it)"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("notes.txt")).unwrap(), "keep me");
    assert!(run(true).status.success());
    assert!(result_of(&out).is_some() && !out.join("notes.txt").exists());
    // Training in place needs no --force.
    assert!(so8t(&["train", "--model", &model, "--data", &d, "--mode", "heads", "--out", &model]).status.success());
}

/// A Phi-3 model (fused projections, LongRoPE) through every command a user runs on it:
/// convert, validate, train (heads, then gates), eval, bake, export, run on each result.
/// The numbers are checked elsewhere (tests/reference.rs, so8t_model.rs, bake.rs,
/// export.rs in the library); this checks that the commands take a phi3 model and agree
/// with each other.
#[test]
fn phi3_through_every_command() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    ok(&[
        "convert", fixtures().join("tiny-phi3").to_str().unwrap(), "--out", &p("so8t"),
        "--init", "random", "--seed", "5", "--scale", "0.2",
    ]);
    ok(&["validate", &p("so8t")]);
    ok(&["train", "--model", &p("so8t"), "--data", &data(), "--val", &data(), "--mode", "heads", "--out", &p("heads")]);
    let r: serde_json::Value =
        serde_json::from_str(&ok(&["eval", "--model", &p("heads"), "--data", &data(), "--json"])).unwrap();
    assert_eq!(r["heads"][0]["metrics"]["n"], 9);
    ok(&[
        "train", "--model", &p("heads"), "--data", &data(), "--mode", "gates", "--epochs", "1",
        "--batch", "4", "--lr", "0.01", "--out", &p("gates"),
    ]);
    ok(&["validate", &p("gates")]);
    ok(&["bake", &p("gates"), "--out", &p("baked")]);
    ok(&["export", &p("gates"), "--out", &p("gates.gguf"), "--quant", "f32"]);
    let run = |model: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&[
            "run", "--model", model, "--prompt", "What is the capital of France?", "--temperature", "0", "-n", "6", "--json",
        ]))
        .unwrap()
    };
    let (gated, baked, gguf) = (run(&p("gates")), run(&p("baked")), run(&p("gates.gguf")));
    // Phi-3's template, with the right-strip after its special tokens: <|user|>, the
    // message, <|end|>, <|assistant|>, and no newline tokens between them.
    let tokens = |v: &serde_json::Value, k: &str| -> Vec<u64> {
        v[k].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect()
    };
    let prompt = tokens(&gated, "prompt_tokens");
    assert_eq!(prompt.first(), Some(&5), "{gated}");
    assert_eq!(&prompt[prompt.len() - 2..], &[7, 6], "{gated}");
    // llama.cpp's conversion of the base runs as the base directory does.
    let (hf, converted) = (run(fixtures().join("tiny-phi3").to_str().unwrap()),
        run(fixtures().join("tiny-phi3/model-f32.gguf").to_str().unwrap()));
    assert_eq!(tokens(&hf, "prompt_tokens"), tokens(&converted, "prompt_tokens"));
    assert_eq!(tokens(&hf, "tokens"), tokens(&converted, "tokens"));
    for other in [&baked, &gguf] {
        assert_eq!(tokens(other, "prompt_tokens"), prompt);
        assert_eq!(tokens(other, "tokens"), tokens(&gated, "tokens"), "{other} vs {gated}");
        assert_eq!(other["decision"], gated["decision"]);
    }
}
