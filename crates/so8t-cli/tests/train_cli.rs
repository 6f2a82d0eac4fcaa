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
    let r: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        trained.to_str().unwrap(),
        "--data",
        &data(),
        "--json",
        "--report",
        report.to_str().unwrap(),
    ]))
    .unwrap();
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
