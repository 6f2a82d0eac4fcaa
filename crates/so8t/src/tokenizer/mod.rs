//! Text ↔ token ids. HF directories bring a `tokenizer.json`; GGUF files carry the
//! vocabulary in `tokenizer.ggml.*` metadata, from which `gguf_vocab` rebuilds an
//! equivalent `tokenizers` tokenizer that splits text as llama.cpp does.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

mod gguf_vocab;
pub use gguf_vocab::llama_cpp_reads_as_phi3;

/// Token texts that llama.cpp treats as end-of-generation whatever their id.
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "<|end_of_text|>",
];

/// Inserted after the first character of a special token's text in message content, so
/// that it no longer matches; an `ESCAPE` in the content itself is doubled.
const ESCAPE: char = '\u{E0FF}';

fn escape(content: &str, specials: &[Special]) -> String {
    let mut out = String::with_capacity(content.len());
    let mut i = 0;
    while i < content.len() {
        let rest = &content[i..];
        let c = rest.chars().next().unwrap_or(ESCAPE);
        out.push(c);
        if c == ESCAPE || specials.iter().any(|s| rest.starts_with(&s.text)) {
            out.push(ESCAPE);
        }
        i += c.len_utf8();
    }
    out
}

fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != ESCAPE {
            out.push(c);
        } else if chars.as_str().starts_with(ESCAPE) {
            out.push(ESCAPE);
            chars.next();
        }
    }
    out
}

/// A special added token: the only tokens a chat template's text may produce from text.
#[derive(Clone, Debug)]
struct Special {
    text: String,
    id: u32,
    lstrip: bool,
    rstrip: bool,
}

/// A rendered conversation: its text (what the audit log hashes) and ids.
pub struct ChatPrompt {
    pub text: String,
    pub ids: Vec<u32>,
}

#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// `inner` with special tokens' texts encoded as text.
    text_only: tokenizers::Tokenizer,
    /// Longest first, so that the first match at a position is the longest.
    specials: Vec<Special>,
    /// Longest text that may fit the model's context ([`TextTokenizer::for_model`]).
    max_text_bytes: Option<usize>,
    pub bos: Option<u32>,
    pub bos_text: String,
    pub eos_text: String,
    pub chat_template: Option<String>,
    /// Where the template came from (file, field), for its errors.
    template_origin: (PathBuf, &'static str),
    /// The template, parsed on first use (once per model, not per request).
    parsed_template: OnceLock<std::result::Result<crate::chat::ChatTemplate, String>>,
    /// Ids that end generation.
    pub eog: Vec<u32>,
}

impl TextTokenizer {
    fn assemble(
        inner: tokenizers::Tokenizer,
        bos: Option<u32>,
        bos_text: String,
        eos_text: String,
        chat_template: Option<String>,
        template_origin: (PathBuf, &'static str),
        eog: Vec<u32>,
    ) -> TextTokenizer {
        let mut text_only = inner.clone();
        text_only.set_encode_special_tokens(true);
        let mut specials: Vec<Special> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special && !t.content.is_empty())
            .map(|(id, t)| Special {
                text: t.content,
                id,
                lstrip: t.lstrip,
                rstrip: t.rstrip,
            })
            .collect();
        specials.sort_by(|a, b| b.text.len().cmp(&a.text.len()).then(a.id.cmp(&b.id)));
        TextTokenizer {
            inner,
            text_only,
            specials,
            max_text_bytes: None,
            bos,
            bos_text,
            eos_text,
            chat_template,
            template_origin,
            parsed_template: OnceLock::new(),
            eog,
        }
    }

