//! Bad input gives one clear error line naming the file and the problem, a non-zero
//! exit, and never a panic or a huge allocation.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Runs `so8t inspect PATH` under a 1 GiB address-space limit (so an allocation sized by
/// a corrupt header fails the test instead of passing by luck) and a 60 s limit (a hang
/// exits 124, not 1); checks its one error line.
fn inspect_fails(path: &Path, expect: &[&str]) {
    let out = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576; exec timeout 60 \"$0\" inspect \"$1\"")
        .arg(env!("CARGO_BIN_EXE_so8t"))
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure for {}, got success",
        path.display()
    );
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one error line expected, got: {err}");
    for e in expect {
        assert!(err.contains(e), "stderr should contain {e:?}: {err}");
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string(&v).unwrap()).unwrap();
}

fn tiny_copy(tmp: &tempfile::TempDir) -> PathBuf {
    let d = tmp.path().join("m");
    copy_dir(&fixtures().join("tiny-qwen2"), &d);
    d
}

#[test]
fn missing_path() {
    inspect_fails(
        Path::new("/nonexistent/model.gguf"),
        &["/nonexistent/model.gguf", "no such file"],
    );
}

#[test]
fn directory_without_config() {
    let tmp = tempfile::tempdir().unwrap();
    inspect_fails(tmp.path(), &["config.json is missing"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    let f = d.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    inspect_fails(&d, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn safetensors_header_length_past_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    let f = d.join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    inspect_fails(&d, &["model.safetensors", "not a valid safetensors file"]);
}

#[test]
fn truncated_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("t.gguf");
    let bytes = std::fs::read(fixtures().join("tiny-qwen2/model-f32.gguf")).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() * 3 / 4]).unwrap();
    inspect_fails(&f, &["t.gguf", "truncated"]);
}

#[test]
fn gguf_truncated_inside_the_header() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("h.gguf");
    let bytes = std::fs::read(fixtures().join("tiny-qwen2/model-f32.gguf")).unwrap();
    std::fs::write(&f, &bytes[..2000]).unwrap();
    inspect_fails(&f, &["h.gguf", "not a valid GGUF file"]);
}

#[test]
fn gguf_counts_past_the_end() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.gguf");
    let mut bytes = std::fs::read(fixtures().join("tiny-qwen2/model-f32.gguf")).unwrap();
    // tensor_count (u64 at 8) and metadata_kv_count (u64 at 16)
    bytes[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    bytes[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&f, bytes).unwrap();
    inspect_fails(&f, &["c.gguf", "not a valid GGUF file"]);
}

/// The tiny GGUF with one more metadata entry (`key`: u32 `value`) inserted first and the
/// count raised; tensor data moves with the header, so alignment only matters as a number.
fn gguf_with_u32(key: &str, value: u32) -> Vec<u8> {
    let bytes = std::fs::read(fixtures().join("tiny-qwen2/model-f32.gguf")).unwrap();
    let n = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let mut out = bytes[..16].to_vec();
    out.extend((n + 1).to_le_bytes());
    out.extend((key.len() as u64).to_le_bytes());
    out.extend(key.as_bytes());
    out.extend(4u32.to_le_bytes());
    out.extend(value.to_le_bytes());
    out.extend(&bytes[24..]);
    out
}

/// Was a division by zero inside candle's reader under every command (issue 18); llama.cpp
/// also refuses an alignment that is not a power of two.
#[test]
fn gguf_alignment_zero_or_not_a_power_of_two() {
    let tmp = tempfile::tempdir().unwrap();
    for a in [0, 3] {
        let f = tmp.path().join(format!("a{a}.gguf"));
        std::fs::write(&f, gguf_with_u32("general.alignment", a)).unwrap();
        inspect_fails(&f, &[&format!("a{a}.gguf"), "general.alignment", "power of two"]);
    }
}

/// Last-one-wins would show different values to different tools.
#[test]
fn gguf_duplicate_metadata_key() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("dup.gguf");
    std::fs::write(&f, gguf_with_u32("qwen2.block_count", 1)).unwrap();
    inspect_fails(&f, &["dup.gguf", "`qwen2.block_count` appears twice"]);
}

#[test]
fn big_endian_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("be.gguf");
    let mut bytes = std::fs::read(fixtures().join("tiny-qwen2/model-f32.gguf")).unwrap();
    bytes[..4].copy_from_slice(b"FUGG");
    std::fs::write(&f, bytes).unwrap();
    inspect_fails(&f, &["be.gguf", "byte-swapped"]);
}

/// A FIFO blocked `open` forever and `/dev/zero` behind config.json read without end
/// (issue 18): only regular files are read.
#[test]
fn fifo_model_and_device_config() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("model.gguf");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    inspect_fails(&fifo, &["model.gguf", "not a regular file"]);
    let d = tiny_copy(&tmp);
    std::fs::remove_file(d.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", d.join("config.json")).unwrap();
    inspect_fails(&d, &["config.json", "not a regular file"]);
}

