//! Per-document retries, and how often a repeated failure is reported. A document that cannot
//! be realised (an artifact missing upstream, a full store, a deploy that failed) waits its own
//! backoff, exponential, capped and jittered; the other keys, the link and the reports are not
//! held up by it. The same failure is reported upstream when it is new or changed, and then at
//! most once per `REPORT_EVERY`, so a device with a broken document does not flood the stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

pub(super) const FIRST: Duration = Duration::from_millis(500);
pub(super) const CAP: Duration = Duration::from_secs(300);
/// A failure that repeats unchanged is reported again after this long.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(600);

/// Exponential backoff with ±25% jitter (so a fleet does not retry in lockstep), capped.
pub(super) fn backoff(failures: u32, first: Duration, cap: Duration) -> Duration {
    let base = first
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(cap);
    base.mul_f64(0.75 + jitter() * 0.5)
}

/// A number in [0, 1) that differs between devices and calls.
fn jitter() -> f64 {
    u16::from_le_bytes(cairn_core::fleet::loose_random()) as f64 / 65536.0
}

#[derive(Debug)]
struct Entry {
    failures: u32,
    due: Instant,
    reason: String,
    pending: Pending,
}

/// What a retry of one key does.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Pending {
    /// Check and realise this value again (as read from the bucket: its artifacts were not
    /// all fetched). Checked again, so a key revoked or a document expired meanwhile is
    /// refused rather than applied.
    Value(Vec<u8>),
    /// The key's document is recorded but not complete (a deploy, removal or handover
    /// failed): bring every fleet app to the spec of the key that wins it.
    Reconcile,
}

/// The keys waiting for a retry, and what was last reported about each failing key.
#[derive(Debug, Default)]
pub(super) struct Retries {
    waiting: HashMap<String, Entry>,
    reported: HashMap<String, (String, Instant)>,
}

impl Retries {
    /// `key` failed for `reason`; returns when it is tried again.
    pub fn failed(&mut self, key: &str, reason: &str, pending: Pending, now: Instant) -> Duration {
        let failures = self.waiting.get(key).map_or(0, |e| e.failures) + 1;
        let delay = backoff(failures, FIRST, CAP);
        self.waiting.insert(
            key.to_string(),
            Entry {
                failures,
                due: now + delay,
                reason: reason.to_string(),
                pending,
            },
        );
        delay
    }

    /// `key` was realised (or replaced by something that needs no retry).
    pub fn succeeded(&mut self, key: &str) {
        self.waiting.remove(key);
        self.reported.remove(key);
    }

    /// Drops `key`'s waiting retry (its latest value was refused: what waited is superseded),
    /// keeping what was last reported about it.
    pub fn forget(&mut self, key: &str) {
        self.waiting.remove(key);
    }

    /// The retries due at `now`, taken out of the waiting list: a retry that fails again is
    /// put back by `failed`, keeping its count.
    pub fn due(&mut self, now: Instant) -> Vec<(String, Pending)> {
        let mut due: Vec<(String, Pending)> = self
            .waiting
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(k, e)| (k.clone(), e.pending.clone()))
            .collect();
        due.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, _) in &due {
            // Keep the count: park it far ahead until the retry says how it went.
            if let Some(entry) = self.waiting.get_mut(key) {
                entry.due = now + CAP * 4;
            }
        }
        due
    }

    /// Why `key` is waiting for a retry, if it is.
    pub fn reason(&self, key: &str) -> Option<&str> {
        self.waiting.get(key).map(|e| e.reason.as_str())
    }

    /// Whether a failure of `key` for `reason` should be reported now: when it is new, when
    /// the reason changed, or when `REPORT_EVERY` has passed since it was last reported.
    pub fn should_report(&mut self, key: &str, reason: &str, now: Instant) -> bool {
        let report = match self.reported.get(key) {
            Some((last, at)) => last != reason || now.duration_since(*at) >= REPORT_EVERY,
            None => true,
        };
        if report {
            self.reported
                .insert(key.to_string(), (reason.to_string(), now));
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document(version: u64) -> Pending {
        Pending::Value(vec![version as u8])
    }

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for failures in 1..40 {
            let delay = backoff(failures, FIRST, CAP);
            let base = FIRST.saturating_mul(1 << (failures - 1).min(16)).min(CAP);
            assert!(
                delay >= base.mul_f64(0.75) && delay <= base.mul_f64(1.25),
                "{failures}: {delay:?}"
            );
        }
        let delays: std::collections::BTreeSet<_> =
            (0..20).map(|_| backoff(3, FIRST, CAP)).collect();
        assert!(delays.len() > 1, "no jitter: {delays:?}");
    }

    #[test]
    fn each_key_waits_its_own_backoff_and_a_success_clears_it() {
        let mut retries = Retries::default();
        let start = Instant::now();
        let first = retries.failed("group.north", "artifact missing", document(2), start);
        assert!(first <= FIRST.mul_f64(1.25));
        assert!(retries.due(start).is_empty(), "not due before its delay");
        let later = start + Duration::from_secs(1);
        assert_eq!(
            retries.due(later),
            vec![("group.north".to_string(), document(2))]
        );
        assert!(
            retries.due(later).is_empty(),
            "taken out until it fails again"
        );
        // The second failure waits about twice as long.
        let second = retries.failed("group.north", "artifact missing", document(2), later);
        assert!(second >= FIRST.mul_f64(2.0 * 0.75), "{second:?}");
        assert_eq!(retries.reason("group.north"), Some("artifact missing"));
        // Another key is independent of it.
        retries.failed("device.a", "deploy failed", document(1), later);
        let due = retries.due(later + Duration::from_secs(5));
        assert_eq!(due.len(), 2);
        retries.succeeded("group.north");
        assert_eq!(retries.reason("group.north"), None);
        assert_eq!(retries.reason("device.a"), Some("deploy failed"));
    }

    #[test]
    fn a_repeated_failure_is_reported_when_new_changed_or_stale() {
        let mut retries = Retries::default();
        let start = Instant::now();
        assert!(retries.should_report("k", "a", start));
        assert!(!retries.should_report("k", "a", start + Duration::from_secs(5)));
        assert!(retries.should_report("k", "b", start + Duration::from_secs(6)));
        assert!(!retries.should_report("k", "b", start + Duration::from_secs(7)));
        assert!(retries.should_report("other", "b", start + Duration::from_secs(7)));
        assert!(retries.should_report("k", "b", start + REPORT_EVERY + Duration::from_secs(7)));
        retries.succeeded("k");
        assert!(retries.should_report("k", "b", start + REPORT_EVERY + Duration::from_secs(8)));
    }
}
