//! Prints the memory planner's table for the published R1-distill students on H200s, and the
//! full plan of one configuration as JSON.
//!
//! `cargo run -p distill-student --example r1_distill_plan [-- MODEL_DIR_OR_CONFIG SEQ_LEN GPUS]`

use distill_student::plan::{H200_GIB, PlanSettings, plan_for, r1_distill_table};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [path, seq, gpus] = args.as_slice() {
        let settings = PlanSettings {
            seq_len: seq.parse().expect("SEQ_LEN is a number"),
            gpus: gpus.parse().expect("GPUS is a number"),
            ..PlanSettings::default()
        };
        match plan_for(path, &settings) {
            Ok(p) => println!(
                "{}",
                serde_json::to_string_pretty(&p).expect("plans serialise")
            ),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    print!("{}", r1_distill_table(H200_GIB));
}
