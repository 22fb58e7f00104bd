//! The protocol's input tensors, however they came (JSON `data`, the
//! binary extension's bytes, gRPC's typed or raw contents), and the V1
//! instances they describe: one per row, checked by the same code as V1's.

use std::collections::BTreeMap;

use serde_json::{Number, Value};

use super::ServeError;
use crate::config::{FeaturesConfig, ModelConfig};

/// An input tensor's elements, row-major.
#[derive(Debug, PartialEq)]
pub enum Elements {
    /// JSON values (the flattened `data` of a REST request).
    Json(Vec<Value>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
    /// BYTES elements.
    Bytes(Vec<Vec<u8>>),
}

/// One input tensor.
#[derive(Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub elements: Elements,
}

impl Elements {
    /// Decodes a tensor sent as bytes: little-endian, row-major, no
    /// padding; a BYTES element is a 4-byte little-endian length and the
    /// bytes. Only the datatypes the model's inputs take are accepted.
    pub fn from_raw(name: &str, datatype: &str, raw: &[u8]) -> Result<Elements, ServeError> {
        let bad = |msg: String| ServeError::BadRequest(format!("input {name:?}: {msg}"));
        match datatype {
            "FP32" | "FP64" => {
                let width = if datatype == "FP32" { 4 } else { 8 };
                if !raw.len().is_multiple_of(width) {
                    return Err(bad(format!("{} bytes of {datatype} is not a whole number of elements", raw.len())));
                }
                let chunks = raw.chunks_exact(width);
                Ok(match width {
                    4 => Elements::Fp32(chunks.map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()),
                    _ => Elements::Fp64(chunks.map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()),
                })
            }
            "BYTES" => {
                let mut elements = Vec::new();
                let mut rest = raw;
                while !rest.is_empty() {
                    let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                        return Err(bad(format!(
                            "BYTES data ends inside an element's length ({} bytes left)",
                            rest.len()
                        )));
                    };
                    let len = u32::from_le_bytes(*len) as usize;
                    if len > tail.len() {
                        return Err(bad(format!("a BYTES element of {len} bytes but {} bytes left", tail.len())));
                    }
                    elements.push(tail[..len].to_vec());
                    rest = &tail[len..];
                }
                Ok(Elements::Bytes(elements))
            }
            other => {
                Err(bad(format!("datatype {other} in binary form is not taken; dense is FP32, sparse fields BYTES")))
            }
        }
    }

    /// How many elements.
    fn count(&self) -> usize {
        match self {
            Elements::Json(v) => v.len(),
            Elements::Fp32(v) => v.len(),
            Elements::Fp64(v) => v.len(),
            Elements::Bytes(v) => v.len(),
        }
    }

    /// Whether element `i` is a NaN.
    fn is_nan(&self, i: usize) -> bool {
        match self {
            Elements::Fp32(v) => v[i].is_nan(),
            Elements::Fp64(v) => v[i].is_nan(),
            Elements::Json(_) | Elements::Bytes(_) => false,
        }
    }

    /// Element `i` as the JSON value a V1 instance would hold.
    fn json(&self, i: usize, name: &str) -> Result<Value, ServeError> {
        let not_finite = || ServeError::BadRequest(format!("input {name:?}: element {i} is not a finite number"));
        match self {
            Elements::Json(v) => Ok(v[i].clone()),
            Elements::Fp32(v) => Number::from_f64(f64::from(v[i])).map(Value::Number).ok_or_else(not_finite),
            Elements::Fp64(v) => Number::from_f64(v[i]).map(Value::Number).ok_or_else(not_finite),
            Elements::Bytes(v) => match std::str::from_utf8(&v[i]) {
                Ok(s) => Ok(Value::String(s.to_string())),
                Err(_) => Err(ServeError::BadRequest(format!("input {name:?}: element {i} is not UTF-8"))),
            },
        }
    }
}

