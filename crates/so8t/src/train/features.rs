//! The hidden states the heads read (spec §5): at each example's prompt verdict position
//! and at the tokens of its response, from the layers being tapped, in one pass of the
//! inference decoder over the data.

use super::data::Example;
use crate::error::{Error, Result};
use crate::so8::verdict::VerdictPosition;
use crate::Model;
use candle_core::Tensor;

/// Token ids of an example as the runtime sees them: the chat template with the
/// generation prompt, then the response if there is one; and how many of them are the
/// prompt's.
pub fn example_ids(model: &Model, ex: &Example) -> Result<(Vec<u32>, usize)> {
    let mut ids = model.prompt_ids(&ex.messages)?;
    let prompt_len = ids.len();
    if let Some(r) = &ex.response {
        ids.extend(model.tokenizer()?.encode(r, false)?);
    }
    Ok((ids, prompt_len))
}

/// All examples' ids and prompt lengths, refusing any row longer than the model's context.
pub fn dataset_ids(
    model: &Model,
    examples: &[Example],
    path: &std::path::Path,
) -> Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let limit = model.config.context();
    let (mut all, mut prompt_lens) = (
        Vec::with_capacity(examples.len()),
        Vec::with_capacity(examples.len()),
    );
    for ex in examples {
        let (ids, prompt_len) = example_ids(model, ex)?;
        if ids.len() > limit {
            return Err(Error::format(
                path,
                format!(
                    "line {}: {} tokens, more than the model's context of {limit}",
                    ex.line,
                    ids.len()
                ),
            ));
        }
        all.push(ids);
        prompt_lens.push(prompt_len);
    }
    Ok((all, prompt_lens))
}

/// Where one example's verdicts are read, as indices into its ids.
#[derive(Clone, Debug)]
pub struct Positions {
    pub assistant_header: usize,
    pub user_end: usize,
    /// The response's tokens that are read, in order (all, or a sample of them).
    pub response: Vec<usize>,
}

impl Positions {
    pub fn prompt(&self, p: VerdictPosition) -> usize {
        match p {
            VerdictPosition::AssistantHeader => self.assistant_header,
            VerdictPosition::UserEnd => self.user_end,
        }
    }

    fn first(&self) -> usize {
        self.user_end.min(self.assistant_header)
    }
}

/// Which of an answer's `n` tokens are read with `cap`: all of them if they are at most
/// `cap`, else the first half of `cap` in a row (where the streaming rule must decide
/// early) and the rest spread evenly over the remainder.
pub fn picked_tokens(n: usize, cap: Option<usize>) -> Vec<usize> {
    match cap {
        Some(c) if n > c => {
            let head = c / 2;
            let rest = c - head;
            let mut v: Vec<usize> = (0..head).collect();
            v.extend((0..rest).map(|j| head + j * (n - head) / rest));
            v
        }
        _ => (0..n).collect(),
    }
}

/// The positions of an example with `ids` of which `prompt_len` are the prompt's, the
/// response's tokens [`picked_tokens`] with `cap`.
pub fn positions(
    model: &Model,
    ex: &Example,
    ids: &[u32],
    prompt_len: usize,
    cap: Option<usize>,
) -> Result<Positions> {
    let user_end = model
        .tokenizer()?
        .user_end_index(&ex.messages, &ids[..prompt_len])?;
    let n = ids.len() - prompt_len;
    Ok(Positions {
        assistant_header: prompt_len - 1,
        user_end,
        response: picked_tokens(n, cap).into_iter().map(|j| prompt_len + j).collect(),
    })
}

/// Runs every id sequence through the decoder as it is (gates installed, its taps set),
/// computing at least positions `from[i]..` of sequence `i`; consecutive sequences share
/// their chat-template prefix (system prompt, headers) through the KV cache. `f(i, start,
/// tapped)` gets the tapped states `[len − start, hidden]` of positions `start..`.
pub fn walk(
    model: &mut Model,
    ids: &[Vec<u32>],
    from: &[usize],
    mut f: impl FnMut(usize, usize, &[Tensor]) -> Result<()>,
) -> Result<()> {
    let mut prev: &[u32] = &[];
    model.decoder.clear_cache();
    for (i, seq) in ids.iter().enumerate() {
        if seq.is_empty() {
            return Err(Error::Invalid(format!("example {i} has no tokens")));
        }
        let shared = prev
            .iter()
            .zip(seq)
            .take_while(|(a, b)| a == b)
            .count()
            .min(from[i])
            .min(seq.len() - 1);
        model.decoder.truncate_cache(shared)?;
        model.decoder.forward_hidden(&seq[shared..], shared)?;
        f(i, shared, model.decoder.tapped())?;
        prev = seq;
    }
    model.decoder.clear_cache();
    Ok(())
}

/// [`walk`] with `layers` tapped instead of what the model's heads read (restored after).
pub fn walk_layers(
    model: &mut Model,
    layers: &[usize],
    ids: &[Vec<u32>],
    from: &[usize],
    f: impl FnMut(usize, usize, &[Tensor]) -> Result<()>,
) -> Result<()> {
    let before = model.decoder.taps().to_vec();
    model.decoder.set_taps(layers)?;
    let r = walk(model, ids, from, f);
    model.decoder.set_taps(&before)?;
    r
}

/// Where [`walk`] must start computing for each example so that all its positions are
/// fresh.
pub fn first_positions(p: &[Positions]) -> Vec<usize> {
    p.iter().map(Positions::first).collect()
}
