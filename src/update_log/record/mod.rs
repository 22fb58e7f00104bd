//! The binary format of `updates` records. Little-endian throughout:
//!
//! ```text
//! magic "TRBU" | version u8 | kind u8 | body
//! gradient body:
//!   fingerprint u64 | base i64
//!   examples u32 | skipped u32 | loss_sum f64 | oldest_ts i64 (0: none)
//!   producer: len u16, utf-8
//!   ranges: count u16, then per range (partitions strictly increasing)
//!     partition i32 | from i64 | to i64
//!   tensors: count u32, then per tensor
//!     param u32 | kind u8 (0 dense, 1 rows)
//!     dense: len u32, f32 x len
//!     rows:  n u32, width u32, ids u32 x n, f32 x n*width
//! rollback body (a control record, docs/design.md section 7):
//!   fingerprint u64 | to i64 | seen i64 | events u8 (0 relearn, 1 skip)
//!   reason: len u16, utf-8 | producer: len u16, utf-8
//! settings body (a control record: a replica's model settings, at start):
//!   fingerprint u64 | producer: len u16, utf-8
//!   count u16, then per setting: name (len u16, utf-8), value (len u16, utf-8)
//! attestation body (a control record: a replica's weights digest at a position):
//!   fingerprint u64 | position i64 | digest: len u16, utf-8 (hex)
//!   producer: len u16, utf-8
//! ```
//! One record carries the events a trainer took from all its partitions
//! since its previous record (version 2; version 1 had one partition per
//! record): fewer, larger steps, so a gradient is computed against weights
//! that few other records have changed by the time it is applied.
//!
//! Binary rather than JSON: a `wide_deep` record carries thousands of rows,
//! and encoding is on the trainer's hot path. Decoding checks every length
//! against the bytes left and never panics, whatever it is fed.

mod decode;
mod encode;

use self::decode::{decode_attestation, decode_gradient, decode_rollback, decode_settings, Reader};
use self::encode::{encode_attestation, encode_gradient, encode_rollback, encode_settings};
use crate::model::{GradTensor, GradValues, Gradient};

const MAGIC: &[u8; 4] = b"TRBU";
const VERSION: u8 = 2;
const KIND_GRADIENT: u8 = 1;
const KIND_ROLLBACK: u8 = 2;
const KIND_SETTINGS: u8 = 3;
const KIND_ATTESTATION: u8 = 4;

/// The events `[from, to)` of one `events` partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventRange {
    pub partition: i32,
    /// Where the previous record of this partition ended, not the first
    /// event's offset (offsets may have gaps).
    pub from: i64,
    pub to: i64,
}

/// A gradient for the events of one or more ranges, each of its own
/// partition: applied whole or not at all.
#[derive(Clone, Debug, PartialEq)]
pub struct GradientRecord {
    /// The model structure the gradient belongs to.
    pub fingerprint: u64,
    /// By partition, strictly increasing; never empty.
    pub ranges: Vec<EventRange>,
    /// The `updates` position of the weights the gradient was computed on.
    pub base: i64,
    /// Events learned (valid ones).
    pub examples: u32,
    /// Events in the ranges that were invalid and skipped.
    pub skipped: u32,
    pub loss_sum: f64,
    /// Oldest event time in the batch (epoch ms), for freshness; 0 if none.
    pub oldest_ts: i64,
    pub producer: String,
    /// Empty when no event of the range was learnable; the watermark still moves.
    pub gradient: Vec<GradTensor>,
}

/// What becomes of the events learned between a rollback's target and the
/// rollback record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventsSince {
    /// The watermarks return with the weights: trainers learn those events again.
    Relearn,
    /// The watermarks stay: those events are not learned again.
    Skip,
}

impl EventsSince {
    pub const ALL: [EventsSince; 2] = [EventsSince::Relearn, EventsSince::Skip];

    /// The name in requests, metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EventsSince::Relearn => "relearn",
            EventsSince::Skip => "skip",
        }
    }
}

