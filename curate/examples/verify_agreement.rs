//! Prints the verifier's agreement with independent graders on the shipped
//! real data; `--write` refreshes tests/fixtures/verify/disagreements.{json,md}
//! (keeping the hand-written explanations).
//!
//! Run: `cargo run -p distill-curate --example verify_agreement [-- --write]`

#[path = "../tests/support/agreement.rs"]
mod agreement;

fn main() {
    let reports = agreement::all_reports();
    for r in &reports {
        println!("{}", r.summary());
    }
    let items = agreement::merged(&reports);
    let missing = items.iter().filter(|d| d.explanation.is_empty()).count();
    println!(
        "{} flagged items ({} without an explanation)",
        items.len(),
        missing
    );
    if std::env::args().any(|a| a == "--write") {
        let json = serde_json::to_string_pretty(&items).expect("serialise") + "\n";
        std::fs::write(agreement::repo_path(agreement::DISAGREEMENTS_JSON), json)
            .expect("write json");
        std::fs::write(
            agreement::repo_path(agreement::DISAGREEMENTS_MD),
            agreement::markdown(&reports, &items),
        )
        .expect("write md");
        println!(
            "wrote {} and {}",
            agreement::DISAGREEMENTS_JSON,
            agreement::DISAGREEMENTS_MD
        );
    } else {
        for d in &items {
            println!(
                "{} {} gold={:?} pred={:?} ref={} verdict={} :: {}",
                d.set,
                d.key,
                d.gold,
                d.predicted,
                d.reference,
                d.verdict.as_str(),
                d.detail
            );
        }
    }
}
