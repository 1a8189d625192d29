//! Surface normalisation of LaTeX answers before structural comparison.
//!
//! Every rewrite here is one that no grader would dispute (`\dfrac` is `\frac`,
//! `5\text{ cm}` is `5`, `1{,}000` is `1000`); anything that needs judgement is
//! left to the exact comparison in `value.rs`.

use std::sync::LazyLock;

use regex::Regex;

/// Commands whose braced argument is kept as plain text.
const TEXT_COMMANDS: &[&str] = &[
    "\\textbf",
    "\\textit",
    "\\textrm",
    "\\textnormal",
    "\\textsf",
    "\\texttt",
    "\\text",
    "\\mathrm",
    "\\mathbf",
    "\\mathit",
    "\\mathsf",
    "\\mathtt",
    "\\mathbb",
    "\\mathcal",
    "\\boldsymbol",
    "\\operatorname",
    "\\mbox",
    "\\hbox",
];

/// Unit words dropped after a number ("5 cm", "12 square units", "3 dollars").
/// Only whole words after whitespace, so "2m" (an expression in m) is untouched.
const UNITS: &[&str] = &[
    "mm",
    "cm",
    "m",
    "km",
    "meter",
    "meters",
    "metre",
    "metres",
    "centimeter",
    "centimeters",
    "millimeter",
    "millimeters",
    "kilometer",
    "kilometers",
    "inch",
    "inches",
    "ft",
    "foot",
    "feet",
    "yd",
    "yard",
    "yards",
    "mile",
    "miles",
    "mph",
    "kmh",
    "unit",
    "units",
    "sq",
    "square",
    "cubic",
    "degree",
    "degrees",
    "deg",
    "radian",
    "radians",
    "dollar",
    "dollars",
    "cent",
    "cents",
    "second",
    "seconds",
    "sec",
    "minute",
    "minutes",
    "min",
    "mins",
    "hour",
    "hours",
    "hr",
    "hrs",
    "day",
    "days",
    "week",
    "weeks",
    "month",
    "months",
    "year",
    "years",
    "g",
    "gram",
    "grams",
    "kg",
    "kilogram",
    "kilograms",
    "lb",
    "lbs",
    "pound",
    "pounds",
    "ounce",
    "ounces",
    "oz",
    "l",
    "liter",
    "liters",
    "litre",
    "litres",
    "ml",
    "gallon",
    "gallons",
    "cup",
    "cups",
    "percent",
    "per",
    "cubed",
    "squared",
];

const ROW_BREAK: &str = "\u{1}";

static THOUSANDS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$").expect("static regex"));
static TRAILING_UNITS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?P<head>.*?[0-9}\)])\s+(?P<units>[A-Za-z][A-Za-z.]*(?:\^\{?\d\}?)?(?:\s+[A-Za-z][A-Za-z.]*(?:\^\{?\d\}?)?)*)\s*$")
        .expect("static regex")
});
/// A plain number with a unit glued on: "5.4cents", "15cm^2".
static GLUED_UNIT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^(?P<num>-?[0-9]+(?:\.[0-9]+)?)(?P<unit>[A-Za-z]+)(?:\^\{?[23]\}?)?$")
        .expect("static regex")
});
/// `x = ...`, `f(x) = ...`, `x_1 = ...`, `\theta = ...`: a bare name on the left.
static SIMPLE_LHS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*(?:[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?|\\[A-Za-z]+)\s*(?:=|\\in)\s*(?P<rhs>[^=]+)$")
        .expect("static regex")
});

