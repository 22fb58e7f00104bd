//! The roles beside the HTTP server: each an OS thread (they block on Kafka
//! and burn CPU) whose result the replica awaits, and the order in which
//! the trainer and the joiner, which feed the update log and the events
//! topic, are asked to stop.

use std::time::Duration;

use tokio::sync::oneshot;
use tracing::warn;

use crate::join::Joiner;
use crate::lifecycle::StopRequest;
use crate::train::Trainer;

/// How long each role may take to stop before the replica goes on without it.
const ROLE_STOP_LIMIT: Duration = Duration::from_secs(30);

/// The roles beside the applier, each with its stop request.
pub(super) struct Roles {
    /// `None` when `train.enabled` is off.
    pub(super) trainer: Option<Trainer>,
    pub(super) trainer_stop: StopRequest,
    /// `None` unless `feedback.enabled` and `feedback.join`.
    pub(super) joiner: Option<Joiner>,
    pub(super) joiner_stop: StopRequest,
}

/// A role's thread, once started: its result when it ends.
pub(super) type Running = Option<oneshot::Receiver<anyhow::Result<()>>>;

impl Roles {
    /// Starts the trainer and the joiner (those configured).
    pub(super) fn spawn(self) -> Started {
        let Roles { trainer, trainer_stop, joiner, joiner_stop } = self;
        Started {
            trainer: trainer.map(|t| spawn_role("trainer", move || t.run())),
            joiner: joiner.map(|j| spawn_role("joiner", move || j.run())),
            trainer_stop,
            joiner_stop,
        }
    }
}

/// The trainer and the joiner, running.
pub(super) struct Started {
    pub(super) trainer: Running,
    pub(super) joiner: Running,
    trainer_stop: StopRequest,
    joiner_stop: StopRequest,
}

impl Started {
    /// Stops the joiner (what it has not committed is read again by the
    /// next owner), then the trainer (it sends what it batched and leaves
    /// the group), skipping the one that already ended. Bounded: with the
    /// broker gone, their flushes and commits each wait on it; whatever the
    /// trainer did not send is relearned from the watermarks by whoever
    /// owns the partitions next.
    pub(super) async fn stop(&mut self, joiner_ended: bool, trainer_ended: bool) {
        self.joiner_stop.request();
        if !joiner_ended {
            stop_role("joiner", &mut self.joiner, "broker unreachable?").await;
        }
        self.trainer_stop.request();
        if !trainer_ended {
            stop_role("trainer", &mut self.trainer, "broker unreachable?").await;
        }
    }
}

/// Runs `f` on a named OS thread; the receiver yields its result.
pub(super) fn spawn_role(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> oneshot::Receiver<anyhow::Result<()>> {
    let (tx, rx) = oneshot::channel();
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("{thread_name} panicked")));
            let _ = tx.send(result);
        })
        .expect("spawn thread");
    rx
}

/// A role's result once it ends; a role that is not running never ends.
pub(super) async fn role_result(rx: &mut Option<oneshot::Receiver<anyhow::Result<()>>>) -> anyhow::Result<()> {
    match rx {
        Some(rx) => rx.await.unwrap_or_else(|_| Err(anyhow::anyhow!("role thread vanished"))),
        None => std::future::pending().await,
    }
}

/// A role that ended on its own ended with an error, or for no reason.
pub(super) fn ended_with(result: anyhow::Result<()>) -> anyhow::Error {
    result.err().unwrap_or_else(|| anyhow::anyhow!("ended"))
}

/// Waits up to `ROLE_STOP_LIMIT` for a role asked to stop; says why not.
pub(super) async fn stop_role(name: &str, done: &mut Option<oneshot::Receiver<anyhow::Result<()>>>, why_late: &str) {
    if done.is_none() {
        return;
    }
    match tokio::time::timeout(ROLE_STOP_LIMIT, role_result(done)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = format!("{e:#}"), "{name} stopped with an error"),
        Err(_) => warn!("{name} did not stop in {} s ({why_late}); stopping without it", ROLE_STOP_LIMIT.as_secs()),
    }
}
