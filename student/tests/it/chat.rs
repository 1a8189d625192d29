//! Tokenizer and chat templates against transformers' renders (`parity/chat.json`).

use distill_student::{ChatMessage, Tokenizer};
use serde_json::{Value, json};

use crate::common::*;

fn chat_reference() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("").join("chat.json")).unwrap()).unwrap()
}

const DEEPSEEK_SPECIALS: [&str; 4] = [
    "<｜begin▁of▁sentence｜>",
    "<｜end▁of▁sentence｜>",
    "<｜User｜>",
    "<｜Assistant｜>",
];

/// The minimind tokenizer with DeepSeek-R1-Distill's tokenizer_config.json and chat_template.jinja
/// (the real DeepSeek tokenizer.json is too big to ship); DeepSeek's special tokens are added.
fn deepseek_like() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ds = repo_fixture("models/deepseek-r1-distill-qwen-1.5b");
    for f in ["tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(ds.join(f), dir.path().join(f)).unwrap();
    }
    let mut tok: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_fixture("tokenizers/minimind/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let added = tok["added_tokens"].as_array_mut().unwrap();
    for (i, t) in DEEPSEEK_SPECIALS.iter().enumerate() {
        added.push(
            json!({"id": 6400 + i, "content": t, "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}),
        );
    }
    std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
    dir
}

fn messages(v: &Value) -> Vec<ChatMessage> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn templates_render_like_transformers() {
    let r = chat_reference();
    let minimind = Tokenizer::from_dir(repo_fixture("tokenizers/minimind")).unwrap();
    let ds_dir = deepseek_like();
    let deepseek = Tokenizer::from_dir(ds_dir.path()).unwrap();
    let convs = r["conversations"].as_array().unwrap();
    let mut checked = 0;
    for case in r["renders"].as_array().unwrap() {
        let tok = match case["template"].as_str().unwrap() {
            "minimind" => &minimind,
            _ => &deepseek,
        };
        let msgs = messages(&convs[case["conversation"].as_u64().unwrap() as usize]);
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let got = tok.apply_chat_template(&msgs, agp).unwrap();
        assert_eq!(got, case["text"].as_str().unwrap(), "{case}");
        checked += 1;
    }
    assert_eq!(checked, 12);
}

#[test]
fn deepseek_template_trap_is_reproduced() {
    let dir = deepseek_like();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let msgs = vec![
        ChatMessage::user("Q1"),
        ChatMessage::assistant("<think>\nsecret reasoning\n</think>\n\nA1"),
        ChatMessage::user("Q2"),
    ];
    let text = tok.apply_chat_template(&msgs, true).unwrap();
    assert_eq!(
        text,
        "<｜begin▁of▁sentence｜><｜User｜>Q1<｜Assistant｜>\n\nA1<｜end▁of▁sentence｜><｜User｜>Q2<｜Assistant｜><think>\n"
    );
    assert!(!text.contains("secret"));
}

#[test]
fn minimind_tokenizer_matches_transformers_ids() {
    let r = chat_reference();
    let tok = Tokenizer::from_dir(repo_fixture("tokenizers/minimind")).unwrap();
    assert_eq!(tok.vocab_size(), 6400);
    assert_eq!(tok.eos_token_id, Some(2));
    for e in r["encodings"].as_array().unwrap() {
        let text = e["text"].as_str().unwrap();
        let want: Vec<u32> = e["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> String {
    tok.decode(ids, false).unwrap()
}

#[test]
fn sft_example_after_deepseek_generation_prompt() {
    let dir = deepseek_like();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let ex = tok
        .sft_example(
            &[ChatMessage::user("What is 2+3?")],
            "2 plus 3 is 5.",
            "The answer is 5.",
        )
        .unwrap();
    assert_eq!(
        decode(&tok, &ex.prompt_ids),
        "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n"
    );
    assert_eq!(
        decode(&tok, &ex.target_ids),
        "2 plus 3 is 5.\n</think>\n\nThe answer is 5.<｜end▁of▁sentence｜>"
    );
    assert_eq!(*ex.target_ids.last().unwrap(), 6401);
    let all = decode(
        &tok,
        &[ex.prompt_ids.clone(), ex.target_ids.clone()].concat(),
    );
    assert_eq!(all.matches("<think>").count(), 1);
    // Prompt tokens equal the template's own tokenisation.
    assert_eq!(
        ex.prompt_ids,
        tok.encode_chat(&[ChatMessage::user("What is 2+3?")], true)
            .unwrap()
    );
}

#[test]
fn sft_example_writes_think_when_prompt_lacks_it() {
    let dir = tempfile::tempdir().unwrap();
    let src = repo_fixture("tokenizers/minimind");
    std::fs::copy(
        src.join("tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    std::fs::copy(
        src.join("tokenizer_config.json"),
        dir.path().join("tokenizer_config.json"),
    )
    .unwrap();
    // A plain ChatML template whose generation prompt has no <think>.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let ex = tok
        .sft_example(
            &[ChatMessage::system("Be brief."), ChatMessage::user("Hi")],
            "greet",
            "Hello!",
        )
        .unwrap();
    assert_eq!(
        decode(&tok, &ex.prompt_ids),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        decode(&tok, &ex.target_ids),
        "<think>\ngreet\n</think>\n\nHello!<|im_end|>"
    );

    // minimind's own template opens thinking when asked: then the target must not repeat <think>.
    let mut tok = Tokenizer::from_dir(&src).unwrap();
    tok.chat_template
        .as_mut()
        .unwrap()
        .extra_context
        .insert("open_thinking".into(), json!(true));
    let ex = tok
        .sft_example(&[ChatMessage::user("Hi")], "r", "a")
        .unwrap();
    assert!(decode(&tok, &ex.prompt_ids).ends_with("<|im_start|>assistant\n<think>\n"));
    assert_eq!(decode(&tok, &ex.target_ids), "r\n</think>\n\na<|im_end|>");
}

#[test]
fn missing_template_and_tokenizer_errors() {
    let dir = tempfile::tempdir().unwrap();
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
    std::fs::copy(
        repo_fixture("tokenizers/minimind/tokenizer.json"),
        dir.path().join("tokenizer.json"),
    )
    .unwrap();
    let tok = Tokenizer::from_dir(dir.path()).unwrap();
    let e = tok
        .apply_chat_template(&[ChatMessage::user("x")], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no chat template"), "{e}");
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let e = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("chat_template.jinja"), "{e}");
}
