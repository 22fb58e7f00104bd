//! The Open Inference Protocol (KServe V2), REST: server and model
//! metadata, health, and `infer`, with the binary tensor data extension
//! (`binary`). [`tensor`] turns the protocol's tensors into V1 instances
//! for REST and for the gRPC service alike; what the model answers
//! is decided by V1's checks and predict, never here.
//!
//! Inputs are named after the model's features: `dense`, FP32 (or FP64)
//! with shape `[N, dense_dim]`, and one BYTES input per sparse field with
//! shape `[N]` (one value per instance) or `[N, K]` (a bag of up to K values;
//! empty strings pad). A missing sparse input is an empty bag, as in V1.
//! With declared features the inputs are the features' own (or a `record`
//! input of whole records): see `serve::tensor::ModelInputs`.
//! The output is `predictions`, FP32, shape `[N]`. Each row becomes a V1
//! instance and goes through the same checks.

mod binary;

use std::sync::atomic::Ordering;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use super::{body_bytes, check_model, ApiError, AppState, ErrorBody};
use crate::serve::metadata::{ModelMetadata, ServerMetadata, OUTPUT};
use crate::serve::tensor::{self, Elements, Tensor};
use crate::serve::{feedback, Predicted};

/// Server metadata.
#[utoipa::path(get, path = "/v2", tag = "kserve-v2", responses((status = 200, body = ServerMetadata)))]
pub async fn server_metadata() -> Json<ServerMetadata> {
    Json(ServerMetadata::of_this_server())
}

/// Server liveness.
#[utoipa::path(get, path = "/v2/health/live", tag = "kserve-v2", responses((status = 200, body = Object, example = json!({"live": true}))))]
pub async fn live() -> Json<Value> {
    Json(json!({ "live": true }))
}

fn readiness(state: &AppState) -> Response {
    let ready = state.predictor.ready.load(Ordering::Acquire);
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

/// Model metadata: the inputs `infer` takes.
#[utoipa::path(get, path = "/v2/models/{model}", tag = "kserve-v2",
    params(("model" = String, Path, description = "The model name", example = "default")),
    responses((status = 200, body = ModelMetadata), (status = 404, body = ErrorBody)))]
pub async fn model_metadata(
    State(state): State<AppState>,
    Path(model): Path<String>,
) -> Result<Json<ModelMetadata>, ApiError> {
    check_model(&state, &model)?;
    Ok(Json(ModelMetadata::of(&state.predictor)))
}

#[derive(Deserialize, ToSchema)]
pub struct InferInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    /// Row-major, flat or nested; absent when `parameters.binary_data_size`
    /// says the data follows the JSON (the binary extension).
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    data: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Deserialize, ToSchema)]
pub struct RequestedOutput {
    /// `predictions`, the one output.
    name: String,
    /// `binary_data: true` asks for the output in binary form.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Deserialize, ToSchema)]
pub struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    /// The outputs wanted; absent: all (`predictions`).
    #[serde(default)]
    outputs: Option<Vec<RequestedOutput>>,
    /// `binary_data_output: true` asks for every output in binary form.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Serialize, ToSchema)]
pub struct InferOutput {
    name: &'static str,
    datatype: &'static str,
    shape: Vec<i64>,
    /// Absent when the data follows the JSON in binary form.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    data: Option<OutputData>,
    /// `binary_data_size` of binary data.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    parameters: Option<Value>,
}

/// An output's elements: the predictions, or (output `id`) the ids under
/// which they were logged.
#[derive(Serialize)]
#[serde(untagged)]
pub enum OutputData {
    Fp32(Vec<f32>),
    Bytes(Vec<String>),
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

/// Inference (Open Inference Protocol), with the binary tensor data
/// extension: inputs whose `parameters.binary_data_size` is set take their
/// data from the bytes after the JSON (`Inference-Header-Content-Length`
/// long); `predictions` comes back in binary form when asked.
#[utoipa::path(post, path = "/v2/models/{model}/infer", tag = "kserve-v2",
    params(("model" = String, Path, description = "The model name", example = "default")),
    request_body = InferRequest,
    responses(
        (status = 200, body = InferResponse, description = "JSON; or, with binary outputs, the JSON header and the \
            output bytes (Inference-Header-Content-Length gives the header's length)"),
        (status = 400, description = "A bad tensor, named", body = ErrorBody),
        (status = 404, body = ErrorBody),
        (status = 413, body = ErrorBody),
        (status = 503, description = "A shard the inputs read has no replica answering, named", body = ErrorBody),
    ))]
