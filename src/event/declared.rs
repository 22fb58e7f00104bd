//! Events as a team writes them, read through the model's declared
//! features (`[model.features]`, see `config::features`): each feature's
//! value found at its path, turned into a dense number or a sparse bag as
//! declared, or the event refused naming the feature. What comes out is
//! what the fixed schema gives, so everything after (checks, hashing) is
//! the same code.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::{SchemaError, MAX_BAG};
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
    /// Per sparse feature, its slot; `None` for a cross.
    sparse_slots: Vec<Option<usize>>,
}

/// A key of the event's objects: a branch to walk into, or a leaf whose
/// value fills slots.
#[derive(Clone, Debug, Default)]
struct Node {
    slots: Vec<usize>,
    children: Vec<(String, Node)>,
}

impl Node {
    /// Adds the path `path` (dotted) leading to `slot`.
    fn add(&mut self, path: &str, slot: usize) {
        let node = path.split('.').fold(self, |node, key| {
            let at = match node.children.iter().position(|(k, _)| k == key) {
                Some(at) => at,
                None => {
                    node.children.push((key.to_string(), Node::default()));
                    node.children.len() - 1
                }
            };
            &mut node.children[at].1
        });
        node.slots.push(slot);
    }

    fn child(&self, key: &str) -> Option<&Node> {
        self.children.iter().find(|(k, _)| k == key).map(|(_, n)| n)
    }
}

/// What one event gives: per slot, the value at its path (null: none).
type Slots = Vec<Option<Value>>;

/// A training event's features (the model's inputs before hashing: dense
/// values, and per sparse field its bag), label and event time.
pub(super) struct Read {
    pub(super) dense: Vec<f32>,
    pub(super) bags: Vec<Vec<String>>,
}

fn refused(name: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Feature { name: name.to_string(), reason: reason.into() }
}

