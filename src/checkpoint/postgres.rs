//! The PostgreSQL checkpoint store, for a fleet spread over machines: every
//! replica reads and writes the same table (`migrations/`), so a replica on
//! a new machine starts from the fleet's newest checkpoint.
//!
//! A checkpoint is one row, written by one INSERT: a reader sees all of it or
//! nothing, whatever happens to the writer. The content carries the same
//! checksum as a local file. The store's calls block on a small runtime of
//! its own, so the applier thread and `spawn_blocking` callers can use it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row;

use super::format::encode;
use super::{retained, CheckpointError, CheckpointInfo, Store};
use crate::model::Model;
use crate::state::ReplicaState;

/// Which checkpoints are this replica's to read: those of its model name and
/// update log (positions mean nothing in another log). `writer` is recorded.
#[derive(Clone, Debug)]
pub struct Scope {
    pub model: String,
    pub log: String,
    pub writer: String,
}

#[derive(Debug)]
pub struct PgStore {
    runtime: tokio::runtime::Runtime,
    pool: PgPool,
    /// host:port/database, for logs.
    name: String,
    scope: Scope,
    keep: usize,
    keep_every: Option<Duration>,
    /// Whether the migrations ran; they run before the first call that needs them.
    migrated: std::sync::OnceLock<()>,
}

impl PgStore {
    /// Parses `url` and prepares a pool; connects lazily, so a database that
    /// is down now is an error of the first call, not of this one.
    pub fn open(url: &str, scope: Scope, keep: usize, every: Duration) -> Result<PgStore, CheckpointError> {
        let options: PgConnectOptions = url.parse().map_err(|_| CheckpointError::Url(redact(url)))?;
        let name = format!(
            "postgres {}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("(default)")
        );
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("checkpoint-pg")
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Unavailable { store: name.clone(), reason: e.to_string() })?;
        let pool = {
            let _guard = runtime.enter();
            PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options.application_name("tributary"))
        };
        Ok(PgStore {
            runtime,
            pool,
            name,
            scope,
            keep: keep.max(1),
            keep_every: (!every.is_zero()).then_some(every),
            migrated: Default::default(),
        })
    }

    fn unavailable(&self, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Unavailable { store: self.name.clone(), reason: e.to_string() }
    }

    /// Runs `migrations/` once per process (sqlx locks, so replicas starting
    /// together take turns).
    fn migrate(&self) -> Result<(), CheckpointError> {
        if self.migrated.get().is_some() {
            return Ok(());
        }
        self.runtime.block_on(sqlx::migrate!("./migrations").run(&self.pool)).map_err(|e| self.unavailable(e))?;
        tracing::info!(store = %self.name, "checkpoint store migrations applied");
        let _ = self.migrated.set(());
        Ok(())
    }

    async fn delete(&self, positions: &[i64]) -> Result<(), sqlx::Error> {
        sqlx::query("DELETE FROM checkpoints WHERE model = $1 AND log = $2 AND position = ANY($3)")
            .bind(&self.scope.model)
            .bind(&self.scope.log)
            .bind(positions)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    fn location(&self, position: i64) -> String {
        format!("{}#{}/{}@{}", self.name, self.scope.model, self.scope.log, position)
    }
}

impl Store for PgStore {
    fn describe(&self) -> String {
        self.name.clone()
    }

    /// Every replica of the fleet reads the same rows.
    fn is_shared(&self) -> bool {
        true
    }

