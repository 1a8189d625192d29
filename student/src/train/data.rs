//! Examples → sequences (the length rule), the per-epoch batch plan and micro-batch tensors.
//!
//! Batching is length-grouped, not packed: each epoch shuffles the examples with a ChaCha seed of
//! `(seed, epoch)`, cuts the shuffled list into mega-chunks of ~50 micro-batches, sorts each chunk
//! by length (longest first) and slices it into micro-batches, then shuffles the micro-batches.
//! Rows of a micro-batch are right-padded; causal attention never lets a real token see the
//! padding after it, so no attention mask is needed and sequences stay isolated (packing would
//! need a block-diagonal mask and per-sequence positions, and Burn 0.21 materialises the full
//! `[b, heads, n, n]` scores either way). The plan is a function of (seed, epoch, lengths, micro-batch
//! setting) only, which is what makes resume exact.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::config::{MicroBatch, Overlong, TrainConfig};
use super::error::{TrainError, TrainResult};
use crate::tokenizer::{ChatMessage, SftExample, Tokenizer};

/// Micro-batches per length-sorted mega-chunk (transformers' `LengthGroupedSampler` uses 50).
const MEGA_BATCH_MULT: usize = 50;

/// What the length rule did to the examples given to the trainer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Examples given.
    pub examples: usize,
    /// Examples trained on (truncated ones included).
    pub kept: usize,
    /// Left out for exceeding `max_seq_len` (rule `drop`, or a prompt too long to keep any target).
    pub dropped_overlong: usize,
    /// Left out for having no target token.
    pub dropped_empty: usize,
    /// Kept with their target cut to fit (rule `truncate_target`).
    pub truncated: usize,
    /// Prompt + target tokens of the kept examples, per epoch.
    pub tokens: usize,
    /// Target (loss) tokens of the kept examples, per epoch.
    pub target_tokens: usize,
}

/// One kept example: prompt and target tokens back to back.
#[derive(Debug, Clone)]
pub(crate) struct Sequence {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
}

impl Sequence {
    /// Tokens fed to the model: the last token is only ever a label.
    pub fn input_len(&self) -> usize {
        self.tokens.len() - 1
    }

    /// First position whose output is scored (it predicts the first target token).
    fn first_scored(&self) -> usize {
        self.prompt_len.max(1) - 1
    }

    /// Scored positions = target tokens (the first token of a prompt-less example has no context).
    pub fn n_targets(&self) -> usize {
        self.input_len() - self.first_scored()
    }
}

/// Applies the length rule; the stats say what happened to every example.
pub(crate) fn prepare(
    examples: &[SftExample],
    config: &TrainConfig,
    vocab: usize,
) -> TrainResult<(Vec<Sequence>, DataStats)> {
    let mut stats = DataStats {
        examples: examples.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(examples.len());
    let max = config.max_seq_len;
    for (index, ex) in examples.iter().enumerate() {
        if let Some(&token) = ex
            .prompt_ids
            .iter()
            .chain(&ex.target_ids)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(TrainError::TokenOutOfRange {
                index,
                token,
                vocab,
            });
        }
        let (p, t) = (ex.prompt_ids.len(), ex.target_ids.len());
        if t == 0 || p + t < 2 {
            stats.dropped_empty += 1;
            continue;
        }
        let mut keep_target = t;
        if p + t > max {
            match config.overlong {
                Overlong::Drop => {
                    stats.dropped_overlong += 1;
                    continue;
                }
                Overlong::TruncateTarget => {
                    if p >= max {
                        stats.dropped_overlong += 1;
                        continue;
                    }
                    keep_target = max - p;
                    stats.truncated += 1;
                }
            }
        }
        let mut tokens = Vec::with_capacity(p + keep_target);
        tokens.extend_from_slice(&ex.prompt_ids);
        tokens.extend_from_slice(&ex.target_ids[..keep_target]);
        let seq = Sequence {
            tokens,
            prompt_len: p,
        };
        stats.kept += 1;
        stats.tokens += seq.tokens.len();
        stats.target_tokens += seq.n_targets();
        out.push(seq);
    }
    if out.is_empty() {
        return Err(TrainError::NoData(format!(
            "all {} examples were dropped ({} longer than max_seq_len {}, {} without a target)",
            stats.examples, stats.dropped_overlong, max, stats.dropped_empty
        )));
    }
    Ok((out, stats))
}

