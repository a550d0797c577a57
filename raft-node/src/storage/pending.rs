//! The ids of every group's unsettled transfers, kept in memory.
//!
//! The leader's settler asks for pending transfers several times a second and the metrics
//! count them every second. In RocksDB each settled transfer leaves a tombstone under `U`
//! until compaction drops it, and a scan steps over every one: after a minute at 10,000
//! grabs/s a pass would walk hundreds of thousands of them to find a few live keys. Profiled
//! on the `many` workload, such scans were 5 % of all CPU. This set answers both questions
//! without a scan; the transfers themselves are still read from RocksDB, by key.
//!
//! Like the packet views ([`super::view`]) it follows the applied state exactly, because only
//! the group's state machine changes it, with what it has just committed: after each apply
//! batch ([`PendingTransfers::applied`]), and from a scan of `U` when the store opens and
//! after a snapshot install ([`PendingTransfers::load`]).
//!
//! It also notes when each group last recorded a payment, so the settler can tell a group in
//! the middle of a race (see `crate::settlement`). That instant is this node's clock, not
//! replicated state: nothing applied depends on it.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::MutexGuard;
use std::time::Instant;

use crate::packet::transfer::is_pay_id;

/// What one apply batch did to the unsettled transfers.
#[derive(Debug, Default)]
pub struct PendingChange {
    pub recorded: Vec<String>,
    pub settled: Vec<String>,
}

/// The unsettled transfer ids of every group of a node, in id order (the order of `U`).
pub struct PendingTransfers {
    groups: Vec<Mutex<GroupPending>>,
}

#[derive(Default)]
struct GroupPending {
    ids: BTreeSet<String>,
    /// When an apply batch of this node last recorded a payment of the group.
    last_payment: Option<Instant>,
}

impl PendingTransfers {
    pub fn new(groups: u32) -> Self {
        PendingTransfers { groups: (0..groups).map(|_| Mutex::default()).collect() }
    }

    fn group(&self, group: u32) -> Option<MutexGuard<'_, GroupPending>> {
        self.groups.get(group as usize).map(|m| m.lock().expect("pending transfers lock"))
    }

    /// Replaces the group's set with what RocksDB holds.
    pub fn load(&self, group: u32, ids: impl IntoIterator<Item = String>) {
        if let Some(mut pending) = self.group(group) {
            pending.ids = ids.into_iter().collect();
        }
    }

    /// Records a committed apply batch: what it recorded, then what it settled.
    pub fn applied(&self, group: u32, change: PendingChange) {
        if change.recorded.is_empty() && change.settled.is_empty() {
            return;
        }
        let Some(mut pending) = self.group(group) else { return };
        if change.recorded.iter().any(|id| is_pay_id(id)) {
            pending.last_payment = Some(Instant::now());
        }
        pending.ids.extend(change.recorded);
        for id in &change.settled {
            pending.ids.remove(id);
        }
    }

    /// The first `limit` unsettled ids of the group that `keep` accepts, in id order. (A
    /// filter walks past every id it rejects; the settler only leaves payments out while the
    /// group has at most `settlement::BACKLOG` pending.)
    pub fn first(&self, group: u32, limit: usize, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let Some(pending) = self.group(group) else { return Vec::new() };
        pending.ids.iter().filter(|id| keep(id)).take(limit).cloned().collect()
    }

    pub fn count(&self, group: u32) -> usize {
        self.group(group).map_or(0, |pending| pending.ids.len())
    }

    /// When this node last recorded a payment of the group (`None`: not since it started).
    pub fn last_payment(&self, group: u32) -> Option<Instant> {
        self.group(group).and_then(|pending| pending.last_payment)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn follows_recorded_and_settled_transfers_in_id_order() {
        let pending = PendingTransfers::new(2);
        pending.load(1, ids(&["pay:b:0"]));
        pending.applied(1, PendingChange { recorded: ids(&["fund:c", "pay:a:1"]), settled: ids(&["pay:b:0"]) });
        assert_eq!(pending.first(1, 10, |_| true), ids(&["fund:c", "pay:a:1"]));
        assert_eq!(pending.first(1, 1, |_| true), ids(&["fund:c"]));
        assert_eq!(pending.count(1), 2);
        assert_eq!(pending.count(0), 0, "groups are apart");
        // Recorded and settled in one batch: gone.
        pending.applied(1, PendingChange { recorded: ids(&["refund:c"]), settled: ids(&["refund:c", "fund:c"]) });
        assert_eq!(pending.first(1, 10, |_| true), ids(&["pay:a:1"]));
        pending.load(1, Vec::new());
        assert_eq!(pending.count(1), 0);
        assert!(pending.first(9, 10, |_| true).is_empty(), "an unknown group has none");
    }

    #[test]
    fn payments_can_be_left_out_and_their_last_recording_is_noted() {
        let pending = PendingTransfers::new(2);
        pending.applied(1, PendingChange { recorded: ids(&["fund:c"]), settled: Vec::new() });
        assert_eq!(pending.last_payment(1), None, "a funding is not a payment");
        let before = Instant::now();
        pending.applied(1, PendingChange { recorded: ids(&["pay:a:1", "pay:b:0", "refund:d"]), settled: Vec::new() });
        assert!(pending.last_payment(1).is_some_and(|at| at >= before));
        assert_eq!(pending.last_payment(0), None, "groups are apart");
        let not_a_payment = |id: &str| !is_pay_id(id);
        assert_eq!(pending.first(1, 10, not_a_payment), ids(&["fund:c", "refund:d"]));
        assert_eq!(pending.first(1, 1, not_a_payment), ids(&["fund:c"]));
        assert_eq!(pending.first(1, 10, |_| true), ids(&["fund:c", "pay:a:1", "pay:b:0", "refund:d"]));
    }
}
