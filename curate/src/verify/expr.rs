//! Exact symbolic arithmetic for answer comparison.
//!
//! Answers are parsed into Laurent polynomials with rational coefficients over
//! named symbols (variables, `\pi`, `\infty`, `i`) and square roots of square-free
//! integers. Within that fragment equality is decidable and exact: `\frac{1}{2}`,
//! `0.5` and `1/2` are one value, so are `2\sqrt{3}` and `\sqrt{12}`, and `x+1` and
//! `1+x`. Anything outside it (functions such as `\sin`, division by a sum, roots of
//! symbolic expressions) fails to parse, and the caller falls back to string
//! comparison or `Unknown`.
//!
//! Written by hand because no maintained Rust crate parses LaTeX math into a
//! canonical exact form; a full CAS (e.g. symbolica) would be far heavier and is
//! not needed for answer-level equality.

use std::collections::BTreeMap;

use num_bigint::{BigInt, BigUint};
use num_integer::{Integer, Roots};
use num_rational::BigRational;
use num_traits::{One, Pow, Signed, ToPrimitive, Zero};

/// Largest integer exponent evaluated; larger powers are left undecided rather
/// than risk huge allocations on adversarial model output.
const MAX_EXPONENT: u32 = 4096;
/// Cap on polynomial size during expansion (e.g. `(x+y)^{50}`).
const MAX_TERMS: usize = 512;
/// Cap on the size of an evaluated power, in bits (2^{1009} is fine, towers are not).
const MAX_BITS: u64 = 1 << 16;
/// Trial-division bound for square-free factorisation (see [`square_free`]).
const TRIAL_BOUND: u64 = 1_000_000;

/// A product of symbols with integer exponents times `sqrt(rad)`, `rad` square-free.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Mono {
    syms: Vec<(String, i32)>,
    rad: BigUint,
}

impl Mono {
    fn one() -> Self {
        Mono {
            syms: Vec::new(),
            rad: BigUint::one(),
        }
    }
}

/// Sum of rational multiples of [`Mono`]s; zero coefficients never stored, so
/// structural equality is mathematical equality.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Poly {
    terms: BTreeMap<Mono, BigRational>,
}

impl Poly {
    pub(crate) fn constant(r: BigRational) -> Self {
        let mut terms = BTreeMap::new();
        if !r.is_zero() {
            terms.insert(Mono::one(), r);
        }
        Poly { terms }
    }

    fn symbol(name: &str) -> Self {
        let mut terms = BTreeMap::new();
        terms.insert(
            Mono {
                syms: vec![(name.to_string(), 1)],
                rad: BigUint::one(),
            },
            BigRational::one(),
        );
        Poly { terms }
    }

    /// The value as a rational, when it has no symbols and no roots.
    pub(crate) fn as_rational(&self) -> Option<BigRational> {
        match self.terms.len() {
            0 => Some(BigRational::zero()),
            1 => {
                let (m, c) = self.terms.iter().next()?;
                (m.syms.is_empty() && m.rad.is_one()).then(|| c.clone())
            }
            _ => None,
        }
    }

    /// True when the value contains no symbol (it may contain square roots).
    pub(crate) fn is_numeric(&self) -> bool {
        self.terms.keys().all(|m| m.syms.is_empty())
    }

    fn add(mut self, other: Poly) -> Poly {
        for (m, c) in other.terms {
            let entry = self
                .terms
                .entry(m.clone())
                .or_insert_with(BigRational::zero);
            *entry += c;
            if entry.is_zero() {
                self.terms.remove(&m);
            }
        }
        self
    }

    fn neg(mut self) -> Poly {
        for c in self.terms.values_mut() {
            *c = -c.clone();
        }
        self
    }

