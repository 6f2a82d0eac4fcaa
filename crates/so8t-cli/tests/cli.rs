//! The CLI contract later work relies on: `run --json` fields, `inspect --json`.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn so8t(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_so8t")).args(args).output().unwrap();
    assert!(out.status.success(), "so8t {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn run_json_has_the_contract_fields_and_matches_transformers_greedy() {
    let dir = fixtures().join("tiny-qwen2");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let prompt: Vec<u32> = serde_json::from_value(expected["inputs"][1].clone()).unwrap();
    let greedy: Vec<u32> = serde_json::from_value(expected["greedy"][1].clone()).unwrap();
    let ids = prompt.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let v = so8t(&["run", "--model", dir.to_str().unwrap(), "--prompt-ids", &ids, "--temperature", "0", "-n", "8", "--json"]);
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
        assert_eq!(alts[0]["id"].as_u64().unwrap() as u32, *t, "greedy token is the most likely");
        assert!(alts[0]["logprob"].as_f64().unwrap() <= 0.0);
    }
    assert!(v["text"].is_string());
    assert!(["stop", "length"].contains(&v["finish_reason"].as_str().unwrap()));
}

#[test]
fn run_applies_the_chat_template_unless_raw() {
    let dir = fixtures().join("tiny-qwen3");
    let chat = so8t(&["run", "-m", dir.to_str().unwrap(), "-p", "Hello", "--temperature", "0", "-n", "1", "--json"]);
    let raw = so8t(&["run", "-m", dir.to_str().unwrap(), "-p", "Hello", "--raw", "--temperature", "0", "-n", "1", "--json"]);
    let chat_ids = chat["prompt_tokens"].as_array().unwrap();
    let raw_ids = raw["prompt_tokens"].as_array().unwrap();
    assert!(chat_ids.len() > raw_ids.len() + 4, "template adds role markers: {chat_ids:?} vs {raw_ids:?}");
}

#[test]
fn inspect_json_describes_the_model() {
    let v = so8t(&["inspect", fixtures().join("tiny-qwen3/model-q8_0.gguf").to_str().unwrap(), "--json"]);
    assert_eq!(v["architecture"], "qwen3");
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["config"]["head_dim"], 32);
    assert_eq!(v["config"]["qk_norm"], true);
    assert!(v["tensor_types"]["Q8_0"].as_u64().unwrap() > 0);
    assert_eq!(v["tokenizer"]["chat_template"], true);
}
