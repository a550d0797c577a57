//! Finding where a group's request must run: here, when this node leads the group, or on
//! the leader, forwarded once.

use super::LEADER_WAIT;
use super::NodeContext;
use super::status;
use crate::raft::Raft;

/// Where a request for a group is served.
pub enum Route<'a> {
    /// This node leads the group.
    Here(&'a Raft),
    /// Forward to the leader at this address.
    Leader(String),
}

/// Decides where a request for `group` is served. A request that was already forwarded is
/// never forwarded again: if this node no longer leads, the caller retries.
pub async fn to_leader(ctx: &NodeContext, group: u32, forwarded: bool) -> Result<Route<'_>, tonic::Status> {
    let raft = ctx.groups.get(group).ok_or_else(|| status::invalid("group", format!("no group {group}")))?;
    let Some((leader, node)) = ctx.groups.leader(group, LEADER_WAIT).await else {
        return Err(status::unavailable(format!("group {group} has no leader yet; retry")));
    };
    if leader == ctx.node_id {
        return Ok(Route::Here(raft));
    }
    if forwarded {
        return Err(status::unavailable(format!(
            "node {} is not the leader of group {group} (node {leader} at {} is); retry",
            ctx.node_id, node.addr
        )));
    }
    Ok(Route::Leader(node.addr))
}
