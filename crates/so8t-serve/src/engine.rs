//! The engine: one thread owns the model and interleaves up to `parallel` sequences, one
//! step each in turn (a prompt chunk or one token), so every admitted request makes
//! progress. Interleaving rather than batching: the decoder's matrix–vector products are
//! memory-bound either way on CPU, and per-sequence KV caches keep each request's work
//! independent (a closed connection frees its slot at the next turn). A finished
//! sequence's cache is kept for the next prompts that share a prefix with it.

use so8t::generate::{FinishReason, GenerateRequest, Sequence};
use so8t::model::KvCache;
use so8t::so8::verdict::{ResponseJudge, Verdict};
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
    /// End as soon as the prompt is unsafe or the answer's streaming rule fires (spec §5).
    pub stop_on_unsafe: bool,
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
        /// The streaming rule over the whole answer (the sequence's own).
        judge: ResponseJudge,
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
        let counter = active.clone();
        std::thread::Builder::new()
            .name("so8t-engine".into())
            .spawn(move || run(model, rx, parallel.max(1), &counter))
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
    /// Applies `moderation: stop`: ends the sequence when `unsafe_` holds; true if it did.
    fn filter(&mut self, unsafe_: bool) -> bool {
        if self.job.stop_on_unsafe && unsafe_ {
            self.content_filtered = true;
            self.seq.cancel();
            return true;
        }
        false
    }
}

fn run(
    mut model: Model,
    rx: Receiver<Job>,
    parallel: usize,
    active_count: &AtomicUsize,
) {
    let mut active: Vec<Active> = Vec::new();
    // The caches of the last `parallel` finished sequences, oldest first (llama-server's
    // slots keep theirs the same way): a prompt that shares a prefix with one starts there.
    let mut spare: std::collections::VecDeque<KvCache> = std::collections::VecDeque::new();
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
                Ok(mut seq) => {
                    // The finished cache sharing the longest prefix with this prompt.
                    let shared = |c: &KvCache| c.shared_prefix(&job.req.prompt_ids);
                    if let Some(best) = (0..spare.len()).max_by_key(|&i| shared(&spare[i])).filter(|&i| shared(&spare[i]) > 0) {
                        let cache = spare.remove(best).expect("an index of spare");
                        seq.reuse_cache(cache);
                    }
                    active.push(Active {
                    seq,
                    job,
                    content_filtered: false,
                    })
                }
                Err(e) => {
                    let _ = job.events.send(Event::Error(e.to_string()));
                }
            }
        }
        active_count.store(active.len(), Ordering::Relaxed);
        let mut i = 0;
        while i < active.len() {
            if turn(&mut model, &mut active[i]) {
                spare.push_back(active.remove(i).seq.into_cache());
                if spare.len() > parallel {
                    spare.pop_front();
                }
            } else {
                i += 1;
            }
        }
        active_count.store(active.len(), Ordering::Relaxed);
    }
}

/// One step of one sequence; true when it is over (finished, failed or abandoned).
fn turn(model: &mut Model, a: &mut Active) -> bool {
    if a.job.events.is_closed() {
        return true;
    }
    // true when the client has gone
    let send = |job: &Job, e: Event| job.events.send(e).is_err();
    let result = (|| -> so8t::Result<bool> {
        if !a.seq.prompt_done() {
            if a.seq.prefill(model, PREFILL_CHUNK)? {
                let v = a.seq.prompt_verdict();
                let cfg = model.so8t.as_ref().map(|s| &s.config);
                a.filter(v.zip(cfg).is_some_and(|(v, c)| c.is_unsafe(v)));
                return Ok(send(&a.job, Event::Prompt { verdict: v }));
            }
            return Ok(false);
        }
        match a.seq.step(model)? {
            Some(step) => {
                let v = step.verdict;
                // The token that completes the streaming rule's run is counted and scored,
                // but its text is withheld.
                let text = if a.filter(step.unsafe_fired) {
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
                let judge = a.seq.judge().clone();
                send(&a.job, Event::Done { finish, judge });
                Ok(true)
            }
        }
    })();
    result.unwrap_or_else(|e| {
        let _ = a.job.events.send(Event::Error(e.to_string()));
        true
    })
}
