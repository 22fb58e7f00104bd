//! Checkpoints: the replica's whole state at one `updates` position, the
//! recovery point together with the log that follows it.
//!
//! Two stores sit behind [`Store`], chosen by `checkpoint.store`: a local
//! directory (the embedded default, [`local`]) and PostgreSQL ([`postgres`]),
//! shared by a fleet. Both hold the same encoding, checksummed, and both
//! write a checkpoint whole or not at all; loading skips one that fails its
//! checksum. Equal positions mean equal contents, so writing one twice, from
//! one replica or two, is harmless. The encoding is [`format`]'s.

mod format;
pub mod local;
pub mod peer;
pub mod postgres;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::config::{CheckpointStore, Config};
use crate::model::{Layout, Model};
use crate::state::ReplicaState;

use self::format::{decode, OLDEST_VERSION, VERSION};

pub use format::largest_size;
pub use local::LocalStore;
pub use postgres::PgStore;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io { path: std::path::PathBuf, source: std::io::Error },
    /// The store cannot be reached now; a retry may succeed.
    #[error("checkpoint store {store} unavailable: {reason}")]
    Unavailable { store: String, reason: String },
    #[error("checkpoint {0} is corrupt or torn")]
    Corrupt(String),
    #[error("checkpoint {location} has format {version}; this build reads formats {OLDEST_VERSION} to {VERSION}")]
    Version { location: String, version: u8 },
    #[error("checkpoint {location} belongs to a model configured otherwise{}", differing(.differs))]
    OtherModel {
        location: String,
        /// The settings that differ, `name: ours here, theirs there` (empty
        /// for a checkpoint of format 2, which does not carry them).
        differs: Vec<String>,
    },
    /// A checkpoint of a shard layout that does not hold this replica's rows.
    #[error(
        "checkpoint {location} is of shard {} of {}, which does not hold the rows of this replica's shard {} of {} \
         (a shard starts from its own shard's checkpoints, or from those of the shard it splits when a fleet grows)",
        .theirs.index, .theirs.count, .ours.index, .ours.count
    )]
    OtherLayout { location: String, theirs: Layout, ours: Layout },
    /// A `postgres://` store whose URL does not parse (shown without its password).
    #[error("checkpoint store URL {0:?} is not a valid PostgreSQL URL")]
    Url(String),
}

/// `: a; b` for the settings that differ, or nothing when they are unknown.
fn differing(differs: &[String]) -> String {
    match differs.is_empty() {
        true => String::new(),
        false => format!(": {}", differs.join("; ")),
    }
}

/// A checkpoint as listed, without its weights.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub position: i64,
    /// Where it is: a file path, or the row in PostgreSQL.
    pub location: String,
    pub bytes: u64,
    pub written: SystemTime,
    /// `None` when unknown (a torn or foreign file).
    pub examples_learned: Option<u64>,
    /// Mean progressive loss over the examples learned up to it.
    pub progressive_loss: Option<f64>,
}

/// A checkpoint store. Methods block; call them off async workers.
pub trait Store: Send + Sync + std::fmt::Debug {
    /// What and where, for logs: never a password.
    fn describe(&self) -> String;
    /// Whether every replica of the fleet reads this store (PostgreSQL), so
    /// that a checkpoint it lists is one every replica can restore.
    fn is_shared(&self) -> bool;
    /// Checkpoints, newest first.
    fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError>;
    /// Writes `state` whole or not at all, then applies the retention policy.
    fn save(&self, model: &Model, state: &ReplicaState) -> Result<CheckpointInfo, CheckpointError>;
    /// The encoded checkpoint `info` lists.
    fn read(&self, info: &CheckpointInfo) -> Result<Vec<u8>, CheckpointError>;
    /// Up to `len` bytes of it from byte `at` (fewer only at its end), for
    /// sending a checkpoint without holding it whole.
    fn read_part(&self, info: &CheckpointInfo, at: u64, len: usize) -> Result<Vec<u8>, CheckpointError>;

