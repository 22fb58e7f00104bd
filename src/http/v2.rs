//! The Open Inference Protocol (KServe V2), REST: server and model
//! metadata, health, and `infer`.
//!
//! Inputs are named after the model's features: `dense`, FP32 (or FP64)
//! with shape `[N, dense_dim]`, and one BYTES input per sparse field with
//! shape `[N]` (one value per instance) or `[N, K]` (a bag of up to K values;
//! empty strings pad). A missing sparse input is an empty bag, as in V1.
//! The output is `predictions`, FP32, shape `[N]`. Each row becomes a V1
//! instance and goes through the same checks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::{body_bytes, check_model, predict_instances, ApiError, AppState, ErrorBody};

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    name: &'static str,
    version: &'static str,
    extensions: Vec<String>,
}

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "kserve-v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata { name: "tributary", version: env!("CARGO_PKG_VERSION"), extensions: Vec::new() })
}

/// Server liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve-v2", responses((status = 200, body = Object, example = json!({"live": true}))))]
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

fn readiness(state: &AppState) -> Response {
    let ready = state.ready.load(Ordering::Acquire);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({ "ready": ready }))).into_response()
}

/// Server readiness: caught up with the update log.
#[utoipa::path(get, path = "/v2/health/ready", tag = "kserve-v2", responses(
    (status = 200, body = Object, example = json!({"ready": true})),
    (status = 503, description = "Catching up", body = Object),
))]
pub async fn ready(State(state): State<AppState>) -> Response {
    readiness(&state)
}

/// Model readiness.
#[utoipa::path(get, path = "/v2/models/{model}/ready", tag = "kserve-v2",
    params(("model" = String, Path, description = "The model name", example = "default")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody), (status = 503, body = Object)))]
pub async fn model_ready(State(state): State<AppState>, Path(model): Path<String>) -> Result<Response, ApiError> {
    check_model(&state, &model)?;
    Ok(readiness(&state))
}

#[derive(Serialize, ToSchema)]
pub struct TensorMetadata {
    name: String,
    datatype: &'static str,
    /// -1: any length.
    shape: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    name: String,
    /// The served version: the update-log position of the weights.
    versions: Vec<String>,
    platform: String,
    inputs: Vec<TensorMetadata>,
    outputs: Vec<TensorMetadata>,
}

/// Model metadata: the inputs `infer` takes.
#[utoipa::path(get, path = "/v2/models/{model}", tag = "kserve-v2",
    params(("model" = String, Path, description = "The model name", example = "default")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    check_model(&state, &model)?;
    let snap = state.serving.load();
    let c = snap.model.config();
    let mut inputs =
        vec![TensorMetadata { name: "dense".into(), datatype: "FP32", shape: vec![-1, c.dense_dim as i64] }];
    inputs.extend(c.sparse_fields.iter().map(|f| TensorMetadata {
        name: f.clone(),
        datatype: "BYTES",
        shape: vec![-1, -1],
    }));
    Ok(Json(ModelMetadata {
        name: model,
        versions: vec![snap.position.to_string()],
        platform: format!(
            "tributary_{}",
            serde_json::to_value(c.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
        ),
        inputs,
        outputs: vec![TensorMetadata { name: "predictions".into(), datatype: "FP32", shape: vec![-1] }],
    }))
}

#[derive(Deserialize, ToSchema)]
pub struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// Row-major, flat or nested.
    #[schema(value_type = Vec<Object>)]
    data: Value,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    #[allow(dead_code)]
    parameters: Option<Value>,
}

#[derive(Deserialize, ToSchema)]
pub struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    /// Accepted and ignored: the one output is `predictions`.
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    #[allow(dead_code)]
    outputs: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    #[allow(dead_code)]
    parameters: Option<Value>,
}

#[derive(Serialize, ToSchema)]
pub struct InferOutput {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
    data: Vec<f32>,
}

#[derive(Serialize, ToSchema)]
pub struct InferResponse {
    model_name: String,
    /// The update-log position of the weights that answered.
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<InferOutput>,
}

