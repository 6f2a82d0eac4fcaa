//! The real small models against llama.cpp: prompt token ids, chat-template rendering and
//! 32 greedy tokens. Fixtures: scripts/reference/llama_cpp_fixtures.py. The models are
//! fetched by scripts/fetch-models.sh into ~/.cache/so8t (or $SO8T_CACHE); a test skips,
//! saying so, only when that fetch is impossible.

mod common;
use common::real_model;
use so8t::chat::{ChatTemplate, Message};
use so8t::sampling::{argmax, top_logprobs};
use so8t::Model;
use std::path::PathBuf;

/// How the greedy paths of two runs compare: steps identical before they part, and the
/// top-2 logprob gaps of both at the step where they part.
struct Parting {
    same: usize,
    at: Option<(f32, f32)>,
}

fn compare(a_ids: &[u32], a_gaps: &[f32], b: &[serde_json::Value]) -> Parting {
    let b_ids: Vec<u32> = b.iter().map(|s| s["id"].as_u64().unwrap() as u32).collect();
    let same = a_ids.iter().zip(&b_ids).take_while(|(x, y)| x == y).count();
    let at = (same < a_ids.len().min(b_ids.len())).then(|| (a_gaps[same], gap(&b[same])));
    Parting { same, at }
}

fn gap(step: &serde_json::Value) -> f32 {
    let t = step["top"].as_array().unwrap();
    (t[0][1].as_f64().unwrap() - t[1][1].as_f64().unwrap()) as f32
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn check_model(which: &str) {
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join(format!("fixtures/llama-cpp/{which}.json"))).unwrap()).unwrap();
    let Some(path) = real_model(which, fixture["model"].as_str().unwrap()) else { return };
    let mut model = Model::open(&path).unwrap();
    let eog = model.eog_ids();
    let n_tokens = fixture["n_tokens"].as_u64().unwrap() as usize;
    let (mut ours_default, mut ours_precise, mut self_agree, mut steps_total) = (0, 0, 0, 0);
    let mut llama_tie = 0.02f32;
    let mut gap_spread = 0f32;
    let mut partings = Vec::new();
    for case in fixture["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let chat = case["chat"].as_bool().unwrap();
        let tok = model.tokenizer().unwrap();
        let ids = if chat {
            let t = ChatTemplate::new(tok.chat_template.as_ref().unwrap(), &tok.bos_text, &tok.eos_text).unwrap();
            let rendered = t.render(&[Message::new("user", prompt)], true).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{which}: chat template rendering of {prompt:?}");
            tok.encode(&rendered, false).unwrap()
        } else {
            tok.encode(prompt, true).unwrap()
        };
        let want_ids: Vec<u32> = serde_json::from_value(case["prompt_tokens"].clone()).unwrap();
        assert_eq!(ids, want_ids, "{which}: prompt token ids for {prompt:?} (chat={chat})");

        let (mut got, mut gaps) = (Vec::new(), Vec::new());
        model.decoder.clear_cache();
        let mut h = model.decoder.forward_hidden(&ids, 0).unwrap();
        while got.len() < n_tokens {
            let last = h.get(h.dim(0).unwrap() - 1).unwrap().unsqueeze(0).unwrap();
            let logits = model.decoder.logits(&last).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let top = top_logprobs(&logits, 2);
            let t = argmax(&logits);
            got.push(t);
            gaps.push(top[0].1 - top[1].1);
            if eog.contains(&t) {
                break;
            }
            h = model.decoder.forward_hidden(&[t], ids.len() + got.len() - 1).unwrap();
        }
        let (default, precise) = (case["steps"].as_array().unwrap(), case["steps_precise"].as_array().unwrap());
        let d = compare(&got, &gaps, default);
        let p = compare(&got, &gaps, precise);
        let ll_ids: Vec<u32> = default.iter().map(|s| s["id"].as_u64().unwrap() as u32).collect();
        let ll_gaps: Vec<f32> = default.iter().map(gap).collect();
        let own = compare(&ll_ids, &ll_gaps, precise);
        for k in 0..own.same {
            gap_spread = gap_spread.max((ll_gaps[k] - gap(&precise[k])).abs());
        }
        if let Some((g1, g2)) = own.at {
            llama_tie = llama_tie.max(g1).max(g2);
        }
        ours_default += d.same;
        ours_precise += p.same;
        self_agree += own.same;
        steps_total += default.len();
        partings.push((format!("{prompt:?} (chat={chat})"), d, p, own));
    }
    eprintln!(
        "{which}: identical greedy steps over {steps_total}: so8t–llama.cpp {ours_default} (default) / {ours_precise} (f32 KV, no FA); \
         llama.cpp default–f32 KV {self_agree}; near-tie bound {llama_tie:.4}; llama.cpp's own gap spread {gap_spread:.4}"
    );
    for (case, d, p, own) in &partings {
        eprintln!(
            "{which}: {case}: so8t parts from llama.cpp at {} / {} (gaps {:?} / {:?}); llama.cpp from itself at {} (gaps {:?})",
            d.same, p.same, d.at, p.at, own.same, own.at
        );
        if let (Some((ours, t1)), Some((_, t2))) = (d.at, p.at) {
            assert!(
                ours.min(t1).min(t2) < llama_tie,
                "{which}: {case}: so8t parts from llama.cpp outside a near-tie (gaps so8t {ours:.4}, llama.cpp {t1:.4} / {t2:.4}; \
                 near-tie bound {llama_tie:.4})"
            );
        }
    }
}

#[test]
fn smollm2_135m_matches_llama_cpp() {
    check_model("smollm2");
}

#[test]
fn qwen25_coder_05b_matches_llama_cpp() {
    check_model("qwen25coder");
}
