//! The embedded checkpoint store: one directory, a file per checkpoint.
//!
//! A checkpoint is written to a temporary file, fsynced, renamed into place
//! and the directory fsynced, so a crash leaves either the whole file or
//! none (plus, at worst, a temporary file, which listing ignores and the
//! next start removes).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::format::{encode, read_header, HEADER_BYTES};
use super::{retained, CheckpointError, CheckpointInfo, Store};
use crate::model::Model;
use crate::state::ReplicaState;

#[derive(Clone, Debug)]
pub struct LocalStore {
    dir: PathBuf,
    keep: usize,
    /// Beyond the newest `keep`, also keep the newest of each such interval.
    keep_every: Option<Duration>,
}

impl LocalStore {
    /// Opens (creates) `dir`, touching no file in it: a running replica's
    /// checkpoint being written stays as it is.
    pub fn open(dir: &Path, keep: usize) -> Result<LocalStore, CheckpointError> {
        fs::create_dir_all(dir).map_err(|source| CheckpointError::Io { path: dir.into(), source })?;
        Ok(LocalStore { dir: dir.into(), keep: keep.max(1), keep_every: None })
    }

    /// Removes the temporary files a crash left mid-write: for the replica
    /// that writes this directory, as it starts. (A reader that did so
    /// would tear a running replica's write: a test that listed the store
    /// while its replica wrote failed that way.)
    pub fn removing_half_written(self) -> Result<LocalStore, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.dir.clone(), source };
        for entry in fs::read_dir(&self.dir).map_err(io)?.flatten() {
            let name = entry.file_name();
            if name.to_str().is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".tmp")) {
                tracing::info!(path = %entry.path().display(), "removing a checkpoint left half-written");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(self)
    }

    /// Also keeps, beyond the newest `keep`, the newest checkpoint of every
    /// `every` of wall-clock time (by file time): points to go back to.
    pub fn keep_one_every(mut self, every: Duration) -> LocalStore {
        self.keep_every = (!every.is_zero()).then_some(every);
        self
    }

    fn path_of(&self, position: i64) -> PathBuf {
        self.dir.join(format!("checkpoint-{position:020}.bin"))
    }
}

impl Store for LocalStore {
    fn describe(&self) -> String {
        format!("directory {}", self.dir.display())
    }

    /// One replica's directory: its checkpoints are its own.
    fn is_shared(&self) -> bool {
        false
    }

    fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError> {
        let io = |source| CheckpointError::Io { path: self.dir.clone(), source };
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let Some(position) =
                (name.to_str()).and_then(|n| n.strip_prefix("checkpoint-")?.strip_suffix(".bin")?.parse::<i64>().ok())
            else {
                continue;
            };
            let meta = entry.metadata().map_err(io)?;
            let mut head = [0u8; HEADER_BYTES];
            let header = (fs::File::open(entry.path()).and_then(|mut f| f.read_exact(&mut head)).ok())
                .and_then(|()| read_header(&head));
            out.push(CheckpointInfo {
                position,
                location: entry.path().display().to_string(),
                bytes: meta.len(),
                written: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                examples_learned: header.map(|h| h.0),
                progressive_loss: header.and_then(|h| h.1),
            });
        }
        out.sort_by_key(|c| std::cmp::Reverse(c.position));
        Ok(out)
    }

    fn save(&self, model: &Model, state: &ReplicaState) -> Result<CheckpointInfo, CheckpointError> {
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
                let _ = fs::remove_file(&old.location);
            }
        }
        Ok(CheckpointInfo {
            position: state.position,
            location: path.display().to_string(),
            bytes: bytes.len() as u64,
            written: SystemTime::now(),
            examples_learned: Some(state.examples_learned),
            progressive_loss: state.progressive_loss(),
        })
    }

    fn read(&self, info: &CheckpointInfo) -> Result<Vec<u8>, CheckpointError> {
        fs::read(&info.location).map_err(|source| CheckpointError::Io { path: info.location.clone().into(), source })
    }

    fn read_part(&self, info: &CheckpointInfo, at: u64, len: usize) -> Result<Vec<u8>, CheckpointError> {
        use std::io::{Read, Seek, SeekFrom};
        let io = |source| CheckpointError::Io { path: info.location.clone().into(), source };
        let mut file = fs::File::open(&info.location).map_err(io)?;
        file.seek(SeekFrom::Start(at)).map_err(io)?;
        let mut part = Vec::with_capacity(len.min(info.bytes.saturating_sub(at) as usize));
        file.take(len as u64).read_to_end(&mut part).map_err(io)?;
        Ok(part)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::tests::{exercise, small_model};

    #[test]
    fn saves_lists_loads_and_retains() {
        let dir = tempfile::tempdir().unwrap();
        exercise(&LocalStore::open(dir.path(), 2).unwrap());
    }

    #[test]
    fn skips_torn_files_and_removes_temporary_ones() {
        let dir = tempfile::tempdir().unwrap();
        let model = small_model();
        let store = LocalStore::open(dir.path(), 3).unwrap();
        let mut state = ReplicaState::initial(&model);
        for position in [5, 9] {
            state.position = position;
            store.save(&model, &state).unwrap();
        }
        // A torn newest file is skipped, the previous one loads.
        let newest = store.list().unwrap()[0].clone();
        let bytes = fs::read(&newest.location).unwrap();
        fs::write(&newest.location, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(store.load_newest(&model, None).unwrap().unwrap().0.position, 5);
        // The listing reads counters from headers; a torn file has none.
        fs::write(&newest.location, b"TRCK").unwrap();
        assert_eq!(store.list().unwrap()[0].examples_learned, None);
        // What a crash mid-write leaves is never listed; a reader leaves it,
        // the writer removes it when it starts.
        let tmp = dir.path().join("checkpoint-00000000000000000012.tmp");
        fs::write(&tmp, &bytes[..10]).unwrap();
        assert_eq!(store.list().unwrap().len(), 2);
        LocalStore::open(dir.path(), 3).unwrap();
        assert!(tmp.exists());
        LocalStore::open(dir.path(), 3).unwrap().removing_half_written().unwrap();
        assert!(!tmp.exists());
    }
}