#[test]
fn not_a_gguf_file() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("x.gguf");
    std::fs::write(&f, b"this is text, not a model").unwrap();
    inspect_fails(&f, &["x.gguf", "not a valid GGUF file"]);
}

#[test]
fn unknown_model_type() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    edit_json(&d.join("config.json"), |v| {
        v["model_type"] = "gpt_neox".into()
    });
    inspect_fails(&d, &["config.json", "unsupported model_type `gpt_neox`"]);
}

#[test]
fn missing_config_field() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    edit_json(&d.join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    inspect_fails(&d, &["config.json", "missing field `hidden_size`"]);
}

#[test]
fn wrong_tensor_shape() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    edit_json(&d.join("config.json"), |v| {
        v["intermediate_size"] = 256.into()
    });
    inspect_fails(
        &d,
        &["tensor `model.layers.0.mlp.gate_proj.weight` has shape [128, 64], expected [256, 64]"],
    );
}

#[test]
fn implausible_config_size_is_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    edit_json(&d.join("config.json"), |v| {
        v["num_hidden_layers"] = 1_000_000_000u64.into()
    });
    inspect_fails(&d, &["config.json", "num_hidden_layers"]);
}

/// Zero or negative values were accepted and gave NaN logits (issue 18).
#[test]
fn config_values_that_make_nan() {
    for (field, value) in [("rope_theta", -1.0), ("rope_theta", 0.0), ("rms_norm_eps", 0.0)] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tiny_copy(&tmp);
        edit_json(&d.join("config.json"), |v| v[field] = value.into());
        inspect_fails(&d, &["config.json", field, "positive"]);
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    std::fs::write(d.join("generation_config.json"), r#"{"temperature": -1}"#).unwrap();
    inspect_fails(&d, &["generation_config.json", "temperature"]);
}

/// `run` accepts what the server accepts, by the same rule (issue 18: it took NaN).
#[test]
fn run_refuses_sampling_values_out_of_range() {
    for (flag, value) in [("--temperature", "nan"), ("--repeat-penalty", "0"), ("--top-p", "0"), ("--min-p", "1.5")] {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
            .args(["run", "--model"])
            .arg(fixtures().join("tiny-qwen2"))
            .args(["--prompt", "hi", "-n", "2", flag, value])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{flag} {value}: {err}");
        assert!(err.contains(flag) && err.contains("must be in"), "{flag} {value}: {err}");
    }
}

#[test]
fn tokenizer_larger_than_the_vocab() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tiny_copy(&tmp);
    edit_json(&d.join("tokenizer.json"), |v| {
        v["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": 5000, "content": "<|extra|>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
    });
    inspect_fails(
        &d,
        &[
            "tokenizer.json",
            "vocab_size is 448",
            "tokenizer does not match the model",
        ],
    );
}

#[test]
fn run_with_bad_prompt_ids_is_an_error_not_a_panic() {
    let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(["run", "--model"])
        .arg(fixtures().join("tiny-qwen2"))
        .args(["--prompt-ids", "1,2,999999", "-n", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert!(err.contains("outside the vocabulary"), "{err}");
}

/// `bench -p` past the context ran on past the RoPE tables (issue 18).
#[test]
fn bench_beyond_the_context() {
    let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(["bench", "--model"])
        .arg(fixtures().join("tiny-qwen2"))
        .args(["-p", "100000", "-n", "0", "-r", "1", "--no-probe"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("past the model's context of 256"), "{err}");
}

/// Generators of 1e30 are finite, so they passed `validate` (NaN compares false) and
/// `run` answered with NaN verdicts (issue 18): now every reader refuses them as damage
/// (beyond `GENERATOR_LIMIT`), naming the adapter.
#[test]
fn huge_generators_are_refused_by_validate_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("s");
    let so8t = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_so8t"))
            .args(args)
            .output()
            .unwrap()
    };
    let out = so8t(&[
        "convert",
        fixtures().join("tiny-qwen2").to_str().unwrap(),
        "--out",
        dir.to_str().unwrap(),
        "--init",
        "random",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let path = dir.join("so8t_adapter.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let name = tensors.keys().find(|k| k.ends_with("generators")).unwrap().clone();
    let huge = (tensors[&name].clone() * 1e30).unwrap();
    tensors.insert(name, huge);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let v = so8t(&["validate", dir.to_str().unwrap()]);
    assert!(!v.status.success(), "validate passed: {}", String::from_utf8_lossy(&v.stdout));
    let r = so8t(&["run", "--model", dir.to_str().unwrap(), "--prompt", "hi", "-n", "1"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert_eq!(r.status.code(), Some(1), "{err}");
    assert!(
        err.contains("so8t_adapter.safetensors")
            && err.contains("generators must be finite and within")
            && !err.contains("panicked"),
        "{err}"
    );
}
