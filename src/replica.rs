//! Builds and runs a replica from its configuration: the same code for
//! `main` and for tests. [`Replica::build`] loads the model and restores the
//! newest checkpoint; [`Replica::run_until_stopped`] serves HTTP, waits for
//! the topics, runs the roles and stops them in order.
//!
//! Sibling roles run until shutdown: the HTTP server (tokio), the applier,
//! the trainer and, with feedback, the joiner (an OS thread each: they
//! block on Kafka and burn CPU). If one ends on its own, the replica logs
//! which and why, and stops the others. A graceful stop runs in order: the
//! joiner commits or drops its batch; the trainer sends what it has batched
//! and leaves the group; the applier drains the log to its current
//! end and writes a final checkpoint; the HTTP server stops last, and the
//! predictions it logged are sent.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Once};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

use crate::apply::applier::Applier;
use crate::apply::handle::ReplicaHandle;
use crate::checkpoint::{self, CheckpointError, SharedStore};
use crate::config::{CheckpointConfig, Config};
use crate::event::EventCodec;
use crate::grpc;
use crate::http::admin::Admin;
use crate::http::events::EventSink;
use crate::http::feedback::LabelSink;
use crate::http::peer::PeerCheckpoints;
use crate::http::{self, AppState};
use crate::join::Joiner;
use crate::lifecycle::{Backoff, StopRequest};
use crate::metrics::Metrics;
use crate::model::{Layout, Model};
use crate::serve::feedback::PredictionLog;
use crate::state::ReplicaState;
use crate::train::Trainer;
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;
use crate::update_log::record::SettingsRecord;

mod roles;

use self::roles::{ended_with, role_result, spawn_role, stop_role, Roles};

/// libtorch's own thread pools would fight the trainer and the HTTP server
/// for two cores; one thread each is fastest for our small graphs.
pub fn init_libtorch() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tch::set_num_threads(1);
        tch::set_num_interop_threads(1);
    });
}

/// A future the replica stops on, pinned where it is awaited.
type Shutdown<'a, F> = Pin<&'a mut F>;

/// Runs a replica until `shutdown` resolves or a role fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    match Replica::build(config, shutdown.as_mut()).await? {
        Some(replica) => replica.run_until_stopped(shutdown).await,
        None => Ok(()),
    }
}

/// A replica built from its configuration, its roles not yet running.
pub struct Replica {
    config: Arc<Config>,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    control: ControlLog,
    applier: Applier,
    roles: Roles,
    app: AppState,
}

/// Which role ended first, and how.
#[derive(PartialEq)]
enum Ended {
    /// A stop was asked for.
    Asked,
    Applier,
    Trainer,
    Joiner,
    Http,
}

