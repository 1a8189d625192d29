//! Rule-based trace filters in the spirit of the DeepSeek-R1 SFT recipe, which
//! dropped chains of thought with mixed languages, long paragraphs and code
//! blocks, plus malformed, truncated and degenerate (looping) generations.
//!
//! Each failing rule yields a [`Rejection`] with a stable snake_case
//! [`Reason`], so the stage can store why every trace was dropped; an empty
//! list means keep.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use unicode_script::{Script, UnicodeScript};
use xxhash_rust::xxh3::xxh3_64;

use crate::error::CurateError;

/// How [`FilterConfig`] length bounds are measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LengthUnit {
    /// Unicode scalar values.
    Chars,
    /// The tokenizer-free estimate of [`approx_tokens`].
    Tokens,
}

/// Filter settings; the defaults reproduce the DeepSeek-R1 recipe for English
/// math traces. Unknown keys are rejected so a typo in the pipeline TOML is an
/// error, not a silently ignored rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterConfig {
    /// When the raw completion is given, it must contain `</think>`.
    pub require_closed_think: bool,
    /// Drop generations stopped by the token limit (`finish_reason = "length"`).
    pub drop_truncated: bool,
    /// Unit of the four length bounds below.
    pub length_unit: LengthUnit,
    /// Shortest acceptable reasoning (after the empty check).
    pub min_reasoning_length: usize,
    /// R1 generated at most 32k tokens; longer traces are pathological.
    pub max_reasoning_length: Option<usize>,
    /// R1 traces end with a summary after `</think>`; an empty one is malformed.
    pub min_answer_length: usize,
    /// Longest acceptable answer; unbounded by default.
    pub max_answer_length: Option<usize>,
    /// Unicode script name (e.g. "Latin", "Han") the reasoning should be in.
    pub expected_script: String,
    /// Scripts that never count as mixing (Greek letters in formulas).
    pub allowed_scripts: Vec<String>,
    /// Largest tolerated share of letters outside the expected/allowed scripts;
    /// 0 drops any mixing, as R1 did.
    pub max_foreign_letter_share: f64,
    /// Word n-gram size for the repetition rule.
    pub repetition_ngram: usize,
    /// Largest tolerated share of word n-grams that repeat an earlier one.
    pub max_repeated_ngram_share: f64,
    /// Largest tolerated share of non-empty lines that duplicate an earlier line.
    pub max_duplicate_line_share: f64,
    /// The line rule needs enough lines to be meaningful.
    pub min_lines_for_duplicate_check: usize,
    /// Longest paragraph (text between blank lines) in characters.
    pub max_paragraph_chars: Option<usize>,
    /// Drop traces with fenced code blocks (right for math, wrong for code tasks).
    pub forbid_code_blocks: bool,
}

impl Default for FilterConfig {
    fn default() -> Self {
        FilterConfig {
            require_closed_think: true,
            drop_truncated: true,
            length_unit: LengthUnit::Tokens,
            min_reasoning_length: 1,
            max_reasoning_length: Some(32_768),
            min_answer_length: 1,
            max_answer_length: None,
            expected_script: "Latin".into(),
            allowed_scripts: vec!["Greek".into()],
            max_foreign_letter_share: 0.0,
            repetition_ngram: 10,
            max_repeated_ngram_share: 0.3,
            max_duplicate_line_share: 0.5,
            min_lines_for_duplicate_check: 10,
            max_paragraph_chars: Some(8_000),
            forbid_code_blocks: true,
        }
    }
}

/// Why a trace was dropped; the serialised names are stable storage keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The raw completion has no `</think>`.
    UnclosedThink,
    /// Nothing inside the think block.
    EmptyReasoning,
    /// Stopped by the token limit.
    Truncated,
    /// Below `min_reasoning_length`.
    ReasoningTooShort,
    /// Above `max_reasoning_length`.
    ReasoningTooLong,
    /// Below `min_answer_length` (usually: no answer after `</think>`).
    AnswerTooShort,
    /// Above `max_answer_length`.
    AnswerTooLong,
    /// Letters outside the expected scripts.
    LanguageMixing,
    /// Looping text: repeated n-grams or duplicated lines.
    Repetition,
    /// A paragraph above `max_paragraph_chars`.
    LongParagraph,
    /// A fenced code block.
    CodeBlock,
}

