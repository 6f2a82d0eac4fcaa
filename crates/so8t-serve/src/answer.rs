//! A generation request from checked input to its answer: the prompt, the engine job,
//! the tracker that follows every token (text, verdicts, logprobs, the moderation
//! decision), the whole (non-streamed) answer and the audit row.

use crate::api::{ApiError, Checked, Moderation};
use crate::audit::{self, Record};
use crate::engine::{Event, Finish};
use crate::state::{new_id, sha256_hex, unix_now, AppState, St};
use axum::http::StatusCode;
use rand::Rng;
use serde_json::{json, Value};
use so8t::chat::{Channel, Message, ReasoningSplitter};
use so8t::generate::GenerateRequest;
use so8t::artifact::adapter::So8tConfig;
use so8t::so8::verdict::{ResponseJudge, Verdict};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

/// A checked generation request, ready for the engine.
pub(crate) struct Prepared {
    pub(crate) kind: Kind,
    pub(crate) id: String,
    pub(crate) prompt_text: String,
    pub(crate) checked: Checked,
    /// Alternatives per token to report, when logprobs were asked for.
    pub(crate) logprobs: Option<usize>,
    pub(crate) req: GenerateRequest,
}

pub(crate) fn prepare(
    st: &AppState,
    kind: Kind,
    prompt_text: String,
    (prompt_ids, verdict_position): (Vec<u32>, Option<usize>),
    media: Option<std::sync::Arc<so8t::model::Media>>,
    checked: Checked,
    logprobs: Option<usize>,
) -> Result<Prepared, ApiError> {
    if prompt_ids.is_empty() {
        return Err(ApiError::invalid(
            if kind == Kind::Chat {
                "messages"
            } else {
                "prompt"
            },
            "the prompt is empty",
        ));
    }
    let room = st.ctx.saturating_sub(prompt_ids.len());
    let too_long = |asked: usize| {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({} in the prompt, {asked} for the completion).",
                st.ctx,
                prompt_ids.len() + asked,
                prompt_ids.len()
            ),
            kind: "invalid_request_error",
            param: Some(if kind == Kind::Chat { "messages" } else { "prompt" }),
            code: Some("context_length_exceeded"),
        }
    };
    if room == 0 {
        return Err(too_long(1));
    }
    let max_tokens = match checked.max_tokens {
        Some(n) if n > room => return Err(too_long(n)),
        Some(n) => n,
        None => st.default_max_tokens.min(room),
    };
    if checked.moderation != Moderation::Off {
        match &st.so8t {
            None => {
                return Err(ApiError::invalid(
                    "moderation",
                    "this model has no SO8T heads, so it cannot moderate",
                ))
            }
            Some(c) if !c.heads_trained && checked.moderation == Moderation::Stop => {
                return Err(ApiError::invalid(
                    "moderation",
                    "this model's heads are untrained: `stop` would act on meaningless scores",
                ))
            }
            _ => {}
        }
    }
    let g = &st.generation;
    let sampling = checked.sampling.resolve(g, || rand::rng().random());
    let req = GenerateRequest {
        prompt_ids,
        max_tokens,
        sampling,
        stop: checked.stop.clone(),
        top_logprobs: logprobs.map_or(0, |n| n.max(1)),
        verdict_every_token: true,
        verdict_position,
        media,
    };
    let id = new_id(if kind == Kind::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    });
    Ok(Prepared {
        kind,
        id,
        prompt_text,
        checked,
        logprobs,
        req,
    })
}

/// The rendered chat prompt (what the audit log hashes), its ids, and the token whose
/// verdict is the prompt's (`None` for the last; spec §5's setting); errors name `param`.
pub(crate) fn chat_prompt(
    st: &AppState,
    messages: &[Message],
    param: &'static str,
) -> Result<(String, Vec<u32>, Option<usize>), ApiError> {
    let bad = |e: so8t::Error| ApiError::invalid(param, e.to_string());
    let so8t::tokenizer::ChatPrompt { text, ids } =
        st.tokenizer.chat_prompt(messages).map_err(bad)?;
    let at = match &st.so8t {
        Some(c) => c
            .verdict_position
            .index(&st.tokenizer, messages, &ids)
            .map_err(bad)?,
        None => None,
    };
    Ok((text, ids, at))
}

