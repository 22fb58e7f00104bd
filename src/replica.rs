//! Builds and runs a replica from its configuration: the same code for
//! `main` and for tests.
//!
//! Three sibling roles run until shutdown: the HTTP server (tokio), the
//! applier and the trainer (an OS thread each: they block on Kafka and burn
//! CPU). If one ends on its own, the replica logs which and why, and stops
//! the others. A graceful stop runs in order: the trainer sends what it has
//! batched and leaves the group; the applier drains the log to its current
//! end and writes a final checkpoint; the HTTP server stops last.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::BaseConsumer;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use crate::apply::applier::{Applier, Progress};
use crate::apply::handle::ReplicaHandle;
use crate::apply::rollback::Guard;
use crate::checkpoint::{self, CheckpointError, SharedStore};
use crate::config::Config;
use crate::http::admin::Admin;
use crate::http::events::EventSink;
use crate::http::status::History;
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::model::Model;
use crate::snapshot::Publisher;
use crate::state::ReplicaState;
use crate::train::Trainer;
use crate::update_log::control::ControlLog;
use crate::update_log::kafka;

/// libtorch's own thread pools would fight the trainer and the HTTP server
/// for two cores; one thread each is fastest for our small graphs.
pub fn init_libtorch() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tch::set_num_threads(1);
        tch::set_num_interop_threads(1);
    });
}

/// Runs `f` on a named OS thread; the receiver yields its result.
fn spawn_role(
    name: &str,
    f: impl FnOnce() -> anyhow::Result<()> + Send + 'static,
) -> oneshot::Receiver<anyhow::Result<()>> {
    let (tx, rx) = oneshot::channel();
    let thread_name = name.to_string();
    std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("{thread_name} panicked")));
            let _ = tx.send(result);
        })
        .expect("spawn thread");
    rx
}

async fn role_result(rx: &mut oneshot::Receiver<anyhow::Result<()>>) -> anyhow::Result<()> {
    rx.await.unwrap_or_else(|_| Err(anyhow::anyhow!("role thread vanished")))
}

