//! Harness for multi-process Floe tests: find the `floe` binary, pick free loopback ports,
//! spawn `floe dev` / `floe start` processes with their output in files, wait for `/readyz`,
//! kill -9 and restart them, pause (SIGSTOP) and continue (SIGCONT) them.
//!
//! Invariants: every child process is killed and reaped when its [`FloeProcess`] is dropped
//! (also on panic, on test timeout and while it is paused: a paused one is sent SIGCONT, then
//! SIGKILL), so no test leaves an orphan or a stopped process behind; every wait loop is
//! bounded by a named timeout. Data and logs live in a per-test temporary directory that
//! outlives the processes (processes are declared before the directory so they drop first).
//!
//! Must not depend on: node internals. Tests talk to nodes only over gRPC (`floe-client`) and
//! HTTP, like users do.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use floe_client::{Client, RetryPolicy};

/// Bound on a node becoming ready (`/readyz` answers 200) after spawn.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two readiness probes.
pub const READY_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Bound on one HTTP request made by the harness or tests.
pub const HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of each log file is printed when a test fails.
pub const LOG_TAIL_BYTES: u64 = 8 * 1024;
/// Bound on retrying one-off setup calls (e.g. creating a collection) while a cluster settles.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Finds the `floe` binary: `$FLOE_BIN` if set, else the newest of
/// `{$CARGO_TARGET_DIR, <workspace>/target, the target dir this test runs from}/{release,debug}/floe`.
pub fn floe_bin() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLOE_BIN") {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("FLOE_BIN={} does not name a file", path.display());
    }
    let mut target_dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        target_dirs.push(PathBuf::from(dir));
    }
    let workspace =
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    target_dirs.push(workspace.join("target"));
    // The test executable lives in <target>/<profile>/deps/; its target dir is three up.
    if let Ok(executable) = std::env::current_exe() {
        if let Some(target) = executable.ancestors().nth(3) {
            target_dirs.push(target.to_path_buf());
        }
    }
    let mut candidates: Vec<(SystemTime, PathBuf)> = Vec::new();
    for target in &target_dirs {
        for profile in ["release", "debug"] {
            let path = target.join(profile).join("floe");
            if let Ok(metadata) = std::fs::metadata(&path) {
                if metadata.is_file() {
                    let modified = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    candidates.push((modified, path));
                }
            }
        }
    }
    candidates.sort();
    match candidates.pop() {
        Some((_, path)) => Ok(path),
        None => bail!(
            "the `floe` binary was not found (looked in {{release,debug}}/floe under {}); \
             build it first with `cargo build --release -p floe-node`, or set FLOE_BIN",
            target_dirs.iter().map(|dir| dir.display().to_string()).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// Ports handed out by this process, so two nodes of one test binary never share one.
fn ports_handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Picks `count` distinct free loopback ports. All are held open together while picking, and
/// none is handed out twice by this process. (Another process may still grab one before the
/// node binds it; that shows up as a node failing to start, with the reason in its log.)
pub fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    const PICK_ATTEMPTS_MAX: usize = 1000;
    let mut handed_out = ports_handed_out().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut listeners = Vec::with_capacity(count);
    let mut ports = Vec::with_capacity(count);
    for _ in 0..PICK_ATTEMPTS_MAX {
        if ports.len() == count {
            break;
        }
        let listener = TcpListener::bind("127.0.0.1:0").context("bind a loopback port")?;
        let port = listener.local_addr().context("local address")?.port();
        if handed_out.insert(port) {
            ports.push(port);
        }
        listeners.push(listener);
    }
    if ports.len() != count {
        bail!("could not find {count} free loopback ports");
    }
    drop(listeners);
    Ok(ports)
}

/// Builds a blocking-free HTTP client with the harness' request timeout.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HTTP_REQUEST_TIMEOUT)
        .build()
        .expect("reqwest client with default settings builds")
}

/// One `floe` child process and how to start it again.
pub struct FloeProcess {
    name: String,
    binary: PathBuf,
    args: Vec<String>,
    log_path: PathBuf,
    child: Option<Child>,
    /// True between [`FloeProcess::pause`] and [`FloeProcess::resume`] (or a kill).
    paused: bool,
    /// `127.0.0.1:port` of the gRPC listener.
    pub grpc_addr: String,
    /// `127.0.0.1:port` of the HTTP listener.
    pub http_addr: String,
}

