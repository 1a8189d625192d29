//! Structured answers (tuples, intervals, sets, matrices) and their comparison.

use super::Verdict;
use super::expr::{Poly, parse_expr};
use super::normalize::strip_assignment;

/// A normalised answer, split into the structure that decides equality.
#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// Exact value in the arithmetic fragment of `expr.rs`.
    Expr(Poly),
    /// Ordered, bracketed: points `(1,2)`, intervals `[0,1)`. Brackets must match.
    Seq {
        open: char,
        close: char,
        items: Vec<Value>,
    },
    /// Unordered: `\{1,2\}`, unions, `a \pm b`.
    Set(Vec<Value>),
    /// A bare comma list `1,-2`: MATH's "enter all solutions" (unordered), but
    /// also how some models write a pair, so it is compared in order against
    /// a bracketed tuple.
    List(Vec<Value>),
    /// A numeral with a base subscript, `52_8`: digits and base.
    Based(String, String),
    Matrix(Vec<Vec<Value>>),
    /// Letters only ("Evelyn", "odd"); compared case-insensitively.
    Word(String),
    /// A multiple-choice letter A–E.
    Choice(char),
    /// Anything else: equal only when the normalised strings are.
    Opaque(String),
}

/// Splits at `sep` where no bracket of any kind is open.
fn split_top<'a>(s: &'a str, sep: &str) -> Vec<&'a str> {
    let bytes = s.as_bytes();
    let mut depth: i32 = 0;
    let mut parts = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'\\' && i + 1 < bytes.len() && (bytes[i + 1] == b'{' || bytes[i + 1] == b'}') {
            depth += if bytes[i + 1] == b'{' { 1 } else { -1 };
            i += 2;
            continue;
        }
        // Bytes, not `s[i..]`: `i` may be inside a multi-byte character (a sampled answer can
        // hold anything); a match of `sep` itself always starts on a character boundary.
        if depth == 0 && bytes[i..].starts_with(sep.as_bytes()) {
            let after_ok = !sep.starts_with('\\')
                || !s[i + sep.len()..].starts_with(|c: char| c.is_ascii_alphabetic());
            if after_ok {
                parts.push(&s[start..i]);
                i += sep.len();
                start = i;
                continue;
            }
        }
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    parts.push(&s[start..]);
    parts
}

