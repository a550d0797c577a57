//! The sending side of the Raft transport: how one group's Raft talks to its peers.
//!
//! Every group of a node shares one gRPC channel per peer node ([`PeerChannels`]); each
//! message names its group so the receiver can route it. Raft messages are encoded with
//! [`crate::storage::codec`] into an opaque payload, which keeps the protobuf schema
//! independent of openraft's internal types.
//!
//! Replication goes over one long-lived `StreamAppend` stream per group and follower
//! ([`PeerConnection::stream_append`]): a request is a message on the stream, not a gRPC call
//! of its own (no new HTTP/2 stream, headers and trailers per request), and the leader sends
//! the next request without waiting for the reply to the last.

use std::collections::HashMap;
use std::collections::HashSet;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use futures::StreamExt;

use openraft::OptionalSend;
use openraft::RaftNetworkFactory;
use openraft::RaftNetworkV2;
use openraft::alias::SnapshotOf;
use openraft::alias::VoteOf;
use openraft::base::BoxFuture;
use openraft::base::BoxStream;
use openraft::errors::NetworkError;
use openraft::errors::RPCError;
use openraft::errors::ReplicationClosed;
use openraft::errors::StreamingError;
use openraft::errors::Unreachable;
use openraft::network::Backoff;
use openraft::network::RPCOption;
use openraft::raft::AppendEntriesRequest;
use openraft::raft::AppendEntriesResponse;
use openraft::raft::SnapshotResponse;
use openraft::raft::StreamAppendResult;
use openraft::raft::TransferLeaderRequest;
use openraft::raft::TransferLeaderResponse;
use openraft::raft::VoteRequest;
use openraft::raft::VoteResponse;
use redpacket_proto::raft::RaftReply;
use redpacket_proto::raft::RaftRequest;
use redpacket_proto::raft::SnapshotChunk;
use redpacket_proto::raft::raft_transport_client::RaftTransportClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::transport::ClientTlsConfig;
use tonic::transport::Endpoint;

use crate::auth::BearerToken;

use super::Node;
use super::NodeId;
use super::TypeConfig;
use crate::service::transport::GROUP_METADATA;
use crate::storage::codec;
use crate::storage::state_machine::SnapshotData;

/// Size of one snapshot chunk on the wire.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// Largest Raft message accepted or sent (a batch of entries, a snapshot chunk).
pub const MAX_RAFT_MESSAGE: usize = 64 << 20;

/// A channel to a peer node that presents this node's peer token.
pub type PeerChannel = InterceptedService<Channel, BearerToken>;

/// One lazily connected gRPC channel per peer address, shared by all groups (and by request
/// forwarding and administration).
pub struct PeerChannels {
    channels: Mutex<HashMap<String, Channel>>,
    token: BearerToken,
    tls: Option<ClientTlsConfig>,
    /// When each peer last showed it cannot take a leadership now: it refused one because it
    /// is stopping ([`STOPPING_REFUSAL`]), or a call to it failed UNAVAILABLE (it is draining
    /// to stop, or nothing listens at its address). A node handing over its leaderships skips
    /// those peers.
    unavailable: Mutex<HashMap<NodeId, Instant>>,
}

/// A node's answer to `TransferLeader` while it stops. Matched exactly by the sender, which
/// then offers its leaderships elsewhere.
pub const STOPPING_REFUSAL: &str = "node is stopping: it takes no leadership";

impl PeerChannels {
    pub fn new(peer_token: Option<&str>, tls: Option<ClientTlsConfig>) -> Self {
        PeerChannels { channels: Mutex::default(), token: BearerToken::new(peer_token), tls, unavailable: Mutex::default() }
    }

    fn note_unavailable(&self, peer: NodeId) {
        self.unavailable.lock().expect("unavailable peers lock").insert(peer, Instant::now());
    }

    /// Peers that showed since `since` that they cannot take a leadership now. (An older sign
    /// says nothing: that peer may have been restarted meanwhile.)
    pub fn unavailable_since(&self, since: Instant) -> HashSet<NodeId> {
        self.unavailable.lock().expect("unavailable peers lock").iter().filter(|(_, at)| **at >= since).map(|(id, _)| *id).collect()
    }

    pub fn channel(&self, addr: &str) -> Result<PeerChannel, tonic::transport::Error> {
        let mut channels = self.channels.lock().expect("peer channels lock");
        if let Some(ch) = channels.get(addr) {
            return Ok(InterceptedService::new(ch.clone(), self.token.clone()));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone())?;
        }
        let ch = endpoint
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        channels.insert(addr.to_string(), ch.clone());
        Ok(InterceptedService::new(ch, self.token.clone()))
    }
}

