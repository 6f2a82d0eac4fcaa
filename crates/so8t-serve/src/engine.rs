//! The engine: one thread owns the model and interleaves up to `parallel` sequences, one
//! step each in turn (a prompt chunk or one token), so every admitted request makes
//! progress. Interleaving rather than batching: the decoder's matrix–vector products are
//! memory-bound either way on CPU, and per-sequence KV caches keep each request's work
//! independent (a closed connection frees its slot at the next turn).

use so8t::generate::{FinishReason, GenerateRequest, Sequence};
use so8t::so8::adapter::{Heads, Verdict};
use so8t::Model;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens fed per turn: long prompts are read in chunks so that they do not
/// stall the streams already generating.
const PREFILL_CHUNK: usize = 32;

pub struct Job {
    pub req: GenerateRequest,
    /// End as soon as the prompt's or a generated token's p_unsafe reaches this threshold.
    pub stop_at_unsafe: Option<f32>,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// The prompt is read; its verdict when the model has heads.
    Prompt {
        verdict: Option<Verdict>,
    },
    Token {
        id: u32,
        text: String,
        top: Vec<(u32, f32)>,
        verdict: Option<Verdict>,
    },
    Done {
        finish: Finish,
    },
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    Stop,
    Length,
    ContentFilter,
}

impl Finish {
    pub fn name(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
            Finish::ContentFilter => "content_filter",
        }
    }
}

/// The sending side, shared by the request handlers.
pub struct Engine {
    jobs: std::sync::Mutex<Sender<Job>>,
    /// Sequences generating now (the rest of the admitted requests are queued).
    pub active: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts the engine thread; it owns `model` from now on.
    pub fn start(model: Model, parallel: usize) -> Engine {
        let (tx, rx) = std::sync::mpsc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let heads = model.so8t.as_ref().map(|s| s.heads.clone());
        let counter = active.clone();
        std::thread::Builder::new()
            .name("so8t-engine".into())
            .spawn(move || run(model, heads, rx, parallel.max(1), &counter))
            .expect("spawning the engine thread");
        Engine {
            jobs: std::sync::Mutex::new(tx),
            active,
        }
    }

    pub fn submit(&self, job: Job) -> Result<(), String> {
        self.jobs
            .lock()
            .map_err(|_| "engine lock poisoned".to_string())?
            .send(job)
            .map_err(|_| "the engine has stopped".to_string())
    }
}

struct Active {
    seq: Sequence,
    job: Job,
    content_filtered: bool,
}

impl Active {
    /// Applies `moderation: stop`: ends the sequence when `v` is unsafe; true if it did.
    fn filter(&mut self, v: Option<Verdict>) -> bool {
        match (self.job.stop_at_unsafe, v) {
            (Some(threshold), Some(v)) if v.p_unsafe >= threshold => {
                self.content_filtered = true;
                self.seq.cancel();
                true
            }
            _ => false,
        }
    }
}

fn run(
    mut model: Model,
    heads: Option<Heads>,
    rx: Receiver<Job>,
    parallel: usize,
    active_count: &AtomicUsize,
) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        while active.len() < parallel {
            let job = if active.is_empty() {
                match rx.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match rx.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            };
            if job.events.is_closed() {
                continue; // the client left while queued
            }
            match Sequence::new(&model, job.req.clone()) {
                Ok(seq) => active.push(Active {
                    seq,
                    job,
                    content_filtered: false,
                }),
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                }
            }
        }
        active_count.store(active.len(), Ordering::Relaxed);
        active.retain_mut(|a| !turn(&mut model, heads.as_ref(), a));
        active_count.store(active.len(), Ordering::Relaxed);
    }
}

fn verdict(
    heads: Option<&Heads>,
    hidden: Option<&candle_core::Tensor>,
) -> so8t::Result<Option<Verdict>> {
    match (heads, hidden) {
        (Some(h), Some(x)) => Ok(h.verdicts(x)?.first().copied()),
        _ => Ok(None),
    }
}

/// One step of one sequence; true when it is over (finished, failed or abandoned).
fn turn(model: &mut Model, heads: Option<&Heads>, a: &mut Active) -> bool {
    if a.job.events.is_closed() {
        return true;
    }
    // true when the client has gone
    let send = |job: &Job, e: Event| job.events.send(e).is_err();
    let result = (|| -> so8t::Result<bool> {
        if !a.seq.prompt_done() {
            if a.seq.prefill(model, PREFILL_CHUNK)? {
                let v = verdict(heads, a.seq.prompt_hidden())?;
                a.filter(v);
                return Ok(send(&a.job, Event::Prompt { verdict: v }));
            }
            return Ok(false);
        }
        match a.seq.step(model)? {
            Some(step) => {
                let v = verdict(heads, step.hidden.as_ref())?;
                // The token that crosses the line is counted and scored, but its text is
                // withheld.
                let text = if a.filter(v) {
                    String::new()
                } else {
                    step.text
                };
                Ok(send(
                    &a.job,
                    Event::Token {
                        id: step.id,
                        text,
                        top: step.top,
                        verdict: v,
                    },
                ))
            }
            None => {
                let finish = match (a.content_filtered, a.seq.finish_reason()) {
                    (true, _) => Finish::ContentFilter,
                    (false, Some(FinishReason::Length)) => Finish::Length,
                    _ => Finish::Stop,
                };
                send(&a.job, Event::Done { finish });
                Ok(true)
            }
        }
    })();
    result.unwrap_or_else(|e| {
        let _ = a.job.events.send(Event::Error(e.to_string()));
        true
    })
}
