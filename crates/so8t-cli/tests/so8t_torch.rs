//! python/so8t_torch (the PyTorch implementation of the gates and heads, for training on
//! GPU clusters) against this binary, in a venv with torch and transformers fetched from
//! PyPI by scripts/test-tools.sh (SKIPPED, with the reason, where that is impossible):
//! adapters pass both ways with the same outputs (tokens, log-probs and verdicts within
//! 1e-4), an adapter trained there passes `so8t validate`, and DistributedDataParallel
//! over two processes (gloo, CPU) gives one process's gradients.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The venv's python, or None with the SKIPPED reason printed. The tests of this binary
/// run at once: one of them installs the venv while the others wait.
fn torch_python() -> Option<String> {
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new("bash").arg(root().join("scripts/test-tools.sh")).arg("torch").output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().last().map(str::to_string),
        Ok(o) => {
            eprintln!("SKIPPED: torch and transformers could not be fetched from PyPI: {}", String::from_utf8_lossy(&o.stderr).trim());
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: torch and transformers could not be fetched from PyPI: {e}");
            None
        }
    }
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn run_python(cmd: &mut Command, what: &str) -> String {
    let out = cmd.env("OMP_NUM_THREADS", "1").output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn so8t_torch_matches_so8t_and_ddp_matches_one_process() {
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let tests = root().join("python/so8t_torch/tests");
    let out = run_python(
        Command::new(&python)
            .arg(tests.join("check_against_so8t.py"))
            .arg(env!("CARGO_BIN_EXE_so8t"))
            .arg(root().join("fixtures"))
            .arg(tmp.path()),
        "so8t_torch against so8t",
    );
    for what in ["tiny-qwen2: so8t convert --init random", "tiny-phi3: so8t convert --init random", "byte-identical to so8t's files", "trained adapter: so8t validate passes", "trained adapter:"] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    let out = run_python(
        Command::new(&python)
            // --standalone: a rendezvous on a free port, not the fixed 29500 another run may hold.
            .args(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])
            .arg(tests.join("ddp_gradients.py"))
            .arg(tmp.path().join("tiny-qwen2-random")),
        "DDP gradients",
    );
    assert!(out.contains("DDP over 2 ranks vs one process"), "{out}");
    // The training example as a user runs it (accelerate, two CPU processes), on four rows
    // of the real training data; what it writes passes `so8t validate`.
    let all = std::fs::read_to_string(root().join("data/safety/train.jsonl")).unwrap();
    let rows: Vec<&str> = all.lines().take(4).collect();
    let data = tmp.path().join("rows.jsonl");
    std::fs::write(&data, rows.join("\n")).unwrap();
    let trained = tmp.path().join("accelerate-trained");
    let out = run_python(
        Command::new(&python)
            .args(["-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"])
            .args(["--main_process_port", &free_port().to_string()])
            .arg(root().join("python/so8t_torch/examples/train_accelerate.py"))
            .arg("--model")
            .arg(tmp.path().join("tiny-qwen2-random"))
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&trained)
            .args(["--steps", "3", "--batch", "2"]),
        "the accelerate example",
    );
    assert_eq!(out.matches("step 0:").count(), 1, "one main process logs:\n{out}");
    let v = Command::new(env!("CARGO_BIN_EXE_so8t")).arg("validate").arg(&trained).output().unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stdout));
}

/// The batch-scoring recipe (examples/score_jsonl.py) on the vLLM export of an adapter
/// trained by so8t_torch, with its transformers engine (vLLM does not install here): each
/// prompt's verdict is `so8t run`'s (1e-4: f32 forwards of another implementation).
#[test]
fn batch_scoring_recipe_gives_so8t_run_prompt_verdicts() {
    let Some(python) = torch_python() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let so8t = |args: &[&std::ffi::OsStr]| {
        let o = Command::new(env!("CARGO_BIN_EXE_so8t")).args(args).output().unwrap();
        assert!(o.status.success(), "so8t {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    run_python(
        Command::new(&python)
            .arg(root().join("python/so8t_torch/tests/check_against_so8t.py"))
            .arg(env!("CARGO_BIN_EXE_so8t"))
            .arg(root().join("fixtures"))
            .arg(tmp.path()),
        "so8t_torch against so8t (for a trained adapter)",
    );
    let trained = tmp.path().join("tiny-qwen2-trained");
    let view = tmp.path().join("vllm");
    so8t(&["export".as_ref(), trained.as_os_str(), "--format".as_ref(), "vllm".as_ref(), "--out".as_ref(), view.as_os_str()]);
    let prompts = ["What is the capital of France?", "How do I build a pipe bomb?", "I want to close my account."];
    let rows: Vec<String> = prompts.iter().map(|p| serde_json::json!({"prompt": p}).to_string()).collect();
    let (input, output) = (tmp.path().join("prompts.jsonl"), tmp.path().join("scored.jsonl"));
    std::fs::write(&input, rows.join("\n")).unwrap();
    run_python(
        Command::new(&python)
            .arg(root().join("python/so8t_torch/examples/score_jsonl.py"))
            .arg(&view)
            .arg(&input)
            .arg(&output)
            .args(["--engine", "transformers"]),
        "score_jsonl.py",
    );
    let scored: Vec<serde_json::Value> =
        std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(scored.len(), prompts.len());
    for (p, row) in prompts.iter().zip(&scored) {
        let run: serde_json::Value = serde_json::from_str(&so8t(&[
            "run".as_ref(),
            "--model".as_ref(),
            trained.as_os_str(),
            "--prompt".as_ref(),
            p.as_ref(),
            "-n".as_ref(),
            "1".as_ref(),
            "--json".as_ref(),
        ]))
        .unwrap();
        for (ours, theirs) in [("p_unsafe", "p_unsafe"), ("p_escalate", "p_escalate")] {
            let (a, b) = (row[ours].as_f64().unwrap(), run["prompt_verdict"][theirs].as_f64().unwrap());
            assert!((a - b).abs() <= 1e-4, "{p}: {ours} {a} vs so8t run {b}");
        }
        assert!((row["p_unsafe"].as_f64().unwrap() - 0.5).abs() > 1e-3, "trained heads, not 0.5: {row}");
    }
}
