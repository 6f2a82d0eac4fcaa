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

/// The venv's python, or None with the SKIPPED reason printed.
fn torch_python() -> Option<String> {
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
    for what in ["tiny-qwen2: so8t convert --init random", "tiny-phi3: so8t convert --init random", "trained adapter: so8t validate passes", "trained adapter:"] {
        assert!(out.contains(what), "{what} missing from:\n{out}");
    }
    let out = run_python(
        Command::new(&python)
            .args(["-m", "torch.distributed.run", "--nproc_per_node", "2"])
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
