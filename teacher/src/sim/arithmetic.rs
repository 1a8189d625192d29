//! A family of synthetic multi-step integer word problems ("Mia has 12 pencils. She
//! buys 5 more. She doubles them. How many pencils does Mia have now?") with their
//! answers: training and held-out data for demos and tests that need no
//! real teacher, small enough for a tiny student to learn on a CPU in minutes.
//!
//! Problems are generated from a seed and parsed back from their text, so a simulated
//! teacher can solve any problem of the family it is shown. This is a simulator for
//! demos and tests, never a teacher.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

const NAMES: &[(&str, &str)] = &[
    ("Mia", "She"),
    ("Leo", "He"),
    ("Ava", "She"),
    ("Sam", "He"),
    ("Zoe", "She"),
    ("Max", "He"),
    ("Ivy", "She"),
    ("Ben", "He"),
    ("Ana", "She"),
    ("Tom", "He"),
];
const ITEMS: &[&str] = &[
    "pencils", "apples", "stamps", "marbles", "books", "shells", "coins", "cards", "stickers",
    "beads",
];

/// One step of a problem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Op {
    /// Gains this many.
    Add(i64),
    /// Loses this many.
    Sub(i64),
    /// Multiplies by this factor (random problems only double; text of any factor parses).
    Mul(i64),
}

/// A word problem of the family.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Who holds the items.
    pub name: String,
    /// "He" or "She".
    pub pronoun: String,
    /// What they hold.
    pub item: String,
    /// How many at the start.
    pub start: i64,
    /// What happens, in order.
    pub ops: Vec<Op>,
}

impl Problem {
    /// A random problem: 2 or 3 steps that buy or give away 1 to 5 items or double them,
    /// starting from 2 to 12 and never going negative or past 60. The ranges are small on
    /// purpose: a student of a few million parameters learns this family from a few
    /// thousand traces in minutes on a CPU, which is what the quickstart needs.
    pub fn random(rng: &mut impl Rng) -> Problem {
        let (name, pronoun) = NAMES[rng.random_range(0..NAMES.len())];
        let item = ITEMS[rng.random_range(0..ITEMS.len())];
        let start = rng.random_range(2..=12);
        let mut value = start;
        let steps = rng.random_range(2..=3);
        let mut ops = Vec::with_capacity(steps);
        for _ in 0..steps {
            let op = match rng.random_range(0..3) {
                0 => Op::Add(rng.random_range(1..=5)),
                1 if value > 1 => Op::Sub(rng.random_range(1..=value.min(5))),
                1 => Op::Add(rng.random_range(1..=5)),
                _ if value <= 15 => Op::Mul(2),
                _ => Op::Sub(rng.random_range(1..=5)),
            };
            value = apply(value, op);
            ops.push(op);
        }
        Problem {
            name: name.into(),
            pronoun: pronoun.into(),
            item: item.into(),
            start,
            ops,
        }
    }

    /// The question as text.
    pub fn text(&self) -> String {
        let mut t = format!("{} has {} {}.", self.name, self.start, self.item);
        for op in &self.ops {
            t.push(' ');
            t.push_str(&self.pronoun);
            t.push_str(&match op {
                Op::Add(n) => format!(" buys {n} more."),
                Op::Sub(n) => format!(" gives away {n}."),
                Op::Mul(2) => " doubles them.".into(),
                Op::Mul(n) => format!(" multiplies them by {n}."),
            });
        }
        t.push_str(&format!(
            " How many {} does {} have now?",
            self.item, self.name
        ));
        t
    }

    /// The answer.
    pub fn answer(&self) -> i64 {
        self.ops.iter().fold(self.start, |v, &op| apply(v, op))
    }

