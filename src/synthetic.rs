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

/// A held-out click-through stream, the one learning quality is measured
/// on: standard-normal dense values, one hashed value per sparse
/// field, and labels from a hidden logistic model over both that changes
/// abruptly, every weight at once, after `drift_at` events. Each event also
/// comes as a Vowpal Wabbit text line, so VW learns exactly the same
/// examples. Two shapes of sparse values ([`ValueShape`]): `ctr`, drawn
/// log-uniformly from 100 000 per field (a few very hot, most rare), and
/// `clicks`, a user and an ad each drawn from a Zipf law over a few
/// thousand users and a few hundred ads (few values, all hot: what a keyed
/// producer partitions by).
pub struct CtrStream {
    dense_dim: usize,
    fields: Vec<String>,
    /// How each field's values are drawn, by field.
    shapes: Vec<ValueShape>,
    seed: u64,
    state: u64,
    drift_at: u64,
    emitted: u64,
}

/// How one sparse field's values are drawn.
pub enum ValueShape {
    /// `floor(exp(U * ln(1 + n))) - 1`: value k about as likely as 1/(k+1),
    /// over `n` values.
    LogUniform(f64),
    /// Zipf: value k (from 0) with probability proportional to
    /// `1/(k+1)^s`, as the cumulative distribution over the values.
    Zipf(Vec<f64>),
}

impl ValueShape {
    fn zipf(values: usize, exponent: f64) -> ValueShape {
        let weights: Vec<f64> = (1..=values).map(|k| (k as f64).powf(-exponent)).collect();
        let total: f64 = weights.iter().sum();
        let cdf = weights
            .iter()
            .scan(0.0, |sum, w| {
                *sum += w / total;
                Some(*sum)
            })
            .collect();
        ValueShape::Zipf(cdf)
    }

    /// The value a uniform draw `u` in (0, 1) stands for.
    fn value(&self, u: f64) -> u64 {
        match self {
            ValueShape::LogUniform(n) => (n.ln_1p() * u).exp().floor() as u64 - 1,
            ValueShape::Zipf(cdf) => cdf.partition_point(|&c| c < u).min(cdf.len() - 1) as u64,
        }
    }
}

/// Distinct values of each sparse field of the `ctr` stream.
const VOCABULARY: f64 = 100_000.0;
/// The `clicks` stream's users (its first sparse field), ads (its second),
/// and the values of each further field, with the Zipf exponent of each.
const CLICKS_USERS: (usize, f64) = (5_000, 1.1);
const CLICKS_ADS: (usize, f64) = (300, 1.0);
const CLICKS_OTHER: (usize, f64) = (50, 0.8);
/// The hidden model's bias: about three events in ten are positive.
const HIDDEN_BIAS: f64 = -1.0;

/// An event of [`CtrStream`], as tributary reads it and as VW does.
pub struct CtrEvent {
    pub json: String,
    pub vw: String,
}

impl CtrStream {
    /// The `ctr` stream: log-uniform values over 100 000 per field.
    pub fn new(model: &ModelConfig, seed: u64, drift_at: u64) -> CtrStream {
        let shapes = model.sparse_fields.iter().map(|_| ValueShape::LogUniform(VOCABULARY)).collect();
        CtrStream::with_shapes(model, seed, drift_at, shapes)
    }

    /// The `clicks` stream: Zipf users and ads, few and hot.
    pub fn clicks(model: &ModelConfig, seed: u64, drift_at: u64) -> CtrStream {
        let shapes = (0..model.sparse_fields.len())
            .map(|f| {
                let (values, exponent) = [CLICKS_USERS, CLICKS_ADS].get(f).copied().unwrap_or(CLICKS_OTHER);
                ValueShape::zipf(values, exponent)
            })
            .collect();
        CtrStream::with_shapes(model, seed, drift_at, shapes)
    }

    fn with_shapes(model: &ModelConfig, seed: u64, drift_at: u64, shapes: Vec<ValueShape>) -> CtrStream {
        CtrStream {
            dense_dim: model.dense_dim,
            fields: model.sparse_fields.clone(),
            shapes,
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

    /// The next event, with event time `ts` (none: the event has no `ts`,
    /// as many teams' events do not).
    pub fn next_event(&mut self, ts: Option<i64>) -> CtrEvent {
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
            let u = self.uniform();
            let value = self.shapes[f].value(u);
            let field = &self.fields[f];
            logit += self.hidden(phase, (1 + f as u64) << 40 | value, 1.5);
            sparse.insert(field.clone(), format!("v{value}").into());
            vw_sparse.push_str(&format!(" {field}=v{value}"));
        }
        let label = u8::from(self.uniform() < 1.0 / (1.0 + (-logit).exp()));
        let mut json = serde_json::json!({"dense": dense, "sparse": sparse, "label": label});
        if let Some(ts) = ts {
            json["ts"] = ts.into();
        }
        let vw_dense: String = dense.iter().enumerate().map(|(i, x)| format!(" d{i}:{x}")).collect();
        let vw = format!("{} |d{vw_dense} |s{vw_sparse}", if label == 1 { "1" } else { "-1" });
        CtrEvent { json: json.to_string(), vw }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ctr_stream_has_hot_values_a_mixed_label_and_drifts() {
        let model = ModelConfig { dense_dim: 8, ..crate::config::Config::default().model };
        let mut stream = CtrStream::new(&model, 1, 5_000);
        let events: Vec<CtrEvent> = (0..10_000).map(|_| stream.next_event(Some(0))).collect();
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
        assert_eq!(again.next_event(Some(0)).json, events[0].json);
    }

    #[test]
    fn the_clicks_stream_has_few_hot_users_and_ads_and_events_without_a_time() {
        let model = ModelConfig { dense_dim: 8, ..crate::config::Config::default().model };
        let mut stream = CtrStream::clicks(&model, 1, 5_000);
        let events: Vec<serde_json::Value> =
            (0..20_000).map(|_| serde_json::from_str(&stream.next_event(None).json).unwrap()).collect();
        assert!(events.iter().all(|e| e.get("ts").is_none()));
        let field = |e: &serde_json::Value, f: &str| e["sparse"][f].as_str().unwrap().to_string();
        let users: std::collections::HashSet<String> = events.iter().map(|e| field(e, "f0")).collect();
        let ads: std::collections::HashSet<String> = events.iter().map(|e| field(e, "f1")).collect();
        assert!(users.len() <= 5_000 && ads.len() <= 300, "{} users, {} ads", users.len(), ads.len());
        let top_user = events.iter().filter(|e| field(e, "f0") == "v0").count();
        // Zipf(1.1) over 5 000: the top user has about 1/H = 14 % of events.
        assert!((1_500..4_500).contains(&top_user), "the hottest user is in {top_user} of 20 000");
    }
}
