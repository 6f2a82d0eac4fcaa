//! Speed measurement in llama-bench's terms: `ppN` is one forward pass over N prompt
//! tokens from an empty cache; `tgN` is N single-token steps after one start token.
//! Each test runs once to warm up, then `--repetitions` times; we report mean ± sample
//! standard deviation of tokens per second, as llama-bench does.
//!
//! Next to the speeds: the roofline of generation (weight bytes read per token, from the
//! file, over the read bandwidth a probe measures with the same threads) and what the
//! verdict heads cost per generated token.

use anyhow::Result;
use so8t::formats::Embedding;
use so8t::sampling::argmax;
use so8t::so8::verdict::Heads;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    device: crate::DeviceArg,
    /// HF model directory or .gguf file.
    #[arg(short, long)]
    model: PathBuf,
    /// Prompt lengths to test (comma-separated; 0 to skip).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "64"
    )]
    n_prompt: Vec<usize>,
    /// Generated tokens to test (comma-separated; 0 to skip).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "32"
    )]
    n_gen: Vec<usize>,
    /// Tokens already in the cache before each test (comma-separated), as llama-bench's
    /// `-d`: `tg32 @ d512` is 32 steps after a 512-token prompt; the prompt is not timed.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    n_depth: Vec<usize>,
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    #[arg(long)]
    json: bool,
    /// Skip the read-bandwidth probe (and so the roofline).
    #[arg(long)]
    no_probe: bool,
}

struct Row {
    test: String,
    n: usize,
    depth: usize,
    samples: Vec<f64>,
}

