//! Avro training events in the Confluent wire format: a magic byte 0, the
//! writer schema's id (4 bytes, big-endian), then the Avro binary body.
//! There is no schema registry: the writer schema is a file in the
//! configuration (`kafka.avro_schema`), and `kafka.avro_schema_id` (when
//! set) is the one id accepted. Fields map to the JSON event schema by
//! name and go through the same validation; what does not decode becomes a
//! dead letter with reason kind `avro`.
//!
//! A registry would slot in at [`AvroEvents::schema_for`]: fetch the
//! writer schema by id (cached) instead of comparing the id with the
//! configured one.

use std::collections::BTreeMap;

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use super::{RawEvent, SchemaError, SparseValue, MAX_EVENT_BYTES};

/// The fields an event schema may have; `label` is required.
const FIELDS: [&str; 4] = ["dense", "sparse", "label", "ts"];

/// Decodes (and encodes) events of one writer schema.
#[derive(Debug)]
pub struct AvroEvents {
    schema: Schema,
    schema_id: Option<u32>,
}

impl AvroEvents {
    /// Parses the writer schema `text` and checks that it is a record of
    /// the event's fields (`label` required, nothing else): a mismatch is a
    /// configuration error at start-up, not a dead letter per event.
    pub fn new(text: &str, schema_id: Option<u32>) -> Result<AvroEvents, String> {
        // A count or length in a body is never larger than the body, which
        // is at most MAX_EVENT_BYTES: no hostile prefix allocates more.
        apache_avro::util::max_allocation_bytes(MAX_EVENT_BYTES);
        let schema = Schema::parse_str(text).map_err(|e| format!("not an Avro schema: {e}"))?;
        let Schema::Record(record) = &schema else {
            return Err("the event schema must be an Avro record".into());
        };
        let names: Vec<&str> = record.fields.iter().map(|f| f.name.as_str()).collect();
        if let Some(other) = names.iter().find(|n| !FIELDS.contains(n)) {
            return Err(format!("field {other:?} is not an event field (they are {FIELDS:?})"));
        }
        if !names.contains(&"label") {
            return Err("the event schema has no field \"label\"".into());
        }
        Ok(AvroEvents { schema, schema_id })
    }

    /// The writer schema of a record framed with `id`.
    fn schema_for(&self, id: u32) -> Result<&Schema, SchemaError> {
        match self.schema_id {
            Some(want) if want != id => {
                Err(avro(format!("schema id {id}; this replica reads schema id {want} (kafka.avro_schema_id)")))
            }
            _ => Ok(&self.schema),
        }
    }

    /// The event a framed record carries.
    pub(super) fn decode(&self, bytes: &[u8]) -> Result<RawEvent, SchemaError> {
        let (id, mut body) = match bytes {
            [0, a, b, c, d, body @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), body),
            [magic, ..] if *magic != 0 => {
                return Err(avro(format!("not the Confluent wire format: magic byte {magic}, expected 0")))
            }
            _ => return Err(avro(format!("{} bytes: shorter than the 5-byte Confluent framing", bytes.len()))),
        };
        let schema = self.schema_for(id)?;
        let value = apache_avro::from_avro_datum(schema, &mut body, None)
            .map_err(|e| avro(format!("the body does not decode with the writer schema: {e}")))?;
        if !body.is_empty() {
            return Err(avro(format!("{} bytes after the record", body.len())));
        }
        raw_event(value)
    }

    /// A JSON event, framed with `schema_id` (0 when none is set).
    pub fn encode(&self, event: serde_json::Value) -> Result<Vec<u8>, String> {
        let mut event = event;
        // Bags: a lone sparse value becomes a bag of one, as the schema
        // config/event.avsc has it.
        if let Some(serde_json::Value::Object(sparse)) = event.get_mut("sparse") {
            for value in sparse.values_mut() {
                if value.is_string() {
                    *value = serde_json::Value::Array(vec![value.take()]);
                }
            }
        }
        let value = Value::from(event).resolve(&self.schema).map_err(|e| format!("does not fit the schema: {e}"))?;
        let body = apache_avro::to_avro_datum(&self.schema, value).map_err(|e| e.to_string())?;
        let mut framed = vec![0];
        framed.extend_from_slice(&self.schema_id.unwrap_or(0).to_be_bytes());
        framed.extend_from_slice(&body);
        Ok(framed)
    }
}

fn avro(reason: String) -> SchemaError {
    SchemaError::Avro(reason)
}

/// The value inside a union (`["null", "long"]` and the like).
fn unwrapped(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => unwrapped(*inner),
        other => other,
    }
}

/// A decoded record as the JSON event it stands for.
fn raw_event(value: Value) -> Result<RawEvent, SchemaError> {
    let Value::Record(fields) = unwrapped(value) else {
        return Err(avro("the record is not an Avro record".into()));
    };
    let mut event = RawEvent { dense: Vec::new(), sparse: BTreeMap::new(), label: f64::NAN, ts: None };
    let mut has_label = false;
    for (name, value) in fields {
        match (name.as_str(), unwrapped(value)) {
            (_, Value::Null) => {}
            ("dense", Value::Array(items)) => {
                event.dense = items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| number(&format!("dense[{i}]"), v).map(|x| x as f32))
                    .collect::<Result<_, _>>()?
            }
            ("sparse", Value::Map(map)) => event.sparse = sparse(map)?,
            ("label", v) => {
                event.label = number("label", v)?;
                has_label = true;
            }
            ("ts", v) => event.ts = Some(timestamp(v)?),
            (name, v) => return Err(avro(format!("field {name:?}: unexpected {}", type_name(&v)))),
        }
    }
    if !has_label {
        return Err(avro("the record has no label".into()));
    }
    Ok(event)
}

