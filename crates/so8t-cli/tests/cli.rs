//! The CLI contract later work relies on: `run --json` fields, `inspect --json`.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn so8t(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "so8t {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_json_has_the_contract_fields_and_matches_transformers_greedy() {
    let dir = fixtures().join("tiny-qwen2");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(expected["inputs"][1].clone()).unwrap();
    let greedy: Vec<u32> = serde_json::from_value(expected["greedy"][1].clone()).unwrap();
    let ids = prompt
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let v = so8t(&[
        "run",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &ids,
        "--temperature",
        "0",
        "-n",
        "8",
        "--json",
    ]);
    assert_eq!(v["prompt_tokens"], serde_json::json!(prompt));
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    // generation stops at the end-of-turn token; up to there it is transformers' greedy path
    assert!(!tokens.is_empty());
    assert_eq!(tokens[..], greedy[..tokens.len()]);
    let top = v["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), tokens.len());
    for (step, t) in top.iter().zip(&tokens) {
        let alts = step.as_array().unwrap();
        assert_eq!(alts.len(), 5);
        assert_eq!(
            alts[0]["id"].as_u64().unwrap() as u32,
            *t,
            "greedy token is the most likely"
        );
        assert!(alts[0]["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert!(v["text"].is_string());
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));
}

#[test]
fn run_applies_the_chat_template_unless_raw() {
    let dir = fixtures().join("tiny-qwen3");
    let chat = so8t(&[
        "run",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "Hello",
        "--temperature",
        "0",
        "-n",
        "1",
        "--json",
    ]);
    let raw = so8t(&[
        "run",
        "-m",
        dir.to_str().unwrap(),
        "-p",
        "Hello",
        "--raw",
        "--temperature",
        "0",
        "-n",
        "1",
        "--json",
    ]);
    let chat_ids = chat["prompt_tokens"].as_array().unwrap();
    let raw_ids = raw["prompt_tokens"].as_array().unwrap();
    assert!(
        chat_ids.len() > raw_ids.len() + 4,
        "template adds role markers: {chat_ids:?} vs {raw_ids:?}"
    );
}

/// `bench -d` names its tests as llama-bench does (`tg2 @ d5`) and reports each depth.
#[test]
fn bench_reports_each_depth_as_llama_bench_names_it() {
    let m = fixtures().join("tiny-qwen3/model-q8_0.gguf");
    let v = so8t(&[
        "bench", "-m", m.to_str().unwrap(), "-p", "3", "-n", "2", "-d", "0,5", "-r", "1", "--json", "--no-probe",
    ]);
    let tests = v["tests"].as_array().unwrap();
    let names: Vec<&str> = tests.iter().map(|t| t["test"].as_str().unwrap()).collect();
    assert_eq!(names, ["pp3", "tg2", "pp3 @ d5", "tg2 @ d5"]);
    let depths: Vec<u64> = tests.iter().map(|t| t["n_depth"].as_u64().unwrap()).collect();
    assert_eq!(depths, [0, 0, 5, 5]);
    for t in tests {
        let ts = t["avg_ts"].as_f64().unwrap();
        assert!(ts.is_finite() && ts > 0.0, "{t}");
    }
}

#[test]
fn inspect_json_describes_the_model() {
    let v = so8t(&[
        "inspect",
        fixtures()
            .join("tiny-qwen3/model-q8_0.gguf")
            .to_str()
            .unwrap(),
        "--json",
    ]);
    assert_eq!(v["architecture"], "qwen3");
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["config"]["head_dim"], 32);
    assert_eq!(v["config"]["qk_norm"], true);
    assert!(v["tensor_types"]["Q8_0"].as_u64().unwrap() > 0);
    assert_eq!(v["tokenizer"]["chat_template"], true);
}

