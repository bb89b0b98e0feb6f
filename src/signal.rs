//! Wake-ups from threads that have work for a background thread (capture, the
//! publisher, a replica's applier) to that thread, which sleeps until it comes:
//! a `Signal`, or a `Queue` of the work itself.
//!
//! A crossbeam channel carried these wake-ups at first. Its blocking receive
//! spins, then yields the CPU several times, before it sleeps: with a wake-up
//! per commit on 2 cores, the capture and publisher threads switched 2 and 3.4
//! times per commit and spent about 90 µs of CPU each per commit at 1,000
//! commits a second. Here a wait sleeps at once, and raising a signal nobody
//! waits for makes no system call.

use std::collections::VecDeque;
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

/// A bounded queue from producers to one consumer, which sleeps at once while
/// it is empty (see above).
pub struct Queue<T> {
    state: Mutex<QueueState<T>>,
    cond: Condvar,
    capacity: usize,
}

struct QueueState<T> {
    items: VecDeque<T>,
    waiting: bool,
}

impl<T> Queue<T> {
    pub fn new(capacity: usize) -> Self {
        Queue { state: Mutex::new(QueueState { items: VecDeque::with_capacity(capacity), waiting: false }), cond: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, QueueState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `item` at the end, or gives it back when the queue is full.
    pub fn try_push(&self, item: T) -> Result<(), T> {
        let mut s = self.lock();
        if s.items.len() >= self.capacity {
            return Err(item);
        }
        s.items.push_back(item);
        let waiting = s.waiting;
        drop(s);
        if waiting {
            self.cond.notify_one();
        }
        Ok(())
    }

    /// The oldest item, waiting at most `timeout` for one.
    pub fn pop(&self, timeout: Duration) -> Option<T> {
        let mut s = self.lock();
        if s.items.is_empty() {
            s.waiting = true;
            s = self.cond.wait_timeout_while(s, timeout, |s| s.items.is_empty()).unwrap_or_else(|e| e.into_inner()).0;
            s.waiting = false;
        }
        s.items.pop_front()
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

    #[test]
    fn a_queue_keeps_order_refuses_when_full_and_wakes_a_waiter() {
        let q = Arc::new(Queue::new(2));
        assert_eq!(q.try_push(1), Ok(()));
        assert_eq!(q.try_push(2), Ok(()));
        assert_eq!(q.try_push(3), Err(3));
        assert_eq!(q.pop(Duration::ZERO), Some(1));
        assert_eq!(q.pop(Duration::ZERO), Some(2));
        let t = Instant::now();
        assert_eq!(q.pop(Duration::from_millis(20)), None);
        assert!(t.elapsed() >= Duration::from_millis(20));
        let q2 = q.clone();
        let waiter = std::thread::spawn(move || q2.pop(Duration::from_secs(60)));
        while !q.lock().waiting {
            std::thread::yield_now();
        }
        assert_eq!(q.try_push(4), Ok(()));
        assert_eq!(waiter.join().unwrap(), Some(4));
    }
}
