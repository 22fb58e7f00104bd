//! The `[checkpoint]` section: the store (parsed once, here), how often and
//! how many checkpoints, bootstrapping from a peer, trimming the log.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{ConfigError, Secret};

/// Where checkpoints live (`checkpoint.store`), parsed when the
/// configuration is read: written in the file as the string it was.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum CheckpointStore {
    /// Empty: a local directory, `checkpoint.state_dir`.
    #[default]
    StateDir,
    /// `file:PATH`: a local directory.
    Directory(PathBuf),
    /// `postgres://...` (or `postgresql://`): a PostgreSQL database the
    /// fleet shares. The URL may carry a password.
    Postgres(Secret),
}

impl CheckpointStore {
    /// Whether every replica of the fleet reads it (so it may trim the log).
    pub fn is_shared(&self) -> bool {
        matches!(self, CheckpointStore::Postgres(_))
    }
}

impl TryFrom<String> for CheckpointStore {
    type Error = String;

    fn try_from(text: String) -> Result<CheckpointStore, String> {
        let url = text.trim();
        if url.is_empty() {
            Ok(CheckpointStore::StateDir)
        } else if let Some(path) = url.strip_prefix("file:") {
            Ok(CheckpointStore::Directory(path.trim_start_matches("//").into()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(CheckpointStore::Postgres(Secret::new(url)))
        } else {
            Err("checkpoint.store: expected empty (checkpoint.state_dir), file:PATH, or postgres://...".into())
        }
    }
}

impl From<CheckpointStore> for String {
    fn from(store: CheckpointStore) -> String {
        match store {
            CheckpointStore::StateDir => String::new(),
            CheckpointStore::Directory(path) => format!("file:{}", path.display()),
            CheckpointStore::Postgres(url) => url.expose().to_string(),
        }
    }
}

/// Whether a replica deletes update-log records below the oldest checkpoint
/// the store keeps (`checkpoint.trim_update_log`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrimUpdateLog {
    /// On for a shared store (every replica can restore what it keeps), off
    /// for a directory (its checkpoints are one replica's).
    #[default]
    Auto,
    On,
    Off,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// The store: empty for `state_dir`, `file:PATH`, or `postgres://...`.
    pub store: CheckpointStore,
    /// Directory of the embedded checkpoint store.
    pub state_dir: PathBuf,
    /// A checkpoint is written this often while the position moves.
    pub interval_secs: u64,
    /// Checkpoints kept; older ones are deleted.
    pub keep: usize,
    /// Beyond `keep`, also keep the newest checkpoint of every interval of
    /// this many seconds (points to roll back to). 0: off.
    pub keep_one_every_secs: u64,
    /// A peer replica's base URL (`http://host:port`): when this replica's
    /// store holds no checkpoint, it fetches the peer's newest
    /// (`GET /v1/models/{name}/checkpoint`), verifies it and starts there.
    /// Empty: start from the seed weights.
    pub bootstrap_from: String,
    /// Bearer token of `GET /v1/models/{name}/checkpoint`, which this
    /// replica serves its peers, and which it sends to `bootstrap_from`:
    /// one token for the fleet, at least 16 characters. Empty: the endpoint
    /// is off (404) and a bootstrap sends none.
    pub peer_token: Secret,
    /// Delete update-log records below the oldest checkpoint the store
    /// keeps, after each checkpoint (Kafka DeleteRecords), so the log is
    /// bounded by `interval_secs` x `keep`: `auto` (on for PostgreSQL, where
    /// every replica can restore what the store keeps; off for a directory,
    /// whose checkpoints are one replica's), `on`, or `off`.
    pub trim_update_log: TrimUpdateLog,
}

impl CheckpointConfig {
    /// Whether this replica trims the update log after its checkpoints.
    pub fn trims_update_log(&self) -> bool {
        match self.trim_update_log {
            TrimUpdateLog::On => true,
            TrimUpdateLog::Off => false,
            TrimUpdateLog::Auto => self.store.is_shared(),
        }
    }

    /// The checkpoint section's own check.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: &str| Err(ConfigError::Invalid(msg.to_string()));
        if self.keep == 0 {
            return bad("checkpoint.keep must be positive");
        }
        if !self.peer_token.is_empty() && self.peer_token.len() < 16 {
            return bad("checkpoint.peer_token must be at least 16 characters (or empty: checkpoints not served)");
        }
        Ok(())
    }
}

impl Default for CheckpointConfig {
    fn default() -> CheckpointConfig {
        CheckpointConfig {
            store: CheckpointStore::StateDir,
            state_dir: PathBuf::from("./state"),
            interval_secs: 30,
            keep: 3,
            keep_one_every_secs: 0,
            bootstrap_from: String::new(),
            peer_token: Secret::default(),
            trim_update_log: TrimUpdateLog::Auto,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_parsed_once_and_written_as_it_was_read() {
        for text in ["", "file:/var/lib/tributary", "postgres://u:p@db/x"] {
            let store = CheckpointStore::try_from(text.to_string()).unwrap();
            assert_eq!(String::from(store), text);
        }
        assert_eq!(CheckpointStore::try_from("file:///d".to_string()), Ok(CheckpointStore::Directory("/d".into())));
        let err = CheckpointStore::try_from("mysql://db".to_string()).unwrap_err();
        assert!(err.contains("postgres://"), "{err}");
        let shared = CheckpointConfig {
            store: CheckpointStore::try_from("postgresql://db/x".to_string()).unwrap(),
            ..CheckpointConfig::default()
        };
        assert!(shared.trims_update_log() && !CheckpointConfig::default().trims_update_log());
        assert!(!format!("{shared:?}").contains("db/x"), "the URL may hold a password: never printed");
    }
}
