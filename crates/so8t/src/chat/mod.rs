//! Chat templates (Jinja, as shipped in `tokenizer_config.json` or GGUF metadata),
//! rendered with minijinja in the configuration transformers uses (trim_blocks,
//! lstrip_blocks, Python string methods). minijinja cannot run arbitrary code, which
//! makes a template from an untrusted checkpoint safe to render.

pub mod sandbox;

use crate::error::{Error, Result};
use minijinja::{Environment, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub role: String,
    /// The message's text (with images, the text of its parts joined).
    pub content: String,
    /// A message with images: its parts in order. The template then sees `content` as
    /// the list of parts transformers passes (`{"type": "text", "text": …}` and
    /// `{"type": "image"}`), which vision models' templates turn into image placeholders.
    pub parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Part {
    Text(String),
    Image,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
            parts: Vec::new(),
        }
    }

    /// A message of text and images in order.
    pub fn with_parts(role: &str, parts: Vec<Part>) -> Message {
        let content = parts
            .iter()
            .filter_map(|p| match p {
                Part::Text(t) => Some(t.as_str()),
                Part::Image => None,
            })
            .collect();
        Message { role: role.to_string(), content, parts }
    }

    /// Appends `text` to the message's text (its last text part, with parts).
    pub fn push_text(&mut self, text: &str) {
        self.content.push_str(text);
        match self.parts.last_mut() {
            Some(Part::Text(t)) => t.push_str(text),
            Some(Part::Image) => self.parts.push(Part::Text(text.to_string())),
            None => {}
        }
    }

    /// How many images the message holds.
    pub fn images(&self) -> usize {
        self.parts.iter().filter(|p| matches!(p, Part::Image)).count()
    }

    /// The message with every text (content and text parts) passed through `f`.
    pub fn map_text(&self, f: impl Fn(&str) -> String) -> Message {
        Message {
            role: self.role.clone(),
            content: f(&self.content),
            parts: self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => Part::Text(f(t)),
                    Part::Image => Part::Image,
                })
                .collect(),
        }
    }
}

impl Serialize for Message {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("role", &self.role)?;
        if self.parts.is_empty() {
            m.serialize_entry("content", &self.content)?;
        } else {
            let parts: Vec<serde_json::Value> = self
                .parts
                .iter()
                .map(|p| match p {
                    Part::Text(t) => serde_json::json!({"type": "text", "text": t}),
                    Part::Image => serde_json::json!({"type": "image"}),
                })
                .collect();
            m.serialize_entry("content", &parts)?;
        }
        m.end()
    }
}

/// The inverse of the serialisation above (the template sandbox's child reads messages so).
impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            role: String,
            content: Content,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Content {
            Text(String),
            Parts(Vec<RawPart>),
        }
        #[derive(Deserialize)]
        struct RawPart {
            #[serde(rename = "type")]
            kind: String,
            text: Option<String>,
        }
        let raw = Raw::deserialize(d)?;
        Ok(match raw.content {
            Content::Text(t) => Message::new(&raw.role, &t),
            Content::Parts(parts) => {
                let parts = parts
                    .into_iter()
                    .map(|p| match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => Ok(Part::Text(t)),
                        ("image", None) => Ok(Part::Image),
                        (k, _) => Err(serde::de::Error::custom(format!("unknown message part `{k}`"))),
                    })
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                Message::with_parts(&raw.role, parts)
            }
        })
    }
}

/// Template instructions one render may run. A real template spends a few hundred per
/// message (Qwen3's, which walks the messages twice, about 300); a template from an
/// untrusted checkpoint with nested loops would otherwise wedge the server's request
/// and every request queued behind it. Running out is an error that says so.
const RENDER_FUEL: u64 = 20_000_000;
/// Longest rendered prompt, in bytes; far beyond any context, and bounds what a template
/// can build with string operations in the fuel it has.
const RENDER_MAX_BYTES: usize = 64 << 20;

