//! Chaos testing in the style of Jepsen: a workload, a nemesis, a history, a checker, run
//! against a cluster of real processes. `run` executes one scenario and returns its report;
//! the `redpacket-chaos` binary runs long ones, and `cargo test` runs short ones.

pub mod checker;
pub mod history;
pub mod nemesis;
pub mod workload;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use redpacket_client::NewPacket;
use redpacket_client::Packet;
use redpacket_client::Recipients;
use redpacket_client::RetryPolicy;
use tokio::time::Instant;

use self::history::History;
use self::history::Outcome;
use self::nemesis::Fault;
use crate::Cluster;
use crate::ClusterSpec;

/// One chaos run's settings. The seed fixes the workload's choices and the nemesis's
/// schedule, so a failed run can be repeated.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub nodes: u64,
    pub duration: Duration,
    pub faults: Vec<Fault>,
    pub seed: u64,
    pub workers: usize,
    pub out_dir: PathBuf,
}

#[derive(Debug)]
pub struct Report {
    pub problems: Vec<String>,
    pub operations: usize,
    pub acknowledged: usize,
    pub refused: usize,
    pub unknown: usize,
    pub faults: BTreeMap<&'static str, u32>,
    /// Sum over groups of the final term: elections and leader hand-overs.
    pub terms: u64,
    /// The final term of each group.
    pub term_by_group: BTreeMap<u32, u64>,
    pub reconcile: Option<redpacket_client::ReconcileReport>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} operations ({} acknowledged, {} refused, {} unknown) · faults {:?} · final term per group {:?}",
            self.operations, self.acknowledged, self.refused, self.unknown, self.faults, self.term_by_group
        );
        if let Some(r) = &self.reconcile {
            s.push_str(&format!(
                " · reconcile: {} packets, {} transfers, funded {} paid {} refunded {} cents, {} mismatches",
                r.packets, r.transfers, r.funded_cents, r.paid_cents, r.refunded_cents, r.mismatches.len()
            ));
        }
        s.push_str(if self.ok() { "\nverdict: every check passed" } else { "\nverdict: FAILED" });
        for p in &self.problems {
            s.push_str(&format!("\n  - {p}"));
        }
        s
    }
}

