//! The join's records as the topics hold them: a logged prediction and a
//! label read (their id and time), and the training event they make.

use serde::Deserialize;
use serde_json::Value;

use crate::event::{is_label_value, EventCodec, Featurizer};

/// A logged prediction's head: what the window needs before the join.
#[derive(Deserialize)]
struct PredictionHead {
    id: String,
    ts: i64,
}

/// A logged prediction's id and the time it was served (ms), or why the
/// record is not one.
pub fn prediction_head(record: &[u8]) -> Result<(String, i64), String> {
    let head: PredictionHead = serde_json::from_slice(record)
        .map_err(|e| format!("not a logged prediction {{id, instance, ts, ...}}: {e}"))?;
    Ok((head.id, head.ts))
}

/// A label record: `{"id", "label"}`.
#[derive(Deserialize)]
struct LabelRecord {
    id: String,
    label: Value,
}

/// A label record's id, or why it is not one.
pub fn label_id(record: &[u8]) -> Result<String, String> {
    let label: LabelRecord =
        serde_json::from_slice(record).map_err(|e| format!("not a label record {{id, label}}: {e}"))?;
    match is_label_value(&label.label) {
        true => Ok(label.id),
        false => Err("the label must be a number, a boolean or a string".into()),
    }
}

/// A logged prediction's body.
#[derive(Deserialize)]
struct Logged {
    instance: Value,
    ts: i64,
}

/// How joined predictions become training events.
pub struct Joining<'a> {
    pub featurizer: &'a Featurizer,
    pub codec: &'a EventCodec,
    /// The label of an expired prediction.
    pub default_label: &'a Value,
}

impl Joining<'_> {
    /// The training event of a logged prediction and its label record
    /// (`None`: the default label), as the events topic holds it, and its
    /// time (the prediction's); or why the model could not learn it.
    pub fn event(&self, prediction: &[u8], label: Option<&[u8]>) -> Result<(Vec<u8>, i64), String> {
        let logged: Logged = serde_json::from_slice(prediction).map_err(|e| format!("the logged prediction: {e}"))?;
        let label = match label {
            Some(record) => {
                serde_json::from_slice::<LabelRecord>(record).map_err(|e| format!("the label record: {e}"))?.label
            }
            None => self.default_label.clone(),
        };
        let event = self.featurizer.event_of(logged.instance, label, logged.ts).map_err(|e| e.to_string())?;
        let bytes = serde_json::to_vec(&event).expect("a JSON value serializes");
        // The trainer's own check: what is written here is learned.
        self.featurizer.event(&bytes).map_err(|e| e.to_string())?;
        Ok((self.codec.encode_parsed(bytes, event)?, logged.ts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    #[test]
    fn a_prediction_and_its_label_make_the_served_instance_labeled_at_the_prediction_time() {
        let model = ModelConfig { dense_dim: 2, sparse_fields: vec!["f0".into()], ..ModelConfig::default() };
        let featurizer = Featurizer::new(&model);
        let codec = EventCodec::Json;
        let joining = Joining { featurizer: &featurizer, codec: &codec, default_label: &Value::from(0) };
        let prediction = br#"{"id":"a","instance":{"dense":[0.1,0.25],"sparse":{"f0":"x"}},"prediction":0.5,"model_version":3,"ts":42}"#;
        assert_eq!(prediction_head(prediction), Ok(("a".into(), 42)));
        let (event, ts) = joining.event(prediction, Some(br#"{"id":"a","label":1}"#)).unwrap();
        let event: Value = serde_json::from_slice(&event).unwrap();
        let expected = serde_json::json!({"dense": [0.1, 0.25], "sparse": {"f0": "x"}, "label": 1, "ts": 42});
        assert_eq!((event, ts), (expected, 42));
        let (expired, _) = joining.event(prediction, None).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&expired).unwrap()["label"], Value::from(0));
        // A label the model cannot learn is refused with the trainer's reason.
        let refused = joining.event(prediction, Some(br#"{"id":"a","label":7}"#)).unwrap_err();
        assert!(refused.contains("out of range"), "{refused}");
        assert!(label_id(br#"{"id":"a","label":null}"#).is_err());
        assert!(prediction_head(b"{}").is_err());
    }
}