/// Canonical surface form of an answer: wrappers, spacing, units, degree and
/// percent signs, thousands separators and `x =` prefixes removed.
pub fn normalize(answer: &str) -> String {
    let mut s = answer.trim().to_string();
    s = unwrap_boxed(&s);
    s = s.replace("\\$", "").replace('$', "");
    for delim in ["\\(", "\\)", "\\[", "\\]"] {
        s = s.replace(delim, "");
    }
    s = unwrap_boxed(s.trim());
    // Protect matrix row breaks from the "\ " (control space) rewrite below.
    s = s.replace("\\\\", ROW_BREAK);
    for (from, to) in [
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\cfrac", "\\frac"),
        ("\\displaystyle", ""),
        ("\\dbinom", "\\binom"),
        ("\\tbinom", "\\binom"),
        ("−", "-"),
        ("–", "-"),
        ("π", "\\pi"),
        ("∞", "\\infty"),
        ("√", "\\sqrt"),
        ("×", "*"),
        ("·", "*"),
        ("≤", "\\le"),
        ("≥", "\\ge"),
        ("\\!", ""),
        ("\\,", " "),
        ("\\;", " "),
        ("\\:", " "),
        ("\\ ", " "),
        ("\\qquad", " "),
        ("\\quad", " "),
        ("~", " "),
        ("^{\\circ}", ""),
        ("^\\circ", ""),
        ("^{\\degree}", ""),
        ("\\degree", ""),
        ("\\circ", ""),
        ("°", ""),
        ("\\%", ""),
        ("%", ""),
        ("{,}", ""),
        ("\\cdot", "*"),
        ("\\times", "*"),
        ("\\pm*", "\\pm "),
        // Brace-stripped environments seen in model output.
        ("\\beginpmatrix", "\\begin{pmatrix}"),
        ("\\endpmatrix", "\\end{pmatrix}"),
        ("\\beginbmatrix", "\\begin{bmatrix}"),
        ("\\endbmatrix", "\\end{bmatrix}"),
    ] {
        s = s.replace(from, to);
    }
    s = s.replace(ROW_BREAK, "\\\\");
    s = strip_sizing(&s);
    s = unwrap_text(&s);
    s = replace_word(&s, "sqrt", "\\sqrt");
    s = replace_word(&s, "pi", "\\pi");
    for (from, to) in [
        ("\\leq", "<="),
        ("\\le", "<="),
        ("\\geq", ">="),
        ("\\ge", ">="),
        ("\\neq", "!="),
        ("\\ne", "!="),
    ] {
        s = replace_command(&s, from, to);
    }
    s = drop_trailing_units(s.trim());
    s = strip_assignment(&s);
    s = squeeze_spaces(&s);
    s = canonical_macro_args(&s);
    while s.ends_with('.') || s.ends_with("\\\\") {
        s.truncate(s.len() - if s.ends_with('.') { 1 } else { 2 });
    }
    if THOUSANDS.is_match(&s) {
        s = s.replace(',', "");
    }
    s
}

/// `x = 5` -> `5`: the name on the left carries no answer.
pub(crate) fn strip_assignment(s: &str) -> String {
    match SIMPLE_LHS.captures(s) {
        Some(c) => c["rhs"].trim().to_string(),
        None => s.to_string(),
    }
}

/// Removes `\boxed{...}` / `\fbox{...}` when it wraps the whole string.
pub(crate) fn unwrap_boxed(s: &str) -> String {
    let mut cur = s.trim().to_string();
    loop {
        let mut changed = false;
        for cmd in ["\\boxed", "\\fbox"] {
            if let Some(rest) = cur.strip_prefix(cmd) {
                let rest = rest.trim_start();
                if rest.starts_with('{')
                    && let Some(end) = matching_brace(rest, 0)
                    && rest[end + 1..].trim().is_empty()
                {
                    cur = rest[1..end].trim().to_string();
                    changed = true;
                }
            }
        }
        if !changed {
            return cur;
        }
    }
}

/// Byte index of the `}` matching the `{` at byte `open`.
pub(crate) fn matching_brace(s: &str, open: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => {
                // Skip escaped braces such as "\{" so set notation does not
                // unbalance the count.
                i += 2;
                continue;
            }
            b'{' => depth += 1,
            b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Drops `\left`, `\right`, `\big`... and the `.` of `\left.`/`\right.`.
fn strip_sizing(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    'outer: while !rest.is_empty() {
        for cmd in [
            "\\left", "\\right", "\\bigl", "\\bigr", "\\Bigl", "\\Bigr", "\\biggl", "\\biggr",
            "\\big", "\\Big", "\\bigg", "\\Bigg",
        ] {
            if let Some(after) = rest.strip_prefix(cmd)
                && !after.starts_with(|c: char| c.is_ascii_alphabetic())
            {
                rest = after.strip_prefix('.').unwrap_or(after);
                continue 'outer;
            }
        }
        let ch = rest.chars().next().unwrap_or_default();
        out.push(ch);
        rest = &rest[ch.len_utf8()..];
    }
    out
}

