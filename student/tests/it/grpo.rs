//! GRPO: the loss and its gradients against a PyTorch transcription of TRL's
//! (`tests/fixtures/grpo/make_grpo_reference.py`), and a few updates that raise the reward.

use burn::backend::Autodiff;
use distill_student::load_model;
use distill_student::train::{GrpoConfig, GrpoLoss, GrpoTrainer, Rollout, group_advantages};

use crate::common::*;
use crate::train::{assert_close, read_json, tensors, train_fixture};

type T = Autodiff<B>;

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn loss_and_gradients_match_trl_for_every_normalisation() {
    let dir = crate::common::fixture("..").join("grpo");
    let want = read_json(&dir.join("reference.json"));
    let expected = tensors(&dir.join("reference.safetensors"));
    let group = want["group_size"].as_u64().unwrap() as usize;
    let rewards: Vec<f64> = want["rewards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let (adv, _) = group_advantages(&rewards, group, true);
    for (a, b) in adv.iter().zip(floats(&want["advantages"])) {
        assert!((*a as f32 - b).abs() < 1e-5, "advantage {a} vs {b}");
    }
    let prompts: Vec<Vec<u32>> = want["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let completions: Vec<Vec<u32>> = want["completions"]
        .as_array()
        .unwrap()
        .iter()
        .map(ids)
        .collect();
    let old: Vec<Vec<f32>> = want["old_logps"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let reference: Vec<Vec<f32>> = want["ref_logps"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    let mut checked = 0;
    for case in want["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let config = GrpoConfig {
            steps: 1,
            group_size: group,
            epsilon: want["epsilon"].as_f64().unwrap(),
            epsilon_high: Some(want["epsilon_high"].as_f64().unwrap()),
            beta: case["beta"].as_f64().unwrap(),
            loss: serde_json::from_value::<GrpoLoss>(case["loss_type"].clone()).unwrap(),
            temperature: want["temperature"].as_f64().unwrap(),
            max_completion_tokens: want["max_completion_tokens"].as_u64().unwrap() as usize,
            // Three sequences per pass: the normalisation must span micro-batches.
            micro_batch: 3,
            ..GrpoConfig::default()
        };
        let old_given = case["old_given"].as_bool().unwrap();
        let rollouts: Vec<Rollout> = (0..prompts.len())
            .map(|i| Rollout {
                prompt: prompts[i].clone(),
                completion: completions[i].clone(),
                advantage: adv[i],
                old_logps: old_given.then(|| old[i].clone()),
                ref_logps: Some(reference[i].clone()),
            })
            .collect();
        let mut trainer = GrpoTrainer::<T>::new(
            train_fixture("qwen2-tied"),
            prompts.clone(),
            config,
            &device(),
        )
        .unwrap();
        let (loss, grads) = trainer.peek_loss_and_gradients(&rollouts).unwrap();
        let want_loss = case["loss"].as_f64().unwrap();
        assert!(
            (loss - want_loss).abs() < 1e-5,
            "{name}: loss {loss} vs {want_loss}"
        );
        let mut worst = 0f32;
        assert_eq!(
            grads.len(),
            expected
                .keys()
                .filter(|k| k.starts_with(&format!("{name}.")))
                .count(),
            "{name}: one gradient per parameter"
        );
        for (n, shape, g) in &grads {
            let (ws, w) = &expected[&format!("{name}.{n}")];
            assert_eq!(shape, ws, "{name} {n}");
            worst = worst.max(assert_close(&format!("{name} {n}"), g, w, 1e-5));
        }
        // The comparison is not vacuous: the reference gradients are far from zero.
        let largest = grads
            .iter()
            .flat_map(|(_, _, g)| g.iter())
            .fold(0f32, |m, &x| m.max(x.abs()));
        assert!(
            largest > 1e-3,
            "{name}: gradients all but vanish ({largest:.1e})"
        );
        println!("{name}: loss {loss:.6} (torch {want_loss:.6}), max |grad diff| {worst:.2e}");
        checked += 1;
    }
    assert_eq!(
        checked, 7,
        "3 normalisations x beta 0 and > 0, plus the detached ratio"
    );
}

/// A LoRA run with a KL term and two updates per batch: the reference is the base without
/// adapters (equal to the policy at the start, so the first KL is 0), the old
/// log-probabilities are the sampling policy's (ratio 1 at the first update, moved at the
/// second), the base stays frozen while the adapters move, and the first update's loss is the
/// one `peek` computes for the same rollouts.
#[test]
fn lora_updates_keep_the_base_frozen_and_measure_kl_to_it() {
    use distill_student::train::LoraConfig;
    let dir = train_fixture("qwen2-tied");
    let prompts = vec![vec![5, 9, 11, 4], vec![7, 3, 8]];
    let config = GrpoConfig {
        steps: 2,
        prompts_per_step: 2,
        group_size: 2,
        updates_per_batch: 2,
        beta: 0.1,
        learning_rate: 1e-2,
        max_completion_tokens: 6,
        lora: Some(LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        }),
        ..GrpoConfig::default()
    };
    let rollout = |p: usize, completion: Vec<u32>, advantage: f64| Rollout {
        prompt: prompts[p].clone(),
        completion,
        advantage,
        old_logps: None,
        ref_logps: None,
    };
    let mut rollouts = vec![
        rollout(0, vec![12, 13, 2], 0.7),
        rollout(0, vec![14, 2], -0.7),
        rollout(1, vec![20, 21, 22, 2], -0.7),
        rollout(1, vec![23, 2], 0.7),
    ];
    let mut trainer = GrpoTrainer::<T>::new(&dir, prompts.clone(), config, &device()).unwrap();
    let before = trainer.merged_model();
    let m1 = trainer.update(0, &mut rollouts).unwrap();
    assert!(
        rollouts
            .iter()
            .all(|r| r.old_logps.is_some() && r.ref_logps.is_some())
    );
    // Adapters start at B = 0: policy = reference = sampling policy.
    for r in &rollouts {
        let (old, reference) = (r.old_logps.as_ref().unwrap(), r.ref_logps.as_ref().unwrap());
        assert_eq!(old.len(), r.completion.len());
        for (a, b) in old.iter().zip(reference) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }
    assert!(m1.kl.unwrap().abs() < 1e-6, "kl {:?}", m1.kl);
    assert_eq!(m1.clip_fraction, 0.0);
    assert!(m1.grad_norm > 0.0);
    let m2 = trainer.update(0, &mut rollouts).unwrap();
    assert!(m2.kl.unwrap() > 1e-9, "the policy moved away from its base");
    assert!(
        m2.loss < m1.loss,
        "the surrogate improved: {} -> {}",
        m1.loss,
        m2.loss
    );
    assert!(trainer.is_finished());
    // The base is frozen: the merged model moved only by the adapters' product.
    let base_before = load_model::<B>(&dir, &device(), distill_student::DType::F32).unwrap();
    let after = trainer.merged_model();
    let emb = |m: &distill_student::CausalLm<B>| {
        m.model
            .embed_tokens
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(emb(&base_before), emb(&after), "embeddings are not adapted");
    let q = |m: &distill_student::CausalLm<B>| {
        m.model.layers[0]
            .self_attn
            .q_proj
            .weight
            .val()
            .into_data()
            .to_vec::<f32>()
            .unwrap()
    };
    assert_eq!(q(&before), q(&base_before));
    assert_ne!(q(&after), q(&before), "the adapters moved q_proj");
}

/// bf16 compute (f32 masters, f32 log-softmax) gives the f32 loss and gradients to bf16's
/// precision on the reference rollouts.
#[test]
fn bf16_compute_tracks_f32() {
    use distill_student::train::Precision;
    let dir = crate::common::fixture("..").join("grpo");
    let want = read_json(&dir.join("reference.json"));
    let rollouts: Vec<Rollout> = (0..8)
        .map(|i| Rollout {
            prompt: ids(&want["prompts"][i]),
            completion: ids(&want["completions"][i]),
            advantage: f64::from(floats(&want["advantages"])[i]),
            old_logps: Some(floats(&want["old_logps"][i])),
            ref_logps: Some(floats(&want["ref_logps"][i])),
        })
        .collect();
    let prompts: Vec<Vec<u32>> = rollouts.iter().map(|r| r.prompt.clone()).collect();
    let run = |precision| {
        let config = GrpoConfig {
            steps: 1,
            group_size: 4,
            beta: 0.04,
            temperature: 0.7,
            precision,
            ..GrpoConfig::default()
        };
        GrpoTrainer::<T>::new(
            train_fixture("qwen2-tied"),
            prompts.clone(),
            config,
            &device(),
        )
        .unwrap()
        .peek_loss_and_gradients(&rollouts)
        .unwrap()
    };
    let (l32, g32) = run(Precision::F32);
    let (l16, g16) = run(Precision::Bf16);
    assert!(
        (l32 - l16).abs() < 0.02 * l32.abs().max(0.01),
        "{l32} vs {l16}"
    );
    let flat = |g: &[(String, Vec<usize>, Vec<f32>)]| -> Vec<f64> {
        g.iter()
            .flat_map(|(_, _, v)| v.iter().map(|&x| f64::from(x)))
            .collect()
    };
    let (a, b) = (flat(&g32), flat(&g16));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cosine = dot / (norm(&a) * norm(&b));
    assert!(cosine > 0.99, "gradient cosine {cosine}");
    println!("bf16 vs f32: loss {l16:.6} vs {l32:.6}, gradient cosine {cosine:.5}");
}
