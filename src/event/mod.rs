//! The event and instance schema, its validation, and the hashing of sparse
//! values into buckets. Shared by serving (instances) and training (events).
//!
//! ```json
//! {"dense": [0.1, 2.0], "sparse": {"country": "de", "tags": ["a", "b"]}, "label": 1, "ts": 1764000000000}
//! ```
//! `label` and `ts` appear only in training events; `ts` is optional.
//! Training events come as JSON or, with `kafka.event_format = "avro"`, as
//! Avro records in the Confluent wire format ([`avro`]); [`EventCodec`]
//! is the one place that choice is made.

pub mod avro;
pub mod declared;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Deserialize;

use crate::config::{EventFormat, KafkaConfig, Loss, ModelConfig};

/// One sparse value or a bag of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SparseValue {
    One(String),
    Bag(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    #[serde(default)]
    dense: Vec<f32>,
    #[serde(default)]
    sparse: BTreeMap<String, SparseValue>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent {
    #[serde(default)]
    dense: Vec<f32>,
    #[serde(default)]
    sparse: BTreeMap<String, SparseValue>,
    label: f64,
    #[serde(default)]
    ts: Option<i64>,
}

/// An instance turned into model inputs: dense values and, per configured
/// sparse field (in configuration order), the bucket ids of its bag.
#[derive(Clone, Debug, PartialEq)]
pub struct Features {
    pub dense: Vec<f32>,
    pub ids: Vec<Vec<u32>>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub features: Features,
    pub label: f32,
    /// Event time, epoch milliseconds.
    pub ts: Option<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SchemaError {
    #[error("{0}")]
    Json(String),
    #[error("dense has {got} values, the model expects {want}")]
    DenseLength { got: usize, want: usize },
    #[error("dense[{0}] is not a finite number")]
    NonFinite(usize),
    #[error("unknown sparse field {0:?} (known: {1})")]
    UnknownField(String, String),
    #[error("sparse field {0:?} has {1} values, at most {MAX_BAG} are allowed")]
    BagTooLarge(String, usize),
    #[error("label {0} is out of range: log-loss needs a label in [0, 1]")]
    LabelRange(f64),
    #[error("label is not a finite number")]
    LabelNonFinite,
    #[error("sparse field {0:?} has a value of {1} bytes, at most {MAX_VALUE_BYTES} are allowed")]
    ValueTooLong(String, usize),
    #[error("the event is {0} bytes, at most {MAX_EVENT_BYTES} are allowed")]
    EventTooLarge(usize),
    #[error("{0}")]
    Avro(String),
    /// A declared feature (or the label, or the time) that the event does
    /// not give as declared.
    #[error("feature {name:?}: {reason}")]
    Feature { name: String, reason: String },
}

impl SchemaError {
    /// A short, stable name of the reason: a label value, a DLQ header.
    pub fn kind(&self) -> &'static str {
        match self {
            SchemaError::Json(_) => "json",
            SchemaError::DenseLength { .. } => "dense_length",
            SchemaError::NonFinite(_) => "non_finite",
            SchemaError::UnknownField(..) => "unknown_field",
            SchemaError::BagTooLarge(..) => "bag_too_large",
            SchemaError::LabelRange(_) => "label_range",
            SchemaError::LabelNonFinite => "label_non_finite",
            SchemaError::ValueTooLong(..) => "value_too_long",
            SchemaError::EventTooLarge(_) => "event_too_large",
            SchemaError::Avro(_) => "avro",
            SchemaError::Feature { .. } => "feature",
        }
    }
}

/// Bags larger than this are rejected: they are almost surely a bug upstream.
pub const MAX_BAG: usize = 256;
/// Sparse values longer than this are rejected, not hashed: an id, not a document.
pub const MAX_VALUE_BYTES: usize = 1024;
/// Training events larger than this are rejected before they are parsed.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Turns parsed instances into features for one model. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Featurizer {
    dense_dim: usize,
    buckets: Buckets,
    loss: Loss,
    /// The declared features (`[model.features]`); `None`: the fixed schema.
    declared: Option<Arc<declared::Declared>>,
}

