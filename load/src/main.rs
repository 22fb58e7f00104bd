//! `load`: tributary's load tool. `load run` runs the scenarios against real
//! Apache Kafka brokers and replica processes and writes `report.json` and
//! `report.md`, and keeps the run in `load/results/runs/`; `load history`
//! renders every kept run into `load/results/README.md`; `load run --smoke`
//! is the few-second version CI runs, which fails on any failed request.
//! `scripts/load` builds and runs it.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tributary_load::history;
use tributary_load::report::Report;
use tributary_load::scenarios::{self, Bench, SMOKE};

#[derive(Parser)]
#[command(name = "load", about = "Load tests of tributary: throughput, latency through swaps and failures, recovery")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run scenarios and write the report.
    Run {
        /// A few seconds per scenario, and fail on any failed request (CI).
        #[arg(long)]
        smoke: bool,
        /// Scenarios to run, comma-separated (default: all; smoke: baseline,predict).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        /// Where this run's report.json, report.md and the processes' logs go.
        #[arg(long, default_value = "target/load")]
        out: PathBuf,
        /// The tributary binary (default: beside this one).
        #[arg(long)]
        tributary: Option<PathBuf>,
        /// Where the run is kept for `load history` (not for --smoke).
        #[arg(long, default_value = history::RUNS)]
        runs: PathBuf,
    },
    /// Render the benchmark tables from the kept runs.
    History {
        /// The kept runs (each full `load run` writes one).
        #[arg(long, default_value = history::RUNS)]
        runs: PathBuf,
        /// The Markdown written.
        #[arg(long, default_value = history::RENDERED)]
        out: PathBuf,
    },
    /// Serve the hello-world baseline: axum, reading the body, answering a constant.
    #[command(hide = true)]
    Hello {
        #[arg(long)]
        port: u16,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Hello { port } => hello(port),
        Cmd::History { runs, out } => {
            let md = history::render(&history::load_runs(&runs)?, &scenarios::all());
            std::fs::write(&out, md)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Cmd::Run { smoke, only, out, tributary, runs } => {
            let me = std::env::current_exe()?;
            let tributary = tributary.unwrap_or_else(|| me.with_file_name("tributary"));
            let label = if only.is_empty() { "all".to_string() } else { only.join("-") };
            let names: Vec<String> = if !only.is_empty() {
                only
            } else if smoke {
                SMOKE.map(String::from).to_vec()
            } else {
                scenarios::all().into_iter().map(String::from).collect()
            };
            let command = std::env::args().collect::<Vec<_>>().join(" ");
            let mut bench = Bench::new(tributary, me, out.join("logs"), smoke, Report::new(command))?;
            let mut failed = Vec::new();
            for name in &names {
                println!("== {name}");
                if let Err(e) = bench.run(name) {
                    eprintln!("scenario {name} failed: {e:#}");
                    failed.push(name.clone());
                }
                // After each scenario, so that a long run stopped early keeps what it measured.
                bench.report.write(&out)?;
            }
            println!("report: {}", out.join("report.md").display());
            if !smoke {
                bench.report.keep(&runs, &label)?;
                println!("kept in {} (`load history` renders it)", runs.display());
            }
            anyhow::ensure!(failed.is_empty(), "scenarios failed: {}", failed.join(", "));
            let errors = bench.errors();
            anyhow::ensure!(!smoke || errors.is_empty(), "failed requests: {}", errors.join("; "));
            Ok(())
        }
    }
}

fn hello(port: u16) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let app = axum::Router::new().fallback(|_body: bytes::Bytes| async { "hello" });
        let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port))).await?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}
