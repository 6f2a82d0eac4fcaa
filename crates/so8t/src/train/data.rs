//! Labelled JSONL for training and evaluation: one object per line with `prompt` (a user
//! message) or `messages` (a chat, ending with the user's turn), an optional `response`,
//! optional labels of the prompt, `safety` and `authority`, and of every token of the
//! response, `response_safety` and `response_authority`, in the names of the model's
//! `so8t_config.json` (`safe`/`unsafe`, `handle`/`escalate`). `source`, `family` and
//! `category` are free text kept for per-source reports; other keys are ignored, as HF
//! `datasets` users expect of extra columns.

use crate::chat::Message;
use crate::error::{Error, Result};
use crate::artifact::adapter::Labels;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
pub struct Example {
    /// 1-based line number in the file.
    pub line: usize,
    pub messages: Vec<Message>,
    pub response: Option<String>,
    /// The prompt's labels. `Some(true)` = unsafe.
    pub safety: Option<bool>,
    /// `Some(true)` = escalate.
    pub authority: Option<bool>,
    /// The labels of every token of the response.
    pub response_safety: Option<bool>,
    pub response_authority: Option<bool>,
    pub source: Option<String>,
    pub family: Option<String>,
    pub category: Option<String>,
}

impl Example {
    /// The label of head `h` (0 = safety, 1 = authority).
    pub fn label(&self, head: usize) -> Option<bool> {
        if head == 0 {
            self.safety
        } else {
            self.authority
        }
    }

    /// The label of head `h` on the response's tokens.
    pub fn response_label(&self, head: usize) -> Option<bool> {
        if head == 0 {
            self.response_safety
        } else {
            self.response_authority
        }
    }

    /// Every label of head `h` over `examples`: the prompt's, then the response's, where given.
    pub fn head_labels(examples: &[Example], head: usize) -> Vec<bool> {
        examples
            .iter()
            .flat_map(|e| [e.label(head), e.response_label(head)])
            .flatten()
            .collect()
    }

    /// The family of rows this one belongs to (its `family`, else its `source`).
    pub fn group(&self) -> &str {
        self.family
            .as_deref()
            .or(self.source.as_deref())
            .unwrap_or("-")
    }

    pub fn user_text(&self) -> &str {
        self.messages.last().map_or("", |m| m.content.as_str())
    }
}

pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// (line, reason) of rows left out with `skip_bad`.
    pub skipped: Vec<(usize, String)>,
}

#[derive(Deserialize)]
struct Row {
    prompt: Option<serde_json::Value>,
    messages: Option<serde_json::Value>,
    response: Option<serde_json::Value>,
    safety: Option<serde_json::Value>,
    authority: Option<serde_json::Value>,
    response_safety: Option<serde_json::Value>,
    response_authority: Option<serde_json::Value>,
    source: Option<serde_json::Value>,
    family: Option<serde_json::Value>,
    category: Option<serde_json::Value>,
}

fn string(v: &serde_json::Value, field: &str) -> std::result::Result<String, String> {
    v.as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("`{field}` must be a string"))
}

fn label(
    v: &Option<serde_json::Value>,
    field: &str,
    names: &[String; 2],
) -> std::result::Result<Option<bool>, String> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => {
            let s = string(v, field)?;
            match names.iter().position(|n| *n == s) {
                Some(i) => Ok(Some(i == 1)),
                None => Err(format!(
                    "unknown {field} label `{s}` (expected `{}` or `{}`)",
                    names[0], names[1]
                )),
            }
        }
    }
}

