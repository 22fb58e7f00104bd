//! A batch's gradient at the weights the trainer sees (the served snapshot,
//! with its records in flight stepped on when it overlaps; for a shard,
//! with the rows of the other shards the batch reads gathered from them),
//! checked as the applier will check it, with the events refused alone
//! taken out.
//!
//! Part of the trainer (an `impl Trainer`); changes no weights.

use tracing::{error, warn};

use super::dead_letter::Refusal;
use super::overlay::Overlaid;
use super::read_ahead::Batch;
use super::Trainer;
use crate::event::{Example, Features};
use crate::model::gathered::Gathered;
use crate::model::Gradient;
use crate::shard::Ask;
use crate::snapshot::Snapshot;
use crate::state::check_gradient;

/// How long a trainer waits after a failed gather before it reads the
/// batch again.
const GATHER_RETRY_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// The weights a gradient is computed at.
enum At<'a> {
    /// The served snapshot.
    Served(&'a Snapshot),
    /// The served snapshot with the trainer's records in flight stepped on
    /// (boxed: the largest by far, and made once a batch).
    Overlaid(Box<Overlaid<'a>>),
    /// A shard's served snapshot with the other shards' rows it reads.
    Gathered(&'a Gathered<'a, Vec<f32>>),
}

impl Trainer {
    /// The progressive loss and gradient of `examples` at `at`, checked as
    /// the applier will check it; none for no examples (a batch of invalid
    /// events, or of refused ones only).
    fn checked_gradient(&self, at: &At<'_>, examples: &[Example]) -> Result<Gradient, Refusal> {
        if examples.is_empty() {
            return Ok(Gradient::default());
        }
        let gradient = match at {
            At::Served(snapshot) => self.model.gradient_at(Some(snapshot.position), &snapshot.weights, examples),
            At::Overlaid(weights) => self.model.gradient_on(weights.as_ref(), examples),
            At::Gathered(weights) => self.model.gradient_on(*weights, examples),
        };
        let gradient = gradient.map_err(|e| Refusal::Failed(e.to_string()))?;
        check_gradient(&self.model, examples.len() as u32, gradient.loss_sum, &gradient.tensors)
            .map_err(Refusal::Rejected)?;
        Ok(gradient)
    }

    /// A shard's served weights with the other shards' rows `batch` reads,
    /// asked at the snapshot's position or later (so they include this
    /// trainer's records that its own rows do, and the view is of one
    /// version), with their optimizer slots when the trainer overlaps.
    /// `None`: a shard did not answer (the batch is read again).
    fn gathered<'a>(&self, snapshot: &'a Snapshot, batch: &Batch) -> Option<Gathered<'a, Vec<f32>>> {
        let (shards, runtime) = self.shards.as_ref()?;
        let features: Vec<&Features> = batch.examples.iter().map(|e| &e.features).collect();
        let ask = Ask { at_least: snapshot.position, slots: self.overlay.is_some() };
        let view = shards.view(&self.model, (snapshot.weights.as_slice(), snapshot.position), ask, &features);
        match runtime.block_on(view) {
            Ok((view, _)) => Some(view),
            Err(e) => {
                warn!(error = %e, "cannot gather the batch's rows from the other shards: reading it again");
                // The shard's replicas are away: not a loop at full speed.
                std::thread::sleep(GATHER_RETRY_AFTER);
                None
            }
        }
    }

    /// The progressive loss and gradient of `batch` against the served
    /// weights, checked as the applier will check it; the batch loses the
    /// events it could not learn. A batch whose gradient the applier would
    /// refuse (a retry would compute the same one) has each event's
    /// gradient checked alone at the same weights: the events refused alone
    /// go to the dead-letter topic and count as skipped, and the rest are
    /// learned. (The rest's gradient is the sum of gradients each within the
    /// per-example bound, so it is within the batch's.)
    /// `None`: a shard's rows could not be gathered (the batch is read
    /// again).
    pub(super) fn gradient(&mut self, batch: &mut Batch) -> Option<(i64, Gradient)> {
        let snapshot = self.serving.load_full();
        let gathered = match &self.shards {
            Some(_) => Some(self.gathered(&snapshot, batch)?),
            None => None,
        };
        let overlaid = self.overlay.as_mut().and_then(|overlay| {
            overlay.retire(&snapshot.watermarks);
            overlay.over(&self.model, &snapshot, gathered.as_ref(), &batch.examples)
        });
        let at = match (overlaid, &gathered) {
            (Some(overlaid), _) => At::Overlaid(Box::new(overlaid)),
            (None, Some(gathered)) => At::Gathered(gathered),
            (None, None) => At::Served(&snapshot),
        };
        let refusal = match self.checked_gradient(&at, &batch.examples) {
            Ok(gradient) => return Some((snapshot.position, gradient)),
            Err(refusal) => refusal,
        };
        warn!(ranges = ?batch.ranges, events = batch.examples.len(), reason = %refusal,
            "gradient refused: checking each event's alone");
        let refused: Vec<(usize, Refusal)> = (0..batch.examples.len())
            .filter_map(|i| Some((i, self.checked_gradient(&at, &batch.examples[i..=i]).err()?)))
            .collect();
        for (i, refusal) in refused.iter().rev() {
            batch.examples.remove(*i);
            self.intake.refuse_event(&batch.sources.remove(*i), refusal);
            batch.skipped += 1;
        }
        Some(match self.checked_gradient(&at, &batch.examples) {
            Ok(gradient) => (snapshot.position, gradient),
            Err(refusal) => {
                // Not reached while the gradient is a sum over events; if it
                // is, the batch is skipped whole rather than sent to be refused.
                error!(ranges = ?batch.ranges, reason = %refusal,
                    "the gradient of the events each accepted alone is refused: batch skipped");
                batch.skipped += batch.examples.len() as u32;
                batch.examples.clear();
                batch.sources.clear();
                (snapshot.position, Gradient::default())
            }
        })
    }
}
