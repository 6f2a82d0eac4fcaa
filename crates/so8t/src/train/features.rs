//! The hidden states the heads read: the final normed hidden state at the verdict
//! position of each example (spec §5: a prompt's last token, after the assistant header;
//! with a `response`, its last token).

use super::data::Example;
use crate::error::{Error, Result};
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
    let limit = model.config.max_position_embeddings;
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

/// `[n, hidden]` hidden states at the last token of each id sequence, through the
/// model's decoder as it is (gates installed). Consecutive rows share their chat-template
/// prefix (system prompt, headers), so the KV cache of the common prefix is kept and only
/// the rest is computed.
pub fn verdict_hidden(
    model: &mut Model,
    ids: &[Vec<u32>],
    mut progress: impl FnMut(usize),
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(ids.len());
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
            .min(seq.len() - 1);
        model.decoder.truncate_cache(shared)?;
        let h = model.decoder.forward_hidden(&seq[shared..], shared)?;
        rows.push(h.get(h.dim(0)? - 1)?);
        prev = seq;
        progress(i + 1);
    }
    model.decoder.clear_cache();
    Ok(Tensor::stack(&rows, 0)?)
}
