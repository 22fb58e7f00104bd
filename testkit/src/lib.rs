//! Real processes on 127.0.0.1: Apache Kafka brokers, tributary replicas and event
//! streams, started and killed by the load tool and by tributary's fleet
//! tests alike. Everything here is blocking; waiting is polling with a
//! deadline, never a bare sleep.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;

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

/// `$TRIBUTARY_PYTHON`, else the python of the virtualenv `scripts/setup`
/// makes (`.libtorch` at the repository's root is its `site-packages/torch`).
pub fn venv_python() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("TRIBUTARY_PYTHON") {
        return Ok(p.into());
    }
    let link = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.libtorch");
    let torch =
        std::fs::canonicalize(&link).map_err(|e| anyhow::anyhow!("{}: {e} (run scripts/setup)", link.display()))?;
    let venv = torch
        .ancestors()
        .nth(4)
        .ok_or_else(|| anyhow::anyhow!("{} is not venv/lib/pythonX/site-packages/torch", torch.display()))?;
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

/// The HTTP client of the load tool's polling and of tributary's tests (the
/// load itself is `driver`'s): one keep-alive pool, 2 s to connect, 60 s
/// for an answer (a rollback request waits up to 30 s for its outcome).
pub fn http() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::blocking::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client")
    })
}

/// `GET path` of the server at `addr`: (status, body), or `None` when it
/// cannot be reached. For polling, not for load.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    answer(http().get(format!("http://{addr}{path}")).send())
}

/// `POST path` of the server at `addr` with a JSON `body` and, if given, a
/// bearer `token`: (status, body), or `None` when it cannot be reached.
pub fn http_post(addr: SocketAddr, path: &str, token: Option<&str>, body: &str) -> Option<(u16, String)> {
    let mut request =
        http().post(format!("http://{addr}{path}")).header("content-type", "application/json").body(body.to_string());
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    answer(request.send())
}

fn answer(response: reqwest::Result<reqwest::blocking::Response>) -> Option<(u16, String)> {
    let response = response.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().ok()?))
}

/// A child process killed (SIGKILL) on drop.
pub struct Proc(Option<Child>);

impl Proc {
    pub fn spawn(command: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let child = command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?;
        Ok(Proc(Some(child)))
    }

    /// Spawned and not yet killed or waited for by us. A process that
    /// exited on its own still counts: to see that, read its log (a
    /// replica says `a role ended` before it stops) or `wait` for it.
    pub fn is_running(&self) -> bool {
        self.0.is_some()
    }

    /// The process id while it runs (see [`Proc::is_running`]).
    pub fn pid(&self) -> Option<u32> {
        self.0.as_ref().map(Child::id)
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) and leaves the process to it.
    pub fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        // SAFETY: kill(2) with a pid we own and have not reaped.
        anyhow::ensure!(unsafe { libc::kill(pid as i32, signal) } == 0, "kill({pid}, {signal}) failed");
        Ok(())
    }

    /// CPU time the process has used so far (user and system), in seconds.
    pub fn cpu_secs(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()?)).ok()?;
        // The fields after the command's closing parenthesis: utime, stime
        // are the 12th and 13th of them.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / per_sec)
    }

    /// The most resident memory the process has had (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        self.status_bytes("VmHWM:")
    }

    /// The process's resident memory now (`VmRSS`), in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.status_bytes("VmRSS:")
    }

    /// A size in kB of `/proc/PID/status`, in bytes.
    fn status_bytes(&self, field: &str) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let kb = status.lines().find_map(|l| l.strip_prefix(field))?.trim().strip_suffix("kB")?.trim();
        kb.parse::<u64>().ok().map(|kb| kb * 1024)
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

/// The environment variable through which `scripts/test` hands the tests
/// one Apache Kafka broker for the whole run.
pub const SHARED_BROKER_ENV: &str = "TRIBUTARY_TEST_KAFKA";

