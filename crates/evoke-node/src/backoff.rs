//! CrashLoopBackOff timing, as the kubelet does it: the first restart is
//! immediate, the next waits 10 s, doubling up to 300 s; 10 minutes of
//! clean running forgets the history.

use std::time::Duration;

pub const INITIAL: Duration = Duration::from_secs(10);
pub const MAX: Duration = Duration::from_secs(300);
pub const RESET_AFTER: Duration = Duration::from_secs(600);

/// Per-container restart back-off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Backoff {
    /// The delay the last restart waited; None before any failure.
    current: Option<Duration>,
    failures: u32,
}

impl Backoff {
    /// The container ended after running for `ran`; returns how long to
    /// wait before starting it again.
    pub fn next(&mut self, ran: Duration) -> Duration {
        if ran >= RESET_AFTER {
            self.current = None;
            self.failures = 0;
        }
        self.failures += 1;
        let d = match (self.failures, self.current) {
            (1, _) => Duration::ZERO,
            (_, None) => INITIAL,
            (_, Some(d)) if d.is_zero() => INITIAL,
            (_, Some(d)) => (d * 2).min(MAX),
        };
        self.current = Some(d);
        d
    }

    pub fn current(&self) -> Option<Duration> {
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loop_restarts_at_once_then_waits_ten_seconds_doubling_to_five_minutes() {
        let mut b = Backoff::default();
        let got: Vec<u64> = (0..7)
            .map(|_| b.next(Duration::from_secs(1)).as_secs())
            .collect();
        assert_eq!(got, vec![0, 10, 20, 40, 80, 160, 300]);
        assert_eq!(b.next(Duration::from_secs(1)).as_secs(), 300);
    }

    #[test]
    fn ten_minutes_of_clean_running_resets_the_backoff() {
        let mut b = Backoff::default();
        b.next(Duration::ZERO);
        b.next(Duration::ZERO);
        b.next(Duration::ZERO);
        assert_eq!(b.next(Duration::from_secs(601)), Duration::ZERO);
        assert_eq!(b.next(Duration::ZERO), INITIAL);
    }
}
