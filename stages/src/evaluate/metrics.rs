//! Benchmark metrics over k samples per question, as DeepSeek reports them:
//! `pass@1` (mean correctness over the k samples), unbiased `pass@K` and `cons@K`
//! (majority vote over normalised answers), each with its standard error across
//! questions.

use std::collections::HashMap;

use serde::Serialize;

/// One question's samples: whether each was correct, and its vote key (the
/// normalised extracted answer; `None` when no answer was found).
#[derive(Debug, Clone, Default)]
pub struct Question {
    /// Correctness of each sample, in sample order.
    pub correct: Vec<bool>,
    /// Normalised answer of each sample, in sample order.
    pub votes: Vec<Option<String>>,
}

/// A metric's value across questions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// `pass@1`, `pass@K` or `cons@K`.
    pub metric: String,
    /// Mean over questions, in [0, 1].
    pub value: f64,
    /// Standard error of that mean across questions.
    pub stderr: f64,
    /// Questions scored.
    pub questions: usize,
}

/// The unbiased estimator of pass@k from `n` samples with `c` correct:
/// 1 − C(n−c, k) / C(n, k), computed as a product to stay exact for large n.
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    assert!(
        k >= 1 && k <= n && c <= n,
        "pass@{k} needs 1 <= k <= n={n}, c={c} <= n"
    );
    if n - c < k {
        return 1.0;
    }
    // C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i)
    let ratio: f64 = ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product();
    1.0 - ratio
}

/// Majority vote: the most frequent answer wins, ties going to the one that
/// appeared first; samples without an answer do not vote. Returns the index of a
/// sample carrying the winning answer.
pub fn majority(votes: &[Option<String>]) -> Option<usize> {
    let mut counts: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, v) in votes.iter().enumerate() {
        if let Some(v) = v {
            counts.entry(v.as_str()).or_insert((0, i)).0 += 1;
        }
    }
    counts
        .values()
        .max_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|&(_, first)| first)
}

fn mean_and_stderr(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// pass@1, and with k > 1 samples also pass@k and cons@k. Every question must have
/// the same number of samples `k`.
pub fn score(questions: &[Question]) -> Vec<Score> {
    let Some(k) = questions.first().map(|q| q.correct.len()) else {
        return Vec::new();
    };
    assert!(
        questions
            .iter()
            .all(|q| q.correct.len() == k && q.votes.len() == k),
        "every question needs {k} samples"
    );
    let per_question =
        |f: &dyn Fn(&Question) -> f64| -> Vec<f64> { questions.iter().map(f).collect() };
    let metric = |name: String, values: Vec<f64>| {
        let (value, stderr) = mean_and_stderr(&values);
        Score {
            metric: name,
            value,
            stderr,
            questions: questions.len(),
        }
    };
    let correct = |q: &Question| q.correct.iter().filter(|&&c| c).count();
    let mut out = vec![metric(
        "pass@1".into(),
        per_question(&|q| correct(q) as f64 / k as f64),
    )];
    if k > 1 {
        out.push(metric(
            format!("pass@{k}"),
            per_question(&|q| pass_at_k(k, correct(q), k)),
        ));
        out.push(metric(
            format!("cons@{k}"),
            per_question(&|q| match majority(&q.votes) {
                Some(i) if q.correct[i] => 1.0,
                _ => 0.0,
            }),
        ));
    }
    out
}

/// How a target's samples ended: the share that stopped on the token budget
/// (`finish_reason` "length") and the mean tokens generated, each over the samples
/// whose finish reason or token count is known (`None` when none is).
pub fn lengths<'a>(
    samples: impl IntoIterator<Item = (Option<&'a str>, Option<i64>)>,
) -> (Option<f64>, Option<f64>) {
    let (mut finished, mut cut, mut counted, mut tokens) = (0usize, 0usize, 0usize, 0i64);
    for (finish, n) in samples {
        if let Some(f) = finish {
            finished += 1;
            cut += usize::from(f == "length");
        }
        if let Some(n) = n {
            counted += 1;
            tokens += n;
        }
    }
    (
        (finished > 0).then(|| cut as f64 / finished as f64),
        (counted > 0).then(|| tokens as f64 / counted as f64),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unbiased_estimator_matches_hand_computed_values() {
        // n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
        assert!((pass_at_k(5, 2, 2) - 0.7).abs() < 1e-12);
        // n=4, c=1, k=1: c/n
        assert!((pass_at_k(4, 1, 1) - 0.25).abs() < 1e-12);
        // n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252
        assert!((pass_at_k(10, 3, 5) - (1.0 - 21.0 / 252.0)).abs() < 1e-12);
        // all wrong, all right, and fewer wrong than k
        assert_eq!(pass_at_k(8, 0, 4), 0.0);
        assert_eq!(pass_at_k(8, 8, 4), 1.0);
        assert_eq!(pass_at_k(8, 6, 4), 1.0);
        // k = n: correct iff any sample is
        assert_eq!(pass_at_k(3, 1, 3), 1.0);
    }

    #[test]
    fn lengths_count_only_what_is_known() {
        let samples = [
            (Some("length"), Some(100)),
            (Some("stop"), Some(20)),
            (None, None),
            (Some("length"), Some(90)),
            (Some("stop"), None),
        ];
        assert_eq!(lengths(samples), (Some(0.5), Some(70.0)));
        assert_eq!(lengths([(None, None)]), (None, None));
    }

    #[test]
    fn majority_prefers_the_most_frequent_then_the_first() {
        let v = |s: &[Option<&str>]| s.iter().map(|o| o.map(str::to_string)).collect::<Vec<_>>();
        assert_eq!(majority(&v(&[Some("1"), Some("2"), Some("2")])), Some(1));
        assert_eq!(majority(&v(&[Some("3"), Some("4")])), Some(0));
        assert_eq!(majority(&v(&[None, Some("4"), None])), Some(1));
        assert_eq!(majority(&v(&[None, None])), None);
    }

    #[test]
    fn scores_average_over_questions() {
        let q = |correct: &[bool], votes: &[&str]| Question {
            correct: correct.to_vec(),
            votes: votes
                .iter()
                .map(|v| (!v.is_empty()).then(|| v.to_string()))
                .collect(),
        };
        let questions = vec![
            q(&[true, false, false, false], &["1", "2", "2", ""]), // vote 2: wrong
            q(&[true, true, true, false], &["5", "5", "5", "6"]),  // vote 5: right
        ];
        let s = score(&questions);
        assert_eq!(s[0].metric, "pass@1");
        assert!((s[0].value - (0.25 + 0.75) / 2.0).abs() < 1e-12);
        // stderr of [0.25, 0.75]: sd = 0.3536, / sqrt(2) = 0.25
        assert!((s[0].stderr - 0.25).abs() < 1e-12);
        assert_eq!(s[1].metric, "pass@4");
        assert_eq!(s[1].value, 1.0);
        assert_eq!(s[2].metric, "cons@4");
        assert_eq!(s[2].value, 0.5);
        let single = score(&[q(&[true], &["1"]), q(&[false], &["2"])]);
        assert_eq!(single.len(), 1);
        assert_eq!(single[0].value, 0.5);
    }
}