/// Creates connections for one group's Raft.
pub struct GroupNetwork {
    group: u32,
    peers: Arc<PeerChannels>,
}

impl GroupNetwork {
    pub fn new(group: u32, peers: Arc<PeerChannels>) -> Self {
        GroupNetwork { group, peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for GroupNetwork {
    type Network = PeerConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConnection {
        let client = self
            .peers
            .channel(&node.addr)
            .map(|ch| {
                RaftTransportClient::new(ch)
                    .max_decoding_message_size(MAX_RAFT_MESSAGE)
                    .max_encoding_message_size(MAX_RAFT_MESSAGE)
            })
            .map_err(|e| e.to_string());
        PeerConnection { group: self.group, target, client, unary_appends: Arc::default(), peers: self.peers.clone() }
    }
}

/// One group's connection to one peer node.
pub struct PeerConnection {
    group: u32,
    target: NodeId,
    client: Result<RaftTransportClient<PeerChannel>, String>,
    /// Set once the peer answered `StreamAppend` with UNIMPLEMENTED (a node of an earlier
    /// version, during a rolling upgrade): replication to it then goes one unary
    /// `AppendEntries` call at a time, as before streaming. Cleared by a failed call (the peer
    /// may be restarting, upgraded), so the next session tries a stream again.
    unary_appends: Arc<AtomicBool>,
    peers: Arc<PeerChannels>,
}

fn unreachable(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Unreachable(Unreachable::from_string(msg))
}

fn network(msg: impl ToString) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(msg))
}

/// A transport failure from tonic: refused connections are "unreachable" (openraft backs
/// off), the rest are network errors (retried).
fn from_status(target: NodeId, status: tonic::Status) -> RPCError<TypeConfig> {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            unreachable(format!("node {target}: {}", status.message()))
        }
        _ => network(format!("node {target}: {status}")),
    }
}

fn from_reply<T: DeserializeOwned>(target: NodeId, reply: RaftReply) -> Result<T, RPCError<TypeConfig>> {
    if !reply.error.is_empty() {
        return Err(network(format!("node {target}: {}", reply.error)));
    }
    codec::decode(&reply.payload).map_err(|e| network(format!("node {target}: bad reply: {e}")))
}

/// Whether this node's Raft traffic is cut (the `raft-isolate` failpoint: a simulated
/// network partition around the node, both directions; test builds only).
pub fn isolated() -> bool {
    fail::eval("raft-isolate", |_| ()).is_some()
}

impl PeerConnection {
    /// A failed call as openraft's error. A peer that answers UNAVAILABLE (it is draining to
    /// stop, or nothing listens at its address) cannot take a leadership now: noted for a
    /// hand-over in progress. (A peer that has exited can still look caught up; the last node
    /// of a cluster stopped one by one asked its gone peers until its window ran out.)
    fn failed(&self, status: tonic::Status) -> RPCError<TypeConfig> {
        if status.code() == tonic::Code::Unavailable {
            self.peers.note_unavailable(self.target);
        }
        from_status(self.target, status)
    }

    fn client(&self) -> Result<RaftTransportClient<PeerChannel>, RPCError<TypeConfig>> {
        if isolated() {
            return Err(unreachable(format!("node {}: partitioned (raft-isolate)", self.target)));
        }
        self.client.clone().map_err(|e| unreachable(format!("node {}: {e}", self.target)))
    }

