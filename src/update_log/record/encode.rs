//! Records to bytes, in the layout the module doc gives.

use super::*;

/// Appends `s`, cut to what a u16 length can say.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let mut n = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(n) {
        n -= 1;
    }
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..n]);
}

/// A record's start: the magic, the format version, its kind.
fn header(capacity: usize, kind: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(capacity);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, kind]);
    out
}

pub(super) fn encode_settings(r: &SettingsRecord) -> Vec<u8> {
    let mut out = header(64, KIND_SETTINGS);
    out.extend_from_slice(&r.fingerprint.to_le_bytes());
    put_str(&mut out, &r.producer);
    let settings: Vec<_> = r.settings.iter().take(u16::MAX as usize).collect();
    out.extend_from_slice(&(settings.len() as u16).to_le_bytes());
    for (name, value) in settings {
        put_str(&mut out, name);
        put_str(&mut out, value);
    }
    out
}

pub(super) fn encode_attestation(r: &AttestationRecord) -> Vec<u8> {
    let mut out = header(30 + r.digest.len() + r.producer.len(), KIND_ATTESTATION);
    out.extend_from_slice(&r.fingerprint.to_le_bytes());
    out.extend_from_slice(&r.position.to_le_bytes());
    put_str(&mut out, &r.digest);
    put_str(&mut out, &r.producer);
    out
}

pub(super) fn encode_rollback(r: &RollbackRecord) -> Vec<u8> {
    let mut out = header(40 + r.reason.len() + r.producer.len(), KIND_ROLLBACK);
    out.extend_from_slice(&r.fingerprint.to_le_bytes());
    out.extend_from_slice(&r.to.to_le_bytes());
    out.extend_from_slice(&r.seen.to_le_bytes());
    out.push(match r.events {
        EventsSince::Relearn => 0,
        EventsSince::Skip => 1,
    });
    put_str(&mut out, &r.reason);
    put_str(&mut out, &r.producer);
    out
}

pub(super) fn encode_gradient(r: &GradientRecord) -> Vec<u8> {
    let floats: usize = (r.gradient.iter())
        .map(|t| match &t.values {
            GradValues::Dense(v) => v.len(),
            GradValues::Rows { ids, values } => ids.len() + values.len(),
        })
        .sum();
    let capacity = 80 + r.producer.len() + 20 * r.ranges.len() + 4 * floats + 16 * r.gradient.len();
    let mut out = header(capacity, KIND_GRADIENT);
    out.extend_from_slice(&r.fingerprint.to_le_bytes());
    out.extend_from_slice(&r.base.to_le_bytes());
    out.extend_from_slice(&r.examples.to_le_bytes());
    out.extend_from_slice(&r.skipped.to_le_bytes());
    out.extend_from_slice(&r.loss_sum.to_le_bytes());
    out.extend_from_slice(&r.oldest_ts.to_le_bytes());
    put_str(&mut out, &r.producer);
    // A trainer owns at most a few thousand partitions; more is a bug.
    let ranges = &r.ranges[..r.ranges.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(ranges.len() as u16).to_le_bytes());
    for range in ranges {
        out.extend_from_slice(&range.partition.to_le_bytes());
        out.extend_from_slice(&range.from.to_le_bytes());
        out.extend_from_slice(&range.to.to_le_bytes());
    }
    out.extend_from_slice(&(r.gradient.len() as u32).to_le_bytes());
    for t in &r.gradient {
        out.extend_from_slice(&t.param.to_le_bytes());
        match &t.values {
            GradValues::Dense(v) => {
                out.push(0);
                out.extend_from_slice(&(v.len() as u32).to_le_bytes());
                v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
            GradValues::Rows { ids, values } => {
                out.push(1);
                let width = if ids.is_empty() { 0 } else { values.len() / ids.len() };
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                out.extend_from_slice(&(width as u32).to_le_bytes());
                ids.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
                values.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes()));
            }
        }
    }
    out
}
