//! Autoregressive generation with a KV cache: batched prompts of different lengths (left padding
//! with an attention mask), greedy or temperature/top-k/top-p sampling with a seedable ChaCha RNG,
//! stop tokens, stop strings, a token budget, and a streaming callback.

use burn::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StudentError};
use crate::model::CausalLm;
use crate::tokenizer::Tokenizer;

/// Sampling and stopping settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Upper bound on generated tokens per sequence.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p` (1 = off).
    pub top_p: f32,
    /// Keep only the `top_k` most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of the per-sequence ChaCha streams (row `i` uses stream `i`, so a row's sample does not
    /// depend on what else is in the batch).
    pub seed: u64,
    /// Token ids that end a sequence (not included in the output).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end a sequence once decoded text contains them (text is cut before them).
    pub stop_strings: Vec<String>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

impl GenerationConfig {
    /// Greedy decoding of at most `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(StudentError::InvalidArgument(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(StudentError::InvalidArgument(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token (e.g. EOS) was sampled.
    StopToken(u32),
    /// The decoded text contained a stop string.
    StopString(String),
    /// `max_new_tokens` was reached.
    Length,
}

/// One generated sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// Generated ids, without the prompt and without a final stop token.
    pub token_ids: Vec<u32>,
    /// Decoded text (empty when no tokenizer was given), cut before a stop string.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: FinishReason,
}

/// A token as it is produced, for streaming.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    /// Which prompt of the batch.
    pub row: usize,
    /// The new token id.
    pub token_id: u32,
    /// Newly completed text (may be empty while a multi-byte character is incomplete).
    pub text: &'a str,
}

