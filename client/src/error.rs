//! Errors of the client library: refusals by the packet rules are their own variants, so a
//! program can tell "sold out" from "try again" without reading messages.

use redpacket_proto::REASON_METADATA_KEY;
use redpacket_proto::v1::Reason;
use tonic::Code;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sold out: {0}")]
    SoldOut(String),
    #[error("expired: {0}")]
    Expired(String),
    #[error("not a recipient: {0}")]
    NotARecipient(String),
    #[error("not grabbed: {0}")]
    NotGrabbed(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("duplicate packet id: {0}")]
    DuplicateId(String),
    #[error("not funded: {0}")]
    NotFunded(String),
    /// Admission control turned the grab away: the few shares left are already being
    /// raced for by grabs in flight. Nothing changed; the share may still be there, so the
    /// caller may try again shortly (the client does not, to keep this answer fast).
    #[error("busy: {0}")]
    Busy(String),
    /// Every retry failed until the deadline: the cluster was unreachable or had no leader.
    /// The operation may or may not have happened; repeating it is safe.
    #[error("unavailable after retrying for {elapsed_ms} ms: {last}")]
    Unavailable { elapsed_ms: u64, last: Status },
    #[error("bad endpoint {0}")]
    Endpoint(String),
    /// Any other status from the server.
    #[error("{0}")]
    Status(Status),
}

impl Error {
    pub fn from_status(status: Status) -> Error {
        let reason = status
            .metadata()
            .get(REASON_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(Reason::from_str_name);
        let msg = status.message().to_string();
        match (reason, status.code()) {
            (Some(Reason::SoldOut), _) => Error::SoldOut(msg),
            (Some(Reason::Expired), _) => Error::Expired(msg),
            (Some(Reason::NotARecipient), _) => Error::NotARecipient(msg),
            (Some(Reason::NotGrabbed), _) => Error::NotGrabbed(msg),
            (Some(Reason::PacketNotFound), _) => Error::NotFound(msg),
            (Some(Reason::DuplicateId), _) => Error::DuplicateId(msg),
            (Some(Reason::NotFunded), _) => Error::NotFunded(msg),
            (Some(Reason::Busy), _) => Error::Busy(msg),
            (Some(Reason::InvalidInput), _) | (_, Code::InvalidArgument) => Error::InvalidArgument(msg),
            _ => Error::Status(status),
        }
    }

    /// The gRPC code behind this error.
    pub fn code(&self) -> Code {
        match self {
            Error::SoldOut(_) | Error::Expired(_) | Error::NotGrabbed(_) | Error::NotFunded(_) => Code::FailedPrecondition,
            Error::NotARecipient(_) => Code::PermissionDenied,
            Error::NotFound(_) => Code::NotFound,
            Error::InvalidArgument(_) | Error::Endpoint(_) => Code::InvalidArgument,
            Error::DuplicateId(_) => Code::AlreadyExists,
            Error::Unavailable { .. } => Code::Unavailable,
            Error::Busy(_) => Code::ResourceExhausted,
            Error::Status(s) => s.code(),
        }
    }
}

/// Whether a failed call may be retried: the cluster could not serve it now (no leader,
/// leader moved, node down, deadline passed). Every call is idempotent, so even a call whose
/// outcome is unknown is safe to repeat.
pub fn is_retryable(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled | Code::Unknown)
}
