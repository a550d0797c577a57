//! The public packet API (`redpacket.v1.RedPacket`).
//!
//! Any node accepts any request. The node finds the packet's group; if it leads that group
//! it stamps the command with its clock (and, for a create, a fresh seed) and proposes it,
//! otherwise it forwards the request once to the group's leader. A request that arrives
//! forwarded at a node that is no longer the leader gets UNAVAILABLE, and the client crate
//! retries; every operation is idempotent, so retrying is always safe.

use std::sync::Arc;
use std::time::Duration;

use openraft::ReadPolicy;
use openraft::errors::ClientWriteError;
use openraft::errors::LinearizableReadError;
use openraft::errors::RaftError;
use redpacket_proto::LEADER_METADATA_KEY;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::red_packet_client::RedPacketClient;
use redpacket_proto::v1::red_packet_server::RedPacket;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use crate::raft::network::PeerChannel;

use super::FORWARD_TIMEOUT;
use super::FORWARDED_HEADER;
use super::NodeContext;
use super::route;
use super::route::Route;
use super::convert;
use super::status;
use crate::packet::Millis;
use crate::packet::NewPacket;
use crate::packet::Packet;
use crate::packet::PacketError;
use crate::packet::PacketId;
use crate::packet::Stage;
use crate::packet::transfer::Settlement;
use crate::packet::transfer::fund_id;
use crate::packet::transfer::pay_id;
use crate::packet::transfer::refund_id;
use crate::packet::validate;
use crate::raft::Command;
use crate::raft::PacketOp;
use crate::raft::Reply;

/// How long a proposal may wait to be committed and applied before the client is told to
/// retry (the outcome is then unknown, and the retry finds it).
const PROPOSE_TIMEOUT: Duration = Duration::from_secs(8);

/// What the leader's fast path found for a grab.
// Unboxed on purpose: it lives briefly on the stack on the grab path; boxing would allocate per grab.
#[allow(clippy::large_enum_variant)]
enum FastPath {
    /// Answered from applied state: nothing can change it.
    Answered(Reply),
    /// Needs the log; the shares left as applied, when this node leads and has the packet.
    Log { shares_left: Option<u32> },
}

#[derive(Clone)]
pub struct PacketService {
    ctx: Arc<NodeContext>,
}

pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

pub(crate) fn is_forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().contains_key(FORWARDED_HEADER)
}

pub(crate) fn forward_request<T>(body: T) -> Request<T> {
    let mut req = Request::new(body);
    req.metadata_mut().insert(FORWARDED_HEADER, tonic::metadata::MetadataValue::from_static("1"));
    req.set_timeout(FORWARD_TIMEOUT);
    req
}

fn parse_packet_id(s: &str) -> Result<PacketId, Status> {
    PacketId::parse(s).map_err(|e| status::refused(&e))
}

fn check_user(field: &str, user: &str) -> Result<(), Status> {
    validate::user_id(field, user).map_err(|e| status::refused(&e))
}

