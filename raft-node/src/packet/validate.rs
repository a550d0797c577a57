//! Checks on a create request before it reaches the log. Each refusal names the field.

use super::Cents;
use super::Kind;
use super::PacketError;
use super::Recipients;

/// Operator-configured bounds (see `config/`). Defaults follow WeChat: at most 200 yuan and
/// 100 shares per packet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest total of one packet, in cents.
    pub max_total_cents: Cents,
    /// Most shares in one packet.
    pub max_shares: u32,
    /// Most members listed in a group packet.
    pub max_group_members: usize,
    /// Longest message, in bytes.
    pub max_message_bytes: usize,
    /// Default and largest time to live of a packet, in seconds.
    pub default_ttl_seconds: u64,
    pub max_ttl_seconds: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_total_cents: 20_000,
            max_shares: 100,
            max_group_members: 500,
            max_message_bytes: 256,
            default_ttl_seconds: 24 * 3600,
            max_ttl_seconds: 7 * 24 * 3600,
        }
    }
}

/// Longest user id or request id accepted.
pub const MAX_ID_BYTES: usize = 64;

/// A create request as received, before the leader adds its seed and clock.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub request_id: String,
    pub sender: String,
    pub total: Cents,
    pub shares: u32,
    pub kind: Kind,
    pub recipients: Recipients,
    pub message: String,
    /// 0 means the default.
    pub ttl_seconds: u64,
}

/// Checks a user id (also used for the sender): non-empty, short, printable.
pub fn user_id(field: &str, user: &str) -> Result<(), PacketError> {
    if user.is_empty() {
        return Err(PacketError::invalid(field, "must not be empty"));
    }
    if user.len() > MAX_ID_BYTES {
        return Err(PacketError::invalid(field, format!("must be at most {MAX_ID_BYTES} bytes")));
    }
    if user.chars().any(|c| c.is_control()) {
        return Err(PacketError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

impl CreateRequest {
    /// Validates the request against the limits; on success the recipients are normalised
    /// (group members sorted and deduplicated) and the time to live resolved.
    pub fn validate(mut self, limits: &Limits) -> Result<CreateRequest, PacketError> {
        user_id("request_id", &self.request_id)?;
        user_id("sender", &self.sender)?;
        if self.shares == 0 {
            return Err(PacketError::invalid("shares", "must be at least 1"));
        }
        if self.shares > limits.max_shares {
            return Err(PacketError::invalid("shares", format!("must be at most {}", limits.max_shares)));
        }
        if self.total == 0 {
            return Err(PacketError::invalid("total_cents", "must be positive"));
        }
        if self.total > limits.max_total_cents {
            return Err(PacketError::invalid(
                "total_cents",
                format!("must be at most {} cents", limits.max_total_cents),
            ));
        }
        if self.total < u64::from(self.shares) {
            return Err(PacketError::invalid(
                "total_cents",
                format!("{} cents cannot give each of {} shares at least 1 cent", self.total, self.shares),
            ));
        }
        if self.kind == Kind::Equal && !self.total.is_multiple_of(u64::from(self.shares)) {
            return Err(PacketError::invalid(
                "total_cents",
                format!("an equal packet's total must divide evenly into {} shares", self.shares),
            ));
        }
        if self.message.len() > limits.max_message_bytes {
            return Err(PacketError::invalid(
                "message",
                format!("must be at most {} bytes", limits.max_message_bytes),
            ));
        }
        self.recipients = match self.recipients {
            Recipients::User(user) => {
                user_id("recipients.user", &user)?;
                if self.shares != 1 {
                    return Err(PacketError::invalid("shares", "an exclusive packet has exactly 1 share"));
                }
                Recipients::User(user)
            }
            Recipients::Group(mut members) => {
                if members.is_empty() {
                    return Err(PacketError::invalid("recipients.group.members", "must not be empty"));
                }
                if members.len() > limits.max_group_members {
                    return Err(PacketError::invalid(
                        "recipients.group.members",
                        format!("must list at most {} members", limits.max_group_members),
                    ));
                }
                for m in &members {
                    user_id("recipients.group.members", m)?;
                }
                members.sort();
                members.dedup();
                Recipients::Group(members)
            }
            Recipients::Anyone => Recipients::Anyone,
        };
        if self.ttl_seconds == 0 {
            self.ttl_seconds = limits.default_ttl_seconds;
        }
        if self.ttl_seconds > limits.max_ttl_seconds {
            return Err(PacketError::invalid(
                "expires_in_seconds",
                format!("must be at most {} seconds", limits.max_ttl_seconds),
            ));
        }
        Ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> CreateRequest {
        CreateRequest {
            request_id: "r1".into(),
            sender: "alice".into(),
            total: 1000,
            shares: 10,
            kind: Kind::Lucky,
            recipients: Recipients::Anyone,
            message: "恭喜发财".into(),
            ttl_seconds: 0,
        }
    }

    fn field_of(r: CreateRequest) -> String {
        match r.validate(&Limits::default()).unwrap_err() {
            PacketError::Invalid { field, .. } => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn a_good_request_passes_with_default_ttl() {
        let ok = request().validate(&Limits::default()).unwrap();
        assert_eq!(ok.ttl_seconds, 24 * 3600);
    }

    #[test]
    fn each_bad_field_is_named() {
        assert_eq!(field_of(CreateRequest { shares: 0, ..request() }), "shares");
        assert_eq!(field_of(CreateRequest { shares: 101, ..request() }), "shares");
        assert_eq!(field_of(CreateRequest { total: 0, ..request() }), "total_cents");
        assert_eq!(field_of(CreateRequest { total: 9, ..request() }), "total_cents");
        assert_eq!(field_of(CreateRequest { total: 20_001, ..request() }), "total_cents");
        assert_eq!(field_of(CreateRequest { total: 1001, kind: Kind::Equal, ..request() }), "total_cents");
        assert_eq!(field_of(CreateRequest { sender: "".into(), ..request() }), "sender");
        assert_eq!(field_of(CreateRequest { request_id: "".into(), ..request() }), "request_id");
        assert_eq!(field_of(CreateRequest { message: "x".repeat(257), ..request() }), "message");
        assert_eq!(field_of(CreateRequest { recipients: Recipients::Group(vec![]), ..request() }), "recipients.group.members");
        assert_eq!(field_of(CreateRequest { recipients: Recipients::User("bob".into()), ..request() }), "shares");
        assert_eq!(field_of(CreateRequest { recipients: Recipients::User("".into()), shares: 1, ..request() }), "recipients.user");
        assert_eq!(field_of(CreateRequest { ttl_seconds: 8 * 24 * 3600, ..request() }), "expires_in_seconds");
    }

    #[test]
    fn group_members_are_sorted_and_deduplicated() {
        let r = CreateRequest { recipients: Recipients::Group(vec!["c".into(), "a".into(), "c".into()]), ..request() };
        let ok = r.validate(&Limits::default()).unwrap();
        assert_eq!(ok.recipients, Recipients::Group(vec!["a".into(), "c".into()]));
    }
}
