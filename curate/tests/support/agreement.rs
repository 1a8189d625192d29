//! Measures the verifier against independent graders on real data; shared by
//! the `verify_agreement` test and example.
//!
//! * r1-areal: 576 R1-distill rollouts whose `reward` came from AReaL's grader.
//! * grader-pairs: MATH-500 gold vs Qwen3-0.6B and GPT answers, labelled by
//!   rasbt's SymPy grader (tests/fixtures/verify/grader-pairs-rasbt-labels.json).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::PathBuf;

use distill_curate::verify::{Verdict, compare, extract_answer, normalize, verify};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join(rel)
}

pub const DISAGREEMENTS_JSON: &str = "tests/fixtures/verify/disagreements.json";
pub const DISAGREEMENTS_MD: &str = "tests/fixtures/verify/disagreements.md";

/// One item where the verifier's verdict differs from the reference grader's,
/// or where it answered Unknown.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Disagreement {
    pub set: String,
    pub key: String,
    pub gold: String,
    pub predicted: String,
    /// The reference grader's label (true = correct).
    pub reference: bool,
    pub verdict: Verdict,
    pub detail: String,
    /// Hand-written: who is right and why.
    pub explanation: String,
}

#[derive(Debug, Default)]
pub struct SetReport {
    pub name: String,
    pub total: usize,
    pub no_gold: usize,
    pub correct: usize,
    pub incorrect: usize,
    pub unknown: usize,
    /// Decided items whose verdict matches the reference label.
    pub agree: usize,
    /// Items whose extracted answer equals the gold string byte for byte.
    pub raw_equal: usize,
    /// Items whose normalised answer equals the normalised gold.
    pub normalized_equal: usize,
    pub reference_correct: usize,
    pub flagged: Vec<Disagreement>,
}

impl SetReport {
    pub fn decided(&self) -> usize {
        self.correct + self.incorrect
    }
    pub fn with_gold(&self) -> usize {
        self.total - self.no_gold
    }
    pub fn agreement(&self) -> f64 {
        self.agree as f64 / self.decided().max(1) as f64
    }
    pub fn unknown_rate(&self) -> f64 {
        self.unknown as f64 / self.with_gold().max(1) as f64
    }

    fn record(
        &mut self,
        key: String,
        gold: &str,
        predicted: &str,
        reference: bool,
        verdict: Verdict,
        detail: String,
    ) {
        self.total += 1;
        if reference {
            self.reference_correct += 1;
        }
        if predicted == gold {
            self.raw_equal += 1;
        }
        if !predicted.is_empty() && normalize(predicted) == normalize(gold) {
            self.normalized_equal += 1;
        }
        match verdict {
            Verdict::Correct => self.correct += 1,
            Verdict::Incorrect => self.incorrect += 1,
            Verdict::Unknown => self.unknown += 1,
        }
        let agrees = match verdict {
            Verdict::Correct => reference,
            Verdict::Incorrect => !reference,
            Verdict::Unknown => false,
        };
        if agrees {
            self.agree += 1;
        } else {
            self.flagged.push(Disagreement {
                set: self.name.clone(),
                key,
                gold: gold.to_string(),
                predicted: predicted.to_string(),
                reference,
                verdict,
                detail,
                explanation: String::new(),
            });
        }
    }

    pub fn summary(&self) -> String {
        format!(
            "{}: {} items, {} with a reference answer; verifier correct {} / incorrect {} / unknown {} \
             (unknown rate {:.2}% of items with a reference); agreement with the reference grader on decided items \
             {}/{} = {:.2}%; reference grader marks {} correct; extracted answer == gold: {} raw, {} after normalisation",
            self.name,
            self.total,
            self.with_gold(),
            self.correct,
            self.incorrect,
            self.unknown,
            100.0 * self.unknown_rate(),
            self.agree,
            self.decided(),
            100.0 * self.agreement(),
            self.reference_correct,
            self.raw_equal,
            self.normalized_equal,
        )
    }
}

fn read_jsonl(path: &PathBuf) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("valid JSONL"))
        .collect()
}

fn read_json(path: &PathBuf) -> Value {
    serde_json::from_str(
        &fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())),
    )
    .expect("valid JSON")
}

