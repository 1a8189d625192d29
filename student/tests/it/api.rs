//! The functions behind `distill model info|nll|generate`.

use std::io::Write;

use distill_student::api::sequence_nll;
use distill_student::{
    DType, FinishReason, GenerateRequest, GenerationConfig, Student, generate, model_info,
    model_nll,
};

use crate::common::*;

#[test]
fn info_reports_shape_and_memory() {
    let info = model_info(fixture("llama3-scaled")).unwrap();
    assert_eq!(info.architecture, "LlamaForCausalLM");
    assert_eq!(info.dtype, "float32");
    assert_eq!(
        (
            info.num_layers,
            info.num_heads,
            info.num_kv_heads,
            info.head_dim
        ),
        (2, 4, 2, 32)
    );
    assert_eq!(info.rope_scaling, "llama3");
    assert_eq!(info.context_length, 512);
    // Parameter count equals what the file stores (untied: every tensor counted once).
    let model = load(&fixture("llama3-scaled"));
    assert_eq!(
        info.num_parameters,
        burn::module::Module::num_params(&model) as u64
    );
    assert_eq!(info.memory_f32_bytes, 4 * info.num_parameters);
    assert_eq!(info.memory_bf16_bytes, 2 * info.num_parameters);
    assert!(info.weights_file_bytes > info.memory_f32_bytes);
    assert!(!info.has_tokenizer);
    let tied = model_info(chat_model_dir().path()).unwrap();
    assert!(tied.tie_word_embeddings && tied.has_tokenizer && tied.has_chat_template);
    assert_eq!(
        tied.num_parameters,
        burn::module::Module::num_params(&load(&fixture("qwen2-tied"))) as u64
    );
    serde_json::to_string(&info).unwrap();
}