impl Featurizer {
    pub fn new(model: &ModelConfig) -> Self {
        Featurizer {
            dense_dim: model.dense_dim,
            buckets: Buckets::new(&model.sparse_fields, model.buckets),
            loss: model.loss,
            declared: model.features.is_declared().then(|| Arc::new(declared::Declared::new(&model.features))),
        }
    }

    pub fn fields(&self) -> &[String] {
        &self.buckets.fields
    }

    /// Bucket of `value` in field number `field`. Stable across versions and
    /// machines: FNV-1a, not the standard library's randomized hasher.
    pub fn bucket(&self, field: usize, value: &str) -> u32 {
        self.buckets.of(field, value.as_bytes())
    }

    /// Parses one prediction instance from a JSON value: the fixed
    /// schema's, or a record as the declared features read it.
    pub fn instance(&self, value: serde_json::Value) -> Result<Features, SchemaError> {
        if let Some(declared) = &self.declared {
            return self.declared_features(declared.instance(&value, &self.buckets)?);
        }
        self.fixed_instance(value)
    }

    /// Parses one instance of the fixed schema (`dense`, `sparse`), whatever
    /// the declaration: what a tensor request's model inputs make.
    pub fn fixed_instance(&self, value: serde_json::Value) -> Result<Features, SchemaError> {
        let raw: RawInstance = serde_json::from_value(value).map_err(json_error)?;
        self.features(raw.dense, raw.sparse)
    }

    /// Parses one training event from its JSON bytes: the fixed schema's,
    /// or a record as the declared features read it (its other fields
    /// ignored).
    pub fn event(&self, bytes: &[u8]) -> Result<Example, SchemaError> {
        if bytes.len() > MAX_EVENT_BYTES {
            return Err(SchemaError::EventTooLarge(bytes.len()));
        }
        if let Some(declared) = &self.declared {
            let (features, label, ts) = declared.event(bytes, &self.buckets)?;
            let features = self.declared_features(features)?;
            return Ok(Example { features, label: self.checked_label(label)?, ts });
        }
        let raw: RawEvent = serde_json::from_slice(bytes).map_err(json_error)?;
        self.example(raw)
    }

    /// A training event from an Avro body read through the declaration
    /// by `plan` (compiled from it and the writer schema).
    fn avro_event(&self, plan: &declared::avro::Plan, body: &[u8]) -> Result<Example, SchemaError> {
        let declared = self.declared.as_ref().expect("a declared plan comes from a declaration");
        let (features, label, ts) = declared.avro_event(plan, body, &self.buckets)?;
        Ok(Example { features: self.declared_features(features)?, label: self.checked_label(label)?, ts })
    }

    /// The training event of a served instance (as it was served and
    /// logged) and its outcome: the fixed schema's instance with `label`
    /// and `ts`, or the declared record with them at their paths.
    pub fn event_of(
        &self,
        instance: serde_json::Value,
        label: serde_json::Value,
        ts: i64,
    ) -> Result<serde_json::Value, SchemaError> {
        if let Some(declared) = &self.declared {
            return declared.with_outcome(instance, label, ts);
        }
        let serde_json::Value::Object(mut event) = instance else {
            return Err(SchemaError::Json("a served instance of the fixed schema is an object".into()));
        };
        event.insert("label".into(), label);
        event.insert("ts".into(), ts.into());
        Ok(serde_json::Value::Object(event))
    }

    /// The declaration, if the model has one.
    pub fn declared(&self) -> Option<&declared::Declared> {
        self.declared.as_deref()
    }

    /// Checks a parsed event (from JSON or Avro) and turns it into features.
    fn example(&self, raw: RawEvent) -> Result<Example, SchemaError> {
        let label = self.checked_label(raw.label)?;
        Ok(Example { features: self.features(raw.dense, raw.sparse)?, label, ts: raw.ts })
    }

