//! Continuous batching: up to `max_batch` sequences decode together, and a finished sequence's
//! slot is refilled from the queue at once, so the batch stays full until the queue runs dry.
//!
//! Each step is one forward pass for every active sequence over a [`SlotCache`] allocated once
//! for the longest allowed length (no concatenation per step); new prompts are prefilled into
//! their slot in chunks. Sampling (greedy, temperature, top-k, top-p) runs on the device and only
//! one token id per sequence comes back per step. Every sequence draws its randomness from its
//! own ChaCha stream, one number per token, so what it generates does not depend on the batch
//! size or on its neighbours.

use std::ops::ControlFlow;

use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation::softmax;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, StudentError};
use crate::generate::{FinishReason, Generation, GenerationConfig};
use crate::model::{CausalLm, SlotCache};
use crate::tokenizer::Tokenizer;

/// Prompt tokens prefilled per forward pass: long prompts go in pieces so the attention bias and
/// activations of one pass stay bounded.
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

/// Sequences in flight when nothing says otherwise and memory allows.
pub const DEFAULT_MAX_BATCH: usize = 64;

/// One sequence to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceRequest {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Seed of this sequence's ChaCha RNG.
    pub seed: u64,
    /// ChaCha stream of that seed (lets several sequences share one seed).
    pub stream: u64,
    /// Token ids that end this sequence, besides the generator's.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end this sequence, besides the generator's.
    pub stop_strings: Vec<String>,
}

impl SequenceRequest {
    /// A request with no stops of its own.
    pub fn new(prompt: Vec<u32>, seed: u64, stream: u64) -> Self {
        Self {
            prompt,
            seed,
            stream,
            stop_token_ids: vec![],
            stop_strings: vec![],
        }
    }
}

/// What the generator reports while it runs.
#[derive(Debug)]
pub enum BatchEvent<'a> {
    /// A sequence produced a token (not reported for a stop token).
    Token {
        /// Index of the request.
        request: usize,
        /// The token id.
        token_id: u32,
        /// Newly completed text; empty unless text streaming is on.
        text: &'a str,
    },
    /// A sequence ended.
    Finished {
        /// Index of the request.
        request: usize,
        /// What it generated.
        generation: Generation,
    },
}

/// Generates many sequences with continuous batching.
pub struct BatchGenerator<'a, B: Backend> {
    model: &'a CausalLm<B>,
    tokenizer: Option<&'a Tokenizer>,
    sampling: GenerationConfig,
    max_batch: usize,
    prefill_chunk: usize,
    stream_text: bool,
}

/// Per-slot state of a sequence being decoded.
struct Active {
    request: usize,
    tokens: Vec<u32>,
    /// Text so far (kept up to date only while streaming text).
    text: String,
    rng: ChaCha8Rng,
    /// Positions cached in the slot.
    len: usize,
    /// The last sampled token, to feed at the next step.
    pending: u32,
    stop_token_ids: Vec<u32>,
    stop_strings: Vec<String>,
}

impl<'a, B: Backend> BatchGenerator<'a, B> {
    /// A generator sampling with `sampling` (its seed is unused: each request has its own);
    /// `tokenizer` is needed for text and stop strings.
    pub fn new(
        model: &'a CausalLm<B>,
        tokenizer: Option<&'a Tokenizer>,
        sampling: GenerationConfig,
    ) -> Result<Self> {
        sampling.validate()?;
        Ok(Self {
            model,
            tokenizer,
            sampling,
            max_batch: DEFAULT_MAX_BATCH,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            stream_text: false,
        })
    }