/// "Return to the state at position `to`", appended by the admin API or the
/// divergence guard. Every replica applies it at the same point of the log.
#[derive(Clone, Debug, PartialEq)]
pub struct RollbackRecord {
    pub fingerprint: u64,
    /// The position to return to: the state after the records before `to`.
    pub to: i64,
    /// The position of the state the rollback was decided on. A rollback
    /// applied at or after `seen` supersedes this one (so a divergence seen
    /// by every replica rolls back once, and two operators do not stack).
    pub seen: i64,
    pub events: EventsSince,
    /// Why, for logs: "admin" or what the divergence guard saw.
    pub reason: String,
    pub producer: String,
}

/// "These are my model's settings", appended by every replica when it
/// starts: the first one in the log that differs from a replica's own tells
/// it which setting its configuration gets wrong.
#[derive(Clone, Debug, PartialEq)]
pub struct SettingsRecord {
    pub fingerprint: u64,
    pub producer: String,
    pub settings: crate::model::Settings,
}

/// "At `position` my weights' digest is `digest`", appended by a replica
/// after each checkpoint it writes, and at every multiple of
/// `ATTESTATION_INTERVAL` it reaches. The state at a position is the same on
/// every replica, so a replica that knows its own digest at `position` and
/// reads another differs from the fleet, or the fleet from it: it stops
/// applying and says so, rather than serve and learn on weights of its own.
#[derive(Clone, Debug, PartialEq)]
pub struct AttestationRecord {
    pub fingerprint: u64,
    pub position: i64,
    /// `Model::digest` of the weights at `position`.
    pub digest: String,
    pub producer: String,
}

/// Positions at multiples of this are attested by every replica that
/// applies through them, so that every replica compares its weights with
/// the fleet's at least this often (a digest of the weights costs about as
/// much as reading them once).
pub const ATTESTATION_INTERVAL: i64 = 1000;

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Gradient(GradientRecord),
    Rollback(RollbackRecord),
    Settings(SettingsRecord),
    Attestation(AttestationRecord),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("not a tributary record (bad magic)")]
    Magic,
    #[error("record format version {0} is not supported (this build reads {VERSION})")]
    Version(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("record truncated at byte {0}")]
    Truncated(usize),
    #[error("producer id is not UTF-8")]
    Utf8,
    #[error("unknown rollback events mode {0}")]
    EventsKind(u8),
    #[error("a gradient record has no ranges")]
    NoRanges,
    #[error("unknown tensor kind {0}")]
    TensorKind(u8),
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// The most events (examples and skipped) one gradient record may hold:
/// the largest `train.batch_size`. The norm bound scales with a record's
/// examples, so a record may not say it holds more than a trainer can send.
pub const MAX_RECORD_EVENTS: u32 = 1 << 16;

/// The most offsets a range may cover beyond its events: gaps that hold no
/// event to learn (transaction markers, compacted or deleted events). A
/// trainer meeting a larger gap covers it in several records, so that no
/// record moves a watermark further than its events and this allowance.
pub const MAX_RANGE_GAP: i64 = 1 << 20;

impl GradientRecord {
    /// Whether the record's sizes agree with one another as a trainer's
    /// do: its events are at most [`MAX_RECORD_EVENTS`] and at most the
    /// offsets its ranges cover, and its ranges cover at most its events
    /// plus [`MAX_RANGE_GAP`] each. (Each range's own `to >= from` is the
    /// contiguity check's.)
    pub fn sizes_agree(&self) -> bool {
        let events = i128::from(self.examples) + i128::from(self.skipped);
        let covered: i128 = self.ranges.iter().map(|r| i128::from(r.to) - i128::from(r.from)).sum();
        let gaps = i128::from(MAX_RANGE_GAP) * self.ranges.len() as i128;
        events <= i128::from(MAX_RECORD_EVENTS) && events <= covered && covered <= events + gaps
    }

