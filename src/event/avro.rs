//! Avro training events in the Confluent wire format: a magic byte 0, the
//! writer schema's id (4 bytes, big-endian), then the Avro binary body.
//! There is no schema registry: the writer schema is a file in the
//! configuration (`kafka.avro_schema`), and `kafka.avro_schema_id` (when
//! set) is the one id accepted. Without a declaration (`[model.features]`)
//! fields map to the JSON event schema by name and go through the same
//! validation; with one, any record is read through it
//! (`declared::avro`, which this module's `Reader` serves too). What does
//! not decode becomes a dead letter with reason kind `avro`.
//!
//! The writer schema is compiled once into a `Kind` per field
//! (`declared::avro::Kind`, the one description of writer types), and a
//! body is read straight into the event (no intermediate Avro values):
//! decoding this way costs about what parsing the same event from JSON
//! does, where apache-avro's generic reader took twice as long.
//! apache-avro parses the schema and encodes (`tributary produce`).
//!
//! A registry would slot in at `AvroEvents::body`: fetch the writer
//! schema by id (cached, its reader compiled once) instead of comparing
//! the id with the configured one.

use std::collections::BTreeMap;

use apache_avro::schema::Schema;
use apache_avro::types::Value;

use super::declared::avro::{Kind, Plan};
use super::declared::Declared;
use super::{Example, Featurizer, RawEvent, SchemaError, SparseValue};

/// The fields an event schema may have; `label` is required.
const FIELDS: [&str; 4] = ["dense", "sparse", "label", "ts"];

/// Decodes (and encodes) events of one writer schema.
#[derive(Debug)]
pub struct AvroEvents {
    schema: Schema,
    fields: Fields,
    schema_id: Option<u32>,
}

/// How a body is read.
#[derive(Debug)]
enum Fields {
    /// The fixed schema: the record's fields in writer order, which event
    /// field each is and how to read it.
    Fixed(Vec<(Field, Kind)>),
    /// Through the declared features (`[model.features]`): any record the
    /// declared paths resolve in.
    Declared(Box<Plan>),
}

/// An event field.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Field {
    Dense,
    Sparse,
    Label,
    Ts,
}

impl AvroEvents {
    /// Parses the writer schema `text` and checks that it can carry
    /// events: through the declaration when there is one (`declared`),
    /// else as the fixed schema. A mismatch is a configuration error at
    /// start-up, not a dead letter per event.
    pub fn new(text: &str, schema_id: Option<u32>, declared: Option<&Declared>) -> Result<AvroEvents, String> {
        let schema = Schema::parse_str(text).map_err(|e| format!("not an Avro schema: {e}"))?;
        if !matches!(schema, Schema::Record(_)) {
            return Err("the event schema must be an Avro record".into());
        }
        let fields = match declared {
            Some(declared) => Fields::Declared(Box::new(declared.avro_plan(&Kind::of(&schema)?)?)),
            None => Fields::Fixed(fixed_fields(Kind::of(&schema)?)?),
        };
        Ok(AvroEvents { schema, fields, schema_id })
    }

