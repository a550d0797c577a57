//! Packet identifiers and how they map to Raft groups.
//!
//! An id is the creation date (`YYYYMMDD`, UTC) followed by 24 hex digits derived from the
//! sender and the client's request id, e.g. `20261123` + `9f86d081884c7d659a2feaa0`. The
//! date lets storage tell hot packets from cold ones (seed 000 shards by date). The hex part
//! decides the group, so a create retried after midnight (new date, same hex part) reaches
//! the same group, which recognises the request id and returns the original packet.

use serde::Deserialize;
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_128;
use xxhash_rust::xxh3::xxh3_64;

use super::Millis;
use super::PacketError;

const DATE_LEN: usize = 8;
const HASH_LEN: usize = 24;
/// Length of every packet id.
pub const PACKET_ID_LEN: usize = DATE_LEN + HASH_LEN;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PacketId(String);

impl PacketId {
    /// The id of the packet created by `sender`'s request `request_id` at `now`.
    pub fn derive(sender: &str, request_id: &str, now: Millis) -> PacketId {
        let date = chrono::DateTime::from_timestamp_millis(now as i64)
            .unwrap_or_default()
            .format("%Y%m%d")
            .to_string();
        let mut input = Vec::with_capacity(sender.len() + request_id.len() + 1);
        input.extend_from_slice(sender.as_bytes());
        input.push(0);
        input.extend_from_slice(request_id.as_bytes());
        let hash = format!("{:032x}", xxh3_128(&input));
        PacketId(format!("{date}{}", &hash[..HASH_LEN]))
    }

    /// Checks the shape of an id received from outside.
    pub fn parse(s: &str) -> Result<PacketId, PacketError> {
        let ok = s.len() == PACKET_ID_LEN
            && s[..DATE_LEN].bytes().all(|b| b.is_ascii_digit())
            && s[DATE_LEN..].bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if ok {
            Ok(PacketId(s.to_string()))
        } else {
            Err(PacketError::invalid(
                "packet_id",
                format!("must be {PACKET_ID_LEN} characters: a YYYYMMDD date then {HASH_LEN} lowercase hex digits"),
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The creation date part, `YYYYMMDD`.
    pub fn date(&self) -> &str {
        &self.0[..DATE_LEN]
    }

    /// The Raft group holding this packet: xxh3-64 of the hex part, modulo the group count.
    /// xxh3 is specified bit-for-bit, so this never changes across versions or platforms.
    pub fn group(&self, groups: u32) -> u32 {
        (xxh3_64(&self.0.as_bytes()[DATE_LEN..]) % u64::from(groups)) as u32
    }
}

impl std::fmt::Display for PacketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_23_2026: Millis = 1_795_392_000_000 + 36_000_000; // 10:00 UTC

    #[test]
    fn id_carries_the_date_and_parses_back() {
        let id = PacketId::derive("alice", "req-1", NOV_23_2026);
        assert_eq!(id.date(), "20261123");
        assert_eq!(PacketId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn retry_after_midnight_stays_in_the_same_group() {
        let today = PacketId::derive("alice", "req-1", NOV_23_2026);
        let tomorrow = PacketId::derive("alice", "req-1", NOV_23_2026 + 86_400_000);
        assert_ne!(today, tomorrow);
        assert_eq!(today.group(16), tomorrow.group(16));
    }

    #[test]
    fn different_requests_get_different_ids() {
        let a = PacketId::derive("alice", "req-1", NOV_23_2026);
        let b = PacketId::derive("alice", "req-2", NOV_23_2026);
        let c = PacketId::derive("bob", "req-1", NOV_23_2026);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn group_hash_is_pinned() {
        // A changed hash would move existing packets to other groups: never change it.
        let id = PacketId::parse("20261123000000000000000000000001").unwrap();
        assert_eq!(id.group(16), PINNED_GROUP);
    }
    // Cross-checked with the Python `xxhash` package: xxh3_64(b"000000000000000000000001") % 16.
    const PINNED_GROUP: u32 = 10;

    #[test]
    fn malformed_ids_are_rejected_naming_the_field() {
        for bad in ["", "2026112", "20261123XYZ", "2026112300000000000000000000000G", "x0261123000000000000000000000001"] {
            let err = PacketId::parse(bad).unwrap_err();
            assert!(err.to_string().starts_with("packet_id:"), "{err}");
        }
    }
}
