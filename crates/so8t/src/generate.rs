//! The generation loop: prefill the prompt, then pick, stream and feed back one token at
//! a time until an end-of-generation id, a stop string, or the token limit.

use crate::error::{Error, Result};
use crate::load::Model;
use crate::model::KvCache;
use crate::sampling::{top_logprobs, Sampler, SamplingParams};
use crate::so8::verdict::{Decision, ResponseJudge, Verdict};
use crate::tokenizer::DecodeStream;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// How many alternatives to report per step (0 for none).
    pub top_logprobs: usize,
    /// For a model with heads: feed the last generated token too, so that every token has
    /// its verdict. Costs one extra single-token step.
    pub verdict_every_token: bool,
    /// Index of the prompt token whose verdict is the prompt's (spec §5's setting,
    /// [`crate::Model::prompt_verdict_position`]); `None` for the last.
    pub verdict_position: Option<usize>,
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

/// One generated token, as a [`Sequence`] hands it out.
pub struct Step {
    pub index: usize,
    pub id: u32,
    /// Text this token completes (may be empty while a UTF-8 sequence is incomplete, or
    /// when the token belongs to a stop string).
    pub text: String,
    pub top: Vec<(u32, f32)>,
    /// The heads' verdict on this token (a model with heads, when requested).
    pub verdict: Option<Verdict>,
    /// This token completed the streaming rule's run of unsafe tokens (spec §5).
    pub unsafe_fired: bool,
}

pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub top_logprobs: Vec<Vec<(u32, f32)>>,
    /// The prompt's verdict and each generated token's (a model with heads).
    pub prompt_verdict: Option<Verdict>,
    pub verdicts: Vec<Verdict>,
    /// The streaming rule over the answer.
    pub judge: ResponseJudge,
    /// The policy's decision; `None` without trained heads.
    pub decision: Option<Decision>,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
}

/// What the step callback wants next.
pub enum Control {
    Continue,
    Stop,
}

/// One request's generation as a state machine with its own KV cache, so that several
/// can take turns on one model (the server interleaves them step by step).
pub struct Sequence {
    req: GenerateRequest,
    sampler: Sampler,
    cache: KvCache,
    eog: Vec<u32>,
    ctx: usize,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    history: Vec<u32>,
    tokens: Vec<u32>,
    text: String,
    detok: DecodeStream,
    emitted: usize,
    max_stop: usize,
    /// Logits for the next token; present once the prompt is in and until the last step.
    logits: Option<Vec<f32>>,
    prompt_verdict: Option<Verdict>,
    verdicts: Vec<Verdict>,
    judge: ResponseJudge,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    finish: Option<FinishReason>,
    prompt_seconds: f64,
    generate_seconds: f64,
}

