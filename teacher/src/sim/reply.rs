//! What the simulated teacher says: R1-shaped working for a problem of the family,
//! with faults drawn from a per-sample RNG.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::SimulatedTeacher;
use super::arithmetic::{Op, Problem};

/// Phrasings of the working. Choices of one prompt get different ones, so that two
/// samples that are not duplicates do not look like near duplicates either; there are
/// few, because a small student learns consistent traces best.
const STYLES: u64 = 3;

/// One simulated sample.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// The working, without `<think>` tags.
    pub reasoning: String,
    /// The short answer after the reasoning, with `\boxed{N}`; empty when truncated.
    pub answer: String,
    /// `"stop"`, or `"length"` when cut off.
    pub finish_reason: &'static str,
}

/// Which faults a sample has; drawn together so that raising one rate only changes
/// the samples whose draw crosses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Faults {
    truncated: bool,
    wrong: bool,
    mixed_language: bool,
    duplicate: bool,
}

/// An RNG that depends only on the simulator seed, the prompt, the choice and the
/// request seed, so a sample is reproducible whatever else is in flight.
fn rng_for(sim: &SimulatedTeacher, prompt: &str, choice: u32, seed: Option<u64>) -> ChaCha8Rng {
    let mut key = Vec::with_capacity(prompt.len() + 16);
    key.extend_from_slice(prompt.as_bytes());
    key.push(0);
    key.extend_from_slice(&choice.to_le_bytes());
    match seed {
        Some(s) => {
            key.push(1);
            key.extend_from_slice(&s.to_le_bytes());
        }
        None => key.push(0),
    }
    ChaCha8Rng::seed_from_u64(xxh3_64_with_seed(&key, sim.seed))
}

fn draw_faults(sim: &SimulatedTeacher, rng: &mut impl Rng) -> Faults {
    let mut draw = |rate: f64| rng.random::<f64>() < rate;
    Faults {
        truncated: draw(sim.truncated),
        wrong: draw(sim.wrong),
        mixed_language: draw(sim.mixed_language),
        duplicate: draw(sim.duplicate),
    }
}

/// The simulated teacher's answer to `prompt` (the last user message) for choice
/// `choice` of a request with `seed`, cut to `max_tokens` (estimated as 4 bytes each)
/// like a real server. A prompt outside the family gets a fixed reply without a boxed
/// answer, so verification rejects it.
pub fn reply(
    sim: &SimulatedTeacher,
    prompt: &str,
    choice: u32,
    seed: Option<u64>,
    max_tokens: Option<u32>,
) -> Sample {
    let mut rng = rng_for(sim, prompt, choice, seed);
    let faults = draw_faults(sim, &mut rng);
    if choice > 0 && faults.duplicate {
        return reply(sim, prompt, 0, seed, max_tokens);
    }
    // Drawn whether used or not, so the rates do not shift each other's draws.
    let slip_at = rng.random::<u32>() as usize;
    let slip_by: i64 = rng.random_range(1..=3) * if rng.random_bool(0.5) { -1 } else { 1 };
    let mixed_lines: usize = rng.random_range(1..=2);
    let mixed_from = rng.random::<u32>() as usize;

    let Some(problem) = find_problem(prompt) else {
        return fit(outside_family(), max_tokens);
    };
    // Consecutive choices differ in style, also as the single-sample requests of a
    // server without `n`, whose seeds are consecutive.
    let style = (u64::from(choice).wrapping_add(seed.unwrap_or(0)) % STYLES) as usize;
    let slip = faults
        .wrong
        .then_some((slip_at % problem.ops.len(), slip_by));
    let values = values(&problem, slip);
    let mut lines = working(&problem, &values, style);
    if faults.mixed_language {
        // Step lines sit between the two opening lines and the conclusion.
        let steps = problem.ops.len();
        for k in 0..mixed_lines.min(steps) {
            let step = (mixed_from + k) % steps;
            lines[2 + step] = chinese_step(problem.ops[step], values[step], values[step + 1]);
        }
    }
    let result = values[values.len() - 1];
    let mut sample = Sample {
        reasoning: lines.join("\n"),
        answer: format!(
            "{} has {result} {} now.\n\n**Answer:** \\boxed{{{result}}}",
            problem.name, problem.item
        ),
        finish_reason: "stop",
    };
    if faults.truncated {
        let half = sample.reasoning.len() / 2;
        cut(&mut sample, half);
    }
    fit(sample, max_tokens)
}

