//! The key layout of a node's one RocksDB instance.
//!
//! Every group's data lives in the same database, separated by a 4-byte big-endian group
//! prefix, so one WAL (and one fsync) serves all groups. Column families:
//!
//! | family     | key                                              | value                      |
//! |------------|--------------------------------------------------|----------------------------|
//! | `log`      | group · index (u64 BE)                           | Raft log entry             |
//! | `raft`     | group · `v` / `p` / `c`                          | vote / last purged / committed |
//! | `sm_meta`  | group                                            | last applied + membership  |
//! | `sm`       | group · `P` · packet id                          | packet                     |
//! | `sm`       | group · `C` · packet id · user                   | claim (a user's share)     |
//! | `sm`       | group · `R` · sender · 0x00 · request id         | packet id (create dedup)   |
//! | `sm`       | group · `U` · transfer id                        | transfer, while unsettled  |
//! | `sm`       | group · `T` · transfer id                        | transfer, once settled     |
//! | `sm`       | group · `E` · expires_at (u64 BE) · packet id    | (empty) expiry schedule    |
//! | `sm`       | 0 · `M` · `lock`                                 | membership-change lock     |
//! | `sm`       | 0 · `N` · node id (u64 BE)                       | (empty) retired node id    |
//! | `node`     | `node_id` / `groups` / `format`                  | identity, value encoding   |
//!
//! A transfer lives under exactly one of `U` and `T`: recording one is a single write, and
//! settling moves it to `T`. (The ids under `U` are also kept in memory, `super::pending`,
//! so the settler never scans `U`.)
//!
//! Big-endian integers keep keys in numeric order, so a group's log is one contiguous range
//! and `delete_range` purges or truncates it in one call. Packet ids have a fixed length, so
//! the user part of a claim key needs no separator.

use crate::packet::PacketId;

pub const CF_LOG: &str = "log";
pub const CF_RAFT: &str = "raft";
pub const CF_SM_META: &str = "sm_meta";
pub const CF_SM: &str = "sm";
pub const CF_NODE: &str = "node";
pub const ALL_CFS: [&str; 5] = [CF_LOG, CF_RAFT, CF_SM_META, CF_SM, CF_NODE];

pub const RAFT_VOTE: u8 = b'v';
pub const RAFT_PURGED: u8 = b'p';
pub const RAFT_COMMITTED: u8 = b'c';

const TAG_PACKET: u8 = b'P';
const TAG_CLAIM: u8 = b'C';
const TAG_REQUEST: u8 = b'R';
const TAG_TRANSFER: u8 = b'T';
const TAG_UNSETTLED: u8 = b'U';
const TAG_EXPIRY: u8 = b'E';
const TAG_META: u8 = b'M';
const TAG_RETIRED: u8 = b'N';

pub const NODE_ID: &[u8] = b"node_id";
pub const NODE_GROUPS: &[u8] = b"groups";
pub const NODE_FORMAT: &[u8] = b"format";

pub fn group_prefix(group: u32) -> [u8; 4] {
    group.to_be_bytes()
}

/// The first key after every key of `group`: the end of its range.
pub fn group_end(group: u32) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