/// Inference (Open Inference Protocol).
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "kserve-v2",
    params(("model" = String, Path, description = "The model name", example = "default")),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse),
        (status = 400, description = "A bad tensor, named", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(model): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<InferResponse>, ApiError> {
    check_model(&state, &model)?;
    let body = body_bytes(&state, body)?;
    let request: InferRequest =
        serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let snap = state.serving.load();
    let c = snap.model.config();
    let instances = instances(&request.inputs, c.dense_dim, &c.sparse_fields)?;
    let n = instances.len() as i64;
    let predictions = predict_instances(&state, &snap, instances)?;
    Ok(Json(InferResponse {
        model_name: model,
        model_version: snap.position.to_string(),
        id: request.id,
        outputs: vec![InferOutput { name: "predictions", datatype: "FP32", shape: vec![n], data: predictions }],
    }))
}

/// The V1 instances the tensors describe, one per row.
fn instances(inputs: &[InferInput], dense_dim: usize, fields: &[String]) -> Result<Vec<Value>, ApiError> {
    let bad = |msg: String| ApiError::BadRequest(msg);
    let Some(first) = inputs.first() else {
        return Err(bad("inputs is empty".into()));
    };
    let rows = *first.shape.first().ok_or_else(|| bad(format!("input {:?} has an empty shape", first.name)))?;
    if rows < 0 {
        return Err(bad(format!("input {:?}: shape {:?} has a negative dimension", first.name, first.shape)));
    }
    let rows = rows as usize;
    let mut dense: Option<Vec<Value>> = None;
    let mut sparse: BTreeMap<&str, Vec<Value>> = BTreeMap::new();
    for input in inputs {
        let data = flatten(&input.data);
        let name = &input.name;
        let dims: Vec<usize> = input
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| bad(format!("input {name:?}: shape {:?} has a negative dimension", input.shape)))?;
        if dims.first() != Some(&rows) {
            return Err(bad(format!(
                "input {name:?}: shape {:?}; every input's first dimension is the batch size {rows}",
                input.shape
            )));
        }
        if dims.iter().product::<usize>() != data.len() {
            return Err(bad(format!(
                "input {name:?}: shape {:?} holds {} values, data has {}",
                input.shape,
                dims.iter().product::<usize>(),
                data.len()
            )));
        }
        let width = data.len().checked_div(rows).unwrap_or(0);
        let per_row = |row: usize| &data[row * width..(row + 1) * width];
        if name == "dense" {
            if !matches!(input.datatype.as_str(), "FP32" | "FP64") {
                return Err(bad(format!("input \"dense\" is {}; use FP32", input.datatype)));
            }
            if dims.len() != 2 || width != dense_dim {
                return Err(bad(format!("input \"dense\": shape {:?}; the model takes [N, {dense_dim}]", input.shape)));
            }
            dense = Some((0..rows).map(|r| Value::Array(per_row(r).iter().map(|v| (*v).clone()).collect())).collect());
        } else if fields.iter().any(|f| f == name) {
            if input.datatype != "BYTES" {
                return Err(bad(format!("input {name:?} is {}; sparse fields are BYTES", input.datatype)));
            }
            if dims.len() > 2 {
                return Err(bad(format!("input {name:?}: shape {:?}; use [N] or [N, K]", input.shape)));
            }
            let bags = (0..rows).map(|r| {
                let bag: Vec<Value> =
                    per_row(r).iter().filter(|v| v.as_str() != Some("")).map(|v| (*v).clone()).collect();
                Value::Array(bag)
            });
            sparse.insert(name, bags.collect());
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

/// The leaves of nested arrays, in row-major order.
fn flatten(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(items) => items.iter().flat_map(flatten).collect(),
        leaf => vec![leaf],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> InferInput {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn rows_become_instances() {
        let inputs = [
            input(json!({"name": "dense", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]})),
            input(json!({"name": "tags", "shape": [2, 2], "datatype": "BYTES", "data": [["a", "b"], ["c", ""]]})),
        ];
        let got = instances(&inputs, 2, &["tags".into()]).unwrap();
        assert_eq!(
            got,
            vec![
                json!({"dense": [1, 2], "sparse": {"tags": ["a", "b"]}}),
                json!({"dense": [3, 4], "sparse": {"tags": ["c"]}})
            ]
        );
    }

    #[test]
    fn bad_tensors_are_named() {
        let cases = [
            (json!({"name": "dense", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3]}), "holds 4 values"),
            (json!({"name": "dense", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}), "takes [N, 2]"),
            (json!({"name": "dense", "shape": [1, 2], "datatype": "INT8", "data": [1, 2]}), "use FP32"),
            (json!({"name": "nope", "shape": [1], "datatype": "BYTES", "data": ["x"]}), "unknown input"),
            (json!({"name": "tags", "shape": [1], "datatype": "FP32", "data": [1]}), "are BYTES"),
            (json!({"name": "dense", "shape": [-1, 2], "datatype": "FP32", "data": []}), "negative"),
        ];
        for (v, want) in cases {
            let err = instances(&[input(v.clone())], 2, &["tags".into()]).unwrap_err().to_string();
            assert!(err.contains(want), "{v}: {err}");
        }
    }
}
