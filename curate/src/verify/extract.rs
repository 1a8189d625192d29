//! Finding the final answer in a model response.

use std::sync::LazyLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::normalize::matching_brace;

/// Where in the response the answer was found; the evaluator reports it so
/// format failures (no box) can be told apart from wrong answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// The last `\boxed{...}`.
    Boxed,
    /// The last `\fbox{...}`.
    Fbox,
    /// GSM8K style `#### N`.
    Hashes,
    /// "The (final) answer is ...".
    AnswerIs,
    /// An `Answer: ...` line.
    AnswerLabel,
    /// A lone multiple-choice letter such as `(B)` on the last line.
    Choice,
}

/// An extracted answer and how it was found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extracted {
    /// The answer text as written (not yet normalised).
    pub text: String,
    /// How it was found.
    pub method: Method,
}

static ANSWER_IS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(?:final\s+)?answer\s+(?:is|would\s+be|will\s+be)\s*:?\s*")
        .expect("static regex")
});
static ANSWER_LABEL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?im)^[\s*#_>-]*(?:final\s+)?answer\s*\**\s*[:：]\s*\**").expect("static regex")
});
static CHOICE_LINE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[\s*_]*\(([A-E])\)[\s*_.]*$").expect("static regex"));
static NUMBER_THEN_WORDS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?P<num>-?\$?[0-9][0-9,]*(?:\.[0-9]+)?(?:/[0-9]+)?)\s+[A-Za-z][A-Za-z\s]*$")
        .expect("static regex")
});

/// Longest answer taken from free text; longer captures are prose, not answers.
const MAX_FREE_ANSWER: usize = 200;

/// Finds the final answer: the last `\boxed{}`/`\fbox{}` (balanced braces),
/// else `#### N`, else the last "the answer is ..." / "Answer: ..." phrase, else
/// a final-line choice letter. Text after `</think>` is searched first because
/// boxes inside the reasoning are drafts.
pub fn extract_answer(text: &str) -> Option<Extracted> {
    if let Some(idx) = text.rfind("</think>")
        && let Some(e) = extract_from(&text[idx + "</think>".len()..])
    {
        return Some(e);
    }
    extract_from(text)
}

/// The part of a whole response (reasoning and answer) that holds the answer: the
/// text after the last `</think>`, or all of it when the model did not think.
///
/// `None` when generation stopped on the length limit (`length_stop`) inside the
/// reasoning: after a `<think>` with no `</think>` behind it, or, when the prompt
/// itself opened the reasoning (`think_open`, as R1 chat templates do by ending the
/// generation prompt with `<think>\n`), with no `</think>` at all. Such a response
/// never answered, whatever its drafts box along the way.
pub fn answer_section(response: &str, think_open: bool, length_stop: bool) -> Option<&str> {
    let close = response.rfind("</think>");
    let unclosed = match (response.rfind("<think>"), close) {
        (Some(open), Some(close)) => open > close,
        (Some(_), None) => true,
        (None, Some(_)) => false,
        (None, None) => think_open,
    };
    if length_stop && unclosed {
        return None;
    }
    Some(match close {
        Some(i) => &response[i + "</think>".len()..],
        None => response,
    })
}

fn extract_from(text: &str) -> Option<Extracted> {
    if let Some(e) = last_boxed(text) {
        return Some(e);
    }
    if let Some(idx) = text.rfind("####") {
        let line = text[idx + 4..].lines().next().unwrap_or("").trim();
        if !line.is_empty() {
            return Some(Extracted {
                text: line.to_string(),
                method: Method::Hashes,
            });
        }
    }
    let is = ANSWER_IS
        .find_iter(text)
        .last()
        .map(|m| (m.end(), Method::AnswerIs));
    let label = ANSWER_LABEL
        .find_iter(text)
        .last()
        .map(|m| (m.end(), Method::AnswerLabel));
    let best = match (is, label) {
        (Some(a), Some(b)) => Some(if a.0 >= b.0 { a } else { b }),
        (a, b) => a.or(b),
    };
    if let Some((end, method)) = best
        && let Some(ans) = clean_free_answer(&text[end..])
    {
        return Some(Extracted { text: ans, method });
    }
    let last_line = text.lines().rev().find(|l| !l.trim().is_empty())?;
    let c = CHOICE_LINE.captures(last_line)?;
    Some(Extracted {
        text: c[1].to_string(),
        method: Method::Choice,
    })
}

/// The content of the last complete `\boxed{...}` or `\fbox{...}`; an unclosed
/// box (truncated output) is skipped in favour of an earlier complete one.
fn last_boxed(text: &str) -> Option<Extracted> {
    let mut candidates: Vec<(usize, &str)> = Vec::new();
    for cmd in ["\\boxed", "\\fbox"] {
        candidates.extend(text.match_indices(cmd));
    }
    candidates.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    for (idx, cmd) in candidates {
        let after = idx + cmd.len();
        let rest = &text[after..];
        if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
            continue; // \boxedtext or similar: another command
        }
        let method = if cmd == "\\boxed" {
            Method::Boxed
        } else {
            Method::Fbox
        };
        let trimmed = rest.trim_start();
        let open = after + (rest.len() - trimmed.len());
        if trimmed.starts_with('{') {
            if let Some(close) = matching_brace(text, open) {
                return Some(Extracted {
                    text: text[open + 1..close].trim().to_string(),
                    method,
                });
            }
        } else if rest.starts_with(' ') {
            // "\boxed 5": TeX takes the next token.
            let tok: String = trimmed
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '$')
                .collect();
            if !tok.is_empty() {
                return Some(Extracted { text: tok, method });
            }
        }
    }
    None
}

