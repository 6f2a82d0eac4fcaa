//! What the heads say and what it decides (spec §5): the heads and where they read, a
//! verdict, the thresholds, the streaming rule over an answer's tokens, and the policy
//! that combines a prompt's verdict with the answer's into one decision.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Thresholds {
    #[serde(rename = "unsafe")]
    pub unsafe_: f32,
    pub escalate: f32,
    /// The thresholds of the streaming rule on answer tokens, when they differ from the
    /// prompt's: a prompt's verdict and an answer token's come from other positions of
    /// the sequence and their scores are not on one scale (a refusal's tokens follow a
    /// harmful request). Absent: the prompt's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_unsafe: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_escalate: Option<f32>,
    /// Streaming rule (spec §5): an answer is judged unsafe (or escalated) once this many
    /// consecutive generated tokens reach the threshold.
    #[serde(default = "default_consecutive")]
    pub consecutive: usize,
}

impl Thresholds {
    /// The prompt's thresholds, [unsafe, escalate].
    pub fn prompt(&self) -> [f32; 2] {
        [self.unsafe_, self.escalate]
    }

    /// The streaming rule's thresholds on answer tokens, [unsafe, escalate].
    pub fn response(&self) -> [f32; 2] {
        [
            self.response_unsafe.unwrap_or(self.unsafe_),
            self.response_escalate.unwrap_or(self.escalate),
        ]
    }

    /// Sets head `h`'s (0 safety, 1 authority) prompt threshold and its answer threshold
    /// (`None`: the prompt's).
    pub fn set_head(&mut self, h: usize, prompt: f32, response: Option<f32>) {
        if h == 0 {
            (self.unsafe_, self.response_unsafe) = (prompt, response);
        } else {
            (self.escalate, self.response_escalate) = (prompt, response);
        }
    }
}

fn default_consecutive() -> usize {
    2
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            unsafe_: 0.5,
            escalate: 0.5,
            response_unsafe: None,
            response_escalate: None,
            consecutive: default_consecutive(),
        }
    }
}

/// The layer one head reads: the residual stream after block `layer` (1..=L), RMS-normed
/// with unit weight; `None` (or L) is the final normed hidden state, the LM head's input.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeadSetting {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct HeadsConfig {
    #[serde(default)]
    pub safety: HeadSetting,
    #[serde(default)]
    pub authority: HeadSetting,
}

impl HeadsConfig {
    /// The layers (1..=L) the safety and the authority head read, for a model of `n_layers`.
    pub fn layers(&self, n_layers: usize) -> [usize; 2] {
        [&self.safety, &self.authority].map(|h| h.layer.unwrap_or(n_layers))
    }

