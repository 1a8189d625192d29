//! Endpoint pool: least-in-flight balancing, per-endpoint concurrency limits,
//! and resting of endpoints that keep failing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::Semaphore;

/// A snapshot of one endpoint's health and traffic.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointStatus {
    /// Base URL (credentials removed).
    pub url: String,
    /// Requests assigned to it and not yet finished, queued ones included.
    pub in_flight: usize,
    /// Successful attempts.
    pub successes: u64,
    /// Failed attempts blamed on the endpoint.
    pub failures: u64,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Times it has been rested since its last success; sets the next rest's length.
    pub rests: u32,
    /// Time left in the current rest, if resting.
    pub resting_for: Option<Duration>,
    /// Whether it answered `n > 1` with a single choice, so it now gets one request
    /// per sample.
    pub ignores_n: bool,
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    rests: u32,
    resting_until: Option<Instant>,
}

/// One base URL with its chat endpoint and limits.
#[derive(Debug)]
pub(crate) struct Endpoint {
    pub label: String,
    pub url: reqwest::Url,
    pub permits: Semaphore,
    load: AtomicUsize,
    successes: AtomicU64,
    failures: AtomicU64,
    /// Set for good once it answers `n > 1` with a single choice.
    ignores_n: AtomicBool,
    health: Mutex<Health>,
}

/// Rest policy copied from the config.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RestPolicy {
    pub failover_after: u32,
    pub rest: Duration,
    pub rest_max: Duration,
}

/// Endpoints sharing one model.
#[derive(Debug)]
pub(crate) struct Pool {
    pub endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    policy: RestPolicy,
}

/// Counts an assignment until dropped, so the load seen by later picks includes
/// requests still waiting for a permit.
pub(crate) struct LoadGuard<'a>(&'a Endpoint);