    /// A label the loss can learn: finite, and in [0, 1] under log-loss.
    fn checked_label(&self, label: f64) -> Result<f32, SchemaError> {
        match (label.is_finite(), self.loss) {
            (false, _) => Err(SchemaError::LabelNonFinite),
            (true, Loss::Logloss) if !(0.0..=1.0).contains(&label) => Err(SchemaError::LabelRange(label)),
            (true, _) if label.abs() > f64::from(f32::MAX) => Err(SchemaError::LabelNonFinite),
            _ => Ok(label as f32),
        }
    }

    fn features(&self, dense: Vec<f32>, sparse: BTreeMap<String, SparseValue>) -> Result<Features, SchemaError> {
        let dense = self.checked_dense(dense)?;
        let fields = &self.buckets.fields;
        let mut ids = vec![Vec::new(); fields.len()];
        for (name, value) in sparse {
            let Some(field) = fields.iter().position(|f| *f == name) else {
                return Err(SchemaError::UnknownField(name, fields.join(", ")));
            };
            ids[field] = match value {
                SparseValue::One(v) => self.buckets.bag(field, [v.as_str()].into_iter())?,
                SparseValue::Bag(vs) => self.buckets.bag(field, vs.iter().map(String::as_str))?,
            };
        }
        Ok(Features { dense, ids })
    }

    /// Features a declaration read: its dense values checked as the fixed
    /// schema's are.
    fn declared_features(&self, features: Features) -> Result<Features, SchemaError> {
        Ok(Features { dense: self.checked_dense(features.dense)?, ids: features.ids })
    }

    fn checked_dense(&self, dense: Vec<f32>) -> Result<Vec<f32>, SchemaError> {
        if dense.len() != self.dense_dim {
            return Err(SchemaError::DenseLength { got: dense.len(), want: self.dense_dim });
        }
        match dense.iter().position(|v| !v.is_finite()) {
            Some(i) => Err(SchemaError::NonFinite(i)),
            None => Ok(dense),
        }
    }
}

/// The hashing of sparse values into buckets, per field: what both the
/// fixed schema and a declaration make their bucket ids with.
#[derive(Clone, Debug)]
pub(crate) struct Buckets {
    fields: Vec<String>,
    /// Per field, a hash seed derived from its name, so equal values in two
    /// fields land in unrelated buckets.
    seeds: Vec<u64>,
    count: u32,
}

impl Buckets {
    fn new(fields: &[String], count: u32) -> Buckets {
        let seeds = fields.iter().map(|f| fnv1a_finish(fnv1a(FNV_OFFSET, f.as_bytes()))).collect();
        Buckets { fields: fields.to_vec(), seeds, count }
    }

    /// The bucket of `value` in field number `field`.
    pub(crate) fn of(&self, field: usize, value: &[u8]) -> u32 {
        (fnv1a_finish(fnv1a(self.seeds[field], value)) % u64::from(self.count)) as u32
    }

    /// The buckets of a cross in field number `field`, into `ids`: every
    /// combination of one value from each of `bags`, in order (the last
    /// bag's value varying fastest), each hashed as [`Buckets::of`] hashes
    /// its values joined by U+001F, without joining them.
    pub(crate) fn cross(&self, field: usize, bags: &[&[impl AsRef<str>]], ids: &mut Vec<u32>) {
        self.cross_from(self.seeds[field], bags, ids);
    }

    /// [`Buckets::cross`] from the hash state `h` of the parts before `bags`.
    fn cross_from(&self, h: u64, bags: &[&[impl AsRef<str>]], ids: &mut Vec<u32>) {
        let Some((first, rest)) = bags.split_first() else {
            return ids.push((fnv1a_finish(h) % u64::from(self.count)) as u32);
        };
        for value in *first {
            let h = fnv1a(h, value.as_ref().as_bytes());
            match rest.is_empty() {
                true => self.cross_from(h, rest, ids),
                false => self.cross_from(fnv1a(h, &[0x1f]), rest, ids),
            }
        }
    }

