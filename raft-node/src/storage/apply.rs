//! Applying commands to a group's state: the deterministic heart of the state machine.
//!
//! Reads go through [`Txn`], which sees the writes of earlier entries of the same batch
//! before they reach RocksDB; writes collect in one `WriteBatch` that the state machine
//! commits together with `last_applied`. The packet rules themselves live in
//! [`crate::packet`]; this module only loads, calls and stores.
//!
//! A hot packet is changed by every grab of a batch, so the overlay keeps packets decoded
//! and changes them in place: one copy out of the in-memory view per batch, and one encode
//! and write at commit, not a decode, a copy, an encode and a memtable insert per grab.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use rocksdb::DB;
use rocksdb::WriteBatch;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec;
use super::keys;
use super::pending::PendingChange;
use super::view::PacketViews;
use crate::packet::Claim;
use crate::packet::GrabOutcome;
use crate::packet::NewPacket;
use crate::packet::OpenOutcome;
use crate::packet::Packet;
use crate::packet::PacketError;
use crate::packet::PacketId;
use crate::packet::transfer::Settlement;
use crate::packet::transfer::Transfer;
use crate::packet::transfer::TransferKind;
use crate::raft::Command;
use crate::raft::MetaCommand;
use crate::raft::PacketOp;
use crate::raft::Reply;
use crate::raft::SettledTransfer;

/// A packet as this batch has it, decoded.
struct StagedPacket {
    packet: Arc<Packet>,
    /// Whether the batch changed it (only then is it written at commit).
    changed: bool,
}

