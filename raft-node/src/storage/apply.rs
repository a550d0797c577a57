//! Applying commands to a group's state: the deterministic heart of the state machine.
//!
//! Reads go through [`Txn`], which sees the writes of earlier entries of the same batch
//! before they reach RocksDB; writes collect in one `WriteBatch` that the state machine
//! commits together with `last_applied`. The packet rules themselves live in
//! [`crate::packet`]; this module only loads, calls and stores.
//!
//! A hot packet is changed by every grab of a batch, so the overlay keeps packets decoded
//! and writes each one once, when the batch is committed: not a JSON decode, an encode and
//! a memtable insert per grab.

use std::collections::HashMap;
use std::io;

use rocksdb::DB;
use rocksdb::WriteBatch;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec;
use super::keys;
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

/// A value written by an earlier entry of the batch, not yet in RocksDB.
enum Staged {
    /// A packet record, kept decoded (encoded once, in [`Txn::into_batch`]).
    Packet(Packet),
    Encoded(Vec<u8>),
    Deleted,
}

/// Pending writes of one apply batch over the committed state of one group.
pub struct Txn<'a> {
    db: &'a DB,
    views: &'a PacketViews,
    group: u32,
    /// Values written by earlier entries of this batch; the last write of a key wins.
    pending: HashMap<Vec<u8>, Staged>,
    /// Whether this batch recorded a funding transfer: a create waits for it, so the
    /// leader's settler is woken at once (payments and refunds wait for its next pass).
    new_funding: bool,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB, group: u32, views: &'a PacketViews) -> Self {
        Txn { db, views, group, pending: HashMap::new(), new_funding: false }
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

    /// Any value but a packet (those go through [`Txn::packet`]).
    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        match self.pending.get(key) {
            Some(Staged::Encoded(bytes)) => Ok(Some(codec::decode(bytes)?)),
            Some(Staged::Deleted) => Ok(None),
            Some(Staged::Packet(_)) => Err(io::Error::new(io::ErrorKind::InvalidData, "a packet key read as another type")),
            None => self.read(key),
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) -> io::Result<()> {
        self.pending.insert(key, Staged::Encoded(codec::encode(value)?));
        Ok(())
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, Staged::Deleted);
    }

    /// The packet as this batch left it, else as applied (from the in-memory view, which a
    /// read from RocksDB fills: apply is the group's only writer, so what it reads is current).
    fn packet(&self, id: &PacketId) -> io::Result<Option<Packet>> {
        let key = keys::packet(self.group, id);
        match self.pending.get(&key) {
            Some(Staged::Packet(packet)) => return Ok(Some(packet.clone())),
            Some(Staged::Encoded(bytes)) => return Ok(Some(codec::decode(bytes)?)),
            Some(Staged::Deleted) => return Ok(None),
            None => {}
        }
        if let Some(packet) = self.views.get(self.group, id) {
            return Ok(Some(Packet::clone(&packet)));
        }
        let packet: Option<Packet> = self.read(&key)?;
        if let Some(p) = &packet {
            self.views.applied(self.group, [p.clone()]);
        }
        Ok(packet)
    }

    fn put_packet(&mut self, packet: Packet) {
        self.pending.insert(keys::packet(self.group, packet.id()), Staged::Packet(packet));
    }

    /// Records a new transfer and marks it unsettled, for the leader to carry out.
    fn record_transfer(&mut self, transfer: &Transfer) -> io::Result<()> {
        self.put(keys::transfer(self.group, &transfer.id), transfer)?;
        self.put(keys::unsettled(self.group, &transfer.id), &())?;
        self.new_funding |= transfer.kind == TransferKind::Fund;
        Ok(())
    }

    /// Whether this batch recorded a funding transfer (so the settler should wake up).
    pub fn recorded_funding(&self) -> bool {
        self.new_funding
    }

    /// Hands the collected writes to the caller, who adds the metadata and commits, then
    /// gives the packets written to the in-memory view. Keys are distinct, so their order in
    /// the batch does not matter.
    pub fn into_batch(self) -> io::Result<(WriteBatch, Vec<Packet>)> {
        let cf = self.cf();
        let mut batch = WriteBatch::default();
        let mut packets = Vec::new();
        for (key, staged) in self.pending {
            match staged {
                Staged::Packet(packet) => {
                    batch.put_cf(cf, &key, codec::encode(&packet)?);
                    packets.push(packet);
                }
                Staged::Encoded(bytes) => batch.put_cf(cf, &key, &bytes),
                Staged::Deleted => batch.delete_cf(cf, &key),
            }
        }
        Ok((batch, packets))
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
            let packet = self.packet(&existing_id)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("request index points to missing packet {existing_id}"))
            })?;
            return Ok(Reply::Created(packet));
        }
        if self.packet(&new.packet_id)?.is_some() {
            return Ok(Reply::Refused(PacketError::DuplicateId(new.packet_id.to_string())));
        }
        let packet = Packet::new(new.clone());
        self.put_packet(packet.clone());
        self.put(request_key, &new.packet_id)?;
        self.put(keys::expiry(g, new.expires_at, &new.packet_id), &())?;
        self.record_transfer(&Transfer::fund(new))?;
        Ok(Reply::Created(packet))
    }

    fn load(&self, packet_id: &PacketId, user: &str) -> io::Result<Result<(Packet, Option<Claim>), PacketError>> {
        let g = self.group;
        let Some(packet) = self.packet(packet_id)? else {
            return Ok(Err(PacketError::NotFound(packet_id.to_string())));
        };
        let claim = self.get::<Claim>(&keys::claim(g, packet_id, user))?;
        Ok(Ok((packet, claim)))
    }

    fn grab(&mut self, packet_id: &PacketId, user: &str, at: u64, open: bool) -> io::Result<Reply> {
        let (mut packet, existing) = match self.load(packet_id, user)? {
            Ok(found) => found,
            Err(refusal) => return Ok(Reply::Refused(refusal)),
        };
        let claim = match packet.grab(user, existing.as_ref(), at) {
            Ok(GrabOutcome::Took(claim)) => {
                self.put_packet(packet.clone());
                self.put(keys::claim(self.group, packet_id, user), &claim)?;
                claim
            }
            Ok(GrabOutcome::AlreadyHeld(claim)) => claim,
            Err(refusal) => return Ok(Reply::Refused(refusal)),
        };
        if open {
            return self.open_claim(packet, user, Some(claim), at);
        }
        Ok(Reply::Grabbed { claim, shares_left: packet.shares_left() })
    }

    fn open(&mut self, packet_id: &PacketId, user: &str, at: u64) -> io::Result<Reply> {
        match self.load(packet_id, user)? {
            Ok((packet, claim)) => self.open_claim(packet, user, claim, at),
            Err(refusal) => Ok(Reply::Refused(refusal)),
        }
    }

    fn open_claim(&mut self, mut packet: Packet, user: &str, claim: Option<Claim>, at: u64) -> io::Result<Reply> {
        match packet.open(user, claim.as_ref(), at) {
            Ok(OpenOutcome::Opened(claim)) => {
                let id = packet.id().clone();
                self.put(keys::claim(self.group, &id, user), &claim)?;
                self.record_transfer(&Transfer::pay(&packet.terms, claim.share_index, user, claim.amount))?;
                self.put_packet(packet);
                Ok(Reply::Opened { claim })
            }
            Ok(OpenOutcome::AlreadyOpen(claim)) => Ok(Reply::Opened { claim }),
            Err(refusal) => Ok(Reply::Refused(refusal)),
        }
    }

    fn settle(&mut self, settled: &[SettledTransfer]) -> io::Result<Reply> {
        let g = self.group;
        let mut count = 0;
        for s in settled {
            let key = keys::transfer(g, &s.transfer_id);
            let Some(mut transfer) = self.get::<Transfer>(&key)? else {
                tracing::error!(group = g, transfer = %s.transfer_id, "settle of an unknown transfer ignored");
                continue;
            };
            if !transfer.is_pending() {
                if transfer.settlement != s.outcome {
                    tracing::error!(group = g, transfer = %s.transfer_id, recorded = ?transfer.settlement, new = ?s.outcome,
                        "conflicting settlement ignored: the first outcome stands");
                }
                continue;
            }
            if s.outcome == Settlement::Pending {
                continue;
            }
            transfer.settlement = s.outcome.clone();
            self.put(key, &transfer)?;
            self.delete(keys::unsettled(g, &transfer.id));
            if transfer.kind == TransferKind::Fund {
                if let Some(mut packet) = self.packet(&transfer.packet_id)? {
                    packet.funding_settled(transfer.settlement == Settlement::Committed);
                    self.put_packet(packet);
                }
            }
            count += 1;
        }
        Ok(Reply::Settled { count })
    }

    fn expire(&mut self, packet_ids: &[PacketId], at: u64) -> io::Result<Reply> {
        let g = self.group;
        let mut count = 0;
        for id in packet_ids {
            let Some(mut packet) = self.packet(id)? else { continue };
            let Some(refund) = packet.close(at) else { continue };
            self.delete(keys::expiry(g, packet.terms.expires_at, id));
            if refund > 0 {
                self.record_transfer(&Transfer::refund(&packet.terms, refund))?;
            }
            self.put_packet(packet);
            count += 1;
        }
        Ok(Reply::Closed { count })
    }
}
