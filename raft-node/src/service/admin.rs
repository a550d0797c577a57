//! Cluster administration (`redpacket.v1.ClusterAdmin`): bootstrap and status.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::type_config::async_runtime::WatchReceiver;

use openraft::ReadPolicy;
use openraft::errors::InitializeError;
use openraft::errors::RaftError;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::cluster_admin_client::ClusterAdminClient;
use redpacket_proto::v1::cluster_admin_server::ClusterAdmin;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use redpacket_proto::payment as ledger_pb;

use super::LEADER_WAIT;
use super::NodeContext;
use super::packets::forward_request;
use super::membership;
use super::packets::is_forwarded;
use super::status;
use crate::ledger;
use crate::packet::Packet;
use crate::packet::PacketId;
use crate::packet::transfer::Transfer;
use crate::reconcile;
use crate::storage::codec;
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

impl AdminService {
    /// Membership changes are coordinated by a member (a node being added is not one yet):
    /// UNAVAILABLE makes the client try its next endpoint.
    fn require_member(&self) -> Result<(), Status> {
        if self.ctx.groups.is_initialized() {
            Ok(())
        } else {
            Err(status::unavailable(format!("node {} is not a cluster member yet; ask a member", self.ctx.node_id)))
        }
    }

    /// One group's packets and transfers, read linearizably on its leader.
    async fn dump_of(&self, group: u32, forwarded: bool) -> Result<(Vec<Packet>, Vec<Transfer>), Status> {
        let raft = self.ctx.groups.get(group).ok_or_else(|| status::invalid("group", format!("no group {group}")))?;
        let (leader, node) = self
            .ctx
            .groups
            .leader(group, LEADER_WAIT)
            .await
            .ok_or_else(|| status::unavailable(format!("group {group} has no leader; retry")))?;
        if leader != self.ctx.node_id {
            if forwarded {
                return Err(status::unavailable(format!("node {} no longer leads group {group}; retry", self.ctx.node_id)));
            }
            let channel = self.ctx.peers.channel(&node.addr).map_err(|e| status::unavailable(e.to_string()))?;
            let resp = ClusterAdminClient::new(channel)
                .max_decoding_message_size(256 << 20)
                .dump_group(forward_request(pb::DumpGroupRequest { group }))
                .await?
                .into_inner();
            let packets = codec::decode(&resp.packets).map_err(status::internal)?;
            let transfers = codec::decode(&resp.transfers).map_err(status::internal)?;
            return Ok((packets, transfers));
        }
        raft.ensure_linearizable(ReadPolicy::ReadIndex)
            .await
            .map_err(|e| status::unavailable(format!("group {group}: {e}; retry")))?;
        self.ctx.store.reader(group).dump().map_err(status::internal)
    }