    pub fn new(meta: RecordMeta, gradient: Gradient) -> Self {
        GradientRecord {
            fingerprint: meta.fingerprint,
            ranges: meta.ranges,
            base: meta.base,
            examples: meta.examples,
            skipped: meta.skipped,
            loss_sum: gradient.loss_sum,
            oldest_ts: meta.oldest_ts,
            producer: meta.producer,
            gradient: gradient.tensors,
        }
    }
}

/// Everything of a gradient record but the gradient.
#[derive(Clone, Debug)]
pub struct RecordMeta {
    pub fingerprint: u64,
    pub ranges: Vec<EventRange>,
    pub base: i64,
    pub examples: u32,
    pub skipped: u32,
    pub oldest_ts: i64,
    pub producer: String,
}

impl Record {
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Record::Gradient(r) => encode_gradient(r),
            Record::Settings(r) => encode_settings(r),
            Record::Attestation(r) => encode_attestation(r),
            Record::Rollback(r) => encode_rollback(r),
        }
    }

    pub fn decode(bytes: &[u8]) -> Result<Record, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        match r.u8()? {
            VERSION => {}
            v => return Err(DecodeError::Version(v)),
        }
        let record = match r.u8()? {
            KIND_GRADIENT => Record::Gradient(decode_gradient(&mut r)?),
            KIND_ROLLBACK => Record::Rollback(decode_rollback(&mut r)?),
            KIND_SETTINGS => Record::Settings(decode_settings(&mut r)?),
            KIND_ATTESTATION => Record::Attestation(decode_attestation(&mut r)?),
            k => return Err(DecodeError::Kind(k)),
        };
        if r.at != bytes.len() {
            return Err(DecodeError::Trailing(bytes.len() - r.at));
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Record {
        Record::Gradient(GradientRecord {
            fingerprint: 7,
            ranges: vec![EventRange { partition: 3, from: 10, to: 20 }, EventRange { partition: 5, from: 0, to: 2 }],
            base: 5,
            examples: 9,
            skipped: 1,
            loss_sum: 6.5,
            oldest_ts: 1_700_000_000_000,
            producer: "replica-1".into(),
            gradient: vec![
                GradTensor { param: 0, values: GradValues::Dense(vec![1.0, -2.0]) },
                GradTensor {
                    param: 2,
                    values: GradValues::Rows { ids: vec![4, 9], values: vec![0.5, 0.25, 1.0, f32::NAN] },
                },
            ],
        })
    }

    fn rollback() -> Record {
        Record::Rollback(RollbackRecord {
            fingerprint: 7,
            to: 40,
            seen: 90,
            events: EventsSince::Skip,
            reason: "loss 2.1 over 3 x 0.6".into(),
            producer: "replica-1".into(),
        })
    }

    fn settings() -> Record {
        let settings = [("model.kind", "Logistic"), ("model.learning_rate", "0.3")];
        Record::Settings(SettingsRecord {
            fingerprint: 9,
            producer: "replica-2".into(),
            settings: settings.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        })
    }

    fn attestation() -> Record {
        Record::Attestation(AttestationRecord {
            fingerprint: 9,
            position: 3000,
            digest: "ab".repeat(32),
            producer: "replica-1".into(),
        })
    }

    #[test]
    fn round_trips() {
        assert_eq!(Record::decode(&settings().encode()).unwrap(), settings());
        assert_eq!(Record::decode(&attestation().encode()).unwrap(), attestation());
        let r = sample();
        let back = Record::decode(&r.encode()).unwrap();
        // NaN != NaN: compare the bytes of the re-encoding instead.
        assert_eq!(back.encode(), r.encode());
        assert_eq!(Record::decode(&rollback().encode()).unwrap(), rollback());
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        for bytes in [rollback().encode(), settings().encode(), attestation().encode()] {
            for cut in 0..bytes.len() {
                assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
            }
        }
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(Record::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut rng = 0x1234_5678_u64;
        for _ in 0..2000 {
            let mut b = bytes.clone();
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (rng >> 33) as usize % b.len();
            b[i] ^= (rng >> 20) as u8 | 1;
            let _ = Record::decode(&b); // must return, Ok or Err
        }
        assert_eq!(Record::decode(b"junk"), Err(DecodeError::Magic));
    }
}

/// Arbitrary bytes never panic the decoder, nor make it allocate beyond
/// what the bytes can hold (measured by the counting allocator).
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::alloc_meter;

    /// Decodes `bytes`, failing when the decoder held more at once than a
    /// few times what the bytes can back.
    fn decode_within_bound(bytes: &[u8]) -> Result<(), TestCaseError> {
        let (_, peak) = alloc_meter::measure(256 << 20, || Record::decode(bytes));
        let bound = 4096 + 8 * bytes.len();
        prop_assert!(peak <= bound, "{peak} bytes held decoding {} bytes", bytes.len());
        Ok(())
    }

    #[test]
    fn a_count_of_ranges_that_the_bytes_do_not_hold_allocates_nothing_for_them() {
        let bytes = valid()[0].clone();
        // The count of ranges follows the header, the fixed fields and the
        // producer: magic, version, kind; fingerprint, base, examples,
        // skipped, loss_sum, oldest_ts; the producer's length and bytes.
        let at = 4 + 1 + 1 + 8 + 8 + 4 + 4 + 8 + 8 + 2 + "p".len();
        assert_eq!(bytes[at..at + 2], [2, 0], "the count of ranges");
        let mut hostile = bytes[..at].to_vec();
        hostile.extend_from_slice(&u16::MAX.to_le_bytes());
        decode_within_bound(&hostile).unwrap();
        assert!(matches!(Record::decode(&hostile), Err(DecodeError::Truncated(_))));
    }

    fn valid() -> Vec<Vec<u8>> {
        let gradient = Record::Gradient(GradientRecord {
            fingerprint: 1,
            ranges: vec![EventRange { partition: 0, from: 0, to: 3 }, EventRange { partition: 2, from: 5, to: 9 }],
            base: 4,
            examples: 7,
            skipped: 0,
            loss_sum: 2.5,
            oldest_ts: 0,
            producer: "p".into(),
            gradient: vec![
                GradTensor { param: 0, values: GradValues::Dense(vec![0.5; 4]) },
                GradTensor { param: 1, values: GradValues::Rows { ids: vec![1, 3], values: vec![0.25; 4] } },
            ],
        });
        let rollback = Record::Rollback(RollbackRecord {
            fingerprint: 1,
            to: 2,
            seen: 3,
            events: EventsSince::Relearn,
            reason: "r".into(),
            producer: "p".into(),
        });
        let settings = Record::Settings(SettingsRecord {
            fingerprint: 1,
            producer: "p".into(),
            settings: [("a".to_string(), "b".to_string())].into_iter().collect(),
        });
        let attestation = Record::Attestation(AttestationRecord {
            fingerprint: 1,
            position: 2,
            digest: "d".into(),
            producer: "p".into(),
        });
        vec![gradient.encode(), rollback.encode(), settings.encode(), attestation.encode()]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_decode_or_fail(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            decode_within_bound(&bytes)?;
        }

        #[test]
        fn a_valid_header_with_arbitrary_bytes_after_decodes_or_fails(
            kind in 0u8..6,
            body in proptest::collection::vec(any::<u8>(), 0..1024),
        ) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[VERSION, kind]);
            bytes.extend_from_slice(&body);
            decode_within_bound(&bytes)?;
        }

        #[test]
        fn mutated_valid_records_decode_or_fail(
            which in 0usize..4,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = valid()[which].clone();
            for (at, value) in edits {
                let i = at.index(bytes.len());
                bytes[i] = value;
            }
            decode_within_bound(&bytes)?;
        }
    }
}