    fn load(&self, model: &Model, info: &CheckpointInfo) -> Result<ReplicaState, CheckpointError> {
        decode(model, &self.read(info)?, &info.location)
    }

    /// The newest checkpoint at or before `at_most` (any, if `None`) that
    /// loads; corrupt ones are skipped with a warning.
    fn load_newest(
        &self,
        model: &Model,
        at_most: Option<i64>,
    ) -> Result<Option<(ReplicaState, CheckpointInfo)>, CheckpointError> {
        for info in self.list()?.into_iter().filter(|c| at_most.is_none_or(|q| c.position <= q)) {
            match self.load(model, &info) {
                Ok(state) => return Ok(Some((state, info))),
                Err(
                    e @ (CheckpointError::Corrupt(_) | CheckpointError::Io { .. } | CheckpointError::Version { .. }),
                ) => {
                    tracing::warn!(error = %e, "skipping unreadable checkpoint")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

pub type SharedStore = Arc<dyn Store>;

/// Opens the store `checkpoint.store` names: empty or `file:PATH` a local
/// directory (empty: `checkpoint.state_dir`), `postgres://...` PostgreSQL,
/// whose migrations run first. Checkpoints in PostgreSQL are scoped by model
/// name and update log, so fleets may share a database. For reading
/// (`tributary checkpoints list`): a directory a running replica writes is
/// left as it is.
pub fn open(config: &Config) -> Result<SharedStore, CheckpointError> {
    open_as(config, false)
}

/// The same for the replica that writes the store: half-written files a
/// crash left in a directory are removed first.
pub fn open_to_write(config: &Config) -> Result<SharedStore, CheckpointError> {
    open_as(config, true)
}

fn open_as(config: &Config, writer: bool) -> Result<SharedStore, CheckpointError> {
    let c = &config.checkpoint;
    let every = Duration::from_secs(c.keep_one_every_secs);
    let local = |dir: &Path| -> Result<SharedStore, CheckpointError> {
        let store = LocalStore::open(dir, c.keep)?.keep_one_every(every);
        Ok(Arc::new(if writer { store.removing_half_written()? } else { store }))
    };
    match &c.store {
        CheckpointStore::StateDir => local(&c.state_dir),
        CheckpointStore::Directory(dir) => local(dir),
        CheckpointStore::Postgres(url) => {
            // A shard's checkpoints are its own (and hold only its rows).
            let model = match config.shard.is_sharded() {
                true => format!("{} (shard {} of {})", config.model.name, config.shard.index, config.shard.count),
                false => config.model.name.clone(),
            };
            let scope =
                postgres::Scope { model, log: config.kafka.updates_topic.clone(), writer: config.replica_id.clone() };
            Ok(Arc::new(PgStore::open(url.expose(), scope, c.keep, every)?))
        }
    }
}

/// Which of `listed` (newest first) the retention policy keeps: the newest
/// `keep`, and with `every`, the newest of each interval of that length.
fn retained(listed: &[CheckpointInfo], keep: usize, every: Option<Duration>) -> Vec<bool> {
    let mut seen = std::collections::HashSet::new();
    let slot = |c: &CheckpointInfo| {
        let secs = c.written.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        every.map(|e| secs / e.as_secs().max(1))
    };
    listed
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let first_of_slot = slot(c).is_some_and(|s| seen.insert(s));
            i < keep || first_of_slot
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::format::{encode, HEADER_BYTES};
    use super::*;
    use crate::config::{ModelConfig, ModelKind, OptimizerKind};

    /// Adam's two slots per weight make the format's every part count.
    pub(crate) fn small_model() -> Model {
        let c = ModelConfig { optimizer: Some(OptimizerKind::Adam), ..ModelConfig::small(ModelKind::WideDeep) };
        Model::new(&c).expect("a built-in model")
    }

    /// What every store must do: save, list newest first with counters,
    /// load back bit for bit, keep the newest `keep` (the store under test
    /// keeps 2), load the newest at or before a position.
    pub(crate) fn exercise(store: &dyn Store) {
        let model = small_model();
        assert!(store.list().unwrap().is_empty());
        assert!(store.load_newest(&model, None).unwrap().is_none());
        let mut state = ReplicaState::initial(&model);
        for position in [3, 5, 9] {
            state.position = position;
            state.watermarks.insert(1, position * 10);
            state.optimizer.slots[1][3][0] = position as f32;
            state.examples_learned = position as u64 * 4;
            state.loss_sum = position as f64;
            state.last_rollback = Some(position - 1);
            let info = store.save(&model, &state).unwrap();
            assert_eq!((info.position, info.examples_learned), (position, Some(position as u64 * 4)));
        }
        // Equal positions, equal contents: a second write is harmless.
        store.save(&model, &state).unwrap();
        let listed = store.list().unwrap();
        let positions: Vec<i64> = listed.iter().map(|i| i.position).collect();
        assert_eq!(positions, vec![9, 5], "keeps the newest two, newest first");
        assert_eq!((listed[0].examples_learned, listed[0].progressive_loss), (Some(36), Some(0.25)));
        assert!(listed[0].bytes > 0 && listed[0].bytes <= largest_size(&model));
        // Read in parts, it is the same bytes.
        let whole = store.read(&listed[0]).unwrap();
        let parts: Vec<u8> =
            (0..listed[0].bytes).step_by(1000).flat_map(|at| store.read_part(&listed[0], at, 1000).unwrap()).collect();
        assert_eq!((parts.len() as u64, &parts), (listed[0].bytes, &whole));
        assert!(store.read_part(&listed[0], listed[0].bytes, 1000).unwrap().is_empty(), "nothing past the end");
        let (loaded, info) = store.load_newest(&model, None).unwrap().unwrap();
        assert_eq!((loaded, info.position), (state, 9));
        assert_eq!(store.load_newest(&model, Some(8)).unwrap().unwrap().1.position, 5);
        assert!(store.load_newest(&model, Some(4)).unwrap().is_none());
        // A model configured otherwise refuses the checkpoint, naming what differs.
        let mut other = model.config().clone();
        other.buckets = 32;
        other.learning_rate = Some(model.config().step_size() * 2.0);
        let err = store.load(&Model::new(&other).expect("a built-in model"), &info).unwrap_err();
        let CheckpointError::OtherModel { differs, .. } = &err else { panic!("{err}") };
        let ours = model.config();
        // (and the parameter shapes that follow from the buckets)
        assert_eq!(
            &differs[..2],
            &[
                format!("model.buckets: 32 here, {} in the checkpoint", ours.buckets),
                format!("model.learning_rate: {} here, {} in the checkpoint", other.step_size(), ours.step_size()),
            ],
            "{err}"
        );
    }

    #[test]
    fn checkpoints_of_formats_2_and_3_still_load() {
        let model = Model::new(&ModelConfig::small(ModelKind::Logistic)).expect("a built-in model");
        let mut state = ReplicaState::initial(&model);
        state.position = 7;
        let encoded = encode(&model, &state);
        // Format 3 is format 4 without the shard layout after the settings,
        // and format 2 is format 3 without the settings after the header.
        let settings_at = HEADER_BYTES + 8;
        let settings_len: usize = 4 + model.settings().iter().map(|(n, v)| 8 + n.len() + v.len()).sum::<usize>();
        let older = |version: u8, drop: std::ops::Range<usize>| {
            let mut body = encoded[..encoded.len() - 32].to_vec();
            body.drain(drop);
            body[4] = version;
            let sum = blake3::hash(&body);
            body.extend_from_slice(sum.as_bytes());
            body
        };
        let layout_at = settings_at + settings_len;
        assert_eq!(decode(&model, &older(3, layout_at..layout_at + 8), "v3").unwrap(), state);
        assert_eq!(decode(&model, &older(2, settings_at..layout_at + 8), "v2").unwrap(), state);
    }

    #[test]
    fn a_shards_checkpoint_holds_its_rows_and_says_its_layout() {
        let whole = Model::new(&ModelConfig::small(ModelKind::WideDeep)).expect("a built-in model");
        let layout = crate::model::Layout::new(3, 2).unwrap();
        let model = whole.clone().with_layout(layout);
        let state = ReplicaState::initial(&model);
        let encoded = encode(&model, &state);
        assert!(encoded.len() < encode(&whole, &ReplicaState::initial(&whole)).len(), "a third of the rows");
        let decoded = decode(&model, &encoded, "shard").unwrap();
        assert_eq!((decoded.optimizer.layout, &decoded), (layout, &state));
        // Another shard's checkpoint is refused, naming both layouts; the
        // whole model's is narrowed to the shard's rows (a fleet growing).
        let err = decode(&whole.clone().with_layout(crate::model::Layout::new(3, 1).unwrap()), &encoded, "shard");
        assert!(err.unwrap_err().to_string().contains("shard 2 of 3"));
        let from_whole = decode(&model, &encode(&whole, &ReplicaState::initial(&whole)), "whole").unwrap();
        assert_eq!(from_whole, state);
    }

    #[test]
    fn retention_keeps_the_newest_and_one_per_interval() {
        let at = |position: i64, secs: u64| CheckpointInfo {
            position,
            location: String::new(),
            bytes: 0,
            written: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            examples_learned: None,
            progressive_loss: None,
        };
        // Newest first; hours 3, 3, 2, 2, 1, 0 (by written time).
        let listed = [
            at(60, 3 * 3600 + 50),
            at(50, 3 * 3600 + 10),
            at(40, 2 * 3600 + 30),
            at(30, 2 * 3600),
            at(20, 3700),
            at(10, 60),
        ];
        assert_eq!(retained(&listed, 2, None), [true, true, false, false, false, false]);
        let hourly = retained(&listed, 2, Some(std::time::Duration::from_secs(3600)));
        // The newest two, then the newest of hours 2, 1 and 0.
        assert_eq!(hourly, [true, true, true, false, true, true]);
    }
}

/// Checkpoint bytes that pass the checksum but not the format never panic
/// the decoder. The checksum stops random corruption, so
/// these inputs carry a valid one: what a buggy or hostile writer could make.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::format::{encode, MAGIC, VERSION};
    use super::*;
    use crate::config::{ModelConfig, ModelKind};

    fn with_checksum(mut body: Vec<u8>) -> Vec<u8> {
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        body
    }

    fn model() -> Model {
        Model::new(&ModelConfig::small(ModelKind::Logistic)).expect("a built-in model")
    }

    proptest! {
        #[test]
        fn arbitrary_bodies_with_a_valid_checksum_decode_or_fail(
            tail in proptest::collection::vec(any::<u8>(), 0..2048),
            header in any::<bool>(),
        ) {
            let model = model();
            let mut body = if header { MAGIC.to_vec() } else { Vec::new() };
            if header {
                body.push(VERSION);
                body.extend_from_slice(&model.fingerprint().to_le_bytes());
            }
            body.extend_from_slice(&tail);
            let _ = decode(&model, &with_checksum(body), "fuzz");
        }

        #[test]
        fn a_mutated_checkpoint_with_a_valid_checksum_decodes_or_fails(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let model = model();
            let encoded = encode(&model, &ReplicaState::initial(&model));
            let mut body = encoded[..encoded.len() - 32].to_vec();
            for (at, value) in edits {
                let i = at.index(body.len());
                body[i] = value;
            }
            body.truncate(cut.index(body.len() + 1));
            let _ = decode(&model, &with_checksum(body), "fuzz");
        }
    }

    #[test]
    fn a_body_of_the_magic_alone_is_corrupt_not_a_panic() {
        let model = model();
        assert!(matches!(decode(&model, &with_checksum(MAGIC.to_vec()), "x"), Err(CheckpointError::Corrupt(_))));
    }
}
