//! Routes, admission, the SSE streams, and the `so8t` object each answer carries.

use crate::api::{
    parse, ApiError, ChatRequest, Checked, CompletionRequest, Moderation, ModerationInput,
    ModerationRequest, Prompt, Sampling,
};
use crate::audit::{self, Audit, Record};
use crate::engine::{Engine, Event, Finish, Job};
use crate::limits::{Client, Decision, Peer, RateLimiter};
use crate::metrics::Metrics;
use axum::extract::rejection::JsonRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use rand::Rng;
use serde_json::{json, Value};
use so8t::chat::{Channel, Message, ReasoningSplitter};
use so8t::generate::GenerateRequest;
use so8t::load::GenerationDefaults;
use so8t::sampling::SamplingParams;
use so8t::so8::adapter::{ResponseJudge, So8tConfig, Verdict};
use so8t::tokenizer::TextTokenizer;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

pub struct AppState {
    pub model_id: String,
    pub model_sha256: String,
    pub tokenizer: TextTokenizer,
    pub ctx: usize,
    pub generation: GenerationDefaults,
    /// SO8T config when the model has heads.
    pub so8t: Option<So8tConfig>,
    pub engine: Engine,
    pub parallel: usize,
    /// Requests generating or queued at most (`--parallel` + `--queue`).
    pub capacity: usize,
    pub admitted: AtomicUsize,
    pub audit: Option<Audit>,
    pub audit_text: bool,
    pub metrics: Metrics,
    /// `--api-key`: requests must present one of these (none: no key needed).
    pub api_keys: Vec<String>,
    /// `--rate-limit`: requests per minute per key (per address without keys).
    pub rate_limit: Option<RateLimiter>,
    pub default_max_tokens: usize,
    pub max_body: usize,
    pub read_timeout: std::time::Duration,
    pub created: u64,
}

type St = Arc<AppState>;

pub fn router(st: St) -> Router {
    let api = Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/moderations", post(moderations))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    // Outermost first: the key, then the client's rate, are checked on the headers
    // alone, before any body is read for a request that would be refused.
    api.layer(axum::middleware::from_fn_with_state(st.clone(), count_requests))
        .layer(axum::middleware::from_fn_with_state(st.clone(), read_body))
        .layer(axum::middleware::from_fn_with_state(st.clone(), rate_limit))
        .layer(axum::middleware::from_fn_with_state(st.clone(), require_key))
        .layer(axum::extract::DefaultBodyLimit::max(st.max_body))
        .with_state(st)
}

/// Reads the request body before any handler runs: refused at once when its
/// `Content-Length` is over `--max-body`, and given up (408) when it does not arrive
/// within the read timeout, so a slow client cannot hold a connection and a queue slot
/// by trickling a body.
async fn read_body(State(st): State<St>, req: Request, next: Next) -> Response {
    let too_large = || {
        st.metrics.add("so8t_refused_total", "reason=\"body_too_large\"", 1.0);
        ApiError::body_too_large().into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > st.max_body as u64) {
        return too_large();
    }
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, st.max_body);
    match tokio::time::timeout(st.read_timeout, http_body_util::BodyExt::collect(limited)).await {
        Err(_) => {
            st.metrics.add("so8t_refused_total", "reason=\"body_timeout\"", 1.0);
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                format!("the request body did not arrive within {} s", st.read_timeout.as_secs_f32()),
            )
            .into_response()
        }
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => too_large(),
        Ok(Err(e)) => ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            format!("cannot read the request body: {e}"),
        )
        .into_response(),
        Ok(Ok(collected)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(collected.to_bytes())))
                .await
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let tail: String = (0..24)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect();
    format!("{prefix}-{tail}")
}

fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Equal-time comparison, so the key cannot be guessed byte by byte from response times.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `/` is the static chat page (no data; it asks for the key itself) and `/health` is
/// for load balancers: both stay open, as in llama.cpp's server.
fn open_route(path: &str) -> bool {
    path == "/health" || path == "/"
}