impl Reason {
    /// The stable snake_case name (same as the serde form).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UnclosedThink => "unclosed_think",
            Reason::EmptyReasoning => "empty_reasoning",
            Reason::Truncated => "truncated",
            Reason::ReasoningTooShort => "reasoning_too_short",
            Reason::ReasoningTooLong => "reasoning_too_long",
            Reason::AnswerTooShort => "answer_too_short",
            Reason::AnswerTooLong => "answer_too_long",
            Reason::LanguageMixing => "language_mixing",
            Reason::Repetition => "repetition",
            Reason::LongParagraph => "long_paragraph",
            Reason::CodeBlock => "code_block",
        }
    }
}

/// One failed rule with a human-readable measurement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    /// The failed rule.
    pub reason: Reason,
    /// What was measured, for the audit log.
    pub detail: String,
}

/// A generated trace as the filter sees it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Trace<'a> {
    /// The chain of thought (inside `<think>…</think>`).
    pub reasoning: &'a str,
    /// The final response after `</think>`.
    pub answer: &'a str,
    /// The API's finish reason ("stop", "length", ...), when known.
    pub finish_reason: Option<&'a str>,
    /// The whole completion as generated, when known; enables the
    /// `unclosed_think` rule.
    pub raw: Option<&'a str>,
}

/// A raw completion split at `</think>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinkSplit<'a> {
    /// Text before `</think>` (without `<think>`), trimmed.
    pub reasoning: &'a str,
    /// Text after `</think>`, trimmed; empty when unclosed.
    pub answer: &'a str,
    /// Whether `</think>` was present.
    pub closed: bool,
}

/// Splits `<think>reasoning</think>answer`. The opening tag is optional
/// because R1 chat templates put it in the prompt; without a closing tag the
/// whole text is reasoning and the answer is empty.
pub fn split_think(raw: &str) -> ThinkSplit<'_> {
    let body = raw.trim_start();
    let body = body.strip_prefix("<think>").unwrap_or(body);
    match body.find("</think>") {
        Some(i) => ThinkSplit {
            reasoning: body[..i].trim(),
            answer: body[i + "</think>".len()..].trim(),
            closed: true,
        },
        None => ThinkSplit {
            reasoning: body.trim(),
            answer: "",
            closed: false,
        },
    }
}

/// Tokenizer-free token estimate: a run of ASCII letters counts one token per
/// 8 letters, every digit and every other non-space character one token.
/// On the r1-areal rollouts it is within about 10% of the DeepSeek-R1-Distill
/// tokenizer (median ratio 1.03), close enough for length limits.
pub fn approx_tokens(text: &str) -> usize {
    let mut n = 0;
    let mut letters = 0usize;
    for c in text.chars() {
        if c.is_ascii_alphabetic() {
            letters += 1;
            continue;
        }
        n += letters.div_ceil(8);
        letters = 0;
        if !c.is_whitespace() {
            n += 1;
        }
    }
    n + letters.div_ceil(8)
}

/// A validated [`FilterConfig`] ready to run over many traces.
#[derive(Clone, Debug)]
pub struct Filter {
    config: FilterConfig,
    expected: Script,
    allowed: Vec<Script>,
}

fn script_named(name: &str) -> Result<Script, CurateError> {
    Script::from_full_name(name)
        .or_else(|| Script::from_short_name(name))
        .ok_or_else(|| CurateError::InvalidFilterConfig(format!("unknown Unicode script {name:?}")))
}

