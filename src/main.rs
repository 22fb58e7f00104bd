//! The `tributary` binary: parses the command line, sets up telemetry and
//! runs one of the commands. The work lives in the library.

use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tributary::config::{Config, Overrides};
use tributary::produce::Partitioning;

#[derive(Parser)]
#[command(name = "tributary", version, about = "Learn online from Kafka, serve over HTTP")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file (see config/tributary.toml)
    #[arg(long, env = "TRIBUTARY_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers
    #[arg(long)]
    brokers: Option<String>,
}

impl ConfigArgs {
    fn load(&self, mut flags: Overrides) -> anyhow::Result<Config> {
        flags.brokers = self.brokers.clone();
        Ok(Config::load(self.config.as_deref(), std::env::vars(), &flags)?)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run a replica: train from the events topic, apply the update log, serve HTTP.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        flags: Overrides,
    },
    /// Produce JSONL training events from FILE (or stdin) to a topic.
    Produce {
        #[command(flatten)]
        config: ConfigArgs,
        /// The topic; default: kafka.events_topic (`events`)
        #[arg(long)]
        topic: Option<String>,
        /// Encoding on the topic: json, or avro (Confluent wire format, with
        /// kafka.avro_schema); default: kafka.event_format
        #[arg(long, value_enum)]
        format: Option<tributary::config::EventFormat>,
        /// How events are spread over the partitions: `sticky` (keyless, a
        /// producer batch to one partition, librdkafka's default),
        /// `per-message` (a partition drawn per event), or `key:POINTER`
        /// (keyed by the event's value at a JSON pointer, as `key:/sparse/f0`)
        #[arg(long, default_value = "sticky")]
        partitioning: Partitioning,
        file: Option<PathBuf>,
    },
    /// The checkpoint store's checkpoints (`snapshots`, its first name, is
    /// still accepted).
    #[command(alias = "snapshots")]
    Checkpoints {
        #[command(subcommand)]
        action: CheckpointsAction,
    },
    /// Exit 0 if this replica's HTTP API answers GET PATH with 200 (the
    /// container health check; the address is http.addr).
    Healthcheck {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "/healthz")]
        path: String,
    },
    /// Print synthetic training events as JSONL.
    Generate {
        #[command(flatten)]
        config: ConfigArgs,
        /// Events to print (default: without end)
        #[arg(long)]
        count: Option<u64>,
        /// Events per second (default: as fast as possible)
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// `demo`: a simple hidden model; `ctr`: the held-out click-through
        /// stream learning quality is measured on (many rare values, drift);
        /// `clicks`: the same hidden model over Zipf users and ads (few hot
        /// values, drift)
        #[arg(long, value_enum, default_value_t = Stream::Demo)]
        stream: Stream,
        /// `ctr`, `clicks`: the hidden model changes after this many events
        /// (default: half of --count)
        #[arg(long)]
        drift_at: Option<u64>,
        /// `ctr`, `clicks`: also write every event to FILE in Vowpal Wabbit's text format
        #[arg(long)]
        vw: Option<PathBuf>,
        /// `ctr`, `clicks`: events without `ts` (the trainer then orders by
        /// the Kafka record's timestamp)
        #[arg(long)]
        no_ts: bool,
        /// Poison every event (dense values x20, label flipped): what the
        /// divergence guard must catch
        #[arg(long)]
        poison: bool,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Stream {
    Demo,
    Ctr,
    Clicks,
}

#[derive(Subcommand)]
enum CheckpointsAction {
    /// List checkpoints, newest first: position, time, size, examples learned, loss.
    List {
        #[command(flatten)]
        config: ConfigArgs,
        /// Directory of the embedded checkpoint store
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Checkpoint store: file:PATH or postgres://user@host/db (default: --state-dir)
        #[arg(long)]
        checkpoint_store: Option<String>,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
}

fn main() -> anyhow::Result<()> {
    tributary::telemetry::init();
    match Cli::parse().command {
        Command::Serve { config, flags } => {
            let config = config.load(flags)?;
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(tributary::replica::run(config, shutdown_signal()))
        }
        Command::Produce { config, topic, format, partitioning, file } => {
            let mut config = config.load(Overrides::default())?;
            if let Some(format) = format {
                config.kafka.event_format = format;
                config.validate()?;
            }
            let topic = topic.unwrap_or_else(|| config.kafka.events_topic.clone());
            produce(&config, &topic, &partitioning, file)
        }
        Command::Checkpoints { action: CheckpointsAction::List { config, state_dir, checkpoint_store, json } } => {
            list_checkpoints(&config.load(Overrides { state_dir, checkpoint_store, ..Default::default() })?, json)
        }
        Command::Healthcheck { config, path } => healthcheck(config.load(Overrides::default())?.http.addr, &path),
        Command::Generate { config, count, rate, seed, stream, drift_at, vw, no_ts, poison } => {
            let config = config.load(Overrides::default())?;
            let source = Source { stream, seed, count, drift_at, vw, no_ts };
            generate(&config, &source, rate, poison)
        }
    }
}

/// `tributary produce`: JSONL events from `file` (or stdin) into `topic`.
fn produce(config: &Config, topic: &str, partitioning: &Partitioning, file: Option<PathBuf>) -> anyhow::Result<()> {
    let model = tributary::model::Model::new(&config.model)?;
    let input: Box<dyn BufRead> = match file {
        Some(path) => Box::new(std::io::BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    };
    let report = tributary::produce::produce(&config.kafka, topic, model.featurizer(), input, partitioning)?;
    if report.failed > 0 {
        anyhow::bail!("{} events were not delivered", report.failed);
    }
    Ok(())
}

/// `tributary checkpoints list`: newest first, as a table or JSON lines.
fn list_checkpoints(config: &Config, json: bool) -> anyhow::Result<()> {
    let store = tributary::checkpoint::open(config)?;
    let listed = store.list()?;
    if json {
        for c in &listed {
            println!("{}", serde_json::to_string(&tributary::http::CheckpointEntry::from(c))?);
        }
        return Ok(());
    }
    println!("{:>12}  {:>24}  {:>12}  {:>16}  {:>10}", "position", "written (UTC)", "bytes", "examples", "loss");
    for c in &listed {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        println!(
            "{:>12}  {:>24}  {:>12}  {:>16}  {:>10}",
            c.position,
            tributary::telemetry::utc(c.written),
            c.bytes,
            opt(c.examples_learned.map(|e| e.to_string())),
            opt(c.progressive_loss.map(|l| format!("{l:.5}"))),
        );
    }
    if listed.is_empty() {
        eprintln!("no checkpoints in {}", store.describe());
    }
    Ok(())
}

/// `tributary generate`: events on stdout, at `rate` a second if given.
fn generate(config: &Config, source: &Source, rate: Option<f64>, poison: bool) -> anyhow::Result<()> {
    let mut next = event_source(config, source)?;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let start = Instant::now();
    for i in 0..source.count.unwrap_or(u64::MAX) {
        if let Some(rate) = rate {
            let due = start + Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                out.flush()?;
                std::thread::sleep(wait);
            }
        }
        let ts = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        let event = next(ts)?;
        let event = if poison { tributary::synthetic::poisoned(&event)? } else { event };
        if writeln!(out, "{event}").is_err() {
            break; // the reader went away
        }
    }
    let _ = out.flush();
    Ok(())
}

/// What `tributary generate` was asked for.
struct Source {
    stream: Stream,
    seed: u64,
    count: Option<u64>,
    drift_at: Option<u64>,
    vw: Option<PathBuf>,
    no_ts: bool,
}

/// The events `tributary generate` prints, one JSON line per call (given
/// the event time); the `ctr` and `clicks` streams also write each to `vw`.
fn event_source(config: &Config, source: &Source) -> anyhow::Result<Box<dyn FnMut(i64) -> anyhow::Result<String>>> {
    let Source { stream, seed, count, drift_at, no_ts, .. } = *source;
    match stream {
        Stream::Demo => {
            anyhow::ensure!(
                source.vw.is_none() && drift_at.is_none() && !no_ts,
                "--vw, --drift-at and --no-ts are for --stream ctr and clicks"
            );
            let mut synthetic = tributary::synthetic::Synthetic::new(&config.model, seed);
            Ok(Box::new(move |ts| Ok(synthetic.event(ts))))
        }
        Stream::Ctr | Stream::Clicks => {
            let drift_at = drift_at.or(count.map(|n| n / 2)).unwrap_or(u64::MAX);
            let mut ctr = match stream {
                Stream::Clicks => tributary::synthetic::CtrStream::clicks(&config.model, seed, drift_at),
                _ => tributary::synthetic::CtrStream::new(&config.model, seed, drift_at),
            };
            let mut vw_out = match &source.vw {
                Some(path) => Some(std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
                )),
                None => None,
            };
            Ok(Box::new(move |ts| {
                let event = ctr.next_event((!no_ts).then_some(ts));
                // Flushed when the source is dropped, after the last event.
                if let Some(out) = vw_out.as_mut() {
                    writeln!(out, "{}", event.vw)?;
                }
                Ok(event.json)
            }))
        }
    }
}

/// One HTTP/1.0 GET, without a client library: the runtime image has no curl.
fn healthcheck(mut addr: SocketAddr, path: &str) -> anyhow::Result<()> {
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() });
    }
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut status = String::new();
    std::io::BufReader::new(stream).read_line(&mut status)?;
    match status.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => anyhow::bail!("GET http://{addr}{path}: {}", status.trim()),
    }
}

/// Resolves on SIGTERM or ctrl-c.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
