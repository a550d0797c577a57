//! A local cluster for the load generator: three node processes and the payment ledger,
//! spawned from this very binary (`redpacket-bench serve-node` / `serve-payment`), on free
//! loopback ports, with limits raised for benchmark-sized packets.

use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use redpacket_client::Client;
use redpacket_node::config::NodeConfig;

pub struct LocalCluster {
    pub endpoints: Vec<String>,
    /// The nodes' Prometheus endpoints.
    pub metrics: Vec<std::net::SocketAddr>,
    pub ledger: String,
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalCluster {
    pub async fn start(nodes: u64, groups: u32) -> anyhow::Result<LocalCluster> {
        let dir = tempfile::Builder::new().prefix("redpacket-bench-").tempdir()?;
        let exe = std::env::current_exe()?;
        let ledger = format!("127.0.0.1:{}", free_port()?);
        let mut children = Vec::new();
        let log = |name: &str| -> anyhow::Result<Stdio> { Ok(std::fs::File::create(dir.path().join(name))?.into()) };
        children.push(
            Command::new(&exe)
                .args(["serve-payment", "--listen-addr", &ledger, "--data-dir"])
                .arg(dir.path().join("payment"))
                .stderr(log("payment.log")?)
                .stdout(Stdio::null())
                .spawn()?,
        );
        let mut endpoints = Vec::new();
        let mut metrics = Vec::new();
        for id in 1..=nodes {
            let mut config = NodeConfig::local(id, free_port()?, dir.path().join(format!("node-{id}")));
            config.groups = groups;
            config.limits.max_shares = 100_000;
            config.limits.max_total_cents = 1_000_000_000_000;
            config.payment.endpoint = ledger.clone();
            let metrics_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            config.metrics_addr = Some(metrics_addr);
            metrics.push(metrics_addr);
            let path: PathBuf = dir.path().join(format!("node-{id}.toml"));
            std::fs::write(&path, toml::to_string(&config)?)?;
            endpoints.push(config.advertise_addr());
            children.push(
                Command::new(&exe)
                    .arg("serve-node")
                    .arg("--config")
                    .arg(&path)
                    .env("RUST_LOG", "warn")
                    .stderr(log(&format!("node-{id}.log"))?)
                    .stdout(Stdio::null())
                    .spawn()?,
            );
        }
        let cluster = LocalCluster { endpoints, metrics, ledger, children, _dir: dir };
        let client = Client::connect(&cluster.endpoints)?;
        let mut members = Vec::new();
        for _ in 0..300 {
            members.clear();
            for (_, s) in client.cluster_status().await {
                if let Ok(s) = s {
                    members.push((s.node_id, s.addr));
                }
            }
            if members.len() == nodes as usize {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::ensure!(members.len() == nodes as usize, "the local nodes did not start");
        client.init_cluster(&members).await.context("init")?;
        // Wait until every group has a leader everywhere.
        for _ in 0..300 {
            let all = client.cluster_status().await;
            if all.iter().all(|(_, s)| s.as_ref().is_ok_and(|s| s.groups.iter().all(|g| g.leader.is_some()))) {
                return Ok(cluster);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("the local cluster did not elect leaders")
    }
}

/// Counters summed over the nodes, read from their `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClusterFigures {
    pub wal_syncs: f64,
    pub batches: f64,
    pub batched_ops: f64,
    pub admission_refused: f64,
}

impl ClusterFigures {
    /// Grabs and opens per `Batch` log entry.
    pub fn ops_per_entry(&self) -> f64 {
        self.batched_ops / self.batches.max(1.0)
    }

    pub fn since(self, before: ClusterFigures) -> ClusterFigures {
        ClusterFigures {
            wal_syncs: self.wal_syncs - before.wal_syncs,
            batches: self.batches - before.batches,
            batched_ops: self.batched_ops - before.batched_ops,
            admission_refused: self.admission_refused - before.admission_refused,
        }
    }
}

impl LocalCluster {
    /// Reads the nodes' counters (a plain HTTP/1.0 GET: a client crate for four numbers
    /// is not worth its build time).
    pub async fn figures(&self) -> anyhow::Result<ClusterFigures> {
        use tokio::io::AsyncReadExt;
        use tokio::io::AsyncWriteExt;
        async fn scrape(addr: &std::net::SocketAddr) -> std::io::Result<String> {
            let mut stream = tokio::net::TcpStream::connect(addr).await?;
            stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
            let mut text = String::new();
            stream.read_to_string(&mut text).await?;
            Ok(text)
        }
        let mut f = ClusterFigures::default();
        for addr in &self.metrics {
            // A read once ended in "connection reset by peer" (a compare run on 2026-12-04)
            // and failed the run; the counters only grow, so reading again is harmless.
            let mut attempt = 1;
            let text = loop {
                match scrape(addr).await {
                    Ok(text) => break text,
                    Err(e) if attempt == 3 => anyhow::bail!("reading {addr}/metrics: {e}"),
                    Err(_) => attempt += 1,
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            };
            for line in text.lines().filter(|l| !l.starts_with('#')) {
                let (Some(name), Some(value)) = (line.split(['{', ' ']).next(), line.rsplit(' ').next()) else { continue };
                let value: f64 = value.parse().unwrap_or(0.0);
                match name {
                    "redpacket_wal_syncs_total" => f.wal_syncs += value,
                    "redpacket_batch_operations_count" => f.batches += value,
                    "redpacket_batch_operations_sum" => f.batched_ops += value,
                    "redpacket_admission_refused_total" => f.admission_refused += value,
                    _ => {}
                }
            }
        }
        Ok(f)
    }

    /// A meter of this process (`client`), the nodes (`nodes`) and the ledger (`ledger`).
    pub fn cpu_meter(&self) -> crate::cpu::CpuMeter {
        let mut meter = crate::cpu::CpuMeter::this_process();
        // The ledger is spawned first, then the nodes.
        for (i, child) in self.children.iter().enumerate() {
            meter.watch(if i == 0 { "ledger" } else { "nodes" }, child.id());
        }
        meter
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
