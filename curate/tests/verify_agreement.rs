//! The verifier against independent graders on real data. Every item where it
//! disagrees with the reference (or says Unknown) is listed, with a hand-written
//! explanation, in tests/fixtures/verify/disagreements.json; any behaviour change
//! on any item fails this test. Refresh with
//! `cargo run -p distill-curate --example verify_agreement -- --write`.

mod support;

use std::collections::BTreeSet;

use support::agreement::{all_reports, load_fixture};

#[test]
fn agreement_with_reference_graders_matches_the_fixture() {
    let reports = all_reports();
    for r in &reports {
        println!("{}", r.summary());
    }

    let r1 = &reports[0];
    assert_eq!(r1.total, 576);
    assert!(
        r1.agreement() >= 0.99,
        "r1-areal agreement {}",
        r1.agreement()
    );
    assert!(
        r1.unknown_rate() < 0.02,
        "r1-areal unknown rate {}",
        r1.unknown_rate()
    );
    for r in &reports[1..] {
        assert_eq!(r.total, 500);
        assert!(
            r.unknown_rate() < 0.02,
            "{} unknown rate {}",
            r.name,
            r.unknown_rate()
        );
    }

    let fixture = load_fixture();
    assert!(
        fixture.iter().all(|d| !d.explanation.trim().is_empty()),
        "every listed disagreement needs an explanation"
    );
    let expected: BTreeSet<(String, String, &str)> = fixture
        .iter()
        .map(|d| (d.set.clone(), d.key.clone(), d.verdict.as_str()))
        .collect();
    let actual: BTreeSet<(String, String, &str)> = reports
        .iter()
        .flat_map(|r| r.flagged.iter())
        .map(|d| (d.set.clone(), d.key.clone(), d.verdict.as_str()))
        .collect();
    let new: Vec<_> = actual.difference(&expected).collect();
    let gone: Vec<_> = expected.difference(&actual).collect();
    assert!(
        new.is_empty() && gone.is_empty(),
        "verifier behaviour changed; new disagreements {new:?}, resolved {gone:?}"
    );
}
