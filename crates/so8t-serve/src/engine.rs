//! The engine: one thread owns the model and runs up to `parallel` sequences in continuous
//! batches: each turn, every active sequence feeds a prompt chunk or its next token, and
//! all of them go through one decoder pass (the weights read once for all the rows, as
//! llama-server batches its slots), each attending over its own KV cache. Requests join
//! and leave between turns (a closed connection frees its slot at the next turn). A
//! finished sequence's cache is kept for the next prompts that share a prefix with it.

use so8t::generate::{turn_batch, FinishReason, GenerateRequest, Sequence, Turn};
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
    /// The most sequences one decoder pass has run so far.
    pub most_batched: Arc<AtomicUsize>,
}

impl Engine {
    /// Starts the engine thread; it owns `model` from now on.
    pub fn start(model: Model, parallel: usize) -> Engine {
        let (tx, rx) = std::sync::mpsc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let most_batched = Arc::new(AtomicUsize::new(0));
        let (counter, most) = (active.clone(), most_batched.clone());
        std::thread::Builder::new()
            .name("so8t-engine".into())
            .spawn(move || run(model, rx, parallel.max(1), &counter, &most))
            .expect("spawning the engine thread");
        Engine {
            jobs: std::sync::Mutex::new(tx),
            active,
            most_batched,
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
    most_batched: &AtomicUsize,
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
        // A client that left frees its slot before the turn.
        let (gone, kept): (Vec<Active>, Vec<Active>) = active.into_iter().partition(|a| a.job.events.is_closed());
        active = kept;
        let mut ended: Vec<KvCache> = gone.into_iter().map(|a| a.seq.into_cache()).collect();
        if !active.is_empty() {
            most_batched.fetch_max(active.len(), Ordering::Relaxed);
            let results = {
                let mut seqs: Vec<&mut Sequence> = active.iter_mut().map(|a| &mut a.seq).collect();
                turn_batch(&mut model, &mut seqs, PREFILL_CHUNK)
            };
            let over: Vec<bool> = results.into_iter().zip(active.iter_mut()).map(|(r, a)| handle(&model, a, r)).collect();
            let mut going = Vec::with_capacity(active.len());
            for (a, over) in active.into_iter().zip(over) {
                if over {
                    ended.push(a.seq.into_cache());
                } else {
                    going.push(a);
                }
            }
            active = going;
        }
        for cache in ended {
            spare.push_back(cache);
            if spare.len() > parallel {
                spare.pop_front();
            }
        }
        active_count.store(active.len(), Ordering::Relaxed);
    }
}

/// Sends what one turn of `a` did to its client; true when the sequence is over
/// (finished, failed or abandoned).
fn handle(model: &Model, a: &mut Active, result: so8t::Result<Turn>) -> bool {
    // true when the client has gone
    let send = |job: &Job, e: Event| job.events.send(e).is_err();
    match result {
        Err(e) => {
            let _ = a.job.events.send(Event::Error(e.to_string()));
            true
        }
        Ok(Turn::Prompt(false)) => false,
        Ok(Turn::Prompt(true)) => {
            let v = a.seq.prompt_verdict();
            let cfg = model.so8t.as_ref().map(|s| &s.config);
            a.filter(v.zip(cfg).is_some_and(|(v, c)| c.is_unsafe(v)));
            send(&a.job, Event::Prompt { verdict: v })
        }
        Ok(Turn::Token(step)) => {
            // The token that completes the streaming rule's run is counted and scored, but
            // its text is withheld.
            let text = if a.filter(step.unsafe_fired) {
                String::new()
            } else {
                step.text
            };
            send(
                &a.job,
                Event::Token {
                    id: step.id,
                    text,
                    top: step.top,
                    verdict: step.verdict,
                },
            )
        }
        Ok(Turn::Ended) => {
            let finish = match (a.content_filtered, a.seq.finish_reason()) {
                (true, _) => Finish::ContentFilter,
                (false, Some(FinishReason::Length)) => Finish::Length,
                _ => Finish::Stop,
            };
            let judge = a.seq.judge().clone();
            send(&a.job, Event::Done { finish, judge });
            true
        }
    }
}