    /// Names the first layer outside 1..=L.
    pub fn check(&self, n_layers: usize, path: &Path) -> Result<()> {
        for (name, h) in [("safety", &self.safety), ("authority", &self.authority)] {
            if let Some(l) = h.layer {
                if l == 0 || l > n_layers {
                    return Err(Error::format(
                        path,
                        format!("heads.{name}.layer is {l}, expected 1..={n_layers} (the model has {n_layers} layers)"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Which token of a prompt carries its verdict (spec §5).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VerdictPosition {
    /// The prompt's last token, after the chat template's assistant header: what the
    /// model sees right before it answers.
    #[default]
    AssistantHeader,
    /// The last token of the user's message.
    UserEnd,
}

impl VerdictPosition {
    pub fn name(self) -> &'static str {
        match self {
            VerdictPosition::AssistantHeader => "assistant_header",
            VerdictPosition::UserEnd => "user_end",
        }
    }

    /// The prompt token whose verdict is the prompt's, for `ids` = the chat prompt of
    /// `messages` ([`crate::tokenizer::TextTokenizer::chat_prompt`]): `None` for the last.
    pub fn index(
        self,
        tokenizer: &crate::tokenizer::TextTokenizer,
        messages: &[crate::chat::Message],
        ids: &[u32],
    ) -> Result<Option<usize>> {
        match self {
            VerdictPosition::AssistantHeader => Ok(None),
            VerdictPosition::UserEnd => Ok(Some(tokenizer.user_end_index(messages, ids)?)),
        }
    }
}

/// The policy of spec §5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow,
    Refuse,
    Escalate,
}

impl Decision {
    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Refuse => "refuse",
            Decision::Escalate => "escalate",
        }
    }
}

impl Thresholds {
    /// One verdict (a prompt's) reaches the unsafe threshold.
    pub fn prompt_unsafe(&self, v: Verdict) -> bool {
        v.p_unsafe >= self.unsafe_
    }

    /// The policy of spec §5: `refuse` if the prompt is unsafe or the answer's streaming
    /// rule fired for unsafe, else `escalate` likewise, else `allow`.
    pub fn decide(&self, prompt: Option<Verdict>, response: &ResponseJudge) -> Decision {
        let prompt_unsafe = prompt.is_some_and(|v| self.prompt_unsafe(v));
        let prompt_escalate = prompt.is_some_and(|v| v.p_escalate >= self.escalate);
        if prompt_unsafe || response.unsafe_at.is_some() {
            Decision::Refuse
        } else if prompt_escalate || response.escalate_at.is_some() {
            Decision::Escalate
        } else {
            Decision::Allow
        }
    }
}

/// The streaming rule of spec §5 over one answer, fed one generated token's verdict at a
/// time: the answer is unsafe (escalated) from the token that completes a run of
/// `consecutive` tokens at or over the threshold. One lone token over it decides nothing.
#[derive(Clone, Debug, Default)]
pub struct ResponseJudge {
    run: [usize; 2],
    tokens: usize,
    /// Index of the token at which the unsafe rule fired.
    pub unsafe_at: Option<usize>,
    pub escalate_at: Option<usize>,
    /// The most unsafe and most escalating values seen (for reports).
    pub max: Option<Verdict>,
}

impl ResponseJudge {
    /// Takes the next token's verdict; true when this token makes the unsafe rule fire.
    pub fn push(&mut self, v: Verdict, t: &Thresholds) -> bool {
        let k = t.consecutive.max(1);
        let i = self.tokens;
        self.tokens += 1;
        self.max = Some(self.max.map_or(v, |m| m.max(v)));
        let r = t.response();
        let over = [v.p_unsafe >= r[0], v.p_escalate >= r[1]];
        for (run, o) in self.run.iter_mut().zip(over) {
            *run = if o { *run + 1 } else { 0 };
        }
        if self.escalate_at.is_none() && self.run[1] >= k {
            self.escalate_at = Some(i);
        }
        if self.unsafe_at.is_none() && self.run[0] >= k {
            self.unsafe_at = Some(i);
            return true;
        }
        false
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }
}

/// The score at which the streaming rule fires on an answer whose tokens score `p` (one
/// head): the largest, over runs of `k` consecutive tokens, of the run's smallest score;
/// 0 for an answer shorter than `k`, on which the rule never fires. The rule fires at a
/// threshold `t` exactly when this is ≥ `t`.
pub fn rule_score(p: &[f32], k: usize) -> f32 {
    p.windows(k.max(1))
        .map(|w| w.iter().copied().fold(f32::INFINITY, f32::min))
        .fold(0.0, f32::max)
}

/// Safety and authority heads: `Linear(hidden, 2)` with bias on the hidden state of the
/// layer each reads ([`HeadsConfig`]).
#[derive(Clone, Debug)]
pub struct Heads {
    pub safety_w: Tensor,
    pub safety_b: Tensor,
    pub authority_w: Tensor,
    pub authority_b: Tensor,
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq)]
pub struct Verdict {
    pub p_unsafe: f32,
    pub p_escalate: f32,
}

impl Verdict {
    pub const fn new(p_unsafe: f32, p_escalate: f32) -> Verdict {
        Verdict { p_unsafe, p_escalate }
    }

    /// Head `h`'s probability (0: p_unsafe, 1: p_escalate).
    pub fn head(self, h: usize) -> f32 {
        if h == 0 { self.p_unsafe } else { self.p_escalate }
    }

    /// Each probability's larger value: the verdict of a span of tokens is its worst.
    pub fn max(self, other: Verdict) -> Verdict {
        Verdict {
            p_unsafe: self.p_unsafe.max(other.p_unsafe),
            p_escalate: self.p_escalate.max(other.p_escalate),
        }
    }
}

impl Heads {
    /// File and metadata names of the four tensors, in a fixed order.
    pub const NAMES: [&'static str; 4] = [
        "heads.safety.weight",
        "heads.safety.bias",
        "heads.authority.weight",
        "heads.authority.bias",
    ];

    pub fn tensors(&self) -> [(&'static str, &Tensor); 4] {
        let [a, b, c, d] = Self::NAMES;
        [
            (a, &self.safety_w),
            (b, &self.safety_b),
            (c, &self.authority_w),
            (d, &self.authority_b),
        ]
    }

    /// Heads from a lookup by name (f32).
    pub fn from_named(mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<Heads> {
        let [a, b, c, d] = Self::NAMES;
        Ok(Heads {
            safety_w: get(a)?.to_dtype(DType::F32)?,
            safety_b: get(b)?.to_dtype(DType::F32)?,
            authority_w: get(c)?.to_dtype(DType::F32)?,
            authority_b: get(d)?.to_dtype(DType::F32)?,
        })
    }

    /// `[2, hidden]` weights and `[2]` biases; names the first mismatch.
    pub fn check_shapes(&self, hidden: usize, path: &Path) -> Result<()> {
        for (name, t) in self.tensors() {
            let want: &[usize] = if name.ends_with(".weight") {
                &[2, hidden]
            } else {
                &[2]
            };
            if t.dims() != want {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{name}` has shape {:?}, expected {want:?}",
                        t.dims()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Shapes, and no NaN or Inf: what a runtime needs before trusting a verdict.
    pub fn check(&self, hidden: usize, path: &Path) -> Result<()> {
        self.check_shapes(hidden, path)?;
        for (name, t) in self.tensors() {
            if t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .any(|v| !v.is_finite())
            {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` holds NaN or Inf"),
                ));
            }
        }
        Ok(())
    }

    pub fn zeros(hidden: usize) -> Result<Heads> {
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu);
        Ok(Heads {
            safety_w: z(&[2, hidden])?,
            safety_b: z(&[2])?,
            authority_w: z(&[2, hidden])?,
            authority_b: z(&[2])?,
        })
    }

    /// p(class 1) of one head (`head` 0 safety, 1 authority) for every row of `x`
    /// (`[rows, hidden]` row-major).
    pub fn scores(&self, head: usize, x: &[f32], hidden: usize) -> Result<Vec<f32>> {
        let t = Tensor::from_vec(x.to_vec(), (x.len() / hidden, hidden), &Device::Cpu)?;
        Ok(self
            .verdicts(&t)?
            .iter()
            .map(|v| v.head(head))
            .collect())
    }

    /// p(class 1) of each head for hidden states `[rows, hidden]` (or one `[hidden]`),
    /// both heads reading the same states.
    pub fn verdicts(&self, hidden: &Tensor) -> Result<Vec<Verdict>> {
        self.verdicts_of([hidden, hidden])
    }

    /// p(class 1) of each head, the safety head reading `inputs[0]` and the authority head
    /// `inputs[1]` (each `[rows, hidden]` or one `[hidden]`): the states of the layers
    /// they read.
    pub fn verdicts_of(&self, inputs: [&Tensor; 2]) -> Result<Vec<Verdict>> {
        let rows = |t: &Tensor| -> candle_core::Result<Tensor> {
            if t.rank() == 1 {
                t.unsqueeze(0)
            } else {
                Ok(t.clone())
            }
        };
        let p1 = |h: &Tensor, w: &Tensor, b: &Tensor| -> candle_core::Result<Vec<f32>> {
            // The heads stay in host memory; a GPU's states come to them (a row each).
            let h = rows(h)?.to_device(w.device())?;
            let logits = h.matmul(&w.t()?)?.broadcast_add(b)?;
            candle_nn::ops::softmax_last_dim(&logits)?
                .narrow(1, 1, 1)?
                .squeeze(1)?
                .to_vec1::<f32>()
        };
        let unsafe_ = p1(inputs[0], &self.safety_w, &self.safety_b)?;
        let escalate = p1(inputs[1], &self.authority_w, &self.authority_b)?;
        Ok(unsafe_
            .into_iter()
            .zip(escalate)
            .map(|(p_unsafe, p_escalate)| Verdict {
                p_unsafe,
                p_escalate,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(k: usize) -> Thresholds {
        Thresholds {
            unsafe_: 0.5,
            escalate: 0.6,
            response_unsafe: None,
            response_escalate: None,
            consecutive: k,
        }
    }

    #[test]
    fn the_rule_fires_on_k_consecutive_tokens_only() {
        let mut j = ResponseJudge::default();
        // one lone token over the line, then a run of two
        let fired: Vec<bool> = [0.9, 0.1, 0.7, 0.8, 0.9]
            .iter()
            .map(|&u| j.push(Verdict::new(u, 0.0), &t(2)))
            .collect();
        assert_eq!(fired, [false, false, false, true, false]);
        assert_eq!(j.unsafe_at, Some(3));
        assert_eq!(j.escalate_at, None);
        assert_eq!(j.max.unwrap().p_unsafe, 0.9);
        let mut j1 = ResponseJudge::default();
        assert!(j1.push(Verdict::new(0.5, 0.0), &t(1)), "k = 1 is the per-token rule");
        let mut j3 = ResponseJudge::default();
        for e in [0.7, 0.7, 0.2, 0.7, 0.7, 0.7] {
            j3.push(Verdict::new(0.0, e), &t(3));
        }
        assert_eq!(j3.escalate_at, Some(5));
        // rule_score agrees with the judge: fires at t iff score >= t; never below k tokens
        let p = [0.9, 0.1, 0.7, 0.8, 0.9];
        assert_eq!(rule_score(&p, 2), 0.8);
        assert_eq!(rule_score(&p, 1), 0.9);
        assert_eq!(rule_score(&[0.9], 2), 0.0);
    }
}