impl Replica {
    /// Loads the model, opens the checkpoint store and restores the newest
    /// checkpoint (or the seed weights), then builds the roles and the HTTP
    /// state. `None`: `shutdown` came while the store was away.
    pub async fn build<F: Future<Output = ()>>(
        config: Config,
        mut shutdown: Shutdown<'_, F>,
    ) -> anyhow::Result<Option<Replica>> {
        init_libtorch();
        let config = Arc::new(config);
        let layout = Layout::new(config.shard.count, config.shard.index).context("shard.index below shard.count")?;
        let model = Arc::new(Model::new(&config.model)?.with_layout(layout));
        let metrics = Arc::new(Metrics::new(&config.replica_id));
        let store = checkpoint::open_to_write(&config)?;
        let Some(state) = restore(&store, &model, &config.checkpoint, &mut shutdown).await? else {
            return Ok(None);
        };
        let connection = kafka::Connection::of(&config.kafka)?;
        let control = ControlLog::new(&connection, &config.kafka.updates_topic, &config.replica_id)?;
        let applier = Applier::new(&config, model.clone(), state, store.clone(), metrics.clone(), control.clone())?;
        let trainer_stop = StopRequest::default();
        let trainer = match config.train.enabled {
            true => Some(Trainer::new(
                &config,
                model.clone(),
                applier.serving(),
                metrics.clone(),
                applier.progress(),
                trainer_stop.clone(),
            )?),
            false => None,
        };
        let mut app = AppState::new(applier.serving(), metrics.clone(), &config, applier.ready());
        app.checkpoints = Some(store.clone());
        if !config.checkpoint.peer_token.is_empty() {
            app.peer_checkpoints = Some(Arc::new(PeerCheckpoints::new(config.checkpoint.peer_token.expose())));
        }
        if !config.http.admin_token.is_empty() {
            let handle = ReplicaHandle::new(&config, control.clone(), applier.progress(), store, model.fingerprint())?;
            app.admin = Some(Arc::new(Admin { token: config.http.admin_token.expose().to_string(), replica: handle }));
        }
        if config.feedback.enabled {
            app.predictor.log = Some(Arc::new(PredictionLog::new(&config, &metrics)?));
            app.labels = Some(Arc::new(LabelSink::new(&connection, &config)?));
        }
        if config.http.ingest {
            let k = &config.kafka;
            let codec = EventCodec::new(k, model.featurizer()).map_err(anyhow::Error::msg)?;
            app.events = Some(Arc::new(EventSink::new(
                &connection,
                &k.events_topic,
                codec,
                &config.replica_id,
                config.http.ingest_token.expose(),
            )?));
        }
        let joiner_stop = StopRequest::default();
        let joiner = match config.feedback.enabled && config.feedback.join {
            true => Some(Joiner::new(config.clone(), model.featurizer().clone(), &metrics, joiner_stop.clone())?),
            false => None,
        };
        let roles = Roles { trainer, trainer_stop, joiner, joiner_stop };
        Ok(Some(Replica { config, model, metrics, control, applier, roles, app }))
    }

    /// Serves HTTP at once (from the restored weights), waits for the
    /// topics, runs the applier and the trainer until `shutdown` or until a
    /// role ends on its own, then stops them in order.
    pub async fn run_until_stopped<F: Future<Output = ()>>(self, mut shutdown: Shutdown<'_, F>) -> anyhow::Result<()> {
        let Replica { config, model, metrics, control, applier, roles, app } = self;
        tokio::spawn(app.history.clone().run(app.predictor.serving.clone(), metrics));
        let prediction_log = app.predictor.log.clone();
        let grpc_stop = serve_grpc(&config, app.clone()).await?;
        let (mut http, http_stop) = serve_http(&config, app).await?;
        let started = wait_for_topics(&config, &mut shutdown).await?
            && announce_settings(&control, &model, &config.replica_id, &mut shutdown).await;
        if !started {
            let _ = http_stop.send(());
            drop(grpc_stop);
            return Ok(());
        }
        let drain = applier.drain_request();
        let mut applier_done = Some(spawn_role("applier", move || applier.run()));
        let mut started = roles.spawn();

        let (ended, failure): (Ended, Option<anyhow::Error>) = tokio::select! {
            _ = &mut shutdown => { info!("stop requested"); (Ended::Asked, None) }
            r = role_result(&mut applier_done) => (Ended::Applier, Some(ended_with(r).context("applier stopped"))),
            r = role_result(&mut started.trainer) => (Ended::Trainer, Some(ended_with(r).context("trainer stopped"))),
            r = role_result(&mut started.joiner) => (Ended::Joiner, Some(ended_with(r).context("joiner stopped"))),
            r = &mut http => (Ended::Http, Some(match r {
                Ok(Ok(())) => anyhow::anyhow!("ended"),
                Ok(Err(e)) => e.into(),
                Err(e) => e.into(),
            }.context("HTTP server stopped"))),
        };
        if let Some(e) = &failure {
            error!(error = format!("{e:#}"), "a role ended; stopping the replica");
        }

        // Graceful stop, in order: the joiner and the trainer; the applier
        // drains to the log end and writes a final checkpoint; the HTTP
        // server stops last, and the predictions it logged are sent.
        started.stop(ended == Ended::Joiner, ended == Ended::Trainer).await;
        drain.request(current_log_end(&config).await);
        if ended != Ended::Applier {
            stop_role("applier", &mut applier_done, "did not drain").await;
        }
        let _ = http_stop.send(());
        drop(grpc_stop); // its server stops when the sender goes
        if ended != Ended::Http {
            let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        }
        if let Some(log) = prediction_log {
            let _ = tokio::task::spawn_blocking(move || log.flush(Duration::from_secs(5))).await;
        }
        info!("replica stopped");
        failure.map_or(Ok(()), Err)
    }
}

