//! The applier's checkpoints: when one is due, writing it on another thread
//! (the log keeps everything meanwhile, and applying never pauses for the
//! store), trimming the update log below the oldest checkpoint the store
//! keeps once one is written, and the final one at a stop.
//!
//! Owns the writer thread and the trimmer; reads the state, never changes
//! it; a checkpoint written is attested through the applier's [`Attestor`].

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, info, warn};

use super::attest::Attestor;
use crate::checkpoint::{SharedStore, Store};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::state::ReplicaState;
use crate::update_log::kafka;

/// Deletes update-log records below the oldest checkpoint the store keeps
/// (`checkpoint.trim_update_log`), from the checkpoint writer's thread.
pub struct LogTrimmer {
    admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: String,
    runtime: tokio::runtime::Handle,
}

impl LogTrimmer {
    /// A trimmer of `topic`. Must be called inside the tokio runtime.
    pub fn new(connection: &kafka::Connection, replica_id: &str, topic: &str) -> anyhow::Result<LogTrimmer> {
        Ok(LogTrimmer {
            admin: kafka::base_config(connection, &format!("{replica_id}-trim")).create()?,
            topic: topic.to_string(),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    /// Deletes the records before the oldest checkpoint `store` keeps; the
    /// log's start after it. Every replica that checkpoints does the same:
    /// DeleteRecords below an offset already deleted changes nothing.
    fn trim(&self, store: &dyn Store) -> anyhow::Result<i64> {
        let oldest = store.list()?.last().map(|c| c.position).unwrap_or(0);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Offset(oldest))?;
        let options = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        let deleted = self.runtime.block_on(self.admin.delete_records(&tpl, &options))?;
        let start = deleted.elements().first().map(|e| e.error().map(|()| e.offset()));
        match start {
            Some(Ok(Offset::Offset(start))) => Ok(start),
            Some(Err(e)) => Err(e.into()),
            _ => Ok(oldest),
        }
    }

    /// Trims after a checkpoint was written, saying what came of it.
    fn trim_after_checkpoint(&self, store: &dyn Store, metrics: &Metrics) {
        match self.trim(store) {
            Ok(start) => {
                metrics.checkpoints.update_log_start.set(start);
                debug!(start, "update log trimmed below the oldest kept checkpoint");
            }
            Err(e) => warn!(error = format!("{e:#}"), "cannot trim the update log; the next checkpoint tries again"),
        }
    }
}

/// A checkpoint being written: its position, the records its state had
/// taken, and its weights digest, attested once it is written.
struct Saving {
    position: i64,
    records: u64,
    digest: String,
    /// The writer thread: whether it was written.
    writer: JoinHandle<bool>,
}

/// Writes the applier's checkpoints.
pub struct Checkpointer {
    store: SharedStore,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    /// `Some` when this replica trims the update log after its checkpoints.
    trimmer: Option<Arc<LogTrimmer>>,
    every: Duration,
    /// When the last checkpoint was written (or loaded), and the records
    /// its state had taken ([`records_taken`]).
    last_saved: (Instant, u64),
    last_try: Instant,
    saving: Option<Saving>,
}

impl Checkpointer {
    /// Checkpoints of `model` every `every` to `store`, the state at start
    /// (`state`) counting as the last one written.
    pub fn new(
        store: SharedStore,
        model: Arc<Model>,
        metrics: Arc<Metrics>,
        trimmer: Option<LogTrimmer>,
        every: Duration,
        state: &ReplicaState,
    ) -> Checkpointer {
        Checkpointer {
            store,
            model,
            metrics,
            trimmer: trimmer.map(Arc::new),
            every,
            last_saved: (Instant::now(), records_taken(state)),
            last_try: Instant::now(),
            saving: None,
        }
    }

    /// A checkpoint is due every interval while records are taken, written
    /// on another thread (the clone is the price of not pausing the log); a
    /// failed one is retried at the next interval (the log keeps everything
    /// meanwhile). A written one is attested.
    pub fn when_due(&mut self, state: &ReplicaState, attestor: &mut Attestor) {
        if self.saving.as_ref().is_some_and(|s| s.writer.is_finished()) {
            let Saving { position, records, digest, writer } = self.saving.take().expect("checked");
            if writer.join().unwrap_or(false) {
                self.last_saved = (Instant::now(), records);
                attestor.attest(position, digest);
            }
        }
        self.metrics.checkpoints.age.set(self.last_saved.0.elapsed().as_secs_f64());
        let due = self.last_try.elapsed() >= self.every && records_taken(state) != self.last_saved.1;
        if due && self.saving.is_none() {
            let digest = self.model.digest(&state.weights);
            attestor.remember(state.position, digest.clone());
            let (position, records) = (state.position, records_taken(state));
            let writer = self.write_in_background(state.clone());
            self.saving = Some(Saving { position, records, digest, writer });
            self.last_try = Instant::now();
        }
    }

    /// Writes `state` on a thread of its own, then trims the log if it was.
    fn write_in_background(&self, state: ReplicaState) -> JoinHandle<bool> {
        let (store, model, metrics, trimmer) =
            (self.store.clone(), self.model.clone(), self.metrics.clone(), self.trimmer.clone());
        std::thread::spawn(move || {
            let saved = save(&*store, &model, &state, &metrics);
            if let (true, Some(trimmer)) = (saved, trimmer) {
                trimmer.trim_after_checkpoint(&*store, &metrics);
            }
            saved
        })
    }

    /// The final checkpoint, once a checkpoint being written is done.
    pub fn finish(&mut self, state: &ReplicaState) {
        if let Some(saving) = self.saving.take() {
            let _ = saving.writer.join();
        }
        save(&*self.store, &self.model, state, &self.metrics);
    }
}

/// The gradient and rollback records a state has taken (applied or
/// rejected). A checkpoint is due when these move, not the position alone:
/// control records (settings, attestations) change no weight, and a
/// checkpoint's own attestation would otherwise make the next one due.
fn records_taken(state: &ReplicaState) -> u64 {
    state.records_applied + state.records_rejected
}

/// Writes one checkpoint; whether it was written.
fn save(store: &dyn Store, model: &Model, state: &ReplicaState, metrics: &Metrics) -> bool {
    let start = Instant::now();
    info!(position = state.position, store = %store.describe(), "writing checkpoint");
    match store.save(model, state) {
        Ok(info) => {
            metrics.checkpoints.written.with_label_values(&["ok"]).inc();
            info!(
                position = info.position,
                bytes = info.bytes,
                ms = start.elapsed().as_millis() as u64,
                "checkpoint written"
            );
            true
        }
        Err(e) => {
            metrics.checkpoints.written.with_label_values(&["error"]).inc();
            warn!(error = %e, "checkpoint failed; the log still holds everything, will retry");
            false
        }
    }
}
