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
    /// The images of a vision model's prompt, at their placeholders in `prompt_ids`
    /// ([`crate::Model::prompt_media`]).
    pub media: Option<std::sync::Arc<crate::model::Media>>,
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
/// can run on one model together ([`turn_batch`]: the server's continuous batching).
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
    /// The turn begun and not yet ended.
    pending: Option<Pending>,
    turn_started: Instant,
}

/// A turn between [`Sequence::begin_turn`] and [`Sequence::end_turn`].
enum Pending {
    /// Prompt tokens `from..to`.
    Prompt { from: usize, to: usize },
    /// A token picked, waiting for its verdict.
    Token(Step),
}

/// What a turn runs through the decoder: `ids` after what the sequence's cache holds.
struct Feed {
    ids: Vec<u32>,
    /// The images among a prompt chunk's tokens.
    media: Option<crate::model::Media>,
    /// Whether the last row's logits are wanted (the next token is picked from them).
    logits: bool,
}

/// What one turn of a sequence did.
pub enum Turn {
    /// A chunk of the prompt was read; true when that was its end (the prompt's verdict
    /// and the first token's logits are in).
    Prompt(bool),
    /// A token was picked (maybe the last).
    Token(Step),
    /// The sequence has ended ([`Sequence::finish_reason`] says why).
    Ended,
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
        if let Some(m) = &req.media {
            if m.positions.len() != req.prompt_ids.len() {
                return Err(crate::Error::Invalid(format!(
                    "the images' positions cover {} tokens of a prompt of {}",
                    m.positions.len(),
                    req.prompt_ids.len()
                )));
            }
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
            pending: None,
            turn_started: Instant::now(),
            req,
        })
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
        // A prompt with images is read from its start: its positions are laid out whole.
        if self.prefilled > 0 || shared == 0 || self.req.media.is_some() {
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
        if self.finish.is_some() && !self.prompt_done() {
            return Err(Error::Invalid("the sequence has ended before its prompt was read".into()));
        }
        if !self.prompt_done() {
            self.turn(model, chunk)?;
        }
        Ok(self.prompt_done())
    }

    /// One turn of this sequence alone ([`turn_batch`] of one).
    fn turn(&mut self, model: &mut Model, chunk: usize) -> Result<Turn> {
        turn_batch(model, &mut [self], chunk)
            .pop()
            .expect("one result per sequence")
    }

    /// The first half of a turn: the next chunk of the prompt, or the next token picked
    /// (sampled, detokenised, checked against the stop strings). Returns what the decoder
    /// must run for it, or `None` when the turn needs no forward ([`Sequence::end_turn`]
    /// completes it either way).
    fn begin_turn(&mut self, model: &Model, chunk: usize) -> Result<Option<Feed>> {
        self.turn_started = Instant::now();
        if self.finish.is_some() {
            return Ok(None);
        }
        let n = self.req.prompt_ids.len();
        if !self.prompt_done() {
            let (from, to) = (self.prefilled, self.prefilled.saturating_add(chunk.max(1)).min(n));
            self.pending = Some(Pending::Prompt { from, to });
            return Ok(Some(Feed {
                ids: self.req.prompt_ids[from..to].to_vec(),
                media: self.req.media.as_ref().map(|m| m.slice(from, to)),
                logits: to == n,
            }));
        }
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
        let step = Step {
            index: self.tokens.len() - 1,
            id,
            text: piece,
            top,
            verdict: None,
            unsafe_fired: false,
        };
        if last {
            self.finish = Some(if stop_hit {
                FinishReason::Stop
            } else {
                FinishReason::Length
            });
        }
        self.pending = Some(Pending::Token(step));
        // The token runs for the next token's logits, or (the last one) for its verdict.
        let verdict = self.req.verdict_every_token && model.so8t.is_some();
        Ok((!last || verdict).then(|| Feed {
            ids: vec![id],
            media: None,
            logits: !last,
        }))
    }

    /// The second half of a turn: what its forward gave (`None` when it needed none): the
    /// row of the decoder's last forward where this sequence's rows start, and the logits
    /// of its last row if [`Feed::logits`] asked for them.
    fn end_turn(&mut self, model: &Model, out: Option<(usize, Option<Vec<f32>>)>) -> Result<Turn> {
        let pending = self.pending.take();
        let elapsed = self.turn_started.elapsed().as_secs_f64();
        let (first_row, logits) = out.unzip();
        let logits = logits.flatten();
        match pending {
            None => Ok(Turn::Ended),
            Some(Pending::Prompt { from, to }) => {
                self.prompt_seconds += elapsed;
                self.prefilled = to;
                if self.prompt_done() {
                    self.logits = logits;
                }
                let at = self
                    .req
                    .verdict_position
                    .unwrap_or(self.req.prompt_ids.len() - 1);
                if let (Some(s), Some(row), true) = (&model.so8t, first_row, (from..to).contains(&at)) {
                    self.prompt_verdict = Some(s.verdicts(&model.decoder, Some(row + at - from))?[0]);
                }
                Ok(Turn::Prompt(self.prompt_done()))
            }
            Some(Pending::Token(mut step)) => {
                self.generate_seconds += elapsed;
                self.logits = logits;
                if let (Some(s), Some(row), true) = (&model.so8t, first_row, self.req.verdict_every_token) {
                    let v = s.verdicts(&model.decoder, Some(row))?[0];
                    step.unsafe_fired = self.judge.push(v, &s.config.thresholds);
                    self.verdicts.push(v);
                    step.verdict = Some(v);
                }
                Ok(Turn::Token(step))
            }
        }
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

    /// Picks the next token and feeds it back (the rest of the prompt first, if it is
    /// not in yet). `None` when the sequence has ended (then [`Sequence::finish_reason`]
    /// says why); a returned step may also be the last.
    pub fn step(&mut self, model: &mut Model) -> Result<Option<Step>> {
        loop {
            match self.turn(model, usize::MAX)? {
                Turn::Prompt(_) => continue,
                Turn::Token(step) => return Ok(Some(step)),
                Turn::Ended => return Ok(None),
            }
        }
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

/// One turn of each of `seqs` (continuous batching): each feeds its next prompt chunk (up
/// to `chunk` tokens) or its next token, and all of them run in one decoder pass over the
/// weights and one LM-head product, each against its own KV cache. The results are the
/// sequences' in order; a sequence whose turn failed has ended.
pub fn turn_batch(model: &mut Model, seqs: &mut [&mut Sequence], chunk: usize) -> Vec<Result<Turn>> {
    let mut results: Vec<Option<Result<Turn>>> = seqs.iter().map(|_| None).collect();
    let mut feeds: Vec<(usize, Feed)> = Vec::new();
    for (i, seq) in seqs.iter_mut().enumerate() {
        match seq.begin_turn(model, chunk) {
            Ok(Some(feed)) => feeds.push((i, feed)),
            Ok(None) => results[i] = Some(seq.end_turn(model, None)),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    if !feeds.is_empty() {
        let mut ran = run_feeds(model, seqs, &feeds);
        for (k, (i, _)) in feeds.iter().enumerate() {
            let seq = &mut *seqs[*i];
            results[*i] = Some(match &mut ran {
                Ok((first_rows, logits)) => seq.end_turn(model, Some((first_rows[k], logits[k].take()))),
                Err(e) => Err(Error::Invalid(e.to_string())),
            });
        }
    }
    // A failed turn ends its sequence: a caller that goes on gets `Ended`, not a panic on
    // state the failed turn left half-made.
    for (seq, r) in seqs.iter_mut().zip(&results) {
        if let Some(Err(_)) = r {
            seq.pending = None;
            seq.finish.get_or_insert(FinishReason::Cancelled);
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every sequence's turn has a result"))
        .collect()
}

/// The decoder pass of [`turn_batch`]: each feed's first row in the forward, and the logits
/// of its last row where it asked for them.
#[allow(clippy::type_complexity)]
fn run_feeds(
    model: &mut Model,
    seqs: &mut [&mut Sequence],
    feeds: &[(usize, Feed)],
) -> Result<(Vec<usize>, Vec<Option<Vec<f32>>>)> {
    let mut caches: Vec<&mut KvCache> = Vec::with_capacity(feeds.len());
    let mut wanted = feeds.iter().map(|(i, _)| *i).peekable();
    for (i, seq) in seqs.iter_mut().enumerate() {
        if wanted.peek() == Some(&i) {
            wanted.next();
            caches.push(&mut seq.cache);
        }
    }
    let ids: Vec<&[u32]> = feeds.iter().map(|(_, f)| f.ids.as_slice()).collect();
    let media: Vec<Option<&crate::model::Media>> = feeds.iter().map(|(_, f)| f.media.as_ref()).collect();
    let hidden = model.decoder.forward_batch_media(&mut caches, &ids, &media)?;
    let mut first_rows = Vec::with_capacity(feeds.len());
    let mut last_rows = Vec::new();
    let mut row = 0;
    for (_, f) in feeds {
        first_rows.push(row);
        row += f.ids.len();
        if f.logits {
            last_rows.push(row as u32 - 1);
        }
    }
    let mut logits = if last_rows.is_empty() {
        Vec::new()
    } else {
        let rows = candle_core::Tensor::new(last_rows.as_slice(), hidden.device())?;
        model.decoder.logits(&hidden.index_select(&rows, 0)?)?.to_vec2::<f32>()?
    }
    .into_iter();
    let per_feed = feeds
        .iter()
        .map(|(_, f)| if f.logits { logits.next() } else { None })
        .collect();
    Ok((first_rows, per_feed))
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