/// The inputs a model takes, by name.
#[derive(Clone, Copy)]
pub enum ModelInputs<'a> {
    /// The fixed schema's: `dense` FP32 `[N, dense_dim]`, and each sparse
    /// field BYTES `[N]` or `[N, K]`.
    Fixed { dense_dim: usize, fields: &'a [String] },
    /// One per declared feature (its crosses are made from them): a number
    /// (a dense feature, or one cut at boundaries) FP32 `[N]`, a category
    /// BYTES `[N]` or `[N, K]`.
    Declared(&'a FeaturesConfig),
}

impl ModelInputs<'_> {
    pub fn of(model: &ModelConfig) -> ModelInputs<'_> {
        match model.features.is_declared() {
            true => ModelInputs::Declared(&model.features),
            false => ModelInputs::Fixed { dense_dim: model.dense_dim, fields: &model.sparse_fields },
        }
    }

    /// The inputs the model takes, in order, with the datatype and shape
    /// (-1: any length) each is sent as.
    pub fn listed(&self) -> Vec<(String, &'static str, Vec<i64>)> {
        match self {
            ModelInputs::Fixed { dense_dim, fields } => {
                let sparse = fields.iter().map(|f| (f.clone(), "BYTES", vec![-1, -1]));
                std::iter::once(("dense".to_string(), "FP32", vec![-1, *dense_dim as i64])).chain(sparse).collect()
            }
            ModelInputs::Declared(spec) => {
                let numbers = spec.dense.iter().map(|f| (&f.name, true));
                let sparse = spec.sparse.iter().filter(|f| f.cross.is_empty());
                (numbers.chain(sparse.map(|f| (&f.name, !f.boundaries.is_empty()))))
                    .map(|(name, number)| match number {
                        true => (name.clone(), "FP32", vec![-1]),
                        false => (name.clone(), "BYTES", vec![-1, -1]),
                    })
                    .collect()
            }
        }
    }

    /// What the input `name` is to the model.
    fn role(&self, name: &str) -> Result<Role, ServeError> {
        let unknown = || {
            let takes: Vec<String> = self.listed().into_iter().map(|(name, ..)| name).collect();
            Err(ServeError::BadRequest(format!(
                "unknown input {name:?}; the model takes {takes:?}, or \"{RECORD}\" alone"
            )))
        };
        match self {
            ModelInputs::Fixed { dense_dim, .. } if name == "dense" => Ok(Role::Dense(*dense_dim)),
            ModelInputs::Fixed { fields, .. } if fields.iter().any(|f| f == name) => Ok(Role::Sparse),
            ModelInputs::Fixed { .. } => unknown(),
            ModelInputs::Declared(spec) => {
                if spec.dense.iter().any(|f| f.name == name) {
                    return Ok(Role::Number);
                }
                match spec.sparse.iter().find(|f| f.name == name) {
                    Some(f) if !f.cross.is_empty() => Err(ServeError::BadRequest(format!(
                        "input {name:?} is a cross, made from {:?}: send those",
                        f.cross
                    ))),
                    Some(f) if !f.boundaries.is_empty() => Ok(Role::Number),
                    Some(_) => Ok(Role::Sparse),
                    None => unknown(),
                }
            }
        }
    }
}

/// What one input is to the model, decided from its name.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// The fixed schema's dense values, `[N, width]`.
    Dense(usize),
    /// Categories: `[N]`, or `[N, K]` bags padded with empty strings.
    Sparse,
    /// One number per row: `[N]` or `[N, 1]`.
    Number,
}

/// An input whose shape has been checked against its data and the limits:
/// `rows` instances of `width` elements each.
struct Checked<'a> {
    input: &'a Tensor,
    role: Role,
    width: usize,
}