/// Pending writes of one apply batch over the committed state of one group.
pub struct Txn<'a> {
    db: &'a DB,
    views: &'a PacketViews,
    group: u32,
    /// Values other than packets written by earlier entries of this batch (`None`:
    /// deleted); the last write of a key wins.
    writes: HashMap<Vec<u8>, Option<Vec<u8>>>,
    /// Packets this batch has read or changed.
    packets: HashMap<PacketId, StagedPacket>,
    /// Whether this batch recorded a funding transfer: a create waits for it, so the
    /// leader's settler is woken at once (payments and refunds wait for its next pass).
    new_funding: bool,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB, group: u32, views: &'a PacketViews) -> Self {
        Txn { db, views, group, writes: HashMap::new(), packets: HashMap::new(), new_funding: false }
    }

    fn cf(&self) -> &'a rocksdb::ColumnFamily {
        self.db.cf_handle(keys::CF_SM).expect("cf sm")
    }

    fn read<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.db.get_cf(self.cf(), key).map_err(io::Error::other)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Any value but a packet (those go through [`Txn::stage_packet`]).
    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.writes.get(key) {
            Some(value) => value.as_deref().map(codec::decode).transpose(),
            None => self.read(key),
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) -> io::Result<()> {
        self.writes.insert(key, Some(codec::encode(value)?));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    /// The packet as this batch has it, staged on first use: from the in-memory view, else
    /// from RocksDB, which also fills the view (apply is the group's only writer, so what it
    /// reads is current). `None` when there is no such packet.
    fn stage_packet(&mut self, id: &PacketId) -> io::Result<Option<&mut StagedPacket>> {
        if !self.packets.contains_key(id) {
            let packet = match self.views.get(self.group, id) {
                Some(packet) => packet,
                None => match self.read::<Packet>(&keys::packet(self.group, id))? {
                    Some(packet) => {
                        let packet = Arc::new(packet);
                        self.views.applied(self.group, [packet.clone()]);
                        packet
                    }
                    None => return Ok(None),
                },
            };
            self.packets.insert(id.clone(), StagedPacket { packet, changed: false });
        }
        Ok(self.packets.get_mut(id))
    }

    /// Runs `change` on the packet in place; it returns its result and whether it changed the
    /// packet. Only the first change of a batch copies the packet (out of the view). `None`
    /// when there is no such packet.
    fn change_packet<R>(&mut self, id: &PacketId, change: impl FnOnce(&mut Packet) -> (R, bool)) -> io::Result<Option<R>> {
        let Some(staged) = self.stage_packet(id)? else { return Ok(None) };
        let (result, changed) = change(Arc::make_mut(&mut staged.packet));
        staged.changed |= changed;
        Ok(Some(result))
    }

    /// Records a new transfer as unsettled, for the leader to carry out.
    fn record_transfer(&mut self, transfer: &Transfer) -> io::Result<()> {
        self.put(keys::unsettled(self.group, &transfer.id), transfer)?;
        self.new_funding |= transfer.kind == TransferKind::Fund;
        Ok(())
    }

    /// Whether this batch recorded a funding transfer (so the settler should wake up).
    pub fn recorded_funding(&self) -> bool {
        self.new_funding
    }

    /// Hands the collected writes to the caller, who adds the metadata and commits, then
    /// gives the packets written to the in-memory view and the `U` keys written and deleted
    /// to the pending set. Keys are distinct, so their order in the batch does not matter.
    /// (Sorting them, so that each memtable insert starts near the previous one, was tried:
    /// the sort cost as much as it saved.)
    pub fn into_batch(self) -> io::Result<(WriteBatch, Vec<Arc<Packet>>, PendingChange)> {
        let cf = self.cf();
        let mut batch = WriteBatch::default();
        let mut pending = PendingChange::default();
        for (key, value) in self.writes {
            if let Some(id) = keys::parse_unsettled(self.group, &key) {
                let ids = if value.is_some() { &mut pending.recorded } else { &mut pending.settled };
                ids.push(id.to_string());
            }
            match value {
                Some(bytes) => batch.put_cf(cf, &key, &bytes),
                None => batch.delete_cf(cf, &key),
            }
        }
        let mut packets = Vec::new();
        for (id, staged) in self.packets {
            if staged.changed {
                batch.put_cf(cf, keys::packet(self.group, &id), codec::encode(&*staged.packet)?);
                packets.push(staged.packet);
            }
        }
        Ok((batch, packets, pending))
    }

    /// Applies one command. `Err` is a storage failure (the node must stop); a refused
    /// command is `Ok(Reply::Refused(..))` and writes nothing.
    pub fn apply(&mut self, command: &Command) -> io::Result<Reply> {
        match command {
            Command::Create(new) => self.create(new),
            Command::Grab { packet_id, user, at, open } => self.grab(packet_id, user, *at, *open),
            Command::Open { packet_id, user, at } => self.open(packet_id, user, *at),
            Command::Batch { ops, at } => {
                let mut replies = Vec::with_capacity(ops.len());
                for (i, op) in ops.iter().enumerate() {
                    if i == 1 {
                        // Crash between two operations of one entry: none of them may reach the
                        // state (the writes are committed together, after the whole batch).
                        fail::fail_point!("apply-mid-batch", |_| std::process::abort());
                    }
                    replies.push(match op {
                        PacketOp::Grab { packet_id, user, open } => self.grab(packet_id, user, *at, *open)?,
                        PacketOp::Open { packet_id, user } => self.open(packet_id, user, *at)?,
                    });
                }
                Ok(Reply::Batch(replies))
            }
            Command::Settle(settled) => self.settle(settled),
            Command::Expire { packet_ids, at } => self.expire(packet_ids, *at),
            Command::Meta(meta) => self.meta(meta),
        }
    }

    fn meta(&mut self, meta: &MetaCommand) -> io::Result<Reply> {
        let key = keys::membership_lock(self.group);
        let current: Option<(String, u64)> = self.get(&key)?;
        match meta {
            MetaCommand::Lock { holder, at, ttl_ms } => match current {
                Some((other, until)) if &other != holder && *at < until => Ok(Reply::Lock { holder: other }),
                _ => {
                    self.put(key, &(holder.clone(), at.saturating_add(*ttl_ms)))?;
                    Ok(Reply::Lock { holder: holder.clone() })
                }
            },
            MetaCommand::Unlock { holder } => match current {
                Some((other, _)) if &other == holder => {
                    self.delete(key);
                    Ok(Reply::Lock { holder: String::new() })
                }
                Some((other, _)) => Ok(Reply::Lock { holder: other }),
                None => Ok(Reply::Lock { holder: String::new() }),
            },
            MetaCommand::Retire { node_id } => {
                self.put(keys::retired(self.group, *node_id), &())?;
                Ok(Reply::Empty)
            }
        }
    }

    fn create(&mut self, new: &NewPacket) -> io::Result<Reply> {
        let g = self.group;
        let request_key = keys::request(g, &new.sender, &new.request_id);
        if let Some(existing_id) = self.get::<PacketId>(&request_key)? {
            // A retried create: answer with the packet the first attempt made.
            let packet = self.stage_packet(&existing_id)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("request index points to missing packet {existing_id}"))
            })?;
            return Ok(Reply::Created(Packet::clone(&packet.packet)));
        }
        if self.stage_packet(&new.packet_id)?.is_some() {
            return Ok(Reply::Refused(PacketError::DuplicateId(new.packet_id.to_string())));
        }
        let packet = Packet::new(new.clone());
        self.packets.insert(new.packet_id.clone(), StagedPacket { packet: Arc::new(packet.clone()), changed: true });
        self.put(request_key, &new.packet_id)?;
        self.put(keys::expiry(g, new.expires_at, &new.packet_id), &())?;
        self.record_transfer(&Transfer::fund(new))?;
        Ok(Reply::Created(packet))
    }

    /// The user's claim on the packet, once the packet is staged; the refusal when there is
    /// no such packet.
    fn load_claim(&mut self, packet_id: &PacketId, user: &str) -> io::Result<Result<Option<Claim>, PacketError>> {
        if self.stage_packet(packet_id)?.is_none() {
            return Ok(Err(not_found(packet_id)));
        }
        Ok(Ok(self.get::<Claim>(&keys::claim(self.group, packet_id, user))?))
    }

    fn grab(&mut self, packet_id: &PacketId, user: &str, at: u64, open: bool) -> io::Result<Reply> {
        let existing = match self.load_claim(packet_id, user)? {
            Ok(existing) => existing,
            Err(refusal) => return Ok(Reply::Refused(refusal)),
        };
        let grabbed = self.change_packet(packet_id, |packet| {
            let outcome = packet.grab(user, existing.as_ref(), at);
            let took = matches!(outcome, Ok(GrabOutcome::Took(_)));
            ((outcome, packet.shares_left()), took)
        })?;
        let Some((outcome, shares_left)) = grabbed else { return Ok(Reply::Refused(not_found(packet_id))) };
        let claim = match outcome {
            Ok(GrabOutcome::Took(claim)) => {
                self.put(keys::claim(self.group, packet_id, user), &claim)?;
                claim
            }
            Ok(GrabOutcome::AlreadyHeld(claim)) => claim,
            Err(refusal) => return Ok(Reply::Refused(refusal)),
        };
        if open {
            return self.open_claim(packet_id, user, Some(claim), at);
        }
        Ok(Reply::Grabbed { claim, shares_left })
    }

    fn open(&mut self, packet_id: &PacketId, user: &str, at: u64) -> io::Result<Reply> {
        match self.load_claim(packet_id, user)? {
            Ok(claim) => self.open_claim(packet_id, user, claim, at),
            Err(refusal) => Ok(Reply::Refused(refusal)),
        }
    }

    fn open_claim(&mut self, packet_id: &PacketId, user: &str, claim: Option<Claim>, at: u64) -> io::Result<Reply> {
        // The opened claim, and the payment when this open is the first.
        let opened = self.change_packet(packet_id, |packet| {
            let outcome = match packet.open(user, claim.as_ref(), at) {
                Ok(OpenOutcome::Opened(claim)) => {
                    let pay = Transfer::pay(&packet.terms, claim.share_index, user, claim.amount);
                    Ok((claim, Some(pay)))
                }
                Ok(OpenOutcome::AlreadyOpen(claim)) => Ok((claim, None)),
                Err(refusal) => Err(refusal),
            };
            let changed = matches!(outcome, Ok((_, Some(_))));
            (outcome, changed)
        })?;
        match opened {
            None => Ok(Reply::Refused(not_found(packet_id))),
            Some(Ok((claim, Some(pay)))) => {
                self.put(keys::claim(self.group, packet_id, user), &claim)?;
                self.record_transfer(&pay)?;
                Ok(Reply::Opened { claim })
            }
            Some(Ok((claim, None))) => Ok(Reply::Opened { claim }),
            Some(Err(refusal)) => Ok(Reply::Refused(refusal)),
        }
    }

    fn settle(&mut self, settled: &[SettledTransfer]) -> io::Result<Reply> {
        let g = self.group;
        let mut count = 0;
        for s in settled {
            let pending_key = keys::unsettled(g, &s.transfer_id);
            let Some(mut transfer) = self.get::<Transfer>(&pending_key)? else {
                match self.get::<Transfer>(&keys::transfer(g, &s.transfer_id))? {
                    Some(done) if done.settlement != s.outcome && s.outcome != Settlement::Pending => {
                        tracing::error!(group = g, transfer = %s.transfer_id, recorded = ?done.settlement, new = ?s.outcome,
                            "conflicting settlement ignored: the first outcome stands");
                    }
                    Some(_) => {}
                    None => tracing::error!(group = g, transfer = %s.transfer_id, "settle of an unknown transfer ignored"),
                }
                continue;
            };
            if s.outcome == Settlement::Pending {
                continue;
            }
            transfer.settlement = s.outcome.clone();
            self.delete(pending_key);
            self.put(keys::transfer(g, &transfer.id), &transfer)?;
            if transfer.kind == TransferKind::Fund {
                let committed = transfer.settlement == Settlement::Committed;
                self.change_packet(&transfer.packet_id, |packet| (packet.funding_settled(committed), true))?;
            }
            count += 1;
        }
        Ok(Reply::Settled { count })
    }

    fn expire(&mut self, packet_ids: &[PacketId], at: u64) -> io::Result<Reply> {
        let g = self.group;
        let mut count = 0;
        for id in packet_ids {
            // The packet's expiry key, and the refund, when this closes it.
            let closed = self.change_packet(id, |packet| match packet.close(at) {
                Some(refund) => {
                    let refund = (refund > 0).then(|| Transfer::refund(&packet.terms, refund));
                    (Some((packet.terms.expires_at, refund)), true)
                }
                None => (None, false),
            })?;
            let Some(Some((expires_at, refund))) = closed else { continue };
            self.delete(keys::expiry(g, expires_at, id));
            if let Some(refund) = refund {
                self.record_transfer(&refund)?;
            }
            count += 1;
        }
        Ok(Reply::Closed { count })
    }
}

fn not_found(packet_id: &PacketId) -> PacketError {
    PacketError::NotFound(packet_id.to_string())
}