/// The model's vision side, for a request with images.
pub(crate) fn vision(st: &AppState) -> Result<std::sync::Arc<so8t::vision::Vision>, ApiError> {
    st.vision
        .clone()
        .ok_or_else(|| ApiError::invalid("messages", "this model takes no images (image_url parts need a vision model)"))
}

/// A chat prompt with images: each image's data URL decoded and preprocessed, its
/// placeholder in `ids` expanded to its merged patches, and its features computed (on a
/// blocking task: the vision tower is a forward pass of its own). Returns the prompt's
/// ids, its verdict position moved with them, and what the decoder takes for the images.
pub(crate) async fn image_prompt(
    vision: std::sync::Arc<so8t::vision::Vision>,
    ids: Vec<u32>,
    at: Option<usize>,
    urls: &[String],
) -> Result<(Vec<u32>, Option<usize>, std::sync::Arc<so8t::model::Media>), ApiError> {
    let limit = so8t::load::IMAGE_FILE_LIMIT as usize;
    let bytes = urls.iter().map(|u| crate::api::image_bytes(u, limit)).collect::<Result<Vec<_>, _>>()?;
    let work = move || -> so8t::Result<_> {
        let images = bytes
            .iter()
            .enumerate()
            .map(|(k, b)| vision.processor.preprocess(b, std::path::Path::new(&format!("image {}", k + 1))))
            .collect::<so8t::Result<Vec<_>>>()?;
        let (ids, at, media) = vision.expanded_prompt(&ids, at, &images)?;
        Ok((ids, at, std::sync::Arc::new(media)))
    };
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::invalid("messages", format!("image processing failed: {e}")))?
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}

/// What the answer so far holds; feeds the final response, the audit row and metrics.
pub(crate) struct Tracker {
    started: Instant,
    pub(crate) prompt_verdict: Option<Verdict>,
    /// The streaming rule over the answer (the engine's, at the end); its `max` is the
    /// response's verdict.
    pub(crate) judge: ResponseJudge,
    first_token: Option<Instant>,
    tokens: Vec<u32>,
    pub(crate) logprobs: Vec<Value>,
    answer: String,
    reasoning: String,
    pub(crate) splitter: ReasoningSplitter,
    pub(crate) finish: Option<Finish>,
}

impl Tracker {
    pub(crate) fn new(p: &Prepared) -> Tracker {
        let prompt_for_split = if p.kind == Kind::Chat {
            p.prompt_text.as_str()
        } else {
            ""
        };
        Tracker {
            started: Instant::now(),
            prompt_verdict: None,
            judge: ResponseJudge::default(),
            first_token: None,
            tokens: Vec::new(),
            logprobs: Vec::new(),
            answer: String::new(),
            reasoning: String::new(),
            splitter: ReasoningSplitter::new(prompt_for_split),
            finish: None,
        }
    }

    pub(crate) fn token(
        &mut self,
        st: &AppState,
        p: &Prepared,
        id: u32,
        text: &str,
        top: &[(u32, f32)],
    ) -> Vec<(Channel, String)> {
        self.first_token.get_or_insert_with(Instant::now);
        self.tokens.push(id);
        if let Some(n) = p.logprobs {
            self.logprobs.push(token_logprob(st, p.kind, id, top, n));
        }
        let pieces = if p.kind == Kind::Chat {
            self.splitter.push(text)
        } else {
            vec![(Channel::Answer, text.to_string())]
        };
        self.keep(&pieces);
        pieces
    }

    pub(crate) fn keep(&mut self, pieces: &[(Channel, String)]) {
        for (c, t) in pieces {
            match c {
                Channel::Answer => self.answer.push_str(t),
                Channel::Reasoning => self.reasoning.push_str(t),
            }
        }
    }

    pub(crate) fn so8t(&self, st: &AppState, moderation: Moderation) -> Value {
        let Some(cfg) = &st.so8t else {
            return Value::Null;
        };
        json!({
            "prompt": self.prompt_verdict,
            "response": self.judge.max,
            "response_flagged_at": {"unsafe": self.judge.unsafe_at, "escalate": self.judge.escalate_at},
            "decision": cfg.decide(self.prompt_verdict, &self.judge).map(|d| d.name()),
            "heads_trained": cfg.heads_trained,
            "thresholds": thresholds_json(cfg),
            "moderation": moderation.name(),
        })
    }