    /// Sequences decoded at once (at least 1).
    pub fn max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.max(1);
        self
    }

    /// Prompt tokens per prefill pass (at least 1).
    pub fn prefill_chunk(mut self, n: usize) -> Self {
        self.prefill_chunk = n.max(1);
        self
    }

    /// Decodes text after every token and reports the new part in [`BatchEvent::Token`]
    /// (costs a decode per token; off, text is decoded once at the end).
    pub fn stream_text(mut self, on: bool) -> Self {
        self.stream_text = on;
        self
    }

    /// Generates every request, reporting tokens and finished sequences to `on_event` (return
    /// `ControlFlow::Break` to stop early: unfinished sequences are dropped unreported).
    pub fn run(
        &self,
        requests: &[SequenceRequest],
        mut on_event: impl FnMut(BatchEvent<'_>) -> ControlFlow<()>,
    ) -> Result<()> {
        self.check(requests)?;
        let cfg = &self.sampling;
        if requests.is_empty() {
            return Ok(());
        }
        if cfg.max_new_tokens == 0 {
            for request in 0..requests.len() {
                let generation = Generation {
                    token_ids: vec![],
                    text: String::new(),
                    finish_reason: FinishReason::Length,
                };
                if on_event(BatchEvent::Finished {
                    request,
                    generation,
                })
                .is_break()
                {
                    break;
                }
            }
            return Ok(());
        }
        let longest = requests.iter().map(|r| r.prompt.len()).max().unwrap_or(0);
        let max_len = longest + cfg.max_new_tokens;
        let n_slots = self.max_batch.min(requests.len());
        let mut cache = self.model.new_slot_cache(n_slots, max_len);
        let mut slots: Vec<Option<Active>> = (0..n_slots).map(|_| None).collect();
        let mut queue = 0..requests.len();
        loop {
            // 1. One decoding step for every slot; free ones compute a row that is dropped.
            let mut rows: Vec<Tensor<B, 2>> = Vec::new();
            let live: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
            if !live.is_empty() {
                let tokens: Vec<u32> = slots
                    .iter()
                    .map(|s| s.as_ref().map_or(0, |a| a.pending))
                    .collect();
                let positions: Vec<Option<usize>> =
                    slots.iter().map(|s| s.as_ref().map(|a| a.len)).collect();
                let logits = self
                    .model
                    .forward_slots_decode(&tokens, &positions, &mut cache);
                let logits = if live.len() == slots.len() {
                    logits
                } else {
                    select_rows(logits, &live)
                };
                rows.push(logits);
                for a in slots.iter_mut().flatten() {
                    a.len += 1;
                }
            }
            let mut order = live;
            // 2. Refill free slots, lowest first, by prefilling their prompts.
            for (slot, entry) in slots.iter_mut().enumerate() {
                if entry.is_some() {
                    continue;
                }
                let Some(request) = queue.next() else { break };
                let req = &requests[request];
                let mut logits = None;
                for (i, chunk) in req.prompt.chunks(self.prefill_chunk).enumerate() {
                    let start = i * self.prefill_chunk;
                    logits = Some(
                        self.model
                            .forward_slot_prefill(slot, chunk, start, &mut cache),
                    );
                }
                let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
                rng.set_stream(req.stream);
                let mut stop_token_ids = cfg.stop_token_ids.clone();
                stop_token_ids.extend(&req.stop_token_ids);
                let mut stop_strings = cfg.stop_strings.clone();
                stop_strings.extend(req.stop_strings.iter().cloned());
                *entry = Some(Active {
                    request,
                    tokens: Vec::new(),
                    text: String::new(),
                    rng,
                    len: req.prompt.len(),
                    pending: 0,
                    stop_token_ids,
                    stop_strings,
                });
                rows.push(logits.expect("prompts are not empty"));
                order.push(slot);
            }
            if order.is_empty() {
                return Ok(());
            }
            // 3. Sample every row at once; one token id per sequence comes back.
            let logits = Tensor::cat(rows, 0);
            let uniforms: Vec<f32> = order
                .iter()
                .map(|&s| {
                    let a = slots[s].as_mut().expect("live slot");
                    if cfg.temperature == 0.0 {
                        0.0
                    } else {
                        a.rng.random::<f64>() as f32
                    }
                })
                .collect();
            let next = sample_on_device(logits, cfg, &uniforms);
            // 4. Record tokens, report them, and free the slots of finished sequences.
            for (&slot, &tok) in order.iter().zip(&next) {
                let a = slots[slot].as_mut().expect("live slot");
                let finished = self.advance(a, tok, &mut on_event)?;
                if let Some(flow) = finished {
                    if flow.is_break() {
                        return Ok(());
                    }
                    slots[slot] = None;
                }
            }
            // 5. Once nothing is left to queue, move the last sequences down so the steps stop
            // computing rows for finished slots.
            if queue.is_empty() {
                self.compact(&mut slots, &mut cache);
            }
        }
    }

    /// Validates the requests against the model and the settings.
    fn check(&self, requests: &[SequenceRequest]) -> Result<()> {
        let vocab = self.model.config.vocab_size as u32;
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() {
                return Err(StudentError::InvalidArgument(format!(
                    "prompt {i} is empty"
                )));
            }
            if let Some(bad) = r.prompt.iter().find(|&&t| t >= vocab) {
                return Err(StudentError::InvalidArgument(format!(
                    "token id {bad} is outside the model's vocabulary ({vocab})"
                )));
            }
            let stops = !self.sampling.stop_strings.is_empty() || !r.stop_strings.is_empty();
            if stops && self.tokenizer.is_none() {
                return Err(StudentError::InvalidArgument(
                    "stop strings need a tokenizer to decode text".into(),
                ));
            }
        }
        Ok(())
    }

    /// Takes token `tok` for `a`; returns `Some(flow)` when the sequence ended (after
    /// reporting it), with the caller's wish to go on or stop.
    fn advance(
        &self,
        a: &mut Active,
        tok: u32,
        on_event: &mut impl FnMut(BatchEvent<'_>) -> ControlFlow<()>,
    ) -> Result<Option<ControlFlow<()>>> {
        let mut finish = None;
        if a.stop_token_ids.contains(&tok) {
            finish = Some(FinishReason::StopToken(tok));
        } else {
            a.tokens.push(tok);
            a.pending = tok;
            let mut delta = String::new();
            if let Some(tk) = self.tokenizer {
                if self.stream_text {
                    let full = tk.decode(&a.tokens, false)?;
                    let stop = earliest_stop(&full, &a.stop_strings);
                    // Hold back a trailing replacement char: usually a half-decoded UTF-8 sequence.
                    let visible = match stop {
                        Some((pos, _)) => &full[..pos],
                        None => full.trim_end_matches('\u{fffd}'),
                    };
                    let common = common_prefix_len(&a.text, visible);
                    delta = visible[common..].to_string();
                    a.text = visible.to_string();
                    if let Some((_, s)) = stop {
                        finish = Some(FinishReason::StopString(s.to_string()));
                    }
                } else if !a.stop_strings.is_empty() {
                    // A new stop string must end in this token: decoding a window of the last
                    // tokens finds it without decoding the whole sequence at every step.
                    let longest = a.stop_strings.iter().map(String::len).max().unwrap_or(0);
                    let from = a.tokens.len().saturating_sub(longest + 4);
                    let window = tk.decode(&a.tokens[from..], false)?;
                    if earliest_stop(&window, &a.stop_strings).is_some() {
                        let full = tk.decode(&a.tokens, false)?;
                        if let Some((pos, s)) = earliest_stop(&full, &a.stop_strings) {
                            a.text = full[..pos].to_string();
                            finish = Some(FinishReason::StopString(s.to_string()));
                        }
                    }
                }
            }
            let flow = on_event(BatchEvent::Token {
                request: a.request,
                token_id: tok,
                text: &delta,
            });
            if flow.is_break() {
                return Ok(Some(flow));
            }
            if finish.is_none() && a.tokens.len() >= self.sampling.max_new_tokens {
                finish = Some(FinishReason::Length);
            }
        }
        let Some(finish_reason) = finish else {
            return Ok(None);
        };
        let text = match (&finish_reason, self.tokenizer) {
            (FinishReason::StopString(_), _) => std::mem::take(&mut a.text),
            (_, Some(tk)) => tk.decode(&a.tokens, false)?,
            (_, None) => String::new(),
        };
        let generation = Generation {
            token_ids: std::mem::take(&mut a.tokens),
            text,
            finish_reason,
        };
        Ok(Some(on_event(BatchEvent::Finished {
            request: a.request,
            generation,
        })))
    }

    /// Drops finished slots from the cache once at least half of the rows a step computes
    /// belong to no sequence (only when nothing is left to queue).
    fn compact(&self, slots: &mut Vec<Option<Active>>, cache: &mut SlotCache<B>) {
        let keep: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].is_some()).collect();
        if keep.is_empty() || 2 * keep.len() > slots.len() {
            return;
        }
        cache.retain(&keep);
        *slots = keep.iter().map(|&i| slots[i].take()).collect();
    }
}

