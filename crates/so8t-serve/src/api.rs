//! The OpenAI request shapes this server accepts, their checks, and OpenAI's error object.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};
use so8t::chat::{Message, Part as MessagePart};
use so8t::sampling::SamplingRequest;

/// An error as OpenAI's API returns it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param),
            code: None,
        }
    }

    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
        }
    }

    /// 413, whether the body said so in `Content-Length` or grew past the limit.
    pub fn body_too_large() -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            None,
            "the request body is larger than the server's limit (--max-body)",
        )
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            message,
        )
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(r: axum::extract::rejection::JsonRejection) -> ApiError {
        use axum::extract::rejection::JsonRejection as J;
        let status = match &r {
            J::BytesRejection(_) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return ApiError::body_too_large()
            }
            J::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError::new(status, "invalid_request_error", None, r.body_text())
    }
}

/// Reads `T` out of a request body, naming the field that does not fit. (Each request
/// is read twice, as its route's fields and as [`Sampling`], rather than with
/// `#[serde(flatten)]`, which would lose the field's name from the message.)
pub fn parse<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "the request body must be a JSON object",
        ));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let message = format!("`{path}`: {}", e.inner());
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message,
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    })
}

/// Message content: a string, or OpenAI's list of parts (text, and images for a vision
/// model).
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
    pub image_url: Option<ImageUrl>,
}

#[derive(Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

#[derive(Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<Content>,
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and length fields shared by both completion routes. Numbers are read wide
/// (i64/f64) so that a negative or oversize value gets a message naming the field rather
/// than a type error.
#[derive(Deserialize, Default)]
pub struct Sampling {
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repeat_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub stop: Option<Stop>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// SO8T: `off` (default), `flag` (report only) or `stop` (end at the first unsafe token).
    pub moderation: Option<String>,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<ChatMessage>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    pub tools: Option<Value>,
}

/// `prompt`: a string, a one-element list of strings, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Prompt,
    /// Legacy completions: how many alternatives per token (0–5).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    pub suffix: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum ModerationInput {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
pub struct ModerationRequest {
    pub model: Option<String>,
    pub input: ModerationInput,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moderation {
    Off,
    Flag,
    Stop,
}

impl Moderation {
    pub fn name(self) -> &'static str {
        match self {
            Moderation::Off => "off",
            Moderation::Flag => "flag",
            Moderation::Stop => "stop",
        }
    }
}

/// The sampling request after its checks.
pub struct Checked {
    pub max_tokens: Option<usize>,
    pub sampling: SamplingRequest,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub moderation: Moderation,
}

impl Sampling {
    pub fn check(&self) -> Result<Checked, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => Some(("max_completion_tokens", v)),
            (None, Some(v)) => Some(("max_tokens", v)),
            (None, None) => None,
        };
        if let Some((param, v)) = max_tokens {
            if v < 1 {
                return Err(ApiError::invalid(
                    param,
                    format!("`{param}` must be at least 1, got {v}"),
                ));
            }
        }
        if let Some(n) = self.n {
            if n != 1 {
                return Err(ApiError::invalid(
                    "n",
                    format!("only n = 1 is supported, got {n}"),
                ));
            }
        }
        for (param, v) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
        ] {
            if v.is_some_and(|x| x != 0.0) {
                return Err(ApiError::invalid(
                    param,
                    format!("`{param}` is not supported (use repeat_penalty)"),
                ));
            }
        }
        let top_k = match self.top_k {
            Some(k) if k < 0 => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("`top_k` must be 0 (off) or more, got {k}"),
                ))
            }
            k => k.map(|k| k as usize),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::invalid(
                "stop",
                "`stop` takes up to 4 non-empty strings",
            ));
        }
        let moderation = match self.moderation.as_deref() {
            None | Some("off") => Moderation::Off,
            Some("flag") => Moderation::Flag,
            Some("stop") => Moderation::Stop,
            Some(other) => {
                return Err(ApiError::invalid(
                    "moderation",
                    format!("`moderation` must be off, flag or stop, got `{other}`"),
                ))
            }
        };
        let sampling = SamplingRequest {
            temperature: self.temperature.map(|x| x as f32),
            top_k,
            top_p: self.top_p.map(|x| x as f32),
            min_p: self.min_p.map(|x| x as f32),
            repeat_penalty: self.repeat_penalty.map(|x| x as f32),
            seed: self.seed.map(|s| s as u64),
        };
        sampling
            .check()
            .map_err(|b| ApiError::invalid(b.field, b.message))?;
        Ok(Checked {
            max_tokens: max_tokens.map(|(_, v)| v as usize),
            sampling,
            stop,
            stream: self.stream,
            include_usage: self
                .stream_options
                .as_ref()
                .is_some_and(|o| o.include_usage),
            moderation,
        })
    }
}