/// Runs a replica until `shutdown` resolves or a role fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    init_libtorch();
    let config = Arc::new(config);
    let model = Arc::new(Model::new(&config.model)?);
    let metrics = Arc::new(Metrics::new(&config.replica_id));
    let store = checkpoint::open(&config)?;
    tokio::pin!(shutdown);
    let Some(state) = restore(&store, &model, &mut shutdown).await? else {
        return Ok(());
    };
    let publisher = Publisher::new(model.clone(), &state);
    let ready = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Progress::default());
    {
        let mut applied = progress.applied.lock().expect("progress lock");
        applied.position = state.position;
        applied.last_healthy = state.position;
        applied.watermarks = state.watermarks.clone();
    }
    let control = ControlLog::new(&config.kafka.brokers, &config.kafka.updates_topic, &config.replica_id)?;
    let admin = (!config.http.admin_token.is_empty()).then(|| {
        Arc::new(Admin {
            token: config.http.admin_token.clone(),
            replica: ReplicaHandle::new(
                control.clone(),
                progress.clone(),
                store.clone(),
                model.fingerprint(),
                &config.replica_id,
            ),
        })
    });

    let events = match config.http.ingest {
        true => Some(Arc::new(EventSink::new(
            &config.kafka.brokers,
            &config.kafka.events_topic,
            &config.replica_id,
            &config.http.ingest_token,
        )?)),
        false => None,
    };
    let history = Arc::new(History::default());
    tokio::spawn(history.clone().run(publisher.serving(), metrics.clone()));
    let app = http::router(AppState {
        serving: publisher.serving(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        model_name: config.model.name.as_str().into(),
        replica_id: config.replica_id.as_str().into(),
        max_batch: config.http.max_batch,
        max_body_bytes: config.http.max_body_bytes,
        checkpoints: Some(store.clone()),
        admin,
        events,
        history,
    });
    let listener = tokio::net::TcpListener::bind(config.http.addr)
        .await
        .with_context(|| format!("cannot listen on {}", config.http.addr))?;
    let addr: SocketAddr = listener.local_addr()?;
    info!(%addr, replica = %config.replica_id, model = ?config.model.kind, "serving HTTP");
    let (http_stop, http_stopped) = oneshot::channel::<()>();
    let mut http = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = http_stopped.await;
            })
            .await
    });

    // Topics: retried while the broker is away; serving goes on meanwhile.
    let mut delay = Duration::from_millis(200);
    loop {
        match kafka::ensure_topics(&config.kafka).await {
            Ok(()) => break,
            Err(e @ kafka::TopicError::UpdatesPartitions { .. }) => return Err(e.into()),
            Err(e) => warn!(error = %e, "topics not ready; retrying"),
        }
        tokio::select! {
            _ = &mut shutdown => { let _ = http_stop.send(()); return Ok(()); }
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }

    let stop_applier = Arc::new(AtomicBool::new(false));
    let drain_to = Arc::new(Mutex::new(None));
    let consumer: BaseConsumer = kafka::log_reader_config(&config.kafka.brokers, &config.replica_id).create()?;
    let state_position = state.position;
    let applier = Applier {
        model: model.clone(),
        state,
        publisher,
        consumer,
        updates_topic: config.kafka.updates_topic.clone(),
        replica_id: config.replica_id.clone(),
        metrics: metrics.clone(),
        progress: progress.clone(),
        store,
        brokers: config.kafka.brokers.clone(),
        guard: config.guard.enabled.then(|| {
            let g = &config.guard;
            (Guard::new(g.loss_factor, g.warmup_examples, state_position), control, tokio::runtime::Handle::current())
        }),
        checkpoint_every: Duration::from_secs(config.checkpoint.interval_secs),
        min_swap_interval: (config.apply.max_swaps_per_sec > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / config.apply.max_swaps_per_sec)),
        ready: ready.clone(),
        stop: stop_applier.clone(),
        drain_to: drain_to.clone(),
    };
    let serving = applier.publisher.serving();
    let mut applier_done = spawn_role("applier", move || applier.run());

    let stop_trainer = Arc::new(AtomicBool::new(false));
    let mut trainer_done = if config.train.enabled {
        let trainer =
            Trainer::new(&config, model.clone(), serving, metrics.clone(), progress.clone(), stop_trainer.clone())?;
        spawn_role("trainer", move || trainer.run())
    } else {
        let (tx, rx) = oneshot::channel();
        std::mem::forget(tx); // never ends on its own
        rx
    };

    // Wait for a stop request or for a role to end on its own.
    #[derive(PartialEq)]
    enum Ended {
        Nothing,
        Applier,
        Trainer,
        Http,
    }
    let (ended, failure): (Ended, Option<anyhow::Error>) = tokio::select! {
        _ = &mut shutdown => { info!("stop requested"); (Ended::Nothing, None) }
        r = role_result(&mut applier_done) => (Ended::Applier, Some(r.err().unwrap_or_else(|| anyhow::anyhow!("ended")).context("applier stopped"))),
        r = role_result(&mut trainer_done) => (Ended::Trainer, Some(r.err().unwrap_or_else(|| anyhow::anyhow!("ended")).context("trainer stopped"))),
        r = &mut http => (Ended::Http, Some(match r {
            Ok(Ok(())) => anyhow::anyhow!("ended"),
            Ok(Err(e)) => e.into(),
            Err(e) => e.into(),
        }.context("HTTP server stopped"))),
    };
    if let Some(e) = &failure {
        error!(error = format!("{e:#}"), "a role ended; stopping the replica");
    }

    // Graceful stop, in order.
    stop_trainer.store(true, Ordering::Relaxed);
    if config.train.enabled && ended != Ended::Trainer {
        // Bounded: with the broker gone, the trainer's flush, commit and
        // group leave each wait on it. Whatever it did not send is relearned
        // from the watermarks by whoever owns the partitions next.
        match tokio::time::timeout(Duration::from_secs(30), role_result(&mut trainer_done)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = format!("{e:#}"), "trainer stopped with an error"),
            Err(_) => warn!("trainer did not stop in 30 s (broker unreachable?); stopping without it"),
        }
    }
    let end = tokio::task::spawn_blocking({
        let config = config.clone();
        move || {
            let c: Option<BaseConsumer> =
                kafka::log_reader_config(&config.kafka.brokers, "tributary-drain").create().ok();
            c.and_then(|c| kafka::log_end(&c, &config.kafka.updates_topic))
        }
    })
    .await
    .ok()
    .flatten();
    *drain_to.lock().expect("drain lock") = end;
    stop_applier.store(true, Ordering::Relaxed);
    if ended != Ended::Applier {
        match tokio::time::timeout(Duration::from_secs(30), role_result(&mut applier_done)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = format!("{e:#}"), "applier stopped with an error"),
            Err(_) => warn!("applier did not drain in 30 s"),
        }
    }
    let _ = http_stop.send(());
    if ended != Ended::Http {
        let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    }
    info!("replica stopped");
    failure.map_or(Ok(()), Err)
}

/// The newest checkpoint that loads, or the seeded initial state. A store
/// that cannot be reached is retried until `shutdown` (`None`): starting
/// from an older point would only replay more of the log, but starting from
/// the seed while the fleet's checkpoints exist would replay all of it.
async fn restore(
    store: &SharedStore,
    model: &Arc<Model>,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<ReplicaState>> {
    let mut delay = Duration::from_millis(200);
    loop {
        let (s, m) = (store.clone(), model.clone());
        match tokio::task::spawn_blocking(move || s.load_newest(&m, None)).await? {
            Ok(Some((state, info))) => {
                info!(position = info.position, location = %info.location, "restored checkpoint");
                return Ok(Some(state));
            }
            Ok(None) => {
                info!(store = %store.describe(), seed = model.config().seed, "no checkpoint: starting from seeded weights");
                return Ok(Some(ReplicaState::initial(model)));
            }
            Err(e @ CheckpointError::Unavailable { .. }) => warn!(error = %e, "checkpoint store unavailable; retrying"),
            Err(e) => return Err(e.into()),
        }
        tokio::select! {
            _ = shutdown.as_mut() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
