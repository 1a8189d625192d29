//! Answer verification: extract a response's final answer and compare it with a
//! reference, exactly where possible and `Unknown` where not.
//!
//! The comparison never guesses: numbers are compared as exact rationals,
//! expressions in an exact symbolic fragment (see `expr.rs`), tuples/intervals
//! in order with matching brackets, sets and answer lists without order. Text
//! that fits none of these is equal only if identical after normalisation;
//! otherwise the verdict is `Unknown`, so a filter can keep such items out
//! of training data instead of mislabelling them.

mod expr;
mod extract;
mod normalize;
mod value;

use serde::{Deserialize, Serialize};

pub use extract::{Extracted, Method, answer_section, extract_answer};
pub use normalize::normalize;

use normalize::matching_brace;
use value::{compare_values, parse_value};

/// The three-way result; `Unknown` means the verifier could not decide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Equal to the reference.
    Correct,
    /// Decidably different from the reference (or no answer).
    Incorrect,
    /// Not decidable, or no reference answer.
    Unknown,
}

impl Verdict {
    /// Stable lowercase name for storage and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Correct => "correct",
            Verdict::Incorrect => "incorrect",
            Verdict::Unknown => "unknown",
        }
    }
}

/// A verdict with the reason behind it, for audit trails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Comparison {
    /// The decision.
    pub verdict: Verdict,
    /// Why, with both normalised forms.
    pub detail: String,
}

/// The result of [`verify`]: the comparison plus what was extracted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The decision.
    pub verdict: Verdict,
    /// Why ("no answer found", "no reference answer", or the comparison's reason).
    pub detail: String,
    /// The answer found in the response, if any.
    pub extracted: Option<Extracted>,
}

/// Reduces a reference or prediction to its answer: GSM8K solutions end in
/// `#### N`, MATH solutions box the answer; plain answers pass through.
fn answer_part(text: &str) -> String {
    let t = text.trim();
    if let Some(idx) = t.rfind("####") {
        return t[idx + 4..].trim().to_string();
    }
    if let Some(idx) = t.rfind("\\boxed") {
        let rest = &t[idx + "\\boxed".len()..];
        let skip = rest.len() - rest.trim_start().len();
        let open = idx + "\\boxed".len() + skip;
        if t[open..].starts_with('{')
            && let Some(close) = matching_brace(t, open)
        {
            return t[open + 1..close].trim().to_string();
        }
    }
    t.to_string()
}

/// Compares a reference answer with a predicted answer (both answer strings,
/// not whole responses; a GSM8K `... #### N` reference is understood).
pub fn compare(gold: &str, predicted: &str) -> Comparison {
    let gold = answer_part(gold);
    if gold.is_empty() {
        return Comparison {
            verdict: Verdict::Unknown,
            detail: "no reference answer".into(),
        };
    }
    let predicted = answer_part(predicted);
    let (g, p) = (normalize(&gold), normalize(&predicted));
    if p.is_empty() {
        return Comparison {
            verdict: Verdict::Incorrect,
            detail: "empty answer".into(),
        };
    }
    if g == p {
        return Comparison {
            verdict: Verdict::Correct,
            detail: "identical after normalisation".into(),
        };
    }
    let j = compare_values(&parse_value(&g), &parse_value(&p));
    Comparison {
        verdict: j.verdict,
        detail: format!("{} ({g:?} vs {p:?})", j.detail),
    }
}

/// Extracts the final answer from `response` and compares it with `gold`.
/// A missing reference is `Unknown`; a response without an answer is
/// `Incorrect` (the model failed to answer).
pub fn verify(gold: &str, response: &str) -> Outcome {
    if answer_part(gold).is_empty() {
        return Outcome {
            verdict: Verdict::Unknown,
            detail: "no reference answer".into(),
            extracted: None,
        };
    }
    match extract_answer(response) {
        None => Outcome {
            verdict: Verdict::Incorrect,
            detail: "no answer found".into(),
            extracted: None,
        },
        Some(e) => {
            let c = compare(gold, &e.text);
            Outcome {
                verdict: c.verdict,
                detail: c.detail,
                extracted: Some(e),
            }
        }
    }
}

