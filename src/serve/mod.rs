//! What serving is, whatever the protocol: the served snapshot and whether
//! it is ready, the model's name, a batch of instances checked and predicted
//! ([`Predictor`]), the protocol's tensors turned into instances
//! ([`tensor`]), the model's metadata ([`metadata`]), and the errors of all
//! of it ([`ServeError`]), which each protocol maps to its own codes.
//!
//! The layers read snapshot -> serve -> {http, grpc}: this module knows
//! neither protocol, and may not touch training or the log.

pub mod metadata;
pub mod tensor;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::config::Config;
use crate::event::{Features, Featurizer, SchemaError};
use crate::snapshot::{Serving, Snapshot};

/// Why a request could not be served, in the protocol's neutral terms.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The request is wrong: the message says what, naming the instance or
    /// the input.
    #[error("{0}")]
    BadRequest(String),
    /// No such model here.
    #[error("{0}")]
    NotFound(String),
    /// The model failed: logged, never sent.
    #[error("internal error")]
    Internal(String),
}

/// The served model, for every protocol.
#[derive(Clone)]
pub struct Predictor {
    pub serving: Serving,
    /// Caught up with the update log as of start-up.
    pub ready: Arc<AtomicBool>,
    pub model_name: Arc<str>,
    /// Most instances in one request (`http.max_batch`).
    pub max_batch: usize,
}

impl Predictor {
    pub fn new(serving: Serving, ready: Arc<AtomicBool>, config: &Config) -> Predictor {
        Predictor { serving, ready, model_name: config.model.name.as_str().into(), max_batch: config.http.max_batch }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Whether `name` is the model served here.
    pub fn check_model(&self, name: &str) -> Result<(), ServeError> {
        if name == &*self.model_name {
            Ok(())
        } else {
            Err(ServeError::NotFound(format!("model {name:?} not found; this replica serves {:?}", &*self.model_name)))
        }
    }

    /// Predictions of `snap` for the rows of a tensor request.
    pub fn predict_rows(&self, snap: &Snapshot, rows: tensor::Rows) -> Result<Vec<f32>, ServeError> {
        match rows {
            tensor::Rows::Records(records) => self.predict(snap, records),
            tensor::Rows::Fixed(instances) => self.predict_with(snap, instances, Featurizer::fixed_instance),
        }
    }

    /// Predictions of `snap` for `instances` (V1 instances: records read
    /// through the declared features, or the fixed schema's; each checked
    /// against the model, a bad one named by its index).
    pub fn predict(&self, snap: &Snapshot, instances: Vec<Value>) -> Result<Vec<f32>, ServeError> {
        self.predict_with(snap, instances, Featurizer::instance)
    }

    fn predict_with(
        &self,
        snap: &Snapshot,
        instances: Vec<Value>,
        read: fn(&Featurizer, Value) -> Result<Features, SchemaError>,
    ) -> Result<Vec<f32>, ServeError> {
        let n = instances.len();
        if n == 0 {
            return Err(ServeError::BadRequest("instances is empty".into()));
        }
        if n > self.max_batch {
            return Err(ServeError::BadRequest(format!("{n} instances; at most {} per request", self.max_batch)));
        }
        let featurizer = snap.model.featurizer();
        let features = (instances.into_iter().enumerate())
            .map(|(i, instance)| {
                read(featurizer, instance).map_err(|e| ServeError::BadRequest(format!("instances[{i}]: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let batch: Vec<&Features> = features.iter().collect();
        (snap.model.predict_batch(Some(snap.position), &snap.weights, &batch))
            .map_err(|e| ServeError::Internal(format!("the model failed: {e}")))
    }
}
