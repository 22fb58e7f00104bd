//! Checkpoints: the replica's whole state at one `updates` position, the
//! recovery point together with the log that follows it.
//!
//! The embedded store is a local directory. A checkpoint is written to a
//! temporary file, fsynced, renamed into place and the directory fsynced, so
//! a crash leaves either the whole file or none; a checksum over the content
//! catches anything else, and loading skips a file that fails it. Equal
//! positions mean equal contents, so writing one twice is harmless.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::apply::optim::Optimizer;
use crate::apply::rule::State;
use crate::config::OptimizerKind;
use crate::model::{f32_bytes, Model};

const MAGIC: &[u8; 4] = b"TRCK";
const VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("checkpoint {0} is corrupt or torn")]
    Corrupt(PathBuf),
    #[error("checkpoint {0} belongs to a model of another structure")]
    OtherModel(PathBuf),
}

/// A checkpoint as listed, without its weights: the counters come from its
/// header (the checksum over the whole file is checked when it is loaded).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointInfo {
    pub position: i64,
    pub path: PathBuf,
    pub bytes: u64,
    pub written: SystemTime,
    /// `None` when the header cannot be read (a torn or foreign file).
    pub examples_learned: Option<u64>,
    /// Mean progressive loss over the examples learned up to it.
    pub progressive_loss: Option<f64>,
}

/// Where the header's fields sit: magic, version, fingerprint, position,
/// five counters (examples learned first), then the loss sum.
const HEADER_BYTES: usize = 4 + 1 + 8 + 8 + 5 * 8 + 8;
const EXAMPLES_AT: usize = 4 + 1 + 8 + 8;
const LOSS_SUM_AT: usize = EXAMPLES_AT + 5 * 8;

/// Examples learned and mean progressive loss from a checkpoint's header.
fn read_header(path: &Path) -> Option<(u64, Option<f64>)> {
    use std::io::Read;
    let mut head = [0u8; HEADER_BYTES];
    fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    if !head.starts_with(MAGIC) || head[4] != VERSION {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let examples = u64_at(EXAMPLES_AT);
    let loss_sum = f64::from_bits(u64_at(LOSS_SUM_AT));
    Some((examples, (examples > 0).then(|| loss_sum / examples as f64)))
}

/// The embedded checkpoint store: one directory.
#[derive(Clone, Debug)]
pub struct LocalStore {
    dir: PathBuf,
    keep: usize,
    /// Beyond the newest `keep`, also keep the newest of each such interval.
    keep_every: Option<std::time::Duration>,
}

impl LocalStore {
    pub fn open(dir: &Path, keep: usize) -> Result<LocalStore, CheckpointError> {
        fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.into(), source })?;
        Ok(LocalStore { dir: dir.into(), keep: keep.max(1), keep_every: None })
    }

    /// Also keeps, beyond the newest `keep`, the newest checkpoint of every
    /// `every` of wall-clock time (by file time): points to go back to.
    pub fn keep_one_every(mut self, every: std::time::Duration) -> LocalStore {
        self.keep_every = (!every.is_zero()).then_some(every);
        self
    }

    fn path_of(&self, position: i64) -> PathBuf {
        self.dir.join(format!("checkpoint-{position:020}.bin"))
    }

    /// Checkpoints, newest first.
    pub fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(position) = (name.to_str())
                .and_then(|n| n.strip_prefix("checkpoint-")?.strip_suffix(".bin")?.parse::<i64>().ok())
            else {
                continue;
            };
            let meta = entry.metadata().map_err(io)?;
            let header = read_header(&entry.path());
            out.push(CheckpointInfo {
                position,
                path: entry.path(),
                bytes: meta.len(),
                written: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                examples_learned: header.map(|h| h.0),
                progressive_loss: header.and_then(|h| h.1),
            });
        }
        out.sort_by(|a, b| b.position.cmp(&a.position));
        Ok(out)
    }

    /// Writes `state` atomically, then deletes all but the newest `keep`.
    pub fn save(&self, model: &Model, state: &State) -> Result<CheckpointInfo, CheckpointError> {
        let bytes = encode(model, state);
        let path = self.path_of(state.position);
        let tmp = path.with_extension("tmp");
        let io = |source| CheckpointError::Io { path: tmp.clone(), source };
        let mut file = fs::File::create(&tmp).map_err(io)?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&tmp, &path).map_err(io)?;
        fs::File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io)?;
        let listed = self.list()?;
        for (old, keep) in listed.iter().zip(retained(&listed, self.keep, self.keep_every)) {
            if !keep {
                let _ = fs::remove_file(&old.path);
            }
        }
        Ok(CheckpointInfo {
            position: state.position,
            path,
            bytes: bytes.len() as u64,
            written: SystemTime::now(),
            examples_learned: Some(state.examples_learned),
            progressive_loss: state.progressive_loss(),
        })
    }

    /// The newest checkpoint that loads; corrupt ones are skipped with a warning.
    pub fn load_newest(&self, model: &Model) -> Result<Option<(State, CheckpointInfo)>, CheckpointError> {
        for info in self.list()? {
            match self.load(model, &info.path) {
                Ok(state) => return Ok(Some((state, info))),
                Err(e @ CheckpointError::OtherModel(_)) => return Err(e),
                Err(e) => tracing::warn!(error = %e, "skipping unreadable checkpoint"),
            }
        }
        Ok(None)
    }

    pub fn load(&self, model: &Model, path: &Path) -> Result<State, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Io { path: path.into(), source })?;
        decode(model, &bytes, path)
    }
}

