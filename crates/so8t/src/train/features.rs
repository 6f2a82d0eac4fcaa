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

/// Sequences per forward in [`walk`]: one pass over the weights for all of them (gemm on
/// more rows packs each weight once for more work; BENCHMARKS.md "Heads pass").
const WALK_BATCH: usize = 8;

/// Runs every id sequence through the decoder as it is (gates installed, its taps set),
/// computing at least positions `from[i]..` of sequence `i`, [`WALK_BATCH`] sequences per
/// forward; the sequences of a batch share their common prefix (system prompt, chat
/// headers), computed once into a KV cache that each of them starts from. `f(i, start,
/// tapped)` gets the tapped states `[len − start, hidden]` of positions `start..`, in
/// order of `i`.
pub fn walk(
    model: &mut Model,
    ids: &[Vec<u32>],
    from: &[usize],
    mut f: impl FnMut(usize, usize, &[Tensor]) -> Result<()>,
) -> Result<()> {
    if let Some(i) = ids.iter().position(|s| s.is_empty()) {
        return Err(Error::Invalid(format!("example {i} has no tokens")));
    }
    let mut base = model.decoder.new_cache();
    for (b, batch) in ids.chunks(WALK_BATCH).enumerate() {
        let first = b * WALK_BATCH;
        let head = &batch[0];
        let shared = batch
            .iter()
            .zip(&from[first..])
            .map(|(seq, &fresh)| {
                let common = head.iter().zip(seq).take_while(|(a, b)| a == b).count();
                common.min(fresh).min(seq.len() - 1)
            })
            .min()
            .expect("a batch is not empty");
        let kept = base.shared_prefix(&head[..shared]);
        base.truncate(kept);
        if kept < shared {
            model.decoder.forward_batch(&mut [&mut base], &[&head[kept..shared]])?;
        }
        let mut caches: Vec<_> = batch.iter().map(|_| base.clone()).collect();
        let mut refs: Vec<_> = caches.iter_mut().collect();
        let rest: Vec<&[u32]> = batch.iter().map(|seq| &seq[shared..]).collect();
        model.decoder.forward_batch(&mut refs, &rest)?;
        let tapped = model.decoder.tapped().to_vec();
        let mut row = 0;
        for (j, r) in rest.iter().enumerate() {
            let states = tapped
                .iter()
                .map(|t| t.narrow(0, row, r.len()))
                .collect::<candle_core::Result<Vec<_>>>()?;
            f(first + j, shared, &states)?;
            row += r.len();
        }
    }
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
