use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    device: crate::DeviceArg,
    /// HF or SO8T directory, or .gguf file.
    #[arg(short, long)]
    model: PathBuf,
    /// A vision GGUF's projector file (llama.cpp's mmproj); by default `mmproj-NAME.gguf`
    /// beside the model is used when present.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// Address to listen on (loopback by default; give 0.0.0.0 to accept other hosts).
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every route but / and /health; several
    /// keys comma-separated (as llama.cpp's server takes them), each with its own rate.
    #[arg(long, env = "SO8T_API_KEY")]
    api_key: Option<String>,
    /// Requests per minute per API key (per client address without keys), in bursts of
    /// as many; past it a 429 with Retry-After. Default: no limit.
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<u32>::new().range(1..=1_000_000))]
    rate_limit: Option<u32>,
    /// Open connections per client address at most (default: only --max-connections).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_connections_per_client: Option<usize>,
    /// Requests that generate at once (batched: one decoder pass per token for all of them).
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    parallel: usize,
    /// Requests that may wait for a slot; beyond that the server answers 429.
    #[arg(long, default_value_t = 64)]
    queue: usize,
    /// SQLite file for the audit log (one row per request and decision).
    #[arg(long)]
    audit: Option<PathBuf>,
    /// Keep the prompt text in the audit log, not only its sha256.
    #[arg(long, requires = "audit")]
    audit_text: bool,
    /// Largest request body in bytes [default: 1 MiB; 48 MiB for a vision model, whose
    /// requests carry base64 images].
    #[arg(long)]
    max_body: Option<usize>,
    /// Tokens to generate when a request does not say (bounded by the context).
    #[arg(long, default_value_t = 512)]
    default_max_tokens: usize,
    /// Model id in the API (default: the file or directory name).
    #[arg(long)]
    alias: Option<String>,
    /// Open connections at most; beyond it a connection is closed at once.
    #[arg(long, default_value_t = 256, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    max_connections: usize,
    /// Seconds a client may take to send a request's headers (idle keep-alive
    /// connections included) and, separately, its body.
    #[arg(long, default_value_t = 10.0)]
    read_timeout: f64,
}

pub fn main(a: Args) -> Result<()> {
    let api_keys: Vec<String> = match &a.api_key {
        None => Vec::new(),
        Some(list) => list.split(',').map(|k| k.trim().to_string()).collect(),
    };
    if api_keys.iter().any(String::is_empty) {
        // The keys themselves stay out of the message (it may reach a log).
        anyhow::bail!("--api-key: an empty key in the list (keys are comma-separated, none empty)");
    }
    if !(a.read_timeout.is_finite() && a.read_timeout > 0.0 && a.read_timeout <= 86_400.0) {
        anyhow::bail!("--read-timeout must be a number of seconds in (0, 86400], got {}", a.read_timeout);
    }
    let (device, dtype) = a.device.open()?;
    so8t_serve::serve(so8t_serve::Options {
        device,
        dtype,
        max_connections: a.max_connections,
        read_timeout: std::time::Duration::from_secs_f64(a.read_timeout),
        model: a.model,
        mmproj: a.mmproj,
        host: a.host,
        port: a.port,
        api_keys,
        rate_limit: a.rate_limit,
        max_connections_per_client: a.max_connections_per_client,
        parallel: a.parallel,
        queue: a.queue,
        audit: a.audit,
        audit_text: a.audit_text,
        max_body: a.max_body,
        default_max_tokens: a.default_max_tokens,
        alias: a.alias,
    })
}