    /// The bucket ids of a bag of field number `field`, its size and each
    /// value's length checked.
    pub(crate) fn bag<'v>(
        &self,
        field: usize,
        values: impl ExactSizeIterator<Item = &'v str> + Clone,
    ) -> Result<Vec<u32>, SchemaError> {
        let name = || self.fields[field].clone();
        if values.len() > MAX_BAG {
            return Err(SchemaError::BagTooLarge(name(), values.len()));
        }
        if let Some(len) = values.clone().map(str::len).find(|&n| n > MAX_VALUE_BYTES) {
            return Err(SchemaError::ValueTooLong(name(), len));
        }
        Ok(values.map(|v| self.of(field, v.as_bytes())).collect())
    }
}

/// Whether `value` can be a label as a label record carries it: a number,
/// a boolean or a string (what the label's field or declaration reads).
pub fn is_label_value(value: &serde_json::Value) -> bool {
    value.is_number() || value.is_boolean() || value.is_string()
}

/// How training events are encoded on the events topic
/// (`kafka.event_format`), built once from the configuration: decoded by
/// the trainer, encoded by `tributary produce`.
#[derive(Debug)]
pub enum EventCodec {
    Json,
    Avro(Box<avro::AvroEvents>),
}

impl EventCodec {
    /// Reads the Avro writer schema when the format is Avro; a schema that
    /// cannot carry events (through `featurizer`'s declaration, if it has
    /// one) is an error here, at start-up.
    pub fn new(k: &KafkaConfig, featurizer: &Featurizer) -> Result<EventCodec, String> {
        match k.event_format {
            EventFormat::Json => Ok(EventCodec::Json),
            EventFormat::Avro => {
                let path = &k.avro_schema;
                let text =
                    std::fs::read_to_string(path).map_err(|e| format!("kafka.avro_schema {}: {e}", path.display()))?;
                let events = avro::AvroEvents::new(&text, k.avro_schema_id, featurizer.declared())
                    .map_err(|e| format!("kafka.avro_schema {}: {e}", path.display()))?;
                Ok(EventCodec::Avro(Box::new(events)))
            }
        }
    }

    /// The bytes for the events topic of a valid JSON event (`line`).
    pub fn encode<'a>(&self, line: &'a [u8]) -> Result<std::borrow::Cow<'a, [u8]>, String> {
        match self {
            EventCodec::Json => Ok(std::borrow::Cow::Borrowed(line)),
            EventCodec::Avro(avro) => {
                let event: serde_json::Value = serde_json::from_slice(line).map_err(|e| e.to_string())?;
                avro.encode(event).map(std::borrow::Cow::Owned)
            }
        }
    }

    /// The same for an event already parsed (`event`) whose JSON bytes
    /// (`line`) are at hand too: neither is made again.
    pub fn encode_parsed(&self, line: Vec<u8>, event: serde_json::Value) -> Result<Vec<u8>, String> {
        match self {
            EventCodec::Json => Ok(line),
            EventCodec::Avro(avro) => avro.encode(event),
        }
    }

    /// One training event from its bytes on the events topic.
    pub fn example(&self, featurizer: &Featurizer, bytes: &[u8]) -> Result<Example, SchemaError> {
        match self {
            EventCodec::Json => featurizer.event(bytes),
            EventCodec::Avro(avro) => {
                if bytes.len() > MAX_EVENT_BYTES {
                    return Err(SchemaError::EventTooLarge(bytes.len()));
                }
                avro.example(featurizer, bytes)
            }
        }
    }
}

