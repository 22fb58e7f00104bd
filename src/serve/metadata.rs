//! The server's and the model's metadata, as the Open Inference Protocol
//! describes them (REST V2 and gRPC answer the same).

use serde::Serialize;
use utoipa::ToSchema;

use super::tensor::ModelInputs;
use super::Predictor;

/// The one output every model has.
pub const OUTPUT: &str = "predictions";

#[derive(Serialize, ToSchema)]
pub struct ServerMetadata {
    pub name: &'static str,
    pub version: &'static str,
    pub extensions: Vec<String>,
}

impl ServerMetadata {
    pub fn of_this_server() -> ServerMetadata {
        ServerMetadata {
            name: "tributary",
            version: env!("CARGO_PKG_VERSION"),
            extensions: vec!["binary_tensor_data".into()],
        }
    }
}

#[derive(Serialize, ToSchema)]
pub struct TensorMetadata {
    pub name: String,
    pub datatype: &'static str,
    /// -1: any length.
    pub shape: Vec<i64>,
}

#[derive(Serialize, ToSchema)]
pub struct ModelMetadata {
    pub name: String,
    /// The served version: the update-log position of the weights.
    pub versions: Vec<String>,
    pub platform: String,
    pub inputs: Vec<TensorMetadata>,
    pub outputs: Vec<TensorMetadata>,
}

impl ModelMetadata {
    /// The inputs and output of the model `predictor` serves now.
    pub fn of(predictor: &Predictor) -> ModelMetadata {
        let snap = predictor.serving.load();
        let c = snap.model.config();
        let inputs = (ModelInputs::of(c).listed().into_iter())
            .map(|(name, datatype, shape)| TensorMetadata { name, datatype, shape })
            .collect();
        let kind = serde_json::to_value(c.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        ModelMetadata {
            name: predictor.model_name.to_string(),
            versions: vec![snap.position.to_string()],
            platform: format!("tributary_{kind}"),
            inputs,
            outputs: vec![TensorMetadata { name: OUTPUT.into(), datatype: "FP32", shape: vec![-1] }],
        }
    }
}
