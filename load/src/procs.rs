//! Real processes on 127.0.0.1: a Tansu broker, tributary replicas and event
//! streams, started and killed by the load tool and by tributary's fleet
//! tests alike. Everything here is blocking; waiting is polling with a
//! deadline, never a bare sleep.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Polls `f` every 20 ms until it returns `Some`, or fails after `limit`
/// saying what it waited for.
pub fn try_wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {limit:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// [`try_wait_for`] for tests: panics on timeout.
pub fn wait_for<T>(what: &str, limit: Duration, f: impl FnMut() -> Option<T>) -> T {
    try_wait_for(what, limit, f).unwrap_or_else(|e| panic!("{e}"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port on 127.0.0.1")
}

/// `$TANSU`, else `~/.cargo/bin/tansu` (where `scripts/setup` installs it), else `tansu` on the PATH.
pub fn tansu_bin() -> PathBuf {
    if let Ok(p) = std::env::var("TANSU") {
        return p.into();
    }
    let home = PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo/bin/tansu");
    if home.exists() {
        home
    } else {
        "tansu".into()
    }
}

/// `$TRIBUTARY_PYTHON`, else the python of the virtualenv `scripts/setup`
/// makes (`.libtorch` at the repository's root is its `site-packages/torch`).
pub fn venv_python() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TRIBUTARY_PYTHON") {
        return Ok(p.into());
    }
    let link = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.libtorch");
    let torch = std::fs::canonicalize(&link).map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/setup)", link.display()))?;
    let venv = torch.ancestors().nth(4).ok_or_else(|| anyhow::anyhow!("{} is not venv/lib/pythonX/site-packages/torch", torch.display()))?;
    Ok(venv.join("bin/python"))
}

/// Runs `examples/torchscript/export.py` with `args`, saving the module at `out`.
pub fn export_torchscript(out: &Path, args: &[&str]) -> anyhow::Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/torchscript/export.py");
    let run = Command::new(venv_python()?).arg(script).arg("--out").arg(out).args(args).output()?;
    if !run.status.success() {
        anyhow::bail!("export.py: {}", String::from_utf8_lossy(&run.stderr));
    }
    Ok(())
}