#[test]
fn sequence_nll_matches_transformers_logits() {
    let r = reference("qwen2-tied");
    let model = load(&fixture("qwen2-tied"));
    let ids = &r.input_ids[0];
    let (nll, n) = sequence_nll(&model, ids);
    assert_eq!(n, ids.len() - 1);
    // Same quantity from transformers' logits, in f64.
    let mut want = 0.0;
    for t in 0..n {
        let row = &r.logits[0][t];
        let max = row.iter().fold(f32::MIN, |m, &v| m.max(v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        want += lse - row[ids[t + 1] as usize] as f64;
    }
    want /= n as f64;
    assert!((nll - want).abs() < 1e-4, "{nll} vs {want}");
}

#[test]
fn nll_over_jsonl_text_and_messages() {
    let dir = chat_model_dir();
    let student = Student::<B>::load(dir.path(), &device(), DType::F32).unwrap();
    let data = dir.path().join("data.jsonl");
    let mut f = std::fs::File::create(&data).unwrap();
    writeln!(f, r#"{{"text": "Hello, world! 2+3=5."}}"#).unwrap();
    writeln!(f).unwrap();
    writeln!(f, r#"{{"messages": [{{"role": "user", "content": "Hi"}}, {{"role": "assistant", "content": "Hello"}}]}}"#).unwrap();
    drop(f);
    let rep = model_nll(&student, &data).unwrap();
    assert_eq!(rep.records.len(), 2);
    assert_eq!(rep.records[0].line, 1);
    assert_eq!(rep.records[1].line, 3);
    let tok = student.tokenizer().unwrap();
    let ids = tok.encode("Hello, world! 2+3=5.", true).unwrap();
    assert_eq!(rep.records[0].tokens, ids.len() - 1);
    let (want, _) = sequence_nll(&student.model, &ids);
    assert!((rep.records[0].mean_nll - want).abs() < 1e-9);
    let total = rep.records.iter().map(|r| r.tokens).sum::<usize>();
    assert_eq!(rep.total_tokens, total);
    assert!(rep.mean_nll > 0.0 && (rep.perplexity - rep.mean_nll.exp()).abs() < 1e-9);

    // Errors name the file, the line and the field.
    std::fs::write(&data, "{\"text\": \"ok\"}\n{\"messages\": \"nope\"}\n").unwrap();
    let e = model_nll(&student, &data).unwrap_err().to_string();
    assert!(
        e.contains("data.jsonl:2") && e.contains("`messages`"),
        "{e}"
    );
    std::fs::write(&data, "{\"prompt\": \"x\"}\n").unwrap();
    let e = model_nll(&student, &data).unwrap_err().to_string();
    assert!(e.contains("data.jsonl:1") && e.contains("`text`"), "{e}");
    std::fs::write(&data, "{not json\n").unwrap();
    let e = model_nll(&student, &data).unwrap_err().to_string();
    assert!(
        e.contains("data.jsonl:1") && e.contains("invalid JSON"),
        "{e}"
    );
}

#[test]
fn generate_chat_prompt_matches_transformers_greedy() {
    let dir = chat_model_dir();
    let student = Student::<B>::load(dir.path(), &device(), DType::F32).unwrap();
    let r = reference("qwen2-tied");
    let mut streamed = String::new();
    let req = GenerateRequest {
        prompt: "What is 2+3?".into(),
        chat: true,
        max_tokens: Some(r.greedy.len()),
        ..Default::default()
    };
    let out = student
        .generate_text(&req, |t| streamed.push_str(t))
        .unwrap();
    // The fixture's prompt is transformers' chat-template tokenisation of the same question.
    assert_eq!(out.prompt_tokens, r.prompt.len());
    // EOS (<|im_end|> = 2) is a stop token; the greedy reference never emits it.
    assert!(!r.greedy.contains(&2));
    assert_eq!(out.completion_tokens, r.greedy);
    assert_eq!(out.finish_reason, FinishReason::Length);
    assert_eq!(streamed, out.completion);
    assert_eq!(
        out.completion,
        student
            .tokenizer()
            .unwrap()
            .decode(&r.greedy, false)
            .unwrap()
    );
    serde_json::to_string(&out).unwrap();
}

#[test]
fn sampling_is_seeded_and_stops() {
    let dir = chat_model_dir();
    let student = Student::<B>::load(dir.path(), &device(), DType::F32).unwrap();
    let tok = student.tokenizer().unwrap();
    let prompt = tok.encode("Once upon a time", true).unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 12,
        temperature: 1.0,
        top_p: 0.9,
        top_k: 50,
        seed: 42,
        ..Default::default()
    };
    let a = generate(
        &student.model,
        std::slice::from_ref(&prompt),
        &cfg,
        Some(tok),
        |_| {},
    )
    .unwrap();
    let b = generate(
        &student.model,
        &[prompt.clone(), prompt[..2].to_vec()],
        &cfg,
        Some(tok),
        |_| {},
    )
    .unwrap();
    assert_eq!(
        a[0], b[0],
        "same seed, same row => same sample regardless of batch"
    );
    let other = GenerationConfig {
        seed: 43,
        ..cfg.clone()
    };
    let c = generate(
        &student.model,
        std::slice::from_ref(&prompt),
        &other,
        Some(tok),
        |_| {},
    )
    .unwrap();
    assert_ne!(a[0].token_ids, c[0].token_ids);

    // Stop token: the third sampled token ends the sequence and is not returned.
    let third = a[0].token_ids[2];
    let stop = GenerationConfig {
        stop_token_ids: vec![third],
        ..cfg.clone()
    };
    let s = generate(
        &student.model,
        std::slice::from_ref(&prompt),
        &stop,
        Some(tok),
        |_| {},
    )
    .unwrap();
    let first = a[0].token_ids.iter().position(|&t| t == third).unwrap();
    assert_eq!(s[0].token_ids, a[0].token_ids[..first]);
    assert_eq!(s[0].finish_reason, FinishReason::StopToken(third));

    // Stop string: text is cut before it, generation ends at the token completing it.
    let text = &a[0].text;
    let needle: String = text
        .chars()
        .skip(text.chars().count() / 2)
        .take(2)
        .collect();
    let cut = text.find(&needle).unwrap();
    let ss = GenerationConfig {
        stop_strings: vec![needle.clone()],
        ..cfg
    };
    let mut events = 0;
    let s = generate(&student.model, &[prompt], &ss, Some(tok), |_| events += 1).unwrap();
    assert_eq!(s[0].text, text[..cut]);
    assert_eq!(s[0].finish_reason, FinishReason::StopString(needle));
    assert!(s[0].token_ids.len() <= a[0].token_ids.len() && events == s[0].token_ids.len());
}