impl ChatRequest {
    /// The conversation, and the URLs of its images in the order they appear.
    pub fn messages(&self) -> Result<(Vec<Message>, Vec<String>), ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must hold at least one message",
            ));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::invalid("tools", "tool calls are not supported"));
        }
        let mut images = Vec::new();
        let messages = self
            .messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
                    return Err(ApiError::invalid("messages", format!("messages[{i}].role `{}` is not a known role", m.role)));
                }
                // The templates know `system`; OpenAI's newer `developer` role means the same.
                let role = if m.role == "developer" { "system" } else { m.role.as_str() };
                let content = match &m.content {
                    // OpenAI allows a null content only on an assistant turn (one that
                    // called tools); any other turn without text is a client's mistake.
                    None if m.role == "assistant" => String::new(),
                    None => {
                        return Err(ApiError::invalid(
                            "messages",
                            format!("messages[{i}].content is missing (a {} message needs text)", m.role),
                        ))
                    }
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        if let Some(p) = parts.iter().find(|p| p.kind != "text" && p.kind != "image_url") {
                            return Err(ApiError::invalid("messages", format!("messages[{i}]: content parts of type `{}` are not supported (text and image_url)", p.kind)));
                        }
                        if parts.iter().any(|p| p.kind == "image_url") {
                            let mut out = Vec::with_capacity(parts.len());
                            for (k, p) in parts.iter().enumerate() {
                                match (p.kind.as_str(), &p.text, &p.image_url) {
                                    ("text", Some(t), _) => out.push(MessagePart::Text(t.clone())),
                                    ("image_url", _, Some(u)) => {
                                        images.push(u.url.clone());
                                        out.push(MessagePart::Image);
                                    }
                                    (kind, _, _) => {
                                        let field = if kind == "text" { "text" } else { "image_url.url" };
                                        return Err(ApiError::invalid("messages", format!("messages[{i}].content[{k}]: a `{kind}` part needs `{field}`")));
                                    }
                                }
                            }
                            return Ok(Message::with_parts(role, out));
                        }
                        parts.iter().filter_map(|p| p.text.as_deref()).collect::<Vec<_>>().join("\n")
                    }
                };
                Ok(Message::new(role, &content))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((messages, images))
    }
}

/// An image part's bytes: a base64 `data:image/…` URL (OpenAI's way to send a local
/// image), at most `limit` bytes once decoded. Remote URLs are refused: the server fetches
/// nothing on a client's behalf.
pub fn image_bytes(url: &str, limit: usize) -> Result<Vec<u8>, ApiError> {
    use base64::Engine as _;
    let bad = |m: String| ApiError::invalid("messages", m);
    let Some(rest) = url.strip_prefix("data:") else {
        let scheme = url.split(':').next().unwrap_or("");
        return Err(bad(format!(
            "image_url: `{scheme}:` URLs are not fetched; send the image inline as a data:image/png;base64,… URL"
        )));
    };
    let (head, data) = rest
        .split_once(',')
        .ok_or_else(|| bad("image_url: a data URL needs a `,` before its data".into()))?;
    let Some(mime) = head.strip_suffix(";base64") else {
        return Err(bad("image_url: the data URL must be base64 (`data:image/png;base64,…`)".into()));
    };
    if !["image/png", "image/jpeg", "image/jpg"].contains(&mime) {
        return Err(bad(format!("image_url: `{mime}` images are not supported (PNG or JPEG)")));
    }
    // Base64 is 4 characters per 3 bytes: the text's length bounds the bytes before decoding.
    if data.len() / 4 * 3 > limit + 3 {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!("image_url: the image is larger than the limit of {limit} bytes"),
            kind: "invalid_request_error",
            param: Some("messages"),
            code: None,
        });
    }
    base64::engine::general_purpose::STANDARD
        .decode(data.trim_end())
        .map_err(|e| bad(format!("image_url: the data is not valid base64: {e}")))
}