/// Rows `rows` of `t`.
fn select_rows<B: Backend>(t: Tensor<B, 2>, rows: &[usize]) -> Tensor<B, 2> {
    let device = t.device();
    let idx = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            rows.iter().map(|&r| r as i64).collect::<Vec<_>>(),
            [rows.len()],
        ),
        &device,
    );
    t.select(0, idx)
}

/// Picks one token per row of `logits` `[n, vocab]` on the device: the argmax when greedy;
/// otherwise temperature, then top-k, then top-p (the order of transformers' logits processors),
/// and the token where the kept probabilities' running sum passes `uniforms[row]` of their total.
fn sample_on_device<B: Backend>(
    logits: Tensor<B, 2>,
    cfg: &GenerationConfig,
    uniforms: &[f32],
) -> Vec<u32> {
    let [n, vocab] = logits.dims();
    let device = logits.device();
    let logits = logits.cast(DType::F32);
    let picked: Tensor<B, 2, Int> = if cfg.temperature == 0.0 {
        logits.argmax(1)
    } else {
        let (sorted, idx) = logits
            .div_scalar(cfg.temperature)
            .sort_descending_with_indices(1);
        let k = if cfg.top_k > 0 {
            cfg.top_k.min(vocab)
        } else {
            vocab
        };
        let (sorted, idx) = (sorted.narrow(1, 0, k), idx.narrow(1, 0, k));
        let mut probs = softmax(sorted, 1);
        if cfg.top_p < 1.0 {
            // Keep the smallest prefix whose mass reaches top_p: token j stays while the mass
            // before it is still below top_p.
            let before = probs.clone().cumsum(1) - probs.clone();
            probs = probs.mask_fill(before.greater_equal_elem(cfg.top_p), 0.0);
        }
        let kept = probs.clone().greater_elem(0.0).int().sum_dim(1); // [n, 1]
        let cum = probs.cumsum(1);
        let total = cum.clone().narrow(1, k - 1, 1);
        let u = Tensor::<B, 2>::from_data(TensorData::new(uniforms.to_vec(), [n, 1]), &device);
        let target = (total * u).expand([n, k]);
        // The first token whose running sum exceeds the target: the count of those at or below it.
        let count = cum.lower_equal(target).int().sum_dim(1);
        let choice = count.min_pair(kept.sub_scalar(1)).clamp_min(0);
        idx.gather(1, choice)
    };
    picked.into_data().iter::<i64>().map(|t| t as u32).collect()
}

