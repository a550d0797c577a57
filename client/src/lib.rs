//! The redpacket client library: connect to any nodes of a cluster and send, grab and open
//! red packets.
//!
//! Any node serves any request (it forwards to the packet's group leader), so the client
//! needs no routing table. Answers name the leader that served them, and the client sends a
//! packet's next requests straight to that endpoint when it has one, saving the forwarding
//! hop; the hint is dropped as soon as that endpoint fails. When a node is down, or a group is between leaders, a call fails
//! with UNAVAILABLE; the client then tries the next endpoint with backoff until its deadline.
//! Every call is idempotent (creates carry a request id, a repeated grab or open returns the
//! first outcome), so retrying never takes a second share or creates a second packet.
//!
//! Grabs and opens made at the same time (say, by the many users a gateway serves) travel
//! together: concurrent calls to one node share one `RedPacket/Batch` request (see
//! `gather.rs`), and each still gets its own answer, exactly as from the single call.
//!
//! ```no_run
//! # async fn demo() -> Result<(), redpacket_client::Error> {
//! use redpacket_client::{Client, NewPacket, Recipients};
//! let client = Client::connect(["127.0.0.1:7001", "127.0.0.1:7002"])?;
//! let packet = client.create_packet(NewPacket::lucky("alice", 1000, 5, Recipients::Anyone)).await?;
//! let share = client.grab_and_open(&packet.packet_id, "bob").await?;
//! println!("bob got {} cents", share.amount_cents);
//! # Ok(()) }
//! ```

mod error;
mod gather;
pub mod ledger;
pub mod money;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use error::Error;
pub use error::is_retryable;
use redpacket_proto::v1 as pb;
use redpacket_proto::v1::cluster_admin_client::ClusterAdminClient;
use redpacket_proto::v1::red_packet_client::RedPacketClient;
pub use redpacket_proto::v1::NodeStatus;
pub use redpacket_proto::v1::Packet;
pub use redpacket_proto::v1::Claim as PacketClaim;
pub use redpacket_proto::v1::PacketStage;
pub use redpacket_proto::v1::ReadConsistency;
pub use redpacket_proto::v1::ReconcileReport;
pub use redpacket_proto::v1::MembershipProgress;
pub use redpacket_proto::v1::Settlement;
use tokio::time::Instant;
use tonic::Status;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

/// Reads a membership-change progress stream to its end.
async fn follow(
    mut stream: tonic::Streaming<pb::MembershipProgress>,
    mut progress: impl FnMut(&pb::MembershipProgress),
) -> Result<(), Error> {
    loop {
        match stream.message().await {
            Ok(Some(step)) => progress(&step),
            Ok(None) => return Ok(()),
            Err(status) => return Err(Error::from_status(status)),
        }
    }
}

/// How long and how often a call is retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Give up (with [`Error::Unavailable`]) after this long.
    pub deadline: Duration,
    /// Deadline of one attempt.
    pub attempt_timeout: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(10),
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// Who may grab a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// One user: an exclusive packet with one share.
    User(String),
    /// Only these group members.
    Group(Vec<String>),
    /// Anyone with the packet id.
    Anyone,
}

/// A packet to send.
#[derive(Debug, Clone)]
pub struct NewPacket {
    /// Makes the create idempotent: retries with the same id return the same packet. Filled
    /// with a random id when empty.
    pub request_id: String,
    pub sender: String,
    pub total_cents: u64,
    pub shares: u32,
    pub equal: bool,
    pub recipients: Recipients,
    pub message: String,
    /// Time to live; `None` for the server's default.
    pub expires_in: Option<Duration>,
}

impl NewPacket {
    /// A lucky (random shares) packet.
    pub fn lucky(sender: &str, total_cents: u64, shares: u32, recipients: Recipients) -> Self {
        NewPacket {
            request_id: String::new(),
            sender: sender.to_string(),
            total_cents,
            shares,
            equal: false,
            recipients,
            message: String::new(),
            expires_in: None,
        }
    }