/// FNV-1a over every sequence, so a resume can refuse different data (stable across builds,
/// unlike `std`'s hasher).
pub(crate) fn fingerprint(seqs: &[Sequence]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(seqs.len() as u64);
    for s in seqs {
        eat(s.prompt_len as u64);
        eat(s.tokens.len() as u64);
        for &t in &s.tokens {
            eat(u64::from(t));
        }
    }
    h
}

/// SplitMix64 finaliser: decorrelates seeds derived from small counters.
pub(crate) fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The micro-batches (lists of sequence indices) of one epoch.
pub(crate) fn epoch_plan(
    input_lens: &[usize],
    micro: MicroBatch,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let n = input_lens.len();
    let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch as u64));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    let per_batch = match micro {
        MicroBatch::Sequences(k) => k,
        MicroBatch::Tokens(budget) => {
            let mean = input_lens.iter().sum::<usize>().div_ceil(n.max(1)).max(1);
            (budget / mean).max(1)
        }
    };
    let mut batches = Vec::new();
    for chunk in order.chunks(MEGA_BATCH_MULT * per_batch) {
        let mut chunk = chunk.to_vec();
        // Stable sort: ties keep their shuffled order.
        chunk.sort_by_key(|&i| std::cmp::Reverse(input_lens[i]));
        match micro {
            MicroBatch::Sequences(k) => batches.extend(chunk.chunks(k).map(<[usize]>::to_vec)),
            MicroBatch::Tokens(budget) => {
                let mut cur: Vec<usize> = Vec::new();
                for i in chunk {
                    // Sorted longest first, so the batch's first row sets its padded width.
                    let width = cur.first().map_or(input_lens[i], |&f| input_lens[f]);
                    if !cur.is_empty() && (cur.len() + 1) * width > budget {
                        batches.push(std::mem::take(&mut cur));
                    }
                    cur.push(i);
                }
                if !cur.is_empty() {
                    batches.push(cur);
                }
            }
        }
    }
    batches.shuffle(&mut rng);
    batches
}

/// Host-side tensors of one micro-batch.
pub(crate) struct Batch {
    /// `[rows × width]` input ids, right-padded with 0.
    pub ids: Vec<i64>,
    pub rows: usize,
    pub width: usize,
    /// Flattened `row × width + position` of every scored position.
    pub scored: Vec<i64>,
    /// The token each scored position must predict.
    pub targets: Vec<i64>,
    /// Real (non-padding) input tokens.
    pub tokens: usize,
}

pub(crate) fn build_batch(seqs: &[Sequence], members: &[usize]) -> Batch {
    let rows = members.len();
    let width = members
        .iter()
        .map(|&i| seqs[i].input_len())
        .max()
        .unwrap_or(0);
    let mut ids = vec![0i64; rows * width];
    let mut scored = Vec::new();
    let mut targets = Vec::new();
    let mut tokens = 0;
    for (r, &i) in members.iter().enumerate() {
        let s = &seqs[i];
        let n = s.input_len();
        tokens += n;
        for (pos, &t) in s.tokens[..n].iter().enumerate() {
            ids[r * width + pos] = i64::from(t);
        }
        for pos in s.first_scored()..n {
            scored.push((r * width + pos) as i64);
            targets.push(i64::from(s.tokens[pos + 1]));
        }
    }
    Batch {
        ids,
        rows,
        width,
        scored,
        targets,
        tokens,
    }
}

/// One curated trace in the trainer's input form: `distill dataset export --format sft` writes
/// these (`messages` = the prompt turns the teacher saw; extra keys are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftRecord {
    /// System/user turns before the assistant's answer.
    pub messages: Vec<ChatMessage>,
    /// The teacher's reasoning (without `<think>` tags).
    pub reasoning: String,
    /// The final answer after `</think>`.
    pub answer: String,
}