async fn require_key(State(st): State<St>, mut req: Request, next: Next) -> Response {
    if !st.api_keys.is_empty() && !open_route(req.uri().path()) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(i) = given.and_then(|g| {
            st.api_keys
                .iter()
                .position(|k| same_key(g.as_bytes(), k.as_bytes()))
        }) else {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "Incorrect or missing API key (Authorization: Bearer KEY)",
            )
            .into_response();
        };
        req.extensions_mut().insert(Client::Key(i));
    }
    next.run(req).await
}

/// `--rate-limit`: each key (each address, without keys) gets its requests per minute
/// on every route but the open ones; past them a 429 says when to retry (`Retry-After`,
/// and OpenAI's `x-ratelimit-*` headers on every answer).
async fn rate_limit(State(st): State<St>, req: Request, next: Next) -> Response {
    let Some(limiter) = &st.rate_limit else {
        return next.run(req).await;
    };
    let client = req
        .extensions()
        .get::<Client>()
        .copied()
        .or_else(|| req.extensions().get::<Peer>().map(|p| Client::Addr(p.0)));
    let Some(client) = client.filter(|_| !open_route(req.uri().path())) else {
        return next.run(req).await;
    };
    let limit = limiter.per_minute().to_string();
    match limiter.check(client, Instant::now()) {
        Decision::Allowed { remaining } => {
            let mut resp = next.run(req).await;
            let h = resp.headers_mut();
            h.insert("x-ratelimit-limit-requests", limit.parse().unwrap());
            h.insert("x-ratelimit-remaining-requests", remaining.into());
            resp
        }
        Decision::Refused { retry_after } => {
            st.metrics.add("so8t_refused_total", "reason=\"rate_limit\"", 1.0);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let who = match client {
                Client::Key(_) => "this API key",
                Client::Addr(_) => "this client address",
            };
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                format!("Rate limit reached: {limit} requests per minute for {who}; retry in {secs} s"),
            )
            .into_response();
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, secs.into());
            h.insert("x-ratelimit-limit-requests", limit.parse().unwrap());
            h.insert("x-ratelimit-remaining-requests", 0u32.into());
            h.insert("x-ratelimit-reset-requests", format!("{secs}s").parse().unwrap());
            resp
        }
    }
}

async fn count_requests(State(st): State<St>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let resp = next.run(req).await;
    st.metrics.add(
        "so8t_requests_total",
        &format!("route=\"{route}\",status=\"{}\"", resp.status().as_u16()),
        1.0,
    );
    resp
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("not_found"),
        format!("no route {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        None,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(st): State<St>) -> Response {
    let active = st.engine.active.load(Ordering::Relaxed);
    let admitted = st.admitted.load(Ordering::Relaxed);
    let text = st.metrics.render(&[
        (
            "so8t_requests_active",
            "Requests generating now",
            active as f64,
        ),
        (
            "so8t_queue_depth",
            "Admitted requests waiting for a slot",
            admitted.saturating_sub(active) as f64,
        ),
        (
            "so8t_parallel_slots",
            "Requests that generate at once (--parallel)",
            st.parallel as f64,
        ),
    ]);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn models(State(st): State<St>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": st.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "so8t",
            "so8t": {
                "heads": st.so8t.is_some(),
                "heads_trained": st.so8t.as_ref().is_some_and(|c| c.heads_trained),
                "thresholds": st.so8t.as_ref().map(thresholds_json),
                "context_length": st.ctx,
                "sha256": st.model_sha256,
            },
        }],
    }))
}

/// A slot in the server: generating or queued. Dropping it frees the slot.
struct Ticket(St);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

fn admit(st: &St) -> Result<Ticket, ApiError> {
    if st.admitted.fetch_add(1, Ordering::SeqCst) >= st.capacity {
        st.admitted.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            Some("queue_full"),
            format!("the server is busy: {} requests are generating or queued (--parallel + --queue); retry later", st.capacity),
        ));
    }
    Ok(Ticket(st.clone()))
}

fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != st.model_id => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{m}` does not exist; this server serves `{}`",
                st.model_id
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        }),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

/// A checked generation request, ready for the engine.
struct Prepared {
    kind: Kind,
    id: String,
    prompt_text: String,
    checked: Checked,
    /// Alternatives per token to report, when logprobs were asked for.
    logprobs: Option<usize>,
    req: GenerateRequest,
}

fn prepare(
    st: &AppState,
    kind: Kind,
    prompt_text: String,
    (prompt_ids, verdict_position): (Vec<u32>, Option<usize>),
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

/// The rendered chat prompt (what the audit log hashes) and its ids; errors name `param`.
/// The rendered prompt, its ids, and the token whose verdict is the prompt's (`None`
/// for the last; spec §5's setting).
fn chat_prompt(
    st: &AppState,
    messages: &[Message],
    param: &'static str,
) -> Result<(String, Vec<u32>, Option<usize>), ApiError> {
    let bad = |e: so8t::Error| ApiError::invalid(param, e.to_string());
    let so8t::tokenizer::ChatPrompt { text, ids } =
        st.tokenizer.chat_prompt(messages).map_err(bad)?;
    let at = match &st.so8t {
        Some(c) => c.verdict_position.index(&st.tokenizer, messages, &ids).map_err(bad)?,
        None => None,
    };
    Ok((text, ids, at))
}

async fn chat(
    State(st): State<St>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let r: ChatRequest = parse(&body)?;
    check_model(&st, r.model.as_deref())?;
    let messages = r.messages()?;
    let checked = parse::<Sampling>(&body)?.check()?;
    let logprobs = match (r.logprobs, r.top_logprobs) {
        (_, Some(n)) if !(0..=20).contains(&n) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and 20, got {n}"),
            ))
        }
        (false, Some(n)) if n > 0 => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs: true`",
            ))
        }
        (true, n) => Some(n.unwrap_or(0) as usize),
        (false, _) => None,
    };
    let (text, ids, at) = chat_prompt(&st, &messages, "messages")?;
    let p = prepare(&st, Kind::Chat, text, (ids, at), checked, logprobs)?;
    start(st, p).await
}

async fn completions(
    State(st): State<St>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let r: CompletionRequest = parse(&body)?;
    check_model(&st, r.model.as_deref())?;
    if r.echo {
        return Err(ApiError::invalid("echo", "`echo` is not supported"));
    }
    if r.suffix.is_some() {
        return Err(ApiError::invalid("suffix", "`suffix` is not supported"));
    }
    let mut checked = parse::<Sampling>(&body)?.check()?;
    // OpenAI's legacy completions default to 16 tokens.
    checked.max_tokens.get_or_insert(16);
    let logprobs = match r.logprobs {
        Some(n) if !(0..=5).contains(&n) => {
            return Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and 5, got {n}"),
            ))
        }
        n => n.map(|n| n as usize),
    };
    let (text, ids) = match r.prompt {
        Prompt::Text(t) => (t, None),
        Prompt::Texts(v) if v.len() == 1 => (v.into_iter().next().unwrap_or_default(), None),
        Prompt::Texts(v) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("only one prompt per request is supported, got {}", v.len()),
            ))
        }
        Prompt::Ids(ids) => {
            if let Some(bad) = ids
                .iter()
                .find(|&&i| i as usize >= st.tokenizer.vocab_size())
            {
                return Err(ApiError::invalid(
                    "prompt",
                    format!("token id {bad} is outside the vocabulary"),
                ));
            }
            (st.tokenizer.decode(&ids).unwrap_or_default(), Some(ids))
        }
    };
    let ids = match ids {
        Some(ids) => ids,
        None => st
            .tokenizer
            .encode(&text, true)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
    };
    let p = prepare(&st, Kind::Completion, text, (ids, None), checked, logprobs)?;
    start(st, p).await
}

