//! Synthetic token data for the benches and the `train_step` example, which include this file
//! with `#[path]`: the ids only need to be spread over the vocabulary, reproducibly.

use distill_student::SftExample;

/// `n` ids below `vocab` from a small LCG started at `seed`.
pub fn token_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// `n` examples of `seq + 1` ids (the last is only a label, so the model reads `seq`), the first
/// `prompt` of each being the prompt.
#[allow(dead_code)] // the throughput bench needs ids only
pub fn sft_examples(
    n: usize,
    seq: usize,
    prompt: usize,
    vocab: usize,
    seed: u64,
) -> Vec<SftExample> {
    token_ids(n * (seq + 1), vocab, seed)
        .chunks_exact(seq + 1)
        .map(|ids| SftExample {
            prompt_ids: ids[..prompt].to_vec(),
            target_ids: ids[prompt..].to_vec(),
        })
        .collect()
}
