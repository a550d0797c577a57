//! Money movements a packet causes, as recorded in the replicated state.
//!
//! Each movement has a deterministic id derived from the packet (`fund:<packet>`,
//! `pay:<packet>:<share>`, `refund:<packet>`), so every replica records the same transfer,
//! and the payment ledger, idempotent by id, carries it out at most once however often a
//! leader (old or new) retries it.

use serde::Deserialize;
use serde::Serialize;

use super::Cents;
use super::NewPacket;
use super::PacketId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferKind {
    /// Sender → escrow, when the packet is created.
    Fund,
    /// Escrow → grabber, when a share is opened.
    Pay,
    /// Escrow → sender, what nobody opened, when the packet expires.
    Refund,
}

/// Where a transfer stands, as far as the replicated log knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settlement {
    /// Recorded; the leader is carrying it out against the ledger.
    Pending,
    /// The ledger committed it.
    Committed,
    /// The ledger aborted it (only funding can fail: insufficient funds, unknown account).
    Aborted { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub id: String,
    pub kind: TransferKind,
    pub packet_id: PacketId,
    pub from: String,
    pub to: String,
    pub amount: Cents,
    pub settlement: Settlement,
}

impl Transfer {
    pub fn fund(terms: &NewPacket) -> Transfer {
        Transfer {
            id: format!("fund:{}", terms.packet_id),
            kind: TransferKind::Fund,
            packet_id: terms.packet_id.clone(),
            from: terms.sender.clone(),
            to: terms.escrow.clone(),
            amount: terms.total,
            settlement: Settlement::Pending,
        }
    }

    pub fn pay(terms: &NewPacket, share_index: u32, user: &str, amount: Cents) -> Transfer {
        Transfer {
            id: pay_id(&terms.packet_id, share_index),
            kind: TransferKind::Pay,
            packet_id: terms.packet_id.clone(),
            from: terms.escrow.clone(),
            to: user.to_string(),
            amount,
            settlement: Settlement::Pending,
        }
    }

    pub fn refund(terms: &NewPacket, amount: Cents) -> Transfer {
        Transfer {
            id: format!("refund:{}", terms.packet_id),
            kind: TransferKind::Refund,
            packet_id: terms.packet_id.clone(),
            from: terms.escrow.clone(),
            to: terms.sender.clone(),
            amount,
            settlement: Settlement::Pending,
        }
    }

    pub fn is_pending(&self) -> bool {
        self.settlement == Settlement::Pending
    }
}

/// How every payment's id begins (and no other transfer's).
const PAY_PREFIX: &str = "pay:";

pub fn pay_id(packet_id: &PacketId, share_index: u32) -> String {
    format!("{PAY_PREFIX}{packet_id}:{share_index}")
}

/// Whether `id` is a payment's (escrow → grabber), as opposed to a funding or a refund.
pub fn is_pay_id(id: &str) -> bool {
    id.starts_with(PAY_PREFIX)
}

pub fn fund_id(packet_id: &PacketId) -> String {
    format!("fund:{packet_id}")
}

pub fn refund_id(packet_id: &PacketId) -> String {
    format!("refund:{packet_id}")
}