    /// Reads a problem back from its text; `None` for text outside the family.
    pub fn parse(text: &str) -> Option<Problem> {
        let text = text.trim();
        let mut sentences = text.split_inclusive(['.', '?']).map(str::trim);
        let first: Vec<&str> = sentences
            .next()?
            .trim_end_matches('.')
            .split_whitespace()
            .collect();
        let [name, "has", start, item] = first.as_slice() else {
            return None;
        };
        let start: i64 = start.parse().ok()?;
        let mut pronoun = None;
        let mut ops = Vec::new();
        for s in sentences {
            if s.starts_with("How many") {
                break;
            }
            let words: Vec<&str> = s.trim_end_matches('.').split_whitespace().collect();
            let op = match words.as_slice() {
                [p, "buys", n, "more"] => {
                    pronoun.get_or_insert(*p);
                    Op::Add(n.parse().ok()?)
                }
                [p, "gives", "away", n] => {
                    pronoun.get_or_insert(*p);
                    Op::Sub(n.parse().ok()?)
                }
                [p, "doubles", "them"] => {
                    pronoun.get_or_insert(*p);
                    Op::Mul(2)
                }
                [p, "multiplies", "them", "by", n] => {
                    pronoun.get_or_insert(*p);
                    Op::Mul(n.parse().ok()?)
                }
                _ => return None,
            };
            ops.push(op);
        }
        Some(Problem {
            name: name.to_string(),
            pronoun: pronoun?.to_string(),
            item: item.to_string(),
            start,
            ops,
        })
    }
}

fn apply(v: i64, op: Op) -> i64 {
    match op {
        Op::Add(n) => v + n,
        Op::Sub(n) => v - n,
        Op::Mul(n) => v * n,
    }
}

/// A generated dataset record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Unique id (`train-17`, `test-3`, or `test-3` planted in the training set).
    pub id: String,
    /// The question.
    pub problem: String,
    /// The reference answer.
    pub answer: String,
}

/// Training and held-out test problems from one seed: `n_test` distinct test problems,
/// `n_train` training problems none of which repeats a test problem, plus `plant` of
/// the test problems planted in the training set (keeping their test ids) so that
/// decontamination has something to find.
pub fn split(seed: u64, n_train: usize, n_test: usize, plant: usize) -> (Vec<Record>, Vec<Record>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut seen = std::collections::HashSet::new();
    let mut fresh = |rng: &mut ChaCha8Rng| loop {
        let p = Problem::random(rng);
        if seen.insert(p.text()) {
            return p;
        }
    };
    let record = |id: String, p: &Problem| Record {
        id,
        problem: p.text(),
        answer: p.answer().to_string(),
    };
    let test: Vec<Record> = (0..n_test)
        .map(|i| record(format!("test-{i}"), &fresh(&mut rng)))
        .collect();
    let mut train: Vec<Record> = (0..n_train)
        .map(|i| record(format!("train-{i}"), &fresh(&mut rng)))
        .collect();
    for t in test.iter().take(plant) {
        let at = rng.random_range(0..=train.len());
        train.insert(at, t.clone());
    }
    (train, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_round_trip_through_their_text_and_solve() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..500 {
            let p = Problem::random(&mut rng);
            assert_eq!(Problem::parse(&p.text()).as_ref(), Some(&p), "{}", p.text());
            assert!((0..=60).contains(&p.answer()), "{}", p.text());
        }
        let p = Problem::parse(
            "Mia has 12 pencils. She buys 5 more. She gives away 3. She doubles them. How many pencils does Mia have now?",
        )
        .unwrap();
        assert_eq!(p.answer(), 28);
        assert_eq!(Problem::parse("What is 2 + 2?"), None);
    }

    #[test]
    fn splits_are_seeded_disjoint_and_planted() {
        let (train, test) = split(7, 200, 20, 3);
        assert_eq!((train.len(), test.len()), (203, 20));
        assert_eq!(split(7, 200, 20, 3), (train.clone(), test.clone()));
        let planted: Vec<_> = train.iter().filter(|r| r.id.starts_with("test-")).collect();
        assert_eq!(planted.len(), 3);
        let test_texts: std::collections::HashSet<_> = test.iter().map(|r| &r.problem).collect();
        let leaked = train
            .iter()
            .filter(|r| test_texts.contains(&r.problem))
            .count();
        assert_eq!(leaked, 3, "only the planted problems overlap");
    }
}
