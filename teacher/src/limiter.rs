//! Request and token budgets as reserving token buckets.
//!
//! A caller reserves its cost at once and is told how long to wait; the level may
//! go negative, so concurrent callers queue in arrival order without polling.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket refilled at `rate` per second up to `capacity`.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: f64,
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    pub(crate) fn new(per_minute: f64, burst_s: f64, now: Instant) -> Self {
        let rate = per_minute / 60.0;
        let capacity = (rate * burst_s).max(1.0);
        Self {
            rate,
            capacity,
            level: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            self.level = (self.level + dt * self.rate).min(self.capacity);
            self.last = now;
        }
    }

    /// Reserves `cost` and returns the wait before it may be spent. A cost above
    /// the capacity waits only for a full bucket, or it could never run.
    pub(crate) fn reserve(&mut self, cost: f64, now: Instant) -> Duration {
        self.refill(now);
        let need = cost.min(self.capacity);
        let wait = if self.level >= need {
            0.0
        } else {
            (need - self.level) / self.rate
        };
        self.level -= cost;
        Duration::from_secs_f64(wait)
    }

    /// Returns (positive) or charges (negative) tokens after the fact.
    pub(crate) fn adjust(&mut self, delta: f64, now: Instant) {
        self.refill(now);
        self.level = (self.level + delta).min(self.capacity);
    }
}

/// The requests-per-minute and tokens-per-minute budgets of one client.
#[derive(Debug)]
pub(crate) struct Limiter {
    requests: Option<Mutex<Bucket>>,
    tokens: Option<Mutex<Bucket>>,
}

impl Limiter {
    /// `None` when no budget is configured, so the hot path skips it entirely.
    pub(crate) fn new(rpm: Option<u32>, tpm: Option<u64>, burst_s: f64) -> Option<Self> {
        if rpm.is_none() && tpm.is_none() {
            return None;
        }
        let now = Instant::now();
        Some(Self {
            requests: rpm.map(|r| Mutex::new(Bucket::new(f64::from(r), burst_s, now))),
            tokens: tpm.map(|t| Mutex::new(Bucket::new(t as f64, burst_s, now))),
        })
    }

    /// Waits until one request costing `tokens` fits both budgets.
    pub(crate) async fn acquire(&self, tokens: u64) {
        let now = Instant::now();
        let mut wait = Duration::ZERO;
        if let Some(b) = &self.requests {
            wait = wait.max(b.lock().unwrap().reserve(1.0, now));
        }
        if let Some(b) = &self.tokens {
            wait = wait.max(b.lock().unwrap().reserve(tokens as f64, now));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Corrects the token reservation once real usage is known.
    pub(crate) fn settle(&self, reserved: u64, used: u64) {
        if let Some(b) = &self.tokens {
            b.lock()
                .unwrap()
                .adjust(reserved as f64 - used as f64, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn burst_then_paced() {
        let t0 = Instant::now();
        let mut b = Bucket::new(600.0, 1.0, t0); // 10/s, burst 10
        for _ in 0..10 {
            assert_eq!(b.reserve(1.0, t0), Duration::ZERO);
        }
        let waits: Vec<_> = (0..3).map(|_| b.reserve(1.0, t0)).collect();
        assert_eq!(waits, vec![100 * MS, 200 * MS, 300 * MS]);
        // After the queued reservations are paid for, pacing continues at the rate.
        assert_eq!(b.reserve(1.0, t0 + 300 * MS), 100 * MS);
        // A long idle period refills only to capacity.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..10 {
            assert_eq!(b.reserve(1.0, later), Duration::ZERO);
        }
        assert!(b.reserve(1.0, later) > Duration::ZERO);
    }

    #[test]
    fn oversized_cost_waits_for_full_bucket_only() {
        let t0 = Instant::now();
        let mut b = Bucket::new(6000.0, 1.0, t0); // 100/s, capacity 100
        assert_eq!(b.reserve(500.0, t0), Duration::ZERO);
        // Level is now -400: the next waits for 401 tokens, 4.01 s.
        let w = b.reserve(1.0, t0);
        assert!((w.as_secs_f64() - 4.01).abs() < 1e-9, "{w:?}");
    }

    #[test]
    fn settle_refunds_overestimate_and_charges_underestimate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(6000.0, 1.0, t0);
        assert_eq!(b.reserve(100.0, t0), Duration::ZERO);
        b.adjust(70.0, t0); // used 30 of 100 reserved
        assert_eq!(b.reserve(70.0, t0), Duration::ZERO);
        assert!(b.reserve(1.0, t0) > Duration::ZERO);
        let mut b = Bucket::new(6000.0, 1.0, t0);
        b.adjust(-50.0, t0); // used 50 more than reserved
        assert_eq!(b.reserve(50.0, t0), Duration::ZERO);
        assert_eq!(b.reserve(1.0, t0), 10 * MS);
    }

    #[test]
    fn tiny_budget_still_admits_one_request() {
        let t0 = Instant::now();
        let mut b = Bucket::new(1.0, 1.0, t0);
        assert_eq!(b.reserve(1.0, t0), Duration::ZERO);
        assert_eq!(b.reserve(1.0, t0), Duration::from_secs(60));
    }
}
