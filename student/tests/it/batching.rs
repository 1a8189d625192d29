//! Continuous batching: outputs do not depend on the batch size, the slot a sequence lands in,
//! the prefill chunking or the neighbours it decodes with.

use std::ops::ControlFlow;

use distill_student::{BatchEvent, BatchGenerator, CausalLm, GenerationConfig, SequenceRequest};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::common::*;

/// 64 prompts of 1 to 40 tokens (the fixture's reference prompt first), each with its own seed.
fn requests(model: &CausalLm<B>, reference_prompt: &[u32]) -> Vec<SequenceRequest> {
    let vocab = model.config.vocab_size as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut out = vec![SequenceRequest::new(reference_prompt.to_vec(), 1000, 0)];
    for i in 1..64u64 {
        let len = rng.random_range(1..=40);
        let prompt = (0..len).map(|_| rng.random_range(0..vocab)).collect();
        out.push(SequenceRequest::new(prompt, 1000 + i, 0));
    }
    out
}

/// Token ids per request, generated `max_batch` at a time.
fn run(
    model: &CausalLm<B>,
    requests: &[SequenceRequest],
    cfg: &GenerationConfig,
    max_batch: usize,
    prefill_chunk: usize,
) -> Vec<Vec<u32>> {
    let mut out = vec![None; requests.len()];
    BatchGenerator::new(model, None, cfg.clone())
        .unwrap()
        .max_batch(max_batch)
        .prefill_chunk(prefill_chunk)
        .run(requests, |e| {
            if let BatchEvent::Finished {
                request,
                generation,
            } = e
            {
                assert!(out[request].is_none(), "request {request} finished twice");
                out[request] = Some(generation.token_ids);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    out.into_iter()
        .enumerate()
        .map(|(i, g)| g.unwrap_or_else(|| panic!("request {i} never finished")))
        .collect()
}

/// Greedy decoding of at least 24 tokens.
fn greedy(r: &Reference) -> GenerationConfig {
    GenerationConfig::greedy(r.greedy.len().max(24))
}

#[test]
fn batched_greedy_equals_one_at_a_time_and_transformers() {
    for name in MODELS {
        let model = load(&fixture(name));
        let r = reference(name);
        let reqs = requests(&model, &r.prompt);
        let cfg = greedy(&r);
        let alone = run(&model, &reqs, &cfg, 1, 512);
        // transformers' greedy continuation of its prompt (no stop token there).
        assert_eq!(alone[0][..r.greedy.len()], r.greedy[..], "{name}");
        for (max_batch, chunk) in [(7, 512), (64, 512), (13, 5)] {
            let batched = run(&model, &reqs, &cfg, max_batch, chunk);
            for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
                assert_eq!(
                    a, b,
                    "{name}: request {i}, max_batch {max_batch}, chunk {chunk}"
                );
            }
        }
        // With a stop token (the most common generated one) some end early and their slots
        // take the next prompts.
        let mut counts = std::collections::HashMap::new();
        for t in alone.iter().flat_map(|o| &o[1..]) {
            *counts.entry(*t).or_insert(0) += 1;
        }
        let stop = counts.into_iter().max_by_key(|&(t, n)| (n, t)).unwrap().0;
        let cfg = GenerationConfig {
            stop_token_ids: vec![stop],
            ..cfg
        };
        let alone = run(&model, &reqs, &cfg, 1, 512);
        assert!(
            alone.iter().any(|t| t.len() < cfg.max_new_tokens),
            "{name}: no sequence stopped early, the test does not exercise refills"
        );
        assert_eq!(
            run(&model, &reqs, &cfg, 7, 512),
            alone,
            "{name}: with stops"
        );
    }
}

#[test]
fn sampled_outputs_do_not_depend_on_the_batch_size() {
    for name in ["qwen2-untied", "llama3-scaled"] {
        let model = load(&fixture(name));
        let r = reference(name);
        let reqs = requests(&model, &r.prompt);
        let cfg = GenerationConfig {
            temperature: 0.6,
            top_p: 0.95,
            ..greedy(&r)
        };
        let one = run(&model, &reqs, &cfg, 1, 512);
        assert_eq!(run(&model, &reqs, &cfg, 7, 512), one, "{name}: max_batch 7");
        assert_eq!(run(&model, &reqs, &cfg, 64, 3), one, "{name}: max_batch 64");
        // Different seeds do sample differently.
        let reseeded: Vec<SequenceRequest> = reqs
            .iter()
            .map(|q| SequenceRequest::new(q.prompt.clone(), q.seed + 1, 0))
            .collect();
        assert_ne!(run(&model, &reseeded, &cfg, 64, 512), one, "{name}");
    }
}

#[test]
fn per_sequence_stops_and_early_exit() {
    let model = load(&fixture("qwen2-untied"));
    let r = reference("qwen2-untied");
    let cfg = GenerationConfig::greedy(r.greedy.len());
    // A request whose own stop token is its third greedy token ends there; its neighbour,
    // with the same prompt and no stop, runs to the budget.
    let mut stopped = SequenceRequest::new(r.prompt.clone(), 0, 0);
    stopped.stop_token_ids = vec![r.greedy[2]];
    let free = SequenceRequest::new(r.prompt.clone(), 0, 0);
    let out = run(&model, &[stopped.clone(), free.clone()], &cfg, 2, 512);
    let first = r.greedy.iter().position(|&t| t == r.greedy[2]).unwrap();
    assert_eq!(out[0], r.greedy[..first]);
    assert_eq!(out[1], r.greedy);
    // Breaking from the callback stops generation at once.
    let mut finished = 0;
    BatchGenerator::new(&model, None, cfg)
        .unwrap()
        .max_batch(1)
        .run(&[free.clone(), free.clone(), free], |e| {
            if matches!(e, BatchEvent::Finished { .. }) {
                finished += 1;
                return ControlFlow::Break(());
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(finished, 1);
}

#[test]
fn bad_requests_are_refused() {
    let model = load(&fixture("qwen2-untied"));
    let generator = BatchGenerator::new(&model, None, GenerationConfig::greedy(4)).unwrap();
    let err = generator
        .run(&[SequenceRequest::new(vec![], 0, 0)], |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(err.to_string().contains("prompt 0 is empty"), "{err}");
    let vocab = model.config.vocab_size as u32;
    let err = generator
        .run(&[SequenceRequest::new(vec![vocab], 0, 0)], |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err();
    assert!(
        err.to_string().contains("outside the model's vocabulary"),
        "{err}"
    );
    let mut with_stop = SequenceRequest::new(vec![1], 0, 0);
    with_stop.stop_strings = vec!["x".into()];
    let err = generator
        .run(&[with_stop], |_| ControlFlow::Continue(()))
        .unwrap_err();
    assert!(err.to_string().contains("need a tokenizer"), "{err}");
}
