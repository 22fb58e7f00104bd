//! Events as a team writes them, read through the model's declared
//! features (`[model.features]`, see `config::features`): each feature's
//! value found at its path, turned into a dense number or a sparse bag as
//! declared, or the event refused naming the feature. What comes out is
//! what the fixed schema gives, so everything after (checks, hashing) is
//! the same code.

pub(super) mod avro;
mod time;
mod walk;

use std::borrow::Cow;

use serde::de::DeserializeSeed;
use serde_json::Value;

use self::time::{rfc3339_ms, rfc3339_of_ms};
use self::walk::{fill, Leaf, Node, NodeSeed, Slots};
use super::{Buckets, Features, SchemaError, MAX_BAG};
use crate::config::{FeaturesConfig, IfMissing, Scalar, SparseFeature, TimeUnit};

/// A declaration, compiled: the paths it reads as a tree, each leaf a slot
/// of what one event gives.
#[derive(Clone, Debug)]
pub struct Declared {
    spec: FeaturesConfig,
    tree: Node,
    slots: usize,
    label_slot: usize,
    time_slot: Option<usize>,
    dense_slots: Vec<usize>,
    /// Per sparse feature, where its bag comes from.
    sparse_sources: Vec<SparseSource>,
    /// Per sparse feature cut at boundaries, its buckets' names (`b0`,
    /// `b1`, ...): made once, not per event.
    bucket_names: Vec<Vec<String>>,
}

/// Where a sparse feature's bag comes from, resolved once.
#[derive(Clone, Debug)]
enum SparseSource {
    /// The value in this slot.
    Slot(usize),
    /// The product of these earlier sparse features' bags.
    Cross(Vec<usize>),
}

/// What a declared path's value must be able to be, for its feature: a
/// writer schema that can never give it is refused at start-up.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Need {
    /// A dense value, a number cut at boundaries, a time in ms or s, a
    /// label that is its own value.
    Number,
    /// An ISO 8601 time.
    Text,
    /// A label compared with its positive and negative values.
    Scalar,
    /// A category, or an array of them.
    Category,
}

impl std::fmt::Display for Need {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Need::Number => "a number",
            Need::Text => "a string",
            Need::Scalar => "a boolean, number or string",
            Need::Category => "a category (a string, number or boolean) or an array of them",
        })
    }
}

fn refused(name: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Feature { name: name.to_string(), reason: reason.into() }
}

impl Declared {
    /// A served record made a training event: `label` written at the
    /// label's path and, when the time is declared, `ts` (epoch ms) at the
    /// time's path in its unit; objects on the way made as needed.
    pub fn with_outcome(&self, mut record: Value, label: Value, ts: i64) -> Result<Value, SchemaError> {
        set_path(&mut record, &self.spec.label.as_ref().expect("a declaration has a label").path, label)?;
        if let Some(time) = &self.spec.time {
            let value = match time.unit {
                TimeUnit::Ms => Value::from(ts),
                TimeUnit::S => Value::from(ts as f64 / 1000.0),
                TimeUnit::Iso8601 => Value::from(rfc3339_of_ms(ts)),
            };
            set_path(&mut record, &time.path, value)?;
        }
        Ok(record)
    }

    pub fn new(spec: &FeaturesConfig) -> Declared {
        let mut tree = Node::default();
        let mut next = 0;
        let mut slot_of = |path: &str, tree: &mut Node| {
            tree.add(path, next);
            next += 1;
            next - 1
        };
        let label_slot = slot_of(spec.label.as_ref().map_or("", |l| l.path.as_str()), &mut tree);
        let time_slot = spec.time.as_ref().map(|t| slot_of(&t.path, &mut tree));
        let dense_slots = spec.dense.iter().map(|f| slot_of(&f.path, &mut tree)).collect();
        let position = |name: &String| spec.sparse.iter().position(|s| s.name == *name);
        let sparse_sources = (spec.sparse.iter())
            .map(|f| match f.cross.is_empty() {
                true => SparseSource::Slot(slot_of(&f.path, &mut tree)),
                // Validation names only declared features in a cross.
                false => SparseSource::Cross(f.cross.iter().filter_map(position).collect()),
            })
            .collect();
        let bucket_names = (spec.sparse.iter())
            .map(|f| (0..=f.boundaries.len()).filter(|_| !f.boundaries.is_empty()).map(|i| format!("b{i}")).collect())
            .collect();
        let (slots, spec) = (next, spec.clone());
        Declared { spec, tree, slots, label_slot, time_slot, dense_slots, sparse_sources, bucket_names }
    }