#[test]
fn convert_validate_and_run_an_so8t_model() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("s");
    let bin = env!("CARGO_BIN_EXE_so8t");
    let st = Command::new(bin)
        .args([
            "convert",
            fixtures().join("tiny-llama").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .args(["--init", "random", "--seed", "5", "--scale", "0.2"])
        .status()
        .unwrap();
    assert!(st.success());
    let v = so8t(&["validate", out.to_str().unwrap(), "--json"]);
    assert_eq!(v["ok"], true, "{v}");
    let names: Vec<&str> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for want in [
        "base_finite",
        "base_checksum",
        "adapter_shapes",
        "orthogonality",
        "determinant",
        "triality",
        "heads",
    ] {
        assert!(names.contains(&want), "{want} in {names:?}");
    }

    let r = so8t(&[
        "run",
        "-m",
        out.to_str().unwrap(),
        "-p",
        "Hello",
        "--temperature",
        "0",
        "-n",
        "3",
        "--json",
    ]);
    let n = r["tokens"].as_array().unwrap().len();
    assert_eq!(
        r["verdicts"].as_array().unwrap().len(),
        n,
        "one verdict per generated token"
    );
    let p = r["prompt_verdict"]["p_unsafe"].as_f64().unwrap();
    assert!((p - 0.5).abs() < 1e-6, "untrained heads give p = 0.5");
    assert_eq!(r["heads_trained"], false);
    assert!(r["decision"].is_null(), "untrained heads decide nothing");

    // a changed base: validate fails, names the check, exits non-zero
    std::fs::write(
        out.join("config.json"),
        std::fs::read_to_string(out.join("config.json")).unwrap() + " ",
    )
    .unwrap();
    let o = Command::new(bin)
        .args(["validate", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("failed check(s): base_checksum"));
    assert!(String::from_utf8_lossy(&o.stdout).contains("FAIL base_checksum"));
}

#[test]
fn stop_strings_end_generation_before_them() {
    let m = fixtures().join("tiny-llama");
    let ids = "57,74,261,316";
    let free = so8t(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--prompt-ids",
        ids,
        "--temperature",
        "0",
        "-n",
        "12",
        "--json",
    ]);
    let text = free["text"].as_str().unwrap().to_string();
    // a stop string taken from the middle of the free-running output
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 6, "need some output to cut: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = so8t(&[
        "run",
        "-m",
        m.to_str().unwrap(),
        "--prompt-ids",
        ids,
        "--temperature",
        "0",
        "-n",
        "12",
        "--stop",
        &stop,
        "--json",
    ]);
    let got = cut["text"].as_str().unwrap();
    assert_eq!(cut["finish_reason"], "stop");
    assert_eq!(
        got,
        &text[..text.find(&stop).unwrap()],
        "text ends right before the stop string {stop:?}"
    );
}

/// A killed export leaves no file at the target name (the file is written under a
/// temporary name and renamed when complete).
#[test]
fn killed_export_leaves_no_file_at_the_target() {
    let cache = std::env::var_os("SO8T_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/so8t"));
    let model = cache.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        let script =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-models.sh");
        let ok = Command::new("bash")
            .arg(script)
            .arg("smollm2")
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok || !model.exists() {
            eprintln!("SKIPPED: SmolLM2 could not be fetched");
            return;
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args([
            "export",
            model.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--quant",
            "q4_k",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // wait until the temporary file exists, then kill mid-write
    let t0 = std::time::Instant::now();
    while !std::fs::read_dir(tmp.path()).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(".m.gguf.tmp")
    }) && t0.elapsed().as_secs() < 30
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "export finished before it could be killed"
    );
    assert!(
        !out.exists(),
        "a killed export must not leave a file at the target name"
    );
}