impl Drop for LoadGuard<'_> {
    fn drop(&mut self) {
        self.0.load.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub(crate) fn new(
        endpoints: Vec<(String, reqwest::Url)>,
        per_endpoint: usize,
        policy: RestPolicy,
    ) -> Self {
        let endpoints = endpoints
            .into_iter()
            .map(|(label, url)| Endpoint {
                label,
                url,
                permits: Semaphore::new(per_endpoint),
                load: AtomicUsize::new(0),
                successes: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                ignores_n: AtomicBool::new(false),
                health: Mutex::new(Health::default()),
            })
            .collect();
        Self {
            endpoints,
            next: AtomicUsize::new(0),
            policy,
        }
    }

    /// Picks the least-loaded endpoint that is not resting, preferring one other
    /// than `avoid` (the one that just failed). Ties rotate so idle pools spread
    /// sequential requests. If every endpoint rests, the one whose rest ends
    /// first is used: the retry backoff already paces such probes.
    pub(crate) fn pick(&self, avoid: Option<usize>) -> (usize, LoadGuard<'_>) {
        let len = self.endpoints.len();
        let chosen = if len == 1 {
            0
        } else {
            let now = Instant::now();
            let start = self.next.fetch_add(1, Ordering::Relaxed);
            let mut best: Option<(bool, usize, usize)> = None; // (is_avoided, load, index)
            let mut soonest: Option<(Instant, usize)> = None;
            for k in 0..len {
                let i = (start + k) % len;
                let ep = &self.endpoints[i];
                if let Some(until) = ep.health.lock().unwrap().resting_until.filter(|u| *u > now) {
                    if soonest.is_none_or(|(s, _)| until < s) {
                        soonest = Some((until, i));
                    }
                    continue;
                }
                let key = (avoid == Some(i), ep.load.load(Ordering::Relaxed), i);
                if best.is_none_or(|b| (key.0, key.1) < (b.0, b.1)) {
                    best = Some(key);
                }
            }
            match (best, soonest) {
                (Some((_, _, i)), _) => i,
                (None, Some((_, i))) => i,
                (None, None) => unreachable!("a pool has at least one endpoint"),
            }
        };
        let ep = &self.endpoints[chosen];
        ep.load.fetch_add(1, Ordering::Relaxed);
        (chosen, LoadGuard(ep))
    }

    pub(crate) fn record_success(&self, i: usize) {
        let ep = &self.endpoints[i];
        ep.successes.fetch_add(1, Ordering::Relaxed);
        let mut h = ep.health.lock().unwrap();
        if h.consecutive_failures != 0 || h.rests != 0 || h.resting_until.is_some() {
            *h = Health::default();
        }
    }

    /// Records a failure blamed on endpoint `i`; returns the rest it now starts,
    /// if any. Each failure at or past the threshold rests it again, longer.
    pub(crate) fn record_failure(&self, i: usize) -> Option<Duration> {
        let ep = &self.endpoints[i];
        ep.failures.fetch_add(1, Ordering::Relaxed);
        let mut h = ep.health.lock().unwrap();
        h.consecutive_failures += 1;
        let now = Instant::now();
        if h.consecutive_failures < self.policy.failover_after
            || h.resting_until.is_some_and(|u| u > now)
        {
            return None;
        }
        let factor = 2f64.powi(h.rests.min(30) as i32);
        let rest = self.policy.rest.mul_f64(factor).min(self.policy.rest_max);
        h.rests += 1;
        h.resting_until = Some(now + rest);
        Some(rest)
    }

    /// Records that endpoint `i` ignores `n`; true only the first time, so the
    /// caller says it once.
    pub(crate) fn mark_ignores_n(&self, i: usize) -> bool {
        !self.endpoints[i].ignores_n.swap(true, Ordering::Relaxed)
    }

    /// Whether every endpoint is known to ignore `n`, so asking for it is pointless.
    pub(crate) fn all_ignore_n(&self) -> bool {
        self.endpoints
            .iter()
            .all(|e| e.ignores_n.load(Ordering::Relaxed))
    }

    /// Labels of the endpoints known to ignore `n`, in `base_url` order.
    pub(crate) fn ignoring_n(&self) -> Vec<String> {
        self.endpoints
            .iter()
            .filter(|e| e.ignores_n.load(Ordering::Relaxed))
            .map(|e| e.label.clone())
            .collect()
    }

    pub(crate) fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|ep| {
                let h = ep.health.lock().unwrap();
                EndpointStatus {
                    url: ep.label.clone(),
                    in_flight: ep.load.load(Ordering::Relaxed),
                    successes: ep.successes.load(Ordering::Relaxed),
                    failures: ep.failures.load(Ordering::Relaxed),
                    consecutive_failures: h.consecutive_failures,
                    rests: h.rests,
                    resting_for: h.resting_until.filter(|u| *u > now).map(|u| u - now),
                    ignores_n: ep.ignores_n.load(Ordering::Relaxed),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize, rest_ms: u64) -> Pool {
        let eps = (0..n)
            .map(|i| {
                (
                    format!("http://e{i}/v1"),
                    reqwest::Url::parse(&format!("http://e{i}/v1/chat/completions")).unwrap(),
                )
            })
            .collect();
        let policy = RestPolicy {
            failover_after: 2,
            rest: Duration::from_millis(rest_ms),
            rest_max: Duration::from_millis(rest_ms * 3),
        };
        Pool::new(eps, 4, policy)
    }

    #[test]
    fn least_in_flight_with_rotation() {
        let p = pool(3, 1000);
        let (a, _ga) = p.pick(None);
        let (b, _gb) = p.pick(None);
        let (c, _gc) = p.pick(None);
        let mut all = vec![a, b, c];
        all.sort();
        assert_eq!(
            all,
            vec![0, 1, 2],
            "each endpoint gets one before any gets two"
        );
        drop(_gb);
        assert_eq!(
            p.pick(None).0,
            b,
            "the endpoint that finished is least loaded"
        );
    }

    #[test]
    fn avoid_is_a_preference() {
        let p = pool(2, 1000);
        for _ in 0..4 {
            assert_eq!(p.pick(Some(0)).0, 1);
        }
        let single = pool(1, 1000);
        assert_eq!(single.pick(Some(0)).0, 0);
    }

    #[test]
    fn rests_after_threshold_with_growing_rests_and_resets_on_success() {
        let p = pool(2, 1000);
        assert_eq!(p.record_failure(0), None);
        assert_eq!(p.record_failure(0), Some(Duration::from_millis(1000)));
        for _ in 0..6 {
            assert_eq!(p.pick(None).0, 1, "resting endpoint is skipped");
        }
        // Failures during a rest (requests already in flight) do not extend it.
        assert_eq!(p.record_failure(0), None);
        let s = &p.status()[0];
        assert!(s.resting_for.is_some() && s.rests == 1 && s.consecutive_failures == 3);
        p.record_success(0);
        let s = &p.status()[0];
        assert_eq!(
            (s.resting_for, s.rests, s.consecutive_failures, s.successes),
            (None, 0, 0, 1)
        );
    }

    #[test]
    fn rest_grows_then_caps() {
        let p = pool(1, 10);
        p.record_failure(0);
        assert_eq!(p.record_failure(0), Some(Duration::from_millis(10)));
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(p.record_failure(0), Some(Duration::from_millis(20)));
        std::thread::sleep(Duration::from_millis(25));
        assert_eq!(
            p.record_failure(0),
            Some(Duration::from_millis(30)),
            "capped at rest_max"
        );
    }

    #[test]
    fn all_resting_uses_the_soonest() {
        let p = pool(2, 1000);
        p.record_failure(1);
        p.record_failure(1);
        std::thread::sleep(Duration::from_millis(5));
        p.record_failure(0);
        p.record_failure(0);
        assert_eq!(p.pick(None).0, 1);
    }
}
