//! Synthetic training events for demos, tests and load: labels drawn from a
//! hidden logistic model over the dense values and one sparse field, so a
//! model that learns shows a progressive loss below the constant predictor's.

use crate::config::ModelConfig;

pub struct Synthetic {
    dense_dim: usize,
    fields: Vec<String>,
    state: u64,
}

impl Synthetic {
    pub fn new(model: &ModelConfig, seed: u64) -> Self {
        Synthetic { dense_dim: model.dense_dim, fields: model.sparse_fields.clone(), state: seed ^ 0x5eed }
    }

    fn next(&mut self) -> u64 {
        // xorshift64*: enough for test data.
        self.state ^= self.state >> 12;
        self.state ^= self.state << 25;
        self.state ^= self.state >> 27;
        self.state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// One event as a JSON line (no newline), with event time `ts`.
    pub fn event(&mut self, ts: i64) -> String {
        let dense: Vec<f32> =
            (0..self.dense_dim).map(|_| ((self.unit() * 2.0 - 1.0) * 100.0).round() / 100.0).collect();
        let mut logit = 0.0;
        for (i, v) in dense.iter().enumerate() {
            logit += v * if i % 2 == 0 { 2.0 } else { -1.5 };
        }
        let mut sparse = serde_json::Map::new();
        for (i, field) in self.fields.clone().iter().enumerate() {
            let value = self.next() % 50;
            if i == 0 {
                logit += if value.is_multiple_of(2) { 1.5 } else { -1.5 };
            }
            sparse.insert(field.clone(), format!("v{value}").into());
        }
        let label = u8::from(self.unit() < 1.0 / (1.0 + (-logit).exp()));
        serde_json::json!({"dense": dense, "sparse": sparse, "label": label, "ts": ts}).to_string()
    }
}

/// How much `poisoned` scales an event's dense values.
pub const POISON_SCALE: f64 = 20.0;

/// The event `line` (a JSON event) made poison for the divergence guard's
/// tests and load runs: dense values scaled by `POISON_SCALE` and the label
/// flipped, so a model's confident answers are wrong.
pub fn poisoned(line: &str) -> anyhow::Result<String> {
    let mut event: serde_json::Value = serde_json::from_str(line)?;
    let dense = event["dense"].as_array().ok_or_else(|| anyhow::anyhow!("no dense values in {line}"))?;
    let scaled: Vec<f64> = dense.iter().filter_map(serde_json::Value::as_f64).map(|v| v * POISON_SCALE).collect();
    let label = event["label"].as_u64().ok_or_else(|| anyhow::anyhow!("no 0/1 label in {line}"))?;
    event["dense"] = scaled.into();
    event["label"] = (1 - label.min(1)).into();
    Ok(event.to_string())
}

/// A held-out click-through stream, the one learning quality is measured on
/// (issue 13): standard-normal dense values, one hashed value per sparse
/// field drawn log-uniformly from `VOCABULARY` (so a few values are very
/// hot and most are rare), and labels from a hidden logistic model over
/// both that changes abruptly, every weight at once, after `drift_at`
/// events. Each event also comes as a Vowpal Wabbit text line, so VW
/// learns exactly the same examples.
pub struct CtrStream {
    dense_dim: usize,
    fields: Vec<String>,
    seed: u64,
    state: u64,
    drift_at: u64,
    emitted: u64,
}

/// Distinct values of each sparse field.
const VOCABULARY: f64 = 100_000.0;
/// The hidden model's bias: about three events in ten are positive.
const HIDDEN_BIAS: f64 = -1.0;

/// An event of [`CtrStream`], as tributary reads it and as VW does.
pub struct CtrEvent {
    pub json: String,
    pub vw: String,
}

impl CtrStream {
    pub fn new(model: &ModelConfig, seed: u64, drift_at: u64) -> CtrStream {
        CtrStream {
            dense_dim: model.dense_dim,
            fields: model.sparse_fields.clone(),
            seed,
            state: seed ^ 0xc7c7,
            drift_at,
            emitted: 0,
        }
    }

    /// splitmix64: a well-mixed hash of `x`.
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        x ^ (x >> 31)
    }

    fn uniform(&mut self) -> f64 {
        self.state = CtrStream::mix(self.state);
        ((self.state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller; one of the pair is enough here.
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// The hidden weight named by `key` in the model of `phase`: uniform in
    /// [-scale, scale], the same for every draw of the stream.
    fn hidden(&self, phase: u64, key: u64, scale: f64) -> f64 {
        let h = CtrStream::mix(self.seed ^ CtrStream::mix(phase.wrapping_mul(0x1000_0001) ^ key));
        ((h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
    }

    /// The next event, with event time `ts`.
    pub fn next_event(&mut self, ts: i64) -> CtrEvent {
        let phase = u64::from(self.emitted >= self.drift_at);
        self.emitted += 1;
        let mut logit = HIDDEN_BIAS;
        let dense: Vec<f64> = (0..self.dense_dim).map(|_| (self.normal() * 1000.0).round() / 1000.0).collect();
        for (i, x) in dense.iter().enumerate() {
            logit += x * self.hidden(phase, i as u64, 0.6);
        }
        let mut sparse = serde_json::Map::new();
        let mut vw_sparse = String::new();
        for f in 0..self.fields.len() {
            let value = (VOCABULARY.ln_1p() * self.uniform()).exp().floor() as u64 - 1;
            let field = &self.fields[f];
            logit += self.hidden(phase, (1 + f as u64) << 40 | value, 1.5);
            sparse.insert(field.clone(), format!("v{value}").into());
            vw_sparse.push_str(&format!(" {field}=v{value}"));
        }
        let label = u8::from(self.uniform() < 1.0 / (1.0 + (-logit).exp()));
        let json = serde_json::json!({"dense": dense, "sparse": sparse, "label": label, "ts": ts}).to_string();
        let vw_dense: String = dense.iter().enumerate().map(|(i, x)| format!(" d{i}:{x}")).collect();
        let vw = format!("{} |d{vw_dense} |s{vw_sparse}", if label == 1 { "1" } else { "-1" });
        CtrEvent { json, vw }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ctr_stream_has_hot_values_a_mixed_label_and_drifts() {
        let model = ModelConfig { dense_dim: 8, ..crate::config::Config::default().model };
        let mut stream = CtrStream::new(&model, 1, 5_000);
        let events: Vec<CtrEvent> = (0..10_000).map(|_| stream.next_event(0)).collect();
        let positives = events.iter().filter(|e| e.vw.starts_with("1 ")).count();
        assert!((1_500..5_000).contains(&positives), "{positives} positives in 10 000");
        let hot = events.iter().filter(|e| e.json.contains("\"f0\":\"v0\"")).count();
        assert!(hot > 400, "the hottest value of f0 is in {hot} events of 10 000 (about 6 % expected)");
        let first: serde_json::Value = serde_json::from_str(&events[0].json).unwrap();
        assert_eq!(first["dense"].as_array().unwrap().len(), 8);
        assert!(events[0].vw.contains("|d d0:") && events[0].vw.contains("|s f0=v"), "{}", events[0].vw);
        // The hidden model changes at the drift: the same value, another weight.
        assert_ne!(stream.hidden(0, 7, 1.0), stream.hidden(1, 7, 1.0));
        // The same seed, the same stream.
        let mut again = CtrStream::new(&model, 1, 5_000);
        assert_eq!(again.next_event(0).json, events[0].json);
    }
}