/// Replaces `\text{...}`-like wrappers by their content, dropping the ones that
/// are units after a number (`5\text{ cm}`, `3\mbox{ inches}^2`).
fn unwrap_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'scan: while i < s.len() {
        for cmd in TEXT_COMMANDS {
            if s[i..].starts_with(cmd) {
                let after = i + cmd.len();
                // "\mboxcm": a brace-stripped unit.
                let word: String = s[after..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphabetic())
                    .collect();
                if !word.is_empty()
                    && UNITS.contains(&word.to_ascii_lowercase().as_str())
                    && out
                        .trim_end()
                        .ends_with(|p: char| p.is_ascii_digit() || p == '}')
                {
                    let mut next = after + word.len();
                    for sq in ["^{2}", "^{3}", "^2", "^3"] {
                        if s[next..].starts_with(sq) {
                            next += sq.len();
                        }
                    }
                    if only_units_follow(&s[next..]) {
                        i = next;
                        continue 'scan;
                    }
                }
            }
            if s[i..].starts_with(cmd)
                && !s[i + cmd.len()..].starts_with(|c: char| c.is_ascii_alphabetic())
            {
                let after = i + cmd.len();
                let skip = s[after..].len() - s[after..].trim_start().len();
                let open = after + skip;
                if s[open..].starts_with('{')
                    && let Some(close) = matching_brace(s, open)
                {
                    let content = &s[open + 1..close];
                    let mut next = close + 1;
                    let prev = out.trim_end().chars().last();
                    let is_unit = content
                        .trim()
                        .chars()
                        .all(|c| c.is_ascii_alphabetic() || c == ' ' || c == '.' || c == '/')
                        && !content.trim().is_empty()
                        && prev.is_some_and(|p| p.is_ascii_digit() || p == '}' || p == ')')
                        && only_units_follow(&s[next..]);
                    if is_unit {
                        // A unit's exponent goes with it: cm^2.
                        for sq in ["^{2}", "^{3}", "^2", "^3"] {
                            if s[next..].starts_with(sq) {
                                next += sq.len();
                            }
                        }
                    } else {
                        out.push_str(content);
                    }
                    i = next;
                    continue 'scan;
                }
            }
        }
        let ch = s[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn only_units_follow(rest: &str) -> bool {
    let r = rest.trim_start_matches(['^', '{', '}', '2', '3']).trim();
    r.is_empty() || TEXT_COMMANDS.iter().any(|c| r.starts_with(c))
}

fn drop_trailing_units(s: &str) -> String {
    if let Some(c) = GLUED_UNIT.captures(s) {
        let unit = c["unit"].to_ascii_lowercase();
        if unit.len() >= 2 && UNITS.contains(&unit.as_str()) {
            return c["num"].to_string();
        }
    }
    if let Some(c) = TRAILING_UNITS.captures(s) {
        let all_units = c["units"].split_whitespace().all(|w| {
            let w = w.split('^').next().unwrap_or(w).trim_end_matches('.');
            UNITS.contains(&w.to_ascii_lowercase().as_str())
        });
        if all_units {
            return c["head"].trim().to_string();
        }
    }
    s.to_string()
}

/// Replaces a bare word (not part of a longer word or a `\command`).
fn replace_word(s: &str, word: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let bytes = s.as_bytes();
    while i < s.len() {
        if s[i..].starts_with(word) {
            let before_ok =
                i == 0 || !(bytes[i - 1].is_ascii_alphabetic() || bytes[i - 1] == b'\\');
            let end = i + word.len();
            let after_ok = end >= s.len() || !bytes[end].is_ascii_alphabetic();
            if before_ok && after_ok {
                out.push_str(to);
                i = end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Replaces `\cmd` only where the command name ends (`\le` but not `\left`).
fn replace_command(s: &str, cmd: &str, to: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i..].starts_with(cmd)
            && !s[i + cmd.len()..].starts_with(|c: char| c.is_ascii_alphabetic())
        {
            out.push_str(to);
            i += cmd.len();
            continue;
        }
        let ch = s[i..].chars().next().unwrap_or_default();
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

/// Removes whitespace, except one space where a `\command` is followed by a
/// letter (so `\pi r` does not become the unknown command `\pir`).
fn squeeze_spaces(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_whitespace() {
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next_letter = chars.get(j).is_some_and(|c| c.is_ascii_alphabetic());
            if next_letter && ends_with_command(&out) {
                out.push(' ');
            }
            i = j;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn ends_with_command(s: &str) -> bool {
    let letters = s.len() - s.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
    letters > 0 && s[..s.len() - letters].ends_with('\\')
}

/// `\frac12` -> `\frac{1}{2}`, `\sqrt3` -> `\sqrt{3}`, `^{2}` -> `^2`, so that
/// the string fallback sees one spelling.
fn canonical_macro_args(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    let chars: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let rest: String = chars[i..chars.len().min(i + 6)].iter().collect();
        let (cmd, nargs) = if rest.starts_with("\\frac")
            && !chars.get(i + 5).is_some_and(|c| c.is_ascii_alphabetic())
        {
            ("\\frac", 2)
        } else if rest.starts_with("\\sqrt")
            && !chars.get(i + 5).is_some_and(|c| c.is_ascii_alphabetic())
        {
            ("\\sqrt", 1)
        } else {
            ("", 0)
        };
        if nargs > 0 {
            out.push_str(cmd);
            i += cmd.len();
            // "\frac919" or "\sqrt34": TeX would read \frac{9}{1}9 and \sqrt{3}4,
            // but the writer rarely meant that; leave such runs for the parser
            // to reject instead of picking a reading.
            let run = chars[i..]
                .iter()
                .take_while(|c| c.is_ascii_alphanumeric())
                .count();
            if run > nargs {
                continue;
            }
            for _ in 0..nargs {
                match chars.get(i) {
                    Some(c) if c.is_ascii_alphanumeric() => {
                        out.push('{');
                        out.push(*c);
                        out.push('}');
                        i += 1;
                    }
                    _ => break,
                }
            }
            continue;
        }
        if (chars[i] == '^' || chars[i] == '_')
            && chars.get(i + 1) == Some(&'{')
            && chars.get(i + 3) == Some(&'}')
            && chars.get(i + 2).is_some_and(|c| c.is_ascii_alphanumeric())
        {
            out.push(chars[i]);
            out.push(chars[i + 2]);
            i += 4;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn fractions_and_sizing() {
        assert_eq!(normalize("\\dfrac{14}{3}"), "\\frac{14}{3}");
        assert_eq!(normalize("\\tfrac12"), "\\frac{1}{2}");
        assert_eq!(
            normalize("\\left( 3, \\frac{\\pi}{2} \\right)"),
            "(3,\\frac{\\pi}{2})"
        );
        assert_eq!(normalize("\\left\\{1,2\\right\\}"), "\\{1,2\\}");
        assert_eq!(normalize("\\left. x \\right|"), "x|");
    }

    #[test]
    fn text_and_units() {
        assert_eq!(normalize("5\\text{ cm}"), "5");
        assert_eq!(normalize("5 cm"), "5");
        assert_eq!(normalize("12\\mbox{ inches}^2"), "12");
        assert_eq!(normalize("18 square units"), "18");
        assert_eq!(normalize("\\text{Evelyn}"), "Evelyn");
        assert_eq!(normalize("\\textbf{(C)}"), "(C)");
        assert_eq!(normalize("2m"), "2m");
    }

    #[test]
    fn degrees_percent_money() {
        assert_eq!(normalize("145^\\circ"), "145");
        assert_eq!(normalize("90^{\\circ}"), "90");
        assert_eq!(normalize("30°"), "30");
        assert_eq!(normalize("25\\%"), "25");
        assert_eq!(normalize("\\$18.90"), "18.90");
    }

    #[test]
    fn separators_and_spacing() {
        assert_eq!(normalize("1,000"), "1000");
        assert_eq!(normalize("1{,}000"), "1000");
        assert_eq!(normalize("11,\\! 111,\\! 111,\\! 100"), "11111111100");
        assert_eq!(normalize("1, -2"), "1,-2");
        assert_eq!(normalize("2\\,\\pi r"), "2\\pi r");
        assert_eq!(normalize("5."), "5");
    }

    #[test]
    fn assignments_and_macros() {
        assert_eq!(normalize("x = 5"), "5");
        assert_eq!(normalize("y=2x^2-18"), "2x^2-18");
        assert_eq!(normalize("f(x) = 2x"), "2x");
        assert_eq!(normalize("\\sqrt3"), "\\sqrt{3}");
        assert_eq!(normalize("sqrt(51)"), "\\sqrt(51)");
        assert_eq!(normalize("pi/2"), "\\pi/2");
        assert_eq!(normalize("x^{2}"), "x^2");
        assert_eq!(normalize("\\boxed{\\boxed{7}}"), "7");
        assert_eq!(normalize("$\\boxed{7}$"), "7");
    }
}
