//! Digest attestations: the fleet's check that every replica holds the same
//! weights at the same position. The state after the records before a
//! position is the same on every replica, so its digest is too. A replica
//! appends "at position p my digest is d" (an attestation record) after
//! each checkpoint it writes, and at every multiple of
//! [`ATTESTATION_INTERVAL`] it reaches once ready; it remembers its own
//! digests at those positions and at the checkpoint it started from, and
//! compares every attestation it reads with what it knows. A difference
//! means its weights are not the fleet's (a tampered or corrupt checkpoint
//! from a peer or a store, arithmetic that changed in an upgrade, a bit
//! flip): it stops applying, says where and both digests, and is not ready,
//! rather than serve and learn on weights of its own.
//!
//! A shard's weights are its own rows (docs/design.md section 8a): its
//! attestations say which shard they are of (`shard i of S <digest>`), and
//! only those of the same layout are compared; a whole model's say the
//! digest alone, as before shards.
//!
//! Owns the remembered digests and the appending; may not touch the state.

use std::collections::BTreeMap;

use tracing::{debug, warn};

use crate::model::Layout;
use crate::update_log::control::ControlLog;
use crate::update_log::record::AttestationRecord;
pub use crate::update_log::record::ATTESTATION_INTERVAL;

/// How many of its own digests a replica remembers (the newest): enough to
/// cover the attestations still on their way from replicas behind it.
const REMEMBERED: usize = 64;

pub struct Attestor {
    fingerprint: u64,
    replica_id: String,
    control: ControlLog,
    runtime: tokio::runtime::Handle,
    /// Whose digests this replica's compare with, written before its own:
    /// empty for the whole model, `shard i of S` for a shard.
    scope: String,
    /// This replica's weights digest at positions it computed it.
    own: BTreeMap<i64, String>,
}

/// The layout an attested digest is of, as written before it (empty: the
/// whole model's), and the digest.
fn scoped(digest: &str) -> (&str, &str) {
    digest.rsplit_once(' ').unwrap_or(("", digest))
}

impl Attestor {
    pub fn new(
        fingerprint: u64,
        layout: Layout,
        replica_id: &str,
        control: ControlLog,
        runtime: tokio::runtime::Handle,
    ) -> Attestor {
        let scope = match layout == Layout::WHOLE {
            true => String::new(),
            false => format!("shard {} of {}", layout.index, layout.count),
        };
        Attestor { fingerprint, replica_id: replica_id.to_string(), control, runtime, scope, own: BTreeMap::new() }
    }

    /// Remembers this replica's `digest` at `position`, to compare with the
    /// fleet's attestations of it.
    pub fn remember(&mut self, position: i64, digest: String) {
        self.own.insert(position, digest);
        while self.own.len() > REMEMBERED {
            self.own.pop_first();
        }
    }

    /// Remembers `digest` at `position` and appends it to the log, in the
    /// background (a lost attestation only leaves a position unchecked).
    pub fn attest(&mut self, position: i64, digest: String) {
        self.remember(position, digest.clone());
        let digest = match self.scope.is_empty() {
            true => digest,
            false => format!("{} {digest}", self.scope),
        };
        let record =
            AttestationRecord { fingerprint: self.fingerprint, position, digest, producer: self.replica_id.clone() };
        let control = self.control.clone();
        self.runtime.spawn(async move {
            match control.attest(record).await {
                Ok(offset) => debug!(position, offset, "weights digest attested"),
                Err(e) => warn!(position, error = format!("{e:#}"), "cannot append the weights digest attestation"),
            }
        });
    }

    /// Why this replica's weights are not the fleet's, if `r` (read at
    /// `offset`) says another digest at a position this replica knows its own.
    pub fn disagreement(&self, offset: i64, r: &AttestationRecord) -> Option<String> {
        let (scope, theirs) = scoped(&r.digest);
        if r.fingerprint != self.fingerprint || scope != self.scope {
            return None;
        }
        let own = self.own.get(&r.position).filter(|own| *own != theirs)?;
        Some(format!(
            "at update-log position {p} this replica's weights digest is {own}, but replica {producer} attested \
             {theirs} (the attestation at offset {offset}): this replica's weights are not the fleet's, and \
             applying on would serve and learn on weights of its own. Its starting checkpoint may have been \
             altered or corrupted (a peer's, or the store's), or the arithmetic differs (another build). Start it \
             again from a checkpoint of the fleet's (another peer, or the shared store), or afresh",
            p = r.position,
            producer = r.producer,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attestor() -> Attestor {
        attestor_of(Layout::WHOLE)
    }

    fn attestor_of(layout: Layout) -> Attestor {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let connection = crate::update_log::kafka::Connection::plain("127.0.0.1:1");
        let control = ControlLog::new(&connection, "updates", "r0").unwrap();
        Attestor::new(7, layout, "r0", control, runtime.handle().clone())
    }

    fn record(position: i64, digest: &str, fingerprint: u64) -> AttestationRecord {
        AttestationRecord { fingerprint, position, digest: digest.into(), producer: "r1".into() }
    }

    #[test]
    fn only_another_digest_at_a_known_position_of_the_same_model_disagrees() {
        let mut a = attestor();
        a.remember(1000, "aaaa".into());
        assert!(a.disagreement(1200, &record(1000, "aaaa", 7)).is_none(), "the same digest");
        assert!(a.disagreement(1200, &record(2000, "bbbb", 7)).is_none(), "a position it does not know");
        assert!(a.disagreement(1200, &record(1000, "bbbb", 8)).is_none(), "another model's");
        let why = a.disagreement(1200, &record(1000, "bbbb", 7)).unwrap();
        assert!(why.contains("position 1000") && why.contains("aaaa") && why.contains("bbbb"), "{why}");
    }

    #[test]
    fn a_shard_compares_digests_of_its_own_shard_only() {
        let mut a = attestor_of(Layout::new(2, 1).unwrap());
        a.remember(1000, "aaaa".into());
        assert!(a.disagreement(1200, &record(1000, "shard 1 of 2 aaaa", 7)).is_none(), "its twin");
        assert!(a.disagreement(1200, &record(1000, "shard 0 of 2 bbbb", 7)).is_none(), "the other shard");
        assert!(a.disagreement(1200, &record(1000, "bbbb", 7)).is_none(), "a whole replica");
        assert!(a.disagreement(1200, &record(1000, "shard 1 of 4 bbbb", 7)).is_none(), "a shard of a grown fleet");
        assert!(a.disagreement(1200, &record(1000, "shard 1 of 2 bbbb", 7)).is_some(), "its twin, otherwise");
        let mut whole = attestor();
        whole.remember(1000, "aaaa".into());
        assert!(whole.disagreement(1200, &record(1000, "shard 0 of 2 bbbb", 7)).is_none());
    }

    #[test]
    fn it_remembers_the_newest_digests_only() {
        let mut a = attestor();
        for p in 0..(REMEMBERED as i64 + 10) {
            a.remember(p, format!("{p}"));
        }
        assert_eq!(a.own.len(), REMEMBERED);
        assert!(a.own.contains_key(&(REMEMBERED as i64 + 9)) && !a.own.contains_key(&0));
    }
}
