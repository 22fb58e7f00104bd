//! The Docker fleet's files, checked without a Docker engine:
//! `docker-compose config` accepts the compose file, Prometheus scrapes
//! exactly the compose file's replicas, the replicas' environment is a
//! configuration tributary accepts, every metric the alert rules and the
//! Grafana dashboard name is one the service exports, and the image's
//! health check tells a live replica from a dead one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tributary::config::{Config, ModelKind, Overrides};
use tributary::metrics::{Metrics, NAMESPACE};

use crate::helpers::Cluster;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `docker-compose ARGS` on the repository's compose file; its stdout.
fn compose(args: &[&str]) -> String {
    compose_with(args, &[])
}

/// The same with the operator's `TRIBUTARY_*` variables set to `env` (and
/// the others of this process's unset).
fn compose_with(args: &[&str], env: &[(&str, &str)]) -> String {
    let operator_vars = ["TRIBUTARY_ADMIN_TOKEN", "TRIBUTARY_INGEST_TOKEN", "TRIBUTARY_MODEL_KIND"];
    let mut command = Command::new("docker-compose");
    for var in operator_vars {
        command.env_remove(var);
    }
    let out = command
        .envs(env.iter().copied())
        .arg("--project-directory")
        .arg(repo())
        .arg("-f")
        .arg(repo().join("docker-compose.yml"))
        .args(args)
        .output()
        .expect("docker-compose (Debian's package; scripts/setup installs it)");
    assert!(out.status.success(), "docker-compose {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// The files that name metrics.
fn metric_files() -> Vec<PathBuf> {
    let mut files = vec![repo().join("docker-compose.yml")];
    for dir in ["deploy/prometheus", "deploy/grafana/dashboards"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(repo().join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        found.sort();
        files.extend(found);
    }
    files
}

/// Every `tributary_...` token: metric names, as PromQL writes them.
fn metric_names(text: &str) -> BTreeSet<String> {
    let prefix = format!("{NAMESPACE}_");
    text.split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
        .filter(|t| t.starts_with(&prefix))
        .map(str::to_string)
        .collect()
}

#[test]
fn compose_file_is_valid() {
    compose(&["config", "--quiet"]);
}

#[test]
fn prometheus_scrapes_every_replica_of_the_compose_file() {
    let services = compose(&["config", "--services"]);
    let replicas: Vec<&str> = services.lines().filter(|s| s.starts_with("tributary-")).collect();
    assert_eq!(replicas.len(), 3, "three replicas: {services}");
    let prometheus = read("deploy/prometheus/prometheus.yml");
    for r in &replicas {
        assert!(prometheus.contains(&format!("\"{r}:8080\"")), "prometheus.yml does not scrape {r}");
    }
    assert_eq!(
        prometheus.matches(":8080\"").count(),
        replicas.len(),
        "prometheus.yml scrapes a target that is not a replica"
    );
}

/// The replicas' configuration as `docker-compose config` resolves it with
/// the operator's variables `env`.
fn compose_replica_config(env: &[(&str, &str)]) -> Config {
    // The resolved file, one `KEY: value` per line under `environment:`.
    let resolved = compose_with(&["config"], env);
    let vars: BTreeSet<(String, String)> = resolved
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.starts_with("TRIBUTARY_"))
        .map(|(k, v)| (k.to_string(), v.trim().trim_matches('\'').trim_matches('"').to_string()))
        .collect();
    assert!(vars.iter().any(|(k, _)| k == "TRIBUTARY_CHECKPOINT_STORE"), "{resolved}");
    Config::load(None, vars.clone(), &Overrides::default()).unwrap_or_else(|e| panic!("{e}\n{vars:?}"))
}

#[test]
fn compose_environment_is_a_valid_configuration() {
    let config = compose_replica_config(&[]);
    assert_eq!(config.kafka.brokers, "kafka:9092");
    assert!(config.checkpoint.store.is_shared(), "{:?}", config.checkpoint.store);
}

#[test]
fn the_compose_fleet_has_no_token_unless_the_operator_sets_one() {
    let config = compose_replica_config(&[]);
    assert!(config.http.admin_token.is_empty(), "no default admin token: the admin endpoints are off");
    assert!(config.http.ingest_token.is_empty());
    let (admin, ingest) = ("an-admin-token-of-the-operator", "an-ingest-token-of-the-operator");
    let config = compose_replica_config(&[("TRIBUTARY_ADMIN_TOKEN", admin), ("TRIBUTARY_INGEST_TOKEN", ingest)]);
    assert_eq!((config.http.admin_token.expose(), config.http.ingest_token.expose()), (admin, ingest));
}

#[test]
fn rules_and_dashboard_name_only_exported_metrics() {
    let exported: BTreeSet<String> = Metrics::new("check").series_names().into_iter().collect();
    let mut named = BTreeSet::new();
    for file in metric_files() {
        let text = std::fs::read_to_string(&file).unwrap();
        for name in metric_names(&text) {
            assert!(exported.contains(&name), "{} names {name}, which tributary does not export", file.display());
            named.insert(name);
        }
    }
    // What the dashboard must show: predictions/s, latency
    // percentiles, events/s, lag, freshness, model version, progressive loss.
    let dashboard = read("deploy/grafana/dashboards/tributary.json");
    for needed in [
        "tributary_requests_total",
        "tributary_request_duration_seconds_bucket",
        "tributary_events_consumed_total",
        "tributary_consumer_lag",
        "tributary_freshness_seconds_bucket",
        "tributary_model_version",
        "tributary_progressive_logloss",
    ] {
        assert!(metric_names(&dashboard).contains(needed), "the dashboard does not show {needed}");
    }
    assert!(named.len() >= 10, "{named:?}");
}

#[test]
fn dashboard_reads_the_provisioned_datasource() {
    let datasources = read("deploy/grafana/provisioning/datasources/prometheus.yml");
    assert!(datasources.contains("uid: prometheus"), "{datasources}");
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/tributary.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 7);
    for p in panels {
        assert_eq!(p["datasource"]["uid"], "prometheus", "panel {}", p["title"]);
        assert!(!p["targets"].as_array().unwrap().is_empty(), "panel {} has no query", p["title"]);
    }
}

/// The image's HEALTHCHECK: `tributary healthcheck` GETs /healthz at
/// http.addr (an unspecified address, as the image sets, means loopback).
#[test]
fn the_container_health_check_passes_while_a_replica_runs_and_fails_after() {
    let cluster = Cluster::new("healthcheck", ModelKind::Logistic);
    let mut r = cluster.spawn("r0");
    r.wait_ready();
    let port = r.http.port();
    let check = || {
        Command::new(env!("CARGO_BIN_EXE_tributary"))
            .arg("healthcheck")
            .env("TRIBUTARY_HTTP__ADDR", format!("0.0.0.0:{port}"))
            .output()
            .unwrap()
    };
    let alive = check();
    assert!(alive.status.success(), "{}", String::from_utf8_lossy(&alive.stderr));
    r.kill();
    let dead = check();
    assert!(!dead.status.success());
    assert!(
        String::from_utf8_lossy(&dead.stderr).contains("cannot connect"),
        "{}",
        String::from_utf8_lossy(&dead.stderr)
    );
}

/// `promtool` (Debian's `prometheus` package; scripts/setup installs it).
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian's prometheus package; scripts/setup installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn prometheus_configuration_and_alert_rules_pass_promtool() {
    let config = repo().join("deploy/prometheus/prometheus.yml");
    let text = promtool(&["check", "config", config.to_str().unwrap()]);
    assert!(text.contains("8 rules found"), "{text}");
}

/// Each dashboard query as a recording rule, so that promtool parses its PromQL.
#[test]
fn dashboard_queries_are_valid_promql() {
    let dashboard: Value = serde_json::from_str(&read("deploy/grafana/dashboards/tributary.json")).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            rules += &format!(
                "      - record: dashboard:query{n}\n        expr: {}\n",
                serde_json::to_string(expr).unwrap()
            );
            n += 1;
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let text = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(text.contains(&format!("{n} rules found")), "{text}");
}
