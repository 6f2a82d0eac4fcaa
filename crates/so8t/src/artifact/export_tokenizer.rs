//! `tokenizer.ggml.*` metadata from an HF directory, by llama.cpp's converter rules: tokens
//! by id padded with `[PAD{i}]` (type UNUSED) to the model's vocabulary, added tokens
//! CONTROL when special or shaped like `<|…|>` and USER_DEFINED otherwise, the BPE merges,
//! and the pre-tokenizer named as llama.cpp names it.

use crate::error::{Error, InFile, Result};
use crate::formats::gguf_write::Meta;
use serde_json::Value;
use std::path::Path;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// llama.cpp's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The llama.cpp pre-tokenizer name for a tokenizer.json `pre_tokenizer`: transformers'
/// own forms and the llama.cpp regexes we write when rebuilding a GGUF's tokenizer.
fn pre_name(pre: &Value) -> Option<&'static str> {
    let parts: Vec<&Value> = match pre["type"].as_str()? {
        "Sequence" => pre["pretokenizers"].as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let mut regexes = Vec::new();
    let mut digits = false;
    let mut bytelevel_regex = false;
    for p in parts {
        match p["type"].as_str()? {
            "Split" => regexes.push(p["pattern"]["Regex"].as_str()?.to_string()),
            "Digits" => digits = p["individual_digits"].as_bool() == Some(true),
            "ByteLevel" => bytelevel_regex = p["use_regex"].as_bool() != Some(false),
            _ => return None,
        }
    }
    let has = |needle: &str| regexes.iter().any(|r| r.contains(needle));
    match (regexes.len(), digits, bytelevel_regex) {
        (0, false, true) => Some("gpt-2"),
        (0, true, true) => Some("smollm"),
        (2, false, false) if regexes[0] == r"\p{N}" => Some("smollm"),
        (1, false, false) if has(r"\p{N}{1,3}") => Some("llama-bpe"),
        (1, false, false) if has(r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|") => Some("qwen2"),
        (1, false, false) if regexes[0].starts_with("'s|'t|'re") => Some("gpt-2"),
        _ => None,
    }
}

/// Whether `dir`'s tokenizer.json drops the whitespace after a special token it marks
/// `rstrip` (Phi-3 does, after its chat tokens).
pub fn strips_after_specials(dir: &Path) -> Result<bool> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(false);
    }
    let text = crate::files::read_text(&path, crate::files::TOKENIZER_LIMIT)?;
    let tj: Value = serde_json::from_str(&text).in_file(&path)?;
    Ok(tj["added_tokens"]
        .as_array()
        .is_some_and(|a| a.iter().any(|t| t["special"] == true && t["rstrip"] == true)))
}

pub fn from_hf_dir(dir: &Path, vocab_size: usize) -> Result<Vec<(String, Meta)>> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(vec![]);
    }
    let text = crate::files::read_text(&path, crate::files::TOKENIZER_LIMIT)?;
    let tj: Value = serde_json::from_str(&text).in_file(&path)?;
    if tj["model"]["type"] != "BPE" {
        return Err(Error::format(
            &path,
            "only BPE tokenizers can be exported to GGUF (tokenizer.ggml.model = gpt2)",
        ));
    }
    let pre = pre_name(&tj["pre_tokenizer"]).ok_or_else(|| {
        Error::format(
            &path,
            "pre_tokenizer is not one llama.cpp knows (gpt-2, smollm, qwen2, llama-bpe)",
        )
    })?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    let vocab = tj["model"]["vocab"]
        .as_object()
        .ok_or_else(|| Error::format(&path, "model.vocab missing"))?;
    let mut put = |id: u64, t: &str, ty: i32| -> Result<()> {
        let i = id as usize;
        if i >= vocab_size {
            return Err(Error::format(
                &path,
                format!("token `{t}` has id {i}, beyond the model's vocab_size {vocab_size}"),
            ));
        }
        tokens[i] = Some(t.to_string());
        types[i] = ty;
        Ok(())
    };
    for (t, id) in vocab {
        put(id.as_u64().unwrap_or(u64::MAX), t, NORMAL)?;
    }
    for a in tj["added_tokens"].as_array().into_iter().flatten() {
        let t = a["content"].as_str().unwrap_or_default();
        let ty = if a["special"].as_bool() == Some(true) || looks_special(t) {
            CONTROL
        } else {
            USER_DEFINED
        };
        put(a["id"].as_u64().unwrap_or(u64::MAX), t, ty)?;
    }
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]")))
        .collect();
    let merges: Vec<String> = tj["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) if p.len() == 2 => {
                Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
            }
            _ => None,
        })
        .collect();
    let tc_path = dir.join("tokenizer_config.json");
    let tc: Value = match crate::files::read_text_if_exists(&tc_path, crate::files::SETTINGS_LIMIT)? {
        Some(t) => serde_json::from_str(&t).in_file(&tc_path)?,
        None => Value::Null,
    };
    let token_of = |key: &str| -> Option<String> {
        match &tc[key] {
            Value::String(s) => Some(s.clone()),
            Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        }
    };
    let id_of = |t: &str| tokens.iter().position(|x| x == t).map(|i| i as u32);
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str(pre.into())),
    ];
    for (key, name) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"),
    ] {
        if let Some(id) = token_of(key).as_deref().and_then(id_of) {
            m.push((format!("tokenizer.ggml.{name}"), Meta::U32(id)));
        }
    }
    let add_bos = tc["add_bos_token"].as_bool().unwrap_or(pre == "llama-bpe");
    m.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)));
    let template = match &tc["chat_template"] {
        Value::String(s) => Some(s.clone()),
        _ => crate::files::read_text_if_exists(&dir.join("chat_template.jinja"), crate::files::SETTINGS_LIMIT)?,
    };
    if let Some(t) = template {
        m.push(("tokenizer.chat_template".into(), Meta::Str(t)));
    }
    m.push(("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)));
    m.push(("tokenizer.ggml.token_type".into(), Meta::I32Array(types)));
    m.push(("tokenizer.ggml.merges".into(), Meta::StrArray(merges)));
    Ok(m)
}