/// Checks one input before anything is allocated from its shape: the name
/// and datatype are the model's, every dimension is non-negative, their
/// product does not overflow and is the number of elements sent, and the
/// first dimension is the batch's `rows`. Only then may a caller allocate
/// per row: the rows are at most `max_rows`, and the elements are backed
/// by the request's bytes.
fn check<'a>(input: &'a Tensor, rows: usize, model: ModelInputs) -> Result<Checked<'a>, ServeError> {
    let name = &input.name;
    let bad = |msg: String| Err(ServeError::BadRequest(format!("input {name:?}: {msg}")));
    let role = model.role(name)?;
    match (role, input.datatype.as_str()) {
        (Role::Dense(_) | Role::Number, "FP32" | "FP64") | (Role::Sparse, "BYTES") => {}
        (Role::Sparse, other) => return bad(format!("datatype {other}; categories are BYTES")),
        (_, other) => return bad(format!("datatype {other}; use FP32")),
    }
    let shape = &input.shape;
    let Ok(dims) = shape.iter().map(|&d| usize::try_from(d)).collect::<Result<Vec<usize>, _>>() else {
        return bad(format!("shape {shape:?} has a negative dimension"));
    };
    if dims.first() != Some(&rows) {
        return bad(format!("shape {shape:?}; every input's first dimension is the batch size {rows}"));
    }
    match role {
        Role::Dense(width) if dims.len() != 2 || dims[1] != width => {
            return bad(format!("shape {shape:?}; the model takes [N, {width}]"));
        }
        Role::Sparse if dims.len() > 2 => return bad(format!("shape {shape:?}; use [N] or [N, K]")),
        Role::Number if dims.len() > 2 || dims.get(1).is_some_and(|&d| d != 1) => {
            return bad(format!("shape {shape:?}; use [N] or [N, 1]"));
        }
        _ => {}
    }
    let count = input.elements.count();
    let holds = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if holds != Some(count) {
        let holds = holds.map_or("more than 2^64".to_string(), |n| n.to_string());
        return bad(format!("shape {shape:?} holds {holds} values, data has {count}"));
    }
    Ok(Checked { input, role, width: dims.get(1).copied().unwrap_or(1) })
}

/// The batch size the first input declares, checked against `max_rows`
/// before any input is looked at further.
fn rows(inputs: &[Tensor], max_rows: usize) -> Result<usize, ServeError> {
    let bad = |msg: String| ServeError::BadRequest(msg);
    let Some(first) = inputs.first() else {
        return Err(bad("inputs is empty".into()));
    };
    let name = &first.name;
    let rows = *first.shape.first().ok_or_else(|| bad(format!("input {name:?} has an empty shape")))?;
    let rows = usize::try_from(rows)
        .map_err(|_| bad(format!("input {name:?}: shape {:?} has a negative dimension", first.shape)))?;
    if rows > max_rows {
        return Err(bad(format!(
            "input {name:?}: shape {:?} is {rows} instances; at most {max_rows} per request",
            first.shape
        )));
    }
    Ok(rows)
}

/// The input that carries whole records, one JSON object per row, read as
/// V1 instances are (through the model's declared features, if any).
pub const RECORD: &str = "record";

/// What the tensors describe, one per row.
#[derive(Debug, PartialEq)]
pub enum Rows {
    /// The model's inputs as the fixed schema's instances.
    Fixed(Vec<Value>),
    /// Records, as V1 instances.
    Records(Vec<Value>),
}

