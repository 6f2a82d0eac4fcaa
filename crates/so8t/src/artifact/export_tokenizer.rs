//! `tokenizer.ggml.*` metadata from an HF directory, by llama.cpp's converter rules: tokens
//! by id padded with `[PAD{i}]` (type UNUSED) to the model's vocabulary, added tokens
//! CONTROL when special or shaped like `<|…|>` and USER_DEFINED otherwise, the BPE merges,
//! and the pre-tokenizer named as llama.cpp names it.

use crate::error::{Error, InFile, Result};
use crate::formats::gguf_write::Meta;
use serde_json::Value;
use std::path::Path;

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

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
    // A SentencePiece vocabulary (Llama 2, Phi-3): transformers' BPE form of it falls back
    // to bytes, and the scores llama.cpp ranks merges by are only in tokenizer.model.
    if tj["model"]["byte_fallback"] == true && dir.join("tokenizer.model").exists() {
        return sentencepiece(dir, &tj, vocab_size);
    }
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
    let tc = tokenizer_config(dir)?;
    let token_of = |key: &str| config_token(&tc, key);
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
    m.extend(chat_template(dir, &tc)?);
    m.push(("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)));
    m.push(("tokenizer.ggml.token_type".into(), Meta::I32Array(types)));
    m.push(("tokenizer.ggml.merges".into(), Meta::StrArray(merges)));
    Ok(m)
}

/// `dir`'s tokenizer_config.json (null without one).
fn tokenizer_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    match crate::files::read_text_if_exists(&path, crate::files::SETTINGS_LIMIT)? {
        Some(t) => serde_json::from_str(&t).in_file(&path),
        None => Ok(Value::Null),
    }
}

/// The text of special token `key` (`bos_token`, …) in a tokenizer_config.json: a string
/// or an AddedToken object.
fn config_token(tc: &Value, key: &str) -> Option<String> {
    match &tc[key] {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

/// `tokenizer.chat_template`: tokenizer_config.json's, else chat_template.jinja
/// (transformers 5 writes it there).
fn chat_template(dir: &Path, tc: &Value) -> Result<Option<(String, Meta)>> {
    let template = match &tc["chat_template"] {
        Value::String(s) => Some(s.clone()),
        _ => crate::files::read_text_if_exists(&dir.join("chat_template.jinja"), crate::files::SETTINGS_LIMIT)?,
    };
    Ok(template.map(|t| ("tokenizer.chat_template".to_string(), Meta::Str(t))))
}

/// A SentencePiece `ModelProto`'s pieces: (text, score, type), in id order.
fn sentencepiece_pieces(bytes: &[u8], path: &Path) -> Result<Vec<(String, f32, i32)>> {
    let bad = |what: &str| Error::format(path, format!("not a SentencePiece model: {what}"));
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// The next field of a message: (number, wire type, its bytes or varint value).
    fn field<'a>(b: &'a [u8], i: &mut usize) -> Option<(u64, u64, &'a [u8], u64)> {
        let key = varint(b, i)?;
        let (num, wire) = (key >> 3, key & 7);
        let take = |i: &mut usize, n: usize| -> Option<&'a [u8]> {
            let s = b.get(*i..i.checked_add(n)?)?;
            *i += n;
            Some(s)
        };
        match wire {
            0 => Some((num, wire, &[], varint(b, i)?)),
            1 => Some((num, wire, take(i, 8)?, 0)),
            2 => {
                let n = usize::try_from(varint(b, i)?).ok()?;
                Some((num, wire, take(i, n)?, 0))
            }
            5 => Some((num, wire, take(i, 4)?, 0)),
            _ => None,
        }
    }
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let (num, wire, body, _) = field(bytes, &mut i).ok_or_else(|| bad("a field runs past the end"))?;
        if num != 1 || wire != 2 {
            continue;
        }
        let (mut text, mut score, mut ty) = (None, 0f32, NORMAL);
        let mut j = 0;
        while j < body.len() {
            let (n, w, b, v) = field(body, &mut j).ok_or_else(|| bad("a piece's field runs past its end"))?;
            match (n, w) {
                (1, 2) => text = Some(String::from_utf8(b.to_vec()).map_err(|_| bad("a piece is not UTF-8"))?),
                (2, 5) => score = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                (3, 0) => ty = i32::try_from(v).map_err(|_| bad("a piece type is out of range"))?,
                _ => {}
            }
        }
        pieces.push((text.ok_or_else(|| bad("a piece has no text"))?, score, ty));
    }
    Ok(pieces)
}

