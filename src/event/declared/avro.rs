//! The declaration's reader of Avro bodies, for a team's own writer
//! schema. Compiled once, at start-up, from the writer schema and the
//! declaration's paths into a [`Plan`]: every declared path must resolve
//! (through records, maps and nullable unions) to a type that can give
//! what its feature needs, or the replica does not start, naming the path.
//! A body is then read field by field in writer order: a declared leaf
//! into its slots, every other field skipped as Avro's own schema
//! resolution skips a field the reader does not have. No Avro value is
//! built; strings are borrowed from the body.
//!
//! What this module may not do: decide what a value means for a feature
//! (that is `declared`'s, the same for JSON), or allocate for a count the
//! body's bytes do not back (`Reader::blocks` checks every count; arrays of
//! items that may take no bytes are refused at start-up).

use std::borrow::Cow;

use apache_avro::schema::{Name, Schema};
use serde_json::Number;

use super::walk::{put, Leaf, Node, Slots};
use super::Need;
use crate::event::avro::{avro, Reader};
use crate::event::SchemaError;

/// A writer type, as far as reading and skipping need it.
#[derive(Clone, Debug)]
pub(crate) enum Kind {
    Null,
    Boolean,
    Int,
    Long,
    /// A long counting in units of `1/divisor` milliseconds.
    Timestamp {
        divisor: i64,
    },
    Float,
    Double,
    Bytes,
    String,
    Fixed(usize),
    Enum(Vec<String>),
    Array(Box<Kind>),
    Map(Box<Kind>),
    Union(Vec<Kind>),
    Record(Vec<(String, Kind)>),
}

/// How to read one value of the writer schema.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Not declared: read past.
    Skip(Kind),
    /// A declared value, kept whole for these slots.
    Leaf { slots: Vec<usize>, kind: Kind },
    /// A record walked into: a plan per field, in writer order.
    Record(Vec<Plan>),
    /// A map walked into: the entries whose key a path names read by
    /// their plan, the others skipped.
    Map { keys: Vec<(String, Plan)>, values: Kind },
    /// A union walked into: a plan per branch.
    Union(Vec<Plan>),
}

impl Kind {
    /// The writer schema's type, named types inlined where they are used.
    /// A type that contains itself is refused: its values could nest
    /// without bound.
    pub(crate) fn of(schema: &Schema) -> Result<Kind, String> {
        let resolved = apache_avro::schema::ResolvedSchema::try_from(schema).map_err(|e| e.to_string())?;
        Kind::inline(schema, resolved.get_names(), &mut Vec::new())
    }

    fn inline(
        schema: &Schema,
        names: &std::collections::HashMap<Name, &Schema>,
        within: &mut Vec<Name>,
    ) -> Result<Kind, String> {
        if let Schema::Ref { name } = schema {
            if within.contains(name) {
                return Err(format!(
                    "the type {} contains itself: recursive types cannot be read",
                    name.fullname(None)
                ));
            }
        }
        let mut of = |s: &Schema| Kind::inline(s, names, within);
        Ok(match schema {
            Schema::Null => Kind::Null,
            Schema::Boolean => Kind::Boolean,
            Schema::Int | Schema::Date | Schema::TimeMillis => Kind::Int,
            Schema::Long | Schema::TimeMicros | Schema::TimestampMillis | Schema::LocalTimestampMillis => Kind::Long,
            Schema::TimestampMicros | Schema::LocalTimestampMicros => Kind::Timestamp { divisor: 1000 },
            Schema::TimestampNanos | Schema::LocalTimestampNanos => Kind::Timestamp { divisor: 1_000_000 },
            Schema::Float => Kind::Float,
            Schema::Double => Kind::Double,
            Schema::Bytes | Schema::BigDecimal => Kind::Bytes,
            Schema::String | Schema::Uuid => Kind::String,
            Schema::Fixed(f) => Kind::Fixed(f.size),
            Schema::Duration => Kind::Fixed(12),
            Schema::Decimal(d) => of(&d.inner)?,
            Schema::Enum(e) => Kind::Enum(e.symbols.clone()),
            Schema::Array(a) => match of(&a.items)? {
                item if item.may_be_empty() => {
                    return Err(format!("an array of {} (items of no bytes) cannot be read safely", item.name()))
                }
                item => Kind::Array(Box::new(item)),
            },
            Schema::Map(m) => Kind::Map(Box::new(of(&m.types)?)),
            Schema::Union(u) => Kind::Union(u.variants().iter().map(of).collect::<Result<_, _>>()?),
            Schema::Record(r) => {
                within.push(r.name.clone());
                let field = |f: &apache_avro::schema::RecordField, within: &mut Vec<Name>| {
                    let kind =
                        Kind::inline(&f.schema, names, within).map_err(|e| format!("field {:?}: {e}", f.name))?;
                    Ok((f.name.clone(), kind))
                };
                let fields = r.fields.iter().map(|f| field(f, within));
                let fields = fields.collect::<Result<_, String>>();
                within.pop();
                Kind::Record(fields?)
            }
            Schema::Ref { name } => {
                let named =
                    names.get(name).ok_or_else(|| format!("the type {} is not defined", name.fullname(None)))?;
                of(named)?
            }
        })
    }

