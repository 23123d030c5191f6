//! Rate limits and load shedding for the HTTP layer: token buckets per
//! workload, per source address, and for authentication failures per source
//! address (charged only by failures, and checked before any token is
//! verified, so a token-guessing flood costs the broker almost nothing and
//! uses up only its own budget), plus a cap on requests in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use crate::config::RateLimitConfig;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key. Idle buckets are dropped when the map grows.
#[derive(Debug, Default)]
pub struct Buckets {
    map: Mutex<HashMap<Key, Bucket>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Workload(String),
    Address(IpAddr),
    AuthFailures(IpAddr),
}

const MAX_KEYS: usize = 100_000;

impl Buckets {
    /// Take one token; `Err(wait)` when there is none, with how long until
    /// there will be.
    pub fn take(&self, key: Key, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.charge(key, rate, burst, now, 1.0, true)
    }

    /// Whether a token is available, without taking it.
    pub fn peek(&self, key: Key, rate: f64, burst: f64, now: Instant) -> Result<(), Duration> {
        self.charge(key, rate, burst, now, 1.0, false)
    }

    fn charge(
        &self,
        key: Key,
        rate: f64,
        burst: f64,
        now: Instant,
        cost: f64,
        take: bool,
    ) -> Result<(), Duration> {
        if rate <= 0.0 {
            return Ok(());
        }
        let Ok(mut map) = self.map.lock() else {
            return Ok(());
        };
        if map.len() >= MAX_KEYS && !map.contains_key(&key) {
            // drop every bucket that has refilled: they carry no state
            map.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let refilled =
            (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.tokens = refilled;
        b.at = now;
        if refilled >= cost {
            if take {
                b.tokens -= cost;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64((cost - refilled) / rate))
        }
    }
}

/// Seconds for `Retry-After`: whole, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0).max(u64::from(wait.is_zero()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_allow_a_burst_then_the_rate() {
        let b = Buckets::default();
        let t0 = Instant::now();
        let k = || Key::Workload("w".into());
        assert_eq!(
            (0..10)
                .filter(|_| b.take(k(), 2.0, 5.0, t0).is_ok())
                .count(),
            5
        );
        let wait = b.take(k(), 2.0, 5.0, t0).unwrap_err();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(
            b.take(k(), 2.0, 5.0, t0 + Duration::from_millis(500))
                .is_ok()
        );
        assert!(
            b.take(k(), 2.0, 5.0, t0 + Duration::from_millis(500))
                .is_err()
        );
        // other keys are independent; rate 0 is off
        assert!(b.take(Key::Workload("x".into()), 2.0, 5.0, t0).is_ok());
        assert!((0..100).all(|_| b.take(k(), 0.0, 1.0, t0).is_ok()));
        // peek does not take
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        assert!((0..10).all(|_| b.peek(Key::AuthFailures(ip), 1.0, 1.0, t0).is_ok()));
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
    }
}
