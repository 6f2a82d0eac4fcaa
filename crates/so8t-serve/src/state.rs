//! What every request handler shares: the server's state (model, engine, limits, audit,
//! metrics), admission to a generation slot, and small helpers for ids and times.

use crate::api::ApiError;
use crate::audit::Audit;
use crate::engine::Engine;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use axum::http::StatusCode;
use rand::Rng;
use so8t::load::GenerationDefaults;
use so8t::artifact::adapter::So8tConfig;
use so8t::tokenizer::TextTokenizer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct AppState {
    pub model_id: String,
    pub model_sha256: String,
    pub tokenizer: TextTokenizer,
    pub ctx: usize,
    pub generation: GenerationDefaults,
    /// SO8T config when the model has heads.
    pub so8t: Option<So8tConfig>,
    /// A vision model's image processor and tower (image features are computed on the
    /// request's own blocking task, not on the engine's thread).
    pub vision: Option<Arc<so8t::vision::Vision>>,
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

pub(crate) type St = Arc<AppState>;

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn new_id(prefix: &str) -> String {
    let mut rng = rand::rng();
    let tail: String = (0..24)
        .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.random_range(0..36)]))
        .collect();
    format!("{prefix}-{tail}")
}

pub(crate) fn sha256_hex(text: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A slot in the server: generating or queued. Dropping it frees the slot.
pub(crate) struct Ticket(St);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

pub(crate) fn admit(st: &St) -> Result<Ticket, ApiError> {
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

pub(crate) fn check_model(st: &AppState, model: Option<&str>) -> Result<(), ApiError> {
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