    /// This type, or the first type inside it (through unions, arrays and
    /// maps), that `is` says.
    pub(crate) fn find(&self, is: &dyn Fn(&Kind) -> bool) -> Option<&Kind> {
        match self {
            _ if is(self) => Some(self),
            Kind::Union(branches) => branches.iter().find_map(|b| b.find(is)),
            Kind::Array(item) | Kind::Map(item) => item.find(is),
            _ => None,
        }
    }

    /// Whether a value of this type may take no bytes at all.
    fn may_be_empty(&self) -> bool {
        match self {
            Kind::Null | Kind::Fixed(0) => true,
            Kind::Record(fields) => fields.iter().all(|(_, k)| k.may_be_empty()),
            _ => false,
        }
    }

    pub(crate) fn name(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Boolean => "a boolean",
            Kind::Int | Kind::Long | Kind::Timestamp { .. } => "an integer",
            Kind::Float | Kind::Double => "a number",
            Kind::Bytes | Kind::Fixed(_) => "bytes",
            Kind::String | Kind::Enum(_) => "a string",
            Kind::Array(_) => "an array",
            Kind::Map(_) => "a map",
            Kind::Union(_) => "a union",
            Kind::Record(_) => "a record",
        }
    }

    /// Whether a value of this type can be what `need` asks for (a union:
    /// whether one of its branches can).
    fn can_give(&self, need: Need) -> bool {
        let number = matches!(self, Kind::Int | Kind::Long | Kind::Timestamp { .. } | Kind::Float | Kind::Double);
        let text = matches!(self, Kind::String | Kind::Enum(_));
        match (self, need) {
            (Kind::Union(branches), _) => branches.iter().any(|b| b.can_give(need)),
            (_, Need::Number) => number,
            (_, Need::Text) => text,
            (_, Need::Scalar) => number || text || matches!(self, Kind::Boolean),
            (Kind::Array(item), Need::Category) => item.can_give(Need::Scalar),
            (_, Need::Category) => number || text || matches!(self, Kind::Boolean),
        }
    }
}

impl Plan {
    /// The plan for a value of type `kind` at `path`, reading what `node`
    /// (the declaration's paths below it) declares. `needs` says, per
    /// slot, the feature's name and what its value must be able to be.
    pub(super) fn compile(node: &Node, kind: &Kind, path: &str, needs: &[(String, Need)]) -> Result<Plan, String> {
        if !node.slots().is_empty() {
            for &slot in node.slots() {
                let (name, need) = &needs[slot];
                if !kind.can_give(*need) {
                    return Err(format!("{name} at {path:?}: the writer schema has {} there, not {need}", kind.name()));
                }
            }
            return Ok(Plan::Leaf { slots: node.slots().to_vec(), kind: kind.clone() });
        }
        let below = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
        match kind {
            Kind::Record(fields) => {
                if let Some((key, _)) = node.children().iter().find(|(key, _)| !fields.iter().any(|(f, _)| f == key)) {
                    let known: Vec<&str> = fields.iter().map(|(f, _)| f.as_str()).collect();
                    return Err(format!(
                        "{:?}: the writer schema has no field {key:?} there (it has {known:?})",
                        below(key)
                    ));
                }
                let field = |(name, kind): &(String, Kind)| match node.child(name) {
                    Some(child) => Plan::compile(child, kind, &below(name), needs),
                    None => Ok(Plan::Skip(kind.clone())),
                };
                Ok(Plan::Record(fields.iter().map(field).collect::<Result<_, _>>()?))
            }
            Kind::Map(values) => {
                let key = |(key, child): &(String, Node)| {
                    Ok((key.clone(), Plan::compile(child, values, &below(key), needs)?))
                };
                Ok(Plan::Map {
                    keys: node.children().iter().map(key).collect::<Result<_, String>>()?,
                    values: (**values).clone(),
                })
            }
            Kind::Union(branches) => Plan::union(node, branches, path, needs),
            other => {
                Err(format!("{path:?}: the writer schema has {} there, not a record or map to read into", other.name()))
            }
        }
    }

