//! The receiving side of the Raft transport (`redpacket.raft.v1.RaftTransport`): decodes a
//! peer's message and hands it to the named group's Raft.
//!
//! A leader replicates to this node over one `StreamAppend` stream per group: each request is
//! a message on the stream, not a call of its own, and openraft's `Raft::stream_append`
//! pipelines them into the group and answers in order.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use futures::StreamExt;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::raft::AppendEntriesRequest;
use redpacket_proto::raft::RaftReply;
use redpacket_proto::raft::RaftRequest;
use redpacket_proto::raft::SnapshotChunk;
use redpacket_proto::raft::raft_transport_server::RaftTransport;
use serde::Serialize;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use super::NodeContext;
use crate::raft::Raft;
use crate::raft::TypeConfig;
use crate::raft::network::STOPPING_REFUSAL;
use crate::storage::codec;
use crate::storage::state_machine::SnapshotData;

pub struct TransportService {
    ctx: Arc<NodeContext>,
}

impl TransportService {
    pub fn new(ctx: Arc<NodeContext>) -> Self {
        TransportService { ctx }
    }

    fn raft(&self, group: u32) -> Result<&Raft, Status> {
        if crate::raft::network::isolated() {
            return Err(Status::unavailable("partitioned (raft-isolate)"));
        }
        self.ctx
            .groups
            .get(group)
            .ok_or_else(|| Status::not_found(format!("node {} has no group {group}", self.ctx.node_id)))
    }
}

/// A Raft call's outcome as a reply: the encoded value, or the error as text.
fn raft_reply<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> Result<RaftReply, Status> {
    Ok(match result {
        Ok(v) => RaftReply { payload: codec::encode(&v).map_err(|e| Status::internal(e.to_string()))?, error: String::new() },
        Err(e) => RaftReply { payload: Vec::new(), error: e.to_string() },
    })
}

fn reply<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    raft_reply(result).map(Response::new)
}

/// The metadata key naming the group of a `StreamAppend` stream.
pub const GROUP_METADATA: &str = "redpacket-group";

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    codec::decode(payload).map_err(|e| Status::invalid_argument(format!("payload: {e}")))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
    type StreamAppendStream = Pin<Box<dyn Stream<Item = Result<RaftReply, Status>> + Send + 'static>>;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftRequest>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        let group = request
            .metadata()
            .get(GROUP_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| Status::invalid_argument(format!("{GROUP_METADATA}: missing or not a group number")))?;
        let raft = self.raft(group)?.clone();
        let draining = self.ctx.draining.subscribe();
        if *draining.borrow() {
            return Err(Status::unavailable(format!("node {} is stopping", self.ctx.node_id)));
        }
        // Completes when this node's server drains.
        let drained = move || {
            let mut draining = draining.clone();
            async move {
                let _ = draining.wait_for(|draining| *draining).await;
            }
        };
        // The requests, decoded, until the leader ends the stream, a message is not a request
        // of this group, or this node is cut off (raft-isolate): then the stream ends, after
        // the replies to what came before, and the leader opens a new one.
        let requests = tokio_stream::StreamExt::map_while(request.into_inner(), move |message| {
            let message = message.ok()?;
            if message.group != group || crate::raft::network::isolated() {
                return None;
            }
            codec::decode::<AppendEntriesRequest<TypeConfig>>(&message.payload)
                .inspect_err(|e| tracing::warn!(group, error = %e, "undecodable append request ends the stream"))
                .ok()
        });
        // Both halves end when this node's server drains, so that its graceful stop need not
        // wait for the leader to close the stream (the leader then opens a new one, to the new
        // server). Ending the replies alone is not enough: openraft reads the requests in a task
        // of its own, which would hold this HTTP/2 stream, and so the connection, open until the
        // leader's next message; a leader that is stopping too sends none, and every server hung.
        let requests = requests.take_until(drained());
        let replies = raft.stream_append(requests).map(raft_reply);
        Ok(Response::new(Box::pin(replies.take_until(drained()))))
    }

    async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group)?;
        reply(raft.append_entries(decode(&req.payload)?).await)
    }

    async fn vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group)?;
        reply(raft.vote(decode(&req.payload)?).await)
    }

    async fn pre_vote(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        let req = request.into_inner();
        let raft = self.raft(req.group)?;
        reply(raft.pre_vote(decode(&req.payload)?).await)
    }

    async fn transfer_leader(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
        if self.ctx.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(Response::new(RaftReply { payload: Vec::new(), error: STOPPING_REFUSAL.into() }));
        }
        let req = request.into_inner();
        let raft = self.raft(req.group)?;
        reply(raft.handle_transfer_leader(decode(&req.payload)?).await)
    }

    async fn install_snapshot(&self, request: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftReply>, Status> {
        let mut stream = request.into_inner();
        let first = stream.next().await.ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let raft = self.raft(first.group)?;
        let (vote, meta): (VoteOf<TypeConfig>, SnapshotMetaOf<TypeConfig>) = decode(&first.header)?;
        let mut data: SnapshotData = first.data;
        while let Some(chunk) = stream.next().await {
            data.extend_from_slice(&chunk?.data);
        }
        reply(raft.install_full_snapshot(vote, SnapshotOf::<TypeConfig, SnapshotData> { meta, snapshot: data }).await)
    }
}
