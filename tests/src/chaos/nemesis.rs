//! The nemesis: faults injected on a seeded schedule while the workload runs. Each fault is
//! applied, held for a while, then healed; every step is written to the history.

use std::time::Duration;

use rand::RngExt;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use super::history::History;
use super::history::Op;
use super::history::Outcome;
use crate::Cluster;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL the leader of the hot packet's group, restart it after a while.
    KillLeader,
    /// SIGKILL a follower of that group.
    KillFollower,
    /// SIGKILL two nodes at once (five-node clusters).
    KillTwo,
    /// SIGSTOP the leader (a long GC-like pause), then SIGCONT.
    Pause,
    /// Kill the payment ledger, restart it after a while.
    Ledger,
    /// Cut the leader's Raft traffic both ways (a partition isolating it from its
    /// followers), then heal it. Simulated inside the node (`raft-isolate` failpoint): its
    /// clients still reach it, which is the interesting case for a stale leader.
    Partition,
    /// Add a fresh node to every group during the load, later remove it again.
    Membership,
}

impl Fault {
    pub fn parse(s: &str) -> Option<Fault> {
        Some(match s {
            "kill-leader" => Fault::KillLeader,
            "kill-follower" => Fault::KillFollower,
            "kill-two" => Fault::KillTwo,
            "pause" => Fault::Pause,
            "ledger" => Fault::Ledger,
            "partition" => Fault::Partition,
            "membership" => Fault::Membership,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillLeader => "kill-leader",
            Fault::KillFollower => "kill-follower",
            Fault::KillTwo => "kill-two",
            Fault::Pause => "pause",
            Fault::Ledger => "ledger",
            Fault::Partition => "partition",
            Fault::Membership => "membership",
        }
    }

    pub const ALL: [Fault; 7] =
        [Fault::KillLeader, Fault::KillFollower, Fault::KillTwo, Fault::Pause, Fault::Ledger, Fault::Partition, Fault::Membership];
}

/// What a fault did, so it can be healed.
enum Applied {
    Killed(Vec<u64>),
    Paused(u64),
    Isolated(u64),
    Joined(u64),
    LedgerDown,
}

fn event(history: &History, start: u64, fault: &str, target: String) {
    history.record("nemesis", start, Op::Nemesis { fault: fault.into(), target }, Outcome::Done);
}

/// Injects faults until `deadline`, then heals everything. Returns how many of each kind ran.
pub async fn run(
    cluster: &mut Cluster,
    faults: &[Fault],
    seed: u64,
    hot_group: u32,
    history: &History,
    deadline: Instant,
) -> std::collections::BTreeMap<&'static str, u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(0x6e656d65736973));
    let mut counts = std::collections::BTreeMap::new();
    // Node ids are never reused, so new nodes count up from the original ones.
    let mut next_new_id = cluster.node_ids().into_iter().max().unwrap_or(0) + 1;
    let usable: Vec<Fault> = faults.iter().copied().filter(|f| *f != Fault::KillTwo || cluster.node_ids().len() >= 5).collect();
    if usable.is_empty() {
        tokio::time::sleep_until(deadline).await;
        return counts;
    }
    let mut round = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(rng.random_range(800..2500))).await;
        if Instant::now() + Duration::from_secs(3) > deadline {
            break;
        }
        // Every enabled fault once, in order, then at random.
        let fault = if round < usable.len() { usable[round] } else { usable[rng.random_range(0..usable.len())] };
        round += 1;
        let start = history.now_ms();
        let applied = match fault {
            Fault::KillLeader | Fault::Pause | Fault::KillFollower | Fault::Partition => {
                let Ok(leader) = cluster.leader_of(hot_group).await else { continue };
                let target = if fault == Fault::KillFollower {
                    let others: Vec<u64> = cluster.node_ids().into_iter().filter(|n| *n != leader && cluster.is_running(*n)).collect();
                    if others.is_empty() {
                        continue;
                    }
                    others[rng.random_range(0..others.len())]
                } else {
                    leader
                };
                if fault == Fault::Pause {
                    let _ = cluster.pause(target);
                    Applied::Paused(target)
                } else if fault == Fault::Partition {
                    if cluster.client_of(target).set_failpoint("raft-isolate", "return").await.is_err() {
                        continue;
                    }
                    Applied::Isolated(target)
                } else {
                    cluster.kill(target);
                    Applied::Killed(vec![target])
                }
            }
            Fault::KillTwo => {
                let mut ids = cluster.node_ids();
                let a = ids.remove(rng.random_range(0..ids.len()));
                let b = ids.remove(rng.random_range(0..ids.len()));
                cluster.kill(a);
                cluster.kill(b);
                Applied::Killed(vec![a, b])
            }
            Fault::Ledger => {
                cluster.kill_ledger();
                Applied::LedgerDown
            }
            Fault::Membership => {
                let id = next_new_id;
                next_new_id += 1;
                let Ok(addr) = cluster.spawn_new_node(id) else { continue };
                let _ = cluster.wait_serving(id).await;
                let member = cluster.node_ids()[0];
                match cluster.client_of(member).add_node(id, &addr, |_| {}).await {
                    Ok(()) => Applied::Joined(id),
                    Err(e) => {
                        tracing::warn!("nemesis: adding node {id}: {e}");
                        cluster.forget_node(id);
                        continue;
                    }
                }
            }
        };
        let target = match &applied {
            Applied::Killed(ids) => format!("{ids:?}"),
            Applied::Paused(id) | Applied::Isolated(id) | Applied::Joined(id) => format!("[{id}]"),
            Applied::LedgerDown => "ledger".into(),
        };
        event(history, start, fault.name(), target.clone());
        *counts.entry(fault.name()).or_default() += 1;
        // Long enough for the followers to elect a new leader (election timeout + lease).
        tokio::time::sleep(Duration::from_millis(rng.random_range(2500..5000))).await;
        let start = history.now_ms();
        heal(cluster, applied).await;
        event(history, start, "heal", target);
    }
    counts
}

async fn heal(cluster: &mut Cluster, applied: Applied) {
    match applied {
        Applied::Killed(ids) => {
            for id in ids {
                if let Err(e) = cluster.start_node(id) {
                    tracing::warn!("restarting node {id}: {e}");
                }
            }
        }
        Applied::Paused(id) => {
            let _ = cluster.resume(id);
        }
        Applied::Isolated(id) => {
            for _ in 0..20 {
                if cluster.client_of(id).set_failpoint("raft-isolate", "off").await.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Applied::Joined(id) => {
            let member = cluster.node_ids().into_iter().find(|n| *n != id).expect("a member");
            match cluster.client_of(member).remove_node(id, |_| {}).await {
                Ok(()) => cluster.forget_node(id),
                Err(e) => tracing::warn!("nemesis: removing node {id}: {e}"),
            }
        }
        Applied::LedgerDown => {
            if let Err(e) = cluster.start_ledger() {
                tracing::warn!("restarting the ledger: {e}");
            }
        }
    }
}