    fn list(&self) -> Result<Vec<CheckpointInfo>, CheckpointError> {
        self.migrate()?;
        let rows = self
            .runtime
            .block_on(
                sqlx::query(
                    "SELECT position, (extract(epoch FROM written_at) * 1000)::bigint AS written_ms, bytes, \
                     examples_learned, progressive_loss FROM checkpoints \
                     WHERE model = $1 AND log = $2 ORDER BY position DESC",
                )
                .bind(&self.scope.model)
                .bind(&self.scope.log)
                .fetch_all(&self.pool),
            )
            .map_err(|e| self.unavailable(e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let position: i64 = row.get("position");
                let written_ms: i64 = row.get("written_ms");
                CheckpointInfo {
                    position,
                    location: self.location(position),
                    bytes: row.get::<i64, _>("bytes") as u64,
                    written: UNIX_EPOCH + Duration::from_millis(written_ms.max(0) as u64),
                    examples_learned: Some(row.get::<i64, _>("examples_learned") as u64),
                    progressive_loss: row.get("progressive_loss"),
                }
            })
            .collect())
    }

    fn save(&self, model: &Model, state: &ReplicaState) -> Result<CheckpointInfo, CheckpointError> {
        self.migrate()?;
        let bytes = encode(model, state);
        self.runtime
            .block_on(
                sqlx::query(
                    "INSERT INTO checkpoints (model, log, position, bytes, examples_learned, progressive_loss, writer, content) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
                )
                .bind(&self.scope.model)
                .bind(&self.scope.log)
                .bind(state.position)
                .bind(bytes.len() as i64)
                .bind(state.examples_learned as i64)
                .bind(state.progressive_loss())
                .bind(&self.scope.writer)
                .bind(&bytes)
                .execute(&self.pool),
            )
            .map_err(|e| self.unavailable(e))?;
        let listed = self.list()?;
        let gone: Vec<i64> = (listed.iter().zip(retained(&listed, self.keep, self.keep_every)))
            .filter(|(_, keep)| !keep)
            .map(|(c, _)| c.position)
            .collect();
        if !gone.is_empty() {
            self.runtime.block_on(self.delete(&gone)).map_err(|e| self.unavailable(e))?;
        }
        Ok(CheckpointInfo {
            position: state.position,
            location: self.location(state.position),
            bytes: bytes.len() as u64,
            written: SystemTime::now(),
            examples_learned: Some(state.examples_learned),
            progressive_loss: state.progressive_loss(),
        })
    }

    fn read(&self, info: &CheckpointInfo) -> Result<Vec<u8>, CheckpointError> {
        self.migrate()?;
        let row = self
            .runtime
            .block_on(
                sqlx::query("SELECT content FROM checkpoints WHERE model = $1 AND log = $2 AND position = $3")
                    .bind(&self.scope.model)
                    .bind(&self.scope.log)
                    .bind(info.position)
                    .fetch_optional(&self.pool),
            )
            .map_err(|e| self.unavailable(e))?;
        // Deleted by retention since it was listed: as good as torn.
        row.map(|r| r.get("content")).ok_or_else(|| CheckpointError::Corrupt(info.location.clone()))
    }

    fn read_part(&self, info: &CheckpointInfo, at: u64, len: usize) -> Result<Vec<u8>, CheckpointError> {
        self.migrate()?;
        // substring counts from 1, in int4 (a bytea is at most 1 GB); an
        // uncompressed (TOASTed) bytea is read by the slice, not whole.
        let from = i32::try_from(at.saturating_add(1)).unwrap_or(i32::MAX);
        let count = i32::try_from(len).unwrap_or(i32::MAX);
        let row = self
            .runtime
            .block_on(
                sqlx::query(
                    "SELECT substring(content FROM $4 FOR $5) AS part FROM checkpoints \
                     WHERE model = $1 AND log = $2 AND position = $3",
                )
                .bind(&self.scope.model)
                .bind(&self.scope.log)
                .bind(info.position)
                .bind(from)
                .bind(count)
                .fetch_optional(&self.pool),
            )
            .map_err(|e| self.unavailable(e))?;
        row.map(|r| r.get("part")).ok_or_else(|| CheckpointError::Corrupt(info.location.clone()))
    }
}

/// `url` without its password, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::checkpoint::tests::exercise;

    /// A fresh database on the machine's PostgreSQL (`TRIBUTARY_TEST_PG`,
    /// default postgres://postgres@127.0.0.1:5432), for one test.
    /// A fresh database on the machine's PostgreSQL, dropped when the test
    /// passes (kept for a post-mortem when it fails).
    pub(crate) struct TestDatabase {
        pub(crate) url: String,
        admin: String,
        name: String,
    }

    fn run_sql(admin: &str, statements: &[String]) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            use sqlx::Executor;
            let pool = PgPool::connect(&format!("{admin}/postgres")).await.expect("PostgreSQL on 127.0.0.1:5432");
            for sql in statements {
                pool.execute(sql.as_str()).await.unwrap();
            }
        });
    }

    impl Drop for TestDatabase {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                run_sql(&self.admin, &[format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)]);
            }
        }
    }

    pub(crate) fn fresh_database(name: &str) -> TestDatabase {
        let admin = std::env::var("TRIBUTARY_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let name = format!("tributary_{name}_{}", std::process::id());
        run_sql(&admin, &[format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"), format!("CREATE DATABASE {name}")]);
        TestDatabase { url: format!("{admin}/{name}"), admin, name }
    }

    fn scope(log: &str) -> Scope {
        Scope { model: "m".into(), log: log.into(), writer: "test".into() }
    }

    #[test]
    fn saves_lists_loads_and_retains() {
        let db = fresh_database("store");
        exercise(&PgStore::open(&db.url, scope("updates"), 2, Duration::ZERO).unwrap());
        // Another update log's checkpoints are not this one's.
        let other = PgStore::open(&db.url, scope("updates-b"), 2, Duration::ZERO).unwrap();
        assert!(other.list().unwrap().is_empty());
    }

    #[test]
    fn a_database_that_is_down_is_an_error_not_a_hang() {
        // Nothing listens on port 1.
        let store = PgStore::open("postgres://postgres:secret@127.0.0.1:1/x", scope("u"), 2, Duration::ZERO).unwrap();
        let err = store.list().unwrap_err();
        assert!(matches!(err, CheckpointError::Unavailable { .. }), "{err}");
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(redact("postgres://u:secret@h/db"), "postgres://u:***@h/db");
    }
}