impl FloeProcess {
    /// Spawns `floe <args>`, appending stdout and stderr to `<log_dir>/<name>.log`.
    pub fn spawn(
        name: &str,
        args: Vec<String>,
        log_dir: &Path,
        grpc_addr: String,
        http_addr: String,
    ) -> anyhow::Result<FloeProcess> {
        let mut process = FloeProcess {
            name: name.to_owned(),
            binary: floe_bin()?,
            args,
            log_path: log_dir.join(format!("{name}.log")),
            child: None,
            paused: false,
            grpc_addr,
            http_addr,
        };
        process.start()?;
        Ok(process)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is already running", self.name);
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("open {}", self.log_path.display()))?;
        writeln!(log, "=== harness: starting {} {}", self.binary.display(), self.args.join(" "))?;
        let log_err = log.try_clone()?;
        let mut command = Command::new(&self.binary);
        command.args(&self.args).stdin(Stdio::null()).stdout(Stdio::from(log)).stderr(Stdio::from(log_err));
        // Hermetic: every CLI flag also reads a FLOE_* variable; the caller's must not leak in.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLOE_") {
                command.env_remove(&key);
            }
        }
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command.spawn().with_context(|| format!("spawn {} for {}", self.binary.display(), self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// The process name used in logs and messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://host:port` for the client.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://host:port{path}` on the HTTP gateway.
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.http_addr, path)
    }

    /// True while the child has not exited.
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The child's process id while it is running (or paused).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True between [`FloeProcess::pause`] and [`FloeProcess::resume`].
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Freezes the process with SIGSTOP: it keeps its sockets and memory but runs no code, like
    /// a long GC pause or a VM stall. Undo with [`FloeProcess::resume`].
    pub fn pause(&mut self) -> anyhow::Result<()> {
        let pid = self.pid().ok_or_else(|| anyhow!("{} is not running, cannot pause it", self.name))?;
        send_signal(pid, "STOP").with_context(|| format!("pause {}", self.name))?;
        self.paused = true;
        self.log_note("paused with SIGSTOP");
        Ok(())
    }

    /// Continues a paused process with SIGCONT. No-op when it is not paused.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if !self.paused {
            return Ok(());
        }
        let pid = self.pid().ok_or_else(|| anyhow!("{} is not running, cannot resume it", self.name))?;
        send_signal(pid, "CONT").with_context(|| format!("resume {}", self.name))?;
        self.paused = false;
        self.log_note("continued with SIGCONT");
        Ok(())
    }

    fn log_note(&self, note: &str) {
        if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(log, "=== harness: {note}");
        }
    }

    /// Sends SIGKILL (kill -9) and reaps the child. No-op when it is not running. Works on a
    /// paused process too (SIGKILL is delivered to stopped processes).
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.paused = false;
        if let Some(mut child) = self.child.take() {
            // kill() fails only if the child already exited; wait() reaps it either way.
            let _ = child.kill();
            child.wait().with_context(|| format!("reap {} after kill -9", self.name))?;
            if let Ok(mut log) = OpenOptions::new().append(true).open(&self.log_path) {
                let _ = writeln!(log, "=== harness: killed with SIGKILL");
            }
        }
        Ok(())
    }

    /// Starts the process again with the same arguments (after [`FloeProcess::kill9`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9()?;
        self.start()
    }

    /// Polls `/readyz` until it answers 200, the process exits, or `timeout` passes.
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let http = http_client();
        let deadline = Instant::now() + timeout;
        let url = self.http_url("/readyz");
        loop {
            if !self.is_running() {
                bail!("{} exited before becoming ready\n{}", self.name, self.log_tail(LOG_TAIL_BYTES));
            }
            let last = match http.get(&url).timeout(Duration::from_secs(2)).send().await {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) => format!("status {}", response.status()),
                Err(error) => error.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "{} not ready within {} ms (last: {last})\n{}",
                    self.name,
                    timeout.as_millis(),
                    self.log_tail(LOG_TAIL_BYTES)
                );
            }
            tokio::time::sleep(READY_POLL_INTERVAL).await;
        }
    }

    /// The last `bytes` of the process' log, framed with its name.
    pub fn log_tail(&self, bytes: u64) -> String {
        let mut text = String::new();
        let read = File::open(&self.log_path).and_then(|mut file| {
            let length = file.metadata()?.len();
            file.seek(SeekFrom::Start(length.saturating_sub(bytes)))?;
            let mut raw = Vec::new();
            file.read_to_end(&mut raw)?;
            text = String::from_utf8_lossy(&raw).into_owned();
            Ok(())
        });
        match read {
            Ok(()) => format!(
                "----- {} ({}) -----\n{text}\n----- end {} -----",
                self.name,
                self.log_path.display(),
                self.name
            ),
            Err(error) => format!("(no log for {}: {error})", self.name),
        }
    }
}