impl Sequence {
    /// Checks the request against the model; nothing runs yet.
    pub fn new(model: &Model, req: GenerateRequest) -> Result<Sequence> {
        if req.prompt_ids.is_empty() {
            return Err(crate::Error::Invalid("the prompt is empty".into()));
        }
        let vocab = model.config.vocab_size;
        if let Some(bad) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(crate::Error::Invalid(format!(
                "prompt token id {bad} is outside the vocabulary (size {vocab})"
            )));
        }
        if let Some(at) = req.verdict_position.filter(|&at| at >= req.prompt_ids.len()) {
            return Err(crate::Error::Invalid(format!(
                "verdict position {at} is past the prompt's {} tokens",
                req.prompt_ids.len()
            )));
        }
        let ctx = model.config.context();
        if req.prompt_ids.len() >= ctx {
            return Err(crate::Error::Invalid(format!(
                "the prompt has {} tokens but the model's context is {ctx}",
                req.prompt_ids.len()
            )));
        }
        Ok(Sequence {
            sampler: Sampler::new(req.sampling.clone()),
            cache: model.decoder.new_cache(),
            eog: model.eog_ids(),
            ctx,
            prefilled: 0,
            history: req.prompt_ids.clone(),
            tokens: Vec::new(),
            text: String::new(),
            detok: DecodeStream::default(),
            emitted: 0,
            max_stop: req.stop.iter().map(|s| s.len()).max().unwrap_or(0),
            logits: None,
            prompt_verdict: None,
            verdicts: Vec::new(),
            judge: ResponseJudge::default(),
            top_logprobs: Vec::new(),
            finish: None,
            prompt_seconds: 0.0,
            generate_seconds: 0.0,
            req,
        })
    }

    /// Runs `f` on the decoder with this sequence's KV cache in place.
    fn with_cache<T>(
        &mut self,
        model: &mut Model,
        f: impl FnOnce(&mut crate::model::Decoder) -> Result<T>,
    ) -> Result<T> {
        model.decoder.swap_cache(&mut self.cache);
        let r = f(&mut model.decoder);
        model.decoder.swap_cache(&mut self.cache);
        r
    }

    /// Starts from `cache`, another sequence's, keeping the longest prefix of it this
    /// prompt shares (a system prompt, a chat header), so those positions are not run
    /// again, as llama-server reuses a slot's cache. It stops short of the verdict position
    /// and of the last prompt token, whose states this run must compute (the prompt's
    /// verdict and the first logits). Returns how many positions were reused.
    pub fn reuse_cache(&mut self, mut cache: KvCache) -> usize {
        let n = self.req.prompt_ids.len();
        let at = self.req.verdict_position.unwrap_or(n - 1);
        let shared = cache.shared_prefix(&self.req.prompt_ids).min(at).min(n - 1);
        if self.prefilled > 0 || shared == 0 {
            return 0;
        }
        cache.truncate(shared);
        self.cache = cache;
        self.prefilled = shared;
        shared
    }

    /// The KV cache, for [`Sequence::reuse_cache`] by the next request.
    pub fn into_cache(self) -> KvCache {
        self.cache
    }

    pub fn prompt_done(&self) -> bool {
        self.prefilled == self.req.prompt_ids.len()
    }

    /// Feeds up to `chunk` more prompt tokens; returns whether the whole prompt is in.
    pub fn prefill(&mut self, model: &mut Model, chunk: usize) -> Result<bool> {
        if self.prompt_done() {
            return Ok(true);
        }
        let t0 = Instant::now();
        let (from, to) = (
            self.prefilled,
            (self.prefilled + chunk.max(1)).min(self.req.prompt_ids.len()),
        );
        let ids = self.req.prompt_ids[from..to].to_vec();
        let hidden = self.with_cache(model, |d| d.forward_hidden(&ids, from))?;
        self.prefilled = to;
        let at = self
            .req
            .verdict_position
            .unwrap_or(self.req.prompt_ids.len() - 1);
        if let (Some(s), true) = (&model.so8t, (from..to).contains(&at)) {
            self.prompt_verdict = Some(s.verdicts(&model.decoder, Some(at - from))?[0]);
        }
        if self.prompt_done() {
            let last = hidden.get(hidden.dim(0)? - 1)?;
            self.logits = Some(
                model
                    .decoder
                    .logits(&last.unsqueeze(0)?)?
                    .squeeze(0)?
                    .to_vec1::<f32>()?,
            );
        }
        self.prompt_seconds += t0.elapsed().as_secs_f64();
        Ok(self.prompt_done())
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Ends the sequence early (a moderation rule, a closed connection).
    pub fn cancel(&mut self) {
        self.finish.get_or_insert(FinishReason::Cancelled);
    }

    /// The prompt's verdict, once the prompt is read (a model with heads).
    pub fn prompt_verdict(&self) -> Option<Verdict> {
        self.prompt_verdict
    }

    /// The streaming rule over the answer so far.
    pub fn judge(&self) -> &ResponseJudge {
        &self.judge
    }

    /// Picks the next token and feeds it back. `None` when the sequence has ended (then
    /// [`Sequence::finish_reason`] says why); a returned step may also be the last.
    pub fn step(&mut self, model: &mut Model) -> Result<Option<Step>> {
        if self.finish.is_some() {
            return Ok(None);
        }
        if !self.prompt_done() {
            let n = self.req.prompt_ids.len();
            self.prefill(model, n)?;
        }
        let t0 = Instant::now();
        let r = self.advance(model);
        self.generate_seconds += t0.elapsed().as_secs_f64();
        r
    }

    fn advance(&mut self, model: &mut Model) -> Result<Option<Step>> {
        if self.tokens.len() >= self.req.max_tokens || self.history.len() >= self.ctx {
            self.finish = Some(FinishReason::Length);
            return Ok(None);
        }
        let logits = self
            .logits
            .take()
            .expect("logits are present until the sequence ends");
        // NaN or Inf logits come from damaged weights (loading does not scan them, as
        // llama.cpp does not): sampling from them would print a token chosen by nothing.
        if let Some(x) = logits.iter().find(|x| !x.is_finite()) {
            return Err(Error::format(
                &model.path,
                format!(
                    "the model computed non-finite logits ({x}) at token {}: its weights hold NaN or Inf (`so8t validate` finds which)",
                    self.tokens.len()
                ),
            ));
        }
        let top = if self.req.top_logprobs > 0 {
            top_logprobs(&logits, self.req.top_logprobs)
        } else {
            vec![]
        };
        let id = self.sampler.sample(&logits, &self.history);
        if self.eog.contains(&id) {
            self.finish = Some(FinishReason::Stop);
            return Ok(None);
        }
        self.tokens.push(id);
        self.history.push(id);
        self.top_logprobs.push(top.clone());

        let mut stop_hit = false;
        if let Some(tok) = &model.tokenizer {
            self.detok.step(tok, &self.tokens, &mut self.text)?;
            if self.max_stop > 0 {
                let text = &self.text;
                let from = floor_char_boundary(text, self.emitted.saturating_sub(self.max_stop));
                let cut = self
                    .req
                    .stop
                    .iter()
                    .filter_map(|s| text[from..].find(s.as_str()).map(|i| from + i))
                    .min();
                if let Some(cut) = cut {
                    self.text.truncate(cut);
                    stop_hit = true;
                }
            }
        }
        let piece_start = floor_char_boundary(&self.text, self.emitted.min(self.text.len()));
        let piece = self.text[piece_start..].to_string();
        self.emitted = self.text.len();

        let last =
            stop_hit || self.tokens.len() >= self.req.max_tokens || self.history.len() >= self.ctx;
        let (mut verdict, mut unsafe_fired) = (None, false);
        if !last || (self.req.verdict_every_token && model.so8t.is_some()) {
            let pos = self.history.len() - 1;
            let h = self.with_cache(model, |d| d.forward_hidden(&[id], pos))?;
            if !last {
                self.logits = Some(model.decoder.logits(&h)?.squeeze(0)?.to_vec1::<f32>()?);
            }
            if let (Some(s), true) = (&model.so8t, self.req.verdict_every_token) {
                let v = s.verdicts(&model.decoder, Some(0))?[0];
                unsafe_fired = self.judge.push(v, &s.config.thresholds);
                self.verdicts.push(v);
                verdict = Some(v);
            }
        }
        if last {
            self.finish = Some(if stop_hit {
                FinishReason::Stop
            } else {
                FinishReason::Length
            });
        }
        Ok(Some(Step {
            index: self.tokens.len() - 1,
            id,
            text: piece,
            top,
            verdict,
            unsafe_fired,
        }))
    }

    /// The finished generation (the prompt must be in).
    pub fn into_generation(self, model: &Model) -> Result<Generation> {
        if !self.prompt_done() {
            return Err(crate::Error::Invalid(
                "the sequence ended before its prompt was read".into(),
            ));
        }
        let decision = model
            .so8t
            .as_ref()
            .and_then(|s| s.config.decide(self.prompt_verdict, &self.judge));
        Ok(Generation {
            prompt_tokens: self.req.prompt_ids,
            tokens: self.tokens,
            text: self.text,
            finish_reason: self.finish.unwrap_or(FinishReason::Cancelled),
            top_logprobs: self.top_logprobs,
            prompt_verdict: self.prompt_verdict,
            verdicts: self.verdicts,
            judge: self.judge,
            decision,
            prompt_seconds: self.prompt_seconds,
            generate_seconds: self.generate_seconds,
        })
    }
}

/// Generates to the end in one go, handing each step to `on_step`.
pub fn generate(
    model: &mut Model,
    req: &GenerateRequest,
    mut on_step: impl FnMut(&Step) -> Control,
) -> Result<Generation> {
    let mut seq = Sequence::new(model, req.clone())?;
    while let Some(step) = seq.step(model)? {
        if let Control::Stop = on_step(&step) {
            seq.cancel();
        }
    }
    seq.into_generation(model)
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}