/// `tokenizer.ggml.*` for a SentencePiece vocabulary as convert_hf_to_gguf.py's Phi-3
/// converter writes it: the pieces with their scores and types (user-defined pieces as
/// normal ones), `[PAD{i}]` (score -10000, unused) up to the model's vocabulary, added
/// tokens at score -1000 (control when special, else user-defined), the special token ids
/// of tokenizer_config.json, and `add_bos_token`/`add_eos_token` only where the
/// post-processor or tokenizer_config.json says.
fn sentencepiece(dir: &Path, tj: &Value, vocab_size: usize) -> Result<Vec<(String, Meta)>> {
    let model_path = dir.join("tokenizer.model");
    let bytes = crate::files::read(&model_path, crate::files::TOKENIZER_LIMIT)?;
    let pieces = sentencepiece_pieces(&bytes, &model_path)?;
    if pieces.len() > vocab_size {
        return Err(Error::format(
            &model_path,
            format!("{} pieces, more than the model's vocab_size {vocab_size}", pieces.len()),
        ));
    }
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, (text, score, ty)) in pieces.into_iter().enumerate() {
        tokens[id] = text;
        scores[id] = score;
        types[id] = match ty {
            2 => UNKNOWN,
            3 => CONTROL,
            5 => UNUSED,
            6 => BYTE,
            _ => NORMAL,
        };
    }
    let tc = tokenizer_config(dir)?;
    let decoder_entries = tc["added_tokens_decoder"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(id, a)| (id.parse::<u64>().unwrap_or(u64::MAX), a));
    let json_entries = tj["added_tokens"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| (a["id"].as_u64().unwrap_or(u64::MAX), a));
    for (id, a) in decoder_entries.chain(json_entries) {
        let i = usize::try_from(id).unwrap_or(usize::MAX);
        let text = a["content"].as_str().unwrap_or_default();
        if i >= vocab_size {
            return Err(Error::format(
                &dir.join("tokenizer.json"),
                format!("added token `{text}` has id {id}, beyond the model's vocab_size {vocab_size}"),
            ));
        }
        tokens[i] = text.to_string();
        scores[i] = -1000.0;
        types[i] = if a["special"] == true { CONTROL } else { USER_DEFINED };
    }
    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Meta::Str("llama".into())),
        ("tokenizer.ggml.pre".into(), Meta::Str("default".into())),
    ];
    let token_of = |key: &str| config_token(&tc, key);
    for (key, name) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("sep_token", "seperator_token_id"),
        ("pad_token", "padding_token_id"),
        ("cls_token", "cls_token_id"),
        ("mask_token", "mask_token_id"),
    ] {
        if let Some(id) = token_of(key).and_then(|t| tokens.iter().position(|x| *x == t)) {
            m.push((format!("tokenizer.ggml.{name}"), Meta::U32(id as u32)));
        }
    }
    // gguf-py's SpecialVocab: a TemplateProcessing of more than the sequence tells whether
    // BOS and EOS are added; else tokenizer_config.json's flags, where it has them.
    let single = tj["post_processor"]["single"].as_array().filter(|s| s.len() > 1);
    let special_id = |v: Option<&Value>| v.and_then(|e| e["SpecialToken"]["id"].as_str()).map(str::to_string);
    for (typ, end) in [("bos", single.and_then(|s| special_id(s.first()))), ("eos", single.and_then(|s| special_id(s.last())))] {
        let from_template = end.map(|t| Some(t) == token_of(&format!("{typ}_token")));
        if let Some(add) = from_template.or(tc[format!("add_{typ}_token")].as_bool()) {
            m.push((format!("tokenizer.ggml.add_{typ}_token"), Meta::Bool(add)));
        }
    }
    m.extend(chat_template(dir, &tc)?);
    m.push(("tokenizer.ggml.tokens".into(), Meta::StrArray(tokens)));
    m.push(("tokenizer.ggml.scores".into(), Meta::F32Array(scores)));
    m.push(("tokenizer.ggml.token_type".into(), Meta::I32Array(types)));
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every prefix of a real tokenizer.model, and the bytes flipped one at a time, are
    /// read or refused with the file named: never a panic or an out-of-bounds read.
    #[test]
    fn damaged_sentencepiece_models_are_refused_by_name() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-phi3-spm/tokenizer.model");
        let bytes = std::fs::read(&path).unwrap();
        let pieces = sentencepiece_pieces(&bytes, &path).unwrap();
        assert_eq!(pieces.len(), 440);
        assert_eq!((pieces[1].0.as_str(), pieces[1].2), ("<s>", CONTROL));
        assert_eq!(pieces[3].2, BYTE);
        for n in (0..bytes.len()).step_by(7) {
            if let Err(e) = sentencepiece_pieces(&bytes[..n], &path) {
                assert!(e.to_string().contains("tokenizer.model"), "{e}");
            }
        }
        for i in (0..bytes.len()).step_by(13) {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            if let Err(e) = sentencepiece_pieces(&b, &path) {
                assert!(e.to_string().contains("tokenizer.model"), "{e}");
            }
        }
    }
}
