//! The real small models against llama.cpp: prompt token ids, chat-template rendering and
//! 32 greedy tokens. Fixtures: scripts/reference/llama_cpp_fixtures.py. The models are
//! fetched by scripts/fetch-models.sh into ~/.cache/so8t (or $SO8T_CACHE); a test skips,
//! saying so, only when that fetch is impossible. The rules: `common::check_against_llama_cpp`.

mod common;
use common::{check_against_llama_cpp, fixtures, real_model};
use so8t::Model;

fn check_model(which: &str) {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join(format!("llama-cpp/{which}.json"))).unwrap(),
    )
    .unwrap();
    let Some(path) = real_model(which, fixture["model"].as_str().unwrap()) else {
        return;
    };
    let mut model = Model::open(&path).unwrap();
    let n = fixture["n_tokens"].as_u64().unwrap() as usize;
    check_against_llama_cpp(which, &mut model, fixture["cases"].as_array().unwrap(), n);
}

#[test]
fn smollm2_135m_matches_llama_cpp() {
    check_model("smollm2");
}

#[test]
fn qwen25_coder_05b_matches_llama_cpp() {
    check_model("qwen25coder");
}