pub fn log(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn log_index(key: &[u8]) -> u64 {
    u64::from_be_bytes(key[4..12].try_into().expect("log keys are 12 bytes"))
}

pub fn raft(group: u32, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

fn with_tag(group: u32, tag: u8, rest: &[&[u8]]) -> Vec<u8> {
    let len = 5 + rest.iter().map(|r| r.len()).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(&group.to_be_bytes());
    k.push(tag);
    for r in rest {
        k.extend_from_slice(r);
    }
    k
}

pub fn packet(group: u32, id: &PacketId) -> Vec<u8> {
    with_tag(group, TAG_PACKET, &[id.as_str().as_bytes()])
}

pub fn claim(group: u32, id: &PacketId, user: &str) -> Vec<u8> {
    with_tag(group, TAG_CLAIM, &[id.as_str().as_bytes(), user.as_bytes()])
}

/// Prefix of every claim of one packet.
pub fn claims_of(group: u32, id: &PacketId) -> Vec<u8> {
    with_tag(group, TAG_CLAIM, &[id.as_str().as_bytes()])
}

pub fn request(group: u32, sender: &str, request_id: &str) -> Vec<u8> {
    with_tag(group, TAG_REQUEST, &[sender.as_bytes(), &[0], request_id.as_bytes()])
}

pub fn transfer(group: u32, id: &str) -> Vec<u8> {
    with_tag(group, TAG_TRANSFER, &[id.as_bytes()])
}

pub fn membership_lock(group: u32) -> Vec<u8> {
    with_tag(group, TAG_META, &[b"lock"])
}

pub fn retired(group: u32, node_id: u64) -> Vec<u8> {
    with_tag(group, TAG_RETIRED, &[&node_id.to_be_bytes()])
}

pub fn retired_all(group: u32) -> Vec<u8> {
    with_tag(group, TAG_RETIRED, &[])
}

pub fn transfer_all(group: u32) -> Vec<u8> {
    with_tag(group, TAG_TRANSFER, &[])
}

pub fn packet_all(group: u32) -> Vec<u8> {
    with_tag(group, TAG_PACKET, &[])
}

pub fn unsettled(group: u32, id: &str) -> Vec<u8> {
    with_tag(group, TAG_UNSETTLED, &[id.as_bytes()])
}

/// Prefix of the unsettled transfers of a group.
pub fn unsettled_all(group: u32) -> Vec<u8> {
    with_tag(group, TAG_UNSETTLED, &[])
}

/// The transfer id of an unsettled-transfer key of `group`; `None` for any other key.
pub fn parse_unsettled(group: u32, key: &[u8]) -> Option<&str> {
    let rest = key.strip_prefix(&group.to_be_bytes())?.strip_prefix(&[TAG_UNSETTLED])?;
    std::str::from_utf8(rest).ok()
}

pub fn expiry(group: u32, expires_at: u64, id: &PacketId) -> Vec<u8> {
    with_tag(group, TAG_EXPIRY, &[&expires_at.to_be_bytes(), id.as_str().as_bytes()])
}

/// Prefix of the expiry schedule of a group.
pub fn expiry_all(group: u32) -> Vec<u8> {
    with_tag(group, TAG_EXPIRY, &[])
}

/// The packet id at the end of an expiry key, and its expiry time.
pub fn parse_expiry(key: &[u8]) -> Option<(u64, &str)> {
    let time = u64::from_be_bytes(key.get(5..13)?.try_into().ok()?);
    Some((time, std::str::from_utf8(key.get(13..)?).ok()?))
}

/// All keys of a group starting with `prefix` lie in `[prefix, prefix_end(prefix))`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_numerically_within_a_group_and_groups_do_not_mix() {
        assert!(log(1, 9) < log(1, 10));
        assert!(log(1, u64::MAX) < log(2, 0));
        assert!(log(1, u64::MAX).as_slice() < group_end(1).as_slice());
        assert_eq!(log_index(&log(7, 12345)), 12345);
    }

    #[test]
    fn claim_keys_of_a_packet_share_its_prefix_only() {
        let a = PacketId::parse("20261123000000000000000000000001").unwrap();
        let b = PacketId::parse("20261123000000000000000000000002").unwrap();
        assert!(claim(3, &a, "zed").starts_with(&claims_of(3, &a)));
        assert!(!claim(3, &b, "zed").starts_with(&claims_of(3, &a)));
    }

    #[test]
    fn unsettled_keys_give_back_their_transfer_id_and_only_they_do() {
        assert_eq!(parse_unsettled(3, &unsettled(3, "pay:x:7")), Some("pay:x:7"));
        assert_eq!(parse_unsettled(4, &unsettled(3, "pay:x:7")), None, "another group");
        assert_eq!(parse_unsettled(3, &transfer(3, "pay:x:7")), None, "a settled transfer");
    }
}