pub async fn infer(
    State(state): State<AppState>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    check_model(&state, &model)?;
    let body = body_bytes(&state, body)?;
    let (request, mut inputs) = parse_request(&body, &headers)?;
    let binary_output = wants_binary_output(&request)?;
    let given = state.predictor.take_ids(&mut inputs)?;
    let snap = state.predictor.serving.load_full();
    let c = snap.model.config();
    let instances = tensor::instances(&inputs, tensor::ModelInputs::of(c), state.predictor.max_batch)?;
    let (Predicted { predictions, model_version, .. }, ids) =
        state.predictor.predict_logged(&snap, instances, given).await?;
    let n = predictions.len() as i64;
    let mut output = InferOutput { name: OUTPUT, datatype: "FP32", shape: vec![n], data: None, parameters: None };
    let ids = ids.map(|ids| InferOutput {
        name: feedback::ID_TENSOR,
        datatype: "BYTES",
        shape: vec![n],
        data: Some(OutputData::Bytes(ids)),
        parameters: None,
    });
    let respond = |output| InferResponse {
        model_name: model,
        model_version: model_version.to_string(),
        id: request.id,
        outputs: std::iter::once(output).chain(ids).collect(),
    };
    if !binary_output {
        output.data = Some(OutputData::Fp32(predictions));
        return Ok(Json(respond(output)).into_response());
    }
    let bytes = tensor::fp32_bytes(&predictions);
    output.parameters = Some(json!({ "binary_data_size": bytes.len() }));
    let header = serde_json::to_vec(&respond(output)).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(binary::response(header, bytes))
}

/// A request body (JSON, or the binary extension's JSON header and bytes)
/// as the protocol's request and its input tensors, taken out of it.
fn parse_request(body: &[u8], headers: &HeaderMap) -> Result<(InferRequest, Vec<Tensor>), ApiError> {
    let (json, binary) = binary::split(body, headers)?;
    let mut request: InferRequest =
        serde_json::from_slice(json).map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))?;
    let inputs = tensors(std::mem::take(&mut request.inputs), binary)?;
    Ok((request, inputs))
}