/// An Apache Kafka node in KRaft mode (broker and controller in one JVM),
/// run by `scripts/kafka-broker` from the jars `scripts/setup` fetched;
/// killed on drop. Or the run's shared broker, which is neither killed nor
/// restarted here.
pub struct Broker {
    proc: Proc,
    /// Client listener, `127.0.0.1:port`.
    pub addr: String,
    /// `scripts/kafka-broker`'s arguments, to start it again on the same data.
    args: Vec<String>,
    /// Its data directory; the broker's output goes to `broker.log` there.
    pub dir: PathBuf,
    /// The run's shared broker: started by `scripts/test`, not ours to stop.
    shared: bool,
    /// "Kafka Server started" lines in the log before the last spawn.
    starts_logged: usize,
}

const STARTED: &str = "Kafka Server started";

/// One node's place in a KRaft quorum.
struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
}

impl Broker {
    /// A single-node broker of its own, with its data under `dir/kafka`.
    pub fn start(dir: &Path) -> anyhow::Result<Broker> {
        let node = Node { id: 1, port: free_port(), controller_port: free_port() };
        let mut broker =
            Broker::describe(&dir.join("kafka"), &node, &format!("1@127.0.0.1:{}", node.controller_port), 1);
        broker.restart()?;
        Ok(broker)
    }

    /// The same, telling its clients to connect to `advertised_port` (a
    /// test's proxy in front of it, which forwards to the broker's own
    /// port, `listen_port`): every request then passes the proxy.
    pub fn start_advertised(dir: &Path, listen_port: u16, advertised_port: u16) -> anyhow::Result<Broker> {
        let node = Node { id: 1, port: listen_port, controller_port: free_port() };
        let mut broker =
            Broker::describe(&dir.join("kafka"), &node, &format!("1@127.0.0.1:{}", node.controller_port), 1);
        broker.args.extend(["--advertised-port".to_string(), advertised_port.to_string()]);
        broker.addr = format!("127.0.0.1:{advertised_port}");
        broker.restart()?;
        Ok(broker)
    }

    /// A single-node broker of its own whose client listener is SASL_SSL
    /// with SCRAM-SHA-512 users `users` (`user:password`; the first is the
    /// super user) and ACLs enforced; clients trust `dir/kafka/tls/ca.pem`
    /// ([`Broker::ca`]).
    pub fn start_secure(dir: &Path, users: &[(&str, &str)]) -> anyhow::Result<Broker> {
        let node = Node { id: 1, port: free_port(), controller_port: free_port() };
        let mut broker =
            Broker::describe(&dir.join("kafka"), &node, &format!("1@127.0.0.1:{}", node.controller_port), 1);
        let users: Vec<String> = users.iter().map(|(user, password)| format!("{user}:{password}")).collect();
        broker.args.extend(["--secure".to_string(), users.join(",")]);
        broker.restart()?;
        Ok(broker)
    }

    /// The certificate of the CA that signed a secure broker's.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }

    /// The broker `scripts/test` started for the whole run (its address in
    /// `$TRIBUTARY_TEST_KAFKA`), else one of its own under `dir`: a test that
    /// never kills its broker shares it with the others, each with its own
    /// topics and group.
    pub fn shared_or_start(dir: &Path) -> anyhow::Result<Broker> {
        match std::env::var(SHARED_BROKER_ENV) {
            Ok(addr) if !addr.is_empty() => Ok(Broker {
                proc: Proc(None),
                addr,
                args: Vec::new(),
                dir: dir.to_path_buf(),
                shared: true,
                starts_logged: 0,
            }),
            _ => Broker::start(dir),
        }
    }

    fn describe(dir: &Path, node: &Node, voters: &str, replication: usize) -> Broker {
        let args = [
            ("--dir", dir.display().to_string()),
            ("--port", node.port.to_string()),
            ("--controller-port", node.controller_port.to_string()),
            ("--node-id", node.id.to_string()),
            ("--voters", voters.to_string()),
            ("--replication", replication.to_string()),
        ];
        Broker {
            proc: Proc(None),
            addr: format!("127.0.0.1:{}", node.port),
            args: args.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect(),
            dir: dir.to_path_buf(),
            shared: false,
            starts_logged: 0,
        }
    }