fn sparse(map: std::collections::HashMap<String, Value>) -> Result<BTreeMap<String, SparseValue>, SchemaError> {
    let text = |field: &str, v: Value| match unwrapped(v) {
        Value::String(s) | Value::Enum(_, s) => Ok(s),
        other => Err(avro(format!("sparse field {field:?}: a {}, not a string", type_name(&other)))),
    };
    map.into_iter()
        .map(|(field, value)| {
            let value = match unwrapped(value) {
                Value::Array(items) => {
                    SparseValue::Bag(items.into_iter().map(|v| text(&field, v)).collect::<Result<_, _>>()?)
                }
                other => SparseValue::One(text(&field, other)?),
            };
            Ok((field, value))
        })
        .collect()
}

fn number(what: &str, value: Value) -> Result<f64, SchemaError> {
    match value {
        Value::Double(x) => Ok(x),
        Value::Float(x) => Ok(f64::from(x)),
        Value::Int(x) => Ok(f64::from(x)),
        Value::Long(x) => Ok(x as f64),
        Value::Boolean(b) => Ok(if b { 1.0 } else { 0.0 }),
        other => Err(avro(format!("{what}: a {}, not a number", type_name(&other)))),
    }
}

/// Epoch milliseconds.
fn timestamp(value: Value) -> Result<i64, SchemaError> {
    match value {
        Value::Long(ms) | Value::TimestampMillis(ms) | Value::LocalTimestampMillis(ms) => Ok(ms),
        Value::Int(ms) => Ok(i64::from(ms)),
        Value::TimestampMicros(us) | Value::LocalTimestampMicros(us) => Ok(us / 1000),
        Value::TimestampNanos(ns) | Value::LocalTimestampNanos(ns) => Ok(ns / 1_000_000),
        other => Err(avro(format!("ts: a {}, not epoch milliseconds", type_name(&other)))),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Boolean(_) => "boolean",
        Value::Int(_) | Value::Long(_) => "integer",
        Value::Float(_) | Value::Double(_) => "number",
        Value::Bytes(_) | Value::Fixed(..) => "bytes",
        Value::String(_) | Value::Enum(..) => "string",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Record(_) => "record",
        _ => "logical value",
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::Config;
    use crate::event::Featurizer;

    const SCHEMA: &str = include_str!("../../config/event.avsc");

    fn featurizer() -> Featurizer {
        let mut m = Config::default().model;
        m.dense_dim = 2;
        m.sparse_fields = vec!["a".into(), "b".into()];
        Featurizer::new(&m)
    }

    fn example(events: &AvroEvents, bytes: &[u8]) -> Result<crate::event::Example, SchemaError> {
        featurizer().example(events.decode(bytes)?)
    }

    #[test]
    fn an_encoded_event_decodes_to_what_its_json_gives() {
        let events = AvroEvents::new(SCHEMA, Some(7)).unwrap();
        let json = r#"{"dense":[1.5,-2],"sparse":{"a":"x","b":["y","z"]},"label":1,"ts":1764000000000}"#;
        let framed = events.encode(serde_json::from_str(json).unwrap()).unwrap();
        assert_eq!(framed[..5], [0, 0, 0, 0, 7], "magic byte, then the schema id big-endian");
        assert_eq!(example(&events, &framed).unwrap(), featurizer().event(json.as_bytes()).unwrap());
        // Without ts (a null in the union) and without sparse.
        let framed = events.encode(serde_json::json!({"dense": [0, 0], "label": 0})).unwrap();
        assert_eq!(example(&events, &framed).unwrap().ts, None);
    }

    #[test]
    fn bad_records_are_refused_with_reasons() {
        let events = AvroEvents::new(SCHEMA, Some(7)).unwrap();
        let good = events.encode(serde_json::json!({"dense": [1, 2], "label": 1})).unwrap();
        let out_of_range = events.encode(serde_json::json!({"dense": [1, 2], "label": 3})).unwrap();
        let other_id = [&[0, 0, 0, 0, 8][..], &good[5..]].concat();
        let cases: [(&[u8], &str); 6] = [
            (&[1, 0, 0, 0, 7, 2], "magic byte 1"),
            (&[0, 0, 0], "shorter than the 5-byte"),
            (&other_id, "schema id 8"),
            (&good[..good.len() - 2], "does not decode"),
            (&[&good[..], &[0]].concat(), "1 bytes after the record"),
            (&out_of_range, "out of range"),
        ];
        for (bytes, want) in cases {
            let err = example(&events, bytes).map(|e| format!("decoded {e:?}")).unwrap_or_else(|e| e.to_string());
            assert!(err.contains(want), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn a_schema_that_cannot_carry_events_is_refused_at_start_up() {
        let cases = [
            (r#""string""#, "must be an Avro record"),
            (
                r#"{"type":"record","name":"E","fields":[{"name":"dense","type":{"type":"array","items":"float"}}]}"#,
                "no field \"label\"",
            ),
            (
                r#"{"type":"record","name":"E","fields":[{"name":"label","type":"double"},{"name":"user","type":"string"}]}"#,
                "\"user\" is not an event field",
            ),
            ("{", "not an Avro schema"),
        ];
        for (schema, want) in cases {
            let err = AvroEvents::new(schema, None).unwrap_err();
            assert!(err.contains(want), "{schema}: {err}");
        }
    }

    proptest! {
        /// Arbitrary bodies behind a valid framing decode or fail; never a
        /// panic, never an allocation beyond the event's size.
        #[test]
        fn arbitrary_bodies_decode_or_fail(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let events = AvroEvents::new(SCHEMA, None).unwrap();
            let _ = example(&events, &[&[0, 0, 0, 0, 1][..], &body].concat());
        }
    }
}
