//! The checkpoint encoding, the same in every store: a header (magic,
//! version, fingerprint, position, counters, loss), the model's settings,
//! the watermarks, the weights and the optimizer's slots as f32, then a
//! BLAKE3 checksum of all of it. Decoding checks the checksum first, and
//! never allocates what the bytes do not back.

use std::collections::BTreeMap;

use super::CheckpointError;
use crate::model::{f32_bytes, settings_diff, Layout, Model, ParamSpec, Settings};
use crate::state::optim::Optimizer;
use crate::state::ReplicaState;

pub(super) const MAGIC: &[u8; 4] = b"TRCK";
/// 2: adds the offset of the last rollback taken after the loss sum.
/// 3: adds the model's settings after it, so that a checkpoint of a model
/// configured otherwise is refused naming the settings that differ.
/// 4: adds the shard layout after the settings (shard count, then index):
/// a shard's checkpoint holds its rows of the sparse tables only.
pub(super) const VERSION: u8 = 4;
/// The oldest format this build still reads (it has no settings).
pub(super) const OLDEST_VERSION: u8 = 2;

/// Where the header's fields sit: magic, version, fingerprint, position,
/// five counters (examples learned first), then the loss sum.
pub(super) const HEADER_BYTES: usize = 4 + 1 + 8 + 8 + 5 * 8 + 8;
const EXAMPLES_AT: usize = 4 + 1 + 8 + 8;
const LOSS_SUM_AT: usize = EXAMPLES_AT + 5 * 8;

/// Examples learned and mean progressive loss from a checkpoint's header.
pub(super) fn read_header(head: &[u8; HEADER_BYTES]) -> Option<(u64, Option<f64>)> {
    if !head.starts_with(MAGIC) || !(OLDEST_VERSION..=VERSION).contains(&head[4]) {
        return None;
    }
    let u64_at = |at: usize| u64::from_le_bytes(head[at..at + 8].try_into().expect("8 bytes"));
    let examples = u64_at(EXAMPLES_AT);
    let loss_sum = f64::from_bits(u64_at(LOSS_SUM_AT));
    Some((examples, (examples > 0).then(|| loss_sum / examples as f64)))
}

/// The most bytes a checkpoint of `model` can take: its weights and at
/// most two optimizer slots per parameter (Adam's and FTRL's), as f32, and
/// a megabyte for the header, settings and watermarks. A peer's answer
/// longer than this is refused before it is read.
pub fn largest_size(model: &Model) -> u64 {
    let floats: u64 = model.params().iter().map(|p| p.len() as u64).sum();
    floats * 3 * 4 + (1 << 20)
}

