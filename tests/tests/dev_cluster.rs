//! The README's first command, `redpacket-node dev`: a whole local cluster, bootstrapped, that
//! takes money and packets at once, keeps its data for the next start, and stops on SIGTERM.

use std::net::TcpListener;
use std::path::Path;
use std::path::PathBuf;
use std::process::Child;
use std::process::Command;
use std::time::Duration;
use std::time::Instant;

use redpacket_client::Client;
use redpacket_client::NewPacket;
use redpacket_client::Recipients;

/// Ports `dev` uses from its base: the nodes, the ledger (+99) and the metrics (+200 on).
const OFFSETS: [u16; 7] = [0, 1, 2, 99, 200, 201, 202];

/// A base port whose whole layout is free, below the range the cluster harness hands out.
/// Tests run in parallel and a layout is only checked, not held, so each call starts its
/// search at a different one.
fn free_base() -> u16 {
    static CALLS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let start = std::process::id() as u16 + CALLS.fetch_add(7, std::sync::atomic::Ordering::Relaxed);
    (0..70u16)
        .map(|i| 12_000 + ((start % 70 + i) % 70) * 100)
        .find(|base| OFFSETS.iter().all(|o| TcpListener::bind(("127.0.0.1", base + o)).is_ok()))
        .expect("no free port layout in 12000-19000")
}

/// The `dev` process and its log. Dropping it kills it outright (SIGKILL), as a crash would;
/// so a failed assertion does not leave a cluster running either, and its log's end is
/// printed, since the temporary directory holding it goes too.
struct Dev(Option<Child>, PathBuf);

impl Drop for Dev {
    fn drop(&mut self) {
        if let Some(child) = self.0.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.1).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("--- end of {} ---\n{}", self.1.display(), lines[lines.len().saturating_sub(40)..].join("\n"));
        }
    }
}

fn start_dev(data_dir: &Path, base: u16, log_path: &Path) -> Dev {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path).unwrap();
    Command::new(redpacket_tests::node_binary())
        .args(["dev", "--data-dir"])
        .arg(data_dir)
        .args(["--base-port", &base.to_string(), "--nodes", "3"])
        .env("RUST_LOG", "warn")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .map(|child| Dev(Some(child), log_path.to_path_buf()))
        .expect("start rp-test-node dev")
}

/// Sends SIGTERM and waits for a clean exit.
async fn stop(mut dev: Dev) {
    let child = dev.0.take().expect("running");
    let exited = redpacket_tests::stop_gracefully(vec![("dev cluster".into(), child)]).await.unwrap();
    let status = exited[0].1;
    assert!(status.success(), "dev cluster exited with {status}");
}

/// Retries `op` for up to 60 s: the cluster elects its leaders after it says it is up.
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match op().await {
            Ok(value) => return value,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{what}: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Starts `dev`, funds alice and has her send a packet of 3 dollars that three users open.
async fn start_with_a_packet(data: &Path, base: u16, log: &Path) -> (Dev, Vec<String>, redpacket_client::Packet) {
    let endpoints: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
    let dev = start_dev(data, base, log);
    let ledger = redpacket_client::ledger::Ledger::connect(&format!("127.0.0.1:{}", base + 99)).unwrap();
    eventually("deposit", || async { Ok(ledger.deposit("dev-test-deposit", "alice", 1_000).await?) }).await;
    let client = Client::connect(&endpoints).unwrap();
    let packet = eventually("create", || async {
        let mut new = NewPacket::lucky("alice", 300, 3, Recipients::Anyone);
        new.request_id = "dev-test-packet".into();
        Ok(client.create_packet(new).await?)
    })
    .await;
    let mut total = 0;
    for user in ["bob", "carol", "dave"] {
        total += client.grab_and_open(&packet.packet_id, user).await.unwrap().amount_cents;
    }
    assert_eq!(total, 300, "the three shares add up to the packet");
    (dev, endpoints, packet)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_cluster_takes_packets_and_keeps_them_across_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("dev.log"));
    let base = free_base();
    let (dev, endpoints, packet) = start_with_a_packet(&data, base, &log).await;
    drop(dev); // a crash

    // The same command again reuses the data: no second bootstrap, the packet is still there.
    let dev = start_dev(&data, base, &log);
    let client = Client::connect(&endpoints).unwrap();
    let again = eventually("read after restart", || async { Ok(client.get_packet(&packet.packet_id).await?) }).await;
    assert_eq!(again.shares_opened, 3);
    assert_eq!(again.claims.iter().filter_map(|c| c.amount_cents).sum::<u64>(), 300);
    let printed = eventually("the restart's report", || async {
        let printed = std::fs::read_to_string(&log)?;
        anyhow::ensure!(printed.matches("endpoints:").count() == 2, "not printed yet");
        Ok(printed)
    })
    .await;
    drop(dev);
    assert_eq!(printed.matches("cluster initialized").count(), 1, "{printed}");
    assert!(printed.contains("cluster already initialized; reusing its data"), "{printed}");
}

/// Every node stops at once, so none can take another's leaderships: the stop must not wait
/// for a hand-over, nor for the peers' replication streams to close (they hung it, until
/// 2026-12-02: each server's graceful stop waited for streams its stopping peers held open).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_cluster_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("data"), dir.path().join("dev.log"));
    let (dev, _, _) = start_with_a_packet(&data, free_base(), &log).await;
    stop(dev).await;
}
