//! The `[shard]` section: which shard of the sparse tables this replica
//! holds, where the other shards' replicas are, and how long a gather waits
//! for them (docs/design.md section 8a).

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// Shards the sparse tables are split into: bucket `r` is shard
    /// `r mod count`'s. 1: every replica holds the whole model (no gather).
    pub count: u32,
    /// This replica's shard, `0..count`.
    pub index: u32,
    /// Each shard's replicas, shard by shard, as base URLs
    /// (`http://host:port`): `replicas[i]` are shard `i`'s, asked in this
    /// order (the next one is the hedge). This replica's own shard's list is
    /// never asked and may be empty.
    pub replicas: Vec<Vec<String>>,
    /// A shard's next replica is asked too when none answered within this.
    pub hedge_after_ms: u64,
    /// A shard none of whose replicas answered within this is unavailable:
    /// the prediction is a 503 naming it, the trainer's batch waits.
    pub deadline_ms: u64,
}

impl Default for ShardConfig {
    fn default() -> ShardConfig {
        ShardConfig { count: 1, index: 0, replicas: Vec::new(), hedge_after_ms: 25, deadline_ms: 2000 }
    }
}

impl ShardConfig {
    /// Whether the tables are split (a gather on every prediction and batch).
    pub fn is_sharded(&self) -> bool {
        self.count > 1
    }

    /// The section's own check; what it needs of the others is checked by
    /// `Config::validate`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        if self.count == 0 || self.index >= self.count {
            return bad(format!("shard.index must be below shard.count (index {}, count {})", self.index, self.count));
        }
        if !self.is_sharded() {
            return Ok(());
        }
        if self.replicas.len() != self.count as usize {
            return bad(format!(
                "shard.replicas must list each of the {} shards' replicas (a list per shard), not {} lists",
                self.count,
                self.replicas.len()
            ));
        }
        let others = (0..self.count).filter(|&s| s != self.index);
        if let Some(s) = others.clone().find(|&s| self.replicas[s as usize].is_empty()) {
            return bad(format!("shard.replicas[{s}] is empty: shard {s}'s rows could never be gathered"));
        }
        let urls = others.flat_map(|s| &self.replicas[s as usize]);
        if let Some(url) = urls.clone().find(|u| !u.starts_with("http://")) {
            return bad(format!("shard.replicas: {url:?} is not a base URL (http://host:port)"));
        }
        if self.hedge_after_ms == 0 || self.deadline_ms == 0 {
            return bad("shard.hedge_after_ms and shard.deadline_ms must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_replica_needs_every_other_shard_reachable() {
        let two = |replicas: Vec<Vec<&str>>| ShardConfig {
            count: 2,
            index: 0,
            replicas: replicas.into_iter().map(|r| r.into_iter().map(String::from).collect()).collect(),
            ..ShardConfig::default()
        };
        assert!(ShardConfig::default().validate().is_ok());
        assert!(two(vec![vec![], vec!["http://b:1"]]).validate().is_ok(), "its own shard's list may be empty");
        let err = |c: ShardConfig| c.validate().unwrap_err().to_string();
        assert!(err(two(vec![vec!["http://a:1"]])).contains("not 1 lists"));
        assert!(err(two(vec![vec!["http://a:1"], vec![]])).contains("shard.replicas[1] is empty"));
        assert!(err(two(vec![vec![], vec!["b:1"]])).contains("\"b:1\" is not a base URL"));
        assert!(err(ShardConfig { index: 2, ..two(vec![]) }).contains("below shard.count"));
    }
}
