//! Entry points for fuzzing: one per parser of untrusted bytes. Each takes arbitrary
//! bytes and must return, whatever they are, without panicking, hanging or allocating
//! more than the bytes justify; errors are the expected outcome. `fuzz/` runs them under
//! libFuzzer (`cargo fuzz`, FUZZING.md), and the test suite replays the corpora and a
//! bounded number of mutations through them.

use crate::chat::{ChatTemplate, Message};
use crate::formats::gguf::GgufFile;
use crate::artifact::adapter::{Labels, So8tConfig};
use crate::tokenizer::TextTokenizer;
use std::path::Path;

const NAME: &str = "fuzz-input";

/// A short conversation every tokenizer target renders and encodes.
fn conversation() -> Vec<Message> {
    vec![
        Message::new("system", "Be brief."),
        Message::new("user", "Hello <|im_end|> there"),
    ]
}

/// Splits `bytes` at the first NUL: (before, after).
fn split(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, &[]),
    }
}

/// A GGUF file: header and tensor table, the model config from its metadata, its
/// tokenizer (and chat template, rendered and encoded), and SO8T heads in metadata.
pub fn gguf(bytes: &[u8]) {
    let Ok(g) = GgufFile::from_vec(Path::new(NAME), bytes.to_vec()) else {
        return;
    };
    let Ok(config) = g.config() else { return };
    let _ = crate::artifact::export::read_gguf_heads(&g, &config);
    if let Ok(tok) = TextTokenizer::from_gguf(&g)
        .and_then(|t| t.for_model(config.vocab_size, config.max_position_embeddings, Path::new(NAME)))
    {
        let _ = tok.chat_prompt(&conversation());
    }
}

/// A safetensors file: header, tensor table and every tensor read as f32.
pub fn safetensors(bytes: &[u8]) {
    let path = Path::new(NAME);
    let Ok(store) = crate::formats::safetensors::SafetensorsStore::from_vec(path, bytes.to_vec()) else {
        return;
    };
    for name in store.names() {
        let _ = store.load_f32(&name);
    }
}

/// An HF `config.json`.
pub fn model_config(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    if let Ok(c) = crate::config::ModelConfig::from_hf_json(text, Path::new(NAME)) {
        let _ = c.validate(Path::new(NAME));
        let _ = c.rope_inv_freq(false);
        let _ = c.rope_inv_freq(true);
    }
    let _ = crate::formats::source::fp8_block_size(text, Path::new(NAME));
    // A vision model's settings: the tower's (config.json) and the image processor's.
    let _ = crate::vision::VisionConfig::from_hf_json(text, Path::new(NAME));
    let _ = crate::vision::preprocess::ImageProcessorConfig::from_json(text, Path::new(NAME));
}

/// An image file (PNG or JPEG from a request or the command line) through the vision
/// processor. The bounds are a fuzzer's (a 1-megapixel input, 64 patches out) so that
/// each run stays fast; the code is the one every bound takes.
pub fn image(bytes: &[u8]) {
    use crate::vision::preprocess::{decode_rgb, ImageProcessorConfig};
    let Ok((rgb, w, h)) = decode_rgb(bytes, Path::new(NAME), 1 << 20) else { return };
    let cfg = ImageProcessorConfig { max_pixels: 28 * 28 * 16, ..ImageProcessorConfig::default() };
    let _ = cfg.preprocess_rgb(&rgb, w, h);
}

/// An `so8t_config.json`.
pub fn so8t_config(bytes: &[u8]) {
    if let Ok(c) = serde_json::from_slice::<So8tConfig>(bytes) {
        let _ = c.check(Path::new(NAME));
    }
}

/// An HF tokenizer: `tokenizer.json`, a NUL, `tokenizer_config.json` (with its chat
/// template), rendered and encoded for a conversation.
pub fn hf_tokenizer(bytes: &[u8]) {
    let (json, config) = split(bytes);
    let config = std::str::from_utf8(config).ok().filter(|c| !c.is_empty());
    if let Ok(tok) = TextTokenizer::from_hf_files(Path::new(NAME), json, config, None, &[])
        .and_then(|t| t.for_model(u32::MAX as usize, 4096, Path::new(NAME)))
    {
        let _ = tok.chat_prompt(&conversation());
        let _ = tok.encode("Hello <|im_end|> world", true);
    }
}

/// A chat template: its source, a NUL, then a message's content.
pub fn chat_template(bytes: &[u8]) {
    let (src, content) = split(bytes);
    let (Ok(src), Ok(content)) = (std::str::from_utf8(src), std::str::from_utf8(content)) else {
        return;
    };
    if let Ok(t) = ChatTemplate::new(src, "<s>", "</s>") {
        let mut msgs = conversation();
        msgs.push(Message::new("assistant", content));
        msgs.push(Message::new("user", content));
        let _ = t.render(&msgs, true);
    }
}

/// Training JSONL.
pub fn jsonl(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    for skip_bad in [false, true] {
        let _ = crate::train::data::parse_jsonl(text, Path::new(NAME), &Labels::default(), skip_bad);
    }
}

/// A fuzz target: arbitrary bytes in, nothing out.
pub type Target = fn(&[u8]);

/// Every target by name, for drivers that replay corpora.
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors),
    ("model_config", model_config),
    ("so8t_config", so8t_config),
    ("hf_tokenizer", hf_tokenizer),
    ("chat_template", chat_template),
    ("jsonl", jsonl),
    ("image", image),
];