type HttpServer = JoinHandle<std::io::Result<()>>;

/// Binds `http.addr` and serves `app` until the returned sender fires.
async fn serve_http(config: &Config, app: AppState) -> anyhow::Result<(HttpServer, oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http.addr))?;
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, replica = %config.replica_id, model = ?config.model.kind, "serving HTTP");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        axum::serve(listener, http::router(app))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .await
    });
    Ok((server, stop))
}

/// Serves the Open Inference Protocol's gRPC service on `grpc.addr`
/// until the returned sender is dropped (or fires); `None` when off.
async fn serve_grpc(config: &Config, app: AppState) -> anyhow::Result<Option<oneshot::Sender<()>>> {
    let Some(addr) = config.grpc.socket_addr()? else {
        return Ok(None);
    };
    let (stop, stopped) = oneshot::channel::<()>();
    let server = grpc::serve(addr, app.predictor, app.metrics, app.max_body_bytes, async {
        let _ = stopped.await;
    })
    .await?;
    tokio::spawn(async move {
        if let Ok(Err(e)) = server.await {
            error!(error = %e, "the gRPC server stopped");
        }
    });
    Ok(Some(stop))
}

/// Creates or checks the topics, retried while the broker is away (serving
/// goes on meanwhile). `false`: `shutdown` came first.
async fn wait_for_topics<F: Future<Output = ()>>(
    config: &Config,
    shutdown: &mut Shutdown<'_, F>,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new();
    loop {
        let feedback = &config.feedback;
        let ensured = match kafka::ensure_topics(&config.kafka).await {
            Ok(()) if feedback.enabled => kafka::ensure_feedback_topics(&config.kafka, feedback).await,
            other => other,
        };
        match ensured {
            Ok(()) => return Ok(true),
            Err(e @ (kafka::TopicError::UpdatesPartitions { .. } | kafka::TopicError::NotCoPartitioned { .. })) => {
                return Err(e.into())
            }
            Err(e) => warn!(error = %e, "topics not ready; retrying"),
        }
        if !wait_to_retry(&mut backoff, shutdown).await {
            return Ok(false);
        }
    }
}

/// Waits the backoff's next delay before a retry; `false` if `shutdown`
/// came first.
async fn wait_to_retry<F: Future<Output = ()>>(backoff: &mut Backoff, shutdown: &mut Shutdown<'_, F>) -> bool {
    tokio::select! {
        _ = shutdown.as_mut() => false,
        _ = tokio::time::sleep(backoff.next_delay()) => true,
    }
}

/// How many times a replica tries its bootstrap peer before it starts from
/// the seed weights (which replays the whole log, or stalls, saying so, if
/// the log no longer starts at 0).
const BOOTSTRAP_ATTEMPTS: u32 = 5;