    /// A training event from its JSON bytes: its features, label and time.
    /// Only the declared paths are kept; every other field is skipped as it
    /// is parsed, without being allocated.
    pub(super) fn event(&self, bytes: &[u8], buckets: &Buckets) -> Result<(Features, f64, Option<i64>), SchemaError> {
        let mut slots: Slots = vec![None; self.slots];
        let mut de = serde_json::Deserializer::from_slice(bytes);
        (NodeSeed { node: &self.tree, slots: &mut slots, root: true })
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| SchemaError::Json(e.to_string()))?;
        self.example(&slots, buckets)
    }

    /// The reader of Avro bodies of the writer schema `kind` (a record):
    /// every declared path resolved, or the one that does not named.
    pub(super) fn avro_plan(&self, kind: &avro::Kind) -> Result<avro::Plan, String> {
        avro::Plan::compile(&self.tree, kind, "", &self.needs())
    }

    /// A training event from an Avro body, read by `plan`.
    pub(super) fn avro_event(
        &self,
        plan: &avro::Plan,
        body: &[u8],
        buckets: &Buckets,
    ) -> Result<(Features, f64, Option<i64>), SchemaError> {
        let mut slots: Slots = vec![None; self.slots];
        let mut r = super::avro::Reader { rest: body };
        plan.read(&mut r, &mut slots)?;
        if !r.rest.is_empty() {
            return Err(super::avro::avro(format!("{} bytes after the record", r.rest.len())));
        }
        self.example(&slots, buckets)
    }

    /// Per slot, the feature reading it and what its value must be able
    /// to be.
    fn needs(&self) -> Vec<(String, Need)> {
        let mut needs = vec![(String::new(), Need::Scalar); self.slots];
        if let Some(label) = &self.spec.label {
            needs[self.label_slot] =
                ("label".into(), if label.positive.is_empty() { Need::Number } else { Need::Scalar });
        }
        if let (Some(time), Some(slot)) = (&self.spec.time, self.time_slot) {
            needs[slot] = ("time".into(), if time.unit == TimeUnit::Iso8601 { Need::Text } else { Need::Number });
        }
        for (f, &slot) in self.spec.dense.iter().zip(&self.dense_slots) {
            needs[slot] = (f.name.clone(), Need::Number);
        }
        for (f, source) in self.spec.sparse.iter().zip(&self.sparse_sources) {
            if let SparseSource::Slot(slot) = source {
                needs[*slot] = (f.name.clone(), if f.boundaries.is_empty() { Need::Category } else { Need::Number });
            }
        }
        needs
    }

    /// A training event from what its reader put in `slots`.
    fn example(&self, slots: &Slots<'_>, buckets: &Buckets) -> Result<(Features, f64, Option<i64>), SchemaError> {
        let (label, ts) = (self.label(slots)?, self.time(slots)?);
        Ok((self.features(slots, buckets)?, label, ts))
    }

    /// An instance's features, from a record already parsed.
    pub(super) fn instance(&self, record: &Value, buckets: &Buckets) -> Result<Features, SchemaError> {
        if !record.is_object() {
            return Err(SchemaError::Json("an event is a JSON object".into()));
        }
        let mut slots: Slots = vec![None; self.slots];
        fill(&self.tree, record, &mut slots);
        self.features(&slots, buckets)
    }

    fn value<'s, 'a>(&self, slots: &'s Slots<'a>, slot: usize) -> Option<&'s Leaf<'a>> {
        slots[slot].as_ref().filter(|v| **v != Leaf::Null)
    }

    /// The features: the dense values, and each sparse feature's bag
    /// hashed into its bucket ids.
    fn features(&self, slots: &Slots<'_>, buckets: &Buckets) -> Result<Features, SchemaError> {
        let dense = (self.spec.dense.iter().zip(&self.dense_slots))
            .map(|(f, &slot)| match (self.value(slots, slot).and_then(Leaf::as_f64), f.default) {
                (Some(v), _) => Ok(f.input(v)),
                (None, Some(default)) => Ok(f.input(f64::from(default))),
                (None, None) => Err(refused(&f.name, format!("no number at {:?}", f.path))),
            })
            .collect::<Result<Vec<f32>, _>>()?;
        let mut bags: Vec<Bag> = Vec::with_capacity(self.spec.sparse.len());
        let mut ids = Vec::with_capacity(self.spec.sparse.len());
        for (field, (f, source)) in self.spec.sparse.iter().zip(&self.sparse_sources).enumerate() {
            match source {
                SparseSource::Slot(slot) => {
                    let bag = categories(f, &self.bucket_names[field], self.value(slots, *slot))?;
                    ids.push(buckets.bag(field, bag.iter())?);
                    bags.push(bag);
                }
                SparseSource::Cross(of) => {
                    ids.push(crossed(f, field, of, &bags, buckets)?);
                    bags.push(Bag::Many(Vec::new()));
                }
            }
        }
        Ok(Features { dense, ids })
    }

    fn label(&self, slots: &Slots<'_>) -> Result<f64, SchemaError> {
        let Some(spec) = &self.spec.label else { return Err(refused("label", "no label is declared")) };
        let Some(value) = self.value(slots, self.label_slot) else {
            return Err(refused("label", format!("no value at {:?}", spec.path)));
        };
        let is = |list: &[Scalar]| list.iter().any(|s| matches_scalar(s, value));
        if spec.positive.is_empty() {
            return value.as_f64().ok_or_else(|| refused("label", format!("{value} is not a number")));
        }
        match (is(&spec.positive), spec.negative.is_empty() || is(&spec.negative)) {
            (true, _) => Ok(1.0),
            (false, true) => Ok(0.0),
            (false, false) => Err(refused("label", format!("{value} is neither a positive nor a negative value"))),
        }
    }

    fn time(&self, slots: &Slots<'_>) -> Result<Option<i64>, SchemaError> {
        let (Some(spec), Some(slot)) = (&self.spec.time, self.time_slot) else { return Ok(None) };
        let Some(value) = self.value(slots, slot) else { return Ok(None) };
        let unparsable = || refused("time", format!("{value} is not a time in {:?}", spec.unit));
        match spec.unit {
            TimeUnit::Ms => value.as_i64().map(Some).ok_or_else(unparsable),
            TimeUnit::S => value
                .as_f64()
                .filter(|s| s.is_finite())
                .map(|s| Some((s * 1000.0).round() as i64))
                .ok_or_else(unparsable),
            TimeUnit::Iso8601 => value.as_str().and_then(rfc3339_ms).map(Some).ok_or_else(unparsable),
        }
    }
}