/// A writer that refuses to grow past a limit.
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > RENDER_MAX_BYTES {
            return Err(std::io::Error::other("output limit"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Prefix of the errors a template raises on purpose about the messages
/// (`raise_exception("Conversation roles must alternate…")`): the request's fault, not
/// the template's, so they are reported without the template's file.
const RAISED: &str = "the chat template refused the messages: ";

/// Why a render failed: `raised` when the template raised it about the messages (the
/// request's fault), else the template's own fault, said in `why`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RenderFailure {
    pub raised: bool,
    pub why: String,
}

#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Kept for the render sandbox, which parses it again in its own process.
    source: String,
    bos: String,
    eos: String,
    /// The file and field the template came from, named in errors that are its fault.
    origin: Option<(std::path::PathBuf, &'static str)>,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_fuel(Some(RENDER_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    format!("{RAISED}{msg}"),
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date" in system prompts; a fixed clock keeps
            // prompts reproducible, and only %d %b %Y style formats are common.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Invalid(format!("chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
            origin: None,
        })
    }

    /// As [`ChatTemplate::new`], for a template read from `path`'s `field`: its parse
    /// errors and the render errors that are its fault (fuel, output size, recursion, a
    /// bad expression) name them; errors it raises about the messages do not.
    pub fn from_file(
        source: &str,
        bos: &str,
        eos: &str,
        path: &std::path::Path,
        field: &'static str,
    ) -> Result<ChatTemplate> {
        let mut t = Self::new(source, bos, eos).map_err(|e| Error::format(path, format!("{field}: {e}")))?;
        t.origin = Some((path.to_path_buf(), field));
        Ok(t)
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut out = self.render_all(&[(messages, add_generation_prompt)])?;
        Ok(out.pop().expect("one conversation, one text"))
    }

    /// Renders each conversation (its messages, and whether to add the generation
    /// prompt): in the [`sandbox`] process when it is enabled (the `so8t` binary does so),
    /// else here.
    pub fn render_all(&self, conversations: &[(&[Message], bool)]) -> Result<Vec<String>> {
        let rendered = match sandbox::executable() {
            Some(exe) => sandbox::render(exe, self, conversations)?,
            None => conversations
                .iter()
                .map(|&(messages, add)| self.render_here(messages, add))
                .collect(),
        };
        rendered.map_err(|f| self.error(f))
    }

    /// The error for `f`: a failure that is the template's fault names the file and field
    /// it came from; what it raises about the messages does not.
    fn error(&self, f: RenderFailure) -> Error {
        match &self.origin {
            Some((path, field)) if !f.raised => {
                Error::format(path, format!("{field}: chat template failed: {}", f.why))
            }
            _ => Error::Invalid(format!("chat template failed: {}", f.why)),
        }
    }

    /// One render in this process, within [`RENDER_FUEL`] and [`RENDER_MAX_BYTES`].
    fn render_here(&self, messages: &[Message], add_generation_prompt: bool) -> std::result::Result<String, RenderFailure> {
        let fail = |why: String| RenderFailure { raised: false, why };
        let tmpl = self.env.get_template("chat").map_err(|e| fail(e.to_string()))?;
        let mut out = Bounded(Vec::new());
        tmpl.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos,
                eos_token => self.eos,
            },
            &mut out,
        )
        .map_err(|e| {
            if e.detail().is_some_and(|d| d.starts_with(RAISED)) {
                return RenderFailure { raised: true, why: e.to_string() };
            }
            fail(match e.kind() {
                minijinja::ErrorKind::OutOfFuel => format!(
                    "the chat template ran more than {RENDER_FUEL} instructions (a loop without end?)"
                ),
                minijinja::ErrorKind::WriteFailure => {
                    format!("the chat template's output exceeds {RENDER_MAX_BYTES} bytes")
                }
                _ => e.to_string(),
            })
        })?;
        String::from_utf8(out.0).map_err(|_| fail("output is not UTF-8".into()))
    }
}

