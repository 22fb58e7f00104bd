//! `[model.features]`: the model's inputs declared over a team's own events,
//! as they are on their topic, instead of tributary's fixed schema. Each
//! feature names where it comes from (a path into nested objects), what it
//! is, and what a missing or wrong value does; the label says which values
//! are positive, the event time its unit. Part of the model's settings, so
//! a replica declaring otherwise refuses to join the fleet. Without the
//! section, the fixed schema (`dense`, `sparse`, `label`, `ts`) is read, as
//! always.
//!
//! ```toml
//! [model.features]
//! label = { path = "clicked", positive = [true, "click"] }
//! time = { path = "event_time", unit = "iso8601" }
//! dense = [{ name = "price", path = "price", default = 0.0, transform = "log1p" }]
//! sparse = [
//!   { name = "user", path = "user_id" },
//!   { name = "category", path = "ad.category", if_missing = "dead_letter" },
//!   { name = "hour", path = "hour", boundaries = [6, 12, 18] },
//!   { name = "user_x_category", cross = ["user", "category"] },
//! ]
//! ```

use serde::{Deserialize, Serialize};

use super::ConfigError;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeaturesConfig {
    /// Where the label is, and which of its values are positive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<LabelFeature>,
    /// Where the event time is, and its unit. Absent: the Kafka record's
    /// timestamp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<TimeFeature>,
    /// Numbers, in this order, into the model's dense input.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dense: Vec<DenseFeature>,
    /// Categories (a value, or an array of them as a bag), numbers cut
    /// into buckets, and crosses, in this order: the model's sparse fields.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sparse: Vec<SparseFeature>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelFeature {
    pub path: String,
    /// Values that make the label 1. Empty: the value is the label itself,
    /// a number (in [0, 1] under log-loss).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positive: Vec<Scalar>,
    /// Values that make the label 0. Empty: every value not positive.
    /// Set: a value in neither list goes to the dead-letter topic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negative: Vec<Scalar>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeFeature {
    pub path: String,
    #[serde(default)]
    pub unit: TimeUnit,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeUnit {
    /// Milliseconds since the epoch.
    #[default]
    Ms,
    /// Seconds since the epoch (a fraction allowed).
    S,
    /// An ISO 8601 / RFC 3339 time with its offset: `2026-12-02T21:58:00Z`.
    Iso8601,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DenseFeature {
    pub name: String,
    pub path: String,
    /// Taken when the value is missing or not a number (and transformed
    /// as a value read is). Absent: such an event goes to the dead-letter
    /// topic, naming the feature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<f32>,
    /// Applied to the value first: numbers as a team logs them (a price in
    /// cents, a count) are rarely on the scale a model learns well from.
    #[serde(default, skip_serializing_if = "Transform::is_none")]
    pub transform: Transform,
    /// Then the model's input is `(value - center) / scale`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub center: f64,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub scale: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transform {
    /// The value as it is.
    #[default]
    None,
    /// `sign(x) * ln(1 + |x|)`: for long-tailed numbers (prices, counts).
    Log1p,
}

impl Transform {
    fn is_none(&self) -> bool {
        *self == Transform::None
    }
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn is_one(x: &f64) -> bool {
    *x == 1.0
}

fn one() -> f64 {
    1.0
}

impl DenseFeature {
    /// The model's input for the number `x` read at the feature's path.
    /// The number is an f32 first, as dense values are everywhere: so a
    /// value sent as an FP32 tensor transforms exactly as the same value in
    /// a record does.
    pub fn input(&self, x: f64) -> f32 {
        let x = f64::from(x as f32);
        let x = match self.transform {
            Transform::None => x,
            Transform::Log1p => x.signum() * x.abs().ln_1p(),
        };
        match (self.center, self.scale) {
            (0.0, 1.0) => x as f32,
            (center, scale) => ((x - center) / scale) as f32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparseFeature {
    pub name: String,
    /// Where the value is; empty for a cross.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// A number cut at these (increasing) bounds: category `b0` below the
    /// first, `b1` from it to the next, and so on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub boundaries: Vec<f64>,
    /// The product of these earlier sparse features' values.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cross: Vec<String>,
    /// What a missing or wrong value does.
    #[serde(default)]
    pub if_missing: IfMissing,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IfMissing {
    /// An empty bag: the feature says nothing for this event.
    #[default]
    Empty,
    /// The event goes to the dead-letter topic, naming the feature.
    DeadLetter,
}

/// A label value as written in the declaration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl FeaturesConfig {
    /// For serde: an undeclared section is not written.
    pub fn is_empty(&self) -> bool {
        !self.is_declared()
    }

    /// Whether any feature is declared (else the fixed schema is read).
    pub fn is_declared(&self) -> bool {
        self.label.is_some() || self.time.is_some() || !self.dense.is_empty() || !self.sparse.is_empty()
    }

    /// The sparse fields the declaration makes, in order.
    pub fn sparse_names(&self) -> Vec<String> {
        self.sparse.iter().map(|f| f.name.clone()).collect()
    }

    /// The declaration's own check: a label, named paths, unique names,
    /// bounds that increase, crosses of earlier features.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(format!("model.features: {msg}")));
        let Some(label) = &self.label else {
            return bad("a declaration needs a label (label = { path = ... })".into());
        };
        let paths = std::iter::once(("label", &label.path))
            .chain(self.time.iter().map(|t| ("time", &t.path)))
            .chain(self.dense.iter().map(|f| (f.name.as_str(), &f.path)))
            .chain(self.sparse.iter().filter(|f| f.cross.is_empty()).map(|f| (f.name.as_str(), &f.path)));
        let paths: Vec<(&str, &String)> = paths.collect();
        for (name, path) in &paths {
            if path.is_empty() || path.split('.').any(str::is_empty) {
                return bad(format!("{name}: the path {path:?} is not a.b.c"));
            }
            // A value is read whole or walked into, not both.
            if let Some((other, _)) = paths.iter().find(|(_, p)| p.starts_with(&format!("{path}."))) {
                return bad(format!("{name} reads {path:?} whole, while {other} reads inside it"));
            }
        }
        let mut names: Vec<&str> = self.dense.iter().map(|f| f.name.as_str()).collect();
        names.extend(self.sparse.iter().map(|f| f.name.as_str()));
        if let Some(dup) = names.iter().enumerate().find(|(i, n)| names[..*i].contains(n)).map(|(_, n)| n) {
            return bad(format!("the name {dup:?} is declared twice"));
        }
        if let Some(f) = self.dense.iter().find(|f| !f.center.is_finite() || !f.scale.is_finite() || f.scale == 0.0) {
            return bad(format!("{}: center must be finite, and scale finite and not 0", f.name));
        }
        for (i, f) in self.sparse.iter().enumerate() {
            if !f.boundaries.windows(2).all(|w| w[0] < w[1]) || !f.boundaries.iter().all(|b| b.is_finite()) {
                return bad(format!("{}: boundaries must be finite and increasing", f.name));
            }
            let earlier = |n: &String| self.sparse[..i].iter().any(|e| e.name == *n && e.cross.is_empty());
            if !f.cross.is_empty() && (!f.path.is_empty() || f.cross.len() < 2 || !f.cross.iter().all(earlier)) {
                return bad(format!("{}: a cross has no path and names two or more earlier sparse features", f.name));
            }
        }
        Ok(())
    }
}
