//! The applied packets, kept decoded in memory.
//!
//! Every grab reads its packet twice: once on the leader's fast path (is it sold out, is the
//! user a recipient?) and once more in apply, on every replica. From RocksDB each read is a
//! memtable or block-cache lookup and a decode. The view keeps the packets last applied,
//! per group, so both reads are a hash lookup.
//!
//! It is exact, never ahead of or behind the applied state, because only the group's state
//! machine writes it, and only with what it has just committed to RocksDB:
//! - after each apply batch, the packets the batch wrote ([`PacketViews::applied`]);
//! - when apply reads a packet the view lacks, the value it read from RocksDB, which no
//!   one else can change meanwhile (apply is the group's only writer);
//! - a snapshot install clears the group's view.
//!
//! Other readers (the fast path) look in the view and fall back to RocksDB without filling
//! the view: a value they read could be overtaken by an apply before they put it in.
//! The view is bounded: a group's view starts over when it holds [`MAX_PACKETS`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;

use crate::packet::Packet;
use crate::packet::PacketId;

/// Packets kept per group (a packet is a few hundred bytes).
pub const MAX_PACKETS: usize = 8192;

type GroupView = HashMap<PacketId, Arc<Packet>>;

/// The views of every group of a node.
pub struct PacketViews {
    groups: Vec<Mutex<GroupView>>,
}

impl PacketViews {
    pub fn new(groups: u32) -> Self {
        PacketViews { groups: (0..groups).map(|_| Mutex::default()).collect() }
    }

    fn group(&self, group: u32) -> Option<std::sync::MutexGuard<'_, GroupView>> {
        self.groups.get(group as usize).map(|m| m.lock().expect("packet view lock"))
    }

    /// The packet as last applied, when the view has it.
    pub fn get(&self, group: u32, id: &PacketId) -> Option<Arc<Packet>> {
        self.group(group)?.get(id).cloned()
    }

    /// Records packets as they now are in RocksDB. Only the group's state machine calls
    /// this, with values it has committed or read while no apply could run.
    pub fn applied(&self, group: u32, packets: impl IntoIterator<Item = Arc<Packet>>) {
        let Some(mut view) = self.group(group) else { return };
        for packet in packets {
            if view.len() >= MAX_PACKETS && !view.contains_key(packet.id()) {
                view.clear();
            }
            view.insert(packet.id().clone(), packet);
        }
    }

    /// Forgets the group's packets (its state was replaced by a snapshot).
    pub fn clear(&self, group: u32) {
        if let Some(mut view) = self.group(group) {
            view.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Kind;
    use crate::packet::NewPacket;
    use crate::packet::Recipients;

    fn packet(request: &str) -> Arc<Packet> {
        Arc::new(Packet::new(NewPacket {
            packet_id: PacketId::derive("alice", request, 0),
            request_id: request.into(),
            sender: "alice".into(),
            total: 100,
            shares: 2,
            kind: Kind::Lucky,
            recipients: Recipients::Anyone,
            message: String::new(),
            created_at: 0,
            expires_at: 1_000,
            seed: [7; 32],
            escrow: "escrow".into(),
        }))
    }

    #[test]
    fn holds_the_last_applied_value_per_group_until_cleared() {
        let views = PacketViews::new(2);
        let mut p = packet("a");
        let id = p.id().clone();
        views.applied(0, [p.clone()]);
        Arc::make_mut(&mut p).grabbed = 1;
        views.applied(0, [p.clone()]);
        assert_eq!(views.get(0, &id).unwrap().grabbed, 1, "the newer value replaces the older");
        assert!(views.get(1, &id).is_none(), "groups are separate");
        assert!(views.get(7, &id).is_none(), "an unknown group has nothing");
        views.clear(0);
        assert!(views.get(0, &id).is_none());
    }

    #[test]
    fn starts_over_when_full() {
        let views = PacketViews::new(1);
        let first = packet("first");
        views.applied(0, [first.clone()]);
        views.applied(0, (1..MAX_PACKETS).map(|i| packet(&format!("p{i}"))));
        assert!(views.get(0, first.id()).is_some(), "exactly full keeps everything");
        let last = packet("one more");
        views.applied(0, [last.clone()]);
        assert!(views.get(0, first.id()).is_none(), "a new packet past the bound clears the rest");
        assert!(views.get(0, last.id()).is_some());
    }
}