/// The peer's newest checkpoint, verified and saved into this replica's own
/// store; the seeded state if the peer has none or cannot be reached in
/// `BOOTSTRAP_ATTEMPTS`; `None` if `shutdown` came first.
async fn bootstrap<F: Future<Output = ()>>(
    store: &SharedStore,
    model: &Arc<Model>,
    config: &CheckpointConfig,
    shutdown: &mut Shutdown<'_, F>,
) -> Option<ReplicaState> {
    let mut backoff = Backoff::new();
    let peer = config.bootstrap_from.as_str();
    for attempt in 1..=BOOTSTRAP_ATTEMPTS {
        let (s, m, url, token) =
            (store.clone(), model.clone(), peer.to_string(), config.peer_token.expose().to_string());
        let fetched = tokio::task::spawn_blocking(move || {
            let state = checkpoint::peer::fetch(&url, &token, &m)?;
            s.save(&m, &state)?;
            anyhow::Ok(state)
        })
        .await;
        match fetched {
            Ok(Ok(state)) => {
                info!(peer, position = state.position, "bootstrapped from a peer's checkpoint");
                return Some(state);
            }
            Ok(Err(e)) => warn!(peer, attempt, error = format!("{e:#}"), "cannot bootstrap from the peer"),
            Err(e) => warn!(peer, attempt, error = %e, "cannot bootstrap from the peer"),
        }
        if !wait_to_retry(&mut backoff, shutdown).await {
            return None;
        }
    }
    warn!(peer, "no checkpoint from the peer: starting from seeded weights");
    Some(ReplicaState::initial(model))
}

/// Appends this replica's model settings to the update log (retried while
/// the broker is away), so that every replica can tell a fleet member that
/// was configured differently which setting differs. `false`: `shutdown`
/// came first.
async fn announce_settings<F: Future<Output = ()>>(
    control: &ControlLog,
    model: &Model,
    replica_id: &str,
    shutdown: &mut Shutdown<'_, F>,
) -> bool {
    let record = SettingsRecord {
        fingerprint: model.fingerprint(),
        producer: replica_id.to_string(),
        settings: model.settings().clone(),
    };
    let mut backoff = Backoff::new();
    loop {
        match control.announce(record.clone()).await {
            Ok(offset) => {
                info!(offset, fingerprint = format!("{:016x}", record.fingerprint), "model settings announced");
                return true;
            }
            Err(e) => warn!(error = format!("{e:#}"), "cannot announce the model settings; retrying"),
        }
        if !wait_to_retry(&mut backoff, shutdown).await {
            return false;
        }
    }
}

/// The update log's end now, for the stopping applier to drain to; `None`
/// when the broker cannot say.
async fn current_log_end(config: &Arc<Config>) -> Option<i64> {
    let config = config.clone();
    tokio::task::spawn_blocking(move || {
        let connection = kafka::Connection::of(&config.kafka).ok()?;
        let c: Option<BaseConsumer> = kafka::log_reader_config(&connection, "tributary-drain").create().ok();
        c.and_then(|c| kafka::log_end(&c, &config.kafka.updates_topic))
    })
    .await
    .ok()
    .flatten()
}

/// The newest checkpoint that loads, or the seeded initial state. A store
/// that cannot be reached is retried until `shutdown` (`None`): starting
/// from an older point would only replay more of the log, but starting from
/// the seed while the fleet's checkpoints exist would replay all of it.
async fn restore<F: Future<Output = ()>>(
    store: &SharedStore,
    model: &Arc<Model>,
    config: &CheckpointConfig,
    shutdown: &mut Shutdown<'_, F>,
) -> anyhow::Result<Option<ReplicaState>> {
    let mut backoff = Backoff::new();
    loop {
        let (s, m) = (store.clone(), model.clone());
        match tokio::task::spawn_blocking(move || s.load_newest(&m, None)).await? {
            Ok(Some((state, info))) => {
                info!(position = info.position, location = %info.location, "restored checkpoint");
                return Ok(Some(state));
            }
            Ok(None) if !config.bootstrap_from.is_empty() => return Ok(bootstrap(store, model, config, shutdown).await),
            Ok(None) => {
                info!(store = %store.describe(), seed = model.config().seed, "no checkpoint: starting from seeded weights");
                return Ok(Some(ReplicaState::initial(model)));
            }
            Err(e @ CheckpointError::Unavailable { .. }) => warn!(error = %e, "checkpoint store unavailable; retrying"),
            Err(e) => return Err(e.into()),
        }
        if !wait_to_retry(&mut backoff, shutdown).await {
            return Ok(None);
        }
    }
}
