//! What serving is, whatever the protocol: the served snapshot and whether
//! it is ready, the model's name, a batch of instances checked and predicted
//! ([`Predictor`]), the protocol's tensors turned into instances
//! ([`tensor`]), the model's metadata ([`metadata`]), and the errors of all
//! of it ([`ServeError`]), which each protocol maps to its own codes.
//!
//! The layers read snapshot -> serve -> {http, grpc}: this module knows
//! neither protocol, and may not touch training or the log.

pub mod feedback;
pub mod metadata;
pub mod tensor;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde_json::Value;

use crate::config::Config;
use crate::event::{Features, Featurizer, SchemaError};
use crate::metrics::ShardMetrics;
use crate::model::Layout;
use crate::shard::{Ask, Shards};
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
    /// A shard whose rows the request reads has no replica answering: the
    /// message names it. Never a prediction from rows missing.
    #[error("{0}")]
    Unavailable(String),
}

/// Predictions, and the weights that made them.
#[derive(Debug)]
pub struct Predicted {
    pub predictions: Vec<f32>,
    /// The update-log position of the weights that answered: for a shard,
    /// the lowest among the shards it read.
    pub model_version: i64,
    /// For a shard, the position each shard's rows were read at (its own
    /// included); `None` for a replica that holds the whole model.
    pub shard_versions: Option<BTreeMap<u32, i64>>,
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
    /// The other shards, whose rows a shard's predictions gather; `None`
    /// for a replica that holds the whole model.
    pub shards: Option<Arc<Shards>>,
    /// Where served instances are logged (`feedback.enabled`); `None`: off.
    pub log: Option<Arc<feedback::PredictionLog>>,
}

impl Predictor {
    pub fn new(serving: Serving, ready: Arc<AtomicBool>, config: &Config, metrics: &ShardMetrics) -> Predictor {
        let shards = Shards::of(config, metrics).map(Arc::new);
        Predictor {
            serving,
            ready,
            model_name: config.model.name.as_str().into(),
            max_batch: config.http.max_batch,
            shards,
            log: None,
        }
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

    /// Predictions of `snap` for `rows` (V1 instances are `Rows::Records`),
    /// each served instance logged under its id when logging is on: the
    /// request's `given` ids, or ids made here; and the ids.
    pub async fn predict_logged(
        &self,
        snap: &Snapshot,
        rows: tensor::Rows,
        given: Option<Vec<String>>,
    ) -> Result<(Predicted, Option<Vec<String>>), ServeError> {
        let Some(log) = &self.log else {
            if given.is_some() {
                return Err(ServeError::BadRequest(
                    "ids are for logged predictions, and feedback.enabled is off".into(),
                ));
            }
            return Ok((self.predict_rows(snap, rows).await?, None));
        };
        let ids = log.ids(given, rows.len())?;
        let served: Vec<String> = rows.values().iter().map(Value::to_string).collect();
        let predicted = self.predict_rows(snap, rows).await?;
        log.log(&ids, &served, &predicted);
        Ok((predicted, Some(ids)))
    }

    /// Takes the ids input (`feedback::ID_TENSOR`) out of a tensor request's
    /// `inputs` when predictions are logged; otherwise leaves every input to
    /// the model (a declared feature may be named `id`).
    pub fn take_ids(&self, inputs: &mut Vec<tensor::Tensor>) -> Result<Option<Vec<String>>, ServeError> {
        match self.log {
            Some(_) => feedback::take_ids(inputs),
            None => Ok(None),
        }
    }

    /// Predictions of `snap` for the rows of a tensor request.
    pub async fn predict_rows(&self, snap: &Snapshot, rows: tensor::Rows) -> Result<Predicted, ServeError> {
        match rows {
            tensor::Rows::Records(records) => self.predict(snap, records).await,
            tensor::Rows::Fixed(instances) => self.predict_with(snap, instances, Featurizer::fixed_instance).await,
        }
    }

    /// Predictions of `snap` for `instances` (V1 instances: records read
    /// through the declared features, or the fixed schema's; each checked
    /// against the model, a bad one named by its index).
    pub async fn predict(&self, snap: &Snapshot, instances: Vec<Value>) -> Result<Predicted, ServeError> {
        self.predict_with(snap, instances, Featurizer::instance).await
    }

    async fn predict_with(
        &self,
        snap: &Snapshot,
        instances: Vec<Value>,
        read: fn(&Featurizer, Value) -> Result<Features, SchemaError>,
    ) -> Result<Predicted, ServeError> {
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
        match &self.shards {
            Some(shards) if snap.model.layout() != Layout::WHOLE => Self::predict_gathered(shards, snap, &batch).await,
            _ => Ok(Predicted {
                predictions: (snap.model.predict_batch(Some(snap.position), &snap.weights, &batch))
                    .map_err(|e| ServeError::Internal(format!("the model failed: {e}")))?,
                model_version: snap.position,
                shard_versions: None,
            }),
        }
    }

    /// A shard's predictions: its own rows, and the other shards' rows the
    /// batch reads gathered from them (docs/design.md section 8a).
    async fn predict_gathered(shards: &Shards, snap: &Snapshot, batch: &[&Features]) -> Result<Predicted, ServeError> {
        // Whatever the other shards serve now: a prediction waits for no one.
        let (view, positions) = (shards.view(&snap.model, (&snap.weights, snap.position), Ask::default(), batch).await)
            .map_err(|e| ServeError::Unavailable(e.to_string()))?;
        Ok(Predicted {
            predictions: batch.iter().map(|f| snap.model.predict_on(&view, f)).collect(),
            model_version: positions.values().copied().min().unwrap_or(snap.position),
            shard_versions: Some(positions),
        })
    }
}
