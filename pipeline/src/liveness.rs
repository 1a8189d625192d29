//! Is the process recorded as a run's owner still alive?
//!
//! A run is claimed by the process executing it. A crashed owner leaves its pid
//! behind; this decides whether that claim still stands.

use std::time::Duration;

/// A heartbeat older than this means the owner is gone, where the OS cannot tell.
const STALE_AFTER: Duration = Duration::from_secs(30);

/// Whether `pid` (the recorded owner, last heard from at `heartbeat_at`) still runs.
pub fn is_alive(pid: i64, heartbeat_at: Option<i64>) -> bool {
    match proc_state(pid) {
        Some(alive) => alive,
        None => {
            heartbeat_at.is_some_and(|t| distill_db::now_ms() - t < STALE_AFTER.as_millis() as i64)
        }
    }
}

/// On Linux, `/proc` answers exactly: no entry, or a zombie, is a dead process.
/// Elsewhere `None`, and the heartbeat decides.
fn proc_state(pid: i64) -> Option<bool> {
    let proc = std::path::Path::new("/proc");
    if !proc.join("self").exists() {
        return None;
    }
    match std::fs::read_to_string(proc.join(pid.to_string()).join("stat")) {
        // The state field follows the parenthesised command name.
        Ok(stat) => Some(
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_none_or(|state| state != "Z" && state != "X"),
        ),
        Err(_) => Some(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_free_pid_is_not() {
        assert!(is_alive(std::process::id() as i64, None));
        // Above the kernel's pid_max, so never a live process.
        assert!(!is_alive(i32::MAX as i64, Some(distill_db::now_ms())));
    }
}
