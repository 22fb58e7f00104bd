//! Stopping a replica's roles, in order, and waiting on what is away.
//!
//! The replica stops its roles one after the other (docs/design.md section 5: the trainer
//! sends what it batched and leaves the group, then the applier drains the
//! log to its end and writes a final checkpoint), so each role gets a typed
//! request it polls in its loop rather than a bare flag: [`StopRequest`]
//! for the trainer, [`DrainRequest`] for the applier. [`Backoff`] is the one
//! retry pacing of the replica, for a broker or store that is away.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Asks a role to stop; cloned between the replica and the role, set once.
#[derive(Clone, Debug, Default)]
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    pub fn request(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Asks the applier to stop once it has applied the log up to the end it
/// had when the replica stopped its trainer: what was appended before the
/// stop is in the final checkpoint.
#[derive(Clone, Debug, Default)]
pub struct DrainRequest(Arc<Mutex<Option<Drain>>>);

/// How far a stopping applier reads.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Drain {
    /// To this log end.
    To(i64),
    /// As far as it has read: the log end could not be listed.
    AsRead,
}

impl DrainRequest {
    /// Stop after position `log_end` (`None`: the end is unknown; stop now).
    pub fn request(&self, log_end: Option<i64>) {
        *self.0.lock().expect("drain lock") = Some(log_end.map_or(Drain::AsRead, Drain::To));
    }

    /// Whether a drain was asked for and `position` has reached its end.
    pub fn reached(&self, position: i64) -> bool {
        match *self.0.lock().expect("drain lock") {
            None => false,
            Some(Drain::AsRead) => true,
            Some(Drain::To(end)) => position >= end,
        }
    }

    /// Whether a drain was asked for at all.
    pub fn is_requested(&self) -> bool {
        self.0.lock().expect("drain lock").is_some()
    }
}

/// Waits between retries: 200 ms doubling to 5 s, for a broker or store
/// that is away (fast when it blinks, and no storm when it is down).
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(200);
    const MOST: Duration = Duration::from_secs(5);

    pub fn new() -> Backoff {
        Backoff { next: Backoff::FIRST }
    }

    /// The wait before the next try; each call doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(Backoff::MOST);
        delay
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_ceiling() {
        let mut b = Backoff::new();
        let delays: Vec<u64> = (0..7).map(|_| b.next_delay().as_millis() as u64).collect();
        assert_eq!(delays, [200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn a_drain_ends_at_the_log_end_or_at_once_when_it_is_unknown() {
        let drain = DrainRequest::default();
        assert!(!drain.reached(100) && !drain.is_requested());
        drain.request(Some(10));
        assert!(!drain.reached(9) && drain.reached(10));
        drain.request(None);
        assert!(drain.reached(0));
    }
}
