use anyhow::{bail, Context, Result};
use so8t::chat::{split_reasoning, Message, Part};
use so8t::generate::{generate, Control, GenerateRequest};
use so8t::sampling::SamplingRequest;
use so8t::so8::verdict::Verdict;
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    device: crate::DeviceArg,
    /// HF model directory or .gguf file.
    #[arg(short, long)]
    model: PathBuf,
    /// The user message (or, with --raw, the whole prompt text).
    #[arg(short, long)]
    prompt: Option<String>,
    /// Token ids to feed as they are, comma-separated (skips tokenizer and template).
    #[arg(long, value_delimiter = ',', conflicts_with = "prompt")]
    prompt_ids: Option<Vec<u32>>,
    /// Use the prompt as it is, without the chat template.
    #[arg(long)]
    raw: bool,
    /// An image (PNG or JPEG) for a vision model, placed before the prompt's text in the
    /// user message (repeatable, in order). With --prompt-ids or --raw the prompt holds
    /// the image placeholders itself: with --prompt-ids each image's full run of them.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// A vision GGUF's projector file (llama.cpp's mmproj); by default `mmproj-NAME.gguf`
    /// beside the model is used when present.
    #[arg(long)]
    mmproj: Option<PathBuf>,
    /// System message for the chat template.
    #[arg(long)]
    system: Option<String>,
    #[arg(short = 'n', long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 for greedy. Default: the model's generation_config, else 0.8 (as llama.cpp).
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    /// Default 0.05 (as llama.cpp).
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repeat_penalty: Option<f32>,
    /// Random seed for sampling (default: from the clock).
    #[arg(short, long)]
    seed: Option<u64>,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

pub fn main(a: Args) -> Result<()> {
    let asked = SamplingRequest {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        min_p: a.min_p,
        repeat_penalty: a.repeat_penalty,
        seed: a.seed,
    };
    if let Err(b) = asked.check() {
        bail!("--{}: {}", b.field.replace('_', "-"), b.message);
    }
    let mut model = a.device.open_model(&a.model)?;
    if let Some(p) = &a.mmproj {
        model.attach_mmproj(p)?;
    }
    let images = a.image.iter().map(|p| model.read_image(p)).collect::<so8t::Result<Vec<_>>>()?;
    let (prompt_ids, verdict_position) = match (&a.prompt_ids, &a.prompt) {
        (Some(ids), _) => (ids.clone(), None),
        (None, Some(text)) if a.raw => (model.tokenizer()?.encode(text, true)?, None),
        (None, Some(text)) => {
            let mut msgs = Vec::new();
            if let Some(s) = &a.system {
                msgs.push(Message::new("system", s));
            }
            msgs.push(if images.is_empty() {
                Message::new("user", text)
            } else {
                let mut parts = vec![Part::Image; images.len()];
                parts.push(Part::Text(text.clone()));
                Message::with_parts("user", parts)
            });
            let ids = model.prompt_ids(&msgs)?;
            let at = model.prompt_verdict_position(&msgs, &ids)?;
            (ids, at)
        }
        (None, None) => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    // A rendered prompt holds one placeholder per image, which the image's patches
    // expand; --prompt-ids come expanded.
    let (prompt_ids, verdict_position, media) = if images.is_empty() {
        (prompt_ids, verdict_position, None)
    } else {
        let (ids, at, media) = if a.prompt_ids.is_some() {
            let media = model.prompt_media(&prompt_ids, &images)?;
            (prompt_ids, verdict_position, media)
        } else {
            model.vision()?.expanded_prompt(&prompt_ids, verdict_position, &images)?
        };
        (ids, at, Some(std::sync::Arc::new(media)))
    };
    let sampling = asked.resolve(&model.generation, || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let req = GenerateRequest {
        prompt_ids,
        max_tokens: a.max_tokens,
        sampling,
        stop: a.stop.clone(),
        top_logprobs: if a.json { 5 } else { 0 },
        verdict_every_token: true,
        verdict_position,
        media,
    };
    let json = a.json;
    let mut out = std::io::stdout();
    let gen = generate(&mut model, &req, |step| {
        if !json {
            let _ = out.write_all(step.text.as_bytes());
            let _ = out.flush();
        }
        Control::Continue
    })
    .context("generation failed")?;
    let (reasoning, answer) = split_reasoning(&gen.text);
    let so8t = match (&model.so8t, gen.prompt_verdict) {
        (Some(s), Some(prompt)) => {
            let response = gen.judge.max.unwrap_or(Verdict::new(0.0, 0.0));
            Some((prompt, response, gen.decision, s.config.heads_trained))
        }
        _ => None,
    };
    if json {
        let top: Vec<Vec<serde_json::Value>> = gen
            .top_logprobs
            .iter()
            .map(|step| {
                step.iter()
                    .map(|(id, lp)| serde_json::json!({"id": id, "logprob": lp}))
                    .collect()
            })
            .collect();
        let mut v = serde_json::json!({
            "prompt_tokens": gen.prompt_tokens,
            "tokens": gen.tokens,
            "text": answer,
            "reasoning": reasoning,
            "finish_reason": gen.finish_reason,
            "top_logprobs": top,
            "timings": {
                "prompt_seconds": gen.prompt_seconds,
                "generate_seconds": gen.generate_seconds,
            },
        });
        if let Some((prompt, response, decision, trained)) = so8t {
            v["prompt_verdict"] = serde_json::to_value(prompt)?;
            v["verdicts"] = serde_json::to_value(&gen.verdicts)?;
            v["response_verdict"] = serde_json::to_value(response)?;
            v["response_flagged_at"] = serde_json::json!({
                "unsafe": gen.judge.unsafe_at,
                "escalate": gen.judge.escalate_at,
            });
            v["decision"] = decision.map(|d| d.name()).into();
            v["heads_trained"] = trained.into();
        }
        println!("{}", serde_json::to_string(&v)?);
    } else {
        println!();
        if let Some((prompt, response, decision, trained)) = so8t {
            println!(
                "[verdict: prompt p_unsafe {:.3} p_escalate {:.3}; response max p_unsafe {:.3} p_escalate {:.3} → {}]",
                prompt.p_unsafe,
                prompt.p_escalate,
                response.p_unsafe,
                response.p_escalate,
                match (decision, trained) {
                    (Some(d), _) => d.name(),
                    (None, _) => "no decision: heads untrained",
                }
            );
        }
        eprintln!(
            "[{} prompt tokens at {:.1} t/s, {} generated at {:.1} t/s, finish: {:?}]",
            gen.prompt_tokens.len(),
            gen.prompt_tokens.len() as f64 / gen.prompt_seconds.max(1e-9),
            gen.tokens.len(),
            gen.tokens.len() as f64 / gen.generate_seconds.max(1e-9),
            gen.finish_reason
        );
    }
    Ok(())
}