/// Picks the next token from one row of logits.
pub fn sample_token(logits: &[f32], cfg: &GenerationConfig, rng: &mut ChaCha8Rng) -> u32 {
    if cfg.temperature == 0.0 {
        return argmax(logits);
    }
    // Same order as transformers' logits processors: temperature, top-k, top-p.
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l / cfg.temperature))
        .collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 && cfg.top_k < cand.len() {
        cand.truncate(cfg.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ((l - max) as f64).exp())
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= cfg.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

/// Index of the largest logit (the first on ties, like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Per-row state of the decode loop.
struct Row {
    tokens: Vec<u32>,
    text: String,
    finished: Option<FinishReason>,
    rng: ChaCha8Rng,
}

/// Generates continuations of `prompts` (token ids) as one batch.
///
/// Prompts are left-padded to a common length; padding is masked out and gets no position, so each
/// row's output equals generating it alone. `tokenizer` is needed for stop strings and for `text`;
/// `on_token` sees every token as it is produced.
pub fn generate<B: Backend>(
    model: &CausalLm<B>,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    mut on_token: impl FnMut(TokenEvent<'_>),
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(vec![]);
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(StudentError::InvalidArgument(format!(
            "prompt {i} is empty"
        )));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(StudentError::InvalidArgument(
            "stop strings need a tokenizer to decode text".into(),
        ));
    }
    let vocab = model.config.vocab_size as u32;
    if let Some(bad) = prompts.iter().flatten().find(|&&t| t >= vocab) {
        return Err(StudentError::InvalidArgument(format!(
            "token id {bad} is outside the model's vocabulary ({vocab})"
        )));
    }
    let b = prompts.len();
    let device = model.device();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad = 0u32;
    let mut ids = Vec::with_capacity(b * max_len);
    let mut valid = Vec::with_capacity(b);
    for p in prompts {
        let n_pad = max_len - p.len();
        ids.extend(std::iter::repeat_n(pad as i64, n_pad));
        ids.extend(p.iter().map(|&t| t as i64));
        valid.push((0..max_len).map(|i| i >= n_pad).collect::<Vec<_>>());
    }
    let mut rows: Vec<Row> = (0..b)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            rng.set_stream(i as u64);
            Row {
                tokens: vec![],
                text: String::new(),
                finished: None,
                rng,
            }
        })
        .collect();
    if cfg.max_new_tokens == 0 {
        return Ok(rows
            .into_iter()
            .map(|r| Generation {
                token_ids: r.tokens,
                text: r.text,
                finish_reason: FinishReason::Length,
            })
            .collect());
    }

    let mut cache = model.new_cache(b);
    let input = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [b, max_len]), &device);
    let mut logits = model.forward_cached_last(input, Some(&valid), &mut cache);
    let vocab = vocab as usize;
    for step in 0..cfg.max_new_tokens {
        let host: Vec<f32> = logits
            .cast(burn::tensor::DType::F32)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 logits");
        let mut next = Vec::with_capacity(b);
        for (r, row) in rows.iter_mut().enumerate() {
            if row.finished.is_some() {
                next.push(pad);
                continue;
            }
            let tok = sample_token(&host[r * vocab..(r + 1) * vocab], cfg, &mut row.rng);
            next.push(tok);
            if cfg.stop_token_ids.contains(&tok) {
                row.finished = Some(FinishReason::StopToken(tok));
                continue;
            }
            row.tokens.push(tok);
            let mut delta = String::new();
            if let Some(tk) = tokenizer {
                let full = tk.decode(&row.tokens, false)?;
                let stop = cfg
                    .stop_strings
                    .iter()
                    .filter_map(|s| full.find(s.as_str()).map(|p| (p, s)))
                    .min();
                // Hold back a trailing replacement char: usually a half-decoded UTF-8 sequence.
                let visible = match stop {
                    Some((pos, _)) => &full[..pos],
                    None => full.trim_end_matches('\u{fffd}'),
                };
                let common = common_prefix_len(&row.text, visible);
                delta = visible[common..].to_string();
                row.text = visible.to_string();
                if let Some((_, s)) = stop {
                    row.finished = Some(FinishReason::StopString(s.clone()));
                }
            }
            on_token(TokenEvent {
                row: r,
                token_id: tok,
                text: &delta,
            });
            if row.finished.is_none() && row.tokens.len() == cfg.max_new_tokens {
                row.finished = Some(FinishReason::Length);
            }
        }
        if rows.iter().all(|r| r.finished.is_some()) || step + 1 == cfg.max_new_tokens {
            break;
        }
        let input = Tensor::<B, 2, Int>::from_data(
            TensorData::new(next.iter().map(|&t| t as i64).collect::<Vec<_>>(), [b, 1]),
            &device,
        );
        logits = model.forward_cached_last(input, None, &mut cache);
    }
    if let Some(tk) = tokenizer {
        for row in rows.iter_mut() {
            if !matches!(row.finished, Some(FinishReason::StopString(_))) {
                row.text = tk.decode(&row.tokens, false)?;
            }
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| Generation {
            token_ids: r.tokens,
            text: r.text,
            finish_reason: r.finished.unwrap_or(FinishReason::Length),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(temperature: f32, top_k: usize, top_p: f32) -> GenerationConfig {
        GenerationConfig {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    #[test]
    fn greedy_takes_first_max() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(
            sample_token(&[0.0, 3.0, 3.0, 1.0], &cfg(0.0, 0, 1.0), &mut rng),
            1
        );
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [2.0, 1.9, 1.8, -5.0, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for _ in 0..300 {
            let t = sample_token(&logits, &cfg(1.0, 2, 1.0), &mut rng);
            assert!(t == 0 || t == 1, "top-k 2 sampled {t}");
        }
        // Probabilities ~[0.37, 0.34, 0.30, ...]: top_p 0.5 keeps the first two.
        let mut seen = [0usize; 5];
        for _ in 0..300 {
            seen[sample_token(&logits, &cfg(1.0, 0, 0.5), &mut rng) as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3] + seen[4], 0, "{seen:?}");
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_distribution() {
        // logits ln(1), ln(3): probabilities 0.25 / 0.75.
        let logits = [0.0, 3f32.ln()];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let n = 4000;
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &cfg(1.0, 0, 1.0), &mut rng) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        // Low temperature sharpens towards the argmax.
        let ones = (0..n)
            .filter(|_| sample_token(&logits, &cfg(0.2, 0, 1.0), &mut rng) == 1)
            .count();
        assert!(ones as f64 / n as f64 > 0.99);
    }
}
