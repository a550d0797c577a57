//! The receiving side of the Raft transport (`redpacket.raft.v1.RaftTransport`): decodes a
//! peer's message and hands it to the named group's Raft.

use std::sync::Arc;

use futures::StreamExt;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
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

fn reply<T: Serialize, E: std::fmt::Display>(result: Result<T, E>) -> Result<Response<RaftReply>, Status> {
    let reply = match result {
        Ok(v) => RaftReply { payload: codec::encode(&v).map_err(|e| Status::internal(e.to_string()))?, error: String::new() },
        Err(e) => RaftReply { payload: Vec::new(), error: e.to_string() },
    };
    Ok(Response::new(reply))
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    codec::decode(payload).map_err(|e| Status::invalid_argument(format!("payload: {e}")))
}

#[tonic::async_trait]
impl RaftTransport for TransportService {
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
            return Ok(Response::new(RaftReply { payload: Vec::new(), error: "node is stopping: it takes no leadership".into() }));
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