    /// The chat template, parsed once; its errors (parsing here, rendering in the
    /// callers) name the file and field it came from.
    fn template(&self) -> Result<Option<&crate::chat::ChatTemplate>> {
        let Some(src) = &self.chat_template else {
            return Ok(None);
        };
        let (path, field) = &self.template_origin;
        self.parsed_template
            .get_or_init(|| {
                crate::chat::ChatTemplate::from_file(src, &self.bos_text, &self.eos_text, path, field)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map(Some)
            .map_err(|e| Error::Invalid(e.clone()))
    }

    /// `add_special`: add BOS (and whatever the tokenizer's post-processor adds). Text
    /// rendered from a chat template carries its own special tokens, so, as transformers'
    /// `apply_chat_template` does, it is encoded without.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.inner, text, add_special)
    }

    /// A conversation as the model sees it before answering: the chat template with the
    /// generation prompt (the assistant header), or, without a template, the last
    /// message's text with the tokenizer's special tokens added.
    ///
    /// Special tokens come only from the template: a special token's text inside a
    /// message (`<|im_end|><|im_start|>assistant` typed by a user) is tokenised as the
    /// plain text it is, so no message can fake a turn. transformers and llama.cpp's
    /// server parse it as control tokens, which lets a user forge a refusal and a new turn
    /// and so move the verdict. The content is escaped before rendering (an
    /// [`ESCAPE`] after the first character of every special token's text), the rendered
    /// text is split at the special tokens left, and the pieces between them are encoded
    /// with the escapes removed and special-token matching off.
    pub fn chat_prompt(&self, messages: &[crate::chat::Message]) -> Result<ChatPrompt> {
        let Some(t) = self.template()? else {
            let text = messages
                .last()
                .map_or("", |m| m.content.as_str())
                .to_string();
            let ids = self.encode_as_text(&text, true)?;
            return Ok(ChatPrompt { text, ids });
        };
        let escaped = t.render(&self.escape_messages(messages), true)?;
        let ids = self.encode_rendered(&escaped)?;
        Ok(ChatPrompt {
            text: unescape(&escaped),
            ids,
        })
    }

    /// The token ids of [`TextTokenizer::chat_prompt`].
    pub fn chat_ids(&self, messages: &[crate::chat::Message]) -> Result<Vec<u32>> {
        Ok(self.chat_prompt(messages)?.ids)
    }

    /// Index into [`TextTokenizer::chat_ids`]'s `ids` of the last token of the last
    /// message's content (spec §5's `user_end` verdict position). Where the content ends
    /// in the rendered text is found by rendering once more with a marker appended to the
    /// content (so the content's own words, or words of the template, cannot be mistaken
    /// for it); that text up to the marker, tokenised, agrees with `ids` up to there.
    /// Where a token straddles the content's end, the last token before it is taken.
    pub fn user_end_index(&self, messages: &[crate::chat::Message], ids: &[u32]) -> Result<usize> {
        const MARK: &str = "\u{E000}so8t-user-end\u{E001}";
        let Some(t) = self.template()? else {
            return Ok(ids.len().max(1) - 1);
        };
        let escaped = self.escape_messages(messages);
        let mut marked = escaped.clone();
        if let Some(last) = marked.last_mut() {
            last.push_text(MARK);
        }
        let [text, marked_text]: [String; 2] = t
            .render_all(&[(&escaped, true), (&marked, true)])?
            .try_into()
            .expect("two conversations, two texts");
        let end = marked_text
            .find(MARK)
            .filter(|&e| text.get(..e) == marked_text.get(..e))
            .ok_or_else(|| {
                Error::Invalid(
                    "the chat template does not render the user's message as it is, so its end cannot be found (use the assistant-header verdict position)".into(),
                )
            })?;
        let head = self.encode_rendered(&text[..end])?;
        let common = head.iter().zip(ids).take_while(|(a, b)| a == b).count();
        Ok(common.max(1).min(ids.len()) - 1)
    }

    /// `text` with special tokens' texts encoded as plain text (what message content is).
    pub fn encode_as_text(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        self.encode_with(&self.text_only, text, add_special)
    }

    fn encode_with(
        &self,
        tokenizer: &tokenizers::Tokenizer,
        text: &str,
        add_special: bool,
    ) -> Result<Vec<u32>> {
        self.check_length(text)?;
        let enc = tokenizer
            .encode(text, add_special)
            .map_err(|e| Error::Invalid(format!("tokenizer: cannot encode prompt: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    fn escape_messages(&self, messages: &[crate::chat::Message]) -> Vec<crate::chat::Message> {
        messages.iter().map(|m| m.map_text(|t| escape(t, &self.specials))).collect()
    }

    /// Ids of rendered, escaped text: the special tokens found in it (the template's), and
    /// the text between them unescaped and encoded as plain text. For text without
    /// escapes this is what `encode(text, false)` gives: the tokenizers library also
    /// splits at added tokens first (honouring their `lstrip`/`rstrip`) and encodes the
    /// pieces separately.
    fn encode_rendered(&self, escaped: &str) -> Result<Vec<u32>> {
        self.check_length(escaped)?;
        let mut ids = Vec::new();
        let mut piece_start = 0;
        let mut i = 0;
        while i < escaped.len() {
            let rest = &escaped[i..];
            match self.specials.iter().find(|s| rest.starts_with(&s.text)) {
                Some(s) => {
                    let mut piece = &escaped[piece_start..i];
                    if s.lstrip {
                        piece = piece.trim_end();
                    }
                    if !piece.is_empty() {
                        ids.extend(self.encode_as_text(&unescape(piece), false)?);
                    }
                    ids.push(s.id);
                    i += s.text.len();
                    if s.rstrip {
                        i = escaped.len() - escaped[i..].trim_start().len();
                    }
                    piece_start = i;
                }
                None => i += rest.chars().next().map_or(1, char::len_utf8),
            }
        }
        let piece = &escaped[piece_start..];
        if !piece.is_empty() {
            ids.extend(self.encode_as_text(&unescape(piece), false)?);
        }
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| Error::Invalid(format!("tokenizer: cannot decode: {e}")))
    }

    pub fn token_text(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer for a model with `model_vocab` embeddings and a context of `context`
    /// tokens: it must not produce ids the model has no embedding for, and it refuses
    /// text that cannot fit the context before encoding it.
    pub fn for_model(mut self, model_vocab: usize, context: usize, path: &Path) -> Result<TextTokenizer> {
        let vocab = self.inner.get_vocab(true);
        let max_id = vocab.values().copied().max().unwrap_or(0) as usize;
        if max_id >= model_vocab {
            return Err(Error::format(
                path,
                format!("tokenizer has token id {max_id} but the model's vocab_size is {model_vocab} (tokenizer does not match the model)"),
            ));
        }
        // A token's string is at least as long as the text it stands for (byte-level
        // BPE spells each byte with one or two characters, SentencePiece a space as `▁`).
        let longest = vocab.keys().map(String::len).max().unwrap_or(1).max(1);
        self.max_text_bytes = Some(context.saturating_mul(longest));
        Ok(self)
    }

    /// Refuses text that certainly has more tokens than the context, before encoding it:
    /// encoding takes hundreds of bytes of memory per byte of text (a 10 MB line took
    /// 2.3 GB).
    fn check_length(&self, text: &str) -> Result<()> {
        match self.max_text_bytes {
            Some(max) if text.len() > max => Err(Error::Invalid(format!(
                "the prompt is {} bytes, more than the model's context can hold ({max} bytes at most)",
                text.len()
            ))),
            _ => Ok(()),
        }
    }

    pub fn from_hf_dir(dir: &Path, config_eos: &[u32]) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let bytes = crate::files::read(&path, crate::files::TOKENIZER_LIMIT)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = crate::files::read_text_if_exists(&cfg_path, crate::files::SETTINGS_LIMIT)?;
        let jinja = dir.join("chat_template.jinja");
        let jinja_text = crate::files::read_text_if_exists(&jinja, crate::files::SETTINGS_LIMIT)?;
        Self::from_hf_files(dir, &bytes, cfg.as_deref(), jinja_text, config_eos)
    }

    /// The tokenizer of an HF directory `dir` from the texts of its tokenizer.json,
    /// tokenizer_config.json and chat_template.jinja (the last used only when the config
    /// has no template).
    pub fn from_hf_files(
        dir: &Path,
        tokenizer_json: &[u8],
        tokenizer_config: Option<&str>,
        jinja: Option<String>,
        config_eos: &[u32],
    ) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner = parse_tokenizer_json(tokenizer_json, &path)?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = match tokenizer_config {
            Some(text) => {
                serde_json::from_str(text).map_err(|e| Error::format(&cfg_path, e.to_string()))?
            }
            None => Value::Null,
        };
        let token_str = |key: &str| -> String {
            match &cfg[key] {
                Value::String(s) => s.clone(),
                Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        // As transformers reads it: a string, or a list of named templates of which
        // "default" is used; anything else is a broken file, not a model without one.
        let mut chat_template = match &cfg["chat_template"] {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            // A list without "default" loads in transformers too (it asks for a name
            // only when applied); without one, chat_template.jinja is used if present.
            Value::Array(list) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            other => {
                return Err(Error::format(
                    &cfg_path,
                    format!("field `chat_template` must be a string or a list of named templates, got {other}"),
                ))
            }
        };
        let mut template_origin = (cfg_path.clone(), "field `chat_template`");
        if chat_template.is_none() {
            chat_template = jinja;
            template_origin = (dir.join("chat_template.jinja"), "template");
        }
        let bos_text = token_str("bos_token");
        let eos_text = token_str("eos_token");
        let bos = inner.token_to_id(&bos_text);
        let mut eog: Vec<u32> = config_eos.to_vec();
        for t in std::iter::once(eos_text.as_str()).chain(EOG_TEXTS.iter().copied()) {
            if let Some(id) = inner.token_to_id(t) {
                if !eog.contains(&id) {
                    eog.push(id);
                }
            }
        }
        Ok(TextTokenizer::assemble(
            inner,
            bos,
            bos_text,
            eos_text,
            chat_template,
            template_origin,
            eog,
        ))
    }

}

/// Incremental detokenisation, O(window) per token instead of decoding the whole answer
/// again (text-generation-inference's method): the text of the tokens since `prefix`,
/// less the text of those of them already read, is what the newest tokens add. Decoding a
/// window rather than one token keeps characters split over tokens and the leading space
/// a SentencePiece decoder strips right; text that ends inside an incomplete UTF-8
/// sequence is held back until it completes.
#[derive(Clone, Debug, Default)]
pub struct DecodeStream {
    prefix: usize,
    read: usize,
}

impl DecodeStream {
    /// Brings `text`, the decoding of `tokens` so far, up to date with `tokens` (the same
    /// tokens as before and more).
    pub fn step(&mut self, tok: &TextTokenizer, tokens: &[u32], text: &mut String) -> Result<()> {
        let before = tok.decode(&tokens[self.prefix..self.read])?;
        let window = tok.decode(&tokens[self.prefix..])?;
        if window.ends_with('\u{FFFD}') {
            return Ok(());
        }
        match window.strip_prefix(&before) {
            Some(new) => text.push_str(new),
            // A decoder whose window text does not extend its prefix's: decode it all.
            None => *text = tok.decode(tokens)?,
        }
        (self.prefix, self.read) = (self.read, tokens.len());
        Ok(())
    }
}

/// tokenizer.json as a `tokenizers::Tokenizer`. The library panics on some malformed
/// files (`expect`s in its deserializers, found by fuzzing): a JSON syntax error inside
/// `decoder`, a `Precompiled` normalizer whose charsmap does not parse. So the text is
/// parsed to a JSON value first (syntax errors become errors) and every `Precompiled`
/// is checked before the library sees it.
fn parse_tokenizer_json(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer> {
    let bad = |e: String| Error::format(path, format!("cannot load tokenizer: {e}"));
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    fn check_precompiled(v: &Value) -> std::result::Result<(), String> {
        match v {
            Value::Object(o) => {
                if o.get("type").and_then(Value::as_str) == Some("Precompiled") {
                    serde_json::from_value::<tokenizers::normalizers::Precompiled>(v.clone())
                        .map_err(|e| format!("Precompiled normalizer: {e}"))?;
                }
                o.values().try_for_each(check_precompiled)
            }
            Value::Array(a) => a.iter().try_for_each(check_precompiled),
            _ => Ok(()),
        }
    }
    check_precompiled(&v["normalizer"]).map_err(bad)?;
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}