    /// A union walked into: each branch that the paths resolve in read by
    /// its plan, the others (a null, most often) giving nothing; at least
    /// one branch must resolve.
    fn union(node: &Node, branches: &[Kind], path: &str, needs: &[(String, Need)]) -> Result<Plan, String> {
        let plans: Vec<Result<Plan, String>> = branches.iter().map(|b| Plan::compile(node, b, path, needs)).collect();
        if !plans.iter().any(Result::is_ok) {
            let first = plans.into_iter().zip(branches).find(|(_, b)| !matches!(b, Kind::Null));
            return Err(first.and_then(|(p, _)| p.err()).unwrap_or_else(|| format!("{path:?}: always null")));
        }
        Ok(Plan::Union(
            plans.into_iter().zip(branches).map(|(p, b)| p.unwrap_or_else(|_| Plan::Skip(b.clone()))).collect(),
        ))
    }

    /// Reads one value by this plan, filling `slots`.
    pub(super) fn read<'a>(&'a self, r: &mut Reader<'a>, slots: &mut Slots<'a>) -> Result<(), SchemaError> {
        match self {
            Plan::Skip(kind) => skip(r, kind),
            Plan::Leaf { slots: to, kind } => {
                put(slots, to, leaf(r, kind)?);
                Ok(())
            }
            Plan::Record(fields) => fields.iter().try_for_each(|field| field.read(r, slots)),
            Plan::Map { keys, values } => r.blocks("map", &mut |r| {
                let key = r.str("map key")?;
                match keys.iter().find(|(k, _)| k == key) {
                    Some((_, plan)) => plan.read(r, slots),
                    None => skip(r, values),
                }
            }),
            Plan::Union(plans) => {
                let at = branch(r, plans.len())?;
                plans[at].read(r, slots)
            }
        }
    }
}

/// A union's branch index, checked against its `count` branches.
fn branch(r: &mut Reader<'_>, count: usize) -> Result<usize, SchemaError> {
    let i = r.long("union")?;
    usize::try_from(i).ok().filter(|&i| i < count).ok_or_else(|| avro(format!("union branch {i} of {count}")))
}

/// One value of type `kind` as a declared leaf: scalars and strings as
/// they are (times in milliseconds), arrays as lists; what cannot be a
/// feature's value (bytes, maps, records) is read past as `Leaf::Object`.
fn leaf<'a>(r: &mut Reader<'a>, kind: &'a Kind) -> Result<Leaf<'a>, SchemaError> {
    let float = |x: f64| Number::from_f64(x).map_or(Leaf::Null, Leaf::Number);
    Ok(match kind {
        Kind::Null => Leaf::Null,
        Kind::Boolean => Leaf::Bool(r.take(1, "boolean")?[0] != 0),
        Kind::Int | Kind::Long => Leaf::Number(r.long("long")?.into()),
        Kind::Timestamp { divisor } => Leaf::Number((r.long("timestamp")? / divisor).into()),
        Kind::Float => float(f64::from(f32::from_le_bytes(r.take(4, "float")?.try_into().expect("4 bytes")))),
        Kind::Double => float(f64::from_le_bytes(r.take(8, "double")?.try_into().expect("8 bytes"))),
        Kind::String => Leaf::Text(Cow::Borrowed(r.str("string")?)),
        Kind::Enum(symbols) => {
            let i = r.long("enum")?;
            let symbol = usize::try_from(i).ok().and_then(|i| symbols.get(i));
            Leaf::Text(Cow::Borrowed(symbol.ok_or_else(|| avro(format!("enum symbol {i} of {}", symbols.len())))?))
        }
        Kind::Array(item) => {
            let mut items = Vec::new();
            r.blocks("array", &mut |r| {
                items.push(leaf(r, item)?);
                Ok(())
            })?;
            Leaf::List(items)
        }
        Kind::Union(branches) => {
            let at = branch(r, branches.len())?;
            leaf(r, &branches[at])?
        }
        Kind::Bytes | Kind::Fixed(_) | Kind::Map(_) | Kind::Record(_) => {
            skip(r, kind)?;
            Leaf::Object
        }
    })
}