    fn mul(&self, other: &Poly) -> Option<Poly> {
        if self.terms.len() * other.terms.len() > MAX_TERMS * 4 {
            return None;
        }
        let mut out = Poly {
            terms: BTreeMap::new(),
        };
        for (m1, c1) in &self.terms {
            for (m2, c2) in &other.terms {
                let (m, k) = mono_mul(m1, m2);
                let c = c1 * c2 * k;
                out = out.add(Poly {
                    terms: [(m, c)].into_iter().filter(|(_, c)| !c.is_zero()).collect(),
                });
            }
        }
        (out.terms.len() <= MAX_TERMS).then_some(out)
    }

    /// Multiplicative inverse; only single-term values are invertible here.
    fn inverse(&self) -> Option<Poly> {
        if self.terms.len() != 1 {
            return None;
        }
        let (m, c) = self.terms.iter().next()?;
        // 1 / (c * s * sqrt(r)) = sqrt(r) / (c * r * s)
        let rad = BigRational::from_integer(BigInt::from(m.rad.clone()));
        let coeff = (c * &rad).recip();
        let mut syms: Vec<(String, i32)> = m.syms.iter().map(|(s, e)| (s.clone(), -e)).collect();
        let mut sign = BigRational::one();
        normalize_syms(&mut syms, &mut sign);
        let mono = Mono {
            syms,
            rad: m.rad.clone(),
        };
        Some(Poly {
            terms: [(mono, coeff * sign)].into_iter().collect(),
        })
    }

    fn pow(&self, exp: &BigRational) -> Option<Poly> {
        if !exp.is_integer() {
            // Only x^{1/2}-style roots of non-negative rationals are supported.
            if *exp == BigRational::new(BigInt::from(1), BigInt::from(2)) {
                return self.sqrt();
            }
            return None;
        }
        let e = exp.to_integer();
        let mag = e.abs().to_u32().filter(|m| *m <= MAX_EXPONENT)?;
        let base = if e.is_negative() {
            self.inverse()?
        } else {
            self.clone()
        };
        if let Some(r) = base.as_rational() {
            let bits = r.numer().bits().max(r.denom().bits());
            if bits.saturating_mul(u64::from(mag)) > MAX_BITS {
                return None;
            }
            return Some(Poly::constant(Pow::pow(r, mag)));
        }
        let mut acc = Poly::constant(BigRational::one());
        for _ in 0..mag {
            acc = acc.mul(&base)?;
        }
        Some(acc)
    }

    fn sqrt(&self) -> Option<Poly> {
        self.nth_root(2)
    }

    /// Principal n-th root of a rational constant; `None` where the result would
    /// leave the fragment (cube root of 2, root of a symbol).
    fn nth_root(&self, n: u32) -> Option<Poly> {
        let r = self.as_rational()?;
        if r.is_negative() {
            if n == 2 {
                let pos = Poly::constant(-r).sqrt()?;
                return pos.mul(&Poly::symbol("i"));
            }
            if n % 2 == 1 {
                return Poly::constant(-r).nth_root(n).map(Poly::neg);
            }
            return None;
        }
        let (num, den) = (r.numer().to_biguint()?, r.denom().to_biguint()?);
        if n == 2 {
            // sqrt(p/q) = sqrt(p*q)/q = s*sqrt(f)/q
            let (s, f) = square_free(&(num * &den))?;
            let coeff = BigRational::new(BigInt::from(s), BigInt::from(den));
            let mono = Mono {
                syms: Vec::new(),
                rad: f,
            };
            return Some(Poly {
                terms: [(mono, coeff)]
                    .into_iter()
                    .filter(|(_, c)| !c.is_zero())
                    .collect(),
            });
        }
        let (a, b) = (num.nth_root(n), den.nth_root(n));
        if Pow::pow(&a, n) == num && Pow::pow(&b, n) == den {
            return Some(Poly::constant(BigRational::new(
                BigInt::from(a),
                BigInt::from(b),
            )));
        }
        None
    }

