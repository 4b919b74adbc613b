//! The pending queue: pods wait here until a scheduling attempt; a pod that
//! fits nowhere comes back after a back-off of 1 s doubling up to 10 s
//! (kube-scheduler's defaults), or at once when a node appears or changes.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

pub const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// The back-off after `attempts` failed attempts.
pub fn backoff_for(attempts: u32) -> Duration {
    let shift = attempts.saturating_sub(1).min(16);
    INITIAL_BACKOFF
        .saturating_mul(1u32 << shift)
        .min(MAX_BACKOFF)
}

#[derive(Debug)]
struct Entry {
    attempts: u32,
    /// None while the key is in the active queue.
    ready_at: Option<Instant>,
}

/// Keys (namespace/name) of pods waiting to be scheduled.
#[derive(Debug, Default)]
pub struct Queue {
    active: VecDeque<String>,
    entries: HashMap<String, Entry>,
}

impl Queue {
    /// Makes a pod eligible now unless it is already queued or backing off.
    pub fn add(&mut self, key: &str) {
        if self.entries.contains_key(key) {
            return;
        }
        self.entries.insert(
            key.to_string(),
            Entry {
                attempts: 0,
                ready_at: None,
            },
        );
        self.active.push_back(key.to_string());
    }

    /// Records a failed attempt; the pod becomes eligible after its back-off.
    pub fn backoff(&mut self, key: &str, now: Instant) -> Duration {
        let e = self.entries.entry(key.to_string()).or_insert(Entry {
            attempts: 0,
            ready_at: None,
        });
        e.attempts += 1;
        let d = backoff_for(e.attempts);
        if e.ready_at.is_none() {
            self.active.retain(|k| k != key);
        }
        e.ready_at = Some(now + d);
        d
    }

    /// Forgets a pod (bound or deleted).
    pub fn remove(&mut self, key: &str) {
        if let Some(e) = self.entries.remove(key) {
            if e.ready_at.is_none() {
                self.active.retain(|k| k != key);
            }
        }
    }

    /// Takes up to `max` pods that are eligible at `now`, oldest first.
    /// Taken pods stay known (so a re-add does not duplicate them) until
    /// [`Queue::remove`] or [`Queue::backoff`].
    pub fn pop_ready(&mut self, now: Instant, max: usize) -> Vec<String> {
        let mut due: Vec<(Instant, String)> = self
            .entries
            .iter()
            .filter_map(|(k, e)| e.ready_at.filter(|t| *t <= now).map(|t| (t, k.clone())))
            .collect();
        due.sort();
        for (_, k) in due {
            if let Some(e) = self.entries.get_mut(&k) {
                e.ready_at = None;
            }
            self.active.push_back(k);
        }
        let n = max.min(self.active.len());
        self.active.drain(..n).collect()
    }

    /// When the next backing-off pod becomes eligible.
    pub fn next_ready(&self) -> Option<Instant> {
        self.entries.values().filter_map(|e| e.ready_at).min()
    }

    /// A node appeared or changed: pods that did not fit may fit now.
    pub fn retry_all(&mut self, now: Instant) {
        for e in self.entries.values_mut() {
            if e.ready_at.is_some() {
                e.ready_at = Some(now);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
    pub fn attempts(&self, key: &str) -> u32 {
        self.entries.get(key).map(|e| e.attempts).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_ten() {
        let got: Vec<u64> = (1..=6).map(|a| backoff_for(a).as_secs()).collect();
        assert_eq!(got, vec![1, 2, 4, 8, 10, 10]);
    }

    #[test]
    fn unschedulable_pod_returns_only_after_its_backoff() {
        let mut q = Queue::default();
        let t0 = Instant::now();
        q.add("ns/a");
        q.add("ns/a");
        assert_eq!(q.pop_ready(t0, 10), vec!["ns/a".to_string()]);
        q.backoff("ns/a", t0);
        assert!(q.pop_ready(t0, 10).is_empty());
        // Adding again while backing off does not bypass the back-off.
        q.add("ns/a");
        assert!(q.pop_ready(t0 + Duration::from_millis(500), 10).is_empty());
        assert_eq!(
            q.pop_ready(t0 + Duration::from_secs(1), 10),
            vec!["ns/a".to_string()]
        );
        q.backoff("ns/a", t0);
        assert_eq!(q.next_ready(), Some(t0 + Duration::from_secs(2)));
    }

    #[test]
    fn node_change_makes_backing_off_pods_eligible_at_once() {
        let mut q = Queue::default();
        let t0 = Instant::now();
        q.add("ns/a");
        q.pop_ready(t0, 1);
        q.backoff("ns/a", t0);
        q.retry_all(t0);
        assert_eq!(q.pop_ready(t0, 10), vec!["ns/a".to_string()]);
        q.remove("ns/a");
        assert!(q.is_empty());
    }
}