impl Declared {
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
        let sparse_slots =
            spec.sparse.iter().map(|f| f.cross.is_empty().then(|| slot_of(&f.path, &mut tree))).collect();
        Declared { spec: spec.clone(), tree, slots: next, label_slot, time_slot, dense_slots, sparse_slots }
    }

    /// A training event from its JSON bytes: its features, label and time.
    /// Only the declared paths are kept; every other field is skipped as it
    /// is parsed, without being allocated.
    pub(super) fn event(&self, bytes: &[u8]) -> Result<(Read, f64, Option<i64>), SchemaError> {
        let mut slots: Slots = vec![None; self.slots];
        let mut de = serde_json::Deserializer::from_slice(bytes);
        (NodeSeed { node: &self.tree, slots: &mut slots, root: true })
            .deserialize(&mut de)
            .and_then(|()| de.end())
            .map_err(|e| SchemaError::Json(e.to_string()))?;
        let (label, ts) = (self.label(&slots)?, self.time(&slots)?);
        Ok((self.features(&mut slots)?, label, ts))
    }

    /// An instance's features, from a record already parsed.
    pub(super) fn instance(&self, record: &Value) -> Result<Read, SchemaError> {
        if !record.is_object() {
            return Err(SchemaError::Json("an event is a JSON object".into()));
        }
        let mut slots: Slots = vec![None; self.slots];
        fill(&self.tree, record, &mut slots);
        self.features(&mut slots)
    }

    fn value<'s>(&self, slots: &'s Slots, slot: usize) -> Option<&'s Value> {
        slots[slot].as_ref().filter(|v| !v.is_null())
    }

    /// The features, taking their values out of `slots`.
    fn features(&self, slots: &mut Slots) -> Result<Read, SchemaError> {
        let dense = (self.spec.dense.iter().zip(&self.dense_slots))
            .map(|(f, &slot)| match (self.value(slots, slot).and_then(Value::as_f64), f.default) {
                (Some(v), _) => Ok(v as f32),
                (None, Some(default)) => Ok(default),
                (None, None) => Err(refused(&f.name, format!("no number at {:?}", f.path))),
            })
            .collect::<Result<Vec<f32>, _>>()?;
        let mut bags: Vec<Vec<String>> = Vec::with_capacity(self.spec.sparse.len());
        for (f, slot) in self.spec.sparse.iter().zip(&self.sparse_slots) {
            let bag = match slot {
                Some(slot) => categories(f, slots[*slot].take().filter(|v| !v.is_null()))?,
                None => crossed(f, &self.spec.sparse, &bags)?,
            };
            bags.push(bag);
        }
        Ok(Read { dense, bags })
    }

    fn label(&self, slots: &Slots) -> Result<f64, SchemaError> {
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

    fn time(&self, slots: &Slots) -> Result<Option<i64>, SchemaError> {
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

/// Fills `slots` from a parsed record, walking `node`'s paths.
fn fill(node: &Node, value: &Value, slots: &mut Slots) {
    for &slot in &node.slots {
        slots[slot] = Some(value.clone());
    }
    if let Value::Object(map) = value {
        for (key, child) in &node.children {
            if let Some(v) = map.get(key) {
                fill(child, v, slots);
            }
        }
    }
}

/// Parses one value of an event against `node`: a leaf is kept whole for
/// its slots, a branch is walked key by key, and any other key's value is
/// skipped unparsed beyond its syntax.
struct NodeSeed<'a> {
    node: &'a Node,
    slots: &'a mut Slots,
    /// The event itself, which must be an object.
    root: bool,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if let Some((&last, others)) = self.node.slots.split_last().filter(|_| self.node.children.is_empty()) {
            let value = <Value as serde::Deserialize>::deserialize(d)?;
            for &slot in others {
                self.slots[slot] = Some(value.clone());
            }
            self.slots[last] = Some(value);
            return Ok(());
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match self.node.child(&key.0) {
                Some(child) => map.next_value_seed(NodeSeed { node: child, slots: &mut *self.slots, root: false })?,
                None => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(())
    }

    /// Not an object where the declaration walks into one: at the root an
    /// error, deeper a path that gives nothing (each feature then does what
    /// it declares for a missing value).
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.root {
            return Err(serde::de::Error::custom("an event is a JSON object"));
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<(), E> {
        self.not_an_object()
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.not_an_object()
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.not_an_object()
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.not_an_object()
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.not_an_object()
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.not_an_object()
    }
}

impl NodeSeed<'_> {
    fn not_an_object<E: serde::de::Error>(self) -> Result<(), E> {
        match self.root {
            true => Err(E::custom("an event is a JSON object")),
            false => Ok(()),
        }
    }
}

/// An object's key, borrowed from the bytes unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// A sparse feature's bag from its value: a category or an array of them,
/// or a number cut at the feature's boundaries.
fn categories(f: &SparseFeature, value: Option<Value>) -> Result<Vec<String>, SchemaError> {
    let wrong = |what: String| match f.if_missing {
        IfMissing::Empty => Ok(Vec::new()),
        IfMissing::DeadLetter => Err(refused(&f.name, what)),
    };
    let Some(value) = value else { return wrong(format!("no value at {:?}", f.path)) };
    if !f.boundaries.is_empty() {
        return match value.as_f64() {
            Some(x) => Ok(vec![format!("b{}", f.boundaries.iter().filter(|&&b| b <= x).count())]),
            None => wrong(format!("{value} at {:?} is not a number", f.path)),
        };
    }
    let items: Vec<Value> = match value {
        Value::Array(items) if items.len() > MAX_BAG => {
            return Err(refused(&f.name, format!("{} values, at most {MAX_BAG}", items.len())))
        }
        Value::Array(items) => items,
        one => vec![one],
    };
    let texts: Option<Vec<String>> = items.into_iter().map(category).collect();
    match texts {
        Some(texts) => Ok(texts),
        None => wrong(format!("the value at {:?} is not a category (a string, number or bool)", f.path)),
    }
}

/// A category's text: a string as it is, a number as JSON writes it, a
/// bool as `true` or `false`.
fn category(value: Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every combination of the crossed features' values, joined by U+001F.
fn crossed(f: &SparseFeature, sparse: &[SparseFeature], values: &[Vec<String>]) -> Result<Vec<String>, SchemaError> {
    let mut product = vec![String::new()];
    for (i, name) in f.cross.iter().enumerate() {
        let at = (sparse.iter().position(|s| s.name == *name))
            .ok_or_else(|| refused(&f.name, format!("crosses {name:?}, which is not declared")))?;
        let next: Vec<String> = (product.iter())
            .flat_map(|p| values[at].iter().map(move |v| if i == 0 { v.clone() } else { format!("{p}\u{1f}{v}") }))
            .collect();
        if next.len() > MAX_BAG {
            return Err(refused(&f.name, format!("{} combinations, at most {MAX_BAG}", next.len())));
        }
        product = next;
    }
    Ok(product)
}

fn matches_scalar(s: &Scalar, v: &Value) -> bool {
    match s {
        Scalar::Bool(b) => v.as_bool() == Some(*b),
        Scalar::Int(i) => v.as_i64() == Some(*i) || v.as_f64() == Some(*i as f64),
        Scalar::Float(f) => v.as_f64() == Some(*f),
        Scalar::Text(t) => v.as_str() == Some(t.as_str()),
    }
}

/// Epoch milliseconds of an RFC 3339 time (`2026-12-02T21:58:00.250Z`,
/// `...+01:00`); `None` if it is not one.
fn rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> { text.get(r)?.parse().ok() };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        let frac = text.get(at + 1..at + 1 + digits.min(3))?;
        millis = frac.parse::<i64>().ok()? * 10i64.pow(3 - frac.len() as u32);
        at += 1 + digits;
    }
    let offset_minutes = match text.get(at..)? {
        "Z" | "z" => 0,
        zone if zone.len() == 6 && matches!(zone.as_bytes()[0], b'+' | b'-') && zone.as_bytes()[3] == b':' => {
            let sign = if zone.starts_with('-') { -1 } else { 1 };
            sign * (zone[1..3].parse::<i64>().ok()? * 60 + zone[4..6].parse::<i64>().ok()?)
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second - offset_minutes * 60) * 1000) + millis)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    #[test]
    fn rfc3339_times_are_read_to_the_millisecond_with_their_offset() {
        assert_eq!(rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(rfc3339_ms("2026-12-02T21:58:00.25Z"), Some(1_796_248_680_250));
        assert_eq!(rfc3339_ms("2026-12-02T22:58:00.250+01:00"), Some(1_796_248_680_250));
        assert_eq!(rfc3339_ms("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        for bad in ["yesterday", "2026-13-02T21:58:00Z", "2026-12-02T21:58:00", "2026-12-02T21:58:00+0100", ""] {
            assert_eq!(rfc3339_ms(bad), None, "{bad}");
        }
    }
}
