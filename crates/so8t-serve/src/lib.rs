//! `so8t serve`: an OpenAI-compatible HTTP server for SO8T models (and plain ones), with
//! a safety and escalation verdict on every token, moderation, an SQLite audit log and a
//! chat page. The modules follow a request: `limits` (per-client rates and connections)
//! → `server` (routes, key/rate/body checks, handlers) → `api` (shapes and checks) →
//! `answer` (a generation request to its answer and audit row; `stream` for SSE) →
//! `engine` (the model's thread) → `audit`. `state` is what they all share. "spec §5" in
//! the comments is section 5 (Triality heads) of `../shared/SO8T_SPEC.md` from the
//! repository root, as in the `so8t` crate.

pub mod answer;
pub mod api;
pub mod audit;
pub mod engine;
pub mod limits;
pub mod metrics;
pub mod server;
pub mod state;
pub mod stream;

use anyhow::{Context, Result};
use so8t::Model;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

/// The request body limit when none is given: 1 MiB, or 48 MiB for a vision model, whose
/// requests carry images as base64 (up to [`so8t::load::IMAGE_FILE_LIMIT`] each, a third
/// more in base64).
pub fn default_max_body(vision: bool) -> usize {
    if vision {
        48 << 20
    } else {
        1 << 20
    }
}

pub struct Options {
    /// A vision GGUF's projector file, when not beside the model.
    pub mmproj: Option<PathBuf>,
    pub model: PathBuf,
    /// Where the decoder runs, and what f16/bf16 weights multiply in there.
    pub device: candle_core::Device,
    pub dtype: so8t::device::Dtype,
    pub host: String,
    pub port: u16,
    /// Requests must present one of these keys (empty: none needed).
    pub api_keys: Vec<String>,
    /// Requests per minute per key (per client address without keys).
    pub rate_limit: Option<u32>,
    /// Open connections per client address at most.
    pub max_connections_per_client: Option<usize>,
    pub parallel: usize,
    pub queue: usize,
    pub audit: Option<PathBuf>,
    pub audit_text: bool,
    /// Largest request body; `None`: [`default_max_body`].
    pub max_body: Option<usize>,
    pub default_max_tokens: usize,
    pub alias: Option<String>,
    /// Open connections at most; more are closed at once (and counted).
    pub max_connections: usize,
    /// How long a client may take to send a request's headers (an idle keep-alive
    /// connection included) and, separately, its body.
    pub read_timeout: std::time::Duration,
}

/// sha256 of what the server loaded: the GGUF file, or every file of a model directory
/// in name order (each as its name, a NUL, its bytes), training state excluded.
pub fn model_sha256(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return Ok(so8t::files::sha256_file(path)?);
    }
    let mut names: Vec<String> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    Ok(so8t::files::sha256_named(path, &names)?)
}

fn model_id(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| path.display().to_string());
    name.strip_suffix(".gguf").map(String::from).unwrap_or(name)
}

/// Loads the model, binds, and serves until SIGINT/SIGTERM.
pub fn serve(o: Options) -> Result<()> {
    let mut model = Model::open(&o.model)
        .with_context(|| format!("{}: cannot load the model", o.model.display()))?;
    if let Some(p) = &o.mmproj {
        model.attach_mmproj(p)?;
    }
    model.to_device(&o.device, o.dtype)?;
    let tokenizer = model.tokenizer()?.clone();
    let audit = o.audit.as_deref().map(audit::Audit::open).transpose()?;
    let sha = model_sha256(&o.model)?;
    let model_has_vision = model.vision.is_some();
    let state = state::AppState {
        model_id: o.alias.clone().unwrap_or_else(|| model_id(&o.model)),
        model_sha256: sha,
        tokenizer,
        ctx: model.config.context(),
        generation: model.generation.clone(),
        so8t: model.so8t.as_ref().map(|s| s.config.clone()),
        vision: model.vision.clone(),
        engine: engine::Engine::start(model, o.parallel),
        parallel: o.parallel.max(1),
        capacity: o.parallel.max(1) + o.queue,
        admitted: AtomicUsize::new(0),
        audit,
        audit_text: o.audit_text,
        metrics: metrics::Metrics::default(),
        api_keys: o.api_keys.clone(),
        rate_limit: o.rate_limit.map(limits::RateLimiter::new),
        default_max_tokens: o.default_max_tokens,
        max_body: o.max_body.unwrap_or(default_max_body(model_has_vision)),
        read_timeout: o.read_timeout,
        created: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let state = Arc::new(state);
    let app = server::router(state.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr: SocketAddr = format!("{}:{}", o.host, o.port)
            .parse()
            .with_context(|| format!("--host {} --port {}: not an address", o.host, o.port))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        // Tests and scripts wait for this line (with --port 0 it names the port chosen).
        eprintln!("so8t serve: listening on http://{}", listener.local_addr()?);
        let per_client = o
            .max_connections_per_client
            .map(limits::ConnectionsPerAddr::new);
        accept(
            listener,
            app,
            &state,
            o.max_connections,
            per_client,
            o.read_timeout,
        )
        .await;
        Ok(())
    })
}

/// Serves connections until SIGINT/SIGTERM, then lets the open ones finish. Each
/// connection holds one of `max_connections` slots (a flood of idle or slow clients
/// cannot take the file descriptors: beyond the cap a connection is closed at once), and
/// hyper closes one that takes longer than `read_timeout` to send a request's headers,
/// which also ends idle keep-alive connections (slowloris). With `per_client`, one
/// address cannot hold more than its share of the slots either. Every request carries
/// its connection's peer address, for the per-address rate limit.
async fn accept(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: &state::AppState,
    max_connections: usize,
    per_client: Option<limits::ConnectionsPerAddr>,
    read_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = shutdown();
    tokio::pin!(stop);
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of descriptors or similar: wait a little rather than spin.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut stop => break,
        };
        let (stream, peer) = stream;
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            state
                .metrics
                .add("so8t_refused_total", "reason=\"connections\"", 1.0);
            drop(stream);
            continue;
        };
        let client_slot = match &per_client {
            Some(per) => match per.try_open(peer.ip()) {
                Some(s) => Some(s),
                None => {
                    state
                        .metrics
                        .add("so8t_refused_total", "reason=\"client_connections\"", 1.0);
                    drop(stream);
                    continue;
                }
            },
            None => None,
        };
        let _ = stream.set_nodelay(true);
        let peer = limits::Peer(peer.ip());
        let service = tower::ServiceExt::map_request(
            app.clone(),
            move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(peer);
                req
            },
        );
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(read_timeout)
            .serve_connection(
                TokioIo::new(stream),
                hyper_util::service::TowerToHyperService::new(service),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop((slot, client_slot));
        });
    }
    graceful.shutdown().await;
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c.await.unwrap_or(()),
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}