    /// Canonical text, used in details and for hashing-free comparisons.
    pub(crate) fn render(&self) -> String {
        if self.terms.is_empty() {
            return "0".into();
        }
        let mut out = String::new();
        for (m, c) in &self.terms {
            if !out.is_empty() {
                out.push_str(" + ");
            }
            out.push_str(&c.to_string());
            if !m.rad.is_one() {
                out.push_str(&format!("*sqrt({})", m.rad));
            }
            for (s, e) in &m.syms {
                if *e == 1 {
                    out.push_str(&format!("*{s}"));
                } else {
                    out.push_str(&format!("*{s}^{e}"));
                }
            }
        }
        out
    }
}

fn mono_mul(a: &Mono, b: &Mono) -> (Mono, BigRational) {
    let mut syms: BTreeMap<String, i32> = BTreeMap::new();
    for (s, e) in a.syms.iter().chain(b.syms.iter()) {
        *syms.entry(s.clone()).or_insert(0) += e;
    }
    let mut syms: Vec<(String, i32)> = syms.into_iter().filter(|(_, e)| *e != 0).collect();
    let mut k = BigRational::one();
    normalize_syms(&mut syms, &mut k);
    // sqrt(a)*sqrt(b) = g*sqrt(a*b/g^2) with g = gcd(a, b), both square-free.
    let g = a.rad.gcd(&b.rad);
    let rad = (&a.rad * &b.rad) / (&g * &g);
    k *= BigRational::from_integer(BigInt::from(g));
    (Mono { syms, rad }, k)
}

/// Reduces powers of the imaginary unit (i^2 = -1) into the coefficient.
fn normalize_syms(syms: &mut Vec<(String, i32)>, coeff: &mut BigRational) {
    for (s, e) in syms.iter_mut() {
        if s == "i" {
            let r = e.rem_euclid(2);
            if ((*e - r) / 2) % 2 != 0 {
                *coeff = -coeff.clone();
            }
            *e = r;
        }
    }
    syms.retain(|(_, e)| *e != 0);
    syms.sort();
}

/// Splits `n = s^2 * f` with `f` square-free. Exact for `n < 10^18` after
/// trial division: any remainder with all prime factors above the bound and
/// below `bound^3` is 1, p, p^2 or p*q, and a perfect-square test tells p^2 apart.
fn square_free(n: &BigUint) -> Option<(BigUint, BigUint)> {
    if n.is_zero() {
        return Some((BigUint::zero(), BigUint::one()));
    }
    let root = n.sqrt();
    if &root * &root == *n {
        return Some((root, BigUint::one()));
    }
    let mut rest = n.to_u64().filter(|v| *v < 1_000_000_000_000_000_000)?;
    let (mut s, mut f) = (1u64, 1u64);
    let mut d = 2u64;
    while d <= TRIAL_BOUND && d * d <= rest {
        if rest % d == 0 {
            let mut count = 0;
            while rest % d == 0 {
                rest /= d;
                count += 1;
            }
            s *= d.pow(count / 2);
            if count % 2 == 1 {
                f *= d;
            }
        }
        d += if d == 2 { 1 } else { 2 };
    }
    if rest > 1 {
        let r = rest.sqrt();
        if r * r == rest {
            s *= r;
        } else {
            f *= rest;
        }
    }
    Some((BigUint::from(s), BigUint::from(f)))
}

/// Parses a normalised answer into a [`Poly`]; `None` when any part is outside
/// the supported fragment.
pub(crate) fn parse_expr(src: &str) -> Option<Poly> {
    let tokens = tokenize(src)?;
    if tokens.is_empty() {
        return None;
    }
    let mut p = Parser { tokens, pos: 0 };
    let v = p.expr()?;
    (p.pos == p.tokens.len()).then_some(v)
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(BigRational),
    Sym(String),
    Cmd(String),
    Op(char),
}

const GREEK: &[&str] = &[
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "varepsilon",
    "zeta",
    "eta",
    "theta",
    "vartheta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "varphi",
    "chi",
    "psi",
    "omega",
    "Gamma",
    "Delta",
    "Theta",
    "Lambda",
    "Xi",
    "Pi",
    "Sigma",
    "Phi",
    "Psi",
    "Omega",
    "infty",
];

