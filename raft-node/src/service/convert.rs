//! Conversions between the protobuf messages and the packet domain types.

use redpacket_proto::v1 as pb;
use tonic::Status;

use super::status::invalid;
use std::collections::HashMap;

use crate::packet::Claim;
use crate::packet::Stage;
use crate::packet::transfer::Settlement;
use crate::packet::transfer::Transfer;
use crate::packet::transfer::fund_id;
use crate::packet::transfer::pay_id;
use crate::packet::transfer::refund_id;
use crate::packet::Kind;
use crate::packet::Packet;
use crate::packet::Recipients;
use crate::packet::best_luck;
use crate::packet::validate::CreateRequest;

pub fn kind_from_pb(kind: i32) -> Result<Kind, Status> {
    match pb::PacketKind::try_from(kind) {
        Ok(pb::PacketKind::Lucky) => Ok(Kind::Lucky),
        Ok(pb::PacketKind::Equal) => Ok(Kind::Equal),
        _ => Err(invalid("kind", "must be LUCKY or EQUAL")),
    }
}

pub fn kind_to_pb(kind: Kind) -> pb::PacketKind {
    match kind {
        Kind::Lucky => pb::PacketKind::Lucky,
        Kind::Equal => pb::PacketKind::Equal,
    }
}

pub fn recipients_from_pb(r: Option<pb::Recipients>) -> Result<Recipients, Status> {
    match r.and_then(|r| r.to) {
        Some(pb::recipients::To::User(u)) => Ok(Recipients::User(u)),
        Some(pb::recipients::To::Group(g)) => Ok(Recipients::Group(g.members)),
        Some(pb::recipients::To::Anyone(true)) => Ok(Recipients::Anyone),
        Some(pb::recipients::To::Anyone(false)) => Err(invalid("recipients.anyone", "must be true when set")),
        None => Err(invalid("recipients", "must name a user, a group, or anyone")),
    }
}

pub fn recipients_to_pb(r: &Recipients) -> pb::Recipients {
    let to = match r {
        Recipients::User(u) => pb::recipients::To::User(u.clone()),
        Recipients::Group(m) => pb::recipients::To::Group(pb::GroupMembers { members: m.clone() }),
        Recipients::Anyone => pb::recipients::To::Anyone(true),
    };
    pb::Recipients { to: Some(to) }
}

pub fn create_from_pb(req: pb::CreatePacketRequest) -> Result<CreateRequest, Status> {
    Ok(CreateRequest {
        request_id: req.request_id,
        sender: req.sender,
        total: req.total_cents,
        shares: req.shares,
        kind: kind_from_pb(req.kind)?,
        recipients: recipients_from_pb(req.recipients)?,
        message: req.message,
        ttl_seconds: req.expires_in_seconds,
    })
}

pub fn settlement_to_pb(t: Option<&Transfer>) -> pb::Settlement {
    match t.map(|t| &t.settlement) {
        None => pb::Settlement::Unspecified,
        Some(Settlement::Pending) => pb::Settlement::Pending,
        Some(Settlement::Committed) => pb::Settlement::Settled,
        Some(Settlement::Aborted { .. }) => pb::Settlement::Failed,
    }
}

pub fn stage_to_pb(stage: Stage) -> pb::PacketStage {
    match stage {
        Stage::Funding => pb::PacketStage::Funding,
        Stage::Open => pb::PacketStage::Open,
        Stage::FundingFailed => pb::PacketStage::FundingFailed,
        Stage::Closed => pb::PacketStage::Closed,
    }
}

/// The packet's transfers by id, as read from its group: what `packet_to_pb` shows.
pub type Transfers = HashMap<String, Transfer>;

pub fn claim_to_pb(c: &Claim, best: Option<u32>, payment: pb::Settlement) -> pb::Claim {
    let opened = c.opened_at.is_some();
    pb::Claim {
        user: c.user.clone(),
        share_index: c.share_index,
        amount_cents: opened.then_some(c.amount),
        grabbed_at_ms: c.grabbed_at,
        opened_at_ms: c.opened_at,
        best_luck: best == Some(c.share_index),
        payment: payment as i32,
    }
}

pub fn packet_to_pb(p: &Packet, claims: &[Claim], transfers: &Transfers, group: u32) -> pb::Packet {
    let best = best_luck(p, claims);
    let t = &p.terms;
    let id = &t.packet_id;
    pb::Packet {
        packet_id: t.packet_id.to_string(),
        sender: t.sender.clone(),
        total_cents: t.total,
        shares: t.shares,
        kind: kind_to_pb(t.kind) as i32,
        recipients: Some(recipients_to_pb(&t.recipients)),
        message: t.message.clone(),
        created_at_ms: t.created_at,
        expires_at_ms: t.expires_at,
        shares_grabbed: p.grabbed,
        shares_opened: p.opened,
        remaining_cents: p.unopened_cents(),
        claims: claims
            .iter()
            .map(|c| claim_to_pb(c, best, settlement_to_pb(transfers.get(&pay_id(id, c.share_index)))))
            .collect(),
        group,
        stage: stage_to_pb(p.stage) as i32,
        funding: settlement_to_pb(transfers.get(&fund_id(id))) as i32,
        refunded_cents: p.refunded_cents,
        refund: settlement_to_pb(transfers.get(&refund_id(id))) as i32,
    }
}