/// A write that fails part-way (as on a full disk: here a file-size limit, `ulimit -f`,
/// with SIGXFSZ ignored so that the write returns EFBIG) gives one clear error, exit 1,
/// and nothing at the target name: no partial file, no staging leftovers.
#[test]
fn failed_writes_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_so8t");
    let s = tmp.path().join("s");
    assert!(Command::new(bin)
        .args([
            "convert",
            fixtures().join("tiny-qwen3").to_str().unwrap(),
            "--out",
            s.to_str().unwrap()
        ])
        .status()
        .unwrap()
        .success());
    for (what, args) in [
        (
            "export",
            vec![
                "export",
                s.to_str().unwrap(),
                "--out",
                "m.gguf",
                "--quant",
                "f32",
            ],
        ),
        ("bake", vec!["bake", s.to_str().unwrap(), "--out", "baked"]),
    ] {
        let out = Command::new("sh")
            .current_dir(tmp.path())
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 100; exec \"$@\"")
            .arg("sh")
            .arg(bin)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.starts_with("error: ") && !err.contains("panicked"),
            "{what}: {err}"
        );
        assert!(
            err.contains("File too large") && !err.contains(".tmp"),
            "{what}: the error names the target and the cause: {err}"
        );
        assert_eq!(
            err.matches("os error").count(),
            1,
            "{what}: the cause once: {err}"
        );
        let left: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n != "s")
            .collect();
        assert!(left.is_empty(), "{what}: left behind {left:?} ({err})");
    }
}

