//! A GGUF's `tokenizer.ggml.*` vocabulary rebuilt as a `tokenizers` tokenizer that
//! splits text as llama.cpp does: byte-level BPE (`gpt2`) with llama.cpp's pre-tokenizer
//! regexes, and SentencePiece (`llama`) as llama.cpp's SPM tokenizer merges.

use super::{TextTokenizer, EOG_TEXTS};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use serde_json::{json, Value};
use std::collections::HashMap;

/// llama.cpp's test (llama-vocab.cpp) for a model whose special tokens right-strip, as
/// Phi-3's tokenizer.json has them: the file's general.name.
pub fn llama_cpp_reads_as_phi3(general_name: &str) -> bool {
    let name = general_name.to_lowercase();
    name.contains("phi-3") || name.contains("phi3")
}

impl TextTokenizer {
    pub fn from_gguf(g: &GgufFile) -> Result<TextTokenizer> {
        let model = g.opt_str("tokenizer.ggml.model")?.unwrap_or("");
        if model != "gpt2" && model != "llama" {
            return Err(Error::format(
                &g.path,
                format!("tokenizer.ggml.model is `{model}`; supported: `gpt2` (byte-level BPE) and `llama` (SentencePiece)"),
            ));
        }
        let tokens = g.str_array("tokenizer.ggml.tokens")?;
        let types = g.i32_array("tokenizer.ggml.token_type").unwrap_or_default();
        if !types.is_empty() && types.len() != tokens.len() {
            return Err(Error::format(
                &g.path,
                format!(
                    "tokenizer.ggml.token_type has {} entries but tokenizer.ggml.tokens has {}",
                    types.len(),
                    tokens.len()
                ),
            ));
        }
        // llama.cpp (llama-vocab.cpp) gives Phi-3's special tokens, known by the model's
        // name, the right-strip of Phi-3's tokenizer.json: whitespace after them is dropped,
        // except after <unk>, <s> and <|endoftext|>.
        let phi3 = llama_cpp_reads_as_phi3(g.opt_str("general.name")?.unwrap_or(""));
        let mut vocab = serde_json::Map::with_capacity(tokens.len());
        let mut added = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            vocab.insert(t.to_string(), json!(id));
            // 3 = control, 4 = user-defined: matched as whole tokens in text, as llama.cpp
            // does with special-token parsing on.
            let ty = types.get(id).copied().unwrap_or(1);
            if ty == 3 || ty == 4 {
                let rstrip = phi3 && !matches!(*t, "<unk>" | "<s>" | "<|endoftext|>");
                added.push(json!({"id": id, "content": t, "single_word": false, "lstrip": false, "rstrip": rstrip,
                                  "normalized": false, "special": ty == 3}));
            }
        }
        let parts = if model == "gpt2" {
            Self::gpt2_parts(g, vocab)?
        } else {
            Self::sentencepiece_parts(g, &tokens, &types, vocab)?
        };
        // A special token's id and text, when the id is in the vocabulary.
        let id_text = |key: &str| -> Result<Option<(u32, String)>> {
            Ok(g.opt_usize(key)?
                .and_then(|id| tokens.get(id).map(|t| (id as u32, t.to_string()))))
        };
        let bos = id_text("tokenizer.ggml.bos_token_id")?;
        let add_bos = g
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(parts.add_bos);
        // BOS as transformers adds it, in the post-processor, so that the tokenizer saved
        // as tokenizer.json (convert) behaves the same.
        let post = match (&bos, add_bos) {
            (Some((id, text)), true) => json!({
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": text, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {text.as_str(): {"id": text, "ids": [id], "tokens": [text]}},
            }),
            _ => Value::Null,
        };
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": parts.normalizer,
            "pre_tokenizer": parts.pre_tokenizer,
            "post_processor": post,
            "decoder": parts.decoder,
            "model": parts.model,
        });
        let inner: tokenizers::Tokenizer = serde_json::from_value::<tokenizers::Tokenizer>(spec)
            .map_err(|e| {
                Error::format(
                    &g.path,
                    format!("cannot build tokenizer from tokenizer.ggml.*: {e}"),
                )
            })?;
        let eos = id_text("tokenizer.ggml.eos_token_id")?;
        let mut eog: Vec<u32> = Vec::new();
        for key in [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ] {
            if let Some((id, _)) = id_text(key)? {
                eog.push(id);
            }
        }
        for (id, t) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(t) && !eog.contains(&(id as u32)) {
                eog.push(id as u32);
            }
        }
        Ok(TextTokenizer::assemble(
            inner,
            bos.as_ref().map(|b| b.0),
            bos.map(|b| b.1).unwrap_or_default(),
            eos.map(|b| b.1).unwrap_or_default(),
            g.opt_str("tokenizer.chat_template")?.map(str::to_string),
            (g.path.clone(), "metadata `tokenizer.chat_template`"),
            eog,
        ))
    }

    /// llama.cpp's byte-level BPE (`gpt2`): its merges, and the pre-tokenizer regexes
    /// llama.cpp uses for `tokenizer.ggml.pre`.
    fn gpt2_parts(g: &GgufFile, vocab: serde_json::Map<String, Value>) -> Result<VocabParts> {
        let merges = g.str_array("tokenizer.ggml.merges")?;
        let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let (regexes, ignore_merges, add_bos) = pre_tokenizer(pre).ok_or_else(|| {
            Error::format(&g.path, format!("tokenizer.ggml.pre `{pre}` is not supported (known: gpt-2, default, llama-bpe, qwen2, smollm)"))
        })?;
        let mut pretok: Vec<Value> = regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pretok.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}));
        Ok(VocabParts {
            normalizer: Value::Null,
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": pretok}),
            decoder: json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}),
            model: json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                          "ignore_merges": ignore_merges, "vocab": vocab, "merges": merges}),
            add_bos,
        })
    }

    /// llama.cpp's SentencePiece tokenizer (`llama`, Llama 2 and Phi-3): each text
    /// between special tokens gets a leading space (unless `add_space_prefix` is false),
    /// spaces become `▁`, and adjacent pieces merge, highest score first, while their
    /// concatenation is a token; what stays unknown falls back to `<0xXX>` byte tokens.
    /// That is a BPE whose merges are every split of a token into two tokens, ranked by
    /// the merged token's score (how transformers' converter turns SentencePiece models
    /// into BPE too).
    fn sentencepiece_parts(
        g: &GgufFile,
        tokens: &[&str],
        types: &[i32],
        vocab: serde_json::Map<String, Value>,
    ) -> Result<VocabParts> {
        let scores = g.f32_array("tokenizer.ggml.scores").unwrap_or_default();
        if scores.len() != tokens.len() {
            return Err(Error::format(
                &g.path,
                format!(
                    "tokenizer.ggml.scores has {} entries, expected one per token ({})",
                    scores.len(),
                    tokens.len()
                ),
            ));
        }
        // 1 = normal: the pieces merging can make (control, user-defined and byte tokens
        // are matched whole or by the byte fallback).
        let normal = |id: usize| types.get(id).copied().unwrap_or(1) == 1;
        let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            ids.entry(t).or_insert(id);
        }
        let mut merges: Vec<(f32, usize, &str, &str)> = Vec::new();
        for (id, t) in tokens.iter().enumerate() {
            if !normal(id) || t.chars().nth(1).is_none() {
                continue;
            }
            for (k, _) in t.char_indices().skip(1) {
                let (a, b) = t.split_at(k);
                if ids.get(a).is_some_and(|&i| normal(i)) && ids.get(b).is_some_and(|&i| normal(i)) {
                    merges.push((scores[id], id, a, b));
                }
            }
        }
        // Highest score first; ties as llama.cpp breaks them is by position in the text,
        // which a rank cannot express: by token id, as transformers' converter does.
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)));
        let merges: Vec<Value> = merges.iter().map(|(_, _, a, b)| json!([a, b])).collect();
        let prefix = g.opt_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
        let mut norm = Vec::new();
        let mut decoder = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            norm.push(json!({"type": "Prepend", "prepend": "\u{2581}"}));
            decoder.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        norm.push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
        let unk = g
            .opt_usize("tokenizer.ggml.unknown_token_id")?
            .and_then(|i| tokens.get(i))
            .map(|t| json!(t))
            .unwrap_or(Value::Null);
        Ok(VocabParts {
            normalizer: json!({"type": "Sequence", "normalizers": norm}),
            pre_tokenizer: Value::Null,
            decoder: json!({"type": "Sequence", "decoders": decoder}),
            model: json!({"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                          "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true,
                          "ignore_merges": false, "vocab": vocab, "merges": merges}),
            // llama.cpp's default for SentencePiece vocabularies.
            add_bos: true,
        })
    }
}