    pub(crate) fn record(
        &self,
        st: &AppState,
        p: &Prepared,
        endpoint: &str,
        finish: &str,
    ) -> Record {
        let decision = self.so8t(st, p.checked.moderation)["decision"]
            .as_str()
            .map(String::from);
        Record {
            time: audit::now(),
            request_id: p.id.clone(),
            endpoint: endpoint.into(),
            model_sha256: st.model_sha256.clone(),
            prompt_sha256: sha256_hex(&p.prompt_text),
            prompt_text: st.audit_text.then(|| p.prompt_text.clone()),
            prompt_p_unsafe: self.prompt_verdict.map(|v| v.p_unsafe),
            prompt_p_escalate: self.prompt_verdict.map(|v| v.p_escalate),
            response_p_unsafe: self.judge.max.map(|v| v.p_unsafe),
            response_p_escalate: self.judge.max.map(|v| v.p_escalate),
            decision,
            moderation: p.checked.moderation.name().into(),
            finish_reason: finish.into(),
            prompt_tokens: p.req.prompt_ids.len(),
            completion_tokens: self.tokens.len(),
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
        }
    }

    /// Metrics and the audit row, once the answer is complete (before the client sees
    /// its end, so an answered request is always in the log).
    pub(crate) async fn close(&self, st: &St, p: &Prepared) -> Result<(), ApiError> {
        let finish = self.finish.map_or("error", |f| f.name());
        let m = &st.metrics;
        m.add(
            "so8t_prompt_tokens_total",
            "",
            p.req.prompt_ids.len() as f64,
        );
        m.add("so8t_completion_tokens_total", "", self.tokens.len() as f64);
        m.add("so8t_finish_total", &format!("reason=\"{finish}\""), 1.0);
        if st.so8t.is_some() {
            let d = self.so8t(st, p.checked.moderation)["decision"]
                .as_str()
                .unwrap_or("none")
                .to_string();
            m.add("so8t_decisions_total", &format!("decision=\"{d}\""), 1.0);
        }
        m.observe(
            "so8t_request_duration_seconds",
            self.started.elapsed().as_secs_f64(),
        );
        if let Some(t) = self.first_token {
            m.observe(
                "so8t_time_to_first_token_seconds",
                (t - self.started).as_secs_f64(),
            );
        }
        write_audit(st, self.record(st, p, endpoint(p.kind), finish)).await
    }
}

pub(crate) fn endpoint(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    }
}

pub(crate) async fn write_audit(st: &St, rec: Record) -> Result<(), ApiError> {
    let st = st.clone();
    tokio::task::spawn_blocking(move || match &st.audit {
        Some(a) => a
            .insert(&rec)
            .map_err(|e| ApiError::server(format!("{e:#}"))),
        None => Ok(()),
    })
    .await
    .map_err(|e| ApiError::server(format!("audit writer failed: {e}")))?
}

/// The thresholds as clients see them: prompt, answer tokens (streaming rule), k.
pub(crate) fn thresholds_json(cfg: &So8tConfig) -> Value {
    let t = &cfg.thresholds;
    let r = t.response();
    json!({
        "unsafe": t.unsafe_,
        "escalate": t.escalate,
        "response_unsafe": r[0],
        "response_escalate": r[1],
        "consecutive": t.consecutive,
    })
}

pub(crate) fn token_text(st: &AppState, id: u32) -> String {
    st.tokenizer.decode(&[id]).unwrap_or_default()
}

pub(crate) fn token_logprob(
    st: &AppState,
    kind: Kind,
    id: u32,
    top: &[(u32, f32)],
    n: usize,
) -> Value {
    let lp = top.iter().find(|(t, _)| *t == id).map(|(_, l)| *l);
    let text = token_text(st, id);
    match kind {
        Kind::Chat => json!({
            "token": text,
            "logprob": lp.unwrap_or(f32::NEG_INFINITY).max(-9999.0),
            "bytes": text.as_bytes(),
            "top_logprobs": top.iter().take(n).map(|(t, l)| {
                let s = token_text(st, *t);
                json!({"token": s, "logprob": l, "bytes": s.as_bytes()})
            }).collect::<Vec<_>>(),
        }),
        Kind::Completion => json!({
            "token": text,
            "logprob": lp.unwrap_or(f32::NEG_INFINITY).max(-9999.0),
            "top": top.iter().take(n).map(|(t, l)| (token_text(st, *t), *l)).collect::<Vec<_>>(),
        }),
    }
}