/// The problem in a rendered prompt: the whole text (the default template appends its
/// instruction after the problem's question, where parsing stops) or any one line.
fn find_problem(prompt: &str) -> Option<Problem> {
    Problem::parse(prompt).or_else(|| prompt.lines().find_map(Problem::parse))
}

/// The running totals: the start, then the value after each step, with `slip` adding
/// an error to one step that the later steps build on. A slip that would take the
/// count below zero is made upward instead.
fn values(problem: &Problem, slip: Option<(usize, i64)>) -> Vec<i64> {
    let run = |slip: Option<(usize, i64)>| {
        let mut v = vec![problem.start];
        for (i, &op) in problem.ops.iter().enumerate() {
            let prev = v[i];
            let mut next = match op {
                Op::Add(n) => prev + n,
                Op::Sub(n) => prev - n,
                Op::Mul(n) => prev * n,
            };
            if let Some((at, by)) = slip
                && at == i
            {
                next += by;
            }
            v.push(next);
        }
        v
    };
    let v = run(slip);
    match slip {
        Some((at, by)) if v.iter().any(|&x| x < 0) => run(Some((at, by.abs()))),
        _ => v,
    }
}

/// Reasoning lines: two opening lines, one line per step, a conclusion. Style 0 is what
/// a single sample gets; style 1 says the same with other connecting words (so a second
/// sample is not a near duplicate of the first, yet a small student trained on both
/// still sees one way of working); style 2, for third and later samples, words it anew.
fn working(p: &Problem, values: &[i64], style: usize) -> Vec<String> {
    let (name, pronoun, item) = (&p.name, &p.pronoun, &p.item);
    let result = values[values.len() - 1];
    let mut lines = match style {
        0 => vec![
            "Okay, let me work through this step by step.".to_string(),
            format!("{name} starts with {} {item}.", p.start),
        ],
        1 => vec![
            format!("Let me count {name}'s {item} one step at a time."),
            format!("{name} has {} {item} at first.", p.start),
        ],
        _ => vec![
            format!("I'll follow each change to {name}'s {item} in order."),
            format!("First count: {}.", p.start),
        ],
    };
    for (i, &op) in p.ops.iter().enumerate() {
        let (v, next) = (values[i], values[i + 1]);
        let says = match op {
            Op::Add(n) => format!("{pronoun} buys {n} more"),
            Op::Sub(n) => format!("{pronoun} gives away {n}"),
            Op::Mul(2) => format!("{pronoun} doubles them"),
            Op::Mul(n) => format!("{pronoun} multiplies them by {n}"),
        };
        let sum = match op {
            Op::Add(n) => format!("{v} + {n} = {next}"),
            Op::Sub(n) => format!("{v} - {n} = {next}"),
            Op::Mul(n) => format!("{v} * {n} = {next}"),
        };
        lines.push(match (style, op) {
            (0, _) => format!("{says}, so {sum}."),
            (1, Op::Sub(_)) => format!("{says}, which leaves {sum}."),
            (1, _) => format!("{says}, which makes {sum}."),
            (_, Op::Add(n)) => format!("Adding {n} gives {sum}."),
            (_, Op::Sub(n)) => format!("Taking away {n} gives {sum}."),
            (_, Op::Mul(n)) => format!("Multiplying by {n} gives {sum}."),
        });
    }
    lines.push(match style {
        0 => format!("So {name} has {result} {item} now."),
        1 => format!("That leaves {name} with {result} {item}."),
        _ => format!("The final count is {result} {item}."),
    });
    lines
}

fn chinese_step(op: Op, v: i64, next: i64) -> String {
    match op {
        Op::Add(n) => format!("所以 {v} + {n} = {next}。"),
        Op::Sub(n) => format!("所以 {v} - {n} = {next}。"),
        Op::Mul(n) => format!("所以 {v} * {n} = {next}。"),
    }
}

fn outside_family() -> Sample {
    Sample {
        reasoning: "This prompt is not one of the synthetic arithmetic word problems \
                    (\"Mia has 12 pencils. She buys 5 more. ... How many pencils does Mia \
                    have now?\") that this simulator knows. It is a simulator for demos \
                    and tests, not a teacher, and cannot reason about anything else."
            .into(),
        answer: "The simulator can only solve its own arithmetic word problems.".into(),
        finish_reason: "stop",
    }
}