/// The vocabulary-specific parts of a `tokenizers` spec rebuilt from GGUF metadata.
struct VocabParts {
    normalizer: Value,
    pre_tokenizer: Value,
    decoder: Value,
    model: Value,
    /// Whether llama.cpp adds BOS when the file does not say.
    add_bos: bool,
}

/// llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by `tokenizer.ggml.pre`:
/// (regexes applied in sequence, ignore_merges, add_bos default).
fn pre_tokenizer(pre: &str) -> Option<(Vec<&'static str>, bool, bool)> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // llama.cpp's "default" BPE pre-tokenizer begins with this, then GPT-2's and two digit rules.
    const DEFAULT: &str = r"[\p{P}\$\+<=>\^~\|]+";
    match pre {
        "gpt-2" | "phi-2" => Some((vec![GPT2], false, false)),
        "default" => Some((
            vec![DEFAULT, GPT2, r"\p{N}+", "[0-9][0-9][0-9]"],
            false,
            false,
        )),
        "llama3" | "llama-v3" | "llama-bpe" => Some((vec![LLAMA3], true, true)),
        "qwen2" | "deepseek-r1-qwen" => Some((vec![QWEN2], false, false)),
        "smollm" => Some((vec![r"\p{N}", GPT2], false, false)),
        _ => None,
    }
}
