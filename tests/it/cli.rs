//! The `tributary` command line, as a process, on a local checkpoint store.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tributary::checkpoint::{LocalStore, Store};
use tributary::config::{Config, ModelKind};
use tributary::model::Model;
use tributary::state::ReplicaState;

/// `tributary <args> --state-dir DIR --json`, its standard output.
fn list(args: &[&str], dir: &Path, config: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tributary"))
        .args(args)
        .args(["--config", &config.display().to_string(), "--state-dir", &dir.display().to_string(), "--json"])
        .output()
        .expect("the binary runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn checkpoints_are_listed_newest_first_also_under_the_old_command_name() {
    let mut config = Config::default();
    config.model.kind = ModelKind::Logistic;
    config.model.buckets = 64;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tributary.toml");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let model = Arc::new(Model::new(&config.model).expect("a built-in model"));
    let store_dir = dir.path().join("state");
    let store = LocalStore::open(&store_dir, 3).unwrap();
    let mut state = ReplicaState::initial(&model);
    for position in [4, 9] {
        state.position = position;
        store.save(&model, &state).unwrap();
    }
    let listed = list(&["checkpoints", "list"], &store_dir, &file);
    let positions: Vec<i64> = (listed.lines())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["position"].as_i64().unwrap())
        .collect();
    assert_eq!(positions, [9, 4], "{listed}");
    assert_eq!(list(&["snapshots", "list"], &store_dir, &file), listed, "the old name lists the same");
}
