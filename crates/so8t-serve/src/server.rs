//! Routes and what runs before a handler (key, rate, body), and the handlers: chat and
//! completions (whole or streamed), moderations, models, health, metrics, the page.

use crate::answer::{
    chat_prompt, image_prompt, prepare, vision, thresholds_json, whole_answer, write_audit, Kind, Prepared,
};
use crate::api::{
    parse, ApiError, ChatRequest, CompletionRequest, Moderation, ModerationInput,
    ModerationRequest, Prompt, Sampling,
};
use crate::audit::{self, Record};
use crate::engine::{Event, Job};
use crate::limits::{Client, Decision, Peer};
use crate::state::{admit, check_model, new_id, sha256_hex, St};
use crate::stream::stream_answer;
use axum::extract::rejection::JsonRejection;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use so8t::chat::Message;
use so8t::generate::GenerateRequest;
use so8t::sampling::SamplingParams;
use so8t::so8::verdict::ResponseJudge;
use std::sync::atomic::Ordering;
use std::time::Instant;

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
    api.layer(axum::middleware::from_fn_with_state(
        st.clone(),
        count_requests,
    ))
    .layer(axum::middleware::from_fn_with_state(st.clone(), read_body))
    .layer(axum::middleware::from_fn_with_state(st.clone(), rate_limit))
    .layer(axum::middleware::from_fn_with_state(
        st.clone(),
        require_key,
    ))
    .layer(axum::extract::DefaultBodyLimit::max(st.max_body))
    .with_state(st)
}

/// Reads the request body before any handler runs: refused at once when its
/// `Content-Length` is over `--max-body`, and given up (408) when it does not arrive
/// within the read timeout, so a slow client cannot hold a connection and a queue slot
/// by trickling a body.
async fn read_body(State(st): State<St>, req: Request, next: Next) -> Response {
    let too_large = || {
        st.metrics
            .add("so8t_refused_total", "reason=\"body_too_large\"", 1.0);
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
            st.metrics
                .add("so8t_refused_total", "reason=\"body_timeout\"", 1.0);
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                None,
                format!(
                    "the request body did not arrive within {} s",
                    st.read_timeout.as_secs_f32()
                ),
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
            next.run(Request::from_parts(
                parts,
                axum::body::Body::from(collected.to_bytes()),
            ))
            .await
        }
    }
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
            st.metrics
                .add("so8t_refused_total", "reason=\"rate_limit\"", 1.0);
            let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
            let who = match client {
                Client::Key(_) => "this API key",
                Client::Addr(_) => "this client address",
            };
            let mut resp = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
                format!(
                    "Rate limit reached: {limit} requests per minute for {who}; retry in {secs} s"
                ),
            )
            .into_response();
            let h = resp.headers_mut();
            h.insert(header::RETRY_AFTER, secs.into());
            h.insert("x-ratelimit-limit-requests", limit.parse().unwrap());
            h.insert("x-ratelimit-remaining-requests", 0u32.into());
            h.insert(
                "x-ratelimit-reset-requests",
                format!("{secs}s").parse().unwrap(),
            );
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
        (
            "so8t_batch_sequences_max",
            "The most sequences one decoder pass has run since the start",
            st.engine.most_batched.load(Ordering::Relaxed) as f64,
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
                // Whether chat messages may carry image_url parts.
                "vision": st.vision.is_some(),
            },
        }],
    }))
}

async fn chat(
    State(st): State<St>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let r: ChatRequest = parse(&body)?;
    check_model(&st, r.model.as_deref())?;
    let (messages, image_urls) = r.messages()?;
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
    // Before the template sees image parts, which a text model's template cannot render.
    let vision = if image_urls.is_empty() { None } else { Some(vision(&st)?) };
    let (text, ids, at) = chat_prompt(&st, &messages, "messages")?;
    let (ids, at, media) = match vision {
        None => (ids, at, None),
        Some(v) => {
            let (ids, at, media) = image_prompt(v, ids, at, &image_urls).await?;
            (ids, at, Some(media))
        }
    };
    let p = prepare(&st, Kind::Chat, text, (ids, at), media, checked, logprobs)?;
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
    let p = prepare(&st, Kind::Completion, text, (ids, None), None, checked, logprobs)?;
    start(st, p).await
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
            media: None,
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
        let decision = cfg
            .decide(Some(v), &ResponseJudge::default())
            .map(|d| d.name());
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
