//! How failures become gRPC statuses: refusals of the packet rules keep their meaning
//! (with the `redpacket-reason` trailer for programs), Raft conditions become UNAVAILABLE so
//! clients retry, and storage failures are INTERNAL.

use redpacket_proto::REASON_METADATA_KEY;
use redpacket_proto::v1::Reason;
use tonic::Code;
use tonic::Status;

use crate::packet::PacketError;

pub fn refused(err: &PacketError) -> Status {
    let (code, reason) = match err {
        PacketError::Invalid { .. } => (Code::InvalidArgument, Reason::InvalidInput),
        PacketError::NotFound(_) => (Code::NotFound, Reason::PacketNotFound),
        PacketError::SoldOut(_) => (Code::FailedPrecondition, Reason::SoldOut),
        PacketError::Expired(_) => (Code::FailedPrecondition, Reason::Expired),
        PacketError::NotGrabbed { .. } => (Code::FailedPrecondition, Reason::NotGrabbed),
        PacketError::NotARecipient { .. } => (Code::PermissionDenied, Reason::NotARecipient),
        PacketError::DuplicateId(_) => (Code::AlreadyExists, Reason::DuplicateId),
        PacketError::NotFunded { .. } => (Code::FailedPrecondition, Reason::NotFunded),
    };
    let mut status = Status::new(code, err.to_string());
    if let Ok(v) = reason.as_str_name().parse() {
        status.metadata_mut().insert(REASON_METADATA_KEY, v);
    }
    status
}

/// A refusal whose message is prefixed with the field it concerns.
pub fn refused_field(field: &str, err: &PacketError) -> Status {
    let base = refused(err);
    let mut status = Status::new(base.code(), format!("{field}: {err}"));
    *status.metadata_mut() = base.metadata().clone();
    status
}

pub fn invalid(field: &str, reason: impl Into<String>) -> Status {
    refused(&PacketError::invalid(field, reason))
}

/// Admission control's answer: the shares left are spoken for by grabs in flight.
pub fn busy(packet_id: &crate::packet::PacketId, shares_left: u32, waiting: u32) -> Status {
    let mut status = Status::resource_exhausted(format!(
        "packet {packet_id}: {shares_left} shares left and {waiting} grabs already waiting for them; retry shortly"
    ));
    if let Ok(v) = Reason::Busy.as_str_name().parse() {
        status.metadata_mut().insert(REASON_METADATA_KEY, v);
    }
    status
}

pub fn unavailable(msg: impl std::fmt::Display) -> Status {
    Status::unavailable(msg.to_string())
}

pub fn internal(msg: impl std::fmt::Display) -> Status {
    tracing::error!("internal error: {msg}");
    Status::internal(msg.to_string())
}