/// Legacy completions' logprobs: parallel lists.
pub(crate) fn legacy_logprobs(items: &[Value], offset0: usize) -> Value {
    let mut offset = offset0;
    let mut offsets = Vec::new();
    for it in items {
        offsets.push(offset);
        offset += it["token"].as_str().map_or(0, str::len);
    }
    json!({
        "tokens": items.iter().map(|i| i["token"].clone()).collect::<Vec<_>>(),
        "token_logprobs": items.iter().map(|i| i["logprob"].clone()).collect::<Vec<_>>(),
        "top_logprobs": items.iter().map(|i| {
            let m: serde_json::Map<String, Value> = i["top"].as_array().into_iter().flatten()
                .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].clone()))).collect();
            Value::Object(m)
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

pub(crate) fn usage(p: &Prepared, t: &Tracker) -> Value {
    let (pt, ct) = (p.req.prompt_ids.len(), t.tokens.len());
    json!({"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})
}

pub(crate) async fn whole_answer(
    st: &St,
    p: &Prepared,
    mut rx: UnboundedReceiver<Event>,
) -> Result<Value, ApiError> {
    let mut c = Collecting {
        st,
        p,
        t: Tracker::new(p),
        audited: false,
        finish: "cancelled",
    };
    loop {
        match rx.recv().await {
            None => {
                c.finish = "error";
                return Err(ApiError::server("the engine stopped"));
            }
            Some(Event::Error(e)) => {
                c.finish = "error";
                return Err(ApiError::server(e));
            }
            Some(Event::Prompt { verdict }) => c.t.prompt_verdict = verdict,
            Some(Event::Token { id, text, top, .. }) => {
                c.t.token(st, p, id, &text, &top);
            }
            Some(Event::Done { finish, judge }) => {
                let rest = c.t.splitter.finish();
                c.t.keep(&rest);
                c.t.finish = Some(finish);
                c.t.judge = judge;
                break;
            }
        }
    }
    let closed = c.t.close(st, p).await;
    c.audited = true;
    closed?;
    let t = &c.t;
    let finish = t.finish.map(|f| f.name());
    let choice = match p.kind {
        Kind::Chat => {
            let mut message = json!({"role": "assistant", "content": t.answer});
            if !t.reasoning.is_empty() {
                message["reasoning_content"] = t.reasoning.clone().into();
            }
            json!({"index": 0, "message": message, "logprobs": p.logprobs.map(|_| json!({"content": t.logprobs})), "finish_reason": finish})
        }
        Kind::Completion => {
            json!({"index": 0, "text": t.answer, "logprobs": p.logprobs.map(|_| legacy_logprobs(&t.logprobs, 0)), "finish_reason": finish})
        }
    };
    Ok(json!({
        "id": p.id,
        "object": if p.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
        "created": unix_now(),
        "model": st.model_id,
        "choices": [choice],
        "usage": usage(p, t),
        "so8t": t.so8t(st, p.checked.moderation),
    }))
}

/// The audit row of a request whose answer was never completed (its client left:
/// `cancelled`; the engine failed: `error`), written from a `Drop`, so in the background.
pub(crate) fn audit_unfinished(st: &St, p: &Prepared, t: &Tracker, finish: &str) {
    let rec = t.record(st, p, endpoint(p.kind), finish);
    let st = st.clone();
    tokio::task::spawn_blocking(move || {
        if let Some(a) = &st.audit {
            if let Err(e) = a.insert(&rec) {
                tracing::error!("{e:#}");
            }
        }
    });
}

/// A whole (non-streaming) answer being collected. hyper drops the handler when its
/// client goes away; the request must still get its audit row.
pub(crate) struct Collecting<'a> {
    st: &'a St,
    p: &'a Prepared,
    t: Tracker,
    audited: bool,
    /// The finish reason the row gets if the answer is never completed.
    finish: &'static str,
}

impl Drop for Collecting<'_> {
    fn drop(&mut self) {
        if !self.audited {
            audit_unfinished(self.st, self.p, &self.t, self.finish);
        }
    }
}