fn tokenize(src: &str) -> Option<Vec<Tok>> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_digit() {
                i += 1;
            }
            if i < chars.len()
                && chars[i] == '.'
                && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())
            {
                i += 1;
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            } else if i < chars.len()
                && chars[i] == '.'
                && !chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())
            {
                // A trailing decimal point ("5.") is just punctuation.
                i += 1;
            }
            let text: String = chars[start..i].iter().collect();
            out.push(Tok::Num(parse_decimal(text.trim_end_matches('.'))?));
        } else if c == '\\' {
            let start = i + 1;
            i += 1;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == start {
                // Escaped punctuation such as "\{" is a set, not arithmetic.
                return None;
            }
            let name: String = chars[start..i].iter().collect();
            match name.as_str() {
                "frac" | "sqrt" | "binom" => out.push(Tok::Cmd(name)),
                "cdot" | "times" => out.push(Tok::Op('*')),
                "div" => out.push(Tok::Op('/')),
                n if GREEK.contains(&n) => out.push(Tok::Sym(format!("\\{n}"))),
                _ => return None,
            }
        } else if c.is_ascii_alphabetic() {
            let start = i;
            while i < chars.len() && chars[i].is_ascii_alphabetic() {
                i += 1;
            }
            // Three or more letters in a row is a word ("Evelyn", "odd"), not a
            // product of one-letter variables.
            if i - start >= 3 {
                return None;
            }
            for (k, ch) in chars[start..i].iter().enumerate() {
                let mut name = ch.to_string();
                // A subscript binds to the last letter: x_1, a_{n}.
                if k == i - start - 1 && chars.get(i) == Some(&'_') {
                    let (sub, next) = read_subscript(&chars, i + 1)?;
                    name.push('_');
                    name.push_str(&sub);
                    i = next;
                }
                out.push(Tok::Sym(name));
            }
        } else if "+-*/^()[]{}!".contains(c) {
            out.push(Tok::Op(c));
            i += 1;
        } else {
            return None;
        }
    }
    Some(out)
}

fn read_subscript(chars: &[char], i: usize) -> Option<(String, usize)> {
    match chars.get(i)? {
        '{' => {
            let mut j = i + 1;
            while j < chars.len() && chars[j] != '}' {
                if !chars[j].is_ascii_alphanumeric() {
                    return None;
                }
                j += 1;
            }
            (j < chars.len()).then(|| (chars[i + 1..j].iter().collect(), j + 1))
        }
        c if c.is_ascii_alphanumeric() => Some((c.to_string(), i + 1)),
        _ => None,
    }
}

fn parse_decimal(text: &str) -> Option<BigRational> {
    let (int, frac) = match text.split_once('.') {
        Some((a, b)) => (a, b),
        None => (text, ""),
    };
    let digits = format!("{int}{frac}");
    let n: BigInt = if digits.is_empty() {
        return None;
    } else {
        digits.parse().ok()?
    };
    let d = Pow::pow(BigInt::from(10u32), frac.len() as u32);
    Some(BigRational::new(n, d))
}

