//! Changing who is in the cluster: adding and removing nodes, moving leaderships.
//!
//! Every group has a replica on every node, so adding a node means, group by group: add it
//! as a learner and wait until it caught up (by snapshot where the log was purged), then make
//! it a voter. Removing one means moving its leaderships away, then dropping it from every
//! group, then retiring its id for good (openraft warns that a reused id can split the
//! brain). Changes are serialized cluster-wide by a lock kept in group 0, so two operators
//! cannot interleave two changes; re-running the same change resumes it.
//!
//! The per-group steps (`AddLearner`, `SetVoters`, `TransferLeader`, `Meta`) are admin RPCs
//! that run on the group's leader; the orchestration calls them through this node's own
//! endpoint, so forwarding to the right leader works the same as for any client.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use openraft::ReadPolicy;
use openraft::type_config::async_runtime::WatchReceiver;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::cluster_admin_client::ClusterAdminClient;
use tokio::sync::mpsc;
use tonic::Status;
use crate::raft::network::PeerChannel;

use super::NodeContext;
use super::packets::now_millis;
use super::route;
use super::route::Route;
use super::status;
use crate::raft::Command;
use crate::raft::MetaCommand;
use crate::raft::Node;
use crate::raft::NodeId;
use crate::raft::Reply;
use crate::raft::balance::preferred_leader;

/// How long the membership lock lasts if its holder dies.
const LOCK_TTL_MS: u64 = 5 * 60 * 1000;
/// How long a learner may take to catch up, per group.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(120);

type Progress = mpsc::Sender<Result<pb::MembershipProgress, Status>>;

fn admin(ctx: &NodeContext, addr: &str) -> Result<ClusterAdminClient<PeerChannel>, Status> {
    let ch = ctx.peers.channel(addr).map_err(|e| status::unavailable(format!("{addr}: {e}")))?;
    Ok(ClusterAdminClient::new(ch))
}

/// This node's own admin endpoint: per-group steps go through it, and get forwarded.
fn me(ctx: &NodeContext) -> Result<ClusterAdminClient<PeerChannel>, Status> {
    admin(ctx, &ctx.addr)
}

/// Runs one step, retrying while the cluster cannot serve it yet (a group electing a leader,
/// a leader that just moved): a membership change must ride out the failures it is meant to
/// repair.
async fn retrying<T, F, Fut>(mut step: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match step().await {
            Ok(v) => return Ok(v),
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded)
                && tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!("membership step will be retried: {}", s.message());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => return Err(s),
        }
    }
}

fn with_timeout<T>(body: T, timeout: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(body);
    req.set_timeout(timeout);
    req
}

/// A group's voters, learners, nodes with their addresses, and whether it is in joint consensus.
type Members = (BTreeSet<NodeId>, BTreeSet<NodeId>, Vec<(NodeId, Node)>, bool);

/// Voters and learners of a group as this node last saw them.
fn members_of(ctx: &NodeContext, group: u32) -> Members {
    let raft = ctx.groups.get(group).expect("group exists");
    let m = raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let joint = membership.get_joint_config().len() > 1;
    let nodes = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    (membership.voter_ids().collect(), membership.learner_ids().collect(), nodes, joint)
}

// ---- Per-group steps, run on the group's leader ----

pub async fn add_learner(ctx: &NodeContext, req: pb::AddLearnerRequest, forwarded: bool) -> Result<pb::GroupMembership, Status> {
    match route::to_leader(ctx, req.group, forwarded).await? {
        Route::Leader(addr) => Ok(admin(ctx, &addr)?
            .add_learner(super::packets::forward_request(req))
            .await?
            .into_inner()),
        Route::Here(raft) => {
            let node = Node { addr: req.addr.clone() };
            let result = tokio::time::timeout(CATCH_UP_TIMEOUT, raft.add_learner(req.node_id, node, true)).await;
            match result {
                Err(_) => return Err(status::unavailable(format!("group {}: learner {} did not catch up in time", req.group, req.node_id))),
                Ok(Err(e)) => return Err(status::unavailable(format!("group {}: {e}", req.group))),
                Ok(Ok(_)) => {}
            }
            Ok(group_membership(ctx, req.group))
        }
    }
}

