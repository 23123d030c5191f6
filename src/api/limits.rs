//! Rate limits and load shedding for the HTTP layer: token buckets per
//! workload, per source address, and for authentication failures per source
//! address (charged only by failures, and checked before any token is
//! verified, so a token-guessing flood costs the broker almost nothing and
//! uses up only its own budget), plus a cap on requests in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[server.limits]`. A rate of 0 turns that limit off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second one workload may make (sustained)...
    #[serde(default = "defaults::per_workload")]
    pub per_workload_per_second: f64,
    /// ...and in a burst.
    #[serde(default = "defaults::per_workload_burst")]
    pub per_workload_burst: f64,
    /// Requests per second from one source address, before authentication.
    #[serde(default = "defaults::per_address")]
    pub per_address_per_second: f64,
    #[serde(default = "defaults::per_address_burst")]
    pub per_address_burst: f64,
    /// Failed authentications per second from one source address; beyond
    /// them, that address gets 429 without its token being looked at.
    #[serde(default = "defaults::auth_failures")]
    pub auth_failures_per_second: f64,
    #[serde(default = "defaults::auth_failures_burst")]
    pub auth_failures_burst: f64,
    /// Requests in flight at once; more get 503 with Retry-After.
    #[serde(default = "defaults::max_in_flight")]
    pub max_in_flight: usize,
}

mod defaults {
    pub fn per_workload() -> f64 {
        1000.0
    }
    pub fn per_workload_burst() -> f64 {
        2000.0
    }
    pub fn per_address() -> f64 {
        5000.0
    }
    pub fn per_address_burst() -> f64 {
        10_000.0
    }
    pub fn auth_failures() -> f64 {
        5.0
    }
    pub fn auth_failures_burst() -> f64 {
        20.0
    }
    pub fn max_in_flight() -> usize {
        4096
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_workload_per_second: defaults::per_workload(),
            per_workload_burst: defaults::per_workload_burst(),
            per_address_per_second: defaults::per_address(),
            per_address_burst: defaults::per_address_burst(),
            auth_failures_per_second: defaults::auth_failures(),
            auth_failures_burst: defaults::auth_failures_burst(),
            max_in_flight: defaults::max_in_flight(),
        }
    }
}

impl RateLimitConfig {
    /// A problem with the values: (field, message).
    pub fn problem(&self) -> Option<(&'static str, &'static str)> {
        let pairs = [
            (
                "per_workload_per_second",
                self.per_workload_per_second,
                self.per_workload_burst,
            ),
            (
                "per_address_per_second",
                self.per_address_per_second,
                self.per_address_burst,
            ),
            (
                "auth_failures_per_second",
                self.auth_failures_per_second,
                self.auth_failures_burst,
            ),
        ];
        for (field, rate, burst) in pairs {
            if !rate.is_finite() || rate < 0.0 {
                return Some((field, "must be 0 (off) or a positive number"));
            }
            if rate > 0.0 && (!burst.is_finite() || burst < 1.0) {
                return Some((field, "its burst must be at least 1"));
            }
        }
        if self.max_in_flight == 0 {
            return Some(("max_in_flight", "must be positive"));
        }
        None
    }
}

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
