//! Speed measurement in llama-bench's terms: `ppN` is one forward pass over N prompt
//! tokens from an empty cache; `tgN` is N single-token steps after one start token.
//! Each test runs once to warm up, then `--repetitions` times; we report mean ± sample
//! standard deviation of tokens per second, as llama-bench does.

use anyhow::Result;
use so8t::sampling::argmax;
use so8t::Model;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
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
    #[arg(short = 'r', long, default_value_t = 5)]
    repetitions: usize,
    #[arg(long)]
    json: bool,
}

struct Row {
    test: String,
    n: usize,
    samples: Vec<f64>,
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
    let mut model = Model::open(&a.model)?;
    let threads = candle_core::utils::get_num_threads();
    let vocab = model.config.vocab_size as u32;
    let start = model.config.bos_token_id.unwrap_or(0).min(vocab - 1);
    let reps = a.repetitions.max(1);
    let mut rows = Vec::new();
    for &n in a.n_prompt.iter().filter(|&&n| n > 0) {
        // Token ids spread over the vocabulary; content does not change the cost.
        let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut samples = Vec::new();
        for r in 0..=reps {
            model.decoder.clear_cache();
            let t = Instant::now();
            let h = model.decoder.forward_hidden(&ids, 0)?;
            let last = h.get(n - 1)?.unsqueeze(0)?;
            let _ = model.decoder.logits(&last)?.squeeze(0)?.to_vec1::<f32>()?;
            if r > 0 {
                samples.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push(Row {
            test: format!("pp{n}"),
            n,
            samples,
        });
    }
    for &n in a.n_gen.iter().filter(|&&n| n > 0) {
        let mut samples = Vec::new();
        for r in 0..=reps {
            model.decoder.clear_cache();
            let mut tok = start;
            let t = Instant::now();
            for pos in 0..n {
                let h = model.decoder.forward_hidden(&[tok], pos)?;
                tok = argmax(&model.decoder.logits(&h)?.squeeze(0)?.to_vec1::<f32>()?);
            }
            if r > 0 {
                samples.push(n as f64 / t.elapsed().as_secs_f64());
            }
        }
        rows.push(Row {
            test: format!("tg{n}"),
            n,
            samples,
        });
    }
    let (params, bytes) = model.weights.size();
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
                serde_json::json!({"model": name, "arch": model.config.arch, "size_bytes": bytes, "params": params,
                    "threads": threads, "test": r.test, "n_tokens": r.n, "samples_ts": r.samples, "avg_ts": m, "stddev_ts": sd})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| ----- | ---: | -----: | ------- | ------: | ---: | --: |");
    for r in &rows {
        let (m, sd) = mean_sd(&r.samples);
        println!(
            "| {} {} | {:.2} MiB | {:.2} M | CPU (so8t) | {} | {} | {:.2} ± {:.2} |",
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
    Ok(())
}
