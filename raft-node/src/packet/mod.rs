//! The red packet rules: what a packet is, who may grab it, how shares are handed out and
//! opened. A pure module: it knows nothing of RocksDB, Raft or gRPC, takes the time as an
//! argument, and draws amounts from the packet's stored seed, so the same inputs always give
//! the same outputs on every replica.

pub mod amount;
pub mod id;
pub mod rules;
pub mod transfer;
pub mod validate;

use serde::Deserialize;
use serde::Serialize;

pub use self::amount::Remaining;
pub use self::amount::Seed;
pub use self::id::PacketId;
pub use self::rules::GrabOutcome;
pub use self::rules::OpenOutcome;
pub use self::validate::Limits;

/// Money, in integer cents. Never floating point.
pub type Cents = u64;

/// Milliseconds since the Unix epoch, as stamped into a log entry by the group leader.
pub type Millis = u64;

/// How the total is split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Random shares by the double-average rule.
    Lucky,
    /// Equal shares; the total divides evenly.
    Equal,
}

/// Who may grab a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Recipients {
    /// An exclusive packet for one user; it has exactly one share.
    User(String),
    /// Only these members (sorted, no duplicates).
    Group(Vec<String>),
    /// Anyone who knows the packet id.
    Anyone,
}

impl Recipients {
    pub fn admits(&self, user: &str) -> bool {
        match self {
            Recipients::User(u) => u == user,
            Recipients::Group(members) => members.binary_search_by(|m| m.as_str().cmp(user)).is_ok(),
            Recipients::Anyone => true,
        }
    }
}

/// A create request after validation, with the leader's seed and clock filled in: exactly
/// what goes into the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewPacket {
    pub packet_id: PacketId,
    pub request_id: String,
    pub sender: String,
    pub total: Cents,
    pub shares: u32,
    pub kind: Kind,
    pub recipients: Recipients,
    pub message: String,
    pub created_at: Millis,
    pub expires_at: Millis,
    pub seed: Seed,
    /// The ledger account holding the packet's money until it is paid out or refunded.
    pub escrow: String,
}

/// Where a packet is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Created; the sender's money is being moved to escrow. Not grabbable yet.
    Funding,
    /// Funded: grabs and opens are accepted until it expires.
    Open,
    /// Funding failed (insufficient funds, unknown account): never grabbable.
    FundingFailed,
    /// Expired: what nobody opened is refunded; no more grabs or opens.
    Closed,
}

/// A packet as stored: its terms and its progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub terms: NewPacket,
    /// Shares handed out so far; share indexes `0..grabbed` are taken.
    pub grabbed: u32,
    /// Shares opened so far.
    pub opened: u32,
    /// Sum of the opened shares.
    pub opened_cents: Cents,
    /// What the next grab draws from.
    pub undrawn: Remaining,
    pub stage: Stage,
    /// What was refunded to the sender when the packet closed.
    pub refunded_cents: Cents,
}

/// One user's share of a packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub user: String,
    pub share_index: u32,
    /// Fixed when the share is grabbed, revealed when it is opened.
    pub amount: Cents,
    pub grabbed_at: Millis,
    pub opened_at: Option<Millis>,
}

/// Why a packet operation was refused. Refusals are ordinary results of applying a log
/// entry: they change nothing, and every replica reaches the same one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum PacketError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("packet_id: no packet {0}")]
    NotFound(String),
    #[error("packet {0} is sold out")]
    SoldOut(String),
    #[error("packet {0} has expired")]
    Expired(String),
    #[error("user: {user} is not a recipient of packet {packet_id}")]
    NotARecipient { packet_id: String, user: String },
    #[error("user: {user} has not grabbed a share of packet {packet_id}")]
    NotGrabbed { packet_id: String, user: String },
    #[error("packet_id: {0} already belongs to another create request; retry with a new request_id")]
    DuplicateId(String),
    #[error("packet {packet_id} is not funded: {reason}")]
    NotFunded { packet_id: String, reason: String },
}

impl PacketError {
    pub fn invalid(field: &str, reason: impl Into<String>) -> Self {
        PacketError::Invalid { field: field.to_string(), reason: reason.into() }
    }
}

impl Packet {
    /// A freshly created packet: nothing grabbed yet.
    pub fn new(terms: NewPacket) -> Self {
        let undrawn = Remaining { cents: terms.total, shares: terms.shares };
        Packet { terms, grabbed: 0, opened: 0, opened_cents: 0, undrawn, stage: Stage::Funding, refunded_cents: 0 }
    }

    pub fn id(&self) -> &PacketId {
        &self.terms.packet_id
    }

    pub fn shares_left(&self) -> u32 {
        self.terms.shares.checked_sub(self.grabbed).expect("grabbed never exceeds shares")
    }

    /// Money not yet revealed by an open.
    pub fn unopened_cents(&self) -> Cents {
        self.terms.total.checked_sub(self.opened_cents).expect("opened amounts never exceed the total")
    }

    pub fn is_expired(&self, now: Millis) -> bool {
        now >= self.terms.expires_at
    }
}

/// The share index of the best-luck claim once every share is opened: the highest amount,
/// the earlier share winning a tie. `None` while any share is unopened.
pub fn best_luck(packet: &Packet, claims: &[Claim]) -> Option<u32> {
    if packet.opened < packet.terms.shares {
        return None;
    }
    claims
        .iter()
        .filter(|c| c.opened_at.is_some())
        .max_by(|a, b| a.amount.cmp(&b.amount).then(b.share_index.cmp(&a.share_index)))
        .map(|c| c.share_index)
}
