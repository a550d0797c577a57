//! A test cluster of real `redpacket-node` processes on 127.0.0.1, each with its own data
//! directory and port, for end-to-end tests. Nodes can be killed with SIGKILL, stopped with
//! SIGTERM and restarted on the same data. Everything is torn down when the cluster drops.

pub mod chaos;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::ExitStatus;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use anyhow::bail;
use redpacket_client::Client;
use redpacket_client::NodeStatus;
use redpacket_client::RetryPolicy;
use redpacket_node::config::NodeConfig;
use redpacket_node::config::RaftSettings;
use redpacket_node::packet::Limits;
use tokio::time::Instant;

static DEPOSITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Settings of a test cluster.
#[derive(Clone)]
pub struct ClusterSpec {
    pub nodes: u64,
    pub groups: u32,
    pub raft: RaftSettings,
    pub limits: Limits,
    /// Tokens (default: none, authentication off). The harness's clients use the first
    /// admin token.
    pub auth: redpacket_node::auth::AuthSettings,
    /// Run every connection over TLS, with certificates generated for the test.
    pub tls: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 3,
            groups: 4,
            raft: RaftSettings {
                heartbeat_ms: 100,
                election_timeout_min_ms: 800,
                election_timeout_max_ms: 1600,
                balance_interval_ms: 1000,
                ..RaftSettings::default()
            },
            limits: Limits::default(),
            auth: Default::default(),
            tls: false,
        }
    }
}

/// A CA and one certificate for "localhost" and 127.0.0.1 signed by it, written as PEM files.
pub fn generate_tls(dir: &std::path::Path) -> anyhow::Result<redpacket_node::config::TlsSettings> {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, "redpacket test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate()?)?;
    let node_key = rcgen::KeyPair::generate()?;
    let node_params = rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let node_cert = node_params.signed_by(&node_key, &ca)?;
    let settings = redpacket_node::config::TlsSettings {
        cert_file: dir.join("node.pem"),
        key_file: dir.join("node.key"),
        ca_file: dir.join("ca.pem"),
        server_name: "localhost".into(),
    };
    std::fs::write(&settings.cert_file, node_cert.pem())?;
    std::fs::write(&settings.key_file, node_key.serialize_pem())?;
    std::fs::write(&settings.ca_file, ca.pem())?;
    Ok(settings)
}

