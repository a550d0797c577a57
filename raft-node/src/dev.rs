//! `redpacket-node dev`: a whole local cluster in one command, for newcomers and demos.
//! Starts N nodes on 127.0.0.1 with the embedded defaults, bootstraps the cluster the first
//! time, and stops cleanly on Ctrl-C; starting again reuses the data.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::cluster_admin_client::ClusterAdminClient;

use crate::config::NodeConfig;
use crate::ledger::service::LedgerConfig;
use crate::node;

pub async fn run(dir: PathBuf, base_port: u16, nodes: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    println!("redpacket dev cluster: {nodes} nodes, data under {}", dir.display());

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut members = Vec::new();
    let mut tasks = Vec::new();

    // The payment ledger, in-process, on base_port + 99 (7100 by default).
    let ledger_addr = std::net::SocketAddr::from(([127, 0, 0, 1], base_port + 99));
    let ledger = LedgerConfig { listen_addr: ledger_addr, data_dir: dir.join("payment"), faults: Default::default() };
    let mut rx = stop_rx.clone();
    tasks.push(tokio::spawn(crate::ledger::service::run(ledger, async move {
        let _ = rx.wait_for(|stop| *stop).await;
    })));

    for id in 1..=nodes {
        let port = base_port + (id - 1) as u16;
        let mut config = NodeConfig::local(id, port, dir.join(format!("node-{id}")));
        config.payment.endpoint = ledger_addr.to_string();
        config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], base_port + 199 + id as u16)));
        // Every node stops at once, so no peer could take a leadership over.
        config.raft.stop_hand_over_ms = 0;
        members.push(pb::Member { node_id: id, addr: config.advertise_addr() });
        let mut rx = stop_rx.clone();
        tasks.push(tokio::spawn(node::run(config, async move {
            let _ = rx.wait_for(|stop| *stop).await;
        })));
    }

    // `Init` reaches every member, so each must be serving first, not only the one asked.
    let mut initialized = false;
    for member in &members {
        initialized |= wait_until_serving(&format!("http://{}", member.addr)).await?.initialized;
    }
    let first = format!("http://{}", members[0].addr);
    if initialized {
        println!("cluster already initialized; reusing its data");
    } else {
        ClusterAdminClient::connect(first.clone())
            .await?
            .init(pb::InitRequest { members: members.clone() })
            .await
            .context("bootstrapping the dev cluster")?;
        println!("cluster initialized");
    }
    let endpoints: Vec<&str> = members.iter().map(|m| m.addr.as_str()).collect();
    println!("endpoints: {}  ·  payment ledger: {ledger_addr}", endpoints.join(","));
    println!("metrics: http://127.0.0.1:{}/metrics (node 1; node N on +N-1)", base_port + 200);
    println!("try:  redpacket wallet deposit --account alice --amount 100.00");
    println!("      redpacket send --from alice --total 10.00 --shares 3 --anyone");
    println!("press Ctrl-C to stop");

    tokio::select! {
        _ = node::shutdown_signal() => {}
        // A node that fails stops the whole cluster, with its error.
        (result, _, _) = futures::future::select_all(tasks.iter_mut()) => {
            result??;
        }
    }
    println!("stopping");
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

async fn wait_until_serving(endpoint: &str) -> anyhow::Result<pb::NodeStatus> {
    for _ in 0..300 {
        if let Ok(mut c) = ClusterAdminClient::connect(endpoint.to_string()).await
            && let Ok(s) = c.status(pb::StatusRequest::default()).await
        {
            return Ok(s.into_inner());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("node at {endpoint} did not start within 30 s")
}
