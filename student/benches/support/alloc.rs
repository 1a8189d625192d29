//! The allocator the `distill` binary uses, set up as it sets it up (`pipeline/src/main.rs`), so
//! the benchmarks measure what users get.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Keeps freed memory instead of returning it to the OS (mimalloc's `mi_option_purge_delay`,
/// index 15, checked by a test of the `distill` binary).
pub fn keep_freed_memory() {
    // SAFETY: sets one process-wide option, which mimalloc allows at any time.
    unsafe { libmimalloc_sys::mi_option_set(15, -1) };
}
