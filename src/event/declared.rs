//! Events as a team writes them, read through the model's declared
//! features (`[model.features]`, see `config::features`): each feature's
//! value found at its path, turned into a dense number or a sparse bag as
//! declared, or the event refused naming the feature. What comes out is
//! what the fixed schema gives, so everything after (checks, hashing) is
//! the same code.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{SchemaError, SparseValue, MAX_BAG};
use crate::config::{FeaturesConfig, IfMissing, Scalar, SparseFeature, TimeUnit};

/// A declaration, compiled: paths split once.
#[derive(Clone, Debug)]
pub struct Declared {
    spec: FeaturesConfig,
    label_path: Vec<String>,
    time_path: Option<Vec<String>>,
    dense_paths: Vec<Vec<String>>,
    sparse_paths: Vec<Vec<String>>,
}

/// What the fixed schema would have held for an instance.
pub(super) struct Reshaped {
    pub(super) dense: Vec<f32>,
    pub(super) sparse: BTreeMap<String, SparseValue>,
}

fn split(path: &str) -> Vec<String> {
    path.split('.').map(str::to_string).collect()
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, key| v.get(key)).filter(|v| !v.is_null())
}

fn refused(name: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Feature { name: name.to_string(), reason: reason.into() }
}

impl Declared {
    pub fn new(spec: &FeaturesConfig) -> Declared {
        Declared {
            label_path: spec.label.as_ref().map_or_else(Vec::new, |l| split(&l.path)),
            time_path: spec.time.as_ref().map(|t| split(&t.path)),
            dense_paths: spec.dense.iter().map(|f| split(&f.path)).collect(),
            sparse_paths: spec.sparse.iter().map(|f| split(&f.path)).collect(),
            spec: spec.clone(),
        }
    }

    /// A training event's features, label and event time.
    pub(super) fn event(&self, event: &Value) -> Result<(Reshaped, f64, Option<i64>), SchemaError> {
        let features = self.instance(event)?;
        Ok((features, self.label(event)?, self.time(event)?))
    }

    /// An instance's features.
    pub(super) fn instance(&self, event: &Value) -> Result<Reshaped, SchemaError> {
        if !event.is_object() {
            return Err(SchemaError::Json("an event is a JSON object".into()));
        }
        let dense = (self.spec.dense.iter().zip(&self.dense_paths))
            .map(|(f, path)| match (lookup(event, path).and_then(Value::as_f64), f.default) {
                (Some(v), _) => Ok(v as f32),
                (None, Some(default)) => Ok(default),
                (None, None) => Err(refused(&f.name, format!("no number at {:?}", f.path))),
            })
            .collect::<Result<Vec<f32>, _>>()?;
        let mut sparse: BTreeMap<String, SparseValue> = BTreeMap::new();
        let mut values: Vec<Vec<String>> = Vec::with_capacity(self.spec.sparse.len());
        for (f, path) in self.spec.sparse.iter().zip(&self.sparse_paths) {
            let bag = match f.cross.is_empty() {
                true => self.categories(f, lookup(event, path))?,
                false => crossed(f, &self.spec.sparse, &values)?,
            };
            if !bag.is_empty() {
                sparse.insert(f.name.clone(), SparseValue::Bag(bag.clone()));
            }
            values.push(bag);
        }
        Ok(Reshaped { dense, sparse })
    }

    /// A sparse feature's bag from its value: a category or an array of
    /// them, or a number cut at the feature's boundaries.
    fn categories(&self, f: &SparseFeature, value: Option<&Value>) -> Result<Vec<String>, SchemaError> {
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
        let items: Vec<&Value> = match value {
            Value::Array(items) if items.len() > MAX_BAG => {
                return Err(refused(&f.name, format!("{} values, at most {MAX_BAG}", items.len())))
            }
            Value::Array(items) => items.iter().collect(),
            one => vec![one],
        };
        let texts: Option<Vec<String>> = items.into_iter().map(category).collect();
        match texts {
            Some(texts) => Ok(texts),
            None => wrong(format!("the value at {:?} is not a category (a string, number or bool)", f.path)),
        }
    }

    fn label(&self, event: &Value) -> Result<f64, SchemaError> {
        let Some(spec) = &self.spec.label else { return Err(refused("label", "no label is declared")) };
        let Some(value) = lookup(event, &self.label_path) else {
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

    fn time(&self, event: &Value) -> Result<Option<i64>, SchemaError> {
        let (Some(spec), Some(path)) = (&self.spec.time, &self.time_path) else { return Ok(None) };
        let Some(value) = lookup(event, path) else { return Ok(None) };
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

/// A category's text: a string as it is, a number as JSON writes it, a
/// bool as `true` or `false`.
fn category(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every combination of the crossed features' values, joined by U+001F.
fn crossed(f: &SparseFeature, sparse: &[SparseFeature], values: &[Vec<String>]) -> Result<Vec<String>, SchemaError> {
    let mut product = vec![String::new()];
    for (i, name) in f.cross.iter().enumerate() {
        let at = sparse.iter().position(|s| s.name == *name).expect("a cross names earlier features (validated)");
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
