//! An Ollama Modelfile for a GGUF: FROM, a Go TEMPLATE equivalent to the model's Jinja
//! chat template (ChatML as Qwen and SmolLM use it, and Llama 3's header format), the
//! template's default system prompt, stop tokens, and sampling defaults.

use crate::chat::{ChatTemplate, Message};
use crate::error::{Error, Result};
use crate::formats::gguf::GgufFile;
use crate::load::GenerationDefaults;
use crate::tokenizer::TextTokenizer;
use std::path::Path;

const CHATML: &str = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
const LLAMA3: &str = "<|begin_of_text|>{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}{{ range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n";

pub struct ModelfileOptions<'a> {
    pub from: &'a str,
    pub system: Option<&'a str>,
    pub generation: GenerationDefaults,
}

pub fn modelfile(gguf: &Path, opts: &ModelfileOptions) -> Result<String> {
    let g = GgufFile::open(gguf)?;
    // A Modelfile for a file Ollama cannot load helps nobody: the model's settings are
    // checked as every loader checks them (the tensors' shapes are not: that needs the
    // decoder's layout, and loading a large model only to write a text file is too slow).
    g.config()?;
    let tok = TextTokenizer::from_gguf(&g)?;
    let src = tok
        .chat_template
        .clone()
        .ok_or_else(|| Error::format(gguf, "no tokenizer.chat_template: nothing to translate"))?;
    let (go, start, end) = if src.contains("<|im_start|>") {
        (CHATML, "<|im_start|>system\n", "<|im_end|>\n")
    } else if src.contains("<|start_header_id|>") {
        (
            LLAMA3,
            "<|start_header_id|>system<|end_header_id|>\n\n",
            "<|eot_id|>",
        )
    } else {
        return Err(Error::format(
            gguf,
            "chat template is neither ChatML nor Llama 3 style; no Go template equivalent is known",
        ));
    };
    // The default system prompt a template adds when the conversation has none (Qwen2.5's
    // "You are Qwen…", SmolLM2's "You are a helpful AI assistant named SmolLM…"): render
    // with only a user message and read it back.
    let t = ChatTemplate::new(&src, &tok.bos_text, &tok.eos_text)?;
    let probe = t.render(&[Message::new("user", "\u{1}")], true)?;
    let default_system = probe.find(start).and_then(|i| {
        let rest = &probe[i + start.len()..];
        rest.find(end).map(|j| rest[..j].to_string())
    });
    let mut m = format!("FROM {}\nTEMPLATE \"\"\"{go}\"\"\"\n", opts.from);
    if let Some(s) = opts.system.map(str::to_string).or(default_system) {
        // Ollama's parser ends a triple-quoted value at the first `"""` and has no escape
        // for it: such a prompt would inject Modelfile lines.
        if s.contains("\"\"\"") {
            return Err(Error::format(
                gguf,
                "the system prompt contains `\"\"\"`, which a Modelfile cannot quote",
            ));
        }
        m += &format!("SYSTEM \"\"\"{s}\"\"\"\n");
    }
    let mut stops: Vec<String> = tok
        .eog
        .iter()
        .filter_map(|&id| tok.token_text(id))
        .collect();
    stops.sort();
    stops.dedup();
    for s in stops {
        if s.contains(['"', '\n', '\r']) {
            return Err(Error::format(
                gguf,
                format!("stop token {s:?} contains a quote or a line break, which a Modelfile cannot quote"),
            ));
        }
        m += &format!("PARAMETER stop \"{s}\"\n");
    }
    let gd = &opts.generation;
    if let Some(v) = gd.temperature {
        m += &format!("PARAMETER temperature {v}\n");
    }
    if let Some(v) = gd.top_k {
        m += &format!("PARAMETER top_k {v}\n");
    }
    if let Some(v) = gd.top_p {
        m += &format!("PARAMETER top_p {v}\n");
    }
    if let Some(v) = gd.repetition_penalty {
        m += &format!("PARAMETER repeat_penalty {v}\n");
    }
    Ok(m)
}