/// Reads past one value of type `kind`.
fn skip(r: &mut Reader<'_>, kind: &Kind) -> Result<(), SchemaError> {
    match kind {
        Kind::Null => Ok(()),
        Kind::Boolean => r.take(1, "boolean").map(drop),
        Kind::Int | Kind::Long | Kind::Timestamp { .. } | Kind::Enum(_) => r.long("long").map(drop),
        Kind::Float => r.take(4, "float").map(drop),
        Kind::Double => r.take(8, "double").map(drop),
        Kind::Bytes | Kind::String => {
            let len = r.len("bytes")?;
            r.take(len, "bytes").map(drop)
        }
        Kind::Fixed(n) => r.take(*n, "fixed").map(drop),
        Kind::Array(item) => r.blocks("array", &mut |r| skip(r, item)),
        Kind::Map(values) => r.blocks("map", &mut |r| {
            r.str("map key")?;
            skip(r, values)
        }),
        Kind::Union(branches) => {
            let at = branch(r, branches.len())?;
            skip(r, &branches[at])
        }
        Kind::Record(fields) => fields.iter().try_for_each(|(_, k)| skip(r, k)),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::{json, Value};

    use crate::config::{ModelConfig, ModelKind};
    use crate::event::avro::AvroEvents;
    use crate::event::{Example, Featurizer, SchemaError};

    /// A team's click events as their own writer schema has them: nested
    /// and nullable records, an enum, a map, a named type used twice, and
    /// fields no feature reads (bytes, fixed, an array of records).
    const WRITER: &str = r#"{"type": "record", "name": "Click", "namespace": "shop", "fields": [
        {"name": "session", "type": "string"},
        {"name": "user", "type": {"type": "record", "name": "User", "fields": [
            {"name": "id", "type": "string"},
            {"name": "age", "type": ["null", "int"], "default": null},
            {"name": "avatar", "type": "bytes"},
            {"name": "home", "type": {"type": "record", "name": "Place", "fields": [{"name": "city", "type": "string"}]}}
        ]}},
        {"name": "ad", "type": ["null", {"type": "record", "name": "Ad", "fields": [
            {"name": "id", "type": "string"},
            {"name": "category", "type": ["null", {"type": "enum", "name": "Category", "symbols": ["shoes", "books", "games"]}]},
            {"name": "tags", "type": {"type": "array", "items": "string"}},
            {"name": "shown_at", "type": "Place"}
        ]}]},
        {"name": "attrs", "type": {"type": "map", "values": ["null", "double", "string"]}},
        {"name": "hash", "type": {"type": "fixed", "name": "Hash", "size": 4}},
        {"name": "price", "type": "float"},
        {"name": "hour", "type": "long"},
        {"name": "clicked", "type": ["null", "boolean"]},
        {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-micros"}},
        {"name": "history", "type": {"type": "array", "items": {"type": "record", "name": "Seen", "fields": [{"name": "ad", "type": "string"}]}}}
    ]}"#;

    /// Features over it, one through the map.
    const DECLARATION: &str = r#"
        label = { path = "clicked", positive = [true], negative = [false] }
        time = { path = "event_time", unit = "ms" }
        dense = [{ name = "price", path = "price" }, { name = "age", path = "user.age", default = 30.0 },
                 { name = "discount", path = "attrs.discount", default = 0.0 }]
        sparse = [
          { name = "user", path = "user.id" },
          { name = "category", path = "ad.category", if_missing = "dead_letter" },
          { name = "tags", path = "ad.tags" },
          { name = "city", path = "user.home.city" },
          { name = "color", path = "attrs.color" },
          { name = "hour", path = "hour", boundaries = [6, 12, 18] },
          { name = "user_x_category", cross = ["user", "category"] },
        ]
    "#;

    fn featurizer(declaration: &str) -> Featurizer {
        let mut m = ModelConfig::small(ModelKind::WideDeep);
        m.features = toml::from_str(declaration).unwrap();
        (m.dense_dim, m.sparse_fields) = (m.features.dense.len(), m.features.sparse_names());
        m.validate().unwrap();
        Featurizer::new(&m)
    }

    fn avro_events(featurizer: &Featurizer, schema: &str) -> Result<AvroEvents, String> {
        AvroEvents::new(schema, None, featurizer.declared())
    }

    /// The `i`th event as JSON, micros in its time.
    fn event(i: i64, clicked: Value, category: Value) -> Value {
        json!({
            "session": format!("s{i}"),
            "user": {"id": format!("u{}", i % 7), "age": if i % 3 == 0 { Value::Null } else { json!(20 + i) },
                     "avatar": [1, 2], "home": {"city": "Berlin"}},
            "ad": {"id": "a1", "category": category, "tags": ["red", "sale"], "shown_at": {"city": "Paris"}},
            "attrs": {"discount": 0.25, "color": "blue", "other": null},
            "hash": "abcd", "price": 12.5, "hour": i % 24, "clicked": clicked,
            "event_time": 1_796_248_680_250_000i64 + i * 1000,
            "history": [{"ad": "a0"}, {"ad": "a2"}],
        })
    }

    fn decode(featurizer: &Featurizer, events: &AvroEvents, json: &Value) -> Result<Example, SchemaError> {
        events.example(featurizer, &events.encode(json.clone()).unwrap())
    }

    #[test]
    fn a_record_of_its_own_schema_reads_as_its_json_does() {
        let f = featurizer(DECLARATION);
        let events = avro_events(&f, WRITER).unwrap();
        for i in 0..24 {
            let avro = event(i, json!(i % 2 == 0), json!(["shoes", "books", "games"][i as usize % 3]));
            let mut as_json = avro.clone();
            as_json["event_time"] = json!(avro["event_time"].as_i64().unwrap() / 1000);
            let want = f.event(as_json.to_string().as_bytes()).unwrap();
            assert_eq!(decode(&f, &events, &avro).unwrap(), want, "event {i}");
        }
    }

    #[test]
    fn what_a_record_lacks_does_what_the_declaration_says() {
        let f = featurizer(DECLARATION);
        let events = avro_events(&f, WRITER).unwrap();
        let named = |r: Result<Example, SchemaError>| match r {
            Err(SchemaError::Feature { name, .. }) => name,
            other => panic!("not refused by a feature: {other:?}"),
        };
        assert_eq!(named(decode(&f, &events, &event(1, Value::Null, json!("shoes")))), "label");
        assert_eq!(named(decode(&f, &events, &event(1, json!(true), Value::Null))), "category");
        let mut no_ad = event(1, json!(true), json!("shoes"));
        no_ad["ad"] = Value::Null;
        assert_eq!(named(decode(&f, &events, &no_ad)), "category", "a null record gives none of its paths");
        let mut no_color = event(1, json!(false), json!("books"));
        no_color["attrs"] = json!({});
        let read = decode(&f, &events, &no_color).unwrap();
        assert_eq!((read.features.dense[2], read.features.ids[4].len()), (0.0, 0), "defaults and empty bags");
    }

    #[test]
    fn a_writer_schema_the_declaration_cannot_read_is_refused_at_start_up_naming_the_path() {
        let f = featurizer(DECLARATION);
        let with = |from: &str, to: &str| avro_events(&f, &WRITER.replace(from, to)).unwrap_err();
        let cases = [
            (with(r#""name": "age""#, r#""name": "years""#), r#""user.age": the writer schema has no field "age""#),
            (with(r#""name": "price", "type": "float""#, r#""name": "price", "type": "string""#), "price at \"price\""),
            (with(r#"{"name": "city", "type": "string"}"#, r#"{"name": "city", "type": "bytes"}"#), "city at"),
            (
                avro_events(
                    &f,
                    &WRITER
                        .replace(
                            r#"{"type": "record", "name": "Place", "fields": [{"name": "city", "type": "string"}]}"#,
                            r#""string""#,
                        )
                        .replace(r#""Place""#, r#""string""#),
                )
                .unwrap_err(),
                r#""user.home": the writer schema has a string there, not a record or map"#,
            ),
            (
                with(r#""name": "clicked", "type": ["null", "boolean"]"#, r#""name": "clicked", "type": "bytes""#),
                "label",
            ),
            (with(r#"{"name": "ad", "type": "string"}"#, r#"{"name": "ad", "type": "null"}"#), "items of no bytes"),
            (
                with(r#"{"name": "ad", "type": "string"}"#, r#"{"name": "ad", "type": ["null", "Seen"]}"#),
                "contains itself",
            ),
        ];
        for (err, want) in cases {
            assert!(err.contains(want), "{err}");
        }
    }

    proptest! {
        /// Arbitrary bodies behind a valid framing decode or fail; never a
        /// panic, never an allocation beyond the body's size.
        #[test]
        fn arbitrary_bodies_decode_or_fail(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let f = featurizer(DECLARATION);
            let events = avro_events(&f, WRITER).unwrap();
            let _ = events.example(&f, &[&[0, 0, 0, 0, 1][..], &body].concat());
        }
    }
}