    pub fn is_running(&self) -> bool {
        self.shared || self.proc.is_running()
    }

    /// The broker's process (the JVM: the start script execs it); none for
    /// the run's shared broker.
    pub fn process(&self) -> &Proc {
        &self.proc
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        assert!(!self.shared, "the run's shared broker is not a test's to kill; use Broker::start");
        self.proc.kill();
    }

    /// Starts it again on the same address and data, and waits until it
    /// has joined its quorum and serves clients.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn()?;
        // A JVM restarting into a KRaft quorum replays the metadata log
        // first: on two busy cores 60 s and once 120 s were not enough in a
        // full run (its controller events took 3-4 s each).
        self.wait_started(Duration::from_secs(180))
    }

    /// Starts the JVM, without waiting.
    fn spawn(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.shared, "the run's shared broker is not a test's to restart");
        anyhow::ensure!(!self.proc.is_running(), "broker {} already runs", self.addr);
        std::fs::create_dir_all(&self.dir)?;
        self.starts_logged = std::fs::read_to_string(self.log()).unwrap_or_default().matches(STARTED).count();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-broker");
        self.proc = Proc::spawn(Command::new(script).args(&self.args), &self.log())
            .map_err(|e| anyhow::anyhow!("cannot run scripts/kafka-broker ({e})"))?;
        Ok(())
    }

    fn log(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    /// Waits for this start's "Kafka Server started" (the log is appended
    /// to across restarts, so the lines are counted) and for the listener.
    fn wait_started(&mut self, limit: Duration) -> anyhow::Result<()> {
        let what = format!("the Kafka broker at {} to start (log: {})", self.addr, self.log().display());
        let deadline = Instant::now() + limit;
        loop {
            let log = std::fs::read_to_string(self.log()).unwrap_or_default();
            if log.matches(STARTED).count() > self.starts_logged && TcpStream::connect(&self.addr).is_ok() {
                return Ok(());
            }
            if let Some(Some(status)) = self.proc.0.as_mut().map(|c| c.try_wait().ok().flatten()) {
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                anyhow::bail!(
                    "{what}: it exited ({status}):\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Several Kafka nodes on 127.0.0.1, each broker and controller, forming
/// one KRaft quorum; internal topics replicated to all of them.
pub struct KafkaCluster {
    pub brokers: Vec<Broker>,
}

impl KafkaCluster {
    /// `n` nodes with their data under `dir/kafka-<id>`, started together
    /// (each waits for a quorum of the others).
    pub fn start(dir: &Path, n: u32) -> anyhow::Result<KafkaCluster> {
        let nodes: Vec<Node> = (1..=n).map(|id| Node { id, port: free_port(), controller_port: free_port() }).collect();
        let voters: Vec<String> = nodes.iter().map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port)).collect();
        let mut brokers: Vec<Broker> = (nodes.iter())
            .map(|node| Broker::describe(&dir.join(format!("kafka-{}", node.id)), node, &voters.join(","), n as usize))
            .collect();
        for b in &mut brokers {
            b.spawn()?;
        }
        for b in &mut brokers {
            b.wait_started(Duration::from_secs(90))?;
        }
        Ok(KafkaCluster { brokers })
    }

    /// Every node's address: what clients bootstrap from.
    pub fn bootstrap(&self) -> String {
        self.brokers.iter().map(|b| b.addr.as_str()).collect::<Vec<_>>().join(",")
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
    /// The model it serves (`model.name`), for `info`.
    pub model_name: String,
    /// A cap on its address space (RLIMIT_AS), for a test that sends it
    /// hostile input: a regression then fails its allocation fast instead
    /// of taking the machine's memory.
    pub memory_cap_bytes: Option<u64>,
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
            model_name: "default".into(),
            memory_cap_bytes: None,
        }
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(!self.proc.is_running(), "{} already runs", self.id);
        let mut command = Command::new(&self.bin);
        if let Some(cap) = self.memory_cap_bytes {
            use std::os::unix::process::CommandExt;
            let limit = libc::rlimit { rlim_cur: cap, rlim_max: cap };
            // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
            unsafe {
                command.pre_exec(move || match libc::setrlimit(libc::RLIMIT_AS, &limit) {
                    0 => Ok(()),
                    _ => Err(std::io::Error::last_os_error()),
                });
            }
        }
        self.proc = Proc::spawn(
            command
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

    /// The process, for its pid, signals and memory.
    pub fn process(&self) -> &Proc {
        &self.proc
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

    /// `GET /v1/models/{model_name}` as JSON.
    pub fn info(&self) -> Option<serde_json::Value> {
        let (status, body) = self.get(&format!("/v1/models/{}", self.model_name))?;
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

/// What an [`EventStream`] produces, and where; what is left out is the
/// default (as fast as possible, without end, no more arguments).
#[derive(Default)]
pub struct StreamSpec<'a> {
    pub topic: &'a str,
    /// Events per second; `None`: as fast as possible.
    pub rate: Option<f64>,
    /// Events; `None`: without end.
    pub count: Option<u64>,
    /// The model configuration `produce` validates against.
    pub env: &'a [(String, String)],
    /// More arguments of `tributary generate` (the stream, its seed).
    pub generate: &'a [String],
    /// More arguments of `tributary produce` (the partitioning).
    pub produce: &'a [String],
}

impl EventStream {
    /// Starts `tributary generate | tributary produce` as `spec` says, both
    /// logging to `log`.
    pub fn start(bin: &Path, brokers: &str, spec: &StreamSpec, log: &Path) -> anyhow::Result<EventStream> {
        let StreamSpec { topic, rate, count, env, .. } = *spec;
        let mut generate = Command::new(bin);
        generate.arg("generate").args(spec.generate).envs(env.iter().cloned());
        if let Some(rate) = rate {
            generate.args(["--rate", &rate.to_string()]);
        }
        if let Some(count) = count {
            generate.args(["--count", &count.to_string()]);
        }
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
        let mut generate =
            generate.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file.try_clone()?).spawn()?;
        let pipe = generate.stdout.take().expect("piped stdout");
        let produce = Command::new(bin)
            .args(["produce", "--brokers", brokers, "--topic", topic])
            .args(spec.produce)
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

/// A Prometheus text exposition, for reading counters and histograms: the
/// one parser of the load tool and the tests. Empty (`default`) when a
/// replica did not answer.
#[derive(Debug, Default)]
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

    /// How many series of `name` there are (one per label set).
    pub fn series(&self, name: &str) -> usize {
        self.0.iter().filter(|(n, _, _)| n == name).count()
    }

    /// The upper bound of the bucket that holds quantile `q` of every
    /// observation of histogram `name` so far (None: no observations).
    pub fn quantile(&self, name: &str, q: f64) -> Option<f64> {
        histogram_quantile(&Scrape(Vec::new()), self, name, q)
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
        // Over every observation: 5 of 10 <= 0.01, 9 <= 0.1.
        assert_eq!(s.quantile("x_seconds", 0.5), Some(0.01));
        assert_eq!(s.quantile("x_seconds", 0.9), Some(0.1));
    }

    #[test]
    fn quantiles_come_from_the_difference_of_two_scrapes() {
        let before = Scrape::parse(
            "x_seconds_bucket{le=\"0.01\"} 5\nx_seconds_bucket{le=\"0.1\"} 5\nx_seconds_bucket{le=\"+Inf\"} 5\n",
        );
        let after = Scrape::parse(TEXT);
        // Between the scrapes: 4 observations <= 0.1, 1 above.
        assert_eq!(histogram_quantile(&before, &after, "x_seconds", 0.5), Some(0.1));
        assert_eq!(histogram_quantile(&before, &after, "x_seconds", 0.99), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(&after, &after, "x_seconds", 0.5), None);
    }
}