pub(super) fn encode(model: &Model, s: &ReplicaState) -> Vec<u8> {
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
    out.extend_from_slice(&s.last_rollback.unwrap_or(-1).to_le_bytes());
    out.extend_from_slice(&(model.settings().len() as u32).to_le_bytes());
    for text in model.settings().iter().flat_map(|(name, value)| [name, value]) {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    let layout = s.optimizer.layout;
    out.extend_from_slice(&layout.count.to_le_bytes());
    out.extend_from_slice(&layout.index.to_le_bytes());
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

pub(super) fn decode(model: &Model, bytes: &[u8], location: &str) -> Result<ReplicaState, CheckpointError> {
    let mut r = Body::verified(bytes, location)?;
    let fingerprint = r.u64()?;
    let position = r.u64()? as i64;
    let mut counters = [0u64; 5];
    for c in &mut counters {
        *c = r.u64()?;
    }
    let loss_sum = f64::from_bits(r.u64()?);
    let last_rollback = Some(r.u64()? as i64).filter(|&at| at >= 0);
    // Format 2 has no settings: a mismatch is refused without naming them.
    let settings = if r.version >= 3 { Some(r.settings()?) } else { None };
    if fingerprint != model.fingerprint() {
        let differs = settings.map_or_else(Vec::new, |s| settings_diff(model.settings(), &s, "in the checkpoint"));
        return Err(CheckpointError::OtherModel { location: location.into(), differs });
    }
    let layout = r.layout()?;
    let mut watermarks = BTreeMap::new();
    for _ in 0..r.u32()? {
        let p = r.i32()?;
        watermarks.insert(p, r.u64()? as i64);
    }
    let slots = r.take(1)?[0] as usize;
    if slots != model.config().optimizer().slots() {
        return Err(CheckpointError::OtherModel { location: location.into(), differs: Vec::new() });
    }
    let held = layout.held(model.params());
    let weights = r.buffers(&held)?;
    let mut optimizer = Optimizer::for_layout(model.config(), model.params(), layout);
    for slot in 0..slots {
        optimizer.slots[slot] = r.buffers(&held)?;
    }
    optimizer.steps = counters[4];
    r.at_end()?;
    let state = ReplicaState {
        position,
        watermarks,
        examples_learned: counters[0],
        examples_skipped: counters[1],
        records_applied: counters[2],
        records_rejected: counters[3],
        last_rollback,
        loss_sum,
        weights,
        optimizer,
    };
    // A replica of shard `ours` takes its rows of a checkpoint that holds
    // them (the whole model's, or the shard it splits as a fleet grows).
    let ours = model.layout();
    state.narrowed_to(model, ours).ok_or_else(|| CheckpointError::OtherLayout {
        location: location.into(),
        theirs: layout,
        ours,
    })
}

/// A checkpoint's body, checksum and version checked, read front to back;
/// reading past its end is `Corrupt`, so a hostile length allocates nothing
/// the bytes do not back.
struct Body<'a> {
    body: &'a [u8],
    at: usize,
    version: u8,
    location: &'a str,
}

impl<'a> Body<'a> {
    /// The body of `bytes` once its checksum, magic and version hold,
    /// positioned after the version.
    fn verified(bytes: &'a [u8], location: &'a str) -> Result<Body<'a>, CheckpointError> {
        let corrupt = || CheckpointError::Corrupt(location.into());
        let body_len = bytes.len().checked_sub(32).ok_or_else(corrupt)?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum || !body.starts_with(MAGIC) {
            return Err(corrupt());
        }
        let version = *body.get(4).ok_or_else(corrupt)?;
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(CheckpointError::Version { location: location.into(), version });
        }
        Ok(Body { body, at: 5, version, location })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], CheckpointError> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.body.len());
        let end = end.ok_or_else(|| CheckpointError::Corrupt(self.location.into()))?;
        let s = &self.body[self.at..end];
        self.at = end;
        Ok(s)
    }

    /// The shard layout of format 4; before it, every checkpoint was of the
    /// whole model.
    fn layout(&mut self) -> Result<Layout, CheckpointError> {
        if self.version < 4 {
            return Ok(Layout::WHOLE);
        }
        let layout = Layout::new(self.u32()?, self.u32()?).filter(|l| l.count > 0);
        layout.ok_or_else(|| CheckpointError::Corrupt(self.location.into()))
    }

    fn u64(&mut self) -> Result<u64, CheckpointError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn u32(&mut self) -> Result<u32, CheckpointError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn i32(&mut self) -> Result<i32, CheckpointError> {
        Ok(i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    /// One buffer per parameter of `model`, as f32.
    /// One buffer per parameter of the shapes `params`.
    fn buffers(&mut self, params: &[ParamSpec]) -> Result<Vec<Vec<f32>>, CheckpointError> {
        (params.iter())
            .map(|p| {
                let raw = self.take(p.len() * 4)?;
                Ok(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
            })
            .collect()
    }

    /// The settings block of format 3: a count, then each name and value as
    /// a length and its UTF-8 bytes, read piece by piece, so a hostile count
    /// allocates nothing up front.
    fn settings(&mut self) -> Result<Settings, CheckpointError> {
        let count = self.u32()?;
        let mut settings = Settings::new();
        for _ in 0..count {
            let name = self.text()?;
            settings.insert(name, self.text()?);
        }
        Ok(settings)
    }

    fn text(&mut self) -> Result<String, CheckpointError> {
        let len = self.u32()? as usize;
        Ok(String::from_utf8_lossy(self.take(len)?).into_owned())
    }

    /// Nothing may follow the last buffer.
    fn at_end(&self) -> Result<(), CheckpointError> {
        match self.at == self.body.len() {
            true => Ok(()),
            false => Err(CheckpointError::Corrupt(self.location.into())),
        }
    }
}