    /// The body of a framed record, its schema id checked.
    fn body<'b>(&self, bytes: &'b [u8]) -> Result<&'b [u8], SchemaError> {
        let (id, body) = match bytes {
            [0, a, b, c, d, body @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), body),
            [magic, ..] if *magic != 0 => {
                return Err(avro(format!("not the Confluent wire format: magic byte {magic}, expected 0")))
            }
            _ => return Err(avro(format!("{} bytes: shorter than the 5-byte Confluent framing", bytes.len()))),
        };
        match self.schema_id {
            Some(want) if want != id => {
                Err(avro(format!("schema id {id}; this replica reads schema id {want} (kafka.avro_schema_id)")))
            }
            _ => Ok(body),
        }
    }

    /// The training event a framed record carries.
    pub(super) fn example(&self, featurizer: &Featurizer, bytes: &[u8]) -> Result<Example, SchemaError> {
        let body = self.body(bytes)?;
        match &self.fields {
            Fields::Fixed(fields) => featurizer.example(decode_fixed(fields, body)?),
            Fields::Declared(plan) => featurizer.avro_event(plan, body),
        }
    }

    /// A JSON event, framed with `schema_id` (0 when none is set).
    pub fn encode(&self, event: serde_json::Value) -> Result<Vec<u8>, String> {
        let mut event = event;
        // Bags: a lone sparse value becomes a bag of one, as the schema
        // config/event.avsc has it. A declared record is encoded as it is.
        let fixed = matches!(self.fields, Fields::Fixed(_));
        if let Some(serde_json::Value::Object(sparse)) = event.get_mut("sparse").filter(|_| fixed) {
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

/// The fixed schema's fields of a writer record (`kind`): the event's
/// fields (`label` required, nothing else) of types that can carry them.
fn fixed_fields(kind: Kind) -> Result<Vec<(Field, Kind)>, String> {
    let Kind::Record(record) = kind else { return Err("the event schema must be an Avro record".into()) };
    let mut fields = Vec::new();
    for (name, kind) in record {
        let field = match name.as_str() {
            "dense" => Field::Dense,
            "sparse" => Field::Sparse,
            "label" => Field::Label,
            "ts" => Field::Ts,
            other => return Err(format!("field {other:?} is not an event field (they are {FIELDS:?})")),
        };
        if let Some(other) = kind.find(&|k| matches!(k, Kind::Bytes | Kind::Fixed(_) | Kind::Record(_))) {
            return Err(format!("field {name:?}: Avro type {} cannot carry an event field", other.name()));
        }
        fields.push((field, kind));
    }
    if !fields.iter().any(|(f, _)| *f == Field::Label) {
        return Err("the event schema has no field \"label\"".into());
    }
    Ok(fields)
}

/// The event a body of the fixed schema carries.
fn decode_fixed(fields: &[(Field, Kind)], body: &[u8]) -> Result<RawEvent, SchemaError> {
    let mut r = Reader { rest: body };
    let mut event = RawEvent { dense: Vec::new(), sparse: BTreeMap::new(), label: f64::NAN, ts: None };
    let mut has_label = false;
    for (field, shape) in fields {
        match field {
            Field::Dense => {
                event.dense.clear();
                // A null item becomes NaN, which validation refuses by index.
                r.items(shape, "dense", &mut |r, item| {
                    event.dense.push(r.number(item, "dense")?.unwrap_or(f64::NAN) as f32);
                    Ok(())
                })?
            }
            Field::Sparse => {
                event.sparse.clear();
                r.entries(shape, "sparse", &mut |r, key, value| {
                    if let Some(v) = r.sparse_value(value)? {
                        event.sparse.insert(key, v);
                    }
                    Ok(())
                })?
            }
            Field::Label => {
                if let Some(x) = r.number(shape, "label")? {
                    event.label = x;
                    has_label = true;
                }
            }
            Field::Ts => event.ts = r.timestamp(shape)?,
        }
    }
    if !r.rest.is_empty() {
        return Err(avro(format!("{} bytes after the record", r.rest.len())));
    }
    if !has_label {
        return Err(avro("the record's label is null".into()));
    }
    Ok(event)
}

pub(super) fn avro(reason: String) -> SchemaError {
    SchemaError::Avro(reason)
}

/// Avro's binary encoding, read from the front of a body. Every length
/// and count is checked against the bytes left before anything is
/// allocated for it.
pub(super) struct Reader<'a> {
    pub(super) rest: &'a [u8],
}

type Step<'s, 'a> = &'s mut dyn FnMut(&mut Reader<'a>, &Kind) -> Result<(), SchemaError>;

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SchemaError> {
        if n > self.rest.len() {
            return Err(avro(format!("{what}: the body ends {} bytes short", n - self.rest.len())));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    /// A zigzag varint (Avro's int and long).
    pub(super) fn long(&mut self, what: &str) -> Result<i64, SchemaError> {
        let mut value: u64 = 0;
        for shift in (0..64).step_by(7) {
            let byte = self.take(1, what)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok((value >> 1) as i64 ^ -((value & 1) as i64));
            }
        }
        Err(avro(format!("{what}: a varint longer than 10 bytes")))
    }

    /// A length or count: non-negative and no larger than the bytes left
    /// (every item takes at least a byte, except in a block of nulls,
    /// which no event field has).
    pub(super) fn len(&mut self, what: &str) -> Result<usize, SchemaError> {
        let n = self.long(what)?;
        match usize::try_from(n) {
            Ok(n) if n <= self.rest.len() => Ok(n),
            _ => Err(avro(format!("{what}: a length of {n} with {} bytes left", self.rest.len()))),
        }
    }

    fn text(&mut self, what: &str) -> Result<String, SchemaError> {
        self.str(what).map(str::to_string)
    }

    /// A string, borrowed from the body.
    pub(super) fn str(&mut self, what: &str) -> Result<&'a str, SchemaError> {
        let len = self.len(what)?;
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| avro(format!("{what}: not UTF-8")))
    }

    /// The branch of a union, or the shape itself.
    fn branch<'s>(&mut self, shape: &'s Kind, what: &str) -> Result<&'s Kind, SchemaError> {
        match shape {
            Kind::Union(branches) => {
                let i = self.long(what)?;
                let branch = usize::try_from(i).ok().and_then(|i| branches.get(i));
                let branch = branch.ok_or_else(|| avro(format!("{what}: union branch {i} of {}", branches.len())))?;
                self.branch(branch, what)
            }
            other => Ok(other),
        }
    }

    /// A number; `None` for a null.
    fn number(&mut self, shape: &Kind, what: &str) -> Result<Option<f64>, SchemaError> {
        Ok(Some(match self.branch(shape, what)? {
            Kind::Null => return Ok(None),
            Kind::Boolean => f64::from(self.take(1, what)?[0] != 0),
            Kind::Int | Kind::Long => self.long(what)? as f64,
            Kind::Float => f64::from(f32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes"))),
            Kind::Double => f64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")),
            other => return Err(avro(format!("{what}: {}, not a number", other.name()))),
        }))
    }

    /// Epoch milliseconds; `None` for a null.
    fn timestamp(&mut self, shape: &Kind) -> Result<Option<i64>, SchemaError> {
        match self.branch(shape, "ts")? {
            Kind::Null => Ok(None),
            Kind::Int | Kind::Long => Ok(Some(self.long("ts")?)),
            Kind::Timestamp { divisor } => Ok(Some(self.long("ts")? / divisor)),
            other => Err(avro(format!("ts: {}, not epoch milliseconds", other.name()))),
        }
    }

    /// A string (or enum symbol); `None` for a null.
    fn string(&mut self, shape: &Kind, what: &str) -> Result<Option<String>, SchemaError> {
        match self.branch(shape, what)? {
            Kind::Null => Ok(None),
            Kind::String => self.text(what).map(Some),
            Kind::Enum(symbols) => {
                let i = self.long(what)?;
                let symbol = usize::try_from(i).ok().and_then(|i| symbols.get(i));
                symbol.cloned().map(Some).ok_or_else(|| avro(format!("{what}: enum symbol {i} of {}", symbols.len())))
            }
            other => Err(avro(format!("{what}: {}, not a string", other.name()))),
        }
    }

    /// A sparse value: a string, or an array of them; `None` for a null.
    fn sparse_value(&mut self, shape: &Kind) -> Result<Option<SparseValue>, SchemaError> {
        match self.branch(shape, "sparse")? {
            shape @ Kind::Array(_) => {
                let mut bag = Vec::new();
                self.items(shape, "sparse", &mut |r, item| {
                    bag.extend(r.string(item, "sparse")?);
                    Ok(())
                })?;
                Ok(Some(SparseValue::Bag(bag)))
            }
            shape => Ok(self.string(shape, "sparse")?.map(SparseValue::One)),
        }
    }

    /// Calls `each` on every item of an array (or nothing for a null).
    fn items(&mut self, shape: &Kind, what: &str, each: Step<'_, 'a>) -> Result<(), SchemaError> {
        match self.branch(shape, what)? {
            Kind::Null => Ok(()),
            Kind::Array(item) => self.blocks(what, &mut |r| each(r, item)),
            other => Err(avro(format!("{what}: {}, not an array", other.name()))),
        }
    }

    /// Calls `each` on every entry of a map (or nothing for a null).
    fn entries(
        &mut self,
        shape: &Kind,
        what: &str,
        each: &mut dyn FnMut(&mut Reader<'a>, String, &Kind) -> Result<(), SchemaError>,
    ) -> Result<(), SchemaError> {
        match self.branch(shape, what)? {
            Kind::Null => Ok(()),
            Kind::Map(value) => self.blocks(what, &mut |r| {
                let key = r.text(what)?;
                each(r, key, value)
            }),
            other => Err(avro(format!("{what}: {}, not a map", other.name()))),
        }
    }

    /// Arrays and maps come in blocks: a count (negative: followed by the
    /// block's size in bytes), that many items, until a count of 0.
    pub(super) fn blocks(
        &mut self,
        what: &str,
        item: &mut dyn FnMut(&mut Reader<'a>) -> Result<(), SchemaError>,
    ) -> Result<(), SchemaError> {
        // Every item takes at least a byte (the schema has no arrays of
        // nulls), so the items of all blocks together are at most the bytes
        // left now: checked per block, and for the blocks' sum.
        let mut items_left = self.rest.len() as u64;
        loop {
            let count = self.long(what)?;
            if count == 0 {
                return Ok(());
            }
            if count < 0 {
                self.long(what)?; // the block's size in bytes, for skipping
            }
            let count = count.unsigned_abs();
            if count > self.rest.len() as u64 || count > items_left {
                return Err(avro(format!("{what}: a block of {count} items with {} bytes left", self.rest.len())));
            }
            items_left -= count;
            for _ in 0..count {
                item(self)?;
            }
        }
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
        events.example(&featurizer(), bytes)
    }

    #[test]
    fn an_encoded_event_decodes_to_what_its_json_gives() {
        let events = AvroEvents::new(SCHEMA, Some(7), None).unwrap();
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
        let events = AvroEvents::new(SCHEMA, Some(7), None).unwrap();
        let good = events.encode(serde_json::json!({"dense": [1, 2], "label": 1})).unwrap();
        let out_of_range = events.encode(serde_json::json!({"dense": [1, 2], "label": 3})).unwrap();
        let other_id = [&[0, 0, 0, 0, 8][..], &good[5..]].concat();
        let cases: [(&[u8], &str); 6] = [
            (&[1, 0, 0, 0, 7, 2], "magic byte 1"),
            (&[0, 0, 0], "shorter than the 5-byte"),
            (&other_id, "schema id 8"),
            (&good[..good.len() - 1], "ts: the body ends 1 bytes short"),
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
            (
                r#"{"type":"record","name":"E","fields":[{"name":"label","type":"double"},{"name":"ts","type":"bytes"}]}"#,
                "cannot carry",
            ),
            (
                r#"{"type":"record","name":"E","fields":[{"name":"label","type":"double"},{"name":"dense","type":{"type":"array","items":"null"}}]}"#,
                "field \"dense\": an array of null (items of no bytes)",
            ),
        ];
        for (schema, want) in cases {
            let err = AvroEvents::new(schema, None, None).unwrap_err();
            assert!(err.contains(want), "{schema}: {err}");
        }
    }

    /// The event schema with other types an event field may have: doubles,
    /// lone strings and enums, an int label, microseconds.
    const OTHER_TYPES: &str = r#"{"type": "record", "name": "E", "fields": [
        {"name": "ts", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
        {"name": "label", "type": "int"},
        {"name": "sparse", "type": {"type": "map", "values": ["string", {"type": "enum", "name": "B", "symbols": ["x", "y"]}]}},
        {"name": "dense", "type": ["null", {"type": "array", "items": "double"}]}
    ]}"#;

    /// apache-avro's encoding of `event` under `schema`, framed.
    fn framed(schema: &str, event: &serde_json::Value) -> Vec<u8> {
        let schema = Schema::parse_str(schema).unwrap();
        let value = Value::from(event.clone()).resolve(&schema).unwrap();
        [vec![0, 0, 0, 0, 1], apache_avro::to_avro_datum(&schema, value).unwrap()].concat()
    }

    fn json_event() -> impl Strategy<Value = serde_json::Value> {
        let value = proptest::sample::select(vec!["x", "y", "é", "a longer value"]);
        let bag = proptest::collection::vec(value, 0..4);
        (any::<[i16; 2]>(), bag.clone(), bag, any::<bool>(), proptest::option::of(0i64..2_000_000_000_000)).prop_map(
            |(dense, a, b, label, ts)| {
                serde_json::json!({"dense": [dense[0] as f32 / 8.0, dense[1] as f32 / 8.0],
                    "sparse": {"a": a, "b": b}, "label": u8::from(label), "ts": ts})
            },
        )
    }

    proptest! {
        /// What apache-avro encodes, this reader decodes to the event the
        /// same JSON gives.
        #[test]
        fn apache_avro_encodings_decode_to_the_json_event(event in json_event()) {
            let events = AvroEvents::new(SCHEMA, None, None).unwrap();
            let want = featurizer().event(event.to_string().as_bytes()).unwrap();
            prop_assert_eq!(example(&events, &framed(SCHEMA, &event)).unwrap(), want);
        }

        #[test]
        fn other_field_types_decode_alike(dense in any::<[i16; 2]>(), label in any::<bool>(), micros in proptest::option::of(0i64..1 << 52)) {
            let events = AvroEvents::new(OTHER_TYPES, None, None).unwrap();
            let dense = [dense[0] as f64 / 8.0, dense[1] as f64 / 8.0];
            let avro = serde_json::json!({"dense": dense, "sparse": {"a": "x", "b": "y"}, "label": u8::from(label), "ts": micros});
            let json = serde_json::json!({"dense": dense, "sparse": {"a": "x", "b": "y"}, "label": u8::from(label), "ts": micros.map(|m| m / 1000)});
            let want = featurizer().event(json.to_string().as_bytes()).unwrap();
            prop_assert_eq!(example(&events, &framed(OTHER_TYPES, &avro)).unwrap(), want);
        }

        /// Arbitrary bodies behind a valid framing decode or fail; never a
        /// panic, never an allocation beyond the body's size.
        #[test]
        fn arbitrary_bodies_decode_or_fail(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let events = AvroEvents::new(SCHEMA, None, None).unwrap();
            let _ = example(&events, &[&[0, 0, 0, 0, 1][..], &body].concat());
        }
    }
}
