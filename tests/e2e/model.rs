//! `distill model init|info|generate` on folders the tests make themselves.

use crate::common::*;

const TINY: &str = r#"{"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
  "vocab_size": 6400, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": true,
  "bos_token_id": 1, "eos_token_id": 2}"#;

fn tokenizer() -> String {
    format!(
        "{}/tests/fixtures/tokenizers/minimind",
        env!("CARGO_MANIFEST_DIR")
    )
}

#[test]
fn init_writes_a_seeded_random_model_that_loads_and_generates() {
    let w = Workdir::new();
    w.write("tiny.json", TINY);
    let tok = tokenizer();
    for (out, seed) in [("a", "1"), ("b", "1"), ("c", "2")] {
        w.run(&[
            "model",
            "init",
            "--config",
            "tiny.json",
            "--tokenizer",
            &tok,
            "--out",
            out,
            "--seed",
            seed,
        ])
        .ok();
    }
    let weights = |d: &str| std::fs::read(w.path().join(d).join("model.safetensors")).unwrap();
    assert!(weights("a") == weights("b"), "same seed, same weights");
    assert!(weights("a") != weights("c"), "another seed, other weights");
    let info: serde_json::Value =
        serde_json::from_str(&w.run(&["model", "info", "a", "--json"]).ok().stdout()).unwrap();
    assert_eq!(info["architecture"], "Qwen2ForCausalLM");
    assert_eq!(info["num_layers"], 2);
    assert_eq!(info["has_chat_template"], true);
    let out = w.run(&[
        "model",
        "generate",
        "a",
        "--prompt",
        "1+1=",
        "--chat",
        "--max-tokens",
        "5",
        "--json",
    ]);
    let result: serde_json::Value = serde_json::from_str(&out.ok().stdout()).unwrap();
    assert_eq!(result["completion_tokens"].as_array().unwrap().len(), 5);

    // An existing folder is not overwritten; a vocabulary smaller than the tokenizer's is refused.
    let again = w.run(&[
        "model",
        "init",
        "--config",
        "tiny.json",
        "--tokenizer",
        &tok,
        "--out",
        "a",
    ]);
    assert!(
        again.stderr().contains("already holds a model"),
        "{}",
        again.stderr()
    );
    w.write(
        "small.json",
        &TINY.replace("\"vocab_size\": 6400", "\"vocab_size\": 100"),
    );
    let small = w.run(&[
        "model",
        "init",
        "--config",
        "small.json",
        "--tokenizer",
        &tok,
        "--out",
        "s",
    ]);
    assert!(
        small.stderr().contains("small.json: vocab_size 100"),
        "{}",
        small.stderr()
    );
}

#[test]
fn synth_arithmetic_writes_seeded_disjoint_sets_with_planted_problems() {
    let w = Workdir::new();
    let args = [
        "synth",
        "arithmetic",
        "--n",
        "50",
        "--seed",
        "4",
        "--out",
        "train.jsonl",
        "--test-n",
        "10",
        "--test-out",
        "test.jsonl",
        "--plant",
        "2",
    ];
    w.run(&args).ok();
    let read = |f: &str| -> Vec<serde_json::Value> {
        std::fs::read_to_string(w.path().join(f))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (train, test) = (read("train.jsonl"), read("test.jsonl"));
    assert_eq!((train.len(), test.len()), (52, 10));
    let planted: Vec<&str> = train
        .iter()
        .filter_map(|r| r["id"].as_str().filter(|id| id.starts_with("test-")))
        .collect();
    assert_eq!(planted.len(), 2);
    let first = std::fs::read(w.path().join("train.jsonl")).unwrap();
    w.run(&args).ok();
    assert_eq!(
        std::fs::read(w.path().join("train.jsonl")).unwrap(),
        first,
        "same seed, same file"
    );
    let bad = w.run(&[
        "synth",
        "arithmetic",
        "--n",
        "5",
        "--out",
        "x.jsonl",
        "--test-n",
        "1",
        "--test-out",
        "t.jsonl",
        "--plant",
        "3",
    ]);
    assert!(
        bad.stderr().contains("--plant 3 exceeds --test-n 1"),
        "{}",
        bad.stderr()
    );
}