/// The request's inputs as tensors: JSON `data`, or their share of the
/// binary bytes, in order.
fn tensors(inputs: Vec<InferInput>, binary: &[u8]) -> Result<Vec<Tensor>, ApiError> {
    let mut reader = binary::BinaryReader::new(binary);
    let tensors = (inputs.into_iter())
        .map(|input| {
            let elements = match (binary::data_size(&input.name, input.parameters.as_ref())?, input.data) {
                (Some(size), _) => reader.take(&input.name, &input.datatype, size)?,
                (None, Some(data)) => Elements::Json(flatten(&data).into_iter().cloned().collect()),
                (None, None) => {
                    return Err(ApiError::BadRequest(format!(
                        "input {:?} has neither data nor parameters.binary_data_size",
                        input.name
                    )))
                }
            };
            Ok(Tensor { name: input.name, datatype: input.datatype, shape: input.shape, elements })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    reader.finish()?;
    Ok(tensors)
}

/// Whether `predictions` goes back in binary form: its own `binary_data`
/// if the request names it, else the request's `binary_data_output`.
fn wants_binary_output(request: &InferRequest) -> Result<bool, ApiError> {
    let flag = |parameters: &Option<Map<String, Value>>, name: &str| -> Result<Option<bool>, ApiError> {
        match parameters.as_ref().and_then(|p| p.get(name)) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::BadRequest(format!("parameter {name}: {v} is not a boolean"))),
        }
    };
    let all = flag(&request.parameters, "binary_data_output")?.unwrap_or(false);
    let Some(outputs) = &request.outputs else { return Ok(all) };
    let mut binary = all;
    // The ids of logged predictions come back as JSON, whatever is asked.
    for output in outputs.iter().filter(|o| o.name != feedback::ID_TENSOR) {
        if output.name != OUTPUT {
            return Err(ApiError::BadRequest(format!("unknown output {:?}; the model has {OUTPUT:?}", output.name)));
        }
        binary = flag(&output.parameters, "binary_data")?.unwrap_or(all);
    }
    Ok(binary)
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
    use axum::http::{HeaderMap, HeaderValue};
    use proptest::prelude::*;
    use serde_json::json;

    use super::{binary, parse_request, tensor};
    use crate::alloc_meter;
    use crate::serve::tensor::tests::{hostile_inputs, peak_bound, HostileInput, HARD_CAP, MAX_ROWS, PEAK_FIXED};

    /// The instances a REST body describes, or the 400 it gets.
    fn instances(body: &[u8], headers: &HeaderMap) -> Result<usize, String> {
        let (_, inputs) = parse_request(body, headers).map_err(|e| e.to_string())?;
        let fields = ["tags".to_string()];
        tensor::instances(&inputs, tensor::ModelInputs::Fixed { dense_dim: 2, fields: &fields }, MAX_ROWS)
            .map(|rows| rows.len())
            .map_err(|e| e.to_string())
    }

    /// The body of `inputs` with JSON `data`.
    fn json_body(inputs: &[HostileInput]) -> Vec<u8> {
        let inputs: Vec<_> = (inputs.iter())
            .map(|i| {
                let data: Vec<serde_json::Value> = match i.datatype.as_str() {
                    "BYTES" => (0..i.len).map(|k| json!(format!("v{k}"))).collect(),
                    _ => (0..i.len).map(|k| json!(k as f32)).collect(),
                };
                json!({"name": i.name, "datatype": i.datatype, "shape": i.shape, "data": data})
            })
            .collect();
        serde_json::to_vec(&json!({ "inputs": inputs })).unwrap()
    }

    /// The body of `inputs` in the binary extension, and its header.
    fn binary_body(inputs: &[HostileInput]) -> (Vec<u8>, HeaderMap) {
        let raw: Vec<Vec<u8>> = inputs.iter().map(HostileInput::raw).collect();
        let header: Vec<_> = (inputs.iter().zip(&raw))
            .map(|(i, r)| {
                json!({"name": i.name, "datatype": i.datatype, "shape": i.shape,
                       "parameters": {"binary_data_size": r.len()}})
            })
            .collect();
        let mut body = serde_json::to_vec(&json!({ "inputs": header })).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(binary::HEADER_LENGTH, HeaderValue::from(body.len()));
        body.extend(raw.concat());
        (body, headers)
    }

    #[test]
    fn a_shape_of_a_hundred_million_rows_and_no_data_is_refused_before_it_allocates() {
        let body = br#"{"inputs":[{"name":"tags","datatype":"BYTES","shape":[100000000,0],"data":[]}]}"#;
        let (answer, peak) = alloc_meter::measure(HARD_CAP, || instances(body, &HeaderMap::new()));
        let err = answer.unwrap_err();
        assert!(err.contains("\"tags\"") && err.contains("at most 64 per request"), "{err}");
        assert!(peak < PEAK_FIXED, "{peak} bytes for a {}-byte body", body.len());
    }

    proptest! {
        /// REST JSON and the binary extension: whatever the shapes and the
        /// data, the bytes held at once are bounded by the body's size.
        #[test]
        fn rest_parsing_allocates_only_what_the_body_backs(inputs in hostile_inputs()) {
            let json = json_body(&inputs);
            let (binary, headers) = binary_body(&inputs);
            for (body, headers) in [(json, HeaderMap::new()), (binary, headers)] {
                let (_, peak) = alloc_meter::measure(HARD_CAP, || instances(&body, &headers));
                prop_assert!(peak <= peak_bound(body.len()), "{peak} bytes for a {}-byte body", body.len());
            }
        }
    }
}