/// Rollouts from AReaL, verified against AIME24 golds (matched by problem text)
/// and hand-derived OlympiadBench golds.
pub fn r1_areal() -> SetReport {
    let aime: Vec<(String, String)> = read_jsonl(&repo_path("data/benchmarks/aime24.jsonl"))
        .iter()
        .map(|r| {
            (
                r["problem"].as_str().unwrap().trim().to_string(),
                r["answer"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| r["answer"].to_string()),
            )
        })
        .collect();
    let olympiad: BTreeMap<u64, Option<String>> =
        read_json(&repo_path("tests/fixtures/verify/r1-areal-gold.json"))["olympiad_bench"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["task_id"].as_u64().unwrap(),
                    r["gold"].as_str().map(str::to_string),
                )
            })
            .collect();

    let mut files: Vec<PathBuf> = fs::read_dir(repo_path("tests/fixtures/traces/r1-areal"))
        .expect("r1-areal dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    let mut report = SetReport {
        name: "r1-areal".into(),
        ..Default::default()
    };
    for file in files {
        let stem = file.file_stem().unwrap().to_string_lossy().to_string();
        for row in read_jsonl(&file) {
            let prompt = row["prompt"].as_str().unwrap();
            let completion = row["completion"].as_str().unwrap();
            let reward = row["reward"].as_f64().unwrap() > 0.5;
            let task = row["task_id"].as_u64().unwrap();
            let gold = if stem.starts_with("eval_aime24") {
                aime.iter()
                    .find(|(p, _)| prompt.contains(p.as_str()))
                    .map(|(_, a)| a.clone())
                    .unwrap_or_else(|| panic!("no AIME24 gold for {stem}"))
            } else {
                olympiad
                    .get(&task)
                    .unwrap_or_else(|| panic!("task {task} missing from r1-areal-gold.json"))
                    .clone()
                    .unwrap_or_default()
            };
            let key = format!("{stem}#{}", row["sample_idx"]);
            let out = verify(&gold, completion);
            if gold.is_empty() {
                report.total += 1;
                report.no_gold += 1;
                if reward {
                    report.reference_correct += 1;
                }
                continue;
            }
            let predicted = out
                .extracted
                .as_ref()
                .map(|e| e.text.clone())
                .unwrap_or_default();
            report.record(key, &gold, &predicted, reward, out.verdict, out.detail);
        }
    }
    report
}

/// MATH-500 gold vs model answers (`"\boxed{...}"` strings), against rasbt's
/// SymPy grader labels.
pub fn grader_pairs(model: &str) -> SetReport {
    let pairs = read_json(&repo_path(&format!(
        "tests/fixtures/grader-pairs/math500_{model}_answers.json"
    )));
    let labels = read_json(&repo_path(
        "tests/fixtures/verify/grader-pairs-rasbt-labels.json",
    ));
    let labels = labels[model].as_array().unwrap();
    let mut report = SetReport {
        name: format!("grader-pairs/{model}"),
        ..Default::default()
    };
    for (i, (pair, label)) in pairs.as_array().unwrap().iter().zip(labels).enumerate() {
        let gold = pair["answer"].as_str().unwrap();
        let prediction = pair["prediction"].as_str().unwrap();
        let extracted = extract_answer(prediction)
            .map(|e| e.text)
            .unwrap_or_default();
        let c = compare(gold, &extracted);
        let (verdict, detail) = if extracted.is_empty() {
            (Verdict::Incorrect, "no answer found".to_string())
        } else {
            (c.verdict, c.detail)
        };
        report.record(
            format!("{i}"),
            gold,
            &extracted,
            label.as_bool().unwrap(),
            verdict,
            detail,
        );
    }
    report
}

pub fn all_reports() -> Vec<SetReport> {
    vec![r1_areal(), grader_pairs("qwen3"), grader_pairs("gpt")]
}

pub fn load_fixture() -> Vec<Disagreement> {
    let path = repo_path(DISAGREEMENTS_JSON);
    match fs::read_to_string(&path) {
        Ok(s) => serde_json::from_str(&s).expect("valid disagreements fixture"),
        Err(_) => Vec::new(),
    }
}

/// The current disagreements with explanations carried over from the fixture.
pub fn merged(reports: &[SetReport]) -> Vec<Disagreement> {
    let old: BTreeMap<(String, String), String> = load_fixture()
        .into_iter()
        .map(|d| ((d.set, d.key), d.explanation))
        .collect();
    reports
        .iter()
        .flat_map(|r| r.flagged.iter().cloned())
        .map(|mut d| {
            if let Some(e) = old.get(&(d.set.clone(), d.key.clone())) {
                d.explanation = e.clone();
            }
            d
        })
        .collect()
}

pub fn markdown(reports: &[SetReport], items: &[Disagreement]) -> String {
    let mut md = String::from(
        "# Verifier disagreements\n\n\
         Generated by `cargo run -p distill-curate --example verify_agreement -- --write`; \
         the explanations are hand-written in `disagreements.json`, and the \
         `verify_agreement` test fails when the verifier's behaviour on any item changes.\n\n## Figures\n\n",
    );
    for r in reports {
        md.push_str(&format!("- {}\n", r.summary()));
    }
    md.push_str("\n## Items\n\n| set | item | gold | extracted | reference | verifier | explanation |\n|---|---|---|---|---|---|---|\n");
    let esc = |s: &str| s.replace('|', "\\|").replace('\n', " ");
    for d in items {
        md.push_str(&format!(
            "| {} | {} | `{}` | `{}` | {} | {} | {} |\n",
            d.set,
            d.key,
            esc(&d.gold),
            esc(&d.predicted),
            if d.reference { "correct" } else { "incorrect" },
            d.verdict.as_str(),
            esc(&d.explanation)
        ));
    }
    md
}