impl Filter {
    /// Validates the configuration (script names, shares within [0, 1]).
    pub fn new(config: FilterConfig) -> Result<Self, CurateError> {
        for (name, v) in [
            ("max_foreign_letter_share", config.max_foreign_letter_share),
            ("max_repeated_ngram_share", config.max_repeated_ngram_share),
            ("max_duplicate_line_share", config.max_duplicate_line_share),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(CurateError::InvalidFilterConfig(format!(
                    "{name} must be within [0, 1], got {v}"
                )));
            }
        }
        if config.repetition_ngram == 0 {
            return Err(CurateError::InvalidFilterConfig(
                "repetition_ngram must be at least 1".into(),
            ));
        }
        let expected = script_named(&config.expected_script)?;
        let allowed = config
            .allowed_scripts
            .iter()
            .map(|s| script_named(s))
            .collect::<Result<_, _>>()?;
        Ok(Filter {
            config,
            expected,
            allowed,
        })
    }

    /// The configuration this filter was built from.
    pub fn config(&self) -> &FilterConfig {
        &self.config
    }

    fn length(&self, text: &str) -> usize {
        match self.config.length_unit {
            LengthUnit::Chars => text.chars().count(),
            LengthUnit::Tokens => approx_tokens(text),
        }
    }

    fn unit(&self) -> &'static str {
        match self.config.length_unit {
            LengthUnit::Chars => "chars",
            LengthUnit::Tokens => "tokens",
        }
    }

    /// Every rule the trace fails; empty means keep.
    pub fn check(&self, trace: &Trace<'_>) -> Vec<Rejection> {
        let c = &self.config;
        let mut out = Vec::new();
        let mut reject = |reason: Reason, detail: String| out.push(Rejection { reason, detail });

        if c.require_closed_think
            && let Some(raw) = trace.raw
            && !raw.contains("</think>")
        {
            reject(
                Reason::UnclosedThink,
                "no </think> in the completion".into(),
            );
        }
        if c.drop_truncated && trace.finish_reason == Some("length") {
            reject(Reason::Truncated, "finish_reason = length".into());
        }
        let reasoning = trace.reasoning.trim();
        if reasoning.is_empty() {
            reject(Reason::EmptyReasoning, "reasoning is empty".into());
        } else {
            let len = self.length(reasoning);
            if len < c.min_reasoning_length {
                reject(
                    Reason::ReasoningTooShort,
                    format!("{len} {} < {}", self.unit(), c.min_reasoning_length),
                );
            }
            if let Some(max) = c.max_reasoning_length.filter(|m| len > *m) {
                reject(
                    Reason::ReasoningTooLong,
                    format!("{len} {} > {max}", self.unit()),
                );
            }
            if let Some(d) = self.language_mixing(reasoning) {
                reject(Reason::LanguageMixing, d);
            }
            if let Some(d) = self.repetition(reasoning) {
                reject(Reason::Repetition, d);
            }
            if let Some(max) = c.max_paragraph_chars {
                let longest = paragraphs(reasoning)
                    .map(|p| p.trim().chars().count())
                    .max()
                    .unwrap_or(0);
                if longest > max {
                    reject(
                        Reason::LongParagraph,
                        format!("longest paragraph {longest} chars > {max}"),
                    );
                }
            }
        }
        let answer = trace.answer.trim();
        let alen = self.length(answer);
        if alen < c.min_answer_length {
            reject(
                Reason::AnswerTooShort,
                format!("{alen} {} < {}", self.unit(), c.min_answer_length),
            );
        }
        if let Some(max) = c.max_answer_length.filter(|m| alen > *m) {
            reject(
                Reason::AnswerTooLong,
                format!("{alen} {} > {max}", self.unit()),
            );
        }
        if c.forbid_code_blocks && (reasoning.contains("```") || answer.contains("```")) {
            reject(Reason::CodeBlock, "fenced code block (```)".into());
        }
        out
    }

    /// Share of letters in other scripts. Digits, operators and punctuation
    /// have no script letters (Common), combining marks inherit their base's
    /// script, and Greek is allowed by default, so formulas are not counted
    /// against the trace.
    fn language_mixing(&self, text: &str) -> Option<String> {
        let (mut native, mut foreign) = (0usize, 0usize);
        let mut sample = String::new();
        for ch in text.chars() {
            if !ch.is_alphabetic() {
                continue;
            }
            let s = ch.script();
            if matches!(s, Script::Common | Script::Inherited | Script::Unknown) {
                continue;
            }
            if s == self.expected || self.allowed.contains(&s) {
                native += 1;
            } else {
                foreign += 1;
                if sample.chars().count() < 12 {
                    sample.push(ch);
                }
            }
        }
        let total = native + foreign;
        let share = foreign as f64 / total.max(1) as f64;
        (foreign > 0 && share > self.config.max_foreign_letter_share).then(|| {
            format!(
                "{foreign} of {total} letters ({:.3}%) outside {}, e.g. {sample:?}",
                100.0 * share,
                self.config.expected_script
            )
        })
    }

    fn repetition(&self, text: &str) -> Option<String> {
        let c = &self.config;
        let n = c.repetition_ngram;
        let words: Vec<u64> = text
            .split_whitespace()
            .map(|w| xxh3_64(w.as_bytes()))
            .collect();
        if words.len() >= n * 2 {
            let mut seen = HashSet::with_capacity(words.len());
            let mut repeated = 0usize;
            let total = words.len() - n + 1;
            for w in words.windows(n) {
                // Order-sensitive combination of the word hashes.
                let h = w.iter().fold(0u64, |acc, x| {
                    acc.rotate_left(5).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ x
                });
                if !seen.insert(h) {
                    repeated += 1;
                }
            }
            let share = repeated as f64 / total as f64;
            if share > c.max_repeated_ngram_share {
                return Some(format!(
                    "{:.1}% of word {n}-grams repeat an earlier one (max {:.1}%)",
                    100.0 * share,
                    100.0 * c.max_repeated_ngram_share
                ));
            }
        }
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        if lines.len() >= c.min_lines_for_duplicate_check {
            let mut seen = HashSet::with_capacity(lines.len());
            let dup = lines.iter().filter(|l| !seen.insert(**l)).count();
            let share = dup as f64 / lines.len() as f64;
            if share > c.max_duplicate_line_share {
                return Some(format!(
                    "{:.1}% of lines duplicate an earlier line (max {:.1}%)",
                    100.0 * share,
                    100.0 * c.max_duplicate_line_share
                ));
            }
        }
        None
    }
}

