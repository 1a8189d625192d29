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

/// Llama-3.3-70B-Instruct's `config.json` (the base of DeepSeek-R1-Distill-Llama-70B), as
/// its model card publishes it; the same fixture `bench/gpu_qlora.sh` plans and trains.
const LLAMA_3_3_70B: &str = include_str!("../fixtures/models/llama-3.3-70b/config.json");

/// `model plan --method qlora` on Llama-3.3-70B's config: the 4-bit base is `model info`'s
/// 4-bit figure plus the f32 adapters, it fits one H200 at 4k tokens where full fine-tuning and
/// LoRA on the bf16 base do not, and those plans name QLoRA.
#[test]
fn plan_qlora_fits_a_70b_on_one_h200() {
    let w = Workdir::new();
    w.write("llama70b/config.json", LLAMA_3_3_70B);
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["model"];
        all.extend_from_slice(args);
        all.push("--json");
        serde_json::from_str(&w.run(&all).ok().stdout()).unwrap()
    };
    let info = json(&["info", "llama70b"]);
    let plan = json(&[
        "plan",
        "llama70b",
        "--method",
        "qlora",
        "--lora-rank",
        "16",
        "--seq-len",
        "4096",
    ]);
    assert_eq!(plan["settings"]["method"]["qlora"]["rank"], 16);
    // 16 adapters' (in + out) per layer: q, k, v, o, gate, up, down.
    let lora = 80
        * 16
        * ((8192 + 8192) + 2 * (8192 + 1024) + (8192 + 8192) + 2 * (8192 + 28672) + (28672 + 8192))
            as u64;
    assert_eq!(plan["trainable_params"], lora);
    assert_eq!(
        plan["weights"].as_u64().unwrap(),
        info["memory_4bit_bytes"].as_u64().unwrap() + 4 * lora
    );
    assert_eq!(plan["dequant_scratch"], (1u64 << 24) * 18);
    assert_eq!(plan["fits"], true, "{plan}");
    // 32k tokens fit with 1024-row attention chunks, not with the default 2048, and the plan
    // says so.
    let wide = json(&[
        "plan",
        "llama70b",
        "--method",
        "qlora",
        "--seq-len",
        "32768",
    ]);
    assert_eq!(wide["fits"], false);
    assert!(
        wide["suggestions"].as_array().unwrap().iter().any(|s| s
            .as_str()
            .unwrap()
            .starts_with("attention_chunk_tokens = 1024: ")),
        "{wide}"
    );
    let chunked = json(&[
        "plan",
        "llama70b",
        "--method",
        "qlora",
        "--seq-len",
        "32768",
        "--attention-chunk-tokens",
        "1024",
    ]);
    assert_eq!(chunked["fits"], true, "{chunked}");
    // Full fine-tuning and LoRA on the bf16 base do not fit and name QLoRA.
    for method in ["full", "lora"] {
        let text = w
            .run(&[
                "model",
                "plan",
                "llama70b",
                "--method",
                method,
                "--seq-len",
                "4096",
            ])
            .ok()
            .stdout();
        assert!(text.contains("does NOT fit"), "{text}");
        assert!(
            text.contains("would fit: QLoRA (4-bit base, rank 16; lora.base_bits = 4)"),
            "{text}"
        );
    }
    let text = w
        .run(&[
            "model",
            "plan",
            "llama70b",
            "--method",
            "qlora",
            "--seq-len",
            "4096",
        ])
        .ok()
        .stdout();
    assert!(
        text.contains("QLoRA rank 16") && text.contains("dequant scratch"),
        "{text}"
    );
    assert!(text.contains("  fits"), "{text}");
}

/// A 70B plan is checked before fetching 140 GB: `model info` describes a folder holding only
/// `config.json`, or the file itself, with the memory each precision needs.
#[test]
fn info_describes_a_config_without_weights() {
    let w = Workdir::new();
    w.write("llama70b/config.json", LLAMA_3_3_70B);
    let info: serde_json::Value = serde_json::from_str(
        &w.run(&["model", "info", "llama70b", "--json"])
            .ok()
            .stdout(),
    )
    .unwrap();
    // The published parameter count of Llama-3-70B.
    assert_eq!(info["num_parameters"], 70_553_706_496u64);
    assert_eq!(info["has_weights"], false);
    assert_eq!(info["weight_files"], 0);
    assert_eq!(info["dtype"], "bfloat16");
    assert_eq!(info["memory_bf16_bytes"], 2 * 70_553_706_496u64);
    // 80 layers × 855,638,016 linear weights in 4 (or 8) bits with an f32 scale per 64, the
    // other 2,102,665,216 parameters (embeddings, lm_head, norms) in bf16.
    let linear = 80 * 855_638_016u64;
    let rest = 70_553_706_496u64 - linear;
    assert_eq!(
        info["memory_4bit_bytes"],
        linear / 2 + linear / 64 * 4 + rest * 2
    );
    assert_eq!(
        info["memory_8bit_bytes"],
        linear + linear / 64 * 4 + rest * 2
    );
    let gib = info["memory_4bit_bytes"].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    assert!((35.0..40.0).contains(&gib), "4-bit 70B: {gib} GiB");

    // The config file alone, as text.
    let text = w
        .run(&["model", "info", "llama70b/config.json"])
        .ok()
        .stdout();
    assert!(text.contains("LlamaForCausalLM"), "{text}");
    assert!(text.contains("no weights"), "{text}");
    assert!(text.contains("in 4-bit"), "{text}");
    // A folder with neither weights nor config is still an error naming the file.
    w.write("empty/README.md", "nothing here");
    let out = w.run(&["model", "info", "empty"]);
    assert_ne!(out.code(), 0);
    assert!(out.stderr().contains("config.json"), "{}", out.stderr());
}
