//! The gRPC services a node serves: the public packet API, cluster administration, and the
//! receiving side of the Raft transport. All share one [`NodeContext`].

pub mod admin;
pub mod batch;
pub mod batcher;
pub mod convert;
pub mod membership;
pub mod packets;
pub mod route;
pub mod status;
pub mod transport;

use std::sync::Arc;
use std::time::Duration;

use redpacket_proto::payment::payment_ledger_client::PaymentLedgerClient;
use tonic::transport::Channel;

use crate::config::PaymentSettings;
use crate::packet::Limits;
use crate::raft::groups::Groups;
use crate::raft::network::PeerChannels;
use crate::storage::Store;

/// Everything a request handler needs.
pub struct NodeContext {
    pub node_id: u64,
    pub addr: String,
    pub groups: Arc<Groups>,
    pub store: Store,
    pub peers: Arc<PeerChannels>,
    pub limits: Limits,
    pub payment: PaymentSettings,
    pub ledger: PaymentLedgerClient<Channel>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Where the leader's grabs and opens queue for the log.
    pub batchers: batcher::Batchers,
    /// Set when the node is shutting down: it hands its leaderships over and takes no more.
    pub stopping: std::sync::atomic::AtomicBool,
    /// Set to true once the leaderships are handed over and the server drains: the peers'
    /// replication streams into this node end then, since a graceful server stop waits for
    /// every open stream, and a leader keeps its stream to a follower open indefinitely.
    pub draining: tokio::sync::watch::Sender<bool>,
}

/// How long a request waits for its group to elect a leader before answering UNAVAILABLE.
pub const LEADER_WAIT: Duration = Duration::from_secs(3);

/// Deadline of a request forwarded to a group leader.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

/// Metadata marking a request already forwarded once, so it is never forwarded again.
pub const FORWARDED_HEADER: &str = "redpacket-forwarded";
