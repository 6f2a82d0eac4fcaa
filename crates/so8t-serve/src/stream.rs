//! A streamed answer: server-sent events, one chunk per piece of text with its tokens'
//! verdicts, the last with the whole `so8t` object.

use crate::api::ApiError;
use crate::engine::Event;
use axum::response::sse::Event as SseEvent;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use so8t::chat::Channel;
use so8t::so8::verdict::Verdict;
use std::collections::VecDeque;
use std::convert::Infallible;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::answer::{audit_unfinished, legacy_logprobs, usage, Kind, Prepared, Tracker};
use crate::state::{unix_now, St, Ticket};

struct StreamState {
    st: St,
    p: Prepared,
    rx: UnboundedReceiver<Event>,
    t: Tracker,
    out: VecDeque<SseEvent>,
    /// Verdicts and logprobs of tokens whose text is not out yet (held by the splitter).
    held: Vec<Verdict>,
    held_logprobs: Vec<Value>,
    text_offset: usize,
    done: bool,
    audited: bool,
    _ticket: Ticket,
}

impl Drop for StreamState {
    /// A client that left before the end: its request still gets an audit row.
    fn drop(&mut self) {
        if !self.audited {
            audit_unfinished(&self.st, &self.p, &self.t, "cancelled");
        }
    }
}

impl StreamState {
    fn chunk(&self, choice: Value, so8t: Value) -> SseEvent {
        let mut v = json!({
            "id": self.p.id,
            "object": if self.p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": unix_now(),
            "model": self.st.model_id,
            "choices": [choice],
        });
        if !so8t.is_null() {
            v["so8t"] = so8t;
        }
        SseEvent::default().data(v.to_string())
    }

    /// The verdict of the tokens a chunk carries: the most unsafe of them.
    fn held_verdict(&mut self) -> Value {
        match self.held.drain(..).reduce(Verdict::max) {
            Some(v) => json!({"p_unsafe": v.p_unsafe, "p_escalate": v.p_escalate}),
            None => Value::Null,
        }
    }

    fn emit(&mut self, pieces: Vec<(Channel, String)>) {
        for (channel, text) in pieces {
            let so8t = self.held_verdict();
            let lp: Vec<Value> = self.held_logprobs.drain(..).collect();
            let choice = match self.p.kind {
                Kind::Chat => {
                    let key = if channel == Channel::Reasoning {
                        "reasoning_content"
                    } else {
                        "content"
                    };
                    json!({"index": 0, "delta": {key: text}, "logprobs": self.p.logprobs.map(|_| json!({"content": lp})), "finish_reason": null})
                }
                Kind::Completion => {
                    let v = json!({"index": 0, "text": text, "logprobs": self.p.logprobs.map(|_| legacy_logprobs(&lp, self.text_offset)), "finish_reason": null});
                    self.text_offset += text.len();
                    v
                }
            };
            let e = self.chunk(choice, so8t);
            self.out.push_back(e);
        }
    }

    async fn next_events(&mut self) {
        match self.rx.recv().await {
            None => self.fail(ApiError::server("the engine stopped")),
            Some(Event::Error(e)) => self.fail(ApiError::server(e)),
            Some(Event::Prompt { verdict }) => {
                self.t.prompt_verdict = verdict;
                let so8t = match (verdict, &self.st.so8t) {
                    (Some(v), Some(_)) => json!({"prompt": v}),
                    _ => Value::Null,
                };
                let choice = match self.p.kind {
                    Kind::Chat => {
                        json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": null})
                    }
                };
                let e = self.chunk(choice, so8t);
                self.out.push_back(e);
            }
            Some(Event::Token {
                id,
                text,
                top,
                verdict,
            }) => {
                let n = self.t.logprobs.len();
                let pieces = self.t.token(&self.st, &self.p, id, &text, &top);
                self.held.extend(verdict);
                self.held_logprobs
                    .extend(self.t.logprobs[n..].iter().cloned());
                self.emit(pieces);
            }
            Some(Event::Done { finish, judge }) => {
                let rest = self.t.splitter.finish();
                self.t.keep(&rest);
                self.emit(rest);
                self.t.finish = Some(finish);
                self.t.judge = judge;
                if let Err(e) = self.t.close(&self.st, &self.p).await {
                    return self.fail(e);
                }
                self.audited = true;
                let so8t = self.t.so8t(&self.st, self.p.checked.moderation);
                let choice = match self.p.kind {
                    Kind::Chat => {
                        json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.name()})
                    }
                    Kind::Completion => {
                        json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish.name()})
                    }
                };
                let e = self.chunk(choice, so8t);
                self.out.push_back(e);
                if self.p.checked.include_usage {
                    let mut v = json!({
                        "id": self.p.id,
                        "object": if self.p.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
                        "created": unix_now(),
                        "model": self.st.model_id,
                        "choices": [],
                        "usage": usage(&self.p, &self.t),
                    });
                    v["so8t"] = Value::Null;
                    self.out.push_back(SseEvent::default().data(v.to_string()));
                }
                self.out.push_back(SseEvent::default().data("[DONE]"));
                self.done = true;
            }
        }
    }

    fn fail(&mut self, e: ApiError) {
        tracing::error!("{}: {}", self.p.id, e.message);
        self.out
            .push_back(SseEvent::default().data(e.body().to_string()));
        self.out.push_back(SseEvent::default().data("[DONE]"));
        self.done = true;
    }
}

pub(crate) fn stream_answer(
    st: St,
    p: Prepared,
    rx: UnboundedReceiver<Event>,
    ticket: Ticket,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let t = Tracker::new(&p);
    let state = StreamState {
        st,
        p,
        rx,
        t,
        out: VecDeque::new(),
        held: Vec::new(),
        held_logprobs: Vec::new(),
        text_offset: 0,
        done: false,
        audited: false,
        _ticket: ticket,
    };
    stream::unfold(state, |mut s| async move {
        loop {
            if let Some(e) = s.out.pop_front() {
                return Some((Ok(e), s));
            }
            if s.done {
                return None;
            }
            s.next_events().await;
        }
    })
}