    /// A packet of equal shares.
    pub fn equal(sender: &str, total_cents: u64, shares: u32, recipients: Recipients) -> Self {
        NewPacket { equal: true, ..Self::lucky(sender, total_cents, shares, recipients) }
    }

    fn to_pb(&self) -> pb::CreatePacketRequest {
        let to = match &self.recipients {
            Recipients::User(u) => pb::recipients::To::User(u.clone()),
            Recipients::Group(m) => pb::recipients::To::Group(pb::GroupMembers { members: m.clone() }),
            Recipients::Anyone => pb::recipients::To::Anyone(true),
        };
        pb::CreatePacketRequest {
            request_id: self.request_id.clone(),
            sender: self.sender.clone(),
            total_cents: self.total_cents,
            shares: self.shares,
            kind: if self.equal { pb::PacketKind::Equal } else { pb::PacketKind::Lucky } as i32,
            recipients: Some(pb::Recipients { to: Some(to) }),
            message: self.message.clone(),
            expires_in_seconds: self.expires_in.map(|d| d.as_secs().max(1)).unwrap_or(0),
        }
    }
}

/// A grabbed share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grabbed {
    pub share_index: u32,
    pub shares_left: u32,
}

/// An opened share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub share_index: u32,
    pub amount_cents: u64,
}

/// Adds the bearer token, if any, to every request.
#[derive(Clone, Default)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// A channel that carries the client's token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<Channel, Token>;

/// How to reach the cluster: TLS and credentials.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// A bearer token (client or admin) when the cluster requires one.
    pub token: Option<String>,
    /// PEM of the CA that signed the nodes' certificates; turns TLS on.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// The name the nodes' certificates are valid for (default "localhost").
    pub tls_server_name: Option<String>,
}

/// Largest `GetPacket` answer accepted: a packet lists every claim, about 45 bytes each, and
/// a node may be configured for packets far above gRPC's default 4 MiB (100,000 shares is
/// about 4.5 MB).
const MAX_PACKET_MESSAGE: usize = 64 << 20;

/// A connection to a redpacket cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    endpoints: Arc<Vec<(String, AuthChannel)>>,
    /// Per endpoint (same order): gathers concurrent grabs and opens into batch requests.
    gatherers: Arc<Vec<gather::Gatherer>>,
    /// Index of the endpoint that answered last; calls start there.
    current: Arc<AtomicUsize>,
    /// Packet id → index of the endpoint that leads its group, as the last answer said.
    leaders: Arc<Mutex<HashMap<String, usize>>>,
    policy: RetryPolicy,
}

/// Leader hints kept at most; the map starts over when full (a hint is only a shortcut).
const MAX_LEADER_HINTS: usize = 100_000;

