//! The policy after a pool fails, as a pure function: when to start it again (exponential
//! backoff, reset once a pool served a minute), when the failures make a crashloop (five in a
//! minute), and which generation to restore then (the last that served well).

use std::time::{Duration, Instant};

/// First restart delay after a pool dies; doubled for each further failure, up to the cap.
const RESTART_BACKOFF: Duration = Duration::from_millis(100);
const RESTART_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A pool that served this long is healthy again: its next failure starts the backoff over.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// This many pool failures within `CRASHLOOP_WINDOW` make a crashloop.
const CRASHLOOP_FAILURES: usize = 5;
pub(super) const CRASHLOOP_WINDOW: Duration = Duration::from_secs(60);

/// What the reconciler remembers of an app's pool failures (reset by a new generation).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Failures {
    /// Failures since the pool last stayed up for `HEALTHY_AFTER`.
    pub consecutive: u32,
    /// When the pool failed within the last `CRASHLOOP_WINDOW`.
    pub recent: Vec<Instant>,
    /// Failing `CRASHLOOP_FAILURES` times within the window; cleared by a new generation.
    pub crashloop: bool,
}

/// What to do after a failure.
#[derive(Debug, PartialEq)]
pub(super) struct Decision {
    /// When to start the pool again.
    pub delay: Duration,
    /// A generation that served well, to restore instead (a crashloop).
    pub restore: Option<u64>,
}

/// The policy after a pool failed at `now`. `served_for`: how long the pool had run (`None`
/// when it failed to start); `generation` is the failing one.
pub(super) fn after_failure(
    failures: &mut Failures,
    now: Instant,
    served_for: Option<Duration>,
    generation: u64,
    last_good: Option<u64>,
) -> Decision {
    if served_for.is_some_and(|served| served >= HEALTHY_AFTER) {
        failures.consecutive = 0;
    }
    failures.consecutive += 1;
    failures
        .recent
        .retain(|at| now.duration_since(*at) < CRASHLOOP_WINDOW);
    failures.recent.push(now);
    if failures.recent.len() >= CRASHLOOP_FAILURES {
        failures.crashloop = true;
    }
    Decision {
        delay: backoff(failures.consecutive),
        restore: last_good.filter(|good| failures.crashloop && *good != generation),
    }
}

fn backoff(failures: u32) -> Duration {
    RESTART_BACKOFF
        .saturating_mul(1 << failures.saturating_sub(1).min(16))
        .min(RESTART_BACKOFF_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(20), RESTART_BACKOFF_CAP);
        assert_eq!(backoff(u32::MAX), RESTART_BACKOFF_CAP);
    }

    /// One row: the failures before (seconds before `now`, consecutive count, crashloop), how
    /// long the pool served, the failing and last good generations; then what must follow.
    struct Case {
        name: &'static str,
        earlier: &'static [u64],
        consecutive: u32,
        crashloop: bool,
        served_secs: Option<u64>,
        generation: u64,
        last_good: Option<u64>,
        delay_ms: u64,
        then_consecutive: u32,
        then_crashloop: bool,
        restore: Option<u64>,
    }

    #[test]
    fn failures_back_off_and_a_crashloop_restores_what_served_well() {
        let cases = [
            Case {
                name: "first failure restarts soon",
                earlier: &[],
                consecutive: 0,
                crashloop: false,
                served_secs: Some(1),
                generation: 2,
                last_good: Some(1),
                delay_ms: 100,
                then_consecutive: 1,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "each further failure doubles the delay",
                earlier: &[30, 20, 10],
                consecutive: 3,
                crashloop: false,
                served_secs: Some(1),
                generation: 2,
                last_good: Some(1),
                delay_ms: 800,
                then_consecutive: 4,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a pool that served a minute starts the backoff over",
                earlier: &[100],
                consecutive: 6,
                crashloop: false,
                served_secs: Some(60),
                generation: 2,
                last_good: Some(1),
                delay_ms: 100,
                then_consecutive: 1,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a failed start does not reset the backoff",
                earlier: &[],
                consecutive: 2,
                crashloop: false,
                served_secs: None,
                generation: 2,
                last_good: Some(1),
                delay_ms: 400,
                then_consecutive: 3,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "the fifth failure in a minute is a crashloop: restore the good one",
                earlier: &[50, 40, 30, 20],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: Some(2),
            },
            Case {
                name: "failures spread over more than a minute are no crashloop",
                earlier: &[240, 180, 120, 61],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: false,
                restore: None,
            },
            Case {
                name: "a crashloop with nothing that served well restarts with backoff",
                earlier: &[4, 3, 2, 1],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(0),
                generation: 1,
                last_good: None,
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: None,
            },
            Case {
                name: "the good generation is the failing one: nothing to restore",
                earlier: &[4, 3, 2, 1],
                consecutive: 4,
                crashloop: false,
                served_secs: Some(0),
                generation: 2,
                last_good: Some(2),
                delay_ms: 1600,
                then_consecutive: 5,
                then_crashloop: true,
                restore: None,
            },
            Case {
                name: "a crashloop stays one until a new generation",
                earlier: &[],
                consecutive: 9,
                crashloop: true,
                served_secs: Some(1),
                generation: 3,
                last_good: Some(2),
                delay_ms: 30_000,
                then_consecutive: 10,
                then_crashloop: true,
                restore: Some(2),
            },
        ];
        let now = Instant::now() + Duration::from_secs(1000);
        for case in cases {
            let mut failures = Failures {
                consecutive: case.consecutive,
                recent: case
                    .earlier
                    .iter()
                    .map(|ago| now - Duration::from_secs(*ago))
                    .collect(),
                crashloop: case.crashloop,
            };
            let decision = after_failure(
                &mut failures,
                now,
                case.served_secs.map(Duration::from_secs),
                case.generation,
                case.last_good,
            );
            assert_eq!(
                decision,
                Decision {
                    delay: Duration::from_millis(case.delay_ms),
                    restore: case.restore
                },
                "{}",
                case.name
            );
            assert_eq!(failures.consecutive, case.then_consecutive, "{}", case.name);
            assert_eq!(failures.crashloop, case.then_crashloop, "{}", case.name);
            assert!(
                failures.recent.len() <= CRASHLOOP_FAILURES.max(case.earlier.len() + 1),
                "{}",
                case.name
            );
        }
    }
}