pub async fn run(scenario: &Scenario) -> anyhow::Result<Report> {
    std::fs::create_dir_all(&scenario.out_dir)?;
    let spec = ClusterSpec { nodes: scenario.nodes, ..ClusterSpec::default() };
    let mut cluster = Cluster::start(spec).await?;
    for sender in workload::SENDERS {
        cluster.deposit(sender, 1_000_000_000).await?;
    }
    let client = cluster.client().with_retry_policy(RetryPolicy { deadline: Duration::from_secs(10), ..RetryPolicy::default() });
    let hot = client.create_packet(NewPacket::lucky(workload::SENDERS[0], 10_000, 100, Recipients::Anyone)).await?;
    let history = History::default();
    let known = Arc::new(Mutex::new(workload::Known::default()));
    let deadline = Instant::now() + scenario.duration;

    let workers: Vec<_> = (0..scenario.workers)
        .map(|i| {
            tokio::spawn(workload::worker(i, scenario.seed, client.clone(), history.clone(), known.clone(), hot.packet_id.clone(), deadline))
        })
        .collect();
    let faults = nemesis::run(&mut cluster, &scenario.faults, scenario.seed, hot.group, &history, deadline).await;
    for w in workers {
        w.await?;
    }

    // Heal everything, let the cluster settle, then read the final state.
    for id in cluster.node_ids() {
        let _ = cluster.resume(id);
        if !cluster.is_running(id) {
            cluster.start_node(id)?;
        }
    }
    if !cluster.ledger_running() {
        cluster.start_ledger()?;
    }
    cluster.wait_all_leaders().await?;
    let mut problems = Vec::new();
    let reconcile = settle(&cluster).await;
    match &reconcile {
        Ok(r) => {
            for m in &r.mismatches {
                problems.push(format!("reconcile: packet {} transfer {}: {}", m.packet_id, m.transfer_id, m.problem));
            }
            if r.pending_transfers > 0 {
                problems.push(format!("reconcile: {} transfers still pending after the cluster settled", r.pending_transfers));
            }
            if !r.ledger_conserved {
                problems.push("reconcile: the ledger does not conserve money".into());
            }
        }
        Err(e) => problems.push(format!("reconcile failed: {e}")),
    }

    let events = history.events();
    history.write(&scenario.out_dir.join("history.jsonl"))?;
    let mut ids: Vec<String> = events
        .iter()
        .filter_map(|e| match &e.outcome {
            Outcome::Created { packet_id } => Some(packet_id.clone()),
            _ => e.op.packet_id().map(String::from),
        })
        .collect();
    ids.sort();
    ids.dedup();
    let reader = cluster.client();
    let mut packets: HashMap<String, Packet> = HashMap::new();
    for id in ids {
        match reader.get_packet(&id).await {
            Ok(p) => {
                packets.insert(id, p);
            }
            Err(redpacket_client::Error::NotFound(_)) => {}
            Err(e) => problems.push(format!("reading packet {id}: {e}")),
        }
    }
    problems.extend(checker::check(&events, &packets).problems);
    problems.extend(replicas_agree(&cluster).await);

    // The highest term any node reports for each group, summed: elections and hand-overs.
    let mut term_of: BTreeMap<u32, u64> = BTreeMap::new();
    for id in cluster.node_ids() {
        if let Ok(s) = cluster.status_of(id).await {
            for g in s.groups {
                let t = term_of.entry(g.group).or_default();
                *t = (*t).max(g.term);
            }
        }
    }
    if !problems.is_empty() {
        problems.push(format!("node logs and data kept in {}", cluster.keep_files().display()));
    }
    let terms = term_of.values().sum();
    let hot_group = hot.group;
    tracing::info!(hot_group, "final terms: {term_of:?}");
    let count = |f: fn(&Outcome) -> bool| events.iter().filter(|e| e.op.packet_id().is_some() || matches!(e.op, history::Op::Create { .. })).filter(|e| f(&e.outcome)).count();
    let report = Report {
        operations: count(|_| true),
        acknowledged: count(|o| !matches!(o, Outcome::Fail { .. } | Outcome::Unknown { .. })),
        refused: count(|o| matches!(o, Outcome::Fail { .. })),
        unknown: count(|o| matches!(o, Outcome::Unknown { .. })),
        problems,
        faults,
        terms,
        term_by_group: term_of,
        reconcile: reconcile.ok(),
    };
    std::fs::write(scenario.out_dir.join("verdict.txt"), report.summary())?;
    Ok(report)
}

/// Waits until every transfer settled (or a minute passed); returns the last reconcile.
async fn settle(cluster: &Cluster) -> anyhow::Result<redpacket_client::ReconcileReport> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = cluster.client().reconcile().await;
        match r {
            Ok(r) if r.pending_transfers == 0 || Instant::now() > deadline => return Ok(r),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// A replica's node id, last applied index and state digest.
type Replica = (u64, Option<u64>, Option<u64>);

/// Every group's replicas reach the same applied index with the same state digest.
async fn replicas_agree(cluster: &Cluster) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut by_group: BTreeMap<u32, Vec<Replica>> = BTreeMap::new();
        for id in cluster.node_ids() {
            let client = cluster.client_of(id);
            if let Some((_, Ok(status))) = client.cluster_status_with(true).await.pop() {
                for g in status.groups {
                    by_group.entry(g.group).or_default().push((id, g.last_applied, g.state_digest));
                }
            }
        }
        let disagree: Vec<String> = by_group
            .iter()
            .filter(|(_, replicas)| {
                replicas.len() != cluster.node_ids().len() || replicas.windows(2).any(|w| (w[0].1, w[0].2) != (w[1].1, w[1].2))
            })
            .map(|(g, replicas)| format!("group {g}: replicas (node, applied, digest) disagree: {replicas:?}"))
            .collect();
        if disagree.is_empty() || Instant::now() > deadline {
            return disagree;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