    fn request<T: Serialize>(&self, body: &T, option: &RPCOption) -> Result<tonic::Request<RaftRequest>, RPCError<TypeConfig>> {
        let payload = codec::encode(body).map_err(|e| network(format!("encode: {e}")))?;
        let mut req = tonic::Request::new(RaftRequest { group: self.group, payload });
        req.set_timeout(option.hard_ttl());
        Ok(req)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerConnection {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(&rpc, &option)?;
        let reply = self.client()?.append_entries(req).await.map_err(|s| self.failed(s))?;
        from_reply(self.target, reply.into_inner())
    }

    /// Replication to the follower: openraft's requests go out as messages of one
    /// `StreamAppend` stream, and the replies come back in order. The stream lives as long as
    /// openraft's replication session; it ends with an error when a reply is late (older
    /// than the RPC option's hard TTL, as a single call's deadline would be), when the
    /// transport fails, or when the follower refuses (conflict, higher vote), and openraft
    /// then opens a new one.
    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<'s, Result<BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>, RPCError<TypeConfig>>>
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        if self.unary_appends.load(Ordering::Relaxed) {
            let unary_appends = self.unary_appends.clone();
            return Box::pin(async move {
                let replies = openraft::network::stream_append_sequential(self, input, option).await?;
                let replies = replies.inspect(move |reply| {
                    if reply.is_err() {
                        unary_appends.store(false, Ordering::Relaxed);
                    }
                });
                Ok(replies.boxed())
            });
        }
        Box::pin(async move {
            let mut client = self.client()?;
            let (group, target, ttl) = (self.group, self.target, option.hard_ttl());
            // When each request still unanswered was handed to the transport, oldest first.
            let unanswered = Arc::new(Mutex::new(VecDeque::<Instant>::new()));
            let sent = unanswered.clone();
            let requests = tokio_stream::StreamExt::map_while(input, move |rpc| {
                if isolated() {
                    return None;
                }
                let payload = codec::encode(&rpc)
                    .inspect_err(|e| tracing::error!(group, error = %e, "append request not encodable: stream ended"))
                    .ok()?;
                sent.lock().expect("unanswered lock").push_back(Instant::now());
                Some(RaftRequest { group, payload })
            });
            let mut request = tonic::Request::new(requests);
            request.metadata_mut().insert(GROUP_METADATA, group.into());
            // Opening is bounded too: a follower that accepts the connection but never
            // answers the stream's headers must not hold replication.
            let replies = tokio::time::timeout(ttl, client.stream_append(request))
                .await
                .map_err(|_| unreachable(format!("node {target}: append stream not opened within {ttl:?}")))?
                .map_err(|status| {
                    if status.code() == tonic::Code::Unimplemented {
                        tracing::info!(group, target, "peer does not stream appends: one call per request from now on");
                        self.unary_appends.store(true, Ordering::Relaxed);
                    }
                    self.failed(status)
                })?
                .into_inner();
            let replies = futures::stream::unfold(Some(replies), move |replies| {
                let unanswered = unanswered.clone();
                async move {
                    let mut replies = replies?;
                    let reply = loop {
                        // Wait for the next reply until the oldest unanswered request is `ttl`
                        // old; when none is, look again every `ttl` (one may be sent meanwhile).
                        let oldest = unanswered.lock().expect("unanswered lock").front().copied();
                        let wait = match oldest {
                            Some(sent) if sent.elapsed() >= ttl => {
                                let late = unreachable(format!("node {target}: no append reply within {ttl:?}"));
                                return Some((Err(late), None));
                            }
                            Some(sent) => ttl.saturating_sub(sent.elapsed()),
                            None => ttl,
                        };
                        if let Ok(reply) = tokio::time::timeout(wait, replies.next()).await {
                            break reply;
                        }
                    };
                    unanswered.lock().expect("unanswered lock").pop_front();
                    let result = match reply? {
                        Ok(reply) => from_reply::<StreamAppendResult<TypeConfig>>(target, reply),
                        Err(status) => Err(from_status(target, status)),
                    };
                    // After an error or a refusal the stream is over.
                    let go_on = matches!(result, Ok(Ok(_)));
                    Some((result, go_on.then_some(replies)))
                }
            });
            Ok(replies.boxed())
        })
    }

    async fn vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(&rpc, &option)?;
        let reply = self.client()?.vote(req).await.map_err(|s| self.failed(s))?;
        from_reply(self.target, reply.into_inner())
    }

    async fn pre_vote(&mut self, rpc: VoteRequest<TypeConfig>, option: RPCOption) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(&rpc, &option)?;
        let reply = self.client()?.pre_vote(req).await.map_err(|s| self.failed(s))?;
        from_reply(self.target, reply.into_inner())
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<TypeConfig>,
        snapshot: SnapshotOf<TypeConfig, SnapshotData>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let to_streaming = |e: RPCError<TypeConfig>| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            other => StreamingError::Network(NetworkError::from_string(other)),
        };
        let mut client = self.client().map_err(to_streaming)?;
        let header = codec::encode(&(&vote, &snapshot.meta)).map_err(|e| to_streaming(network(e)))?;
        let group = self.group;
        let data = snapshot.snapshot;
        let chunks = {
            let mut chunks = vec![SnapshotChunk { group, header, data: Vec::new() }];
            chunks.extend(data.chunks(SNAPSHOT_CHUNK).map(|c| SnapshotChunk { group, header: Vec::new(), data: c.to_vec() }));
            chunks
        };
        let target = self.target;
        let send = async move {
            let reply = client
                .install_snapshot(tokio_stream::iter(chunks))
                .await
                .map_err(|s| to_streaming(from_status(target, s)))?;
            from_reply::<SnapshotResponse<TypeConfig>>(target, reply.into_inner()).map_err(to_streaming)
        };
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            result = send => result,
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.request(&req, &option)?;
        let reply = self.client()?.transfer_leader(req).await.map_err(|s| self.failed(s))?.into_inner();
        if reply.error == STOPPING_REFUSAL {
            self.peers.note_unavailable(self.target);
        }
        from_reply(self.target, reply)
    }

    fn backoff(&self) -> Option<Backoff> {
        Some(Backoff::new(std::iter::repeat(Duration::from_millis(200))))
    }
}