/// serde_json reports a mistyped sparse value as "did not match any variant
/// of untagged enum": say it plainly. (An f32 overflow such as 1e39 parses as
/// infinity and is caught by the finiteness check.)
fn json_error(e: serde_json::Error) -> SchemaError {
    let msg = e.to_string();
    if msg.contains("untagged enum SparseValue") {
        return SchemaError::Json("sparse values must be a string or an array of strings".into());
    }
    SchemaError::Json(msg)
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a over `bytes`, from the state `h`: streams, so a value given in
/// parts hashes as the parts joined.
fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// FNV's low bits mix poorly; a final avalanche spreads them over buckets.
fn fnv1a_finish(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn featurizer() -> Featurizer {
        let mut m = Config::default().model;
        m.dense_dim = 2;
        m.sparse_fields = vec!["a".into(), "b".into()];
        m.buckets = 1000;
        Featurizer::new(&m)
    }

    #[test]
    fn parses_an_event_with_bags() {
        let f = featurizer();
        let e = f.event(br#"{"dense":[1,2],"sparse":{"b":["x","y"],"a":"x"},"label":1,"ts":5}"#).unwrap();
        assert_eq!(e.features.ids[0], vec![f.bucket(0, "x")]);
        assert_eq!(e.features.ids[1].len(), 2);
        assert_ne!(f.bucket(0, "x"), f.bucket(1, "x"), "fields hash independently");
        assert_eq!(e.ts, Some(5));
    }

    #[test]
    fn bucket_is_stable() {
        // A change here re-maps every deployed model's features.
        assert_eq!(featurizer().bucket(0, "hello"), 664);
    }

    #[test]
    fn rejects_bad_events_with_reasons() {
        let f = featurizer();
        let cases: &[(&[u8], &str)] = &[
            (b"{", "EOF"),
            (b"\xff\xfe", "expected value"),
            (br#"{"dense":[1],"label":1}"#, "dense has 1 values"),
            (br#"{"dense":[1,1e39],"label":1}"#, "dense[1] is not a finite number"),
            (br#"{"dense":[1,2],"label":2}"#, "out of range"),
            (br#"{"dense":[1,2]}"#, "missing field `label`"),
            (br#"{"dense":[1,2],"label":1,"sparse":{"zz":"x"}}"#, "unknown sparse field"),
            (br#"{"dense":[1,2],"label":1,"sparse":{"a":3}}"#, "string or an array"),
            (br#"{"dense":[1,2],"label":1,"extra":3}"#, "unknown field"),
        ];
        for (input, want) in cases {
            let err = f.event(input).unwrap_err().to_string();
            assert!(err.contains(want), "{:?}: {err}", String::from_utf8_lossy(input));
        }
        let long = format!(r#"{{"dense":[1,2],"label":1,"sparse":{{"a":"{}"}}}}"#, "x".repeat(2000));
        assert_eq!(f.event(long.as_bytes()).unwrap_err().kind(), "value_too_long");
        let huge = format!(r#"{{"dense":[1,2],"label":1,"sparse":{{"a":"{}"}}}}"#, "x".repeat(1 << 20));
        assert_eq!(f.event(huge.as_bytes()).unwrap_err(), SchemaError::EventTooLarge(huge.len()));
    }
}

/// Arbitrary input never panics the parser: whatever
/// bytes a producer writes, an event is parsed or refused with a reason.
/// `PROPTEST_CASES` makes a longer run.
#[cfg(test)]
mod fuzz {
    use proptest::prelude::*;

    use super::*;
    use crate::config::{ModelConfig, ModelKind};

    fn featurizer() -> Featurizer {
        Featurizer::new(&ModelConfig { dense_dim: 2, ..ModelConfig::small(ModelKind::WideDeep) })
    }

    /// JSON-shaped text: the parser's interesting inputs are near-events.
    fn near_event() -> impl Strategy<Value = String> {
        let value = prop_oneof![
            Just("1".to_string()),
            Just("-1e309".to_string()),
            Just("null".to_string()),
            "[0-9.eE+-]{0,12}",
            "\"[a-z\\\\u0-9]{0,8}\"",
            Just("[1,2]".to_string()),
            Just("[[1],{}]".to_string()),
            Just("{\"a\":[\"x\",7]}".to_string()),
        ];
        let key = prop_oneof![Just("dense"), Just("sparse"), Just("label"), Just("ts"), Just("weight"), Just("a")];
        proptest::collection::vec((key, value), 0..6).prop_map(|fields| {
            let body: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", body.join(","))
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_are_parsed_or_refused(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = featurizer().event(&bytes);
        }

        #[test]
        fn near_events_are_parsed_or_refused(text in near_event()) {
            let _ = featurizer().event(text.as_bytes());
        }
    }
}