/// llama-bench's test names: `tg32`, and `tg32 @ d512` after a context.
fn test_name(kind: &str, n: usize, depth: usize) -> String {
    match depth {
        0 => format!("{kind}{n}"),
        d => format!("{kind}{n} @ d{d}"),
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    if xs.len() < 2 {
        return (m, 0.0);
    }
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
    (m, v.sqrt())
}

pub fn main(a: Args) -> Result<()> {
    let mut model = a.device.open_model(&a.model)?;
    let threads = so8t::kernels::pool::threads();
    let vocab = model.config.vocab_size as u32;
    let start = model.config.bos_token_id.unwrap_or(0).min(vocab - 1);
    let reps = a.repetitions.max(1);
    // Token ids spread over the vocabulary; content does not change the cost.
    let spread = |n: usize, from: usize| -> Vec<u32> {
        (from as u32..(from + n) as u32).map(|i| (i * 7919 + 13) % vocab).collect()
    };
    // The heads as the model has them, or untrained ones of the same shape (same cost).
    let heads = match &model.so8t {
        Some(s) => s.heads.clone(),
        None => Heads::zeros(model.config.hidden_size)?,
    };
    let mut rows = Vec::new();
    let mut heads_share = None;
    for &depth in &a.n_depth {
        let context = spread(depth, 0);
        let fill = |decoder: &mut so8t::model::Decoder| -> Result<()> {
            decoder.clear_cache();
            if depth > 0 {
                decoder.forward_hidden(&context, 0)?;
            }
            Ok(())
        };
        for &n in a.n_prompt.iter().filter(|&&n| n > 0) {
            let ids = spread(n, depth);
            let mut samples = Vec::new();
            for r in 0..=reps {
                fill(&mut model.decoder)?;
                let t = Instant::now();
                let h = model.decoder.forward_hidden(&ids, depth)?;
                let last = h.get(n - 1)?.unsqueeze(0)?;
                let _ = model.decoder.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?;
                if r > 0 {
                    samples.push(n as f64 / t.elapsed().as_secs_f64());
                }
            }
            rows.push(Row {
                test: test_name("pp", n, depth),
                n,
                depth,
                samples,
            });
        }
        for &n in a.n_gen.iter().filter(|&&n| n > 0) {
            let mut samples = Vec::new();
            let (mut heads_s, mut total_s) = (0f64, 0f64);
            for r in 0..=reps {
                fill(&mut model.decoder)?;
                let mut tok = start;
                let t = Instant::now();
                let mut in_heads = 0f64;
                for pos in depth..depth + n {
                    let h = model.decoder.forward_hidden(&[tok], pos)?;
                    let th = Instant::now();
                    // An SO8T model's heads read the layers its config names (kept by the
                    // forward as it runs); others get untrained heads on the final state.
                    match &model.so8t {
                        Some(s) => std::hint::black_box(s.verdicts(&model.decoder, Some(0))?),
                        None => std::hint::black_box(heads.verdicts(&h)?),
                    };
                    in_heads += th.elapsed().as_secs_f64();
                    tok = argmax(&model.decoder.logits(&h)?.squeeze(0)?.to_vec1::<f32>()?);
                }
                let took = t.elapsed().as_secs_f64();
                if r > 0 {
                    samples.push(n as f64 / took);
                    heads_s += in_heads;
                    total_s += took;
                }
            }
            heads_share = Some((heads_s / (reps * n) as f64, heads_s / total_s));
            rows.push(Row {
                test: test_name("tg", n, depth),
                n,
                depth,
                samples,
            });
        }
    }
    let (params, bytes) = model.weights.size();
    // Weight bytes read per generated token: every tensor, except an embedding table that
    // is not also the output matrix (one row of it is read).
    let untied_embedding = if model.weights.contains("lm_head.weight") {
        match model.decoder.embedding() {
            Embedding::Quant(q) => q.storage_size_in_bytes() as u64,
            Embedding::Dense(t) => (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        }
    } else {
        0
    };
    let per_token = bytes.saturating_sub(untied_embedding);
    // Two probes: a buffer the size of the weights read per token (what decoding streams;
    // on a CPU whose last-level cache holds the model this is cache bandwidth), and one of
    // 512 MiB, beyond any cache here (memory bandwidth).
    let probe = |bytes: usize| so8t::kernels::probe::read_bandwidth(bytes, 5);
    let bandwidth = (!a.no_probe).then(|| (probe(per_token as usize), probe(512 << 20)));
    let roofline = bandwidth.map(|(bw, _)| bw / per_token as f64);
    // The roofline counts weight bytes only: it is compared with the shallowest decode.
    let tg_mean = rows
        .iter()
        .filter(|r| r.test.starts_with("tg"))
        .min_by_key(|r| r.depth)
        .map(|r| mean_sd(&r.samples).0);
    let name = model
        .path
        .file_name()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                let (m, sd) = mean_sd(&r.samples);
                serde_json::json!({"model": name, "device": a.device.device, "arch": model.config.arch, "size_bytes": bytes, "params": params,
                    "threads": threads, "kernel": so8t::kernels::Kernel::best().name(), "test": r.test, "n_tokens": r.n, "n_depth": r.depth, "samples_ts": r.samples, "avg_ts": m, "stddev_ts": sd})
            })
            .collect();
        let summary = serde_json::json!({"bytes_per_token": per_token, "read_bandwidth_bytes_per_s": bandwidth.map(|b| b.0),
            "memory_bandwidth_bytes_per_s": bandwidth.map(|b| b.1),
            "roofline_ts": roofline, "roofline_share": roofline.zip(tg_mean).map(|(r, t)| t / r),
            "heads_seconds_per_token": heads_share.map(|h| h.0), "heads_share_of_token": heads_share.map(|h| h.1)});
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"tests": v, "summary": summary}))?
        );
        return Ok(());
    }
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| ----- | ---: | -----: | ------- | ------: | ---: | --: |");
    let backend = match model.decoder.device() {
        d if d.is_cpu() => format!("CPU (so8t, {})", so8t::kernels::Kernel::best().name()),
        d => format!("{} (candle)", so8t::device::name(d)),
    };
    for r in &rows {
        let (m, sd) = mean_sd(&r.samples);
        println!(
            "| {} {} | {:.2} MiB | {:.2} M | {backend} | {} | {} | {:.2} ± {:.2} |",
            model.config.arch.name(),
            name,
            bytes as f64 / (1 << 20) as f64,
            params as f64 / 1e6,
            threads,
            r.test,
            m,
            sd
        );
    }
    println!();
    println!(
        "weights read per token: {:.2} MiB",
        per_token as f64 / (1 << 20) as f64
    );
    if let (Some((bw, mem)), Some(roof)) = (bandwidth, roofline) {
        print!(
            "read bandwidth ({threads} threads) over a buffer of that size: {:.1} GB/s (over 512 MiB: {:.1} GB/s) -> roofline {roof:.1} t/s",
            bw / 1e9,
            mem / 1e9
        );
        match tg_mean {
            Some(t) => println!("; tg at {:.0}% of it", 100.0 * t / roof),
            None => println!(),
        }
    }
    if let Some((per, share)) = heads_share {
        println!(
            "verdict heads: {:.1} us per token, {:.2}% of a generated token's time",
            per * 1e6,
            100.0 * share
        );
    }
    Ok(())
}