/// Which of `listed` (newest first) the retention policy keeps: the newest
/// `keep`, and with `every`, the newest of each interval of that length.
fn retained(listed: &[CheckpointInfo], keep: usize, every: Option<std::time::Duration>) -> Vec<bool> {
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

fn encode(model: &Model, s: &State) -> Vec<u8> {
    let floats: usize = s.weights.iter().map(Vec::len).sum::<usize>() * (1 + s.optimizer.slots.len());
    let mut out = Vec::with_capacity(floats * 4 + 256);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&model.fingerprint().to_le_bytes());
    out.extend_from_slice(&s.position.to_le_bytes());
    for v in [s.examples_learned, s.examples_skipped, s.records_applied, s.records_rejected, s.optimizer.steps] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&s.loss_sum.to_le_bytes());
    out.extend_from_slice(&(s.watermarks.len() as u32).to_le_bytes());
    for (p, o) in &s.watermarks {
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&o.to_le_bytes());
    }
    out.push(s.optimizer.slots.len() as u8);
    for buffers in std::iter::once(&s.weights).chain(&s.optimizer.slots) {
        for b in buffers {
            out.extend_from_slice(f32_bytes(b));
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

fn decode(model: &Model, bytes: &[u8], path: &Path) -> Result<State, CheckpointError> {
    let corrupt = || CheckpointError::Corrupt(path.into());
    let body_len = bytes.len().checked_sub(32).ok_or_else(corrupt)?;
    let (body, sum) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != sum || !body.starts_with(MAGIC) || body.get(4) != Some(&VERSION) {
        return Err(corrupt());
    }
    let mut at = 5;
    let mut take = |n: usize| -> Result<&[u8], CheckpointError> {
        let s = body.get(at..at + n).ok_or_else(corrupt)?;
        at += n;
        Ok(s)
    };
    let u64_at = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    if u64_at(take(8)?) != model.fingerprint() {
        return Err(CheckpointError::OtherModel(path.into()));
    }
    let position = u64_at(take(8)?) as i64;
    let mut counters = [0u64; 5];
    for c in &mut counters {
        *c = u64_at(take(8)?);
    }
    let loss_sum = f64::from_bits(u64_at(take(8)?));
    let n = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
    let mut watermarks = BTreeMap::new();
    for _ in 0..n {
        let p = i32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
        watermarks.insert(p, u64_at(take(8)?) as i64);
    }
    let slots = take(1)?[0] as usize;
    let c = model.config();
    let mut optimizer = Optimizer::new(c.optimizer, c.learning_rate, model.params());
    let want_slots = match c.optimizer {
        OptimizerKind::Sgd => 0,
        OptimizerKind::Adagrad => 1,
        OptimizerKind::Adam => 2,
    };
    if slots != want_slots {
        return Err(CheckpointError::OtherModel(path.into()));
    }
    let mut read_buffers = || {
        (model.params().iter())
            .map(|p| {
                let raw = take(p.len() * 4)?;
                Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
            })
            .collect::<Result<Vec<Vec<f32>>, CheckpointError>>()
    };
    let weights = read_buffers()?;
    for slot in 0..slots {
        optimizer.slots[slot] = read_buffers()?;
    }
    optimizer.steps = counters[4];
    if at != body.len() {
        return Err(corrupt());
    }
    Ok(State {
        position,
        watermarks,
        examples_learned: counters[0],
        examples_skipped: counters[1],
        records_applied: counters[2],
        records_rejected: counters[3],
        loss_sum,
        weights,
        optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ModelKind};

    #[test]
    fn saves_loads_retains_and_skips_torn_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default().model;
        c.kind = ModelKind::WideDeep;
        c.buckets = 64;
        c.optimizer = OptimizerKind::Adam;
        let model = Model::new(&c);
        let store = LocalStore::open(dir.path(), 2).unwrap();
        let mut state = State::initial(&model);
        for position in [3, 5, 9] {
            state.position = position;
            state.watermarks.insert(1, position * 10);
            state.optimizer.slots[1][3][0] = position as f32;
            store.save(&model, &state).unwrap();
        }
        let listed: Vec<i64> = store.list().unwrap().iter().map(|i| i.position).collect();
        assert_eq!(listed, vec![9, 5], "keeps the newest two");

        let (loaded, info) = store.load_newest(&model).unwrap().unwrap();
        assert_eq!((loaded.clone(), info.position), (state.clone(), 9));
        // A torn newest file is skipped, the previous one loads.
        let bytes = fs::read(&info.path).unwrap();
        fs::write(&info.path, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(store.load_newest(&model).unwrap().unwrap().0.position, 5);
        // The listing reads counters from headers; a torn file has none.
        state.examples_learned = 40;
        state.loss_sum = 10.0;
        state.position = 11;
        store.save(&model, &state).unwrap();
        let listed = store.list().unwrap();
        assert_eq!((listed[0].examples_learned, listed[0].progressive_loss), (Some(40), Some(0.25)));
        fs::write(&listed[0].path, b"TRCK").unwrap();
        assert_eq!(store.list().unwrap()[0].examples_learned, None);
    }

    #[test]
    fn retention_keeps_the_newest_and_one_per_interval() {
        let at = |position: i64, secs: u64| CheckpointInfo {
            position,
            path: PathBuf::new(),
            bytes: 0,
            written: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            examples_learned: None,
            progressive_loss: None,
        };
        // Newest first; hours 3, 3, 2, 2, 1, 0 (by written time).
        let listed = [at(60, 3 * 3600 + 50), at(50, 3 * 3600 + 10), at(40, 2 * 3600 + 30), at(30, 2 * 3600), at(20, 3700), at(10, 60)];
        assert_eq!(retained(&listed, 2, None), [true, true, false, false, false, false]);
        let hourly = retained(&listed, 2, Some(std::time::Duration::from_secs(3600)));
        // The newest two, then the newest of hours 2, 1 and 0.
        assert_eq!(hourly, [true, true, true, false, true, true]);
    }
}