struct Parser {
    tokens: Vec<Tok>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos)
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(&Tok::Op(c)) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn expr(&mut self) -> Option<Poly> {
        let mut acc = self.term()?;
        loop {
            if self.eat('+') {
                acc = acc.add(self.term()?);
            } else if self.eat('-') {
                acc = acc.add(self.term()?.neg());
            } else {
                return Some(acc);
            }
        }
    }

    fn term(&mut self) -> Option<Poly> {
        let mut acc = self.unary()?;
        loop {
            if self.eat('*') {
                acc = acc.mul(&self.unary()?)?;
            } else if self.eat('/') {
                acc = acc.mul(&self.unary()?.inverse()?)?;
            } else if self.starts_atom() {
                // Implicit multiplication: 2x, 3\sqrt{2}, (a)(b).
                acc = acc.mul(&self.power()?)?;
            } else {
                return Some(acc);
            }
        }
    }

    fn starts_atom(&self) -> bool {
        matches!(
            self.peek(),
            Some(Tok::Num(_) | Tok::Sym(_) | Tok::Cmd(_) | Tok::Op('(' | '[' | '{'))
        )
    }

    fn unary(&mut self) -> Option<Poly> {
        if self.eat('-') {
            return Some(self.unary()?.neg());
        }
        if self.eat('+') {
            return self.unary();
        }
        self.power()
    }

    fn power(&mut self) -> Option<Poly> {
        let mut base = self.postfix()?;
        if self.eat('^') {
            let exp = self.exponent()?;
            base = base.pow(&exp.as_rational()?)?;
        }
        Some(base)
    }

    /// `^{...}`, `^2`, `^-1`, `^x`: a braced group or one signed atom (without
    /// implicit multiplication, so `2^34` is read as `2^3 * 4` like LaTeX).
    fn exponent(&mut self) -> Option<Poly> {
        if self.eat('-') {
            return Some(self.exponent()?.neg());
        }
        match self.peek()?.clone() {
            Tok::Op('{') => {
                self.pos += 1;
                let v = self.expr()?;
                self.eat('}').then_some(v)
            }
            Tok::Num(n) => {
                self.pos += 1;
                // LaTeX binds only the first digit of "^23"; models mean 2^{23}
                // as often as 2^2*3, so refuse to guess.
                if n.is_integer() && n.to_integer() >= BigInt::from(10) {
                    return None;
                }
                Some(Poly::constant(n))
            }
            _ => self.atom(),
        }
    }

    fn postfix(&mut self) -> Option<Poly> {
        let mut v = self.atom()?;
        while self.eat('!') {
            let n = v.as_rational()?;
            if !n.is_integer() || n.is_negative() {
                return None;
            }
            let n = n.to_integer().to_u32().filter(|n| *n <= 1000)?;
            let mut f = BigInt::one();
            for k in 2..=n {
                f *= k;
            }
            v = Poly::constant(BigRational::from_integer(f));
        }
        Some(v)
    }

    /// A `{...}` group or a single token, as LaTeX reads macro arguments
    /// (`\frac12`, `\sqrt3`).
    fn argument(&mut self) -> Option<Poly> {
        match self.peek()?.clone() {
            Tok::Op('{') => {
                self.pos += 1;
                let v = self.expr()?;
                self.eat('}').then_some(v)
            }
            Tok::Num(n) => {
                // A bare argument is one digit in TeX; "\sqrt34" is ambiguous.
                if !n.is_integer() || n.to_integer() >= BigInt::from(10) {
                    return None;
                }
                self.pos += 1;
                Some(Poly::constant(n))
            }
            Tok::Sym(s) => {
                self.pos += 1;
                Some(Poly::symbol(&s))
            }
            Tok::Op('(') => self.atom(),
            _ => None,
        }
    }

    fn atom(&mut self) -> Option<Poly> {
        match self.peek()?.clone() {
            Tok::Num(n) => {
                self.pos += 1;
                Some(Poly::constant(n))
            }
            Tok::Sym(s) => {
                self.pos += 1;
                Some(Poly::symbol(&s))
            }
            Tok::Op(open @ ('(' | '[' | '{')) => {
                self.pos += 1;
                let v = self.expr()?;
                let close = match open {
                    '(' => ')',
                    '[' => ']',
                    _ => '}',
                };
                self.eat(close).then_some(v)
            }
            Tok::Cmd(c) => {
                self.pos += 1;
                match c.as_str() {
                    "frac" => {
                        let (num, den) = self.two_arguments()?;
                        num.mul(&den.inverse()?)
                    }
                    "binom" => {
                        let (n, k) = self.two_arguments()?;
                        binom(&n.as_rational()?, &k.as_rational()?)
                    }
                    "sqrt" => {
                        let mut n = 2u32;
                        if self.eat('[') {
                            let idx = self.expr()?.as_rational()?;
                            if !self.eat(']') || !idx.is_integer() {
                                return None;
                            }
                            n = idx.to_integer().to_u32().filter(|n| (2..=64).contains(n))?;
                        }
                        self.argument()?.nth_root(n)
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// Two macro arguments; `\frac12` tokenises as the number 12 and is split
    /// into its two digits, as TeX would read it.
    fn two_arguments(&mut self) -> Option<(Poly, Poly)> {
        if let Some(Tok::Num(n)) = self.peek().cloned() {
            let text = n.to_integer().to_string();
            if n.is_integer() && text.len() == 2 {
                self.pos += 1;
                let a = BigRational::from_integer(BigInt::from(text.as_bytes()[0] - b'0'));
                let b = BigRational::from_integer(BigInt::from(text.as_bytes()[1] - b'0'));
                return Some((Poly::constant(a), Poly::constant(b)));
            }
        }
        let a = self.argument()?;
        let b = self.argument()?;
        Some((a, b))
    }
}

fn binom(n: &BigRational, k: &BigRational) -> Option<Poly> {
    if !n.is_integer() || !k.is_integer() {
        return None;
    }
    let n = n
        .to_integer()
        .to_i64()
        .filter(|n| (0..=10_000).contains(n))?;
    let k = k.to_integer().to_i64()?;
    if k < 0 || k > n {
        return Some(Poly::constant(BigRational::zero()));
    }
    let mut acc = BigInt::one();
    for j in 0..k {
        acc = acc * BigInt::from(n - j) / BigInt::from(j + 1);
    }
    Some(Poly::constant(BigRational::from_integer(acc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eq(a: &str, b: &str) -> bool {
        parse_expr(a).expect(a) == parse_expr(b).expect(b)
    }

    #[test]
    fn rationals_are_exact() {
        assert!(eq("0.5", "\\frac{1}{2}"));
        assert!(eq("1/2", "\\frac12"));
        assert!(eq("-\\frac{3}{4}", "-0.75"));
        assert!(eq("27.0", "27"));
        assert!(!eq("0.333", "1/3"));
    }

    #[test]
    fn roots_and_symbols() {
        assert!(eq("2\\sqrt{3}", "\\sqrt{12}"));
        assert!(eq("\\frac{\\sqrt3}{2}", "\\frac{\\sqrt{3}}{2}"));
        assert!(eq("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}"));
        assert!(eq("\\sqrt{2}\\sqrt{6}", "2\\sqrt{3}"));
        assert!(eq("\\sqrt[3]{27}", "3"));
        assert!(eq("x+1", "1+x"));
        assert!(eq("2x^2-18", "2(x-3)(x+3)"));
        assert!(eq("3*\\sqrt{13}", "3\\sqrt{13}"));
        assert!(eq("\\frac{\\pi}{2}", "\\pi/2"));
        assert!(eq("i^2", "-1"));
        assert!(eq("(1+i)^2", "2i"));
        assert!(eq("2^{10}", "1024"));
        assert!(eq("5!", "120"));
        assert!(eq("\\binom{5}{2}", "10"));
        assert!(eq("x_1+x_{2}", "x_2+x_1"));
    }

    #[test]
    fn outside_the_fragment_is_none() {
        assert!(parse_expr("\\sin x").is_none());
        assert!(parse_expr("\\frac{1}{x+1}").is_none());
        assert!(parse_expr("Evelyn").is_none());
        assert!(parse_expr("\\{1,2\\}").is_none());
        assert!(parse_expr("\\sqrt{x}").is_none());
        assert!(parse_expr("2^{100000}").is_none());
    }

    #[test]
    fn square_free_parts() {
        let sf = |n: u64| {
            let (s, f) = square_free(&BigUint::from(n)).unwrap();
            (s.to_u64().unwrap(), f.to_u64().unwrap())
        };
        assert_eq!(sf(12), (2, 3));
        assert_eq!(sf(72), (6, 2));
        assert_eq!(sf(1_000_003 * 1_000_003 * 2), (1_000_003, 2));
        assert_eq!(sf(1_000_003 * 1_000_033), (1, 1_000_003 * 1_000_033));
    }
}