/// One HTTP/1.1 GET on a fresh connection: (status, body), or `None` when the
/// server cannot be reached or answers garbage. For polling, not for load.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    // Axum answers with a length, not chunks, for these small bodies.
    Some((status, body.to_string()))
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(Proc(Some(child)))
    }

    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; returns once the process has exited, or fails after `limit`
    /// (and then kills it).
    pub fn terminate(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.0.take() else { anyhow::bail!("not running") };
        // SAFETY: kill(2) with a pid we own and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let exited = try_wait_for("the process to exit after SIGTERM", limit, || child.try_wait().ok().flatten());
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }

    /// Waits for a process that ends by itself.
    pub fn wait(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.0.take() else { anyhow::bail!("not running") };
        let exited = try_wait_for("the process to finish", limit, || child.try_wait().ok().flatten());
        if exited.is_err() {
            let _ = child.kill();
            let _ = child.wait();
        }
        exited
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Tansu broker on a free port; killed on drop.
pub struct Broker {
    proc: Proc,
    pub addr: String,
    storage: String,
    dir: PathBuf,
}

impl Broker {
    /// With its topics in memory.
    pub fn start(dir: &Path) -> anyhow::Result<Broker> {
        Broker::start_on(dir, "memory://tansu/")
    }

    /// With its topics in `storage`: `memory://tansu/`, or `sqlite://NAME`
    /// (a file in `dir`) for a broker that keeps its data when it restarts.
    pub fn start_on(dir: &Path, storage: &str) -> anyhow::Result<Broker> {
        let port = free_port();
        let mut broker =
            Broker { proc: Proc(None), addr: format!("127.0.0.1:{port}"), storage: storage.into(), dir: dir.into() };
        broker.restart()?;
        Ok(broker)
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again on the same address and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://{}", self.addr);
        self.proc = Proc::spawn(
            Command::new(tansu_bin())
                .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
                .args(["--storage-engine", &self.storage])
                .current_dir(&self.dir)
                .env("RUST_LOG", "warn"),
            &self.dir.join("tansu.log"),
        )
        .map_err(|e| anyhow::anyhow!("cannot start tansu ({e}); scripts/setup installs it"))?;
        try_wait_for("the broker to listen", Duration::from_secs(30), || TcpStream::connect(&self.addr).ok())?;
        Ok(())
    }
}

/// A tributary replica: `tributary serve` with its own id, HTTP port, state
/// directory and log file, configured through `TRIBUTARY_*` variables.
pub struct Replica {
    proc: Proc,
    bin: PathBuf,
    pub id: String,
    pub http: SocketAddr,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    pub env: Vec<(String, String)>,
    pub brokers: String,
}

impl Replica {
    /// Describes a replica whose files go under `dir`; [`Replica::start`] runs it.
    pub fn new(bin: &Path, dir: &Path, id: &str, brokers: &str, env: Vec<(String, String)>) -> Replica {
        Replica {
            proc: Proc(None),
            bin: bin.to_path_buf(),
            id: id.into(),
            http: SocketAddr::from(([127, 0, 0, 1], free_port())),
            state_dir: dir.join(format!("state-{id}")),
            log: dir.join(format!("{id}.log")),
            env,
            brokers: brokers.into(),
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.proc.is_running(), "{} already runs", self.id);
        self.proc = Proc::spawn(
            Command::new(&self.bin)
                .arg("serve")
                .args(["--replica-id", &self.id, "--brokers", &self.brokers])
                .args(["--http-addr", &self.http.to_string()])
                .arg("--state-dir")
                .arg(&self.state_dir)
                .envs(self.env.iter().cloned()),
            &self.log,
        )?;
        Ok(())
    }

    /// Starts it and waits until `/readyz` says ready.
    pub fn start_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        self.start()?;
        self.wait_ready(limit)
    }

    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// SIGTERM; returns once the process has exited.
    pub fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        self.proc.terminate(Duration::from_secs(60))
    }

    /// Waits for a replica that stops by itself (a refused start-up).
    pub fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<ExitStatus> {
        self.proc.wait(limit)
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.http, path)
    }

    /// `GET /v1/models/default` as JSON.
    pub fn info(&self) -> Option<serde_json::Value> {
        let (status, body) = self.get("/v1/models/default")?;
        (status == 200).then(|| serde_json::from_str(&body).ok())?
    }

    pub fn metrics(&self) -> Option<Scrape> {
        let (status, body) = self.get("/metrics")?;
        (status == 200).then(|| Scrape::parse(&body))
    }

    pub fn is_ready(&self) -> bool {
        self.get("/readyz").is_some_and(|(s, _)| s == 200)
    }

    pub fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        try_wait_for(&format!("{} to be ready (log: {})", self.id, self.log.display()), limit, || {
            self.is_ready().then_some(())
        })
    }

    /// The last `n` lines of the replica's log, for a failure message.
    pub fn log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A stream of synthetic events: `tributary generate | tributary produce`.
pub struct EventStream {
    generate: Proc,
    produce: Proc,
}