pub async fn set_voters(ctx: &NodeContext, req: pb::SetVotersRequest, forwarded: bool) -> Result<pb::GroupMembership, Status> {
    if req.voters.is_empty() {
        return Err(status::invalid("voters", "a group needs at least one voter"));
    }
    match route::to_leader(ctx, req.group, forwarded).await? {
        Route::Leader(addr) => Ok(admin(ctx, &addr)?.set_voters(super::packets::forward_request(req)).await?.into_inner()),
        Route::Here(raft) => {
            let target: BTreeSet<NodeId> = req.voters.iter().copied().collect();
            let (voters, _, _, joint) = members_of(ctx, req.group);
            if voters != target || joint {
                raft.change_membership(target, false)
                    .await
                    .map_err(|e| status::unavailable(format!("group {}: {e}", req.group)))?;
            }
            Ok(group_membership(ctx, req.group))
        }
    }
}

pub async fn transfer_leader(ctx: &NodeContext, req: pb::TransferLeaderRequest, forwarded: bool) -> Result<pb::TransferLeaderResponse, Status> {
    let (voters, _, _, _) = members_of(ctx, req.group);
    if !voters.contains(&req.to) {
        return Err(status::invalid("to", format!("node {} is not a voter of group {}", req.to, req.group)));
    }
    match route::to_leader(ctx, req.group, forwarded).await? {
        Route::Leader(addr) => Ok(admin(ctx, &addr)?.transfer_leader(super::packets::forward_request(req)).await?.into_inner()),
        Route::Here(raft) => {
            if req.to != ctx.node_id {
                raft.trigger().transfer_leader(req.to).await.map_err(status::internal)?;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            loop {
                let leader = raft.metrics().borrow_watched().current_leader;
                if leader == Some(req.to) {
                    return Ok(pb::TransferLeaderResponse { group: req.group, leader: req.to });
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(status::unavailable(format!("group {}: node {} did not take over; retry", req.group, req.to)));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Reads or changes the cluster metadata in group 0, on its leader.
pub async fn meta(ctx: &NodeContext, req: pb::ClusterMetaRequest, forwarded: bool) -> Result<pb::ClusterMeta, Status> {
    let raft = match route::to_leader(ctx, 0, forwarded).await? {
        Route::Leader(addr) => return Ok(admin(ctx, &addr)?.meta(super::packets::forward_request(req)).await?.into_inner()),
        Route::Here(raft) => raft,
    };
    let command = match req.op {
        Some(pb::cluster_meta_request::Op::Lock(holder)) => {
            Some(MetaCommand::Lock { holder, at: now_millis(), ttl_ms: LOCK_TTL_MS })
        }
        Some(pb::cluster_meta_request::Op::Unlock(holder)) => Some(MetaCommand::Unlock { holder }),
        Some(pb::cluster_meta_request::Op::Retire(node_id)) => Some(MetaCommand::Retire { node_id }),
        Some(pb::cluster_meta_request::Op::Read(_)) | None => None,
    };
    let mut lock_holder = None;
    if let Some(command) = command {
        match raft.client_write(Command::Meta(command)).await {
            Ok(resp) => {
                if let Reply::Lock { holder } = resp.data {
                    lock_holder = Some(holder);
                }
            }
            Err(e) => return Err(status::unavailable(format!("group 0: {e}; retry"))),
        }
    } else {
        raft.ensure_linearizable(ReadPolicy::ReadIndex).await.map_err(|e| status::unavailable(format!("group 0: {e}")))?;
    }
    let reader = ctx.store.reader(0);
    let retired = reader.retired_nodes().map_err(status::internal)?;
    let lock_holder = match lock_holder {
        Some(h) => h,
        None => match reader.membership_lock().map_err(status::internal)? {
            Some((holder, until)) if now_millis() < until => holder,
            _ => String::new(),
        },
    };
    Ok(pb::ClusterMeta { retired, lock_holder })
}

fn group_membership(ctx: &NodeContext, group: u32) -> pb::GroupMembership {
    let (voters, learners, _, _) = members_of(ctx, group);
    pb::GroupMembership { group, voters: voters.into_iter().collect(), learners: learners.into_iter().collect() }
}

// ---- Orchestration ----

/// Takes the cluster-wide membership lock for `op`, or explains who holds it.
async fn lock(ctx: &NodeContext, op: &str) -> Result<(), Status> {
    let meta = retrying(|| async {
        Ok(me(ctx)?.meta(pb::ClusterMetaRequest { op: Some(pb::cluster_meta_request::Op::Lock(op.into())) }).await?.into_inner())
    })
    .await?;
    if meta.lock_holder != op {
        return Err(Status::failed_precondition(format!(
            "node_id: another membership change is in flight ({}); wait for it or re-run it to resume",
            meta.lock_holder
        )));
    }
    Ok(())
}

async fn unlock(ctx: &NodeContext, op: &str) -> Result<(), Status> {
    retrying(|| async { me(ctx)?.meta(pb::ClusterMetaRequest { op: Some(pb::cluster_meta_request::Op::Unlock(op.into())) }).await })
        .await?;
    Ok(())
}

async fn send(tx: &Progress, group: u32, total: u32, done: u32, step: impl Into<String>) {
    let _ = tx.send(Ok(pb::MembershipProgress { group, groups_total: total, step: step.into(), done })).await;
}

/// Checks an add request against the cluster before anything changes.
async fn check_add(ctx: &NodeContext, node_id: NodeId, addr: &str) -> Result<(), Status> {
    if node_id == 0 {
        return Err(status::invalid("node_id", "must be at least 1"));
    }
    if addr.is_empty() {
        return Err(status::invalid("addr", "must be the new node's address"));
    }
    let meta = retrying(|| async {
        Ok(me(ctx)?.meta(pb::ClusterMetaRequest { op: Some(pb::cluster_meta_request::Op::Read(true)) }).await?.into_inner())
    })
    .await?;
    if meta.retired.contains(&node_id) {
        return Err(Status::already_exists(format!(
            "node_id: {node_id} belonged to a removed node; node ids are never reused (it could split the brain)"
        )));
    }
    let (_, _, nodes, _) = members_of(ctx, 0);
    for (id, node) in &nodes {
        if *id == node_id && node.addr != addr {
            return Err(Status::already_exists(format!("node_id: {node_id} is already a member at {}", node.addr)));
        }
        if *id != node_id && node.addr == addr {
            return Err(Status::already_exists(format!("addr: {addr} already belongs to node {id}")));
        }
    }
    let probe = admin(ctx, addr)?
        .status(with_timeout(pb::StatusRequest::default(), Duration::from_secs(5)))
        .await
        .map_err(|e| status::unavailable(format!("addr: the new node at {addr} does not answer: {}", e.message())))?
        .into_inner();
    if probe.node_id != node_id {
        return Err(status::invalid("node_id", format!("{addr} is node {}, not node {node_id}", probe.node_id)));
    }
    if probe.groups_total != ctx.groups.count() {
        return Err(status::invalid(
            "addr",
            format!("node {node_id} has {} groups, the cluster has {}", probe.groups_total, ctx.groups.count()),
        ));
    }
    Ok(())
}

/// Runs a membership change in its own task, streaming its progress and, if it fails, its
/// error as the stream's last item.
fn streamed<F, Fut>(change: F) -> mpsc::Receiver<Result<pb::MembershipProgress, Status>>
where
    F: FnOnce(Progress) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<(), Status>> + Send,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(e) = change(tx.clone()).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    rx
}

pub fn add_node(ctx: Arc<NodeContext>, req: pb::AddNodeRequest) -> mpsc::Receiver<Result<pb::MembershipProgress, Status>> {
    streamed(move |tx| async move {
        {
            check_add(&ctx, req.node_id, &req.addr).await?;
            let op = format!("add-node:{}", req.node_id);
            lock(&ctx, &op).await?;
            let total = ctx.groups.count();
            for group in 0..total {
                let step = pb::AddLearnerRequest { group, node_id: req.node_id, addr: req.addr.clone() };
                let (voters, _, _, _) = members_of(&ctx, group);
                if !voters.contains(&req.node_id) {
                    let timeout = CATCH_UP_TIMEOUT + Duration::from_secs(5);
                    retrying(|| async { me(&ctx)?.add_learner(with_timeout(step.clone(), timeout)).await }).await?;
                }
                send(&tx, group, total, group + 1, "learner caught up").await;
            }
            for group in 0..total {
                let (mut voters, _, _, _) = members_of(&ctx, group);
                voters.insert(req.node_id);
                let step = pb::SetVotersRequest { group, voters: voters.into_iter().collect() };
                retrying(|| async { me(&ctx)?.set_voters(with_timeout(step.clone(), Duration::from_secs(30))).await }).await?;
                send(&tx, group, total, group + 1, "voter").await;
            }
            unlock(&ctx, &op).await?;
            send(&tx, 0, total, total, "done").await;
            Ok(())
        }
    })
}

/// Refuses a removal that would leave any group unable to reach a quorum.
async fn check_remove(ctx: &NodeContext, node_id: NodeId) -> Result<Vec<NodeId>, Status> {
    let (voters, _, nodes, _) = members_of(ctx, 0);
    if !voters.contains(&node_id) {
        return Err(Status::not_found(format!("node_id: {node_id} is not a member")));
    }
    let remaining: Vec<NodeId> = voters.iter().copied().filter(|v| *v != node_id).collect();
    if remaining.is_empty() {
        return Err(Status::failed_precondition("node_id: cannot remove the last node"));
    }
    let removed_alive = match nodes.iter().find(|(n, _)| *n == node_id) {
        Some((_, node)) => match admin(ctx, &node.addr) {
            Ok(mut c) => c.status(with_timeout(pb::StatusRequest::default(), Duration::from_secs(2))).await.is_ok(),
            Err(_) => false,
        },
        None => false,
    };
    let mut alive = 0;
    for id in &remaining {
        let Some((_, node)) = nodes.iter().find(|(n, _)| n == id) else { continue };
        let answered = match admin(ctx, &node.addr) {
            Ok(mut c) => c.status(with_timeout(pb::StatusRequest::default(), Duration::from_secs(2))).await.is_ok(),
            Err(_) => false,
        };
        if answered {
            alive += 1;
        }
    }
    // Joint consensus needs a majority of the old voters and of the new ones.
    let old_quorum = voters.len() / 2 + 1;
    let old_alive = alive + usize::from(removed_alive);
    if old_alive < old_quorum {
        return Err(Status::failed_precondition(format!(
            "node_id: removing {node_id} needs a quorum of the current voters: {old_alive} of {} answer, {old_quorum} needed",
            voters.len()
        )));
    }
    let quorum = remaining.len() / 2 + 1;
    if alive < quorum {
        return Err(Status::failed_precondition(format!(
            "node_id: removing {node_id} would leave the groups without a quorum: {alive} of the {} remaining voters answer, {quorum} needed",
            remaining.len()
        )));
    }
    Ok(remaining)
}

pub fn remove_node(ctx: Arc<NodeContext>, req: pb::RemoveNodeRequest) -> mpsc::Receiver<Result<pb::MembershipProgress, Status>> {
    streamed(move |tx| async move {
        {
            let remaining = check_remove(&ctx, req.node_id).await?;
            let op = format!("remove-node:{}", req.node_id);
            lock(&ctx, &op).await?;
            let total = ctx.groups.count();
            for group in 0..total {
                let leader = ctx.groups.leader(group, super::LEADER_WAIT).await.map(|(l, _)| l);
                if leader == Some(req.node_id) {
                    let to = preferred_leader(group, &remaining).expect("remaining voters");
                    let step = pb::TransferLeaderRequest { group, to };
                    // Best effort: removing a leader also works, it just costs an election.
                    let moved = retrying(|| async { me(&ctx)?.transfer_leader(with_timeout(step, Duration::from_secs(15))).await });
                    if let Err(e) = moved.await {
                        tracing::warn!(group, "moving leadership off node {}: {}", req.node_id, e.message());
                    }
                    send(&tx, group, total, group + 1, format!("leadership moved to node {to}")).await;
                }
            }
            for group in 0..total {
                let step = pb::SetVotersRequest { group, voters: remaining.clone() };
                retrying(|| async { me(&ctx)?.set_voters(with_timeout(step.clone(), Duration::from_secs(30))).await }).await?;
                send(&tx, group, total, group + 1, "removed").await;
            }
            let retire = pb::ClusterMetaRequest { op: Some(pb::cluster_meta_request::Op::Retire(req.node_id)) };
            retrying(|| async { me(&ctx)?.meta(retire.clone()).await }).await?;
            send(&tx, 0, total, total, "id retired").await;
            unlock(&ctx, &op).await?;
            send(&tx, 0, total, total, "done").await;
            Ok(())
        }
    })
}
