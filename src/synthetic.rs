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
        let dense: Vec<f32> = (0..self.dense_dim).map(|_| ((self.unit() * 2.0 - 1.0) * 100.0).round() / 100.0).collect();
        let mut logit = 0.0;
        for (i, v) in dense.iter().enumerate() {
            logit += v * if i % 2 == 0 { 2.0 } else { -1.5 };
        }
        let mut sparse = serde_json::Map::new();
        for (i, field) in self.fields.clone().iter().enumerate() {
            let value = self.next() % 50;
            if i == 0 {
                logit += if value % 2 == 0 { 1.5 } else { -1.5 };
            }
            sparse.insert(field.clone(), format!("v{value}").into());
        }
        let label = u8::from(self.unit() < 1.0 / (1.0 + (-logit).exp()));
        serde_json::json!({"dense": dense, "sparse": sparse, "label": label, "ts": ts}).to_string()
    }
}