impl SftRecord {
    /// A record whose prompt is a single user turn.
    pub fn from_prompt(
        prompt: impl Into<String>,
        reasoning: impl Into<String>,
        answer: impl Into<String>,
    ) -> Self {
        Self {
            messages: vec![ChatMessage::user(prompt)],
            reasoning: reasoning.into(),
            answer: answer.into(),
        }
    }
}

/// Renders records with the tokenizer's chat template and SFT rule
/// ([`Tokenizer::sft_example`]): prompt ids carry no loss, target ids are
/// `<think>\n{reasoning}\n</think>\n\n{answer}` + EOS.
pub fn examples_from_records(
    tokenizer: &Tokenizer,
    records: &[SftRecord],
) -> crate::error::Result<Vec<SftExample>> {
    records
        .iter()
        .map(|r| tokenizer.sft_example(&r.messages, &r.reasoning, &r.answer))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: usize, t: usize) -> SftExample {
        SftExample {
            prompt_ids: vec![1; p],
            target_ids: vec![2; t],
        }
    }

    #[test]
    fn length_rule_counts_every_example() {
        let examples = vec![ex(3, 4), ex(6, 6), ex(12, 2), ex(2, 0), ex(0, 5)];
        let drop = TrainConfig {
            max_seq_len: 10,
            ..TrainConfig::default()
        };
        let (seqs, s) = prepare(&examples, &drop, 10).unwrap();
        assert_eq!(
            (s.kept, s.dropped_overlong, s.dropped_empty, s.truncated),
            (2, 2, 1, 0)
        );
        // A prompt-less example cannot score its first token.
        assert_eq!(
            seqs.iter().map(Sequence::n_targets).collect::<Vec<_>>(),
            [4, 4]
        );
        assert_eq!((s.tokens, s.target_tokens), (12, 8));
        let cut = TrainConfig {
            overlong: Overlong::TruncateTarget,
            ..drop.clone()
        };
        let (seqs, s) = prepare(&examples, &cut, 10).unwrap();
        assert_eq!((s.kept, s.dropped_overlong, s.truncated), (3, 1, 1));
        assert_eq!(seqs[1].tokens.len(), 10);
        assert_eq!(seqs[1].n_targets(), 4);
        assert!(matches!(
            prepare(&[ex(1, 1)], &drop, 2),
            Err(TrainError::TokenOutOfRange { token: 2, .. })
        ));
    }

    #[test]
    fn plan_is_a_function_of_seed_and_epoch_and_covers_every_example() {
        let lens: Vec<usize> = (0..37).map(|i| 5 + (i * 7) % 23).collect();
        for micro in [MicroBatch::Sequences(4), MicroBatch::Tokens(60)] {
            let a = epoch_plan(&lens, micro, 1, 0);
            assert_eq!(a, epoch_plan(&lens, micro, 1, 0));
            assert_ne!(a, epoch_plan(&lens, micro, 1, 1));
            assert_ne!(a, epoch_plan(&lens, micro, 2, 0));
            let mut all: Vec<usize> = a.iter().flatten().copied().collect();
            all.sort();
            assert_eq!(all, (0..37).collect::<Vec<_>>());
            if let MicroBatch::Tokens(budget) = micro {
                for b in &a {
                    let width = b.iter().map(|&i| lens[i]).max().unwrap();
                    assert!(b.len() == 1 || b.len() * width <= budget, "{b:?}");
                }
            }
        }
    }

    #[test]
    fn batch_scores_only_targets() {
        let seqs = vec![
            Sequence {
                tokens: vec![10, 11, 12, 13],
                prompt_len: 2,
            },
            Sequence {
                tokens: vec![20, 21, 22, 23, 24, 25],
                prompt_len: 4,
            },
        ];
        let b = build_batch(&seqs, &[0, 1]);
        assert_eq!((b.rows, b.width, b.tokens), (2, 5, 8));
        assert_eq!(b.ids, [10, 11, 12, 0, 0, 20, 21, 22, 23, 24]);
        assert_eq!(b.scored, [1, 2, 8, 9]);
        assert_eq!(b.targets, [12, 13, 24, 25]);
    }
}
