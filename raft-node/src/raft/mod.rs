//! Consensus: the openraft type configuration, the commands carried by the log, the
//! transport between nodes, and the set of Raft groups a node runs.

pub mod balance;
pub mod groups;
pub mod network;

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

use crate::packet::Claim;
use crate::packet::Millis;
use crate::packet::NewPacket;
use crate::packet::Packet;
use crate::packet::PacketError;
use crate::packet::PacketId;
use crate::packet::transfer::Settlement;
use crate::storage::GroupStateMachine;

openraft::declare_raft_types!(
    /// openraft's types for redpacket: node ids are u64, nodes carry their gRPC address.
    pub TypeConfig:
        D = Command,
        R = Reply,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Raft = openraft::Raft<TypeConfig, GroupStateMachine>;

/// One operation on a group's packets: the application data of a Raft log entry.
///
/// Everything apply needs is in the command (time, seed): apply depends only on the entry
/// and the state before it, never on the replica's clock or randomness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create a packet; the leader filled in its id, seed and times.
    Create(NewPacket),
    /// `user` grabs a share at time `at` (the leader's clock); with `open`, also opens it.
    Grab { packet_id: PacketId, user: String, at: Millis, open: bool },
    /// `user` opens the share they grabbed.
    Open { packet_id: PacketId, user: String, at: Millis },
    /// Grabs and opens that reached the leader together, applied in order at time `at`:
    /// one log entry, one replication round and one disk sync for all of them.
    Batch { ops: Vec<PacketOp>, at: Millis },
    /// The ledger's final word on transfers the leader carried out.
    Settle(Vec<SettledTransfer>),
    /// Close these packets, expired by the leader's clock at `at`, refunding what is unopened.
    Expire { packet_ids: Vec<PacketId>, at: Millis },
    /// Cluster metadata, kept in group 0.
    Meta(MetaCommand),
}

/// One user's operation on a packet, as carried in a [`Command::Batch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PacketOp {
    Grab { packet_id: PacketId, user: String, open: bool },
    Open { packet_id: PacketId, user: String },
}

impl PacketOp {
    pub fn packet_id(&self) -> &PacketId {
        match self {
            PacketOp::Grab { packet_id, .. } | PacketOp::Open { packet_id, .. } => packet_id,
        }
    }
}

/// Cluster-wide facts that must survive any node: the membership-change lock (changes are
/// serialized cluster-wide) and the node ids that may never be used again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// Take the membership-change lock for `holder` (an operation such as `add-node:4`),
    /// unless another holder has it and it has not lapsed by `at`.
    Lock { holder: String, at: Millis, ttl_ms: u64 },
    Unlock { holder: String },
    /// Node `node_id` left the cluster: its id is never accepted again.
    Retire { node_id: u64 },
}

/// A transfer's outcome as the ledger decided it (`Committed` or `Aborted`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettledTransfer {
    pub transfer_id: String,
    pub outcome: Settlement,
}

impl Command {
    /// The packet the command is about, if it is about one.
    pub fn packet_id(&self) -> Option<&PacketId> {
        match self {
            Command::Create(p) => Some(&p.packet_id),
            Command::Grab { packet_id, .. } | Command::Open { packet_id, .. } => Some(packet_id),
            Command::Settle(_) | Command::Expire { .. } | Command::Meta(_) | Command::Batch { .. } => None,
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Create(p) => write!(f, "create({}, {} cents, {} shares)", p.packet_id, p.total, p.shares),
            Command::Grab { packet_id, user, open, .. } => write!(f, "grab({packet_id}, {user}, open={open})"),
            Command::Open { packet_id, user, .. } => write!(f, "open({packet_id}, {user})"),
            Command::Batch { ops, .. } => write!(f, "batch({} operations)", ops.len()),
            Command::Settle(list) => write!(f, "settle({} transfers)", list.len()),
            Command::Expire { packet_ids, .. } => write!(f, "expire({} packets)", packet_ids.len()),
            Command::Meta(m) => write!(f, "meta({m:?})"),
        }
    }
}

/// What applying a command produced, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// The packet as created (or as first created, for a repeated request).
    Created(Packet),
    /// The user's share (new or already held), and the shares still ungrabbed.
    Grabbed { claim: Claim, shares_left: u32 },
    /// The user's opened share.
    Opened { claim: Claim },
    /// The command was refused; nothing changed.
    Refused(PacketError),
    /// Transfers newly marked settled.
    Settled { count: usize },
    /// Packets closed.
    Closed { count: usize },
    /// The membership-change lock: who holds it now (empty: nobody).
    Lock { holder: String },
    /// One reply per operation of a [`Command::Batch`], in order.
    Batch(Vec<Reply>),
    /// Entries that carry no command (blank, membership).
    Empty,
}