impl Rows {
    pub fn len(&self) -> usize {
        match self {
            Rows::Fixed(rows) | Rows::Records(rows) => rows.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The rows as instances (JSON), as they were served.
    pub fn values(&self) -> &[Value] {
        match self {
            Rows::Fixed(rows) | Rows::Records(rows) => rows,
        }
    }
}

/// The rows the tensors describe: either a `record` input alone, BYTES
/// `[N]`, each a JSON object; or the model's inputs ([`ModelInputs`]).
/// Every input is checked ([`check`]) before any is turned into rows, so a
/// shape the data does not back, or more than `max_rows` rows, is refused
/// before anything is allocated from it.
pub fn instances(inputs: &[Tensor], model: ModelInputs, max_rows: usize) -> Result<Rows, ServeError> {
    let rows = rows(inputs, max_rows)?;
    if inputs.iter().any(|i| i.name == RECORD) {
        return records(inputs, rows).map(Rows::Records);
    }
    let checked = inputs.iter().map(|input| check(input, rows, model)).collect::<Result<Vec<_>, _>>()?;
    match model {
        ModelInputs::Fixed { .. } => fixed(checked, rows).map(Rows::Fixed),
        ModelInputs::Declared(spec) => declared(checked, rows, spec).map(Rows::Records),
    }
}

/// The `record` input's rows, parsed.
fn records(inputs: &[Tensor], rows: usize) -> Result<Vec<Value>, ServeError> {
    let bad = |msg: String| ServeError::BadRequest(format!("input {RECORD:?}: {msg}"));
    let [input] = inputs else { return Err(bad("send it alone, without the model's other inputs".into())) };
    if input.datatype != "BYTES" || input.shape.len() != 1 || input.elements.count() != rows {
        return Err(bad(format!("{} {:?}; use BYTES [N], a JSON record per row", input.datatype, input.shape)));
    }
    (0..rows)
        .map(|r| {
            let text = input.elements.json(r, RECORD)?;
            let record: Value = serde_json::from_str(text.as_str().unwrap_or_default())
                .map_err(|e| bad(format!("row {r} is not JSON: {e}")))?;
            match record.is_object() {
                true => Ok(record),
                false => Err(bad(format!("row {r} is not a JSON object"))),
            }
        })
        .collect()
}

impl Checked<'_> {
    /// Row `r`'s elements as JSON values.
    fn row(&self, r: usize) -> Result<Vec<Value>, ServeError> {
        let name = &self.input.name;
        (r * self.width..(r + 1) * self.width).map(|i| self.input.elements.json(i, name)).collect()
    }

    /// Row `r` as the value an instance holds: a bag (padding dropped) of
    /// categories, the array of dense values, or the one number (NaN: no
    /// value, so the feature does what it declares for a missing one).
    fn value(&self, r: usize) -> Result<Value, ServeError> {
        if self.role == Role::Number && self.input.elements.is_nan(r * self.width) {
            return Ok(Value::Null);
        }
        let row = self.row(r)?;
        Ok(match self.role {
            Role::Sparse => Value::Array(row.into_iter().filter(|v| v.as_str() != Some("")).collect()),
            Role::Dense(_) => Value::Array(row),
            Role::Number => row.into_iter().next().unwrap_or_default(),
        })
    }
}

/// Records from the declared features' inputs: each input's value at its
/// feature's path, so that the declaration reads them as it reads events.
fn declared(checked: Vec<Checked>, rows: usize, spec: &FeaturesConfig) -> Result<Vec<Value>, ServeError> {
    let path = |name: &str| {
        let dense = spec.dense.iter().find(|f| f.name == name).map(|f| f.path.as_str());
        dense.or_else(|| spec.sparse.iter().find(|f| f.name == name).map(|f| f.path.as_str())).unwrap_or_default()
    };
    let paths: Vec<&str> = checked.iter().map(|c| path(&c.input.name)).collect();
    if let Some(i) = (1..paths.len()).find(|&i| paths[..i].contains(&paths[i])) {
        let first = &checked[paths.iter().position(|p| *p == paths[i]).unwrap_or_default()].input.name;
        let msg = format!("inputs {first:?} and {:?} both read {:?}: send one", checked[i].input.name, paths[i]);
        return Err(ServeError::BadRequest(msg));
    }
    let mut records = vec![Value::Object(serde_json::Map::new()); rows];
    for (input, path) in checked.iter().zip(&paths) {
        for (r, record) in records.iter_mut().enumerate() {
            set(record, path, input.value(r)?);
        }
    }
    Ok(records)
}

/// Puts `value` at the dotted `path` of `record`, making the objects on
/// the way. (No path of a declaration walks into another's value, and no
/// two inputs give one path, so each key on the way is an object's.)
fn set(record: &mut Value, path: &str, value: Value) {
    let mut node = record;
    let mut keys = path.split('.').peekable();
    while let (Some(key), Value::Object(map)) = (keys.next(), node) {
        if keys.peek().is_none() {
            map.insert(key.to_string(), value);
            return;
        }
        node = map.entry(key).or_insert_with(|| Value::Object(serde_json::Map::new()));
    }
}

/// The fixed schema's instances from the model's inputs.
fn fixed(checked: Vec<Checked>, rows: usize) -> Result<Vec<Value>, ServeError> {
    let mut dense: Option<Vec<Value>> = None;
    let mut sparse: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for input in &checked {
        let values = (0..rows).map(|r| input.value(r)).collect::<Result<_, _>>()?;
        match input.role {
            Role::Sparse => drop(sparse.insert(&input.input.name, values)),
            _ => dense = Some(values),
        }
    }
    Ok((0..rows)
        .map(|r| {
            let mut instance = serde_json::Map::new();
            if let Some(d) = &dense {
                instance.insert("dense".into(), d[r].clone());
            }
            let bags: serde_json::Map<String, Value> =
                sparse.iter().map(|(f, bags)| (f.to_string(), bags[r].clone())).collect();
            instance.insert("sparse".into(), Value::Object(bags));
            Value::Object(instance)
        })
        .collect())
}

/// The FP32 predictions as the binary extension and gRPC's raw contents
/// carry them: little-endian, no padding.
pub fn fp32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// BYTES elements as the binary extension and gRPC's raw contents carry
/// them (what `Elements::from_raw` reads): each a 4-byte little-endian
/// length and the bytes.
pub fn bytes_raw<S: AsRef<[u8]>>(items: &[S]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(items.iter().map(|i| 4 + i.as_ref().len()).sum());
    for item in items.iter().map(AsRef::as_ref) {
        raw.extend_from_slice(&(item.len() as u32).to_le_bytes());
        raw.extend_from_slice(item);
    }
    raw
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    /// The batch limit the allocation tests parse with.
    pub const MAX_ROWS: usize = 64;
    /// What a parse may hold beyond what scales with the body: the
    /// instances of `MAX_ROWS` rows, and the parser's own.
    pub const PEAK_FIXED: usize = 256 << 10;
    /// Beyond this a measured parse aborts the test binary, so that a
    /// regression fails fast instead of taking the machine's memory.
    pub const HARD_CAP: usize = 256 << 20;

    /// The most a parse of a `body_len`-byte request may hold at once.
    pub fn peak_bound(body_len: usize) -> usize {
        PEAK_FIXED + 64 * body_len
    }

    /// An input as a hostile client may declare it: any name, datatype and
    /// shape, with `len` elements of data.
    #[derive(Debug, Clone)]
    pub struct HostileInput {
        pub name: String,
        pub datatype: String,
        pub shape: Vec<i64>,
        pub len: usize,
    }

    impl HostileInput {
        /// Its data in the binary form (`Elements::from_raw`'s).
        pub fn raw(&self) -> Vec<u8> {
            match self.datatype.as_str() {
                "FP32" => (0..self.len).flat_map(|k| (k as f32).to_le_bytes()).collect(),
                "FP64" => (0..self.len).flat_map(|k| (k as f64).to_le_bytes()).collect(),
                "BYTES" => bytes_raw(&(0..self.len).map(|k| format!("v{k}")).collect::<Vec<_>>()),
                _ => vec![1; self.len],
            }
        }
    }

    /// Dimensions that have broken parsers: zero, huge, negative, the
    /// product's overflow, and the small ones that make valid tensors.
    fn dimension() -> impl Strategy<Value = i64> {
        prop_oneof![
            4 => 0i64..4,
            1 => Just(100_000_000i64),
            1 => Just(1i64 << 32),
            1 => 1i64..=i64::MAX,
            1 => i64::MIN..0,
        ]
    }

    /// One to three inputs of the model's names (`dense`, `tags`) or not.
    pub fn hostile_inputs() -> impl Strategy<Value = Vec<HostileInput>> {
        let input = (
            prop::sample::select(vec!["dense", "tags", "nope"]),
            prop::sample::select(vec!["FP32", "FP64", "BYTES", "INT8"]),
            prop::collection::vec(dimension(), 0..4),
            0usize..24,
        )
            .prop_map(|(name, datatype, shape, len)| HostileInput {
                name: name.into(),
                datatype: datatype.into(),
                shape,
                len,
            });
        prop::collection::vec(input, 1..4)
    }

    fn tensor(name: &str, datatype: &str, shape: &[i64], elements: Elements) -> Tensor {
        Tensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), elements }
    }

    #[test]
    fn json_and_raw_tensors_become_the_same_instances() {
        let want = vec![
            json!({"dense": [1.0, 2.0], "sparse": {"tags": ["a", "b"]}}),
            json!({"dense": [3.0, 4.0], "sparse": {"tags": ["c"]}}),
        ];
        let as_json = [
            tensor("dense", "FP32", &[2, 2], Elements::Json(vec![json!(1.0), json!(2.0), json!(3.0), json!(4.0)])),
            tensor("tags", "BYTES", &[2, 2], Elements::Json(vec![json!("a"), json!("b"), json!("c"), json!("")])),
        ];
        let dense_raw: Vec<u8> = [1f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let as_raw = [
            tensor("dense", "FP32", &[2, 2], Elements::from_raw("dense", "FP32", &dense_raw).unwrap()),
            tensor(
                "tags",
                "BYTES",
                &[2, 2],
                Elements::from_raw("tags", "BYTES", &bytes_raw(&["a", "b", "c", ""])).unwrap(),
            ),
        ];
        let fields = ["tags".to_string()];
        assert_eq!(
            instances(&as_json, ModelInputs::Fixed { dense_dim: 2, fields: &fields }, 64).unwrap(),
            Rows::Fixed(want.clone())
        );
        assert_eq!(
            instances(&as_raw, ModelInputs::Fixed { dense_dim: 2, fields: &fields }, 64).unwrap(),
            Rows::Fixed(want)
        );
    }

    #[test]
    fn bad_raw_data_is_named() {
        let cases: [(&str, &[u8], &str); 4] = [
            ("FP32", &[0, 0, 0], "not a whole number"),
            ("BYTES", &[5, 0, 0, 0, b'a'], "a BYTES element of 5 bytes but 1 bytes left"),
            ("BYTES", &[1, 0], "ends inside an element's length"),
            ("INT8", &[1], "is not taken"),
        ];
        for (datatype, raw, want) in cases {
            let err = Elements::from_raw("x", datatype, raw).unwrap_err().to_string();
            assert!(err.contains(want) && err.contains("\"x\""), "{datatype} {raw:?}: {err}");
        }
        let nan = tensor("dense", "FP32", &[1, 2], Elements::Fp32(vec![1.0, f32::NAN]));
        let err = instances(&[nan], ModelInputs::Fixed { dense_dim: 2, fields: &[] }, 64).unwrap_err().to_string();
        assert!(err.contains("not a finite number"), "{err}");
        let not_utf8 = tensor("tags", "BYTES", &[1], Elements::Bytes(vec![vec![0xff]]));
        let err = instances(&[not_utf8], ModelInputs::Fixed { dense_dim: 2, fields: &["tags".into()] }, 64)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not UTF-8"), "{err}");
    }

    #[test]
    fn bad_tensors_are_named() {
        let json = |v: &[Value]| Elements::Json(v.to_vec());
        let cases = [
            (tensor("dense", "FP32", &[2, 2], json(&[json!(1), json!(2), json!(3)])), "holds 4 values, data has 3"),
            (tensor("dense", "FP32", &[1, 3], json(&[json!(1), json!(2), json!(3)])), "takes [N, 2]"),
            (tensor("dense", "INT8", &[1, 2], json(&[json!(1), json!(2)])), "use FP32"),
            (tensor("nope", "BYTES", &[1], json(&[json!("x")])), "unknown input"),
            (tensor("tags", "FP32", &[1], json(&[json!(1)])), "are BYTES"),
            (tensor("dense", "FP32", &[-1, 2], json(&[])), "negative"),
        ];
        for (t, want) in cases {
            let err = instances(&[t], ModelInputs::Fixed { dense_dim: 2, fields: &["tags".into()] }, 64)
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{err}");
        }
    }

    #[test]
    fn declared_features_are_inputs_of_their_own_made_into_the_records_they_read() {
        let spec: FeaturesConfig = toml::from_str(
            r#"
            label = { path = "clicked" }
            dense = [{ name = "price", path = "price" }, { name = "age", path = "user.age" }]
            sparse = [{ name = "user", path = "user.id" }, { name = "tags", path = "ad.tags" },
                      { name = "hour", path = "hour", boundaries = [6, 12] },
                      { name = "user_x_hour", cross = ["user", "hour"] }]
            "#,
        )
        .unwrap();
        let model = ModelInputs::Declared(&spec);
        let listed: Vec<(String, &str, Vec<i64>)> = model.listed();
        let names: Vec<&str> = listed.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(names, ["price", "age", "user", "tags", "hour"], "every feature but the cross");
        assert_eq!((listed[4].1, &listed[4].2), ("FP32", &vec![-1]), "a number cut at boundaries is sent whole");
        let inputs = [
            tensor("price", "FP32", &[2], Elements::Fp32(vec![1.5, 2.0])),
            tensor("age", "FP64", &[2, 1], Elements::Fp64(vec![40.0, 41.0])),
            tensor("user", "BYTES", &[2], Elements::Bytes(vec![b"u1".to_vec(), b"u2".to_vec()])),
            tensor(
                "tags",
                "BYTES",
                &[2, 2],
                Elements::Bytes(vec![b"a".to_vec(), b"".to_vec(), b"b".to_vec(), b"c".to_vec()]),
            ),
        ];
        let want = vec![
            json!({"price": 1.5, "user": {"age": 40.0, "id": ["u1"]}, "ad": {"tags": ["a"]}}),
            json!({"price": 2.0, "user": {"age": 41.0, "id": ["u2"]}, "ad": {"tags": ["b", "c"]}}),
        ];
        assert_eq!(instances(&inputs, model, 64).unwrap(), Rows::Records(want));
        let no_price = tensor("price", "FP32", &[1], Elements::Fp32(vec![f32::NAN]));
        let want = Rows::Records(vec![json!({"price": null})]);
        assert_eq!(instances(&[no_price], model, 64).unwrap(), want, "NaN: no value");
        let refused = |inputs: &[Tensor]| instances(inputs, model, 64).unwrap_err().to_string();
        let user = || tensor("user", "BYTES", &[1], Elements::Bytes(vec![b"u1".to_vec()]));
        assert!(refused(&[tensor("user_x_hour", "BYTES", &[1], Elements::Bytes(vec![]))]).contains("is a cross"));
        assert!(refused(&[tensor("dense", "FP32", &[1, 2], Elements::Fp32(vec![1.0, 2.0]))]).contains("unknown input"));
        assert!(refused(&[tensor("hour", "FP32", &[1, 2], Elements::Fp32(vec![1.0, 2.0]))]).contains("[N, 1]"));
        assert!(refused(&[tensor("hour", "BYTES", &[1], Elements::Bytes(vec![b"9".to_vec()]))]).contains("use FP32"));
        assert!(refused(&[user(), user()]).contains("both read \"user.id\""));
    }

    #[test]
    fn a_record_input_carries_whole_records_alone() {
        let records = |texts: &[&str]| {
            let rows = texts.len() as i64;
            tensor(RECORD, "BYTES", &[rows], Elements::Json(texts.iter().map(|t| json!(t)).collect()))
        };
        let rows = instances(
            &[records(&[r#"{"user": "u7", "price": 1}"#])],
            ModelInputs::Fixed { dense_dim: 2, fields: &[] },
            64,
        )
        .unwrap();
        assert_eq!(rows, Rows::Records(vec![json!({"user": "u7", "price": 1})]));
        let dense = tensor("dense", "FP32", &[1, 2], Elements::Json(vec![json!(1), json!(2)]));
        let cases = [
            (vec![records(&["{}"]), dense], "alone"),
            (vec![records(&["{\"a\": 1"])], "row 0 is not JSON"),
            (vec![records(&["[1]"])], "not a JSON object"),
        ];
        for (inputs, want) in cases {
            let err = instances(&inputs, ModelInputs::Fixed { dense_dim: 2, fields: &[] }, 64).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
