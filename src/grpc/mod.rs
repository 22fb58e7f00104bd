//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`,
//! generated from `inference.proto` by build.rs), served by tonic on
//! `grpc.addr`. It owns the translation between the protocol's messages and
//! `serve`: the same serving snapshot, tensors turned into instances and
//! predicted by the same code as REST, errors mapped to the protocol's
//! codes, and requests counted under `protocol="grpc"`. It may not touch
//! training or the log, nor use the HTTP adapter.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use tonic::codec::CompressionEncoding;
use tonic::{Code, Request, Response, Status};
use tracing::info;

use crate::metrics::Metrics;
use crate::serve::metadata::{self, ModelMetadata, ServerMetadata, OUTPUT};
use crate::serve::tensor::{self, Elements, Tensor};
use crate::serve::{feedback, Predictor, ServeError};

/// The messages and service of `inference.proto`.
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::model_infer_request::InferInputTensor;
use proto::model_infer_response::InferOutputTensor;
use proto::model_metadata_response::TensorMetadata;
use proto::InferTensorContents;

/// The service over the served model.
pub struct InferenceService {
    predictor: Predictor,
    metrics: Arc<Metrics>,
}

/// Binds `addr` and serves the service until `stop` completes.
pub async fn serve(
    addr: SocketAddr,
    predictor: Predictor,
    metrics: Arc<Metrics>,
    max_message_bytes: usize,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<Result<(), tonic::transport::Error>>> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (grpc.addr)"))?;
    info!(addr = %listener.local_addr()?, "serving the Open Inference Protocol over gRPC");
    // A request as large as HTTP takes; answers are a few bytes per row.
    let service = GrpcInferenceServiceServer::new(InferenceService { predictor, metrics })
        .max_decoding_message_size(max_message_bytes)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Deflate)
        .send_compressed(CompressionEncoding::Gzip);
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    Ok(tokio::spawn(
        tonic::transport::Server::builder().add_service(service).serve_with_incoming_shutdown(incoming, stop),
    ))
}

impl InferenceService {
    /// Runs `handle`, counting and timing it under `route`, the RPC's path.
    async fn counted<T>(
        &self,
        route: &'static str,
        handle: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let start = Instant::now();
        let result = handle.await;
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        self.metrics.serving.count_request("grpc", "POST", route, &format!("{code:?}"), start.elapsed().as_secs_f64());
        result.map(Response::new)
    }

    fn ready(&self) -> bool {
        self.predictor.is_ready()
    }

    /// Tensors in, predictions out, as REST V2 does it.
    async fn infer(&self, request: proto::ModelInferRequest) -> Result<proto::ModelInferResponse, ServeError> {
        self.predictor.check_model(&request.model_name)?;
        let logged = self.predictor.log.is_some();
        if let Some(other) =
            request.outputs.iter().find(|o| o.name != OUTPUT && !(logged && o.name == feedback::ID_TENSOR))
        {
            return Err(ServeError::BadRequest(format!("unknown output {:?}; the model has {OUTPUT:?}", other.name)));
        }
        let mut inputs = tensors(request.inputs, request.raw_input_contents)?;
        let given = self.predictor.take_ids(&mut inputs)?;
        let snap = self.predictor.serving.load_full();
        let c = snap.model.config();
        let instances = tensor::instances(&inputs, tensor::ModelInputs::of(c), self.predictor.max_batch)?;
        let (predicted, ids) = self.predictor.predict_logged(&snap, instances, given).await?;
        let n = predicted.predictions.len() as i64;
        let output = |name: &str, datatype: &str| InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![n],
            parameters: HashMap::new(),
            contents: None,
        };
        let mut outputs = vec![output(OUTPUT, "FP32")];
        let mut raw = vec![tensor::fp32_bytes(&predicted.predictions)];
        if let Some(ids) = ids {
            outputs.push(output(feedback::ID_TENSOR, "BYTES"));
            raw.push(tensor::bytes_raw(&ids));
        }
        Ok(proto::ModelInferResponse {
            model_name: request.model_name,
            model_version: predicted.model_version.to_string(),
            id: request.id,
            parameters: HashMap::new(),
            outputs,
            raw_output_contents: raw,
        })
    }
}