impl Drop for FloeProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(LOG_TAIL_BYTES));
        }
        if let Some(mut child) = self.child.take() {
            if self.paused {
                // SIGKILL alone would do; continuing first lets the kill look ordinary.
                let _ = send_signal(child.id(), "CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Sends signal `name` (`STOP`, `CONT`, ...) to `pid` with the `kill` command (the crate
/// forbids `unsafe`, so no `libc::kill`).
fn send_signal(pid: u32, name: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("run `kill -{name} {pid}`"))?;
    if !status.success() {
        bail!("`kill -{name} {pid}` exited with {status}");
    }
    Ok(())
}

/// A single `floe dev` node on free ports with its data in a temporary directory.
pub struct DevNode {
    /// Declared before `dir`: the process must die before its data directory is removed.
    pub process: FloeProcess,
    dir: tempfile::TempDir,
}

impl DevNode {
    /// Starts `floe dev` and waits until it is ready.
    pub async fn start() -> anyhow::Result<DevNode> {
        let dir = tempfile::Builder::new().prefix("floe-dev-").tempdir()?;
        let ports = free_ports(2)?;
        let (grpc_port, http_port) = (ports[0], ports[1]);
        let data_dir = dir.path().join("data");
        let args = vec![
            "dev".to_owned(),
            "--data".to_owned(),
            data_dir.display().to_string(),
            "--grpc-port".to_owned(),
            grpc_port.to_string(),
            "--http-port".to_owned(),
            http_port.to_string(),
        ];
        let mut process = FloeProcess::spawn(
            "dev",
            args,
            dir.path(),
            format!("127.0.0.1:{grpc_port}"),
            format!("127.0.0.1:{http_port}"),
        )?;
        process.wait_ready(READY_TIMEOUT).await?;
        Ok(DevNode { process, dir })
    }

    /// The temporary directory holding data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client connected to this node only.
    pub fn client(&self) -> anyhow::Result<Client> {
        client_for(&[self.process.grpc_endpoint()])
    }
}

/// One member of a [`Cluster`].
pub struct ClusterNode {
    pub node_id: u64,
    pub process: FloeProcess,
}

/// `count` `floe start` processes on loopback forming one cluster.
pub struct Cluster {
    /// Declared before `dir`: processes must die before their data directories are removed.
    pub nodes: Vec<ClusterNode>,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts nodes `1..=count` with the same `--initial-cluster` and waits until all are
    /// ready.
    pub async fn start(count: usize) -> anyhow::Result<Cluster> {
        Self::start_with_args(count, &[]).await
    }

    /// Like [`Cluster::start`], with `extra_args` appended to every node's `floe start`.
    pub async fn start_with_args(count: usize, extra_args: &[&str]) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("floe-cluster-").tempdir()?;
        let ports = free_ports(2 * count)?;
        let grpc_addrs: Vec<String> = (0..count).map(|index| format!("127.0.0.1:{}", ports[2 * index])).collect();
        let http_addrs: Vec<String> = (0..count).map(|index| format!("127.0.0.1:{}", ports[2 * index + 1])).collect();
        let initial_cluster = grpc_addrs
            .iter()
            .enumerate()
            .map(|(index, addr)| format!("{}={addr}", index + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster { nodes: Vec::with_capacity(count), dir };
        for index in 0..count {
            let node_id = (index + 1) as u64;
            let data_dir = cluster.dir.path().join(format!("node{node_id}"));
            let mut args = vec![
                "start".to_owned(),
                "--node-id".to_owned(),
                node_id.to_string(),
                "--grpc-addr".to_owned(),
                grpc_addrs[index].clone(),
                "--http-addr".to_owned(),
                http_addrs[index].clone(),
                "--data-dir".to_owned(),
                data_dir.display().to_string(),
                "--initial-cluster".to_owned(),
                initial_cluster.clone(),
            ];
            args.extend(extra_args.iter().map(|a| a.to_string()));
            let process = FloeProcess::spawn(
                &format!("node{node_id}"),
                args,
                cluster.dir.path(),
                grpc_addrs[index].clone(),
                http_addrs[index].clone(),
            )?;
            cluster.nodes.push(ClusterNode { node_id, process });
        }
        for node in &mut cluster.nodes {
            node.process.wait_ready(READY_TIMEOUT).await?;
        }
        Ok(cluster)
    }

    /// The temporary directory holding data and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// gRPC endpoints of all nodes, in node id order.
    pub fn grpc_endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|node| node.process.grpc_endpoint()).collect()
    }

    /// The node with this id.
    pub fn node_mut(&mut self, node_id: u64) -> anyhow::Result<&mut ClusterNode> {
        self.nodes.iter_mut().find(|node| node.node_id == node_id).ok_or_else(|| anyhow!("no node with id {node_id}"))
    }

    /// Kills every node and keeps the temporary directory (data, logs and whatever the test
    /// wrote there) on disk instead of deleting it; returns its path. For failure reports.
    pub fn keep_dir(self) -> PathBuf {
        let Cluster { nodes, dir } = self;
        drop(nodes);
        dir.keep()
    }

    /// The log tails of all nodes, for failure messages.
    pub fn log_tails(&self) -> String {
        self.nodes.iter().map(|node| node.process.log_tail(LOG_TAIL_BYTES)).collect::<Vec<_>>().join("\n")
    }
}

/// A client over `endpoints` with settings suited to tests that kill nodes: short connect
/// timeout, bounded per-attempt timeout, and enough attempts to ride out a leader election.
pub fn client_for(endpoints: &[String]) -> anyhow::Result<Client> {
    Ok(Client::builder()
        .endpoints(endpoints.iter().cloned())
        .connect_timeout(Duration::from_secs(1))
        .request_timeout(Duration::from_secs(5))
        .retry_policy(RetryPolicy {
            attempts_max: 12,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
        })
        .build()?)
}

/// Creates `name` (existing is fine), retrying any error until `SETUP_TIMEOUT`: right after
/// start-up the cluster may still be electing its meta leader.
pub async fn ensure_collection(client: &Client, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match client.create_collection(name).await {
            Ok(_) => return Ok(()),
            Err(floe_client::Error::AlreadyExists { .. }) => return Ok(()),
            Err(error) if Instant::now() < deadline => {
                eprintln!("create_collection({name}) failed, retrying: {error}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(error) => {
                return Err(anyhow!(error)
                    .context(format!("create_collection({name}) kept failing for {} ms", SETUP_TIMEOUT.as_millis())))
            }
        }
    }
}

/// A JSON object nested `depth` levels deep: depth 1 is `{}`, depth 2 is `{"a":{}}`.
pub fn nested_object(depth: usize) -> String {
    assert!(depth >= 1, "depth counts the outermost object");
    let mut text = String::with_capacity(depth * 6);
    for _ in 1..depth {
        text.push_str("{\"a\":");
    }
    text.push_str("{}");
    for _ in 1..depth {
        text.push('}');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_object_depth() {
        assert_eq!(nested_object(1), "{}");
        assert_eq!(nested_object(3), r#"{"a":{"a":{}}}"#);
        let value: serde_json::Value = serde_json::from_str(&nested_object(60)).unwrap();
        assert!(value.is_object());
    }

    #[test]
    fn free_ports_are_distinct() {
        let mut ports = free_ports(4).unwrap();
        ports.extend(free_ports(4).unwrap());
        let unique: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(unique.len(), ports.len());
    }
}
