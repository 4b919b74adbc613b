//! A small pool of pre-made pod sandboxes, so that a pod's network is a
//! hand-over instead of kernel work on its start-up path.
//!
//! A pooled sandbox is a network namespace held open by an fd of this
//! process (not pinned to a file), with its veth `vq<hash of the key>` on
//! the bridge and `eth0` configured inside; IPAM reserves its address in
//! memory under a pool key (`pool-<hex>`, never a Kubernetes uid, which is
//! hex digits and dashes). Claiming one for a pod
//! ([`crate::PodNetwork::setup`]) persists the address as the pod's, renames
//! the host veth to the pod's veth name and pins the namespace under the
//! pod's name; from then on the pod is indistinguishable from one attached
//! the slow way (teardown, restart and re-attach find it by the same names).
//!
//! The pool refills on a thread of its own, one sandbox at a time, only
//! when no pod set-up or teardown has run for a moment: in a burst the pool
//! empties and stays empty until the burst is over, and never competes
//! with the pods for the node's cores. Ready sandboxes are torn down by
//! [`crate::PodNetwork::stop_pool`], which waits for the refill thread, or
//! when the network is dropped. A killed process leaves nothing:
//! its fds close, so the kernel frees the namespaces and their veth pairs,
//! and the reservations were never written. (IPAM entries under pool keys,
//! written by an older version, are released when the network starts.)

use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::podnet::PodNetwork;

/// What every pool key starts with.
pub(crate) const KEY_PREFIX: &str = "pool-";

/// How long refilling waits after a failed attempt, or when the subnet has
/// no more free addresses than the pool would take.
const RETRY: Duration = Duration::from_secs(5);

/// A ready sandbox.
pub(crate) struct Sandbox {
    /// Its pool key: what IPAM reserves its address under, what its veth
    /// is named after.
    pub(crate) key: String,
    /// Its namespace, alive as long as this fd (or a pin) is.
    pub(crate) ns: OwnedFd,
    /// Its host veth's index.
    pub(crate) host: u32,
}

/// The pool's state, shared by the network and its refill thread.
#[derive(Default)]
pub(crate) struct Pool {
    state: Mutex<State>,
    changed: Condvar,
    /// The refill thread, joined by [`Pool::stop`].
    thread: Mutex<Option<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    /// How many ready sandboxes to keep (0: no pool).
    size: usize,
    /// The ready sandboxes' keys and namespaces, oldest first.
    ready: Vec<Sandbox>,
    /// Pod set-ups and teardowns running now.
    busy: usize,
    /// When the last one ended.
    last: Option<Instant>,
    /// No refill before this (after a failure).
    not_before: Option<Instant>,
    /// The network is going away: refill no more.
    stopped: bool,
}

/// Marks a pod set-up or teardown in progress; the pool refills only
/// when none is.
pub(crate) struct Busy<'a>(&'a Pool);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.busy -= 1;
        st.last = Some(Instant::now());
        drop(st);
        self.0.changed.notify_all();
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn busy(&self) -> Busy<'_> {
        self.lock().busy += 1;
        Busy(self)
    }

    /// A ready sandbox's key and namespace, oldest first.
    pub(crate) fn take(&self) -> Option<Sandbox> {
        let mut st = self.lock();
        if st.ready.is_empty() {
            return None;
        }
        let key = st.ready.remove(0);
        drop(st);
        self.changed.notify_all();
        Some(key)
    }

    /// How many sandboxes are ready.
    pub(crate) fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// Stops refilling, waits for the refill thread to end (a sandbox it
    /// was making is torn down by it) unless called on that thread, and
    /// returns the ready sandboxes (to tear down). Joining makes the stop
    /// complete when it returns: nothing of the pool appears afterwards.
    pub(crate) fn stop(&self) -> Vec<Sandbox> {
        self.lock().stopped = true;
        self.changed.notify_all();
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if t.thread().id() == std::thread::current().id() {
                // The refill thread dropped the network's last handle: it
                // ends right after this.
            } else if t.join().is_err() {
                warn!("the pod sandbox pool's thread panicked");
            }
        }
        std::mem::take(&mut self.lock().ready)
    }

    /// Waits until a refill is due: fewer ready than wanted, nothing busy
    /// for `idle`, no back-off pending. False once the pool is stopped.
    fn wait_turn(&self, idle: Duration) -> bool {
        let mut st = self.lock();
        loop {
            if st.stopped {
                return false;
            }
            let now = Instant::now();
            let quiet_at = st.last.map_or(now, |t| t + idle);
            let due = [Some(quiet_at), st.not_before].into_iter().flatten().max();
            let wanted = st.ready.len() < st.size;
            let wait = match (wanted, st.busy, due) {
                (true, 0, Some(t)) if t <= now => return true,
                (true, 0, Some(t)) => t - now,
                // Busy or full: a change wakes us (with a bound, in case).
                _ => Duration::from_secs(60),
            };
            st = self
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Adds a made sandbox; false (the caller tears it down) if the pool
    /// was stopped meanwhile.
    fn put(&self, sandbox: Sandbox) -> Result<(), Sandbox> {
        let mut st = self.lock();
        if st.stopped {
            return Err(sandbox);
        }
        st.ready.push(sandbox);
        st.not_before = None;
        Ok(())
    }

    fn back_off(&self) {
        self.lock().not_before = Some(Instant::now() + RETRY);
    }

    fn size(&self) -> usize {
        self.lock().size
    }
}

/// Keeps `size` sandboxes ready for `net` (see the module doc) on a thread
/// of its own; it ends when the network is dropped. `idle`: how long no
/// pod set-up or teardown must have run before a refill.
pub(crate) fn start(net: &Arc<PodNetwork>, size: usize, idle: Duration) {
    let pool = net.pool().clone();
    {
        let mut st = pool.lock();
        st.size = size;
        if size == 0 {
            return;
        }
    }
    let weak = Arc::downgrade(net);
    let thread = pool.clone();
    let spawned = std::thread::Builder::new()
        .name("evoke-sandbox-pool".into())
        .spawn(move || refill(&thread, &weak, idle));
    match spawned {
        Ok(t) => *pool.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(t),
        Err(e) => {
            warn!(error = %e, "no thread for the pod sandbox pool; pods are set up without it")
        }
    }
}

fn refill(pool: &Pool, net: &Weak<PodNetwork>, idle: Duration) {
    let mut warned = false;
    while pool.wait_turn(idle) {
        // Only a weak hold between refills, so that dropping the network
        // (which tears the pool down) is never held up by this thread.
        let Some(net) = net.upgrade() else { return };
        // Pods come first: the pool never takes the last addresses.
        if net.ipam().free() <= pool.size() {
            pool.back_off();
            continue;
        }
        match net.make_pooled() {
            Ok(sandbox) => {
                debug!(key = %sandbox.key, "pod sandbox made for the pool");
                warned = false;
                if let Err(sandbox) = pool.put(sandbox) {
                    let _ = net.teardown(&sandbox.key);
                }
            }
            Err(e) => {
                if !warned {
                    warn!(error = %e, "cannot make a pod sandbox for the pool; retrying");
                    warned = true;
                }
                pool.back_off();
            }
        }
    }
}