/// Byte index of the bracket closing the one at 0, treating `(`/`[` alike so
/// half-open intervals balance.
fn outer_close(s: &str) -> Option<usize> {
    let mut depth = 0i32;
    for (i, b) in s.bytes().enumerate() {
        match b {
            b'(' | b'[' | b'{' => depth += 1,
            b')' | b']' | b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

pub(crate) fn parse_value(s: &str) -> Value {
    let s = s.trim();
    if let Some(m) = parse_matrix(s) {
        return m;
    }
    let union = split_top(s, "\\cup");
    if union.len() > 1 {
        return Value::Set(union.iter().map(|p| parse_value(p)).collect());
    }
    for sep in [",", ";"] {
        let parts = split_top(s, sep);
        if parts.len() > 1 {
            return Value::List(
                parts
                    .iter()
                    .map(|p| parse_value(&strip_assignment(p)))
                    .collect(),
            );
        }
    }
    if let Some((digits, base)) = s.split_once('_') {
        let base = base.trim_start_matches('{').trim_end_matches('}');
        let radix = base.parse::<u32>().ok().filter(|b| (2..=36).contains(b));
        if let Some(radix) =
            radix.filter(|r| !digits.is_empty() && digits.chars().all(|c| c.is_digit(*r)))
        {
            let _ = radix;
            return Value::Based(digits.to_ascii_uppercase(), base.to_string());
        }
    }
    if matches!(s, "\\emptyset" | "\\varnothing" | "\\{\\}" | "∅") {
        return Value::Set(Vec::new());
    }
    if let Some(inner) = s.strip_prefix("\\{").and_then(|r| r.strip_suffix("\\}")) {
        return Value::Set(
            split_top(inner, ",")
                .iter()
                .map(|p| parse_value(p))
                .collect(),
        );
    }
    let first = s.chars().next().unwrap_or(' ');
    let last = s.chars().last().unwrap_or(' ');
    if matches!(first, '(' | '[')
        && matches!(last, ')' | ']')
        && outer_close(s) == Some(s.len() - 1)
    {
        let inner = &s[1..s.len() - 1];
        let items = split_top(inner, ",");
        if items.len() > 1 {
            return Value::Seq {
                open: first,
                close: last,
                items: items.iter().map(|p| parse_value(p)).collect(),
            };
        }
        if first == '(' && last == ')' {
            return parse_value(inner);
        }
    }
    let pm = split_top(s, "\\pm");
    if pm.len() == 2 {
        let plus = format!("{}+{}", pm[0], pm[1]);
        let minus = format!("{}-{}", pm[0], pm[1]);
        return Value::Set(vec![parse_value(&plus), parse_value(&minus)]);
    }
    if s.len() == 1 && matches!(s.as_bytes()[0], b'A'..=b'E') {
        return Value::Choice(s.as_bytes()[0] as char);
    }
    if let Some(p) = parse_expr(s) {
        return Value::Expr(p);
    }
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_alphabetic() || c == '\'' || c == '-')
    {
        return Value::Word(s.to_lowercase());
    }
    Value::Opaque(s.to_string())
}

fn parse_matrix(s: &str) -> Option<Value> {
    let rest = s.strip_prefix("\\begin{")?;
    let (env, body) = rest.split_once('}')?;
    if !env.ends_with("matrix") {
        return None;
    }
    let body = body.strip_suffix(&format!("\\end{{{env}}}"))?;
    let rows = body
        .split("\\\\")
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .map(|r| r.split('&').map(|c| parse_value(c.trim())).collect())
        .collect();
    Some(Value::Matrix(rows))
}

/// Result of comparing two values, with a human-readable reason.
pub(crate) struct Judged {
    pub verdict: Verdict,
    pub detail: String,
}

fn judged(verdict: Verdict, detail: impl Into<String>) -> Judged {
    Judged {
        verdict,
        detail: detail.into(),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Expr(p) if p.is_numeric() => "number",
        Value::Expr(_) => "expression",
        Value::Seq { .. } => "tuple/interval",
        Value::Set(_) => "set/union",
        Value::List(_) => "list",
        Value::Based(..) => "base-b numeral",
        Value::Matrix(_) => "matrix",
        Value::Word(_) => "word",
        Value::Choice(_) => "choice letter",
        Value::Opaque(_) => "unparsed text",
    }
}

/// Compares gold `a` with prediction `b`.
pub(crate) fn compare_values(a: &Value, b: &Value) -> Judged {
    use Value::*;
    match (a, b) {
        (Expr(x), Expr(y)) => {
            if x == y {
                judged(Verdict::Correct, "equal as exact values")
            } else {
                let what = if x.is_numeric() && y.is_numeric() {
                    "numbers"
                } else {
                    "expressions"
                };
                judged(
                    Verdict::Incorrect,
                    format!("{what} differ: {} vs {}", x.render(), y.render()),
                )
            }
        }
        (
            Seq {
                open: o1,
                close: c1,
                items: x,
            },
            Seq {
                open: o2,
                close: c2,
                items: y,
            },
        ) => {
            if x.len() != y.len() {
                return judged(
                    Verdict::Incorrect,
                    format!("{} vs {} components", x.len(), y.len()),
                );
            }
            if (o1, c1) != (o2, c2) {
                return judged(
                    Verdict::Incorrect,
                    format!("brackets differ: {o1}{c1} vs {o2}{c2}"),
                );
            }
            elementwise(x.iter().zip(y.iter()))
        }
        (Matrix(x), Matrix(y)) => {
            if x.len() != y.len() || x.iter().zip(y.iter()).any(|(r, s)| r.len() != s.len()) {
                return judged(Verdict::Incorrect, "matrix shapes differ");
            }
            elementwise(x.iter().flatten().zip(y.iter().flatten()))
        }
        (Set(x) | List(x), Set(y) | List(y)) => unordered(x, y),
        (Set(x) | List(x), other) if x.len() == 1 => compare_values(&x[0], other),
        (other, Set(y) | List(y)) if y.len() == 1 => compare_values(other, &y[0]),
        (List(x), Seq { items: y, .. }) | (Seq { items: x, .. }, List(y)) => {
            if x.len() != y.len() {
                return judged(
                    Verdict::Incorrect,
                    format!("{} vs {} components", x.len(), y.len()),
                );
            }
            let ordered = elementwise(x.iter().zip(y.iter()));
            if ordered.verdict == Verdict::Incorrect
                && unordered(x, y).verdict != Verdict::Incorrect
            {
                return judged(
                    Verdict::Unknown,
                    "bare list matches the tuple only in another order",
                );
            }
            ordered
        }
        (Based(d1, b1), Based(d2, b2)) => {
            if (d1, b1) == (d2, b2) {
                judged(Verdict::Correct, "same numeral")
            } else {
                judged(
                    Verdict::Incorrect,
                    format!("{d2}_{b2} instead of {d1}_{b1}"),
                )
            }
        }
        (Based(digits, base), Expr(p)) | (Expr(p), Based(digits, base)) => match p.as_rational() {
            Some(r) if r.is_integer() && r.to_integer().to_string() == *digits => judged(
                Verdict::Correct,
                format!("same digits; base-{base} subscript omitted"),
            ),
            Some(_) => judged(
                Verdict::Incorrect,
                format!("digits differ from {digits}_{base}"),
            ),
            None => judged(Verdict::Incorrect, format!("not a base-{base} numeral")),
        },
        (Choice(x), Choice(y)) => {
            if x == y {
                judged(Verdict::Correct, "same choice")
            } else {
                judged(Verdict::Incorrect, format!("choice {y} instead of {x}"))
            }
        }
        (Word(x), Word(y)) => {
            if x == y {
                judged(Verdict::Correct, "same word")
            } else {
                judged(Verdict::Incorrect, format!("word {y:?} instead of {x:?}"))
            }
        }
        (Opaque(x), Opaque(y)) if x == y => judged(Verdict::Correct, "identical text"),
        (Opaque(_), _) | (_, Opaque(_)) => judged(
            Verdict::Unknown,
            format!("cannot decide {} vs {}", kind(a), kind(b)),
        ),
        (Set(_), Seq { .. }) | (Seq { .. }, Set(_)) => judged(
            Verdict::Unknown,
            "union vs single interval: pieces may overlap",
        ),
        _ => judged(Verdict::Incorrect, format!("{} vs {}", kind(a), kind(b))),
    }
}

fn elementwise<'a>(pairs: impl Iterator<Item = (&'a Value, &'a Value)>) -> Judged {
    let mut unknown = None;
    for (i, (x, y)) in pairs.enumerate() {
        let j = compare_values(x, y);
        match j.verdict {
            Verdict::Incorrect => {
                return judged(
                    Verdict::Incorrect,
                    format!("component {} differs: {}", i + 1, j.detail),
                );
            }
            Verdict::Unknown => {
                unknown.get_or_insert(format!("component {}: {}", i + 1, j.detail));
            }
            Verdict::Correct => {}
        }
    }
    match unknown {
        Some(d) => judged(Verdict::Unknown, d),
        None => judged(Verdict::Correct, "all components equal"),
    }
}

fn unordered(x: &[Value], y: &[Value]) -> Judged {
    let mut used = vec![false; y.len()];
    let mut undecided = false;
    let mut unmatched = 0;
    for a in x {
        let mut found = false;
        for (k, b) in y.iter().enumerate() {
            if used[k] {
                continue;
            }
            match compare_values(a, b).verdict {
                Verdict::Correct => {
                    used[k] = true;
                    found = true;
                    break;
                }
                Verdict::Unknown => undecided = true,
                Verdict::Incorrect => {}
            }
        }
        if !found {
            unmatched += 1;
        }
    }
    if unmatched == 0 && x.len() == y.len() {
        return judged(Verdict::Correct, "same elements");
    }
    if x.len() != y.len() && !undecided {
        return judged(
            Verdict::Incorrect,
            format!("{} vs {} elements", x.len(), y.len()),
        );
    }
    if undecided {
        return judged(Verdict::Unknown, "some elements cannot be compared");
    }
    judged(
        Verdict::Incorrect,
        format!("{unmatched} of {} elements not matched", x.len()),
    )
}
