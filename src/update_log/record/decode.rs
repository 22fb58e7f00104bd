//! Bytes to records: every length checked against the bytes left, so that
//! decoding never panics and never allocates what the bytes do not back.

use super::*;

pub(super) fn decode_rollback(r: &mut Reader) -> Result<RollbackRecord, DecodeError> {
    let fingerprint = r.u64()?;
    let (to, seen) = (r.u64()? as i64, r.u64()? as i64);
    let events = match r.u8()? {
        0 => EventsSince::Relearn,
        1 => EventsSince::Skip,
        k => return Err(DecodeError::EventsKind(k)),
    };
    let (reason, producer) = (r.string()?, r.string()?);
    Ok(RollbackRecord { fingerprint, to, seen, events, reason, producer })
}

pub(super) fn decode_attestation(r: &mut Reader) -> Result<AttestationRecord, DecodeError> {
    let (fingerprint, position) = (r.u64()?, r.u64()? as i64);
    let (digest, producer) = (r.string()?, r.string()?);
    Ok(AttestationRecord { fingerprint, position, digest, producer })
}

pub(super) fn decode_settings(r: &mut Reader) -> Result<SettingsRecord, DecodeError> {
    let fingerprint = r.u64()?;
    let producer = r.string()?;
    let mut settings = crate::model::Settings::new();
    for _ in 0..r.u16()? {
        let name = r.string()?;
        settings.insert(name, r.string()?);
    }
    Ok(SettingsRecord { fingerprint, producer, settings })
}

pub(super) fn decode_gradient(r: &mut Reader) -> Result<GradientRecord, DecodeError> {
    let fingerprint = r.u64()?;
    let base = r.u64()? as i64;
    let (examples, skipped) = (r.u32()?, r.u32()?);
    let loss_sum = f64::from_bits(r.u64()?);
    let oldest_ts = r.u64()? as i64;
    let producer = r.string()?;
    let n_ranges = r.u16()?;
    if n_ranges == 0 {
        return Err(DecodeError::NoRanges);
    }
    // Capacity from what the bytes left can hold (20 per range), never
    // from the count alone.
    let mut ranges = Vec::with_capacity(usize::from(n_ranges).min(r.left() / 20));
    for _ in 0..n_ranges {
        let partition = r.u32()? as i32;
        let (from, to) = (r.u64()? as i64, r.u64()? as i64);
        ranges.push(EventRange { partition, from, to });
    }
    let count = r.u32()?;
    let mut gradient = Vec::new();
    for _ in 0..count {
        let param = r.u32()?;
        let values = match r.u8()? {
            0 => {
                let len = r.u32()? as usize;
                GradValues::Dense(r.f32s(len)?)
            }
            1 => {
                let (n, width) = (r.u32()? as usize, r.u32()? as usize);
                let ids = r.take(n.checked_mul(4).ok_or(DecodeError::Truncated(r.at))?)?;
                let ids = ids.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4"))).collect();
                let values = r.f32s(n.checked_mul(width).ok_or(DecodeError::Truncated(r.at))?)?;
                GradValues::Rows { ids, values }
            }
            k => return Err(DecodeError::TensorKind(k)),
        };
        gradient.push(GradTensor { param, values });
    }
    Ok(GradientRecord { fingerprint, ranges, base, examples, skipped, loss_sum, oldest_ts, producer, gradient })
}

pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) at: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn left(&self) -> usize {
        self.bytes.len() - self.at
    }
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len()).ok_or(DecodeError::Truncated(self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub(super) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn string(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        Ok(std::str::from_utf8(self.take(n)?).map_err(|_| DecodeError::Utf8)?.to_string())
    }
    pub(super) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    pub(super) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub(super) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub(super) fn f32s(&mut self, n: usize) -> Result<Vec<f32>, DecodeError> {
        let bytes = self.take(n.checked_mul(4).ok_or(DecodeError::Truncated(self.at))?)?;
        let mut values = vec![0f32; n];
        for (value, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
            *value = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(values)
    }
}