/// Trims a phrase like "$\frac12$." or "**42 apples**" down to the answer.
fn clean_free_answer(rest: &str) -> Option<String> {
    let line = rest.lines().next().unwrap_or("").trim();
    if let Some(b) = last_boxed(line) {
        return Some(b.text);
    }
    let mut s = line.trim_matches(|c: char| c == '*' || c == '_' || c.is_whitespace());
    // Math in $...$ or \(...\) is the answer; prose around it is not.
    if let Some(start) = s.find('$') {
        let inner = &s[start + 1..];
        let inner = inner.strip_prefix('$').unwrap_or(inner);
        if let Some(end) = inner.find('$') {
            s = &inner[..end];
        }
    } else if let Some(start) = s.find("\\(") {
        if let Some(end) = s[start..].find("\\)") {
            s = &s[start + 2..start + end];
        }
    } else if let Some(end) = sentence_end(s) {
        s = &s[..end];
    }
    let s = s
        .trim()
        .trim_end_matches(['.', ',', ';', ':', '!'])
        .trim_matches(|c: char| c == '*' || c == '_' || c.is_whitespace());
    if s.is_empty() || s.len() > MAX_FREE_ANSWER {
        return None;
    }
    if let Some(c) = NUMBER_THEN_WORDS.captures(s) {
        return Some(c["num"].to_string());
    }
    Some(s.to_string())
}

/// End of the first sentence: a period followed by whitespace (not a decimal
/// point).
fn sentence_end(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    (0..b.len()).find(|&i| b[i] == b'.' && b.get(i + 1).is_some_and(|c| c.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(t: &str) -> Option<(String, Method)> {
        extract_answer(t).map(|e| (e.text, e.method))
    }

    #[test]
    fn last_balanced_box_wins() {
        assert_eq!(
            ex("first \\boxed{1} then \\boxed{\\frac{1}{2}}."),
            Some(("\\frac{1}{2}".into(), Method::Boxed))
        );
        assert_eq!(
            ex("\\boxed{\\{1, 2\\}}"),
            Some(("\\{1, 2\\}".into(), Method::Boxed))
        );
        assert_eq!(
            ex("so \\boxed{7} and \\boxed{8"),
            Some(("7".into(), Method::Boxed))
        );
        assert_eq!(ex("\\fbox{x+1}"), Some(("x+1".into(), Method::Fbox)));
        assert_eq!(ex("$\\boxed 5$"), Some(("5".into(), Method::Boxed)));
    }

    #[test]
    fn answer_after_think_preferred() {
        let t = "<think>maybe \\boxed{3}</think>The result is \\boxed{4}.";
        assert_eq!(ex(t), Some(("4".into(), Method::Boxed)));
        let t = "<think>so \\boxed{3}</think>I could not finish.";
        assert_eq!(ex(t), Some(("3".into(), Method::Boxed)));
    }

    #[test]
    fn gsm8k_and_phrases() {
        assert_eq!(
            ex("blah\n#### 1,234"),
            Some(("1,234".into(), Method::Hashes))
        );
        assert_eq!(
            ex("So the answer is $\\frac{3}{4}$."),
            Some(("\\frac{3}{4}".into(), Method::AnswerIs))
        );
        assert_eq!(
            ex("The final answer is 42 apples."),
            Some(("42".into(), Method::AnswerIs))
        );
        assert_eq!(
            ex("The answer is 3.5. Done"),
            Some(("3.5".into(), Method::AnswerIs))
        );
        assert_eq!(
            ex("Reasoning...\nAnswer: C"),
            Some(("C".into(), Method::AnswerLabel))
        );
        assert_eq!(
            ex("**Answer:** (B)"),
            Some(("(B)".into(), Method::AnswerLabel))
        );
        assert_eq!(ex("I pick\n(D)"), Some(("D".into(), Method::Choice)));
    }

    #[test]
    fn a_response_cut_inside_its_reasoning_has_no_answer_section() {
        // The prompt opened <think> (R1 templates): no </think> means still thinking.
        let cut = "Okay, 3 + 4 is \\boxed{7}, but wait";
        assert_eq!(answer_section(cut, true, true), None);
        // The same text stopped by the model itself, or from a model that does not think,
        // is graded whole as before.
        assert_eq!(answer_section(cut, true, false), Some(cut));
        assert_eq!(answer_section(cut, false, true), Some(cut));
        // An opened and never closed <think> in the output itself.
        assert_eq!(answer_section("<think>so \\boxed{7}", false, true), None);
        assert_eq!(
            answer_section("<think>a</think> then <think>b \\boxed{7}", false, true),
            None
        );
        // Closed reasoning: the answer is what follows, even if the answer was cut.
        assert_eq!(
            answer_section("r \\boxed{3}</think>\n\nSo \\boxed{4", true, true),
            Some("\n\nSo \\boxed{4")
        );
        assert_eq!(
            answer_section("<think>r</think>\\boxed{4}", false, true),
            Some("\\boxed{4}")
        );
    }

    #[test]
    fn nothing_to_extract() {
        assert_eq!(ex("I am not sure."), None);
        assert_eq!(ex("\\boxed{unclosed"), None);
        assert_eq!(ex(""), None);
    }
}
