//! tributary: a fleet of identical replicas that learn online from a Kafka
//! stream of training events and serve predictions over HTTP from the newest
//! weights. `docs/design.md` is the protocol;
//! this crate is laid out by role, in layers: a module uses only modules of
//! lower layers (the `layers` test below checks every `crate::` path).
//!
//! 0. [`config`], [`telemetry`]: settings and logging setup; [`lifecycle`]:
//!    the typed stop requests of the roles, and retry pacing; in unit tests
//!    only, `alloc_meter`, the counting allocator that bounds what a parser
//!    may hold.
//! 1. [`event`]: the event and instance schema, hashing of sparse values;
//!    [`synthetic`]: generated streams for demos, tests and load.
//! 2. [`model`]: parameter layout, seeded weights, forward pass, libtorch
//!    training graph. Knows neither HTTP nor Kafka.
//! 3. [`update_log`]: the `updates` log: record format, Kafka clients, topics.
//! 4. [`state`]: what a replica learned, the apply rule and the optimizer.
//! 5. [`metrics`]; [`checkpoint`]: stores of the state, for recovery;
//!    [`snapshot`]: the serving snapshot behind arc-swap and its publisher.
//! 6. [`shard`]: the other shards of a sharded fleet, and the gather of rows
//!    from them (counted in `metrics`).
//! 7. [`apply`]: the applier, the one writer of the state, and the narrow
//!    handle the HTTP layer acts through; [`produce`]: `tributary produce`;
//!    [`serve`]: serving whatever the protocol (predict over instances,
//!    tensors to instances, metadata, its errors).
//! 8. [`train`]: the trainer, a consumer-group member that turns batches of
//!    events into gradient records; [`http`]: the API, which serves through
//!    `serve` and asks the applier only through its handle; [`grpc`]: the
//!    Open Inference Protocol over gRPC, through `serve`. Neither protocol
//!    uses the other; [`join`]: the join of logged predictions with their
//!    late labels into training events.
//! 9. [`replica`]: builds and runs a replica from its configuration, for
//!    `main` and tests.

#[cfg(target_endian = "big")]
compile_error!("tributary's record and checkpoint formats assume a little-endian target");

#[cfg(test)]
mod alloc_meter;
pub mod apply;
pub mod checkpoint;
pub mod config;
pub mod event;
pub mod grpc;
pub mod http;
pub mod join;
pub mod lifecycle;
#[cfg(test)]
mod limits;
pub mod metrics;
pub mod model;
pub mod produce;
pub mod replica;
pub mod serve;
pub mod shard;
pub mod snapshot;
pub mod state;
pub mod synthetic;
pub mod telemetry;
pub mod train;
pub mod update_log;

#[cfg(test)]
mod layers {
    //! The layering of the crate doc, checked: every `crate::x` path in a
    //! top-level module names a module of a lower layer, so the modules
    //! import one another in one direction, without cycles.

    /// Bottom first; a module may use the modules of earlier rows only.
    const LAYERS: &[&[&str]] = &[
        &["config", "telemetry", "lifecycle", "alloc_meter"],
        &["event", "synthetic"],
        &["model"],
        &["update_log"],
        &["state"],
        &["metrics", "checkpoint", "snapshot"],
        &["shard"],
        &["apply", "produce", "serve"],
        &["train", "join", "http", "grpc"],
        &["replica"],
    ];

    fn layer(module: &str) -> Option<usize> {
        LAYERS.iter().position(|row| row.contains(&module))
    }

    /// The Rust sources of a top-level module: its file, or its directory.
    fn sources(src: &std::path::Path, module: &str) -> Vec<std::path::PathBuf> {
        let dir = src.join(module);
        match dir.is_dir() {
            true => rust_files(&dir),
            false => vec![src.join(format!("{module}.rs"))],
        }
    }

    /// Every `.rs` file under `dir`, at any depth.
    pub(crate) fn rust_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut files = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).expect("readable source directory").flatten() {
                let path = entry.path();
                match path.extension() {
                    _ if path.is_dir() => todo.push(path),
                    Some(ext) if ext == "rs" => files.push(path),
                    _ => {}
                }
            }
        }
        files
    }

    /// The top-level modules `text` names as `crate::x`, or in a group,
    /// `crate::{x::A, y}`.
    fn used_modules(text: &str) -> Vec<String> {
        let ident = |s: &str| -> String { s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect() };
        let mut used: Vec<String> = Vec::new();
        for (at, _) in text.match_indices("crate::") {
            let rest = &text[at + "crate::".len()..];
            let names = match rest.strip_prefix('{') {
                Some(group) => top_level_items(group).iter().map(|item| ident(item.trim_start())).collect(),
                None => vec![ident(rest)],
            };
            for name in names {
                if !name.is_empty() && !used.contains(&name) {
                    used.push(name);
                }
            }
        }
        used
    }

    /// The comma-separated items of a brace group up to its closing brace
    /// (`text` starts after the opening one), nested groups kept whole.
    fn top_level_items(text: &str) -> Vec<&str> {
        let (mut depth, mut start, mut items) = (0usize, 0usize, Vec::new());
        for (i, c) in text.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => {
                    items.push(&text[start..i]);
                    break;
                }
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&text[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items
    }

    #[test]
    fn every_module_uses_only_lower_layers() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
        let declared: Vec<&str> = lib.lines().filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';')).collect();
        let mut wrong = Vec::new();
        for module in &declared {
            let Some(own) = layer(module) else {
                wrong.push(format!("{module} is in no layer: add it to LAYERS and the crate doc"));
                continue;
            };
            for file in sources(&src, module) {
                let text = std::fs::read_to_string(&file).expect("readable source");
                for used in used_modules(&text).iter().filter(|u| u.as_str() != *module) {
                    match layer(used) {
                        Some(l) if l < own => {}
                        _ => wrong.push(format!("{} uses crate::{used}", file.display())),
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
    }

    #[test]
    fn a_use_of_a_higher_layer_is_found() {
        assert_eq!(used_modules("use crate::http::AppState; crate::model::Model"), ["http", "model"]);
        assert_eq!(used_modules("use crate::{apply::{a, b}, state};"), ["apply", "state"]);
        assert!(layer("http") > layer("model"));
    }
}