impl Client {
    /// Connects (lazily) to the given `host:port` endpoints, in plaintext without a token.
    pub fn connect<I, S>(endpoints: I) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::connect_with(endpoints, ConnectOptions::default())
    }

    /// Connects (lazily) with TLS and/or a token.
    pub fn connect_with<I, S>(endpoints: I, options: ConnectOptions) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let token = match &options.token {
            Some(t) => Token(Some(format!("Bearer {t}").parse().map_err(|_| Error::Endpoint("token: not printable ASCII".into()))?)),
            None => Token(None),
        };
        let tls = options.tls_ca_pem.as_ref().map(|pem| {
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                .domain_name(options.tls_server_name.clone().unwrap_or_else(|| "localhost".into()))
        });
        let mut list = Vec::new();
        for e in endpoints {
            let addr = e.as_ref().trim().to_string();
            let scheme = if tls.is_some() { "https" } else { "http" };
            let uri = if addr.contains("://") { addr.clone() } else { format!("{scheme}://{addr}") };
            let mut endpoint = Endpoint::from_shared(uri).map_err(|_| Error::Endpoint(addr.clone()))?;
            if let Some(tls) = &tls {
                endpoint = endpoint.tls_config(tls.clone()).map_err(|e| Error::Endpoint(format!("{addr}: {e}")))?;
            }
            let channel = endpoint.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true).connect_lazy();
            list.push((addr, tonic::service::interceptor::InterceptedService::new(channel, token.clone())));
        }
        if list.is_empty() {
            return Err(Error::Endpoint("no endpoints given".into()));
        }
        let gatherers = list.iter().map(|(_, channel)| gather::Gatherer::new(channel.clone())).collect();
        Ok(Client {
            endpoints: Arc::new(list),
            gatherers: Arc::new(gatherers),
            current: Arc::new(AtomicUsize::new(0)),
            leaders: Default::default(),
            policy: RetryPolicy::default(),
        })
    }

    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|(a, _)| a.as_str())
    }

    /// Runs `call` against the endpoints, retrying retryable failures on the next endpoint
    /// with exponential backoff until the policy's deadline.
    async fn retry<T, F, Fut>(&self, call: F) -> Result<T, Error>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_for(None, call).await
    }

    /// Like [`Client::retry`], for a request about `packet`: starts at the endpoint that
    /// leads the packet's group when an earlier answer named it, and learns it from this one.
    async fn retry_for<T, F, Fut>(&self, packet: Option<&str>, mut call: F) -> Result<T, Error>
    where
        F: FnMut(AuthChannel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.retry_at(packet, |index| call(self.endpoints[index].1.clone())).await
    }

    /// A grab or open for one user, gathered with other concurrent calls to the same node
    /// into one batch request, and retried like any single call.
    async fn gathered(&self, operation: pb::Operation, packet_id: &str, user: &str) -> Result<pb::BatchResult, Error> {
        let item = pb::BatchItem { operation: operation as i32, packet_id: packet_id.to_string(), user: user.to_string() };
        self.retry_at(Some(packet_id), |index| {
            let gatherer = self.gatherers[index].clone();
            let item = item.clone();
            async move { gatherer.call(item).await }
        })
        .await
    }

    /// The retry loop: `call` gets the index of the endpoint to try.
    async fn retry_at<T, F, Fut>(&self, packet: Option<&str>, mut call: F) -> Result<T, Error>
    where
        F: FnMut(usize) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = Instant::now();
        let mut backoff = self.policy.initial_backoff;
        let hinted = packet.and_then(|p| self.leaders.lock().expect("hints").get(p).copied());
        let mut index = hinted.unwrap_or_else(|| self.current.load(Ordering::Relaxed));
        loop {
            let index_now = index % self.endpoints.len();
            let addr = &self.endpoints[index_now].0;
            let last = match tokio::time::timeout(self.policy.attempt_timeout, call(index_now)).await {
                Ok(Ok(resp)) => {
                    self.current.store(index_now, Ordering::Relaxed);
                    self.learn_leader(packet, resp.metadata());
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) if !is_retryable(&status) => {
                    self.learn_leader(packet, status.metadata());
                    return Err(Error::from_status(status));
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("{addr}: no answer within {:?}", self.policy.attempt_timeout)),
            };
            tracing::debug!(endpoint = %addr, "retrying after: {last}");
            if let Some(p) = packet {
                self.leaders.lock().expect("hints").remove(p);
            }
            if start.elapsed() + backoff > self.policy.deadline {
                return Err(Error::Unavailable { elapsed_ms: start.elapsed().as_millis() as u64, last });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.policy.max_backoff);
            index += 1;
        }
    }

    /// Remembers which endpoint leads `packet`'s group, when the answer says and the leader
    /// is one of our endpoints.
    fn learn_leader(&self, packet: Option<&str>, metadata: &tonic::metadata::MetadataMap) {
        let Some(packet) = packet else { return };
        if let Some(leader) = metadata.get(redpacket_proto::LEADER_METADATA_KEY).and_then(|v| v.to_str().ok()) {
            self.learn_leader_at(packet, leader);
        }
    }

    fn learn_leader_at(&self, packet: &str, leader: &str) {
        let Some(index) = self.endpoints.iter().position(|(addr, _)| addr == leader) else { return };
        let mut hints = self.leaders.lock().expect("hints");
        if hints.get(packet) != Some(&index) {
            if hints.len() >= MAX_LEADER_HINTS {
                hints.clear();
            }
            hints.insert(packet.to_string(), index);
        }
    }

    /// Sends a packet; returns it as created. Retrying with the same `request_id` returns
    /// the same packet.
    pub async fn create_packet(&self, packet: NewPacket) -> Result<Packet, Error> {
        let mut req = packet.to_pb();
        if req.request_id.is_empty() {
            req.request_id = format!("{:032x}", rand::random::<u128>());
        }
        // The answer names the leader of the new packet's group: the packet's first grabs
        // (often a whole group racing at once) then go straight there.
        let (resp, leader) = self.retry(|ch| {
            let req = req.clone();
            async move {
                let resp = RedPacketClient::new(ch).create_packet(req).await?;
                let leader = resp.metadata().get(redpacket_proto::LEADER_METADATA_KEY).and_then(|v| v.to_str().ok()).map(String::from);
                Ok(tonic::Response::new((resp.into_inner(), leader)))
            }
        }).await?;
        let packet = resp.packet.ok_or_else(|| Error::Status(Status::internal("create returned no packet")))?;
        if let Some(leader) = leader {
            self.learn_leader_at(&packet.packet_id, &leader);
        }
        Ok(packet)
    }

    /// Takes a share for `user`. Repeating it returns the same share.
    pub async fn grab(&self, packet_id: &str, user: &str) -> Result<Grabbed, Error> {
        let r = self.gathered(pb::Operation::Grab, packet_id, user).await?;
        Ok(Grabbed { share_index: r.share_index, shares_left: r.shares_left })
    }

    /// Opens the share `user` grabbed, revealing its amount. Repeating it returns the same.
    pub async fn open(&self, packet_id: &str, user: &str) -> Result<Opened, Error> {
        let r = self.gathered(pb::Operation::Open, packet_id, user).await?;
        Ok(Opened { share_index: r.share_index, amount_cents: r.amount_cents })
    }

    /// Grab and open in one round trip.
    pub async fn grab_and_open(&self, packet_id: &str, user: &str) -> Result<Opened, Error> {
        let r = self.gathered(pb::Operation::GrabAndOpen, packet_id, user).await?;
        Ok(Opened { share_index: r.share_index, amount_cents: r.amount_cents })
    }

    /// The packet and its claims, read linearizably through the group leader.
    pub async fn get_packet(&self, packet_id: &str) -> Result<Packet, Error> {
        self.get_packet_with(packet_id, ReadConsistency::Linearizable).await
    }

    /// The packet read with the given consistency. `Local` reads the answering node's own
    /// replica, which may lag: meant for operators and tests comparing replicas.
    pub async fn get_packet_with(&self, packet_id: &str, consistency: ReadConsistency) -> Result<Packet, Error> {
        let req = pb::GetPacketRequest { packet_id: packet_id.to_string(), consistency: consistency as i32 };
        // A local read is about the replica asked, so it takes no leader hint.
        let route = (consistency == ReadConsistency::Linearizable).then_some(packet_id);
        self.retry_for(route, |ch| {
            let req = req.clone();
            async move { RedPacketClient::new(ch).max_decoding_message_size(MAX_PACKET_MESSAGE).get_packet(req).await }
        }).await
    }

    /// Bootstraps a new cluster whose members are `(node id, address)` pairs.
    pub async fn init_cluster(&self, members: &[(u64, String)]) -> Result<u32, Error> {
        let req = pb::InitRequest {
            members: members.iter().map(|(id, addr)| pb::Member { node_id: *id, addr: addr.clone() }).collect(),
        };
        Ok(self.retry(|ch| {
            let req = req.clone();
            async move { ClusterAdminClient::new(ch).init(req).await }
        }).await?.groups)
    }

    /// Checks that every cent is where it should be: packets, their transfers and the
    /// ledger. The report lists each mismatch with its packet and transfer.
    pub async fn reconcile(&self) -> Result<ReconcileReport, Error> {
        self.retry(|ch| async move {
            ClusterAdminClient::new(ch).max_decoding_message_size(256 << 20).reconcile(pb::ReconcileRequest {}).await
        })
        .await
    }

    /// Adds node `node_id` (already running at `addr` with empty data) to every group;
    /// `progress` sees each step. Runs on the first endpoint that answers.
    pub async fn add_node(&self, node_id: u64, addr: &str, progress: impl FnMut(&pb::MembershipProgress)) -> Result<(), Error> {
        let req = pb::AddNodeRequest { node_id, addr: addr.to_string() };
        let stream = self
            .retry(|ch| {
                let req = req.clone();
                async move { ClusterAdminClient::new(ch).add_node(req).await }
            })
            .await?;
        follow(stream, progress).await
    }

    /// Moves leaderships off node `node_id`, removes it from every group and retires its id.
    pub async fn remove_node(&self, node_id: u64, progress: impl FnMut(&pb::MembershipProgress)) -> Result<(), Error> {
        let req = pb::RemoveNodeRequest { node_id };
        let stream = self
            .retry(|ch| {
                async move { ClusterAdminClient::new(ch).remove_node(req).await }
            })
            .await?;
        follow(stream, progress).await
    }

    /// Makes node `to` the leader of `group`.
    pub async fn transfer_leader(&self, group: u32, to: u64) -> Result<(), Error> {
        let req = pb::TransferLeaderRequest { group, to };
        self.retry(|ch| {
            async move { ClusterAdminClient::new(ch).transfer_leader(req).await }
        })
        .await?;
        Ok(())
    }

    /// Asks every endpoint to hand its leaderships to their preferred nodes now; returns how
    /// many transfers started.
    pub async fn balance_leaders(&self) -> Result<u32, Error> {
        let mut total = 0;
        for (_, channel) in self.endpoints.iter() {
            let r = ClusterAdminClient::new(channel.clone())
                .balance_leaders(pb::BalanceLeadersRequest {})
                .await
                .map_err(Error::from_status)?;
            total += r.into_inner().transfers;
        }
        Ok(total)
    }

    /// Configures a failpoint on the first endpoint's node (test builds only).
    pub async fn set_failpoint(&self, name: &str, actions: &str) -> Result<(), Error> {
        let req = pb::FailpointRequest { name: name.into(), actions: actions.into() };
        self.retry(|ch| {
            let req = req.clone();
            async move { ClusterAdminClient::new(ch).set_failpoint(req).await }
        })
        .await?;
        Ok(())
    }

    /// The status of every endpoint: `Err` for a node that did not answer (down).
    pub async fn cluster_status(&self) -> Vec<(String, Result<NodeStatus, Error>)> {
        self.cluster_status_with(false).await
    }

    /// Like [`Client::cluster_status`], with each group's state digest when `with_digest`.
    pub async fn cluster_status_with(&self, with_digest: bool) -> Vec<(String, Result<NodeStatus, Error>)> {
        let mut out = Vec::new();
        for (addr, channel) in self.endpoints.iter() {
            let mut req = tonic::Request::new(pb::StatusRequest { with_digest });
            req.set_timeout(Duration::from_secs(2));
            let result = ClusterAdminClient::new(channel.clone())
                .status(req)
                .await
                .map(|r| r.into_inner())
                .map_err(Error::from_status);
            out.push((addr.clone(), result));
        }
        out
    }
}
