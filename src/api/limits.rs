//! Rate limits and load shedding for the HTTP layer: token buckets per
//! workload, per source address, and for authentication failures per source
//! address (charged only by failures, and checked before any token is
//! verified, so a token-guessing flood costs the broker almost nothing and
//! uses up only its own budget), plus a cap on requests in flight.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
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

/// Fair sharing of the broker between callers: how many requests each
/// caller has in flight, and how many long-polls, capped per caller before
/// the global cap is counted, so no one caller can take the whole budget.
///
/// A request is counted against its credential before the credential is
/// verified (admission runs first); a credential once verified is counted
/// as its identity (`workload:<id>`, `operator:<name>`), so one workload's
/// many tokens share one allowance. The same map tells the
/// failed-authentication budget which credentials were verified recently.
#[derive(Debug, Default)]
pub struct Fairness {
    /// SHA-256 of a bearer token → who it proved to be, when verified.
    known: Mutex<HashMap<[u8; 32], Arc<str>>>,
    /// Caller key → (requests in flight, long-polls in flight).
    counts: Mutex<HashMap<Arc<str>, (usize, usize)>>,
}

/// Credentials remembered as verified (the map is cleared when full).
const MAX_KNOWN: usize = 100_000;

/// A caller's place among the requests in flight; given back on drop.
#[derive(Debug)]
pub struct Slot {
    fair: Arc<Fairness>,
    key: Arc<str>,
    long_poll: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.fair.counts.lock()
            && let Some(c) = counts.get_mut(&self.key)
        {
            c.0 = c.0.saturating_sub(1);
            if self.long_poll {
                c.1 = c.1.saturating_sub(1);
            }
            if c.0 == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// Why a caller was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OverShare {
    InFlight,
    LongPolls,
}

impl Fairness {
    /// The hash a bearer token is known by.
    pub fn token_hash(token: &str) -> [u8; 32] {
        let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// Whether this token proved to be someone recently.
    pub fn is_known(&self, hash: &[u8; 32]) -> bool {
        self.known.lock().is_ok_and(|k| k.contains_key(hash))
    }

    /// Remember that this token proved to be `key`.
    pub fn learn(&self, hash: [u8; 32], key: &str) {
        if let Ok(mut k) = self.known.lock() {
            if k.get(&hash).is_some_and(|v| &**v == key) {
                return;
            }
            if k.len() >= MAX_KNOWN {
                k.clear();
            }
            k.insert(hash, Arc::from(key));
        }
    }

    /// Take a place for the caller behind `hash`, unless it already has
    /// `max_in_flight` requests (or, for a long-poll, `max_long_polls`
    /// long-polls) in flight. A cap of 0 is no cap.
    pub fn admit(
        self: &Arc<Self>,
        hash: &[u8; 32],
        long_poll: bool,
        max_in_flight: usize,
        max_long_polls: usize,
    ) -> Result<Slot, OverShare> {
        let key = self
            .known
            .lock()
            .ok()
            .and_then(|k| k.get(hash).cloned())
            .unwrap_or_else(|| {
                let hex: String = hash[..12].iter().map(|b| format!("{b:02x}")).collect();
                Arc::from(format!("token:{hex}"))
            });
        let Ok(mut counts) = self.counts.lock() else {
            return Err(OverShare::InFlight);
        };
        let c = counts.entry(key.clone()).or_insert((0, 0));
        if max_in_flight > 0 && c.0 >= max_in_flight {
            return Err(OverShare::InFlight);
        }
        if long_poll && max_long_polls > 0 && c.1 >= max_long_polls {
            return Err(OverShare::LongPolls);
        }
        c.0 += 1;
        if long_poll {
            c.1 += 1;
        }
        Ok(Slot {
            fair: self.clone(),
            key,
            long_poll,
        })
    }
}