impl PacketService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        PacketService { ctx }
    }

    fn client(&self, addr: &str) -> Result<RedPacketClient<PeerChannel>, Status> {
        let ch = self.ctx.peers.channel(addr).map_err(|e| status::unavailable(format!("leader at {addr}: {e}")))?;
        Ok(RedPacketClient::new(ch))
    }

    async fn route(&self, group: u32, forwarded: bool) -> Result<Route<'_>, Status> {
        route::to_leader(&self.ctx, group, forwarded).await
    }

    /// Proposes a command built by `make` (called once, just before proposing, so the time it
    /// stamps is the leader's) and returns what applying it replied, or the leader to forward to.
    async fn propose(&self, group: u32, forwarded: bool, make: impl FnOnce() -> Command) -> Result<Result<Reply, String>, Status> {
        let raft = match self.route(group, forwarded).await? {
            Route::Here(raft) => raft,
            Route::Leader(addr) => return Ok(Err(addr)),
        };
        let command = make();
        self.ctx.metrics.proposal(group);
        tracing::debug!(group, packet_id = ?command.packet_id(), %command, "propose");
        match tokio::time::timeout(PROPOSE_TIMEOUT, raft.client_write(command)).await {
            Err(_) => Err(status::unavailable(format!("group {group}: not committed within {PROPOSE_TIMEOUT:?}; retry"))),
            Ok(Ok(resp)) => Ok(Ok(resp.data)),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => match (forwarded, f.leader_node) {
                (false, Some(node)) => Ok(Err(node.addr)),
                _ => Err(status::unavailable(format!("group {group}: leadership changed; retry"))),
            },
            Ok(Err(e)) => Err(status::unavailable(format!("group {group}: {e}; retry"))),
        }
    }

    /// Waits until this node, as leader of `group`, may serve a linearizable read.
    async fn read_barrier(&self, group: u32, forwarded: bool) -> Result<Option<String>, Status> {
        let raft = match self.route(group, forwarded).await? {
            Route::Here(raft) => raft,
            Route::Leader(addr) => return Ok(Some(addr)),
        };
        match tokio::time::timeout(PROPOSE_TIMEOUT, raft.ensure_linearizable(ReadPolicy::ReadIndex)).await {
            Err(_) => Err(status::unavailable(format!("group {group}: read not confirmed in time; retry"))),
            Ok(Ok(_)) => Ok(None),
            Ok(Err(RaftError::APIError(LinearizableReadError::ForwardToLeader(f)))) => match (forwarded, f.leader_node) {
                (false, Some(node)) => Ok(Some(node.addr)),
                _ => Err(status::unavailable(format!("group {group}: leadership changed; retry"))),
            },
            Ok(Err(e)) => Err(status::unavailable(format!("group {group}: {e}; retry"))),
        }
    }

    /// The leader's fast path: a grab whose answer can no longer change (the user's share,
    /// sold out, not a recipient, closed) is answered from the applied state, without a log
    /// entry. Only the group leader answers this way, so its view is at most the newest.
    fn fast_grab(&self, group: u32, id: &PacketId, user: &str, open: bool) -> Result<FastPath, Status> {
        let Some(raft) = self.ctx.groups.get(group) else { return Ok(FastPath::Log { shares_left: None }) };
        if !raft.is_leader() {
            return Ok(FastPath::Log { shares_left: None });
        }
        let reader = self.ctx.store.reader(group);
        let Some(packet) = reader.packet(id).map_err(status::internal)? else { return Ok(FastPath::Log { shares_left: None }) };
        let claim = reader.claim(id, user).map_err(status::internal)?;
        Ok(match packet.settled_grab_answer(user, claim.as_ref(), open) {
            Some(Ok(claim)) if open => FastPath::Answered(Reply::Opened { claim }),
            Some(Ok(claim)) => FastPath::Answered(Reply::Grabbed { claim, shares_left: packet.shares_left() }),
            Some(Err(refusal)) => FastPath::Answered(Reply::Refused(refusal)),
            None => FastPath::Log { shares_left: Some(packet.shares_left()) },
        })
    }

    /// Queues a grab or open for the group's next batch on this node, if it leads the group;
    /// otherwise returns the leader's address to forward to.
    async fn submit(&self, group: u32, forwarded: bool, op: PacketOp, shares_left: Option<u32>) -> Result<Result<Reply, String>, Status> {
        match self.route(group, forwarded).await? {
            Route::Here(_) => self.ctx.batchers.submit(group, op, shares_left, forwarded).await,
            Route::Leader(addr) => Ok(Err(addr)),
        }
    }

    /// A grab (with `open`, a grab-and-open): the fast path's answer, else the reply of the
    /// group's next batch, else the leader's address to forward to.
    async fn grab_here(&self, group: u32, forwarded: bool, id: &PacketId, user: &str, open: bool) -> Result<Result<Reply, String>, Status> {
        match self.fast_grab(group, id, user, open)? {
            FastPath::Answered(reply) => Ok(Ok(reply)),
            FastPath::Log { shares_left } => {
                let op = PacketOp::Grab { packet_id: id.clone(), user: user.to_string(), open };
                self.submit(group, forwarded, op, shares_left).await
            }
        }
    }

    fn read_packet(&self, group: u32, id: &PacketId) -> Result<pb::Packet, Status> {
        let reader = self.ctx.store.reader(group);
        let packet = reader
            .packet(id)
            .map_err(status::internal)?
            .ok_or_else(|| status::refused(&PacketError::NotFound(id.to_string())))?;
        let claims = reader.claims(id).map_err(status::internal)?;
        let mut ids = vec![fund_id(id), refund_id(id)];
        ids.extend(claims.iter().filter(|c| c.opened_at.is_some()).map(|c| pay_id(id, c.share_index)));
        let mut transfers = convert::Transfers::new();
        for tid in ids {
            if let Some(t) = reader.transfer(&tid).map_err(status::internal)? {
                transfers.insert(tid, t);
            }
        }
        Ok(convert::packet_to_pb(&packet, &claims, &transfers, group))
    }

    /// Waits (on the leader, which applied the create) until the packet's funding settles.
    async fn await_funding(&self, group: u32, packet: Packet) -> Result<pb::Packet, Status> {
        let id = packet.id().clone();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.ctx.payment.fund_timeout_ms);
        loop {
            let reader = self.ctx.store.reader(group);
            let stage = reader.packet(&id).map_err(status::internal)?.map_or(packet.stage, |current| current.stage);
            match stage {
                Stage::Open | Stage::Closed => return self.read_packet(group, &id),
                Stage::FundingFailed => {
                    let reason = match reader.transfer(&fund_id(&id)).map_err(status::internal)? {
                        Some(t) => match t.settlement {
                            Settlement::Aborted { reason } => reason,
                            other => format!("{other:?}"),
                        },
                        None => "unknown".into(),
                    };
                    let refusal = PacketError::NotFunded { packet_id: id.to_string(), reason: format!("funding failed: {reason}") };
                    return Err(status::refused_field("sender", &refusal));
                }
                Stage::Funding => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(status::unavailable(format!(
                    "packet {id}: funding not settled within {} ms (is the payment ledger up?); retry with the same request_id",
                    self.ctx.payment.fund_timeout_ms
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn grab_reply(reply: Reply) -> Result<pb::GrabResponse, Status> {
    match reply {
        Reply::Grabbed { claim, shares_left } => Ok(pb::GrabResponse {
            packet_id: String::new(),
            share_index: claim.share_index,
            shares_left,
        }),
        Reply::Refused(e) => Err(status::refused(&e)),
        other => Err(status::internal(format!("unexpected reply to grab: {other:?}"))),
    }
}

fn open_reply(packet_id: &PacketId, reply: Reply) -> Result<pb::OpenResponse, Status> {
    match reply {
        Reply::Opened { claim } => Ok(pb::OpenResponse {
            packet_id: packet_id.to_string(),
            share_index: claim.share_index,
            amount_cents: claim.amount,
        }),
        Reply::Refused(e) => Err(status::refused(&e)),
        other => Err(status::internal(format!("unexpected reply to open: {other:?}"))),
    }
}

/// The handlers; the trait implementation below wraps each with metrics and a log span.
impl PacketService {
    async fn handle_create_packet(&self, request: Request<pb::CreatePacketRequest>) -> Result<Response<pb::CreatePacketResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let create = convert::create_from_pb(body.clone())?
            .validate(&self.ctx.limits)
            .map_err(|e| status::refused(&e))?;
        let now = now_millis();
        // The group depends only on the sender and request id, so every node (and a retry
        // on another day) picks the same one.
        let group = PacketId::derive(&create.sender, &create.request_id, now).group(self.ctx.groups.count());
        let make = || {
            let now = now_millis();
            Command::Create(NewPacket {
                packet_id: PacketId::derive(&create.sender, &create.request_id, now),
                request_id: create.request_id.clone(),
                sender: create.sender.clone(),
                total: create.total,
                shares: create.shares,
                kind: create.kind,
                recipients: create.recipients.clone(),
                message: create.message.clone(),
                created_at: now,
                expires_at: now.saturating_add(create.ttl_seconds.saturating_mul(1000)),
                seed: rand::random(),
                escrow: self.ctx.payment.escrow_account.clone(),
            })
        };
        match self.propose(group, forwarded, make).await? {
            Ok(Reply::Created(packet)) => {
                let mut resp = Response::new(pb::CreatePacketResponse { packet: Some(self.await_funding(group, packet).await?) });
                // This node leads the new packet's group: say so, so its grabs come straight here.
                if let Ok(v) = self.ctx.addr.parse() {
                    resp.metadata_mut().insert(LEADER_METADATA_KEY, v);
                }
                Ok(resp)
            }
            Ok(Reply::Refused(e)) => Err(status::refused(&e)),
            Ok(other) => Err(status::internal(format!("unexpected reply to create: {other:?}"))),
            Err(addr) => self.client(&addr)?.create_packet(forward_request(body)).await,
        }
    }

    async fn handle_grab(&self, request: Request<pb::GrabRequest>) -> Result<Response<pb::GrabResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let packet_id = parse_packet_id(&body.packet_id)?;
        check_user("user", &body.user)?;
        let group = packet_id.group(self.ctx.groups.count());
        let reply = match self.grab_here(group, forwarded, &packet_id, &body.user, false).await? {
            Ok(reply) => reply,
            Err(addr) => return self.client(&addr)?.grab(forward_request(body)).await,
        };
        let mut resp = grab_reply(reply)?;
        resp.packet_id = packet_id.to_string();
        Ok(Response::new(resp))
    }

    async fn handle_open(&self, request: Request<pb::OpenRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let packet_id = parse_packet_id(&body.packet_id)?;
        check_user("user", &body.user)?;
        let group = packet_id.group(self.ctx.groups.count());
        let op = PacketOp::Open { packet_id: packet_id.clone(), user: body.user.clone() };
        match self.submit(group, forwarded, op, None).await? {
            Ok(reply) => Ok(Response::new(open_reply(&packet_id, reply)?)),
            Err(addr) => self.client(&addr)?.open(forward_request(body)).await,
        }
    }

    async fn handle_grab_and_open(&self, request: Request<pb::GrabRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let packet_id = parse_packet_id(&body.packet_id)?;
        check_user("user", &body.user)?;
        let group = packet_id.group(self.ctx.groups.count());
        let reply = match self.grab_here(group, forwarded, &packet_id, &body.user, true).await? {
            Ok(reply) => reply,
            Err(addr) => return self.client(&addr)?.grab_and_open(forward_request(body)).await,
        };
        Ok(Response::new(open_reply(&packet_id, reply)?))
    }

    async fn handle_get_packet(&self, request: Request<pb::GetPacketRequest>) -> Result<Response<pb::Packet>, Status> {
        let forwarded = is_forwarded(&request);
        let body = request.into_inner();
        let packet_id = parse_packet_id(&body.packet_id)?;
        let group = packet_id.group(self.ctx.groups.count());
        let consistency = pb::ReadConsistency::try_from(body.consistency)
            .map_err(|_| status::invalid("consistency", "must be LINEARIZABLE or LOCAL"))?;
        if consistency == pb::ReadConsistency::Linearizable
            && let Some(addr) = self.read_barrier(group, forwarded).await?
        {
            return self.client(&addr)?.get_packet(forward_request(body)).await;
        }
        Ok(Response::new(self.read_packet(group, &packet_id)?))
    }
}

impl PacketService {
    /// Runs a handler inside a span naming the packet, records its outcome and latency, and
    /// tells the client which leader serves the packet (a forwarded answer already carries
    /// the leader's own hint).
    async fn observed<T>(
        &self,
        method: &'static str,
        packet_id: &str,
        handler: impl std::future::Future<Output = Result<Response<T>, Status>>,
    ) -> Result<Response<T>, Status> {
        use tracing::Instrument;
        let started = std::time::Instant::now();
        let group = PacketId::parse(packet_id).map(|id| id.group(self.ctx.groups.count())).ok();
        // Every log line of the request carries the packet and its group.
        let span = tracing::info_span!("request", method, packet_id = %packet_id, group = ?group);
        let mut result = handler.instrument(span).await;
        let code = match &result {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        self.ctx.metrics.request(method, started, code);
        let leads = group.and_then(|g| self.ctx.groups.get(g)).is_some_and(|raft| raft.is_leader());
        if leads {
            let metadata = match &mut result {
                Ok(resp) => resp.metadata_mut(),
                Err(status) => status.metadata_mut(),
            };
            if !metadata.contains_key(LEADER_METADATA_KEY)
                && let Ok(v) = self.ctx.addr.parse()
            {
                metadata.insert(LEADER_METADATA_KEY, v);
            }
        }
        result
    }
}

#[tonic::async_trait]
impl RedPacket for PacketService {
    async fn create_packet(&self, request: Request<pb::CreatePacketRequest>) -> Result<Response<pb::CreatePacketResponse>, Status> {
        self.observed("create_packet", "", self.handle_create_packet(request)).await
    }

    async fn grab(&self, request: Request<pb::GrabRequest>) -> Result<Response<pb::GrabResponse>, Status> {
        let id = request.get_ref().packet_id.clone();
        self.observed("grab", &id, self.handle_grab(request)).await
    }

    async fn open(&self, request: Request<pb::OpenRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let id = request.get_ref().packet_id.clone();
        self.observed("open", &id, self.handle_open(request)).await
    }

    async fn grab_and_open(&self, request: Request<pb::GrabRequest>) -> Result<Response<pb::OpenResponse>, Status> {
        let id = request.get_ref().packet_id.clone();
        self.observed("grab_and_open", &id, self.handle_grab_and_open(request)).await
    }

    async fn get_packet(&self, request: Request<pb::GetPacketRequest>) -> Result<Response<pb::Packet>, Status> {
        let id = request.get_ref().packet_id.clone();
        self.observed("get_packet", &id, self.handle_get_packet(request)).await
    }

    async fn batch(&self, request: Request<pb::BatchRequest>) -> Result<Response<pb::BatchResponse>, Status> {
        self.observed("batch", "", super::batch::serve(self, request)).await
    }

    type BatchStreamStream = super::batch::AnswerStream;

    async fn batch_stream(
        &self,
        request: Request<tonic::Streaming<pb::BatchRequest>>,
    ) -> Result<Response<Self::BatchStreamStream>, Status> {
        super::batch::serve_stream(self.clone(), self.ctx.draining.subscribe(), &self.ctx.metrics, request)
    }
}