pub struct TestNode {
    pub id: u64,
    pub addr: String,
    /// Where the node serves Prometheus `/metrics`.
    pub metrics_addr: String,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

/// The payment ledger process of a test cluster.
pub struct TestLedger {
    pub addr: String,
    pub log_path: PathBuf,
    data_dir: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub nodes: BTreeMap<u64, TestNode>,
    pub ledger: TestLedger,
    pub spec: ClusterSpec,
    /// TLS settings in use, if the spec asked for TLS.
    pub tls: Option<redpacket_node::config::TlsSettings>,
    dir: tempfile::TempDir,
}

/// The node binary: `REDPACKET_NODE_BIN` if set, else `rp-test-node` from this build's
/// target directory (cargo builds a package's binaries before running its tests).
pub fn node_binary() -> PathBuf {
    test_binary("REDPACKET_NODE_BIN", "rp-test-node")
}

fn payment_binary() -> PathBuf {
    test_binary("REDPACKET_PAYMENT_BIN", "rp-test-payment")
}

fn test_binary(env: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test binary> or target/<profile>/<binary>  ->  target/<profile>/<name>
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir.join(name)
}

/// SIGTERM to every process at once, then waits (without blocking the test's runtime: the
/// clients' connections must keep running for the stopping servers to close them) until each
/// has exited, and gives their exit statuses. A process still running after 60 s is a failed
/// graceful stop: every such one is killed, so none outlives the test, and this errs naming them.
pub async fn stop_gracefully(mut processes: Vec<(String, Child)>) -> anyhow::Result<Vec<(String, ExitStatus)>> {
    for (_, child) in &processes {
        // An error here means the process is gone already, which the wait sees.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM);
    }
    let mut exited = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        let mut running = Vec::new();
        for (name, mut child) in processes {
            match child.try_wait() {
                Ok(Some(status)) => exited.push((name, status)),
                _ => running.push((name, child)),
            }
        }
        processes = running;
        if processes.is_empty() {
            return Ok(exited);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hung: Vec<String> = processes.iter().map(|(name, _)| name.clone()).collect();
    for (_, child) in &mut processes {
        let _ = child.kill();
        let _ = child.wait();
    }
    anyhow::bail!("{hung:?} did not stop within 60 s of SIGTERM")
}

fn spawn(binary: &PathBuf, args: &[&std::ffi::OsStr], log_path: &PathBuf) -> anyhow::Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
    Command::new(binary)
        .args(args)
        .env("RUST_LOG", std::env::var("REDPACKET_TEST_LOG").unwrap_or_else(|_| "info,openraft=warn".into()))
        .env_remove("RUST_BACKTRACE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))
}

/// Loopback ports are handed out from this range, below Linux's ephemeral range (32768 and
/// up), so neither the kernel's choice for a client connection nor `bind(0)` can take one.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A loopback port that no other cluster of this test process was or will be given.
///
/// Asking the kernel (`bind(0)`) is not enough: a port is free again the moment a node is
/// killed, so a cluster started by a test running alongside could take the port of a node
/// that is down for a restart, and the restarted node would not get it back. Ports here come
/// from a counter instead, each probed with a bind first (another process may hold it); the
/// counter starts at an offset derived from the process id, so two test processes on the same
/// machine start far apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::AtomicU32;
    use std::sync::atomic::Ordering;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    let _ = NEXT.compare_exchange(u32::MAX, std::process::id().wrapping_mul(97) % span, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_RANGE.start + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {PORT_RANGE:?}");
}

impl Cluster {
    /// Starts the nodes and bootstraps the cluster; returns once every group has a leader.
    pub async fn start(spec: ClusterSpec) -> anyhow::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix("redpacket-e2e-").tempdir()?;
        let ledger = TestLedger {
            addr: format!("127.0.0.1:{}", free_port()),
            log_path: dir.path().join("payment.log"),
            data_dir: dir.path().join("payment"),
            child: None,
        };
        let tls = if spec.tls { Some(generate_tls(dir.path())?) } else { None };
        let mut nodes = BTreeMap::new();
        for id in 1..=spec.nodes {
            let port = free_port();
            let mut config = NodeConfig::local(id, port, dir.path().join(format!("node-{id}")));
            config.groups = spec.groups;
            config.raft = spec.raft.clone();
            config.limits = spec.limits.clone();
            config.auth = spec.auth.clone();
            config.tls = tls.clone();
            let metrics_addr = format!("127.0.0.1:{}", free_port());
            config.metrics_addr = Some(metrics_addr.parse()?);
            config.payment.endpoint = ledger.addr.clone();
            config.payment.settle_interval_ms = 100;
            config.payment.fund_timeout_ms = 3000;
            let config_path = dir.path().join(format!("node-{id}.toml"));
            std::fs::write(&config_path, toml::to_string(&config)?)?;
            let log_path = dir.path().join(format!("node-{id}.log"));
            nodes.insert(id, TestNode { id, addr: config.advertise_addr(), metrics_addr, config_path, log_path, child: None });
        }
        let mut cluster = Cluster { nodes, ledger, spec, tls, dir };
        cluster.start_ledger()?;
        for id in cluster.node_ids() {
            cluster.start_node(id)?;
        }
        for id in cluster.node_ids() {
            cluster.wait_serving(id).await?;
        }
        let members: Vec<(u64, String)> = cluster.nodes.values().map(|n| (n.id, n.addr.clone())).collect();
        cluster.client().init_cluster(&members).await?;
        cluster.wait_all_leaders().await?;
        Ok(cluster)
    }

    pub fn node_ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Configures a brand-new node `id` (own port, empty data) and starts it, without joining
    /// it to the cluster: that is `add_node`'s job. Returns its address.
    pub fn spawn_new_node(&mut self, id: u64) -> anyhow::Result<String> {
        if self.nodes.contains_key(&id) {
            bail!("node {id} exists");
        }
        let port = free_port();
        let mut config = NodeConfig::local(id, port, self.dir.path().join(format!("node-{id}")));
        config.groups = self.spec.groups;
        config.raft = self.spec.raft.clone();
        config.limits = self.spec.limits.clone();
        config.auth = self.spec.auth.clone();
        config.tls = self.tls.clone();
        let metrics_addr = format!("127.0.0.1:{}", free_port());
        config.metrics_addr = Some(metrics_addr.parse()?);
        config.payment.endpoint = self.ledger.addr.clone();
        config.payment.settle_interval_ms = 100;
        config.payment.fund_timeout_ms = 3000;
        let config_path = self.dir.path().join(format!("node-{id}.toml"));
        std::fs::write(&config_path, toml::to_string(&config)?)?;
        let log_path = self.dir.path().join(format!("node-{id}.log"));
        let addr = config.advertise_addr();
        self.nodes.insert(id, TestNode { id, addr: addr.clone(), metrics_addr, config_path, log_path, child: None });
        self.start_node(id)?;
        Ok(addr)
    }

    /// Starts (or restarts) node `id` on its data directory.
    pub fn start_node(&mut self, id: u64) -> anyhow::Result<()> {
        let node = self.nodes.get_mut(&id).context("no such node")?;
        if node.child.is_some() {
            bail!("node {id} is already running");
        }
        let child = spawn(&node_binary(), &["--config".as_ref(), node.config_path.as_os_str()], &node.log_path)?;
        node.child = Some(child);
        Ok(())
    }

    /// Starts (or restarts) the payment ledger on its data directory.
    pub fn start_ledger(&mut self) -> anyhow::Result<()> {
        let l = &mut self.ledger;
        if l.child.is_some() {
            bail!("the ledger is already running");
        }
        let args = ["--listen-addr".as_ref(), l.addr.as_ref(), "--data-dir".as_ref(), l.data_dir.as_os_str()];
        l.child = Some(spawn(&payment_binary(), &args, &l.log_path)?);
        Ok(())
    }

    /// SIGKILLs the payment ledger.
    pub fn kill_ledger(&mut self) {
        if let Some(mut child) = self.ledger.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A client of the payment ledger.
    pub fn ledger(&self) -> redpacket_client::ledger::Ledger {
        redpacket_client::ledger::Ledger::connect(&self.ledger.addr).expect("ledger client")
    }

    /// Gives `account` money in the ledger (waiting for the ledger to be up).
    pub async fn deposit(&self, account: &str, cents: u64) -> anyhow::Result<()> {
        let id = format!("test-deposit:{account}:{cents}:{}", DEPOSITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.ledger().deposit(&id, account, cents).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!("deposit: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Runs `reconcile` until no transfer is pending (or 30 s pass) and returns the report.
    pub async fn settled_reconcile(&self) -> anyhow::Result<redpacket_client::ReconcileReport> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let report = self.client().reconcile().await?;
            if report.pending_transfers == 0 || Instant::now() > deadline {
                return Ok(report);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// SIGKILL: the process dies at once, as on a power cut (nothing is flushed by it).
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits (without blocking the test's runtime) for the process to exit; a
    /// node still running after 60 s is a failed graceful stop: it is killed, and this errs.
    pub async fn terminate(&mut self, id: u64) -> anyhow::Result<()> {
        self.terminate_all(&[id]).await
    }

    /// SIGTERM to every node of `ids` at once (as when a whole cluster is shut down), then
    /// waits for each as [`Cluster::terminate`] does.
    pub async fn terminate_all(&mut self, ids: &[u64]) -> anyhow::Result<()> {
        let stopping = ids
            .iter()
            .filter_map(|id| Some((format!("node {id}"), self.nodes.get_mut(id)?.child.take()?)))
            .collect();
        stop_gracefully(stopping).await.map(|_| ())
    }

    /// Stops tracking node `id` (after it was removed from the cluster and stopped).
    pub fn forget_node(&mut self, id: u64) {
        self.kill(id);
        self.nodes.remove(&id);
    }

    /// SIGSTOP: the process freezes (a long GC-like pause), holding its sockets open.
    pub fn pause(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGSTOP)
    }

    /// SIGCONT: a paused process resumes.
    pub fn resume(&self, id: u64) -> anyhow::Result<()> {
        self.signal(id, nix::sys::signal::Signal::SIGCONT)
    }

    fn signal(&self, id: u64, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self.nodes.get(&id).and_then(|n| n.child.as_ref()).context("node not running")?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)?;
        Ok(())
    }

    pub fn ledger_running(&self) -> bool {
        self.ledger.child.is_some()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.child.is_some())
    }

    /// How the harness's clients connect: TLS when on, the first admin token when set.
    pub fn connect_options(&self) -> redpacket_client::ConnectOptions {
        redpacket_client::ConnectOptions {
            token: self.spec.auth.admin_tokens.first().cloned(),
            tls_ca_pem: self.tls.as_ref().map(|t| std::fs::read(&t.ca_file).expect("ca file")),
            tls_server_name: self.tls.as_ref().map(|t| t.server_name.clone()),
        }
    }

    /// A client over every node.
    pub fn client(&self) -> Client {
        Client::connect_with(self.nodes.values().map(|n| n.addr.as_str()), self.connect_options())
            .expect("client")
            .with_retry_policy(RetryPolicy { deadline: Duration::from_secs(60), ..RetryPolicy::default() })
    }

    /// The group of the packet `sender`'s request `request_id` creates.
    pub fn group_of_request(&self, sender: &str, request_id: &str) -> u32 {
        redpacket_node::packet::PacketId::derive(sender, request_id, 0).group(self.spec.groups)
    }

    /// A client talking to node `id` only.
    pub fn client_of(&self, id: u64) -> Client {
        Client::connect_with([self.nodes[&id].addr.as_str()], self.connect_options()).expect("client")
    }

    pub async fn status_of(&self, id: u64) -> anyhow::Result<NodeStatus> {
        let (_, status) = self.client_of(id).cluster_status().await.pop().context("no status")?;
        Ok(status?)
    }

    pub async fn wait_serving(&self, id: u64) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut last = None;
        while Instant::now() < deadline {
            match self.status_of(id).await {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("node {id} did not start serving (last error: {last:?}); log:\n{}", self.log_tail(id))
    }

    /// Waits until every running node sees a leader for every group, node by node: each is
    /// read until it shows one, and a node already passed is not read again (a leadership
    /// that moves later is not waited for).
    pub async fn wait_all_leaders(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        for id in self.node_ids().into_iter().filter(|id| self.is_running(*id)) {
            self.status_with_all_leaders(id, deadline).await?;
        }
        Ok(())
    }

    /// Node `id`'s status, read again until it shows a leader for every group (a group shows
    /// none while it elects one or moves its leadership), up to `deadline`.
    pub async fn status_with_all_leaders(&self, id: u64, deadline: Instant) -> anyhow::Result<NodeStatus> {
        loop {
            let last = match self.status_of(id).await {
                Ok(s) if s.groups.iter().all(|g| g.leader.is_some()) => return Ok(s),
                other => other,
            };
            if Instant::now() >= deadline {
                bail!("node {id} did not see a leader for every group in time (last status: {last:?})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The leader of `group` as seen by a running node that knows one.
    pub async fn leader_of(&self, group: u32) -> anyhow::Result<u64> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            for id in self.node_ids().into_iter().filter(|id| self.is_running(*id)) {
                if let Ok(s) = self.status_of(id).await
                    && s.groups.iter().any(|g| g.group == group && g.role == "leader")
                {
                    return Ok(id);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("group {group} has no leader")
    }

    /// The text a node serves at `/metrics`.
    pub async fn scrape(&self, id: u64) -> anyhow::Result<String> {
        use tokio::io::AsyncReadExt;
        use tokio::io::AsyncWriteExt;
        let mut conn = tokio::net::TcpStream::connect(&self.nodes[&id].metrics_addr).await?;
        conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
        let mut body = String::new();
        conn.read_to_string(&mut body).await?;
        Ok(body)
    }

    /// The last lines a node wrote to its log, for failure messages.
    /// Keeps the cluster's data and node logs after it is dropped (for a failed run to be
    /// inspected) and gives their directory.
    pub fn keep_files(&mut self) -> PathBuf {
        let path = self.dir.path().to_path_buf();
        let _ = std::mem::replace(&mut self.dir, tempfile::TempDir::new().expect("tempdir")).keep();
        path
    }

    pub fn log_tail(&self, id: u64) -> String {
        let text = std::fs::read_to_string(&self.nodes[&id].log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for id in self.node_ids() {
            let _ = self.resume(id);
            self.kill(id);
        }
        self.kill_ledger();
        if std::thread::panicking() {
            let path = self.keep_files();
            eprintln!("test cluster data and node logs kept in {}", path.display());
        }
    }
}
