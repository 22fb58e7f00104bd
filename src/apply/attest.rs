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
//! Owns the remembered digests and the appending; may not touch the state.

use std::collections::BTreeMap;

use tracing::{debug, warn};

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
    /// This replica's weights digest at positions it computed it.
    own: BTreeMap<i64, String>,
}

impl Attestor {
    pub fn new(fingerprint: u64, replica_id: &str, control: ControlLog, runtime: tokio::runtime::Handle) -> Attestor {
        Attestor { fingerprint, replica_id: replica_id.to_string(), control, runtime, own: BTreeMap::new() }
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
        if r.fingerprint != self.fingerprint {
            return None;
        }
        let own = self.own.get(&r.position).filter(|own| **own != r.digest)?;
        Some(format!(
            "at update-log position {p} this replica's weights digest is {own}, but replica {producer} attested \
             {theirs} (the attestation at offset {offset}): this replica's weights are not the fleet's, and \
             applying on would serve and learn on weights of its own. Its starting checkpoint may have been \
             altered or corrupted (a peer's, or the store's), or the arithmetic differs (another build). Start it \
             again from a checkpoint of the fleet's (another peer, or the shared store), or afresh",
            p = r.position,
            producer = r.producer,
            theirs = r.digest,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attestor() -> Attestor {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let connection = crate::update_log::kafka::Connection::plain("127.0.0.1:1");
        let control = ControlLog::new(&connection, "updates", "r0").unwrap();
        Attestor::new(7, "r0", control, runtime.handle().clone())
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
    fn it_remembers_the_newest_digests_only() {
        let mut a = attestor();
        for p in 0..(REMEMBERED as i64 + 10) {
            a.remember(p, format!("{p}"));
        }
        assert_eq!(a.own.len(), REMEMBERED);
        assert!(a.own.contains_key(&(REMEMBERED as i64 + 9)) && !a.own.contains_key(&0));
    }
}
