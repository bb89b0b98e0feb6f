//! A wake-up from threads that have work for a background thread (capture, the
//! publisher) to that thread, which sleeps until it comes.
//!
//! A crossbeam channel carried these wake-ups at first. Its blocking receive
//! spins, then yields the CPU several times, before it sleeps: with a wake-up
//! per commit on 2 cores, the capture and publisher threads switched 2 and 3.4
//! times per commit and spent about 90 µs of CPU each per commit at 1,000
//! commits a second. Here a wait sleeps at once, and raising a signal nobody
//! waits for makes no system call.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

#[derive(Default)]
pub struct Signal {
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Default)]
struct State {
    raised: bool,
    waiting: bool,
}

impl Signal {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Raises the signal; a raised signal stays raised until a wait takes it.
    pub fn raise(&self) {
        let mut s = self.lock();
        s.raised = true;
        let waiting = s.waiting;
        // Woken after the lock is released, so that the waiter does not wake
        // only to wait for it.
        drop(s);
        if waiting {
            self.cond.notify_one();
        }
    }

    /// Waits until the signal is raised, or `timeout` passes (None: no limit),
    /// and lowers it. True when it was raised.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let mut s = self.lock();
        if !s.raised {
            s.waiting = true;
            s = match timeout {
                Some(t) => self.cond.wait_timeout_while(s, t, |s| !s.raised).unwrap_or_else(|e| e.into_inner()).0,
                None => self.cond.wait_while(s, |s| !s.raised).unwrap_or_else(|e| e.into_inner()),
            };
            s.waiting = false;
        }
        std::mem::replace(&mut s.raised, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_raise_wakes_a_waiter_or_waits_for_one() {
        let s = Arc::new(Signal::default());
        // Raised before anyone waits: the next wait returns at once, once.
        s.raise();
        s.raise();
        assert!(s.wait(Some(Duration::from_secs(10))));
        let t = Instant::now();
        assert!(!s.wait(Some(Duration::from_millis(20))));
        assert!(t.elapsed() >= Duration::from_millis(20));
        // Raised while a thread waits without a limit: it wakes.
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || s2.wait(None));
        while !s.lock().waiting {
            std::thread::yield_now();
        }
        s.raise();
        assert!(waiter.join().unwrap());
    }
}