/// What the answer so far holds; feeds the final response, the audit row and metrics.
struct Tracker {
    started: Instant,
    prompt_verdict: Option<Verdict>,
    /// The streaming rule over the answer (the engine's, at the end); its `max` is the
    /// response's verdict.
    judge: ResponseJudge,
    first_token: Option<Instant>,
    tokens: Vec<u32>,
    logprobs: Vec<Value>,
    answer: String,
    reasoning: String,
    splitter: ReasoningSplitter,
    finish: Option<Finish>,
}

impl Tracker {
    fn new(p: &Prepared) -> Tracker {
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

    fn token(
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

    fn keep(&mut self, pieces: &[(Channel, String)]) {
        for (c, t) in pieces {
            match c {
                Channel::Answer => self.answer.push_str(t),
                Channel::Reasoning => self.reasoning.push_str(t),
            }
        }
    }

    fn so8t(&self, st: &AppState, moderation: Moderation) -> Value {
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

    fn record(&self, st: &AppState, p: &Prepared, endpoint: &str, finish: &str) -> Record {
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
    async fn close(&self, st: &St, p: &Prepared) -> Result<(), ApiError> {
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

fn endpoint(kind: Kind) -> &'static str {
    match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    }
}

async fn write_audit(st: &St, rec: Record) -> Result<(), ApiError> {
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
fn thresholds_json(cfg: &So8tConfig) -> Value {
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

fn token_text(st: &AppState, id: u32) -> String {
    st.tokenizer.decode(&[id]).unwrap_or_default()
}

fn token_logprob(st: &AppState, kind: Kind, id: u32, top: &[(u32, f32)], n: usize) -> Value {
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
fn legacy_logprobs(items: &[Value], offset0: usize) -> Value {
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

fn usage(p: &Prepared, t: &Tracker) -> Value {
    let (pt, ct) = (p.req.prompt_ids.len(), t.tokens.len());
    json!({"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct})
}

async fn start(st: St, p: Prepared) -> Result<Response, ApiError> {
    let ticket = admit(&st)?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    st.engine
        .submit(Job {
            req: p.req.clone(),
            stop_on_unsafe: p.checked.moderation == Moderation::Stop && st.so8t.is_some(),
            events: tx,
        })
        .map_err(ApiError::server)?;
    if p.checked.stream {
        let s = stream_answer(st, p, rx, ticket);
        return Ok(Sse::new(s).keep_alive(KeepAlive::default()).into_response());
    }
    let resp = whole_answer(&st, &p, rx).await;
    drop(ticket);
    resp.map(|v| Json(v).into_response())
}

async fn whole_answer(
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

struct StreamState {
    st: St,
    p: Prepared,
    rx: UnboundedReceiver<Event>,
    t: Tracker,
    out: VecDeque<SseEvent>,
    /// Verdicts and logprobs of tokens whose text is not out yet (held by the splitter).
    held: Vec<Verdict>,
    held_logprobs: Vec<Value>,
    text_offset: usize,
    done: bool,
    audited: bool,
    _ticket: Ticket,
}

impl Drop for StreamState {
    /// A client that left before the end: its request still gets an audit row.
    fn drop(&mut self) {
        if !self.audited {
            audit_unfinished(&self.st, &self.p, &self.t, "cancelled");
        }
    }
}

/// The audit row of a request whose answer was never completed (its client left:
/// `cancelled`; the engine failed: `error`), written from a `Drop`, so in the background.
fn audit_unfinished(st: &St, p: &Prepared, t: &Tracker, finish: &str) {
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
struct Collecting<'a> {
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

impl StreamState {
    fn chunk(&self, choice: Value, so8t: Value) -> SseEvent {
        let mut v = json!({
            "id": self.p.id,
            "object": if self.p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": unix_now(),
            "model": self.st.model_id,
            "choices": [choice],
        });
        if !so8t.is_null() {
            v["so8t"] = so8t;
        }
        SseEvent::default().data(v.to_string())
    }

    /// The verdict of the tokens a chunk carries: the most unsafe of them.
    fn held_verdict(&mut self) -> Value {
        match self.held.drain(..).reduce(Verdict::max) {
            Some(v) => json!({"p_unsafe": v.p_unsafe, "p_escalate": v.p_escalate}),
            None => Value::Null,
        }
    }

    fn emit(&mut self, pieces: Vec<(Channel, String)>) {
        for (channel, text) in pieces {
            let so8t = self.held_verdict();
            let lp: Vec<Value> = self.held_logprobs.drain(..).collect();
            let choice = match self.p.kind {
                Kind::Chat => {
                    let key = if channel == Channel::Reasoning {
                        "reasoning_content"
                    } else {
                        "content"
                    };
                    json!({"index": 0, "delta": {key: text}, "logprobs": self.p.logprobs.map(|_| json!({"content": lp})), "finish_reason": null})
                }
                Kind::Completion => {
                    let v = json!({"index": 0, "text": text, "logprobs": self.p.logprobs.map(|_| legacy_logprobs(&lp, self.text_offset)), "finish_reason": null});
                    self.text_offset += text.len();
                    v
                }
            };
            let e = self.chunk(choice, so8t);
            self.out.push_back(e);
        }
    }

    async fn next_events(&mut self) {
        match self.rx.recv().await {
            None => self.fail(ApiError::server("the engine stopped")),
            Some(Event::Error(e)) => self.fail(ApiError::server(e)),
            Some(Event::Prompt { verdict }) => {
                self.t.prompt_verdict = verdict;
                let so8t = match (verdict, &self.st.so8t) {
                    (Some(v), Some(_)) => json!({"prompt": v}),
                    _ => Value::Null,
                };
                let choice = match self.p.kind {
                    Kind::Chat => {
                        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null})
                    }
                };
                let e = self.chunk(choice, so8t);
                self.out.push_back(e);
            }
            Some(Event::Token {
                id,
                text,
                top,
                verdict,
            }) => {
                let n = self.t.logprobs.len();
                let pieces = self.t.token(&self.st, &self.p, id, &text, &top);
                self.held.extend(verdict);
                self.held_logprobs
                    .extend(self.t.logprobs[n..].iter().cloned());
                self.emit(pieces);
            }
            Some(Event::Done { finish, judge }) => {
                let rest = self.t.splitter.finish();
                self.t.keep(&rest);
                self.emit(rest);
                self.t.finish = Some(finish);
                self.t.judge = judge;
                if let Err(e) = self.t.close(&self.st, &self.p).await {
                    return self.fail(e);
                }
                self.audited = true;
                let so8t = self.t.so8t(&self.st, self.p.checked.moderation);
                let choice = match self.p.kind {
                    Kind::Chat => {
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.name()})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish.name()})
                    }
                };
                let e = self.chunk(choice, so8t);
                self.out.push_back(e);
                if self.p.checked.include_usage {
                    let mut v = json!({
                        "id": self.p.id,
                        "object": if self.p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": unix_now(),
                        "model": self.st.model_id,
                        "choices": [],
                        "usage": usage(&self.p, &self.t),
                    });
                    v["so8t"] = Value::Null;
                    self.out.push_back(SseEvent::default().data(v.to_string()));
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
        }
    }

    fn fail(&mut self, e: ApiError) {
        tracing::error!("{}: {}", self.p.id, e.message);
        self.out
            .push_back(SseEvent::default().data(e.body().to_string()));
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

fn stream_answer(
    st: St,
    p: Prepared,
    rx: UnboundedReceiver<Event>,
    ticket: Ticket,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let t = Tracker::new(&p);
    let state = StreamState {
        st,
        p,
        rx,
        t,
        out: VecDeque::new(),
        held: Vec::new(),
        held_logprobs: Vec::new(),
        text_offset: 0,
        done: false,
        audited: false,
        _ticket: ticket,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            s.next_events().await;
        }
    })
}

/// Most inputs one moderation request may carry.
const MAX_MODERATION_INPUTS: usize = 32;

async fn moderations(
    State(st): State<St>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let r: ModerationRequest = parse(&body)?;
    check_model(&st, r.model.as_deref())?;
    let Some(cfg) = st.so8t.clone() else {
        return Err(ApiError::invalid(
            "model",
            "this model has no SO8T safety head, so it cannot moderate",
        ));
    };
    let inputs = match r.input {
        ModerationInput::One(s) => vec![s],
        ModerationInput::Many(v) => v,
    };
    if inputs.is_empty() || inputs.len() > MAX_MODERATION_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` takes 1 to {MAX_MODERATION_INPUTS} strings, got {}",
                inputs.len()
            ),
        ));
    }
    let id = new_id("modr");
    let mut results = Vec::new();
    for (i, text) in inputs.iter().enumerate() {
        // The heads were fitted at the position where the assistant would start answering
        // a user message (spec §5), so an input is scored as that message.
        let (prompt_text, ids, at) = chat_prompt(&st, &[Message::new("user", text)], "input")?;
        if ids.is_empty() || ids.len() >= st.ctx {
            return Err(ApiError::invalid(
                "input",
                format!(
                    "input[{i}] has {} tokens; the context is {}",
                    ids.len(),
                    st.ctx
                ),
            ));
        }
        let ticket = admit(&st)?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let req = GenerateRequest {
            prompt_ids: ids,
            max_tokens: 0,
            sampling: SamplingParams::default(),
            stop: vec![],
            top_logprobs: 0,
            verdict_every_token: false,
            verdict_position: at,
        };
        let started = Instant::now();
        let n_tokens = req.prompt_ids.len();
        st.engine
            .submit(Job {
                req,
                stop_on_unsafe: false,
                events: tx,
            })
            .map_err(ApiError::server)?;
        let mut verdict = None;
        loop {
            match rx.recv().await {
                Some(Event::Prompt { verdict: v }) => verdict = v,
                Some(Event::Done { .. }) => break,
                Some(Event::Error(e)) => return Err(ApiError::server(e)),
                Some(Event::Token { .. }) => {}
                None => return Err(ApiError::server("the engine stopped")),
            }
        }
        drop(ticket);
        let v = verdict.ok_or_else(|| ApiError::server("no verdict for the input"))?;
        let flagged = cfg.is_unsafe(v);
        let decision = cfg.decide(Some(v), &ResponseJudge::default()).map(|d| d.name());
        let rec = Record {
            time: audit::now(),
            request_id: format!("{id}/{i}"),
            endpoint: "/v1/moderations".into(),
            model_sha256: st.model_sha256.clone(),
            prompt_sha256: sha256_hex(&prompt_text),
            prompt_text: st.audit_text.then(|| prompt_text.clone()),
            prompt_p_unsafe: Some(v.p_unsafe),
            prompt_p_escalate: Some(v.p_escalate),
            response_p_unsafe: None,
            response_p_escalate: None,
            decision: decision.map(String::from),
            moderation: "flag".into(),
            finish_reason: "moderation".into(),
            prompt_tokens: n_tokens,
            completion_tokens: 0,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
        };
        st.metrics
            .add("so8t_prompt_tokens_total", "", n_tokens as f64);
        st.metrics.add(
            "so8t_decisions_total",
            &format!("decision=\"{}\"", decision.unwrap_or("none")),
            1.0,
        );
        write_audit(&st, rec).await?;
        // One category: the safety head scores "unsafe" as a whole, not OpenAI's
        // per-harm categories, and inventing those would misreport what it measured.
        results.push(json!({
            "flagged": flagged,
            "categories": {"unsafe": flagged},
            "category_scores": {"unsafe": v.p_unsafe},
            "category_applied_input_types": {"unsafe": ["text"]},
            "so8t": {
                "p_unsafe": v.p_unsafe,
                "p_escalate": v.p_escalate,
                "escalate": v.p_escalate >= cfg.thresholds.escalate,
                "decision": decision,
                "heads_trained": cfg.heads_trained,
            },
        }));
    }
    Ok(Json(json!({"id": id, "model": st.model_id, "results": results})).into_response())
}
