//! Qwen3's chat template (with its `<think>` handling) rendered by minijinja exactly as
//! transformers renders it, and tokenised exactly as the tokenizers library does.
//! Fixture: scripts/reference/qwen3_template_fixtures.py.

mod common;
use so8t::chat::{ChatTemplate, Message};
use so8t::tokenizer::TextTokenizer;

#[test]
fn qwen3_template_and_tokenizer_match_transformers() {
    let Some(tj) = common::real_model("qwen3tok", "qwen3-tokenizer/tokenizer.json") else {
        return;
    };
    let tok = TextTokenizer::from_hf_dir(tj.parent().unwrap(), &[]).unwrap();
    let tmpl = ChatTemplate::new(
        tok.chat_template.as_ref().unwrap(),
        &tok.bos_text,
        &tok.eos_text,
    )
    .unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("qwen3-template/expected.json")).unwrap(),
    )
    .unwrap();
    for c in cases {
        let msgs: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
        let text = tmpl
            .render(&msgs, c["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(text, c["rendered"].as_str().unwrap());
        let ids: Vec<u32> = serde_json::from_value(c["ids"].clone()).unwrap();
        assert_eq!(tok.encode(&text, false).unwrap(), ids);
    }
    assert!(tok
        .eog
        .contains(&tok.inner.token_to_id("<|im_end|>").unwrap()));
}