/// `export --format peft-oft` and `convert --from-peft` from the command line: the round
/// trip generates what the SO8T model generates (the numbers against PEFT itself are in
/// crates/so8t/tests/peft.rs), the output says where the q/k gates went, and options that
/// make no sense with an import are refused before anything is written.
#[test]
fn peft_oft_export_and_import_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |n: &str| tmp.path().join(n).to_str().unwrap().to_string();
    let base = fixtures().join("tiny-qwen2");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t")).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (ok, _, err) = run(&["convert", base.to_str().unwrap(), "--out", &p("so8t"), "--sites", "k,v,o,mlp", "--init", "random", "--seed", "4", "--scale", "0.2"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run(&["export", &p("so8t"), "--format", "peft-oft", "--out", &p("peft")]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), p("peft"));
    assert!(err.contains("gate_proj, o_proj, up_proj") && err.contains("q/k gates baked in"), "{err}");
    let (ok, _, err) = run(&["convert", &p("peft/base"), "--from-peft", &p("peft"), "--out", &p("back")]);
    assert!(ok, "{err}");
    let tokens = |m: &str| so8t(&["run", "--model", m, "--prompt-ids", "3,17,42,5", "-n", "8", "--temperature", "0", "--json"])["tokens"].clone();
    assert_eq!(tokens(&p("so8t")).as_array().map(|t| t.len()), Some(8));
    assert_eq!(tokens(&p("so8t")), tokens(&p("back")));
    let (ok, _, err) = run(&["convert", base.to_str().unwrap(), "--from-peft", &p("peft"), "--sites", "o", "--out", &p("x")]);
    assert!(!ok && err.contains("--sites"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

/// `--device` (and `--dtype`) on every command that runs the decoder: a bad name, or a GPU this build or
/// this machine lacks, is one error line and exit 1 before any model is read (the model
/// path here does not exist). A build with `--features cuda` on a machine without a GPU
/// (CI runs that build against link stubs that answer "no device") gives the driver's
/// answer in that line; `cuda:7` is a GPU no machine here has.
#[test]
fn device_flag_names_a_bad_or_missing_device_in_one_line() {
    let no_gpu = if cfg!(feature = "cuda") {
        "--device cuda:7: cannot open the GPU"
    } else {
        "--device cuda:7: this so8t was built without CUDA"
    };
    let m = "/nonexistent/model.gguf";
    let cases: [(&[&str], &str); 7] = [
        (&["run", "-m", m, "--prompt-ids", "1", "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
        (&["run", "-m", m, "--prompt-ids", "1", "--dtype", "bf16"], "--dtype bf16: expected auto or f32"),
        (&["run", "-m", m, "--prompt-ids", "1", "--device", "cuda:7"], no_gpu),
        (&["bench", "-m", m, "--device", "cuda:7"], no_gpu),
        (&["eval", "-m", m, "--data", m, "--device", "cuda:7"], no_gpu),
        (&["train", "-m", m, "--data", m, "--mode", "heads", "--device", "cuda:7"], no_gpu),
        (&["serve", "-m", m, "--port", "0", "--device", "cuda:7"], no_gpu),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t")).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line expected: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// `export --calibrate ROWS` writes the thresholds it reports into the file's SO8T
/// metadata, leaves nothing beside the target, and is refused for other formats.
#[test]
fn calibrated_export_carries_the_thresholds_it_reports() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("so8t");
    let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(["convert", fixtures().join("tiny-qwen3").to_str().unwrap(), "--out", model.to_str().unwrap()])
        .args(["--init", "random", "--scale", "0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let gguf = dir.path().join("out").join("m.gguf");
    std::fs::create_dir(gguf.parent().unwrap()).unwrap();
    let rows = fixtures().join("train/tiny.jsonl");
    let export = |format: &str| {
        Command::new(env!("CARGO_BIN_EXE_so8t"))
            .args(["export", model.to_str().unwrap(), "--out", gguf.to_str().unwrap(), "--quant", "q4_0"])
            .args(["--format", format, "--calibrate", rows.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let refused = export("vllm");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--calibrate"));
    let done = export("gguf");
    let said = String::from_utf8_lossy(&done.stderr);
    assert!(done.status.success(), "{said}");
    // "  prompt_unsafe    0.5000 -> 0.4987 (…)": the calibrated value of each threshold
    let reported: std::collections::HashMap<String, f32> = said
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (name, _, arrow, to) = (w.next()?, w.next()?, w.next()?, w.next()?);
            (arrow == "->").then(|| (name.to_string(), to.parse().unwrap()))
        })
        .collect();
    assert_eq!(reported.len(), 4, "{said}");
    let m = so8t::Model::open(&gguf).unwrap();
    let t = &m.so8t.as_ref().unwrap().config.thresholds;
    let (p, r) = (t.prompt(), t.response());
    for (name, v) in [("prompt_unsafe", p[0]), ("prompt_escalate", p[1]), ("answer_unsafe", r[0]), ("answer_escalate", r[1])] {
        assert!((reported[name] - v).abs() <= 5e-5, "{name}: reported {} but the file has {v}", reported[name]);
    }
    let left: Vec<_> = std::fs::read_dir(gguf.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("m.gguf")]);
}

/// `run --image` on the tiny Qwen2-VL (scripts/reference/qwen2vl_fixtures.py): the chat
/// template places the image, its placeholder is expanded to the image's merged patches,
/// and the greedy tokens are transformers' generate() for the same prompt; with two
/// images the prompt and tokens are those of the fixture's two-image case. The ids of the
/// one-image case given as --prompt-ids (placeholders expanded) give the same tokens.
#[test]
fn run_with_images_matches_transformers_generate() {
    let dir = fixtures().join("tiny-qwen2vl");
    let images = fixtures().join("qwen2vl-images");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let one = &expected["prompts"][1];
    let want: Vec<u32> = serde_json::from_value(one["greedy"].clone()).unwrap();
    let a = images.join("a.png");
    let v = so8t(&[
        "run", "--model", dir.to_str().unwrap(), "--image", a.to_str().unwrap(),
        "--prompt", "What is in this picture?", "-n", "12", "--temperature", "0", "--json",
    ]);
    assert_eq!(v["prompt_tokens"], one["ids"]);
    assert_eq!(serde_json::from_value::<Vec<u32>>(v["tokens"].clone()).unwrap(), want);
    let ids: Vec<String> = one["ids"].as_array().unwrap().iter().map(|i| i.to_string()).collect();
    let v = so8t(&[
        "run", "--model", dir.to_str().unwrap(), "--image", a.to_str().unwrap(),
        "--prompt-ids", &ids.join(","), "-n", "12", "--temperature", "0", "--json",
    ]);
    assert_eq!(serde_json::from_value::<Vec<u32>>(v["tokens"].clone()).unwrap(), want);

    // The two-image case's text is "Compare", c, "and", b, "briefly.": with the raw prompt
    // the placeholders come from the text itself.
    let two = &expected["prompts"][2];
    let (c, b) = (images.join("c.png"), images.join("b.png"));
    let v = so8t(&[
        "run", "--model", dir.to_str().unwrap(), "--raw", "--prompt", two["text"].as_str().unwrap(),
        "--image", c.to_str().unwrap(), "--image", b.to_str().unwrap(),
        "-n", "12", "--temperature", "0", "--json",
    ]);
    assert_eq!(v["prompt_tokens"], two["ids"]);
    assert_eq!(v["tokens"], two["greedy"]);
}

/// Images that cannot be used fail in one line that names the file or the model, exit 1.
#[test]
fn run_refuses_bad_images_in_one_line() {
    let dir = fixtures().join("tiny-qwen2vl");
    let a = fixtures().join("qwen2vl-images/a.png");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("notes.png");
    std::fs::write(&text, "not an image").unwrap();
    // A PNG header claiming 100000×100000 pixels (the decoder must not allocate for it).
    let huge = tmp.path().join("huge.png");
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0d".to_vec();
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    // An empty IDAT: the header is all the decoder may read.
    png.extend_from_slice(&[0, 0, 0, 0]);
    png.extend_from_slice(b"IDAT");
    png.extend_from_slice(&crc32(b"IDAT").to_be_bytes());
    std::fs::write(&huge, &png).unwrap();
    let qwen2 = fixtures().join("tiny-qwen2");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", dir.to_str().unwrap(), "--image", text.to_str().unwrap(), "-p", "x"], "not a PNG or JPEG image"),
        (vec!["--model", dir.to_str().unwrap(), "--image", huge.to_str().unwrap(), "-p", "x"], "limit"),
        (vec!["--model", qwen2.to_str().unwrap(), "--image", a.to_str().unwrap(), "-p", "x"], "takes no images"),
        (vec!["--model", dir.to_str().unwrap(), "--image", a.to_str().unwrap(), "--prompt-ids", "1,5,5,2"], "placeholder tokens"),
        (vec!["--model", dir.to_str().unwrap(), "--image", a.to_str().unwrap(), "--raw", "-p", "no placeholder"], "image placeholders"),
    ];
    for (args, want) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t")).arg("run").args(&args).args(["-n", "2"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(want) && err.trim().lines().count() == 1, "{args:?}: {err}");
    }
}

/// PNG's chunk checksum (CRC-32, ISO 3309).
fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

/// A Qwen2-VL export runs images with its projector beside it (found by llama.cpp's name,
/// `mmproj-NAME.gguf`) or given with --mmproj, answering as the HF directory does; without
/// one, or with a projector given to a directory, the error says what to do.
#[test]
fn run_takes_a_gguf_with_its_projector() {
    let dir = fixtures().join("tiny-qwen2vl");
    let image = fixtures().join("qwen2vl-images/e.png");
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("tiny.gguf");
    let out = Command::new(env!("CARGO_BIN_EXE_so8t"))
        .args(["export", dir.to_str().unwrap(), "--out", text.to_str().unwrap(), "--quant", "f32"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer = |model: &std::path::Path, extra: &[&str]| {
        let mut args = vec!["run", "--model", model.to_str().unwrap(), "--image", image.to_str().unwrap()];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--prompt", "What is in this picture?", "-n", "8", "--temperature", "0", "--json"]);
        so8t(&args)["tokens"].clone()
    };
    let want = answer(&dir, &[]);
    assert_eq!(answer(&text, &[]), want);
    let moved = tmp.path().join("projector.gguf");
    std::fs::rename(tmp.path().join("mmproj-tiny.gguf"), &moved).unwrap();
    assert_eq!(answer(&text, &["--mmproj", moved.to_str().unwrap()]), want);
    for (args, words) in [
        (vec!["--model", text.to_str().unwrap(), "--image", image.to_str().unwrap()], "give --mmproj FILE, or put mmproj-tiny.gguf beside"),
        (vec!["--model", dir.to_str().unwrap(), "--mmproj", moved.to_str().unwrap()], "a projector file goes with a qwen2vl GGUF"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_so8t")).arg("run").args(&args).args(["-p", "x", "-n", "2"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(words), "{args:?}: {err}");
    }
}