/// Grades a whole response (reasoning, `</think>`, answer) against `gold`: the answer
/// is looked for only after the reasoning (see [`answer_section`]), and a response
/// that stopped on the length limit inside its reasoning is `Incorrect` with nothing
/// extracted, like any response without an answer.
pub fn verify_response(gold: &str, response: &str, think_open: bool, length_stop: bool) -> Outcome {
    match answer_section(response, think_open, length_stop) {
        Some(answer) => verify(gold, answer),
        None => Outcome {
            verdict: Verdict::Incorrect,
            detail: "cut off by the length limit inside the reasoning".into(),
            extracted: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(gold: &str, pred: &str) -> Verdict {
        compare(gold, pred).verdict
    }

    #[test]
    fn multi_byte_characters_in_a_sampled_answer_do_not_panic() {
        // A student's sampled tokens can decode to U+FFFD or any other multi-byte text.
        assert_ne!(v("9", "9\u{FFFD}has1"), Verdict::Correct);
        assert_ne!(v("(1, 2)", "(1,\u{FFFD}, 2)"), Verdict::Correct);
        assert_eq!(v("7", "7"), Verdict::Correct);
    }

    #[test]
    fn numbers_compare_exactly() {
        assert_eq!(v("0.5", "\\frac{1}{2}"), Verdict::Correct);
        assert_eq!(v("\\frac{1}{2}", "1/2"), Verdict::Correct);
        assert_eq!(v("-\\frac{3}{4}", "-0.75"), Verdict::Correct);
        assert_eq!(v("\\frac12", "0.5"), Verdict::Correct);
        assert_eq!(v("27.0", "27"), Verdict::Correct);
        assert_eq!(v("1,000", "1000"), Verdict::Correct);
        assert_eq!(v("1{,}000", "1000"), Verdict::Correct);
        assert_eq!(v("3", "4"), Verdict::Incorrect);
        assert_eq!(v("\\frac{1}{3}", "0.333"), Verdict::Incorrect);
        assert_eq!(v("-5", "5"), Verdict::Incorrect);
    }

    #[test]
    fn surface_forms() {
        assert_eq!(v("\\dfrac{14}{3}", "\\frac{14}{3}"), Verdict::Correct);
        assert_eq!(v("\\tfrac{14}{3}", "14/3"), Verdict::Correct);
        assert_eq!(v("5", "5 cm"), Verdict::Correct);
        assert_eq!(v("5", "5\\text{ cm}"), Verdict::Correct);
        assert_eq!(v("5", "\\mbox{5}"), Verdict::Correct);
        assert_eq!(v("145^\\circ", "145"), Verdict::Correct);
        assert_eq!(v("90^{\\circ}", "90°"), Verdict::Correct);
        assert_eq!(v("25\\%", "25"), Verdict::Correct);
        assert_eq!(v("\\$18.90", "18.9"), Verdict::Correct);
        assert_eq!(v("x=5", "5"), Verdict::Correct);
        assert_eq!(v("5", "x = 5"), Verdict::Correct);
        assert_eq!(
            v("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,pi/2)"),
            Verdict::Correct
        );
        assert_eq!(
            v("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"),
            Verdict::Correct
        );
        assert_eq!(v("3\\sqrt{13}", "3*sqrt(13)"), Verdict::Correct);
        assert_eq!(v("\\sqrt{51}", "sqrt(51)"), Verdict::Correct);
        assert_eq!(v("\\pi", "pi"), Verdict::Correct);
        assert_eq!(v("6 - 5i", "6-5i"), Verdict::Correct);
        assert_eq!(v("10", "1\\!0"), Verdict::Correct);
        assert_eq!(v("-2", "- 2"), Verdict::Correct);
        assert_eq!(v("\\text{Evelyn}", "Evelyn"), Verdict::Correct);
        assert_eq!(v("\\text{Evelyn}", "Bob"), Verdict::Incorrect);
    }

    #[test]
    fn symbolic_equivalence_is_safe() {
        assert_eq!(v("2\\sqrt{3}", "\\sqrt{12}"), Verdict::Correct);
        assert_eq!(v("p - q", "p-q"), Verdict::Correct);
        assert_eq!(v("3R^2", "3R^{2}"), Verdict::Correct);
        assert_eq!(v("3R^2", "4"), Verdict::Incorrect);
        assert_eq!(v("y = 2x^2 - 18", "2(x^2-9)"), Verdict::Correct);
        assert_eq!(v("\\sin x", "\\cos x"), Verdict::Unknown);
        assert_eq!(v("\\sin x", "\\sin x"), Verdict::Correct);
        assert_eq!(v("\\frac{1}{x+1}", "\\frac{2}{2x+2}"), Verdict::Unknown);
    }

    #[test]
    fn structures() {
        assert_eq!(v("(1, 2)", "(1,2)"), Verdict::Correct);
        assert_eq!(v("(1, 2)", "(2,1)"), Verdict::Incorrect);
        assert_eq!(v("[0, 1)", "[0,1)"), Verdict::Correct);
        assert_eq!(v("[0, 1)", "[0,1]"), Verdict::Incorrect);
        assert_eq!(v("(0, \\frac{1}{2}]", "(0, 0.5]"), Verdict::Correct);
        assert_eq!(v("(-\\infty, 3)", "(-\\infty,3)"), Verdict::Correct);
        assert_eq!(v("\\{1, 2, 3\\}", "\\{3, 1, 2\\}"), Verdict::Correct);
        assert_eq!(v("1, -2", "-2, 1"), Verdict::Correct);
        assert_eq!(v("1,-2", "1"), Verdict::Incorrect);
        assert_eq!(
            v("(0,9) \\cup (9,36)", "(9,36)\\cup(0,9)"),
            Verdict::Correct
        );
        assert_eq!(
            v("1 \\pm \\sqrt{2}", "1+\\sqrt2, 1-\\sqrt2"),
            Verdict::Correct
        );
        assert_eq!(
            v(
                "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}",
                "\\begin{pmatrix}-1&0\\\\0&-1\\end{pmatrix}"
            ),
            Verdict::Correct
        );
        assert_eq!(
            v(
                "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}",
                "\\begin{pmatrix} 1 \\\\ 3 \\end{pmatrix}"
            ),
            Verdict::Incorrect
        );
        assert_eq!(v("(1, \\sin x)", "(2, \\cos x)"), Verdict::Incorrect);
        assert_eq!(v("(1, \\sin x)", "(1, \\cos x)"), Verdict::Unknown);
    }

    #[test]
    fn lists_bases_and_garbled_tex() {
        assert_eq!(
            v("(\\frac{3}{2}, -13)", "\\frac{3}{2}, -13"),
            Verdict::Correct
        );
        assert_eq!(
            v("(\\frac{3}{2}, -13)", "m=\\frac{3}{2}, b=-1"),
            Verdict::Incorrect
        );
        assert_eq!(v("(1, 2)", "2, 1"), Verdict::Unknown);
        assert_eq!(v("52_8", "52_8"), Verdict::Correct);
        assert_eq!(v("52_8", "52"), Verdict::Correct);
        assert_eq!(v("52_8", "42"), Verdict::Incorrect);
        assert_eq!(v("4210_{5}", "4210_5"), Verdict::Correct);
        assert_eq!(v("x_2", "x_{2}"), Verdict::Correct);
        assert_eq!(v("\\frac9{19}", "\\frac919"), Verdict::Unknown);
        assert_eq!(v("\\sqrt{34}", "\\sqrt34"), Verdict::Unknown);
        assert_eq!(v("5.4 \\text{ cents}", "5.4cents"), Verdict::Correct);
        assert_eq!(v("15\\mbox{ cm}^2", "15\\mboxcm^2"), Verdict::Correct);
        assert_eq!(
            v(
                "\\begin{pmatrix} 1/5 \\\\ -18/5 \\end{pmatrix}",
                "\\beginpmatrix1/5\\\\-18/5\\endpmatrix"
            ),
            Verdict::Correct
        );
        assert_eq!(
            v("(5,\\infty)", "(-\\infty, 5) \\cup (5, \\infty)"),
            Verdict::Unknown
        );
    }

    #[test]
    fn multiple_choice() {
        assert_eq!(v("C", "(C)"), Verdict::Correct);
        assert_eq!(v("C", "C"), Verdict::Correct);
        assert_eq!(v("C", "\\boxed{C}"), Verdict::Correct);
        assert_eq!(v("\\text{(C)}", "C"), Verdict::Correct);
        assert_eq!(v("B", "(C)"), Verdict::Incorrect);
    }

    #[test]
    fn a_response_cut_inside_its_reasoning_is_graded_as_no_answer() {
        // A draft box in unfinished reasoning is not an answer.
        let cut = "Ava has 7, doubled is 14, so \\boxed{19}? Let me check: 14 + 5";
        let o = verify_response("19", cut, true, true);
        assert_eq!(o.verdict, Verdict::Incorrect);
        assert_eq!(o.extracted, None);
        assert!(o.detail.contains("length limit"), "{}", o.detail);
        // Finished reasoning followed by the answer is graded on the answer.
        let done = "so \\boxed{3}?\n</think>\n\n\\boxed{19}";
        assert_eq!(
            verify_response("19", done, true, true).verdict,
            Verdict::Correct
        );
        // A model that stopped by itself is graded as before.
        assert_eq!(
            verify_response("19", cut, true, false).verdict,
            Verdict::Correct
        );
    }

    #[test]
    fn gsm8k_reference() {
        let gold = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\n#### 1,234";
        assert_eq!(v(gold, "1234"), Verdict::Correct);
        assert_eq!(v(gold, "1,234"), Verdict::Correct);
        assert_eq!(v(gold, "1233"), Verdict::Incorrect);
    }

    #[test]
    fn verify_combines_extraction_and_comparison() {
        let o = verify(
            "\\frac{1}{2}",
            "<think>hmm</think> So the result is \\boxed{0.5}.",
        );
        assert_eq!(o.verdict, Verdict::Correct);
        assert_eq!(o.extracted.unwrap().method, Method::Boxed);
        let o = verify("7", "I give up.");
        assert_eq!(
            (o.verdict, o.detail.as_str()),
            (Verdict::Incorrect, "no answer found")
        );
        let o = verify("", "\\boxed{7}");
        assert_eq!(
            (o.verdict, o.detail.as_str()),
            (Verdict::Unknown, "no reference answer")
        );
        let o = verify("B", "Reasoning.\nAnswer: (B)");
        assert_eq!(o.verdict, Verdict::Correct);
        let o = verify("Q: ... #### 18", "She makes 9 * 2 = 18 dollars.\n#### 18");
        assert_eq!(o.verdict, Verdict::Correct);
    }
}
