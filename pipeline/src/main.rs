//! The `distill` binary.

/// mimalloc keeps freed blocks for reuse where glibc unmaps large ones, so the same
/// activations allocated every training step stop costing page faults (~8% of a CPU step).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (the index in its `mimalloc.h` enum; libmimalloc-sys
/// names no constant for it). A test below checks it against the bundled library.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> std::process::ExitCode {
    // Even mimalloc gave freed memory back to the OS 10 ms after a free, so a training step
    // re-faulted (and the kernel re-zeroed) the pages its previous step had freed: 1.3-1.6x
    // a CPU step's time in `cargo bench --bench train`. Memory then stays at its peak until
    // the process exits, as PyTorch's caching allocators keep theirs.
    // SAFETY: sets one process-wide option, which mimalloc allows at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    distill_pipeline::cli::main()
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    /// Run by `purge_delay_index_is_mimallocs` in a child process started with
    /// `MIMALLOC_PURGE_DELAY` set: prints what the option index reads.
    #[test]
    #[ignore = "run by purge_delay_index_is_mimallocs"]
    fn print_purge_delay() {
        // SAFETY: reads one option.
        let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        println!("purge_delay={v}");
    }

    /// mimalloc reads `MIMALLOC_PURGE_DELAY` from the environment into `mi_option_purge_delay`:
    /// the index the binary sets must read that value back.
    #[test]
    fn purge_delay_index_is_mimallocs() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "tests::print_purge_delay",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env("MIMALLOC_PURGE_DELAY", "1234")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("purge_delay=1234"), "{stdout}");
    }
}