#[cfg(test)]
mod tests {
    use redpacket_proto::raft::raft_transport_server::RaftTransport;
    use redpacket_proto::raft::raft_transport_server::RaftTransportServer;
    use tonic::Request;
    use tonic::Response;
    use tonic::Status;
    use tonic::Streaming;

    use super::*;

    fn unimplemented<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    /// A follower for these tests. With `streams`, it takes every request of a `StreamAppend`
    /// stream and answers none of them; without, it is a node of an earlier version: no
    /// `StreamAppend`, one unary `AppendEntries` per request. It counts the streams it was
    /// asked for, and fails its unary call number `fail_call` (counting from 1) as a
    /// restarting node would. With `stopping`, it refuses leaderships as a stopping node does.
    #[derive(Clone, Default)]
    struct Follower {
        streams: bool,
        streams_asked: Arc<std::sync::atomic::AtomicUsize>,
        calls: Arc<std::sync::atomic::AtomicUsize>,
        fail_call: usize,
        stopping: bool,
    }

    #[tonic::async_trait]
    impl RaftTransport for Follower {
        type StreamAppendStream = futures::stream::BoxStream<'static, Result<RaftReply, Status>>;

        async fn stream_append(&self, request: Request<Streaming<RaftRequest>>) -> Result<Response<Self::StreamAppendStream>, Status> {
            self.streams_asked.fetch_add(1, Ordering::SeqCst);
            if !self.streams {
                return unimplemented();
            }
            let silence = futures::stream::unfold(request.into_inner(), |mut requests| async move {
                while let Some(Ok(_)) = requests.next().await {}
                None
            });
            Ok(Response::new(silence.boxed()))
        }
        async fn append_entries(&self, request: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_call {
                return Err(Status::unavailable("restarting"));
            }
            let _: AppendEntriesRequest<TypeConfig> = codec::decode(&request.into_inner().payload).expect("an append request");
            let payload = codec::encode(&AppendEntriesResponse::<TypeConfig>::Success).expect("encodes");
            Ok(Response::new(RaftReply { payload, error: String::new() }))
        }
        async fn vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            unimplemented()
        }
        async fn pre_vote(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            unimplemented()
        }
        async fn transfer_leader(&self, _: Request<RaftRequest>) -> Result<Response<RaftReply>, Status> {
            if self.stopping {
                return Ok(Response::new(RaftReply { payload: Vec::new(), error: STOPPING_REFUSAL.into() }));
            }
            unimplemented()
        }
        async fn install_snapshot(&self, _: Request<Streaming<SnapshotChunk>>) -> Result<Response<RaftReply>, Status> {
            unimplemented()
        }
    }

    async fn serve(transport: impl RaftTransport) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(transport))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        addr.to_string()
    }

    fn heartbeat() -> AppendEntriesRequest<TypeConfig> {
        AppendEntriesRequest { vote: openraft::Vote::new(1, 1), prev_log_id: None, entries: Vec::new(), leader_commit: None }
    }

    /// During a rolling upgrade a follower may not know `StreamAppend` yet: the first session
    /// fails, and from then on replication to it goes one unary call per request, until a call
    /// fails (the follower may be restarting, upgraded): then a stream is tried again.
    #[tokio::test]
    async fn a_peer_without_streams_is_replicated_to_one_call_at_a_time() {
        let peer = Follower { fail_call: 3, ..Default::default() };
        let addr = serve(peer.clone()).await;
        let mut network = GroupNetwork::new(7, Arc::new(PeerChannels::new(None, None)));
        let mut follower = network.new_client(2, &Node { addr }).await;
        let option = RPCOption::new(Duration::from_secs(2));
        let first = follower.stream_append(Box::pin(futures::stream::iter([heartbeat()])), option.clone()).await.map(|_| ());
        assert!(first.is_err(), "the first session fails on UNIMPLEMENTED");
        let mut replies = follower
            .stream_append(Box::pin(futures::stream::iter([heartbeat(), heartbeat()])), option.clone())
            .await
            .expect("the next session opens");
        for _ in 0..2 {
            match replies.next().await {
                Some(Ok(Ok(_))) => {}
                other => panic!("expected an accepted append, got {other:?}"),
            }
        }
        assert!(replies.next().await.is_none(), "one reply per request");
        drop(replies);
        assert_eq!(peer.streams_asked.load(Ordering::SeqCst), 1, "no stream tried while calls succeed");

        // The third call fails: the session ends, and the next one tries a stream again.
        let mut replies = follower.stream_append(Box::pin(futures::stream::iter([heartbeat()])), option.clone()).await.unwrap();
        assert!(matches!(replies.next().await, Some(Err(_))), "the failed call ends the session");
        drop(replies);
        let again = follower.stream_append(Box::pin(futures::stream::iter([heartbeat()])), option).await.map(|_| ());
        assert!(again.is_err(), "the peer still has no streams");
        assert_eq!(peer.streams_asked.load(Ordering::SeqCst), 2, "a stream was tried again after the failed call");
    }

    /// A follower that stops answering must not hold replication forever: the stream ends as
    /// unreachable once a request has waited the RPC deadline, as a unary call would have.
    #[tokio::test]
    async fn a_stream_whose_follower_stops_answering_ends_as_unreachable() {
        let addr = serve(Follower { streams: true, ..Default::default() }).await;
        let mut network = GroupNetwork::new(7, Arc::new(PeerChannels::new(None, None)));
        let mut follower = network.new_client(2, &Node { addr }).await;
        // The request stream stays open after the one request, as openraft's does.
        let requests = futures::stream::iter([heartbeat()]).chain(futures::stream::pending());
        let ttl = Duration::from_millis(300);
        let started = Instant::now();
        let mut replies = follower.stream_append(Box::pin(requests), RPCOption::new(ttl)).await.expect("stream opens");
        let first = tokio::time::timeout(Duration::from_secs(5), replies.next()).await.expect("an answer within 5 s");
        let waited = started.elapsed();
        match first {
            Some(Err(RPCError::Unreachable(e))) => assert!(e.to_string().contains("no append reply"), "{e}"),
            other => panic!("expected unreachable, got {other:?}"),
        }
        assert!(waited >= ttl, "gave up after {waited:?}, before the deadline {ttl:?}");
        assert!(replies.next().await.is_none(), "the stream is over after the error");
    }

    /// A peer that refuses a leadership because it is stopping, or that nothing answers at,
    /// is noted, so a hand-over skips it; a sign from before a hand-over began says nothing
    /// (the peer may have been restarted since). Another failure notes nothing.
    #[tokio::test]
    async fn a_peer_that_cannot_take_leadership_is_skipped_from_then_on() {
        let peers = Arc::new(PeerChannels::new(None, None));
        let mut network = GroupNetwork::new(7, peers.clone());
        let transfer = || TransferLeaderRequest::<TypeConfig>::new(openraft::Vote::new(1, 1), 2, None);
        let option = || RPCOption::new(Duration::from_secs(5));

        let busy = serve(Follower::default()).await;
        let mut other = network.new_client(3, &Node { addr: busy }).await;
        assert!(other.transfer_leader(transfer(), option()).await.is_err());

        let earlier = Instant::now();
        let stopping = serve(Follower { stopping: true, ..Default::default() }).await;
        let mut peer = network.new_client(2, &Node { addr: stopping }).await;
        let refused = peer.transfer_leader(transfer(), option()).await.expect_err("a stopping peer refuses");
        assert!(refused.to_string().contains(STOPPING_REFUSAL), "{refused}");
        assert_eq!(peers.unavailable_since(earlier), HashSet::from([2]), "the refusal is noted, the other failure is not");

        let gone = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
        let mut dead = network.new_client(4, &Node { addr: gone }).await;
        assert!(dead.transfer_leader(transfer(), option()).await.is_err(), "nothing listens there");
        assert_eq!(peers.unavailable_since(earlier), HashSet::from([2, 4]), "a peer nothing answers at is noted too");
        assert!(peers.unavailable_since(Instant::now()).is_empty(), "a hand-over begun after the signs does not skip those peers");
    }
}