/// Splits a thinking model's output into (reasoning, answer). Qwen3-Thinking's template
/// opens `<think>` in the prompt, so the output may hold only the closing tag.
pub fn split_reasoning(text: &str) -> (Option<String>, String) {
    match text.find("</think>") {
        Some(end) => {
            let before = &text[..end];
            let reasoning = before
                .strip_prefix("<think>")
                .unwrap_or(before)
                .trim()
                .to_string();
            (
                Some(reasoning),
                text[end + "</think>".len()..].trim_start().to_string(),
            )
        }
        None => (None, text.to_string()),
    }
}

/// Where a piece of streamed output belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    Reasoning,
    Answer,
}

/// Splits streamed output into reasoning and answer as it arrives, like
/// [`split_reasoning`] but token by token: text inside `<think>…</think>` is reasoning,
/// and text that might be the start of a tag is held back until it is known. A model
/// whose prompt already opened `<think>` (Qwen3-Thinking) starts in reasoning, and
/// reasoning that never closes stays reasoning (as llama.cpp's server reports it).
pub struct ReasoningSplitter {
    channel: Channel,
    held: String,
    /// Whether an opening tag at the very start may still come.
    at_start: bool,
    /// The answer after `</think>` starts at its first non-blank character.
    answer_opened: bool,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";

impl ReasoningSplitter {
    /// `prompt` is the rendered prompt text: if it ends inside an open `<think>`, the
    /// output starts as reasoning.
    pub fn new(prompt: &str) -> ReasoningSplitter {
        let opened = prompt
            .rfind(THINK_OPEN)
            .is_some_and(|o| prompt[o..].find(THINK_CLOSE).is_none());
        ReasoningSplitter {
            channel: if opened {
                Channel::Reasoning
            } else {
                Channel::Answer
            },
            held: String::new(),
            at_start: !opened,
            answer_opened: false,
        }
    }

    /// Takes the next piece of output; returns what can be emitted now.
    pub fn push(&mut self, piece: &str) -> Vec<(Channel, String)> {
        self.held.push_str(piece);
        let mut out = Vec::new();
        loop {
            if self.at_start {
                let t = self.held.trim_start();
                if let Some(rest) = t.strip_prefix(THINK_OPEN) {
                    self.held = rest.to_string();
                    self.channel = Channel::Reasoning;
                    self.at_start = false;
                    continue;
                }
                if THINK_OPEN.starts_with(t) {
                    return out; // could still become `<think>`
                }
                self.at_start = false;
            }
            if self.channel == Channel::Reasoning {
                if let Some(i) = self.held.find(THINK_CLOSE) {
                    let before = self.held[..i].to_string();
                    let after = self.held[i + THINK_CLOSE.len()..].to_string();
                    if !before.is_empty() {
                        out.push((Channel::Reasoning, before));
                    }
                    self.channel = Channel::Answer;
                    self.answer_opened = true;
                    self.held = after;
                    continue;
                }
            }
            if self.answer_opened {
                self.held = self.held.trim_start().to_string();
                if self.held.is_empty() {
                    return out;
                }
                self.answer_opened = false;
            }
            let keep = if self.channel == Channel::Reasoning {
                partial_suffix(&self.held, THINK_CLOSE)
            } else {
                0
            };
            let cut = self.held.len() - keep;
            if cut > 0 {
                let text: String = self.held.drain(..cut).collect();
                push_piece(&mut out, self.channel, text);
            }
            return out;
        }
    }