impl EventStream {
    /// `count` events (or without end) at `rate` per second (or as fast as
    /// possible) to `topic`; `env` carries the model configuration that
    /// `produce` validates against.
    pub fn start(
        bin: &Path,
        brokers: &str,
        topic: &str,
        rate: Option<f64>,
        count: Option<u64>,
        env: &[(String, String)],
        log: &Path,
    ) -> anyhow::Result<EventStream> {
        let mut generate = Command::new(bin);
        generate.arg("generate").envs(env.iter().cloned());
        if let Some(rate) = rate {
            generate.args(["--rate", &rate.to_string()]);
        }
        if let Some(count) = count {
            generate.args(["--count", &count.to_string()]);
        }
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut generate = generate.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file.try_clone()?).spawn()?;
        let pipe = generate.stdout.take().expect("piped stdout");
        let produce = Command::new(bin)
            .args(["produce", "--brokers", brokers, "--topic", topic])
            .envs(env.iter().cloned())
            .stdin(pipe)
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()?;
        Ok(EventStream { generate: Proc(Some(generate)), produce: Proc(Some(produce)) })
    }

    /// Waits for a counted stream to be delivered; fails if `produce` failed.
    pub fn finish(mut self, limit: Duration) -> anyhow::Result<()> {
        let status = self.produce.wait(limit)?;
        anyhow::ensure!(status.success(), "tributary produce failed: {status}");
        let _ = self.generate.wait(Duration::from_secs(5));
        Ok(())
    }

    pub fn stop(mut self) {
        self.generate.kill();
        // produce sees the end of its input, flushes and exits.
        let _ = self.produce.wait(Duration::from_secs(30));
    }
}

/// A Prometheus text exposition, for reading counters and histograms.
pub struct Scrape(Vec<(String, String, f64)>);

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(|l| {
                let (key, value) = l.rsplit_once(' ')?;
                let (name, labels) = match key.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (key, ""),
                };
                Some((name.to_string(), labels.to_string(), value.parse().ok()?))
            })
            .collect();
        Scrape(series)
    }

    /// The sum over the series of `name` whose labels contain `labels`.
    pub fn value(&self, name: &str, labels: &str) -> f64 {
        self.0.iter().filter(|(n, l, _)| n == name && l.contains(labels)).map(|(_, _, v)| v).sum()
    }

    /// Cumulative bucket counts of histogram `name`: (upper bound, count).
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter(|(n, _, _)| *n == bucket)
            .filter_map(|(_, labels, v)| {
                let le = labels.split(',').find_map(|kv| kv.strip_prefix("le="))?.trim_matches('"');
                let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
                Some((le, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// The upper bound of the bucket that holds quantile `q` of the observations
/// made between two scrapes of histogram `name` (None: no observations).
pub fn histogram_quantile(before: &Scrape, after: &Scrape, name: &str, q: f64) -> Option<f64> {
    let (b, a) = (before.buckets(name), after.buckets(name));
    let delta: Vec<(f64, f64)> =
        a.iter().map(|&(le, v)| (le, v - b.iter().find(|x| x.0 == le).map_or(0.0, |x| x.1))).collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    delta.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x_seconds latency\n\
        x_seconds_bucket{replica=\"a\",le=\"0.01\"} 5\n\
        x_seconds_bucket{replica=\"a\",le=\"0.1\"} 9\n\
        x_seconds_bucket{replica=\"a\",le=\"+Inf\"} 10\n\
        x_total{replica=\"a\",reason=\"shape\"} 2\n\
        x_total{replica=\"a\",reason=\"norm\"} 3\n";

    #[test]
    fn scrape_sums_series_and_reads_buckets() {
        let s = Scrape::parse(TEXT);
        assert_eq!(s.value("x_total", ""), 5.0);
        assert_eq!(s.value("x_total", "reason=\"norm\""), 3.0);
        assert_eq!(s.buckets("x_seconds"), vec![(0.01, 5.0), (0.1, 9.0), (f64::INFINITY, 10.0)]);
    }

    #[test]
    fn quantiles_come_from_the_difference_of_two_scrapes() {
        let before = Scrape::parse("x_seconds_bucket{le=\"0.01\"} 5\nx_seconds_bucket{le=\"0.1\"} 5\nx_seconds_bucket{le=\"+Inf\"} 5\n");
        let after = Scrape::parse(TEXT);
        // Between the scrapes: 4 observations <= 0.1, 1 above.
        assert_eq!(histogram_quantile(&before, &after, "x_seconds", 0.5), Some(0.1));
        assert_eq!(histogram_quantile(&before, &after, "x_seconds", 0.99), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(&after, &after, "x_seconds", 0.5), None);
    }
}
