//! Chat templates (Jinja, as shipped in `tokenizer_config.json` or GGUF metadata),
//! rendered with minijinja in the configuration transformers uses (trim_blocks,
//! lstrip_blocks, Python string methods). minijinja cannot run arbitrary code, which
//! makes a template from an untrusted checkpoint safe to render.

use crate::error::{Error, Result};
use minijinja::{Environment, Value};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use this for "today's date" in system prompts; a fixed clock keeps
            // prompts reproducible, and only %d %b %Y style formats are common.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::Invalid(format!("chat template does not parse: {e}")))?;
        Ok(ChatTemplate { env, bos: bos.to_string(), eos: eos.to_string() })
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| Error::Invalid(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Invalid(format!("chat template failed: {e}")))
    }
}

/// Splits a thinking model's output into (reasoning, answer). Qwen3-Thinking's template
/// opens `<think>` in the prompt, so the output may hold only the closing tag.
pub fn split_reasoning(text: &str) -> (Option<String>, String) {
    match text.find("</think>") {
        Some(end) => {
            let before = &text[..end];
            let reasoning = before.strip_prefix("<think>").unwrap_or(before).trim().to_string();
            (Some(reasoning), text[end + "</think>".len()..].trim_start().to_string())
        }
        None => (None, text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders_like_transformers() {
        let src = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
        let t = ChatTemplate::new(src, "", "<|im_end|>").unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
    }

    #[test]
    fn python_string_methods_work() {
        let src = "{{ messages[0].content.split('</think>')[-1].strip() }}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(t.render(&[Message::new("assistant", "a</think>  b ")], false).unwrap(), "b");
    }

    #[test]
    fn reasoning_split() {
        assert_eq!(split_reasoning("x\n</think>\n\nY"), (Some("x".into()), "Y".into()));
        assert_eq!(split_reasoning("<think>x</think>Y"), (Some("x".into()), "Y".into()));
        assert_eq!(split_reasoning("just text"), (None, "just text".into()));
    }
}
