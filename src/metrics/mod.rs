//! Every metric the replica exports, named in this directory, one struct per
//! role: [`ServingMetrics`] (requests, ingestion, admin), [`TrainerMetrics`],
//! [`ApplierMetrics`] (the log applied and served), [`RollbackMetrics`] and
//! [`CheckpointMetrics`], [`ShardMetrics`] (a shard's gathers), [`JoinMetrics`]
//! (the join of predictions with their labels). Each role's struct is built by its own `new` from
//! a [`Registrar`], and handed to the code of that role. Labels have few
//! values (routes, statuses, reject reasons, partitions); counters move by
//! batch, never per event in a hot loop.

mod applier;
mod checkpoints;
mod join;
mod rollback;
mod serving;
mod shards;
mod trainer;

use prometheus::core::Collector;
use prometheus::proto::MetricType;
use prometheus::{Encoder, HistogramOpts, Opts, Registry, TextEncoder};

pub use self::applier::ApplierMetrics;
pub use self::checkpoints::CheckpointMetrics;
pub use self::join::JoinMetrics;
pub use self::rollback::RollbackMetrics;
pub use self::serving::ServingMetrics;
pub use self::shards::ShardMetrics;
pub use self::trainer::TrainerMetrics;

/// Every series name starts with this and an underscore.
pub const NAMESPACE: &str = "tributary";

pub struct Metrics {
    registry: Registry,
    /// Each metric's name (without the namespace) and type, empty or not.
    families: Vec<(String, MetricType)>,
    pub serving: ServingMetrics,
    pub trainer: TrainerMetrics,
    pub applier: ApplierMetrics,
    pub rollback: RollbackMetrics,
    pub checkpoints: CheckpointMetrics,
    pub shards: ShardMetrics,
    pub join: JoinMetrics,
}

/// Registers metrics as a role's struct builds them, and remembers each
/// family's name and type (see [`Metrics::series_names`]).
pub struct Registrar {
    registry: Registry,
    families: Vec<(String, MetricType)>,
}

impl Registrar {
    /// Registers `metric`. The names and labels are the code's own, so an
    /// invalid or duplicate one is a bug, found by any test that starts a
    /// replica.
    pub fn add<M: Collector + Clone + 'static>(&mut self, metric: prometheus::Result<M>) -> M {
        let metric = metric.expect("valid metric");
        self.registry.register(Box::new(metric.clone())).expect("unique metric");
        self.families.extend(metric.collect().iter().map(|f| (f.name().to_string(), f.get_field_type())));
        metric
    }
}

/// A counter's or gauge's options.
pub fn opts(name: &str, help: &str) -> Opts {
    Opts::new(name, help)
}

/// A histogram in seconds, from 100 µs to 10 s.
pub fn seconds(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(vec![
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

impl Metrics {
    pub fn new(replica_id: &str) -> Metrics {
        let registry = Registry::new_custom(
            Some(NAMESPACE.into()),
            Some([("replica".to_string(), replica_id.to_string())].into()),
        )
        .expect("valid registry");
        let mut r = Registrar { registry, families: Vec::new() };
        let (serving, trainer, applier) =
            (ServingMetrics::new(&mut r), TrainerMetrics::new(&mut r), ApplierMetrics::new(&mut r));
        let (rollback, checkpoints) = (RollbackMetrics::new(&mut r), CheckpointMetrics::new(&mut r));
        let (shards, join) = (ShardMetrics::new(&mut r), JoinMetrics::new(&mut r));
        let families = r.families;
        Metrics { registry: r.registry, families, serving, trainer, applier, rollback, checkpoints, shards, join }
    }

    /// Every series name this replica can export, whether or not it has a
    /// value yet: a histogram's `_bucket`, `_sum` and `_count`, the others'
    /// own names. Dashboards and alert rules are checked against these.
    pub fn series_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for (name, kind) in &self.families {
            let full = format!("{NAMESPACE}_{name}");
            match kind {
                MetricType::HISTOGRAM => names.extend(["_bucket", "_sum", "_count"].map(|s| format!("{full}{s}"))),
                _ => names.push(full),
            }
        }
        names
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}
