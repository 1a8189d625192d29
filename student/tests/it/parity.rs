//! Logits, greedy continuations and KV-cache decoding against transformers.

use distill_student::{GenerationConfig, generate};

use crate::common::*;

const TOL: f32 = 1e-4;

#[test]
fn logits_match_transformers() {
    for name in MODELS {
        let model = load(&fixture(name));
        let r = reference(name);
        let got = to_vec(model.forward(ids_tensor(&r.input_ids)));
        let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
        let diff = max_abs_diff(&got, &want);
        println!("{name}: max |logit diff| = {diff:.2e}");
        assert!(diff < TOL, "{name}: max |logit diff| {diff} >= {TOL}");
    }
}

#[test]
fn greedy_generation_reproduces_transformers() {
    for name in MODELS {
        let model = load(&fixture(name));
        let r = reference(name);
        // A near-tie would make the comparison depend on rounding rather than on the model.
        assert!(
            r.min_margin > 1e-3,
            "{name}: fixture margin {}",
            r.min_margin
        );
        let out = generate(
            &model,
            std::slice::from_ref(&r.prompt),
            &GenerationConfig::greedy(r.greedy.len()),
            None,
            |_| {},
        )
        .unwrap();
        assert_eq!(out[0].token_ids, r.greedy, "{name}");
    }
}

#[test]
fn batched_generation_with_padding_matches_single() {
    let name = "qwen2-untied";
    let model = load(&fixture(name));
    let r = reference(name);
    let short = r.input_ids[1][..3].to_vec();
    let cfg = GenerationConfig::greedy(r.greedy.len());
    let batch = generate(
        &model,
        &[short.clone(), r.prompt.clone()],
        &cfg,
        None,
        |_| {},
    )
    .unwrap();
    let alone = generate(&model, &[short], &cfg, None, |_| {}).unwrap();
    assert_eq!(batch[1].token_ids, r.greedy);
    assert_eq!(batch[0].token_ids, alone[0].token_ids);
}

#[test]
fn kv_cache_decoding_matches_full_recomputation() {
    for name in ["qwen2-untied", "llama3-scaled"] {
        let model = load(&fixture(name));
        let r = reference(name);
        let full = to_vec(model.forward(ids_tensor(&r.input_ids)));
        let [n, len] = [r.input_ids.len(), r.input_ids[0].len()];
        let vocab = full.len() / (n * len);

        // Prefill 4 tokens, then one token at a time.
        let mut cache = model.new_cache(n);
        let mut steps = vec![to_vec(
            model.forward_cached(
                ids_tensor(
                    &r.input_ids
                        .iter()
                        .map(|s| s[..4].to_vec())
                        .collect::<Vec<_>>(),
                ),
                None,
                &mut cache,
            ),
        )];
        for t in 4..len {
            let col: Vec<Vec<u32>> = r.input_ids.iter().map(|s| vec![s[t]]).collect();
            steps.push(to_vec(model.forward_cached(
                ids_tensor(&col),
                None,
                &mut cache,
            )));
        }
        // Reassemble [n, len, vocab] from [n, 4, vocab] + (len-4) x [n, 1, vocab].
        let mut cached = vec![0.0; full.len()];
        for row in 0..n {
            for t in 0..len {
                let (chunk, width, at) = if t < 4 { (0, 4, t) } else { (t - 3, 1, 0) };
                let src = &steps[chunk][(row * width + at) * vocab..(row * width + at + 1) * vocab];
                cached[(row * len + t) * vocab..(row * len + t + 1) * vocab].copy_from_slice(src);
            }
        }
        let diff = max_abs_diff(&cached, &full);
        println!("{name}: KV cache vs full max diff {diff:.2e}");
        assert!(diff < TOL, "{name}: {diff}");
    }
}

#[test]
fn left_padded_rows_match_unpadded_logits() {
    let name = "llama-bias-tied";
    let model = load(&fixture(name));
    let r = reference(name);
    let long = r.input_ids[0].clone();
    let short = r.input_ids[1][..6].to_vec();
    let len = long.len();
    let pad = len - short.len();
    let mut padded = vec![0u32; pad];
    padded.extend(&short);
    let valid = vec![
        vec![true; len],
        (0..len).map(|i| i >= pad).collect::<Vec<_>>(),
    ];
    let mut cache = model.new_cache(2);
    let batched =
        to_vec(model.forward_cached(ids_tensor(&[long, padded]), Some(&valid), &mut cache));
    let vocab = batched.len() / (2 * len);
    // Row 0 = transformers' logits; row 1's real positions = the short sequence alone.
    let want0: Vec<f32> = r.logits[0].iter().flatten().copied().collect();
    assert!(max_abs_diff(&batched[..len * vocab], &want0) < TOL);
    let alone = to_vec(model.forward(ids_tensor(&[short])));
    let diff = max_abs_diff(&batched[(len + pad) * vocab..], &alone);
    assert!(diff < TOL, "{diff}");
    // Decoding one more token after the padded prefill still matches.
    let next = vec![vec![7u32], vec![7u32]];
    let step = to_vec(model.forward_cached_last(ids_tensor(&next), None, &mut cache));
    let mut ext = r.input_ids[1][..6].to_vec();
    ext.push(7);
    let full = to_vec(model.forward(ids_tensor(&[ext])));
    let diff = max_abs_diff(&step[vocab..], &full[6 * vocab..]);
    assert!(diff < TOL, "{diff}");
}

#[test]
fn bf16_load_runs_close_to_f32() {
    let name = "qwen2-untied";
    let dev = device();
    let model = distill_student::load_model::<B>(fixture(name), &dev, distill_student::DType::BF16)
        .unwrap();
    assert_eq!(model.dtype(), distill_student::DType::BF16);
    let r = reference(name);
    let got = to_vec(model.forward(ids_tensor(&r.input_ids)));
    let want: Vec<f32> = r.logits.iter().flatten().flatten().copied().collect();
    let diff = max_abs_diff(&got, &want);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    println!("bf16 max diff {diff} (logit scale {scale})");
    assert!(diff < 0.05 * scale, "{diff} vs scale {scale}");
}

#[test]
fn trains_under_autodiff_with_gradients_everywhere() {
    use burn::backend::Autodiff;
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::prelude::*;
    use burn::tensor::activation::log_softmax;
    type A = Autodiff<B>;
    let name = "qwen2-untied";
    let model =
        distill_student::load_model::<A>(fixture(name), &device(), distill_student::DType::F32)
            .unwrap();
    let r = reference(name);
    let flat: Vec<i64> = r.input_ids.iter().flatten().map(|&t| t as i64).collect();
    let ids =
        Tensor::<A, 2, Int>::from_data(TensorData::new(flat, [2, r.input_ids[0].len()]), &device());
    let logits = model.forward(ids.clone().narrow(1, 0, 9));
    let targets = ids.narrow(1, 1, 9);
    let loss = log_softmax(logits, 2)
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .neg()
        .mean();
    let grads = loss.backward();
    struct Check<'a>(
        &'a <A as burn::tensor::backend::AutodiffBackend>::Gradients,
        usize,
        usize,
    );
    impl ModuleVisitor<A> for Check<'_> {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<A, D>>) {
            self.1 += 1;
            if let Some(g) = p.val().grad(self.0)
                && g.abs().sum().into_scalar() > 0.0
            {
                self.2 += 1;
            }
        }
    }
    let mut c = Check(&grads, 0, 0);
    model.visit(&mut c);
    assert_eq!(
        c.1, c.2,
        "{} of {} parameters got a non-zero gradient",
        c.2, c.1
    );
    assert!(c.1 > 20);
}
