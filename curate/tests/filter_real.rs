//! The default filter over the 576 real r1-areal rollouts: which rules fire and
//! how well the token estimate tracks the real tokenizer.

use std::collections::BTreeMap;
use std::fs;

use distill_curate::filter::{Filter, FilterConfig, Trace, approx_tokens, split_think};
use serde_json::Value;

fn rollouts() -> Vec<Value> {
    let dir = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/traces/r1-areal"
    );
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.retain(|p| p.extension().is_some_and(|e| e == "jsonl"));
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn default_filter_on_real_rollouts() {
    let rows = rollouts();
    assert_eq!(rows.len(), 576);
    let filter = Filter::new(FilterConfig::default()).unwrap();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut kept = 0;
    let mut mixing_examples = Vec::new();
    for r in &rows {
        let raw = r["completion"].as_str().unwrap();
        let s = split_think(raw);
        let got = filter.check(&Trace {
            reasoning: s.reasoning,
            answer: s.answer,
            finish_reason: None,
            raw: Some(raw),
        });
        if got.is_empty() {
            kept += 1;
        }
        for rej in got {
            *counts.entry(rej.reason.as_str()).or_default() += 1;
            if rej.reason.as_str() == "language_mixing" {
                mixing_examples.push(rej.detail);
            }
        }
    }
    println!(
        "kept {kept} of 576; rejections {counts:?}; e.g. {:?}",
        &mixing_examples[..3]
    );
    // All 576 completions close </think> and carry an answer; 20 mix Chinese
    // into English reasoning (e.g. "insufficient信息") and one has a Cyrillic
    // "а" homoglyph, which R1's recipe drops; two have a paragraph over 8000
    // characters.
    assert_eq!(counts.get("unclosed_think"), None);
    assert_eq!(counts.get("answer_too_short"), None);
    assert_eq!(counts.get("language_mixing"), Some(&21));
    assert_eq!(counts.get("long_paragraph"), Some(&2));
    assert_eq!(counts.get("repetition"), None);
    assert_eq!(kept, 554);
    assert!(
        mixing_examples.iter().any(|d| d.contains('信')),
        "{mixing_examples:?}"
    );
}

#[test]
fn token_estimate_tracks_the_r1_tokenizer() {
    // seqlen - prompt_len is the completion length in DeepSeek-R1-Distill tokens.
    let mut ratios: Vec<f64> = rollouts()
        .iter()
        .map(|r| {
            let real = r["seqlen"].as_f64().unwrap() - r["prompt_len"].as_f64().unwrap();
            approx_tokens(r["completion"].as_str().unwrap()) as f64 / real
        })
        .collect();
    ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p5, p50, p95) = (ratios[28], ratios[288], ratios[547]);
    println!("approx/real tokens: p5 {p5:.3} median {p50:.3} p95 {p95:.3}");
    assert!((0.95..=1.10).contains(&p50), "median ratio {p50}");
    assert!(p5 > 0.9 && p95 < 1.2, "p5 {p5} p95 {p95}");
}