/// Text blocks separated by blank lines.
fn paragraphs(text: &str) -> impl Iterator<Item = &str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    let mut prev_blank = false;
    for line in text.split_inclusive('\n') {
        let blank = line.trim().is_empty();
        if blank && !prev_blank {
            out.push(&text[start..offset]);
        }
        if !blank && prev_blank {
            start = offset;
        }
        prev_blank = blank;
        offset += line.len();
    }
    if !prev_blank {
        out.push(&text[start..]);
    }
    out.into_iter().filter(|p| !p.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reasons(f: &Filter, t: &Trace<'_>) -> Vec<Reason> {
        f.check(t).into_iter().map(|r| r.reason).collect()
    }

    fn good_reasoning() -> String {
        (0..40)
            .map(|i| {
                format!(
                    "Step {i}: we compute the value {} and check it against x^2 + 1.",
                    i * 7
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn trace<'a>(reasoning: &'a str, answer: &'a str) -> Trace<'a> {
        Trace {
            reasoning,
            answer,
            finish_reason: Some("stop"),
            raw: None,
        }
    }

    #[test]
    fn clean_trace_is_kept() {
        let f = Filter::new(FilterConfig::default()).unwrap();
        let r = good_reasoning();
        assert!(f.check(&trace(&r, "The answer is \\boxed{5}.")).is_empty());
    }

    #[test]
    fn well_formedness_rules() {
        let f = Filter::new(FilterConfig::default()).unwrap();
        let r = good_reasoning();
        let raw = format!("<think>{r}");
        let t = Trace {
            raw: Some(&raw),
            ..trace(&r, "x")
        };
        assert_eq!(reasons(&f, &t), vec![Reason::UnclosedThink]);
        let raw = format!("<think>{r}</think>x");
        let t = Trace {
            raw: Some(&raw),
            ..trace(&r, "x")
        };
        assert!(reasons(&f, &t).is_empty());
        assert_eq!(
            reasons(&f, &trace("  \n", "x")),
            vec![Reason::EmptyReasoning]
        );
        let t = Trace {
            finish_reason: Some("length"),
            ..trace(&r, "x")
        };
        assert_eq!(reasons(&f, &t), vec![Reason::Truncated]);
        assert_eq!(reasons(&f, &trace(&r, "   ")), vec![Reason::AnswerTooShort]);
    }

    #[test]
    fn length_bounds_in_chars_and_tokens() {
        let cfg = FilterConfig {
            length_unit: LengthUnit::Chars,
            min_reasoning_length: 10,
            max_reasoning_length: Some(50),
            max_answer_length: Some(3),
            ..FilterConfig::default()
        };
        let f = Filter::new(cfg.clone()).unwrap();
        assert_eq!(
            reasons(&f, &trace("short", "ok")),
            vec![Reason::ReasoningTooShort]
        );
        let long = "a".repeat(51);
        assert_eq!(
            reasons(&f, &trace(&long, "ok")),
            vec![Reason::ReasoningTooLong]
        );
        assert_eq!(
            reasons(&f, &trace("just right here", "four")),
            vec![Reason::AnswerTooLong]
        );
        let f = Filter::new(FilterConfig {
            length_unit: LengthUnit::Tokens,
            ..cfg
        })
        .unwrap();
        // 16 letters = 2 tokens; 12 tokens in all is within [10, 50].
        assert!(reasons(&f, &trace("abcdefghabcdefgh 1 2 3 4 5 6 7 8 9 +", "ok")).is_empty());
    }

    #[test]
    fn approx_tokens_counts() {
        assert_eq!(approx_tokens(""), 0);
        assert_eq!(approx_tokens("hello world"), 2);
        assert_eq!(approx_tokens("internationalization"), 3);
        assert_eq!(approx_tokens("x^2 = 144"), 7);
        assert_eq!(approx_tokens("信息"), 2);
    }

    #[test]
    fn language_mixing_ignores_math_but_catches_other_scripts() {
        let f = Filter::new(FilterConfig::default()).unwrap();
        let r = format!(
            "{}\nSo the data is insufficient信息 to decide.",
            good_reasoning()
        );
        let got = f.check(&trace(&r, "x"));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].reason, Reason::LanguageMixing);
        assert!(got[0].detail.contains("信息"), "{}", got[0].detail);
        let math = format!(
            "{}\nLet θ = π/3, α + β = 90°, so ∑ sin²θ ≤ 1 and x ∈ ℝ, |x| ≥ 0; café naïve.",
            good_reasoning()
        );
        assert!(f.check(&trace(&math, "x")).is_empty());
        let tolerant = Filter::new(FilterConfig {
            max_foreign_letter_share: 0.01,
            ..FilterConfig::default()
        })
        .unwrap();
        assert!(tolerant.check(&trace(&r, "x")).is_empty());
        let chinese = Filter::new(FilterConfig {
            expected_script: "Han".into(),
            ..FilterConfig::default()
        })
        .unwrap();
        assert!(chinese.check(&trace("所以答案是五。", "五")).is_empty());
    }

    #[test]
    fn repetition_rules() {
        let f = Filter::new(FilterConfig::default()).unwrap();
        let looped = format!(
            "{}\n{}",
            good_reasoning(),
            "Wait, let me check the computation again because something seems off here. "
                .repeat(60)
        );
        let got = reasons(&f, &trace(&looped, "x"));
        assert_eq!(got, vec![Reason::Repetition]);
        let lines = format!("{}\n{}", good_reasoning(), "Hmm.\n".repeat(80));
        assert_eq!(reasons(&f, &trace(&lines, "x")), vec![Reason::Repetition]);
        // Ordinary reasoning reuses phrases without looping.
        assert!(reasons(&f, &trace(&good_reasoning(), "x")).is_empty());
    }

    #[test]
    fn paragraph_and_code_rules() {
        let f = Filter::new(FilterConfig {
            max_paragraph_chars: Some(200),
            ..FilterConfig::default()
        })
        .unwrap();
        let para: String = (0..30).map(|i| format!("word{i} ")).collect();
        let other: String = (0..30).map(|i| format!("term{i} ")).collect();
        let r = format!("short intro\n\n{para}{other}\n\nend");
        assert_eq!(reasons(&f, &trace(&r, "x")), vec![Reason::LongParagraph]);
        let ok = format!("short intro\n\n{para}\n\n{other}");
        assert!(reasons(&f, &trace(&ok, "x")).is_empty());
        let f = Filter::new(FilterConfig::default()).unwrap();
        let code = format!("{}\n```python\nprint(1)\n```", good_reasoning());
        assert_eq!(reasons(&f, &trace(&code, "x")), vec![Reason::CodeBlock]);
        let allow = Filter::new(FilterConfig {
            forbid_code_blocks: false,
            ..FilterConfig::default()
        })
        .unwrap();
        assert!(reasons(&allow, &trace(&code, "x")).is_empty());
    }

    #[test]
    fn config_is_strict() {
        let cfg: FilterConfig = serde_json::from_str(r#"{"max_paragraph_chars": 100}"#).unwrap();
        assert_eq!(cfg.max_paragraph_chars, Some(100));
        assert_eq!(cfg.repetition_ngram, 10);
        assert!(serde_json::from_str::<FilterConfig>(r#"{"max_paragraf_chars": 100}"#).is_err());
        let bad = FilterConfig {
            max_repeated_ngram_share: 1.5,
            ..FilterConfig::default()
        };
        assert!(Filter::new(bad).is_err());
        let bad = FilterConfig {
            expected_script: "Klingon".into(),
            ..FilterConfig::default()
        };
        assert!(Filter::new(bad).is_err());
        assert_eq!(
            serde_json::to_string(&Reason::LanguageMixing).unwrap(),
            "\"language_mixing\""
        );
        assert_eq!(Reason::UnclosedThink.as_str(), "unclosed_think");
    }

    #[test]
    fn split_think_forms() {
        let s = split_think("<think>\nr\n</think>\n\na");
        assert_eq!((s.reasoning, s.answer, s.closed), ("r", "a", true));
        let s = split_think("r</think>a");
        assert_eq!((s.reasoning, s.answer, s.closed), ("r", "a", true));
        let s = split_think("<think>cut off");
        assert_eq!((s.reasoning, s.answer, s.closed), ("cut off", "", false));
    }
}
