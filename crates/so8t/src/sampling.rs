//! Next-token choice from logits, in llama.cpp's order: repetition penalty, top-k,
//! top-p, min-p, temperature, then a seeded draw. Temperature ≤ 0 is greedy.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sampling defaults a checkpoint ships (`generation_config.json`).
#[derive(Clone, Debug, Default, serde::Deserialize, serde::Serialize)]
pub struct GenerationDefaults {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
}

impl GenerationDefaults {
    pub fn check(&self) -> Result<(), BadSetting> {
        SamplingRequest {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repetition_penalty,
            ..Default::default()
        }
        .check()
    }
}

/// What one generation asks for. `None` falls back to the model's generation_config,
/// then to llama.cpp's defaults; every front end (CLI flags, server fields) resolves its
/// settings here, so they accept and mean the same values.
#[derive(Clone, Debug, Default)]
pub struct SamplingRequest {
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub seed: Option<u64>,
}

/// A sampling setting outside its range: the field and why.
#[derive(Debug)]
pub struct BadSetting {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for BadSetting {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl SamplingRequest {
    /// Ranges as OpenAI's API states them (temperature 0–2, top_p in (0, 1]) and llama.cpp
    /// reads them (min_p in [0, 1]; a repeat penalty divides logits, so it must be above 0).
    /// NaN is in no range.
    pub fn check(&self) -> Result<(), BadSetting> {
        let rules: [(&'static str, Option<f32>, f32, f32, bool); 4] = [
            ("temperature", self.temperature, 0.0, 2.0, false),
            ("top_p", self.top_p, 0.0, 1.0, true),
            ("min_p", self.min_p, 0.0, 1.0, false),
            ("repeat_penalty", self.repeat_penalty, 0.0, 10.0, true),
        ];
        for (field, v, lo, hi, above) in rules {
            let Some(x) = v else { continue };
            let low_ok = if above { x > lo } else { x >= lo };
            if !(low_ok && x <= hi) {
                let open = if above { "(" } else { "[" };
                return Err(BadSetting {
                    field,
                    message: format!("`{field}` must be in {open}{lo}, {hi}], got {x}"),
                });
            }
        }
        Ok(())
    }

    /// The settings to sample with; `seed` draws a seed when none was asked for.
    pub fn resolve(&self, g: &GenerationDefaults, seed: impl FnOnce() -> u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.or(g.temperature).unwrap_or(0.8),
            top_k: self.top_k.or(g.top_k).unwrap_or(40),
            top_p: self.top_p.or(g.top_p).unwrap_or(0.95),
            min_p: self.min_p.unwrap_or(0.05),
            repeat_penalty: self.repeat_penalty.or(g.repetition_penalty).unwrap_or(1.0),
            repeat_last_n: 64,
            seed: self.seed.unwrap_or_else(seed),
        }
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

/// log-softmax of `logits` at the `k` most likely ids, best first.
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln() as f32;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let k = k.min(idx.len());
    if k == 0 {
        return vec![];
    }
    idx.select_nth_unstable_by(k - 1, |&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.truncate(k);
    idx.sort_by(|&a, &b| {
        logits[b as usize]
            .total_cmp(&logits[a as usize])
            .then(a.cmp(&b))
    });
    idx.into_iter()
        .map(|i| (i, logits[i as usize] - lse))
        .collect()
}

/// The most likely id; ties go to the lowest id, as in llama.cpp's greedy sampler.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = std::collections::HashSet::new();
            for &t in &history[start..] {
                if seen.insert(t) {
                    if let Some(l) = logits.get_mut(t as usize) {
                        *l = if *l > 0.0 {
                            *l / p.repeat_penalty
                        } else {
                            *l * p.repeat_penalty
                        };
                    }
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.truncate(p.top_k);
        }
        let softmax = |c: &[(u32, f32)]| -> Vec<f32> {
            let m = c[0].1;
            let e: Vec<f32> = c.iter().map(|x| (x.1 - m).exp()).collect();
            let s: f32 = e.iter().sum();
            e.into_iter().map(|x| x / s).collect()
        };
        if p.top_p < 1.0 {
            let probs = softmax(&cand);
            let mut cum = 0.0;
            let mut keep = cand.len();
            for (i, pr) in probs.iter().enumerate() {
                cum += pr;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cand.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let probs = softmax(&cand);
            let thresh = probs[0] * p.min_p;
            let keep = probs.iter().take_while(|&&x| x >= thresh).count().max(1);
            cand.truncate(keep);
        }
        for c in cand.iter_mut() {
            c.1 /= p.temperature;
        }
        let probs = softmax(&cand);
        let r: f32 = self.rng.random();
        let mut cum = 0.0;
        for (c, pr) in cand.iter().zip(&probs) {
            cum += pr;
            if r < cum {
                return c.0;
            }
        }
        cand.last().map(|c| c.0).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max_and_lowest_on_tie() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn seeded_draws_repeat() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(p.clone());
            (0..30).map(|_| s.sample(&logits, &[])).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(p);
            (0..30).map(|_| s.sample(&logits, &[])).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().collect::<std::collections::HashSet<_>>().len() > 3,
            "draws should vary: {a:?}"
        );
    }

    #[test]
    fn repetition_penalty_demotes_seen_tokens() {
        let mut s = Sampler::new(SamplingParams {
            repeat_penalty: 2.0,
            ..Default::default()
        });
        assert_eq!(s.sample(&[1.0, 1.5], &[1]), 0);
    }

    #[test]
    fn logprobs_are_normalised() {
        let lp = top_logprobs(&[0.0, 0.0], 2);
        assert!((lp[0].1 - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(lp[0].0, 0);
    }
}