fn parse_row(text: &str, line: usize, labels: &Labels) -> std::result::Result<Example, String> {
    let row: Row = serde_json::from_str(text).map_err(|e| format!("not a JSON object: {e}"))?;
    let messages = match (&row.prompt, &row.messages) {
        (Some(p), None) => vec![Message::new("user", &string(p, "prompt")?)],
        (None, Some(serde_json::Value::Array(items))) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                let role = m
                    .get("role")
                    .map(|r| string(r, &format!("messages[{i}].role")))
                    .transpose()?;
                let content = m
                    .get("content")
                    .map(|c| string(c, &format!("messages[{i}].content")))
                    .transpose()?;
                match (role, content) {
                    (Some(r), Some(c)) if ["system", "user", "assistant"].contains(&r.as_str()) => {
                        out.push(Message::new(&r, &c))
                    }
                    (Some(r), Some(_)) => {
                        return Err(format!(
                            "messages[{i}].role `{r}` is not system, user or assistant"
                        ))
                    }
                    _ => return Err(format!("messages[{i}] needs `role` and `content`")),
                }
            }
            if out.last().map(|m| m.role.as_str()) != Some("user") {
                return Err("the last message must be the user's (put the assistant's answer in `response`)".into());
            }
            out
        }
        (None, Some(_)) => return Err("`messages` must be an array of {role, content}".into()),
        (Some(_), Some(_)) => return Err("give `prompt` or `messages`, not both".into()),
        (None, None) => return Err("needs `prompt` or `messages`".into()),
    };
    let opt = |v: &Option<serde_json::Value>, f: &str| match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) => string(v, f).map(Some),
    };
    let response = opt(&row.response, "response")?;
    let response_safety = label(&row.response_safety, "response_safety", &labels.safety)?;
    let response_authority =
        label(&row.response_authority, "response_authority", &labels.authority)?;
    if response.is_none() && (response_safety.is_some() || response_authority.is_some()) {
        return Err("`response_safety`/`response_authority` label a `response`, and there is none".into());
    }
    Ok(Example {
        line,
        messages,
        response,
        safety: label(&row.safety, "safety", &labels.safety)?,
        authority: label(&row.authority, "authority", &labels.authority)?,
        response_safety,
        response_authority,
        source: opt(&row.source, "source")?,
        family: opt(&row.family, "family")?,
        category: opt(&row.category, "category")?,
    })
}

/// Reads a JSONL file. A bad row stops the read with its line number unless `skip_bad`,
/// which leaves it out and records why. Blank lines are allowed.
pub fn read_jsonl(path: &Path, labels: &Labels, skip_bad: bool) -> Result<Dataset> {
    let text = crate::files::read_text(path, crate::files::DATA_LIMIT)?;
    parse_jsonl(&text, path, labels, skip_bad)
}

/// [`read_jsonl`] of text already read; `path` names it in errors.
pub fn parse_jsonl(text: &str, path: &Path, labels: &Labels, skip_bad: bool) -> Result<Dataset> {
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_row(line, i + 1, labels) {
            Ok(e) => examples.push(e),
            Err(why) if skip_bad => skipped.push((i + 1, why)),
            Err(why) => {
                return Err(Error::format(
                    path,
                    format!(
                        "line {}: {why} (use --skip-bad to leave bad rows out)",
                        i + 1
                    ),
                ))
            }
        }
    }
    if examples.is_empty() {
        return Err(Error::format(path, "holds no usable rows"));
    }
    Ok(Dataset {
        path: path.to_path_buf(),
        examples,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str, skip: bool) -> Result<Dataset> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, text).unwrap();
        read_jsonl(&p, &Labels::default(), skip)
    }

    #[test]
    fn rows_and_labels() {
        let d = read(
            "{\"prompt\":\"hi\",\"safety\":\"safe\",\"extra\":1}\n\n{\"messages\":[{\"role\":\"system\",\"content\":\"s\"},{\"role\":\"user\",\"content\":\"u\"}],\"response\":\"r\",\"authority\":\"escalate\"}\n",
            false,
        )
        .unwrap();
        assert_eq!(d.examples.len(), 2);
        assert_eq!(
            (d.examples[0].safety, d.examples[0].authority),
            (Some(false), None)
        );
        assert_eq!(
            (
                d.examples[1].line,
                d.examples[1].authority,
                d.examples[1].messages.len()
            ),
            (3, Some(true), 2)
        );
        assert_eq!(d.examples[1].response.as_deref(), Some("r"));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let e = read(
            "{\"prompt\":\"a\"}\n{\"prompt\":\"b\",\"safety\":\"harmful\"}\n",
            false,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(
            e.contains("line 2") && e.contains("unknown safety label `harmful`"),
            "{e}"
        );
        let e = read("{\"prompt\":\"a\"}\nnot json\n", false)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("line 2") && e.contains("not a JSON object"),
            "{e}"
        );
        let d = read("{\"prompt\":\"a\"}\nnot json\n{\"prompt\":3}\n", true).unwrap();
        assert_eq!(d.examples.len(), 1);
        assert_eq!(
            d.skipped.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![2, 3]
        );
        let e = read("{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"assistant\",\"content\":\"b\"}]}\n", false).err().unwrap();
        assert!(
            e.to_string().contains("last message must be the user's"),
            "{e}"
        );
    }
}