/// Cuts the reasoning at the last word boundary at or before byte `at`, drops the
/// answer and marks the sample as stopped by the length limit.
fn cut(s: &mut Sample, at: usize) {
    let mut end = at.min(s.reasoning.len());
    while !s.reasoning.is_char_boundary(end) {
        end -= 1;
    }
    let end = s.reasoning[..end].rfind(char::is_whitespace).unwrap_or(end);
    s.reasoning.truncate(end);
    s.reasoning.truncate(s.reasoning.trim_end().len());
    s.answer.clear();
    s.finish_reason = "length";
}

/// Cuts a sample that would exceed `max_tokens`, as a real server does.
fn fit(mut s: Sample, max_tokens: Option<u32>) -> Sample {
    if let Some(max) = max_tokens
        && tokens(&s.reasoning) + tokens(&s.answer) > max
    {
        cut(&mut s, max as usize * 4);
    }
    s
}

/// The token count the simulator reports: a quarter of the bytes, rounded up.
pub(crate) fn tokens(text: &str) -> u32 {
    u32::try_from(text.len().div_ceil(4)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;
    use crate::sim::SimTask;
    use crate::sim::arithmetic::split;

    const INSTRUCTION: &str =
        "\nPlease reason step by step, and put your final answer within \\boxed{}.";

    fn sim() -> SimulatedTeacher {
        SimulatedTeacher::new(SimTask::Arithmetic)
    }

    fn prompts(n: usize) -> Vec<(String, i64)> {
        split(3, n, 0, 0)
            .0
            .into_iter()
            .map(|r| {
                (
                    format!("{}{INSTRUCTION}", r.problem),
                    r.answer.parse().unwrap(),
                )
            })
            .collect()
    }

    fn boxed(s: &Sample) -> Option<i64> {
        let rest = s.answer.split("\\boxed{").nth(1)?;
        rest.split('}').next()?.parse().ok()
    }

    #[test]
    fn the_problem_is_found_in_a_rendered_prompt() {
        let text = "Mia has 12 pencils. She buys 5 more. She doubles them. How many pencils does Mia have now?";
        let p = find_problem(&format!("{text}{INSTRUCTION}")).unwrap();
        assert_eq!(p.answer(), 34);
        assert_eq!(
            find_problem(&format!("Solve this:\n{text}\nThanks.")),
            Some(p)
        );
        assert_eq!(find_problem("What is 2 + 2?"), None);
    }

    #[test]
    fn clean_samples_are_correct_and_r1_shaped() {
        for (prompt, answer) in prompts(50) {
            for choice in 0..3 {
                let s = reply(&sim(), &prompt, choice, None, None);
                assert_eq!(s.finish_reason, "stop");
                assert_eq!(boxed(&s), Some(answer), "{}\n{}", s.reasoning, s.answer);
                assert!(s.reasoning.lines().count() >= 5, "{}", s.reasoning);
                assert!(s.reasoning.is_ascii());
            }
        }
        let s = reply(
            &sim(),
            "Mia has 12 pencils. She buys 5 more. How many pencils does Mia have now?",
            0,
            None,
            None,
        );
        assert_eq!(
            s.reasoning,
            "Okay, let me work through this step by step.\nMia starts with 12 pencils.\n\
             She buys 5 more, so 12 + 5 = 17.\nSo Mia has 17 pencils now."
        );
        assert_eq!(
            s.answer,
            "Mia has 17 pencils now.\n\n**Answer:** \\boxed{17}"
        );
    }

    #[test]
    fn samples_depend_only_on_seed_prompt_choice_and_request_seed() {
        let mut a = sim();
        a.wrong = 0.3;
        a.mixed_language = 0.3;
        a.truncated = 0.3;
        a.duplicate = 0.3;
        let mut b = a.clone();
        b.seed = 1;
        let (mut same, mut differ) = (0, 0);
        for (prompt, _) in prompts(100) {
            for choice in 0..2 {
                let x = reply(&a, &prompt, choice, Some(5), None);
                assert_eq!(x, reply(&a, &prompt, choice, Some(5), None));
                if x == reply(&b, &prompt, choice, Some(5), None) {
                    same += 1;
                } else {
                    differ += 1;
                }
            }
        }
        // Clean samples agree across seeds; faults land elsewhere.
        assert!(same > 0 && differ > 50, "{same} {differ}");
    }

    #[test]
    fn each_rate_at_one_has_its_effect() {
        let (prompt, answer) = &prompts(1)[0];
        let with = |f: &dyn Fn(&mut SimulatedTeacher)| {
            let mut s = sim();
            f(&mut s);
            s
        };

        let s = reply(&with(&|s| s.wrong = 1.0), prompt, 0, None, None);
        let got = boxed(&s).unwrap();
        assert_ne!(got, *answer);
        assert!(s.reasoning.contains(&format!(" {got} ")), "{}", s.reasoning);

        let s = reply(&with(&|s| s.mixed_language = 1.0), prompt, 0, None, None);
        assert!(s.reasoning.contains("所以"), "{}", s.reasoning);
        assert_eq!(boxed(&s), Some(*answer));

        let full = reply(&sim(), prompt, 0, None, None);
        let s = reply(&with(&|s| s.truncated = 1.0), prompt, 0, None, None);
        assert_eq!((s.finish_reason, s.answer.as_str()), ("length", ""));
        assert!(full.reasoning.starts_with(&s.reasoning));
        assert!(full.reasoning[s.reasoning.len()..].starts_with(char::is_whitespace));
        let half = full.reasoning.len() / 2;
        assert!((half - 20..=half).contains(&s.reasoning.len()));

        let dup = with(&|s| s.duplicate = 1.0);
        assert_eq!(
            reply(&dup, prompt, 2, Some(9), None),
            reply(&dup, prompt, 0, Some(9), None)
        );
        assert_ne!(
            reply(&sim(), prompt, 1, Some(9), None),
            reply(&sim(), prompt, 0, Some(9), None)
        );

        let s = reply(&sim(), prompt, 0, None, Some(10));
        assert_eq!(s.finish_reason, "length");
        assert!(s.reasoning.len() <= 40 && s.answer.is_empty());
    }

    #[test]
    fn rates_are_met_statistically() {
        let mut s = sim();
        s.wrong = 0.2;
        s.mixed_language = 0.2;
        s.truncated = 0.2;
        s.duplicate = 0.2;
        let mut counts = [0usize; 4];
        for (prompt, answer) in prompts(1000) {
            let first = reply(&s, &prompt, 0, None, None);
            let second = reply(&s, &prompt, 1, None, None);
            counts[0] += usize::from(first.finish_reason == "length");
            counts[1] +=
                usize::from(first.finish_reason == "stop" && boxed(&first) != Some(answer));
            counts[2] += usize::from(first.reasoning.contains("所以"));
            counts[3] += usize::from(second == first);
        }
        // Truncation hides the answer and sometimes the Chinese line, so wrong and
        // mixed samples show in about 0.8 of their draws.
        let [truncated, wrong, mixed, dup] = counts;
        assert!((150..=250).contains(&truncated), "{counts:?}");
        assert!((110..=210).contains(&wrong), "{counts:?}");
        assert!((120..=250).contains(&mixed), "{counts:?}");
        assert!((150..=250).contains(&dup), "{counts:?}");
    }

    /// Word 5-gram Jaccard after the dedupe stage's normalisation.
    fn jaccard(a: &str, b: &str) -> f64 {
        let grams = |t: &str| -> HashSet<Vec<String>> {
            let norm: String = t
                .chars()
                .map(|c| {
                    if c.is_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        ' '
                    }
                })
                .collect();
            let words: Vec<String> = norm.split_whitespace().map(str::to_owned).collect();
            words.windows(5).map(<[String]>::to_vec).collect()
        };
        let (a, b) = (grams(a), grams(b));
        a.intersection(&b).count() as f64 / a.union(&b).count() as f64
    }

    #[test]
    fn choices_that_are_not_duplicates_are_not_near_duplicates() {
        let mut worst: f64 = 0.0;
        for (prompt, _) in prompts(300) {
            let texts: Vec<String> = (0..3)
                .map(|c| {
                    let s = reply(&sim(), &prompt, c, Some(11), None);
                    format!("{}\n{}", s.reasoning, s.answer)
                })
                .collect();
            for i in 0..3 {
                for j in i + 1..3 {
                    worst = worst.max(jaccard(&texts[i], &texts[j]));
                }
            }
        }
        assert!(worst < 0.5, "worst 5-gram Jaccard {worst}");
    }
}