    /// Every ledger transfer with one of redpacket's id prefixes.
    async fn ledger_transfers(&self) -> Result<HashMap<String, ledger::Transfer>, Status> {
        let mut out = HashMap::new();
        let mut client = self.ctx.ledger.clone().max_decoding_message_size(256 << 20);
        for prefix in ["fund:", "pay:", "refund:"] {
            let mut start_after = String::new();
            loop {
                let page = client
                    .list_transfers(ledger_pb::ListTransfersRequest { prefix: prefix.into(), start_after: start_after.clone(), limit: 10_000 })
                    .await
                    .map_err(|e| status::unavailable(format!("payment ledger: {}", e.message())))?
                    .into_inner()
                    .transfers;
                let Some(last) = page.last() else { break };
                start_after = last.transfer_id.clone();
                for t in page {
                    let state = match ledger_pb::TransferState::try_from(t.state) {
                        Ok(ledger_pb::TransferState::Committed) => ledger::TransferState::Committed,
                        Ok(ledger_pb::TransferState::Aborted) => ledger::TransferState::Aborted,
                        _ => ledger::TransferState::Prepared,
                    };
                    out.insert(
                        t.transfer_id.clone(),
                        ledger::Transfer { id: t.transfer_id, from: t.from_account, to: t.to_account, amount: t.amount_cents, state },
                    );
                }
            }
        }
        Ok(out)
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
            let mut req = Request::new(pb::StatusRequest::default());
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

    async fn status(&self, request: Request<pb::StatusRequest>) -> Result<Response<pb::NodeStatus>, Status> {
        let with_digest = request.get_ref().with_digest;
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
                    lag: m
                        .replication
                        .as_ref()
                        .map(|r| {
                            r.iter()
                                .filter(|(id, _)| **id != self.ctx.node_id)
                                .map(|(id, matched)| pb::ReplicaLag {
                                    node_id: *id,
                                    entries: matched
                                        .as_ref()
                                        .map(|l| m.last_log_index.unwrap_or(0).saturating_sub(l.index)),
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    state_digest: None,
                }
            })
            .collect::<Vec<_>>();
        let mut groups = groups;
        if with_digest {
            for g in &mut groups {
                let (applied, digest) = self.ctx.store.reader(g.group).digest().map_err(status::internal)?;
                // The digest describes the state at its own applied index.
                g.last_applied = applied;
                g.state_digest = Some(digest);
            }
        }
        Ok(Response::new(pb::NodeStatus {
            node_id: self.ctx.node_id,
            addr: self.ctx.addr.clone(),
            groups_total: self.ctx.groups.count(),
            initialized: self.ctx.groups.is_initialized(),
            groups,
        }))
    }

    async fn dump_group(&self, request: Request<pb::DumpGroupRequest>) -> Result<Response<pb::DumpGroupResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let (packets, transfers) = self.dump_of(request.into_inner().group, forwarded).await?;
        Ok(Response::new(pb::DumpGroupResponse {
            packets: codec::encode(&packets).map_err(status::internal)?,
            transfers: codec::encode(&transfers).map_err(status::internal)?,
        }))
    }

    async fn reconcile(&self, _request: Request<pb::ReconcileRequest>) -> Result<Response<pb::ReconcileReport>, Status> {
        let groups = self.ctx.groups.count();
        let mut packets = Vec::new();
        let mut transfers = Vec::new();
        for group in 0..groups {
            let (p, t) = self.dump_of(group, false).await?;
            packets.extend(p);
            transfers.extend(t);
        }
        // The ledger is read after the packet state (see reconcile::check).
        let ledger_transfers = self.ledger_transfers().await?;
        let mut ledger = self.ctx.ledger.clone();
        let unavailable = |e: Status| status::unavailable(format!("payment ledger: {}", e.message()));
        let audit = ledger.audit(ledger_pb::AuditRequest {}).await.map_err(unavailable)?.into_inner();
        let escrow = ledger
            .balance(ledger_pb::BalanceRequest { account: self.ctx.payment.escrow_account.clone() })
            .await
            .map_err(unavailable)?
            .into_inner();

        // Ledger transfers the state did not show may have been recorded since: re-read
        // their groups before calling them orphans.
        let known: HashSet<&str> = transfers.iter().map(|t| t.id.as_str()).collect();
        let candidates: Vec<String> = ledger_transfers.keys().filter(|id| !known.contains(id.as_str())).cloned().collect();
        let mut orphans = Vec::new();
        let mut reread: HashMap<u32, HashSet<String>> = HashMap::new();
        for id in candidates {
            let group = id.split(':').nth(1).and_then(|p| PacketId::parse(p).ok()).map(|p| p.group(groups));
            let Some(group) = group else {
                orphans.push(id);
                continue;
            };
            if let std::collections::hash_map::Entry::Vacant(e) = reread.entry(group) {
                let (_, t) = self.dump_of(group, false).await?;
                e.insert(t.into_iter().map(|t| t.id).collect());
            }
            if !reread[&group].contains(&id) {
                orphans.push(id);
            }
        }

        let view = reconcile::LedgerView {
            transfers: ledger_transfers,
            audit: ledger::Audit {
                accounts: audit.accounts,
                available: u128::from(audit.available_cents),
                held: u128::from(audit.held_cents),
                deposited: u128::from(audit.deposited_cents),
                prepared: u128::from(audit.prepared_cents),
                transfers: audit.transfers,
            },
            escrow: ledger::Account { available: escrow.available_cents, held: escrow.held_cents },
        };
        let r = reconcile::check(&packets, &transfers, &view, &orphans);
        let cents = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        Ok(Response::new(pb::ReconcileReport {
            packets: r.packets,
            transfers: r.transfers,
            pending_transfers: r.pending_transfers,
            funded_cents: cents(r.funded),
            paid_cents: cents(r.paid),
            refunded_cents: cents(r.refunded),
            in_escrow_cents: cents(r.in_escrow),
            escrow_balance_cents: cents(r.escrow_balance),
            ledger_conserved: r.ledger_conserved,
            mismatches: r
                .mismatches
                .into_iter()
                .map(|m| pb::Mismatch { packet_id: m.packet_id, transfer_id: m.transfer_id, problem: m.problem })
                .collect(),
        }))
    }

    async fn set_failpoint(&self, request: Request<pb::FailpointRequest>) -> Result<Response<pb::FailpointResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(status::invalid("name", "must name a failpoint"));
        }
        #[cfg(feature = "failpoints")]
        {
            fail::cfg(&req.name, &req.actions).map_err(|e| status::invalid("actions", e))?;
            tracing::warn!(name = %req.name, actions = %req.actions, "failpoint configured");
            Ok(Response::new(pb::FailpointResponse {}))
        }
        #[cfg(not(feature = "failpoints"))]
        {
            Err(Status::failed_precondition(format!(
                "name: this build has no failpoints (build with feature `failpoints`) to set {}",
                req.name
            )))
        }
    }

    type AddNodeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::MembershipProgress, Status>>;
    type RemoveNodeStream = tokio_stream::wrappers::ReceiverStream<Result<pb::MembershipProgress, Status>>;

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<Self::AddNodeStream>, Status> {
        self.require_member()?;
        let rx = membership::add_node(self.ctx.clone(), request.into_inner());
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<Self::RemoveNodeStream>, Status> {
        self.require_member()?;
        let rx = membership::remove_node(self.ctx.clone(), request.into_inner());
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn transfer_leader(&self, request: Request<pb::TransferLeaderRequest>) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let forwarded = is_forwarded(&request);
        Ok(Response::new(membership::transfer_leader(&self.ctx, request.into_inner(), forwarded).await?))
    }

    async fn balance_leaders(&self, _request: Request<pb::BalanceLeadersRequest>) -> Result<Response<pb::BalanceLeadersResponse>, Status> {
        let transfers = crate::raft::balance::balance_once(&self.ctx.groups).await;
        Ok(Response::new(pb::BalanceLeadersResponse { transfers }))
    }

    async fn add_learner(&self, request: Request<pb::AddLearnerRequest>) -> Result<Response<pb::GroupMembership>, Status> {
        let forwarded = is_forwarded(&request);
        Ok(Response::new(membership::add_learner(&self.ctx, request.into_inner(), forwarded).await?))
    }

    async fn set_voters(&self, request: Request<pb::SetVotersRequest>) -> Result<Response<pb::GroupMembership>, Status> {
        let forwarded = is_forwarded(&request);
        Ok(Response::new(membership::set_voters(&self.ctx, request.into_inner(), forwarded).await?))
    }

    async fn meta(&self, request: Request<pb::ClusterMetaRequest>) -> Result<Response<pb::ClusterMeta>, Status> {
        let forwarded = is_forwarded(&request);
        Ok(Response::new(membership::meta(&self.ctx, request.into_inner(), forwarded).await?))
    }
}
