//! The protocol's input tensors, however they came (JSON `data`, the
//! binary extension's bytes, gRPC's typed or raw contents), and the V1
//! instances they describe: one per row, checked by the same code as V1's.

use std::collections::BTreeMap;

use serde_json::{Number, Value};

use crate::http::ApiError;

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
    pub fn from_raw(name: &str, datatype: &str, raw: &[u8]) -> Result<Elements, ApiError> {
        let bad = |msg: String| ApiError::BadRequest(format!("input {name:?}: {msg}"));
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

    /// Element `i` as the JSON value a V1 instance would hold.
    fn json(&self, i: usize, name: &str) -> Result<Value, ApiError> {
        let not_finite = || ApiError::BadRequest(format!("input {name:?}: element {i} is not a finite number"));
        match self {
            Elements::Json(v) => Ok(v[i].clone()),
            Elements::Fp32(v) => Number::from_f64(f64::from(v[i])).map(Value::Number).ok_or_else(not_finite),
            Elements::Fp64(v) => Number::from_f64(v[i]).map(Value::Number).ok_or_else(not_finite),
            Elements::Bytes(v) => match std::str::from_utf8(&v[i]) {
                Ok(s) => Ok(Value::String(s.to_string())),
                Err(_) => Err(ApiError::BadRequest(format!("input {name:?}: element {i} is not UTF-8"))),
            },
        }
    }
}

/// The V1 instances the tensors describe, one per row: `dense`, FP32 (or
/// FP64) `[N, dense_dim]`; a sparse field, BYTES `[N]` or `[N, K]` (a bag
/// padded with empty strings).
pub fn instances(inputs: &[Tensor], dense_dim: usize, fields: &[String]) -> Result<Vec<Value>, ApiError> {
    let bad = |msg: String| ApiError::BadRequest(msg);
    let Some(first) = inputs.first() else {
        return Err(bad("inputs is empty".into()));
    };
    let rows = *first.shape.first().ok_or_else(|| bad(format!("input {:?} has an empty shape", first.name)))?;
    let rows = usize::try_from(rows)
        .map_err(|_| bad(format!("input {:?}: shape {:?} has a negative dimension", first.name, first.shape)))?;
    let mut dense: Option<Vec<Value>> = None;
    let mut sparse: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for input in inputs {
        let name = &input.name;
        let dims: Vec<usize> = (input.shape.iter())
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("input {name:?}: shape {:?} has a negative dimension", input.shape)))?;
        if dims.first() != Some(&rows) {
            return Err(bad(format!(
                "input {name:?}: shape {:?}; every input's first dimension is the batch size {rows}",
                input.shape
            )));
        }
        let count = input.elements.count();
        let holds = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
        if holds != Some(count) {
            let holds = holds.map_or("too many".to_string(), |n| n.to_string());
            return Err(bad(format!("input {name:?}: shape {:?} holds {holds} values, data has {count}", input.shape)));
        }
        let width = count.checked_div(rows).unwrap_or(0);
        let row = |r: usize| -> Result<Vec<Value>, ApiError> {
            (r * width..(r + 1) * width).map(|i| input.elements.json(i, name)).collect()
        };
        if name == "dense" {
            if !matches!(input.datatype.as_str(), "FP32" | "FP64") {
                return Err(bad(format!("input \"dense\" is {}; use FP32", input.datatype)));
            }
            if dims.len() != 2 || width != dense_dim {
                return Err(bad(format!("input \"dense\": shape {:?}; the model takes [N, {dense_dim}]", input.shape)));
            }
            dense = Some((0..rows).map(|r| row(r).map(Value::Array)).collect::<Result<_, _>>()?);
        } else if fields.iter().any(|f| f == name) {
            if input.datatype != "BYTES" {
                return Err(bad(format!("input {name:?} is {}; sparse fields are BYTES", input.datatype)));
            }
            if dims.len() > 2 {
                return Err(bad(format!("input {name:?}: shape {:?}; use [N] or [N, K]", input.shape)));
            }
            let bag = |r: usize| -> Result<Value, ApiError> {
                Ok(Value::Array(row(r)?.into_iter().filter(|v| v.as_str() != Some("")).collect()))
            };
            sparse.insert(name, (0..rows).map(bag).collect::<Result<_, _>>()?);
        } else {
            return Err(bad(format!("unknown input {name:?}; the model takes \"dense\" and {fields:?}")));
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn tensor(name: &str, datatype: &str, shape: &[i64], elements: Elements) -> Tensor {
        Tensor { name: name.into(), datatype: datatype.into(), shape: shape.to_vec(), elements }
    }

    fn bytes_raw(items: &[&str]) -> Vec<u8> {
        items.iter().flat_map(|s| [(s.len() as u32).to_le_bytes().to_vec(), s.as_bytes().to_vec()].concat()).collect()
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
        assert_eq!(instances(&as_json, 2, &fields).unwrap(), want);
        assert_eq!(instances(&as_raw, 2, &fields).unwrap(), want);
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
        let err = instances(&[nan], 2, &[]).unwrap_err().to_string();
        assert!(err.contains("not a finite number"), "{err}");
        let not_utf8 = tensor("tags", "BYTES", &[1], Elements::Bytes(vec![vec![0xff]]));
        let err = instances(&[not_utf8], 2, &["tags".into()]).unwrap_err().to_string();
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
            let err = instances(&[t], 2, &["tags".into()]).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
