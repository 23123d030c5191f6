//! Time is a parameter (DESIGN.md invariant 8).
//!
//! Domain code takes an `Arc<dyn Clock>`; only [`SystemClock`] reads the wall
//! clock, so expiry, backoff and token lifetimes are testable with a
//! [`ManualClock`] and no sleeping. `clippy.toml` bans the direct calls
//! everywhere else.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

pub use leasehold_provider::Timestamp;

/// The source of "now" and of waiting for a point in time.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    fn now(&self) -> Timestamp;

    /// Resolve at or after `deadline` by this clock. May resolve early (the
    /// caller re-reads `now` and loops), never late by more than scheduling.
    fn sleep_until(&self, deadline: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

/// Long sleeps are cut into slices so a wall-clock step (NTP, suspend) is
/// noticed within this bound.
const MAX_SLICE: Duration = Duration::from_secs(30);

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // the one place that reads the wall clock
    fn now(&self) -> Timestamp {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp::from_unix_millis(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wait = self.now().until(deadline).min(MAX_SLICE);
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A clock that moves only when told to. Sleepers wake when it passes their
/// deadline.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<ManualInner>,
}

#[derive(Debug)]
struct ManualInner {
    now: AtomicI64,
    tick: tokio::sync::watch::Sender<i64>,
}

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        let (tick, _) = tokio::sync::watch::channel(start.unix_millis());
        Self {
            inner: Arc::new(ManualInner {
                now: AtomicI64::new(start.unix_millis()),
                tick,
            }),
        }
    }

    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        let now = self
            .inner
            .now
            .fetch_add(ms, Ordering::SeqCst)
            .saturating_add(ms);
        self.inner.tick.send_replace(now);
    }

    pub fn set(&self, to: Timestamp) {
        self.inner.now.store(to.unix_millis(), Ordering::SeqCst);
        self.inner.tick.send_replace(to.unix_millis());
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp::from_unix_millis(self.inner.now.load(Ordering::SeqCst))
    }

    fn sleep_until(&self, deadline: Timestamp) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let mut rx = self.inner.tick.subscribe();
        Box::pin(async move {
            // Resolves once the clock reaches the deadline; if the sender is
            // gone the clock can never move again, so wait forever.
            if rx
                .wait_for(|now| *now >= deadline.unix_millis())
                .await
                .is_err()
            {
                std::future::pending::<()>().await;
            }
        })
    }
}

/// RFC 3339 UTC with millisecond precision, the API's time format.
pub fn rfc3339(t: Timestamp) -> String {
    let nanos = i128::from(t.unix_millis()) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(dt) => dt
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.unix_millis().to_string()),
        Err(_) => t.unix_millis().to_string(),
    }
}

/// Parse an RFC 3339 time (any offset) into a timestamp.
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    let ms = dt.unix_timestamp_nanos() / 1_000_000;
    i64::try_from(ms).ok().map(Timestamp::from_unix_millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_clock_wakes_sleepers_only_when_advanced() {
        let clock = ManualClock::new(Timestamp::from_unix_millis(1_000));
        let c2 = clock.clone();
        let sleeper =
            tokio::spawn(async move { c2.sleep_until(Timestamp::from_unix_millis(5_000)).await });
        tokio::task::yield_now().await;
        clock.advance(Duration::from_millis(3_000));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_millis(1_000));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(clock.now().unix_millis(), 5_000);
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::from_unix_millis(1_764_322_029_123);
        let s = rfc3339(t);
        assert_eq!(s, "2025-11-28T09:27:09.123Z");
        assert_eq!(parse_rfc3339(&s), Some(t));
        assert_eq!(parse_rfc3339("2025-11-28T10:27:09.123+01:00"), Some(t));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
