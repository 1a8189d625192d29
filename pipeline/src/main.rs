//! The `distill` binary.

fn main() -> std::process::ExitCode {
    distill_pipeline::cli::main()
}
