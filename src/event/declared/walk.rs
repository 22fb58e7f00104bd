//! Reading an event against the declaration's paths: the tree of paths
//! ([`Node`]), a value at a path ([`Leaf`]: scalars as they came, strings
//! borrowed from the bytes where they have no escapes), and the one pass
//! over the bytes that keeps the leaves and skips everything else.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Number, Value};

/// A key of the event's objects: a branch to walk into, or a leaf whose
/// value fills slots.
#[derive(Clone, Debug, Default)]
pub(super) struct Node {
    slots: Vec<usize>,
    children: Vec<(String, Node)>,
}

impl Node {
    /// Adds the path `path` (dotted) leading to `slot`.
    pub(super) fn add(&mut self, path: &str, slot: usize) {
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

    pub(super) fn child(&self, key: &str) -> Option<&Node> {
        // Most of an event's keys are no path's: told apart by length and
        // first byte before a comparison of the whole key (a call).
        let first = key.as_bytes().first();
        let found =
            self.children.iter().find(|(k, _)| k.len() == key.len() && k.as_bytes().first() == first && k == key);
        found.map(|(_, n)| n)
    }

    /// The slots this key's value fills (a leaf's).
    pub(super) fn slots(&self) -> &[usize] {
        &self.slots
    }

    /// The keys walked into below this one (a branch's).
    pub(super) fn children(&self) -> &[(String, Node)] {
        &self.children
    }
}

/// What one event gives: per slot, the value at its path, if any.
pub(super) type Slots<'a> = Vec<Option<Leaf<'a>>>;

/// A value at a declared path.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Leaf<'a> {
    Null,
    Bool(bool),
    Number(Number),
    Text(Cow<'a, str>),
    List(Vec<Leaf<'a>>),
    /// An object where a value was expected (never a feature's value).
    Object,
}

impl<'a> Leaf<'a> {
    pub(super) fn of(value: &'a Value) -> Leaf<'a> {
        match value {
            Value::Null => Leaf::Null,
            Value::Bool(b) => Leaf::Bool(*b),
            Value::Number(n) => Leaf::Number(n.clone()),
            Value::String(s) => Leaf::Text(Cow::Borrowed(s)),
            Value::Array(items) => Leaf::List(items.iter().map(Leaf::of).collect()),
            Value::Object(_) => Leaf::Object,
        }
    }

    pub(super) fn as_f64(&self) -> Option<f64> {
        match self {
            Leaf::Number(n) => n.as_f64(),
            _ => None,
        }
    }

    pub(super) fn as_i64(&self) -> Option<i64> {
        match self {
            Leaf::Number(n) => n.as_i64(),
            _ => None,
        }
    }

    pub(super) fn as_str(&self) -> Option<&str> {
        match self {
            Leaf::Text(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for Leaf<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Leaf::Null => f.write_str("null"),
            Leaf::Bool(b) => write!(f, "{b}"),
            Leaf::Number(n) => write!(f, "{n}"),
            Leaf::Text(s) => write!(f, "{s:?}"),
            Leaf::List(items) => write!(f, "an array of {}", items.len()),
            Leaf::Object => f.write_str("an object"),
        }
    }
}

impl<'de> serde::Deserialize<'de> for Leaf<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Leaf<'de>, D::Error> {
        d.deserialize_any(LeafVisitor)
    }
}

struct LeafVisitor;

impl<'de> Visitor<'de> for LeafVisitor {
    type Value = Leaf<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Null)
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Bool(b))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Number(n.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Number(n.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Leaf<'de>, E> {
        Ok(Number::from_f64(n).map_or(Leaf::Null, Leaf::Number))
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, s: &'de str) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Text(Cow::Borrowed(s)))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Text(Cow::Owned(s.to_string())))
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Leaf<'de>, E> {
        Ok(Leaf::Text(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Leaf<'de>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Leaf<'de>>()? {
            items.push(item);
        }
        Ok(Leaf::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Leaf<'de>, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Leaf::Object)
    }
}

/// Puts `value` in each of the slots `to` (a path more than one feature
/// reads), cloned for all but the last.
pub(super) fn put<'a>(slots: &mut Slots<'a>, to: &[usize], value: Leaf<'a>) {
    let Some((&last, others)) = to.split_last() else { return };
    for &slot in others {
        slots[slot] = Some(value.clone());
    }
    slots[last] = Some(value);
}

/// Fills `slots` from a parsed record, walking `node`'s paths.
pub(super) fn fill<'a>(node: &Node, value: &'a Value, slots: &mut Slots<'a>) {
    for &slot in &node.slots {
        slots[slot] = Some(Leaf::of(value));
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
pub(super) struct NodeSeed<'a, 'de> {
    pub(super) node: &'a Node,
    pub(super) slots: &'a mut Slots<'de>,
    /// The event itself, which must be an object.
    pub(super) root: bool,
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_, 'de> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if !self.node.slots.is_empty() && self.node.children.is_empty() {
            let value = <Leaf<'de> as serde::Deserialize>::deserialize(d)?;
            put(self.slots, &self.node.slots, value);
            return Ok(());
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_, 'de> {
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
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
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

impl NodeSeed<'_, '_> {
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
