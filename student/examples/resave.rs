//! Loads a checkpoint folder and saves it again in HF layout (used to check that transformers
//! loads what we write: `student/tests/fixtures/check_saved.py`).
//!
//! `cargo run -p distill-student --example resave -- SRC DST [f32|bf16] [MAX_SHARD_BYTES]`

use distill_student::weights::parse_dtype;
use distill_student::{CpuBackend, DType, SaveOptions, Student};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [src, dst, rest @ ..] = args.as_slice() else {
        return Err("usage: resave SRC DST [f32|bf16] [MAX_SHARD_BYTES]".into());
    };
    let dtype = match rest.first() {
        Some(d) => parse_dtype(d).ok_or(format!("unknown dtype {d}"))?,
        None => DType::F32,
    };
    let max_shard_bytes = match rest.get(1) {
        Some(n) => n.parse()?,
        None => SaveOptions::default().max_shard_bytes,
    };
    let student = Student::<CpuBackend>::load(src, &Default::default(), dtype)?;
    let saved = student.save(
        dst,
        SaveOptions {
            max_shard_bytes,
            ..Default::default()
        },
    )?;
    println!("{}", serde_json::to_string_pretty(&saved)?);
    Ok(())
}