/// The request's inputs as tensors: from `raw` (one entry per input, in
/// order) when it is sent, else from each input's typed contents.
fn tensors(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> Result<Vec<Tensor>, ServeError> {
    if !raw.is_empty() && raw.len() != inputs.len() {
        return Err(ServeError::BadRequest(format!(
            "{} inputs but {} raw_input_contents; send one per input, or none",
            inputs.len(),
            raw.len()
        )));
    }
    let mut raw = raw.into_iter();
    (inputs.into_iter())
        .map(|InferInputTensor { name, datatype, shape, contents, .. }| {
            let elements = match raw.next() {
                Some(bytes) => Elements::from_raw(&name, &datatype, &bytes)?,
                None => typed_contents(&name, &datatype, contents.unwrap_or_default())?,
            };
            Ok(Tensor { name, datatype, shape, elements })
        })
        .collect()
}

/// An input's typed contents: the field its datatype names (taken, not copied).
fn typed_contents(name: &str, datatype: &str, contents: InferTensorContents) -> Result<Elements, ServeError> {
    match datatype {
        "FP32" => Ok(Elements::Fp32(contents.fp32_contents)),
        "FP64" => Ok(Elements::Fp64(contents.fp64_contents)),
        "BYTES" => Ok(Elements::Bytes(contents.bytes_contents)),
        other => Err(ServeError::BadRequest(format!("input {name:?} is {other}; dense is FP32, sparse fields BYTES"))),
    }
}

/// The protocol's status for a serving error. An internal one is logged
/// and its detail never sent, as over HTTP.
fn status(e: ServeError) -> Status {
    match e {
        ServeError::BadRequest(message) => Status::invalid_argument(message),
        ServeError::NotFound(message) => Status::not_found(message),
        ServeError::Unavailable(message) => Status::unavailable(message),
        ServeError::Internal(detail) => {
            tracing::error!(detail, "internal error answering a gRPC request");
            Status::internal("internal error")
        }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        _: Request<proto::ServerLiveRequest>,
    ) -> Result<Response<proto::ServerLiveResponse>, Status> {
        self.counted("/inference.GRPCInferenceService/ServerLive", async {
            Ok(proto::ServerLiveResponse { live: true })
        })
        .await
    }

    async fn server_ready(
        &self,
        _: Request<proto::ServerReadyRequest>,
    ) -> Result<Response<proto::ServerReadyResponse>, Status> {
        self.counted("/inference.GRPCInferenceService/ServerReady", async {
            Ok(proto::ServerReadyResponse { ready: self.ready() })
        })
        .await
    }

    async fn model_ready(
        &self,
        request: Request<proto::ModelReadyRequest>,
    ) -> Result<Response<proto::ModelReadyResponse>, Status> {
        let name = request.into_inner().name;
        self.counted("/inference.GRPCInferenceService/ModelReady", async {
            self.predictor.check_model(&name).map_err(status)?;
            Ok(proto::ModelReadyResponse { ready: self.ready() })
        })
        .await
    }

    async fn server_metadata(
        &self,
        _: Request<proto::ServerMetadataRequest>,
    ) -> Result<Response<proto::ServerMetadataResponse>, Status> {
        self.counted("/inference.GRPCInferenceService/ServerMetadata", async {
            let m = ServerMetadata::of_this_server();
            Ok(proto::ServerMetadataResponse {
                name: m.name.into(),
                version: m.version.into(),
                extensions: m.extensions,
            })
        })
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<proto::ModelMetadataRequest>,
    ) -> Result<Response<proto::ModelMetadataResponse>, Status> {
        let name = request.into_inner().name;
        self.counted("/inference.GRPCInferenceService/ModelMetadata", async {
            self.predictor.check_model(&name).map_err(status)?;
            let m = ModelMetadata::of(&self.predictor);
            let tensor = |t: metadata::TensorMetadata| TensorMetadata {
                name: t.name,
                datatype: t.datatype.into(),
                shape: t.shape,
            };
            Ok(proto::ModelMetadataResponse {
                name: m.name,
                versions: m.versions,
                platform: m.platform,
                inputs: m.inputs.into_iter().map(tensor).collect(),
                outputs: m.outputs.into_iter().map(tensor).collect(),
            })
        })
        .await
    }

    async fn model_infer(
        &self,
        request: Request<proto::ModelInferRequest>,
    ) -> Result<Response<proto::ModelInferResponse>, Status> {
        let request = request.into_inner();
        self.counted("/inference.GRPCInferenceService/ModelInfer", async { self.infer(request).await.map_err(status) })
            .await
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::alloc_meter;
    use crate::serve::tensor::tests::{hostile_inputs, peak_bound, HostileInput, HARD_CAP, MAX_ROWS};

    /// The instances an encoded `ModelInferRequest` describes, or why not.
    fn instances(encoded: &[u8]) -> Result<usize, String> {
        let request = proto::ModelInferRequest::decode(encoded).map_err(|e| e.to_string())?;
        let inputs = tensors(request.inputs, request.raw_input_contents).map_err(|e| e.to_string())?;
        tensor::instances(&inputs, tensor::ModelInputs::Fixed { dense_dim: 2, fields: &["tags".to_string()] }, MAX_ROWS)
            .map(|rows| rows.len())
            .map_err(|e| e.to_string())
    }

    /// `inputs` as a request, with typed contents or raw ones.
    fn encoded(inputs: &[HostileInput], raw: bool) -> Vec<u8> {
        let typed = |i: &HostileInput| InferTensorContents {
            fp32_contents: (0..i.len).map(|k| k as f32).collect(),
            bytes_contents: (0..i.len).map(|k| format!("v{k}").into_bytes()).collect(),
            ..Default::default()
        };
        let request = proto::ModelInferRequest {
            model_name: "default".into(),
            inputs: (inputs.iter())
                .map(|i| InferInputTensor {
                    name: i.name.clone(),
                    datatype: i.datatype.clone(),
                    shape: i.shape.clone(),
                    contents: (!raw).then(|| typed(i)),
                    ..Default::default()
                })
                .collect(),
            raw_input_contents: if raw { inputs.iter().map(HostileInput::raw).collect() } else { Vec::new() },
            ..Default::default()
        };
        request.encode_to_vec()
    }

    #[test]
    fn a_shape_of_a_hundred_million_rows_and_no_data_is_refused_before_it_allocates() {
        let hostile =
            HostileInput { name: "tags".into(), datatype: "BYTES".into(), shape: vec![100_000_000, 0], len: 0 };
        for raw in [false, true] {
            let body = encoded(std::slice::from_ref(&hostile), raw);
            let (answer, peak) = alloc_meter::measure(HARD_CAP, || instances(&body));
            let err = answer.unwrap_err();
            assert!(err.contains("\"tags\"") && err.contains("at most 64 per request"), "{err}");
            assert!(peak <= peak_bound(body.len()), "{peak} bytes for a {}-byte message", body.len());
        }
    }

    proptest! {
        /// Typed and raw contents: whatever the shapes and the data, the
        /// bytes held at once are bounded by the message's size.
        #[test]
        fn grpc_parsing_allocates_only_what_the_message_backs(inputs in hostile_inputs(), raw in any::<bool>()) {
            let body = encoded(&inputs, raw);
            let (_, peak) = alloc_meter::measure(HARD_CAP, || instances(&body));
            prop_assert!(peak <= peak_bound(body.len()), "{peak} bytes for a {}-byte message", body.len());
        }
    }

    fn input(name: &str, datatype: &str, contents: Option<InferTensorContents>) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: vec![1, 2],
            contents,
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_contents_give_the_same_tensors() {
        let raw = vec![[1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()];
        let from_raw = tensors(vec![input("dense", "FP32", None)], raw).unwrap();
        let typed = InferTensorContents { fp32_contents: vec![1.0, 2.0], ..Default::default() };
        let from_typed = tensors(vec![input("dense", "FP32", Some(typed))], Vec::new()).unwrap();
        assert_eq!(from_raw, from_typed);
        assert_eq!(from_typed[0].elements, Elements::Fp32(vec![1.0, 2.0]));
    }

    #[test]
    fn contents_that_do_not_fit_the_inputs_are_named() {
        let err = tensors(vec![input("dense", "INT8", None)], Vec::new()).unwrap_err().to_string();
        assert!(err.contains("\"dense\" is INT8"), "{err}");
        let two_raw = vec![vec![0u8; 8], vec![0u8; 8]];
        let err = tensors(vec![input("dense", "FP32", None)], two_raw).unwrap_err().to_string();
        assert!(err.contains("1 inputs but 2 raw_input_contents"), "{err}");
    }
}
