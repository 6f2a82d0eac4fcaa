//! The generation loop: prefill the prompt, then pick, stream and feed back one token at
//! a time until an end-of-generation id, a stop string, or the token limit.

use crate::error::Result;
use crate::load::Model;
use crate::sampling::{top_logprobs, Sampler, SamplingParams};
use candle_core::Tensor;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// How many alternatives to report per step (0 for none).
    pub top_logprobs: usize,
    /// Feed the last generated token too, so that every token has its own hidden state
    /// (the verdict heads read it). Costs one extra single-token step.
    pub hidden_for_every_token: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-generation token or stop string.
    Stop,
    /// `max_tokens` or the context size reached.
    Length,
    /// The caller stopped it (e.g. a moderation rule or a closed connection).
    Cancelled,
}

pub struct Step<'a> {
    pub index: usize,
    pub id: u32,
    /// Text this token completes (may be empty while a UTF-8 sequence is incomplete).
    pub text: &'a str,
    pub top: &'a [(u32, f32)],
    /// Final normed hidden state at this token's position, `[hidden]`, when requested.
    pub hidden: Option<&'a Tensor>,
}

pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Final normed hidden state at the last prompt token, `[hidden]`.
    pub prompt_hidden: Tensor,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
}

/// What the step callback wants next.
pub enum Control {
    Continue,
    Stop,
}

pub fn generate(model: &mut Model, req: &GenerateRequest, mut on_step: impl FnMut(&Step) -> Control) -> Result<Generation> {
    if req.prompt_ids.is_empty() {
        return Err(crate::Error::Invalid("the prompt is empty".into()));
    }
    let vocab = model.config.vocab_size;
    if let Some(bad) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(crate::Error::Invalid(format!("prompt token id {bad} is outside the vocabulary (size {vocab})")));
    }
    let ctx = model.config.max_position_embeddings;
    if req.prompt_ids.len() >= ctx {
        return Err(crate::Error::Invalid(format!(
            "the prompt has {} tokens but the model's context is {ctx}",
            req.prompt_ids.len()
        )));
    }
    let eog = model.eog_ids();
    let mut sampler = Sampler::new(req.sampling.clone());
    let t0 = Instant::now();
    model.decoder.clear_cache();
    let hidden = model.decoder.forward_hidden(&req.prompt_ids, 0)?;
    let prompt_hidden = hidden.get(hidden.dim(0)? - 1)?;
    let mut logits = model.decoder.logits(&prompt_hidden.unsqueeze(0)?)?.squeeze(0)?.to_vec1::<f32>()?;
    let prompt_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();

    let mut history = req.prompt_ids.clone();
    let mut tokens = Vec::new();
    let mut all_top = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let max_stop = req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let finish = loop {
        if tokens.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        if history.len() >= ctx {
            break FinishReason::Length;
        }
        let top = if req.top_logprobs > 0 { top_logprobs(&logits, req.top_logprobs) } else { vec![] };
        let id = sampler.sample(&logits, &history);
        if eog.contains(&id) {
            break FinishReason::Stop;
        }
        tokens.push(id);
        history.push(id);
        all_top.push(top);

        let mut stop_hit = false;
        if let Some(tok) = &model.tokenizer {
            let full = tok.decode(&tokens)?;
            // Hold back text that ends inside an incomplete UTF-8 sequence.
            if !full.ends_with('\u{FFFD}') {
                text = full;
            }
            if max_stop > 0 {
                let from = floor_char_boundary(&text, emitted.saturating_sub(max_stop));
                if let Some(cut) = req.stop.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i)).min() {
                    text.truncate(cut);
                    stop_hit = true;
                }
            }
        }
        let piece_start = floor_char_boundary(&text, emitted.min(text.len()));
        let piece = text[piece_start..].to_string();
        emitted = text.len();

        let last = stop_hit || tokens.len() >= req.max_tokens || history.len() >= ctx;
        let hidden = if !last || req.hidden_for_every_token {
            let h = model.decoder.forward_hidden(&[id], history.len() - 1)?.squeeze(0)?;
            if !last {
                logits = model.decoder.logits(&h.unsqueeze(0)?)?.squeeze(0)?.to_vec1::<f32>()?;
            }
            Some(h)
        } else {
            None
        };
        let step = Step { index: tokens.len() - 1, id, text: &piece, top: all_top.last().unwrap(), hidden: hidden.as_ref() };
        if let Control::Stop = on_step(&step) {
            break FinishReason::Cancelled;
        }
        if stop_hit {
            break FinishReason::Stop;
        }
    };
    Ok(Generation {
        prompt_tokens: req.prompt_ids.clone(),
        tokens,
        text,
        finish_reason: finish,
        top_logprobs: all_top,
        prompt_hidden,
        prompt_seconds,
        generate_seconds: t1.elapsed().as_secs_f64(),
    })
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
