//! The Raft groups of one node: one openraft instance per group, all sharing the node's
//! RocksDB and its peer connections. A packet's group is fixed by its id
//! ([`crate::packet::PacketId::group`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use openraft::ServerState;

use super::Node;
use super::NodeId;
use super::Raft;
use super::network::GroupNetwork;
use super::network::PeerChannels;
use crate::config::NodeConfig;
use crate::storage::Store;

pub struct Groups {
    node_id: NodeId,
    rafts: Vec<Raft>,
}

impl Groups {
    /// Starts (or restarts from disk) every group of this node.
    pub async fn start(config: &NodeConfig, store: &Store, peers: Arc<PeerChannels>) -> anyhow::Result<Groups> {
        let raft_config = Arc::new(config.openraft_config()?);
        let mut rafts = Vec::with_capacity(config.groups as usize);
        for group in 0..config.groups {
            let raft = Raft::new(
                config.node_id,
                raft_config.clone(),
                GroupNetwork::new(group, peers.clone()),
                store.log_store(group),
                store.state_machine(group),
            )
            .await?;
            rafts.push(raft);
        }
        // No wait_for_recovery() here: it needs a leader, and the leaders need this node's
        // transport to be serving. Committed entries are re-applied from the local log at once
        // (the committed index is persisted), and linearizable reads go through the leader.
        Ok(Groups { node_id: config.node_id, rafts })
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    pub fn count(&self) -> u32 {
        self.rafts.len() as u32
    }

    /// The Raft of `group`, or `None` for a group this node does not have.
    pub fn get(&self, group: u32) -> Option<&Raft> {
        self.rafts.get(group as usize)
    }

    pub fn all(&self) -> impl Iterator<Item = (u32, &Raft)> {
        self.rafts.iter().enumerate().map(|(g, r)| (g as u32, r))
    }

    /// The current leader of `group` and its address, waiting up to `wait` for one to be
    /// elected.
    pub async fn leader(&self, group: u32, wait: Duration) -> Option<(NodeId, Node)> {
        let raft = self.get(group)?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            {
                // Borrow, don't clone: this runs on every request.
                let metrics = raft.metrics();
                let m = metrics.borrow_watched();
                if let Some(leader) = m.current_leader
                    && let Some(node) = m.membership_config.membership().get_node(&leader)
                {
                    return Some((leader, node.clone()));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether any group has been initialized (has a membership).
    pub fn is_initialized(&self) -> bool {
        self.rafts.iter().any(|r| r.metrics().borrow_watched().membership_config.membership().voter_ids().next().is_some())
    }

    /// Number of groups each node leads, as this node sees it.
    pub fn leader_counts(&self) -> BTreeMap<NodeId, usize> {
        let mut counts = BTreeMap::new();
        for raft in &self.rafts {
            if let Some(l) = raft.metrics().borrow_watched().current_leader {
                *counts.entry(l).or_default() += 1;
            }
        }
        counts
    }

    /// Stops every group's Raft.
    pub async fn shutdown(&self) {
        for (group, raft) in self.all() {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(group, "raft shutdown: {e}");
            }
        }
    }

    pub fn role_name(state: ServerState) -> &'static str {
        match state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        }
    }
}
