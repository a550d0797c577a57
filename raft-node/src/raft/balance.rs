//! Spreading group leaderships over the nodes.
//!
//! Each group has a preferred leader: its index modulo the number of voters, in node-id
//! order. A leader that is not the preferred node hands leadership over (openraft's leader
//! transfer) once the preferred node has replicated everything, so it can win at once.
//! Right after bootstrap, after a node restarts, or after a node joins, leaders converge to
//! an even spread within a few balance intervals.

use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use openraft::ServerState;

use super::NodeId;
use super::groups::Groups;
use crate::storage::Store;

/// The preferred leader of `group` among `voters`.
pub fn preferred_leader(group: u32, voters: &[NodeId]) -> Option<NodeId> {
    if voters.is_empty() {
        return None;
    }
    let mut sorted = voters.to_vec();
    sorted.sort_unstable();
    Some(sorted[group as usize % sorted.len()])
}

/// Runs forever (until the task is aborted), checking every `interval`. Pauses while a
/// membership change holds the cluster lock, so it does not fight the change.
pub async fn run(groups: Arc<Groups>, store: Store, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = crate::service::packets::now_millis();
        match store.reader(0).membership_lock() {
            Ok(Some((holder, until))) if now < until => {
                tracing::debug!(%holder, "membership change in progress: not balancing");
                continue;
            }
            _ => {}
        }
        balance_once(&groups).await;
    }
}

/// Hands every leadership this node holds to the group's preferred node, when that node has
/// replicated everything. Returns how many transfers were started.
pub async fn balance_once(groups: &Groups) -> u32 {
    let me = groups.node_id();
    let mut started = 0;
    for (group, raft) in groups.all() {
        let m = raft.metrics().borrow_watched().clone();
        if m.state != ServerState::Leader {
            continue;
        }
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let Some(preferred) = preferred_leader(group, &voters) else { continue };
        if preferred == me || m.membership_config.membership().get_joint_config().len() > 1 {
            continue;
        }
        let caught_up = m
            .replication
            .as_ref()
            .and_then(|r| r.get(&preferred).cloned().flatten())
            .map(|matched| Some(matched.index) >= m.last_log_index)
            .unwrap_or(false);
        if caught_up {
            tracing::info!(group, to = preferred, "transferring leadership to the preferred node");
            match raft.trigger().transfer_leader(preferred).await {
                Ok(()) => started += 1,
                Err(e) => tracing::warn!(group, "leader transfer: {e}"),
            }
        }
    }
    started
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preferred_leaders_spread_evenly() {
        let voters = [3, 1, 2];
        let mut counts = [0; 4];
        for g in 0..16 {
            counts[preferred_leader(g, &voters).unwrap() as usize] += 1;
        }
        assert_eq!(&counts[1..], &[6, 5, 5]);
    }
}