/// Fuzzing entry point (`fuzz/`, FUZZING.md): a request body through every route's
/// parsing and checks; whatever the bytes, it returns without panicking.
pub fn fuzz_request(bytes: &[u8]) {
    let Ok(body) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    if let Ok(r) = parse::<ChatRequest>(&body) {
        if let Ok((_, images)) = r.messages() {
            for url in images {
                let _ = image_bytes(&url, 1 << 16);
            }
        }
    }
    if let Ok(s) = parse::<Sampling>(&body) {
        let _ = s.check();
    }
    let _ = parse::<CompletionRequest>(&body);
    let _ = parse::<ModerationRequest>(&body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(v: Value) -> Result<Checked, ApiError> {
        serde_json::from_value::<Sampling>(v).unwrap().check()
    }

    #[test]
    fn checks_name_the_field() {
        let e = sampling(json!({"max_tokens": -1})).err().unwrap();
        assert_eq!(
            (e.status, e.param),
            (StatusCode::BAD_REQUEST, Some("max_tokens"))
        );
        assert_eq!(
            sampling(json!({"temperature": 3.0})).err().unwrap().param,
            Some("temperature")
        );
        assert_eq!(sampling(json!({"n": 2})).err().unwrap().param, Some("n"));
        assert_eq!(
            sampling(json!({"moderation": "block"}))
                .err()
                .unwrap()
                .param,
            Some("moderation")
        );
        assert_eq!(
            sampling(json!({"stop": ["a", "b", "c", "d", "e"]}))
                .err()
                .unwrap()
                .param,
            Some("stop")
        );
        let ok = sampling(
            json!({"max_completion_tokens": 5, "max_tokens": 9, "stop": "x", "moderation": "stop"}),
        )
        .ok()
        .unwrap();
        assert_eq!(
            (ok.max_tokens, ok.stop, ok.moderation),
            (Some(5), vec!["x".to_string()], Moderation::Stop)
        );
    }

    #[test]
    fn type_errors_name_the_field() {
        let e = parse::<Sampling>(&json!({"max_tokens": "a"}))
            .err()
            .unwrap();
        assert!(
            e.message.starts_with("`max_tokens`: invalid type"),
            "{}",
            e.message
        );
        let e = parse::<ChatRequest>(&json!({"messages": [{"role": 3}]}))
            .err()
            .unwrap();
        assert!(e.message.starts_with("`messages[0].role`"), "{}", e.message);
        assert!(parse::<ChatRequest>(&json!([1])).is_err());
    }

    #[test]
    fn image_urls_are_data_urls_of_png_or_jpeg_within_the_limit() {
        assert_eq!(image_bytes("data:image/png;base64,aGVsbG8=", 16).unwrap(), b"hello");
        for (url, want) in [
            ("https://example.com/a.png", "`https:` URLs are not fetched"),
            ("file:///etc/passwd", "`file:` URLs are not fetched"),
            ("data:image/png,hello", "must be base64"),
            ("data:image/gif;base64,aGVsbG8=", "`image/gif` images are not supported"),
            ("data:image/png;base64,@@@@", "not valid base64"),
            ("data:image/png;base64", "needs a `,`"),
        ] {
            let e = image_bytes(url, 16).unwrap_err();
            assert!(e.message.contains(want), "{url}: {}", e.message);
        }
        let big = format!("data:image/png;base64,{}", "A".repeat(4000));
        assert_eq!(image_bytes(&big, 1000).unwrap_err().status, StatusCode::PAYLOAD_TOO_LARGE);
    }

    #[test]
    fn content_parts_join_and_roles_are_checked() {
        let r: ChatRequest = serde_json::from_value(json!({"messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
        ]}))
        .unwrap();
        let (m, images) = r.messages().ok().unwrap();
        assert_eq!(
            m,
            vec![
                Message::new("system", "be brief"),
                Message::new("user", "a\nb")
            ]
        );
        assert!(images.is_empty());
        let r: ChatRequest = serde_json::from_value(json!({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, {"type": "text", "text": "what?"}]}
        ]}))
        .unwrap();
        let (m, images) = r.messages().ok().unwrap();
        assert_eq!(m, vec![Message::with_parts("user", vec![MessagePart::Image, MessagePart::Text("what?".into())])]);
        assert_eq!(images, vec!["data:image/png;base64,AAAA".to_string()]);
        let r: ChatRequest =
            serde_json::from_value(json!({"messages": [{"role": "wizard", "content": "x"}]}))
                .unwrap();
        assert!(r.messages().err().unwrap().message.contains("wizard"));
    }
}