    /// Flushes whatever was held back at the end of the output.
    pub fn finish(&mut self) -> Vec<(Channel, String)> {
        let text = std::mem::take(&mut self.held);
        let mut out = Vec::new();
        if !text.is_empty() {
            push_piece(&mut out, self.channel, text);
        }
        out
    }
}

fn push_piece(out: &mut Vec<(Channel, String)>, channel: Channel, text: String) {
    match out.last_mut() {
        Some((c, t)) if *c == channel => t.push_str(&text),
        _ => out.push((channel, text)),
    }
}

/// Length of the longest suffix of `s` that is a proper prefix of `tag`.
fn partial_suffix(s: &str, tag: &str) -> usize {
    (1..tag.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && tag.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Errors that are the template's fault name its file; what it raises about the
    /// messages is the request's fault and names no file (the server sends it to clients).
    #[test]
    fn template_errors_name_the_file_only_when_the_template_is_at_fault() {
        let path = std::path::Path::new("/models/m/tokenizer_config.json");
        let looping = "{% for a in range(100000000) %}{% for b in range(100000000) %}x{% endfor %}{% endfor %}";
        let t = ChatTemplate::from_file(looping, "", "", path, "field `chat_template`").unwrap();
        let e = t.render(&[Message::new("user", "hi")], true).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json: field `chat_template`"), "{e}");
        let raising = "{{ raise_exception('roles must alternate') }}";
        let t = ChatTemplate::from_file(raising, "", "", path, "field `chat_template`").unwrap();
        let e = t.render(&[Message::new("user", "hi")], true).unwrap_err().to_string();
        assert!(e.contains("roles must alternate") && !e.contains("/models/"), "{e}");
        let e = ChatTemplate::from_file("{% for %}", "", "", path, "field `chat_template`")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("tokenizer_config.json: field `chat_template`: chat template does not parse"), "{e}");
    }

    /// Hostile templates end with an error naming the limit, in bounded time and memory
    /// (issue 18: a nested loop wedged the server).
    #[test]
    fn templates_that_loop_or_grow_are_stopped() {
        let msgs = [Message::new("user", "Hi")];
        for (src, why) in [
            ("{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}", "instructions"),
            ("{% set s = 'x' * 1000000 %}{% for a in range(100000) %}{{ s }}{% endfor %}", "exceeds"),
            ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
        ] {
            let err = ChatTemplate::new(src, "", "").unwrap().render(&msgs, true).unwrap_err().to_string();
            assert!(err.contains(why), "{src}: {err}");
        }
    }

    #[test]
    fn chatml_renders_like_transformers() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.split('</think>')[-1].strip() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(&[Message::new("assistant", "a</think>  b ")], false)
                .unwrap(),
            "b"
        );
    }

    fn split_streamed(prompt: &str, pieces: &[&str]) -> (String, String) {
        let mut s = ReasoningSplitter::new(prompt);
        let mut out: Vec<(Channel, String)> = pieces.iter().flat_map(|p| s.push(p)).collect();
        out.extend(s.finish());
        let join = |c| {
            out.iter()
                .filter(|(ch, _)| *ch == c)
                .map(|(_, t)| t.as_str())
                .collect::<String>()
        };
        (join(Channel::Reasoning), join(Channel::Answer))
    }

    #[test]
    fn streamed_reasoning_split_matches_whole_split() {
        // Tags cut across pieces at every position.
        let text = "<think>\nplan a b</think>\n\nThe answer.";
        for cut in 0..text.len() {
            let (r, a) = split_streamed("", &[&text[..cut], &text[cut..]]);
            assert_eq!(
                (r.trim(), a.as_str()),
                ("plan a b", "The answer."),
                "cut at {cut}"
            );
        }
        let chars: Vec<String> = "x y</think>\n\nZ".chars().map(String::from).collect();
        let pieces: Vec<&str> = chars.iter().map(String::as_str).collect();
        assert_eq!(
            split_streamed("<|im_start|>assistant\n<think>\n", &pieces),
            ("x y".into(), "Z".into())
        );
        assert_eq!(
            split_streamed("", &["plain ", "<thin", "g> text"]),
            ("".into(), "plain <thing> text".into())
        );
        assert_eq!(split_streamed("", &["<", "b>"]), ("".into(), "<b>".into()));
        assert_eq!(
            split_streamed("<think>\n", &["never closed </thi"]),
            ("never closed </thi".into(), "".into())
        );
    }

    #[test]
    fn reasoning_split() {
        assert_eq!(
            split_reasoning("x\n</think>\n\nY"),
            (Some("x".into()), "Y".into())
        );
        assert_eq!(
            split_reasoning("<think>x</think>Y"),
            (Some("x".into()), "Y".into())
        );
        assert_eq!(split_reasoning("just text"), (None, "just text".into()));
    }
}