/// A sparse feature's values for one event: none, one (most features),
/// or a bag.
enum Bag<'a> {
    One(Cow<'a, str>),
    Many(Vec<Cow<'a, str>>),
}

impl<'a> Bag<'a> {
    fn values(&self) -> &[Cow<'a, str>] {
        match self {
            Bag::One(v) => std::slice::from_ref(v),
            Bag::Many(vs) => vs,
        }
    }

    fn iter(&self) -> impl ExactSizeIterator<Item = &str> + Clone {
        self.values().iter().map(|v| v.as_ref())
    }
}

/// A sparse feature's bag from its value: a category or an array of them,
/// or a number cut at the feature's boundaries.
fn categories<'s>(f: &SparseFeature, named: &'s [String], value: Option<&'s Leaf>) -> Result<Bag<'s>, SchemaError> {
    let wrong = |what: String| match f.if_missing {
        IfMissing::Empty => Ok(Bag::Many(Vec::new())),
        IfMissing::DeadLetter => Err(refused(&f.name, what)),
    };
    let Some(value) = value else { return wrong(format!("no value at {:?}", f.path)) };
    if !f.boundaries.is_empty() {
        return match value.as_f64() {
            Some(x) => Ok(Bag::One(Cow::Borrowed(&named[f.boundaries.iter().filter(|&&b| b <= x).count()]))),
            None => wrong(format!("{value} at {:?} is not a number", f.path)),
        };
    }
    let texts = match value {
        Leaf::List(items) if items.len() > MAX_BAG => {
            return Err(refused(&f.name, format!("{} values, at most {MAX_BAG}", items.len())))
        }
        Leaf::List(items) => items.iter().map(category).collect::<Option<Vec<_>>>().map(Bag::Many),
        one => category(one).map(Bag::One),
    };
    match texts {
        Some(bag) => Ok(bag),
        None => wrong(format!("the value at {:?} is not a category (a string, number or bool)", f.path)),
    }
}

/// A category's text: a string as it is, a number as JSON writes it, a
/// bool as `true` or `false`.
fn category<'s>(value: &'s Leaf) -> Option<Cow<'s, str>> {
    match value {
        Leaf::Text(s) => Some(Cow::Borrowed(s)),
        Leaf::Number(n) => Some(Cow::Owned(n.to_string())),
        Leaf::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// The bucket ids of a cross: every combination of the crossed features'
/// values, each hashed as its values joined by U+001F.
fn crossed(
    f: &SparseFeature,
    field: usize,
    of: &[usize],
    bags: &[Bag],
    buckets: &Buckets,
) -> Result<Vec<u32>, SchemaError> {
    let combinations = of.iter().try_fold(1usize, |n, &at| n.checked_mul(bags[at].values().len()));
    match combinations.unwrap_or(usize::MAX) {
        n if n > MAX_BAG => Err(refused(&f.name, format!("{n} combinations, at most {MAX_BAG}"))),
        n => {
            let mut ids = Vec::with_capacity(n);
            let parts: Vec<&[Cow<str>]> = of.iter().map(|&at| bags[at].values()).collect();
            buckets.cross(field, &parts, &mut ids);
            Ok(ids)
        }
    }
}

fn matches_scalar(s: &Scalar, v: &Leaf<'_>) -> bool {
    match s {
        Scalar::Bool(b) => *v == Leaf::Bool(*b),
        Scalar::Int(i) => v.as_i64() == Some(*i) || v.as_f64() == Some(*i as f64),
        Scalar::Float(f) => v.as_f64() == Some(*f),
        Scalar::Text(t) => v.as_str() == Some(t.as_str()),
    }
}

/// Writes `value` at the dotted `path` of `record`, making the objects on
/// the way; a value on the way that is not an object is an error.
fn set_path(record: &mut Value, path: &str, value: Value) -> Result<(), SchemaError> {
    let mut node = record;
    for key in path.split('.') {
        let object = node.as_object_mut().ok_or_else(|| {
            SchemaError::Json(format!("the record has no object where {path:?} goes; it cannot take the outcome"))
        })?;
        node = object.entry(key).or_insert_with(|| Value::Object(Default::default()));
    }
    *node = value;
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{ModelConfig, ModelKind};
    use crate::event::{Features, Featurizer};

    /// A click-through model declared over a team's nested events.
    fn declared() -> ModelConfig {
        let features: FeaturesConfig = toml::from_str(
            r#"
            label = { path = "clicked", positive = [true, "click"], negative = [false, "none"] }
            time = { path = "event_time", unit = "iso8601" }
            dense = [{ name = "price", path = "price" }, { name = "age", path = "user.age", default = 30.0 }]
            sparse = [
              { name = "user", path = "user.id" },
              { name = "category", path = "ad.category", if_missing = "dead_letter" },
              { name = "tags", path = "ad.tags" },
              { name = "hour", path = "hour", boundaries = [6, 12, 18] },
              { name = "user_x_category", cross = ["user", "category"] },
            ]
            "#,
        )
        .unwrap();
        let mut m = ModelConfig { features, ..ModelConfig::small(ModelKind::WideDeep) };
        (m.dense_dim, m.sparse_fields) = (m.features.dense.len(), m.features.sparse_names());
        m.validate().unwrap();
        m
    }

    /// The same model over the fixed schema.
    fn fixed() -> ModelConfig {
        ModelConfig { features: FeaturesConfig::default(), ..declared() }
    }

    fn domain_event() -> Value {
        json!({
            "user": {"id": "u7", "age": 41, "country": "de"},
            "ad": {"id": "a3", "category": "shoes", "tags": ["red", "sale"]},
            "price": 12.5, "hour": 13, "clicked": true,
            "event_time": "2026-12-02T21:58:00.250Z", "session": "s-1",
        })
    }

    fn reshaped_by_hand() -> Value {
        json!({
            "dense": [12.5, 41.0],
            "sparse": {"user": "u7", "category": "shoes", "tags": ["red", "sale"], "hour": "b2",
                       "user_x_category": "u7\u{1f}shoes"},
            "label": 1, "ts": 1_796_248_680_250i64,
        })
    }

    fn event(featurizer: &Featurizer, value: &Value) -> Result<crate::event::Example, SchemaError> {
        featurizer.event(&serde_json::to_vec(value).unwrap())
    }

    #[test]
    fn a_domain_event_reads_as_the_same_event_reshaped_by_hand() {
        let (declared, fixed) = (Featurizer::new(&declared()), Featurizer::new(&fixed()));
        assert_eq!(event(&declared, &domain_event()).unwrap(), event(&fixed, &reshaped_by_hand()).unwrap());
    }

    #[test]
    fn a_served_record_with_its_outcome_is_the_event_the_team_would_have_written() {
        let featurizer = Featurizer::new(&declared());
        let mut served = domain_event();
        let object = served.as_object_mut().unwrap();
        object.remove("clicked");
        object.remove("event_time");
        let joined = featurizer.event_of(served.clone(), json!("click"), 1_796_248_680_250).unwrap();
        assert_eq!((&joined["clicked"], &joined["event_time"]), (&json!("click"), &json!("2026-12-02T21:58:00.250Z")));
        let example = event(&featurizer, &joined).unwrap();
        let whole = event(&featurizer, &domain_event()).unwrap();
        assert_eq!((example.features, example.label, example.ts), (whole.features, 1.0, Some(1_796_248_680_250)));
        // A served value that is not a record cannot take the outcome.
        let refused = featurizer.event_of(json!(["not", "a", "record"]), json!(true), 0).unwrap_err();
        assert!(refused.to_string().contains("\"clicked\""), "{refused}");
    }

    #[test]
    fn an_instance_is_a_record_read_through_the_same_declaration() {
        let (declared, fixed) = (Featurizer::new(&declared()), Featurizer::new(&fixed()));
        let mut instance = domain_event();
        instance.as_object_mut().unwrap().remove("clicked");
        let mut by_hand = reshaped_by_hand();
        by_hand.as_object_mut().unwrap().retain(|k, _| k == "dense" || k == "sparse");
        let ours: Features = declared.instance(instance).unwrap();
        assert_eq!(ours, fixed.instance(by_hand).unwrap());
    }

    #[test]
    fn a_missing_or_wrong_value_does_what_the_declaration_says_naming_the_feature() {
        let featurizer = Featurizer::new(&declared());
        let with = |path: &[&str], value: Option<Value>| {
            let mut e = domain_event();
            let (last, parents) = path.split_last().unwrap();
            let node = parents.iter().fold(&mut e, |v, k| &mut v[*k]);
            match value {
                Some(v) => node[*last] = v,
                None => drop(node.as_object_mut().unwrap().remove(*last)),
            }
            event(&featurizer, &e)
        };
        let refused = |result: Result<crate::event::Example, SchemaError>| match result {
            Err(SchemaError::Feature { name, .. }) => name,
            other => panic!("not refused by a feature: {other:?}"),
        };
        assert_eq!(refused(with(&["price"], None)), "price", "a number without a default");
        assert_eq!(refused(with(&["price"], Some(json!("cheap")))), "price");
        assert_eq!(refused(with(&["ad", "category"], None)), "category", "if_missing = dead_letter");
        assert_eq!(refused(with(&["clicked"], Some(json!("maybe")))), "label", "neither positive nor negative");
        assert_eq!(refused(with(&["clicked"], None)), "label");
        assert_eq!(refused(with(&["event_time"], Some(json!("yesterday")))), "time");
        assert_eq!(refused(with(&["ad", "tags"], Some(json!(vec!["t"; MAX_BAG + 1])))), "tags");
        // Defaults and empty bags are taken, and said nowhere.
        assert_eq!(with(&["user", "age"], None).unwrap().features.dense, [12.5, 30.0]);
        let no_tags = with(&["ad", "tags"], None).unwrap();
        assert!(no_tags.features.ids[2].is_empty(), "{no_tags:?}");
        assert!(with(&["hour"], Some(json!("noon"))).unwrap().features.ids[3].is_empty());
        assert_eq!(with(&["clicked"], Some(json!("none"))).unwrap().label, 0.0);
        assert_eq!(with(&["clicked"], Some(json!("click"))).unwrap().label, 1.0);
        assert_eq!(with(&["event_time"], None).unwrap().ts, None, "no time: the record's");
    }

    #[test]
    fn deep_nesting_in_a_field_no_feature_reads_is_refused_not_a_stack_overflow() {
        let featurizer = Featurizer::new(&declared());
        for deep in ["[".repeat(20_000), "{\"a\":".repeat(10_000)] {
            let event = format!(r#"{{"unused": {deep}"#);
            assert_eq!(featurizer.event(event.as_bytes()).unwrap_err().kind(), "json");
        }
    }

    #[test]
    fn a_number_is_transformed_then_centered_and_scaled_and_so_is_its_default() {
        let mut m = declared();
        m.features.dense[0].transform = crate::config::Transform::Log1p;
        (m.features.dense[1].center, m.features.dense[1].scale) = (40.0, 20.0);
        let featurizer = Featurizer::new(&m);
        let read = event(&featurizer, &domain_event()).unwrap();
        assert_eq!(read.features.dense, [12.5f64.ln_1p() as f32, ((41.0 - 40.0) / 20.0) as f32]);
        // A number is an f32 before it is transformed: a price sent as an
        // FP32 input gives what the same price in a record gives.
        let mut priced = domain_event();
        priced["price"] = json!(37.42);
        let want = f64::from(37.42f32).ln_1p() as f32;
        assert_eq!(event(&featurizer, &priced).unwrap().features.dense[0], want);
        let mut no_age = domain_event();
        no_age["user"].as_object_mut().unwrap().remove("age");
        assert_eq!(event(&featurizer, &no_age).unwrap().features.dense[1], ((30.0 - 40.0) / 20.0) as f32);
        m.features.dense[1].scale = 0.0;
        assert!(m.features.validate().unwrap_err().to_string().contains("scale"));
    }

    #[test]
    fn a_declaration_that_cannot_read_events_is_refused_naming_what() {
        let refused = |toml: &str| {
            let features: FeaturesConfig = toml::from_str(toml).unwrap();
            features.validate().unwrap_err().to_string()
        };
        assert!(refused("dense = [{ name = \"p\", path = \"p\" }]").contains("needs a label"));
        let label = "label = { path = \"y\" }\n";
        assert!(refused(&format!("{label}sparse = [{{ name = \"a\", path = \"a..b\" }}]")).contains("a..b"));
        assert!(refused(&format!(
            "{label}sparse = [{{ name = \"a\", path = \"a\" }}, {{ name = \"a\", path = \"b\" }}]"
        ))
        .contains("twice"));
        assert!(refused(&format!("{label}sparse = [{{ name = \"h\", path = \"h\", boundaries = [2, 1] }}]"))
            .contains("increasing"));
        assert!(refused(&format!("{label}sparse = [{{ name = \"x\", cross = [\"a\", \"b\"] }}]")).contains("cross"));
        let nested =
            format!("{label}sparse = [{{ name = \"u\", path = \"user\" }}, {{ name = \"id\", path = \"user.id\" }}]");
        assert!(refused(&nested).contains("reads inside it"));
    }
}
