//! Cluster administration (`redpacket.v1.ClusterAdmin`): bootstrap and status.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use openraft::errors::InitializeError;
use openraft::errors::RaftError;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::cluster_admin_client::ClusterAdminClient;
use redpacket_proto::v1::cluster_admin_server::ClusterAdmin;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::NodeContext;
use super::status;
use crate::raft::Node;
use crate::raft::NodeId;
use crate::raft::balance::preferred_leader;
use crate::raft::groups::Groups;

pub struct AdminService {
    ctx: Arc<NodeContext>,
}

impl AdminService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        AdminService { ctx }
    }

    /// Initializes `groups` on this node with `members` as the voters.
    async fn init_local(&self, members: &BTreeMap<NodeId, Node>, groups: &[u32]) -> Result<(), Status> {
        for &group in groups {
            let raft = self.ctx.groups.get(group).ok_or_else(|| status::invalid("groups", format!("no group {group}")))?;
            match raft.initialize(members.clone()).await {
                Ok(()) => tracing::info!(group, "initialized group"),
                // Already initialized (a repeated init): fine.
                Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(status::unavailable(format!("group {group}: {e}"))),
            }
        }
        Ok(())
    }
}

fn members_from_pb(members: &[pb::Member]) -> Result<BTreeMap<NodeId, Node>, Status> {
    if members.is_empty() {
        return Err(status::invalid("members", "must list at least one node"));
    }
    let mut map = BTreeMap::new();
    let mut addrs = BTreeSet::new();
    for m in members {
        if m.node_id == 0 {
            return Err(status::invalid("members.node_id", "must be at least 1"));
        }
        if m.addr.is_empty() {
            return Err(status::invalid("members.addr", format!("node {} has no address", m.node_id)));
        }
        if !addrs.insert(m.addr.clone()) {
            return Err(status::invalid("members.addr", format!("{} is listed twice", m.addr)));
        }
        if map.insert(m.node_id, Node { addr: m.addr.clone() }).is_some() {
            return Err(status::invalid("members.node_id", format!("node {} is listed twice", m.node_id)));
        }
    }
    Ok(map)
}

#[tonic::async_trait]
impl ClusterAdmin for AdminService {
    async fn init(&self, request: Request<pb::InitRequest>) -> Result<Response<pb::InitResponse>, Status> {
        let members = members_from_pb(&request.get_ref().members)?;
        if !members.contains_key(&self.ctx.node_id) {
            return Err(status::invalid("members", format!("must include this node ({})", self.ctx.node_id)));
        }
        // Every member must be the node it is said to be, with our group count: a wrong id for
        // an address would put one node in a group twice.
        for (&node_id, node) in members.iter().filter(|(id, _)| **id != self.ctx.node_id) {
            let channel = self
                .ctx
                .peers
                .channel(&node.addr)
                .map_err(|e| status::unavailable(format!("node {node_id} at {}: {e}", node.addr)))?;
            let mut req = Request::new(pb::StatusRequest {});
            req.set_timeout(Duration::from_secs(5));
            let peer = ClusterAdminClient::new(channel)
                .status(req)
                .await
                .map_err(|e| status::unavailable(format!("node {node_id} at {}: {}", node.addr, e.message())))?
                .into_inner();
            if peer.node_id != node_id {
                return Err(status::invalid(
                    "members",
                    format!("{} is node {}, not node {node_id}", node.addr, peer.node_id),
                ));
            }
            if peer.groups_total != self.ctx.groups.count() {
                return Err(status::invalid(
                    "members",
                    format!("node {node_id} has {} groups, this node has {}", peer.groups_total, self.ctx.groups.count()),
                ));
            }
        }
        // Each group is initialized on its preferred leader, which then campaigns first: the
        // leaders start out spread over the nodes.
        let voters: Vec<NodeId> = members.keys().copied().collect();
        let mut plan: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for group in 0..self.ctx.groups.count() {
            let preferred = preferred_leader(group, &voters).expect("members is not empty");
            plan.entry(preferred).or_default().push(group);
        }
        for (node_id, groups) in plan {
            if node_id == self.ctx.node_id {
                self.init_local(&members, &groups).await?;
                continue;
            }
            let addr = &members[&node_id].addr;
            let channel = self.ctx.peers.channel(addr).map_err(|e| status::unavailable(format!("node {node_id} at {addr}: {e}")))?;
            let mut req = Request::new(pb::InitGroupsRequest { members: request.get_ref().members.clone(), groups });
            req.set_timeout(Duration::from_secs(10));
            ClusterAdminClient::new(channel)
                .init_groups(req)
                .await
                .map_err(|e| status::unavailable(format!("node {node_id} at {addr}: {}", e.message())))?;
        }
        Ok(Response::new(pb::InitResponse { groups: self.ctx.groups.count() }))
    }

    async fn init_groups(&self, request: Request<pb::InitGroupsRequest>) -> Result<Response<pb::InitGroupsResponse>, Status> {
        let req = request.into_inner();
        let members = members_from_pb(&req.members)?;
        self.init_local(&members, &req.groups).await?;
        Ok(Response::new(pb::InitGroupsResponse {}))
    }

    async fn status(&self, _request: Request<pb::StatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        let groups = self
            .ctx
            .groups
            .all()
            .map(|(group, raft)| {
                let m = raft.metrics().borrow_watched().clone();
                let membership = m.membership_config.membership();
                pb::GroupStatus {
                    group,
                    role: Groups::role_name(m.state).to_string(),
                    term: m.current_term,
                    leader: m.current_leader,
                    last_log_index: m.last_log_index,
                    last_applied: m.last_applied.as_ref().map(|l| l.index),
                    snapshot_index: m.snapshot.as_ref().map(|l| l.index),
                    voters: membership.voter_ids().collect(),
                    learners: membership.learner_ids().collect(),
                    purged_index: m.purged.as_ref().map(|l| l.index),
                }
            })
            .collect();
        Ok(Response::new(pb::NodeStatus {
            node_id: self.ctx.node_id,
            addr: self.ctx.addr.clone(),
            groups_total: self.ctx.groups.count(),
            initialized: self.ctx.groups.is_initialized(),
            groups,
        }))
    }
}