/// The earliest occurrence of any of `stops` in `text`: (byte position, the stop string).
fn earliest_stop<'s>(text: &str, stops: &'s [String]) -> Option<(usize, &'s str)> {
    stops
        .iter()
        .filter_map(|s| text.find(s.as_str()).map(|p| (p, s.as_str())))
        .min()
}

/// Byte length of the longest common prefix of `a` and `b` that ends on a char boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

/// Sequences that fit in `budget_bytes` of KV cache at `max_len` positions each, between 1 and
/// `cap`.
pub fn max_batch_for_memory<B: Backend>(
    model: &CausalLm<B>,
    max_len: usize,
    budget_bytes: u64,
    cap: usize,
) -> usize {
    let per_seq = (model.slot_cache_bytes_per_token() * max_len.max(1)) as u64;
    ((budget_bytes / per_seq.max(1)) as usize).clamp(1, cap.max(1))
}

/// Bytes of host memory the OS reports as available (`MemAvailable`), if it says.
pub fn host_memory_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Flex;

    fn cfg(temperature: f32, top_k: usize, top_p: f32) -> GenerationConfig {
        GenerationConfig {
            temperature,
            top_k,
            top_p,
            ..Default::default()
        }
    }

    /// Samples `n` times from one row of logits with uniforms from a seeded stream.
    fn draws(logits: &[f32], c: &GenerationConfig, n: usize, seed: u64) -> Vec<u32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v = logits.len();
        let rows: Vec<f32> = (0..n).flat_map(|_| logits.iter().copied()).collect();
        let t = Tensor::<B, 2>::from_data(TensorData::new(rows, [n, v]), &Default::default());
        let u: Vec<f32> = (0..n).map(|_| rng.random::<f64>() as f32).collect();
        sample_on_device(t, c, &u)
    }

    #[test]
    fn greedy_takes_first_max() {
        assert_eq!(draws(&[0.0, 3.0, 3.0, 1.0], &cfg(0.0, 0, 1.0), 1, 0), [1]);
    }

    #[test]
    fn top_k_and_top_p_restrict_support() {
        let logits = [2.0, 1.9, 1.8, -5.0, 0.0];
        for t in draws(&logits, &cfg(1.0, 2, 1.0), 300, 7) {
            assert!(t == 0 || t == 1, "top-k 2 sampled {t}");
        }
        // Probabilities ~[0.37, 0.34, 0.30, ...]: top_p 0.5 keeps the first two.
        let mut seen = [0usize; 5];
        for t in draws(&logits, &cfg(1.0, 0, 0.5), 300, 8) {
            seen[t as usize] += 1;
        }
        assert_eq!(seen[2] + seen[3] + seen[4], 0, "{seen:?}");
        assert!(seen[0] > 50 && seen[1] > 50, "{seen:?}");
    }

    #[test]
    fn temperature_sampling_follows_distribution() {
        // logits ln(1), ln(3): probabilities 0.25 / 0.75.
        let logits = [0.0, 3f32.ln()];
        let n = 4000;
        let ones = draws(&logits, &cfg(1.0, 0, 1.0), n, 1)
            .iter()
            .filter(|&&t| t == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.75).abs() < 0.03, "{frac}");
        // Low temperature sharpens towards the argmax.
        let ones = draws(&logits, &cfg(0.2, 0, 1.0), n, 2)
            .iter()
            .filter(|&&t| t == 1)
            .count();
        assert!(ones as f64 / n as f64 > 0.99);
    }

    #[test]
    fn a_uniform_picks_the_token_whose_mass_covers_it() {
        // Sorted probabilities 0.5, 0.3, 0.2 (tokens 2, 0, 1).
        let logits = [0.3f32.ln(), 0.2f32.ln(), 0.5f32.ln()];
        let pick = |u: f32| {
            let t = Tensor::<B, 2>::from_data(
                TensorData::new(logits.to_vec(), [1, 3]),
                &Default::default(),
            );
            sample_on_device(t, &cfg(1.0, 0, 1.0), &[u])[0]
        };
        assert_eq!(pick(0.0), 2);
        assert_eq!(pick(0.49), 2);
        assert_eq!(pick(0.51), 0);
        assert_eq!(pick(0.79), 0);
        assert_eq!(pick(0.81), 1);
        assert_eq!(
            pick(1.0),
            1,
            "a uniform rounded up to 1 stays on the last kept token"
        );
    }
}
