//! Applying commands to a group's state: the deterministic heart of the state machine.
//!
//! Reads go through [`Txn`], which sees the writes of earlier entries of the same batch
//! before they reach RocksDB; writes collect in one `WriteBatch` that the state machine
//! commits together with `last_applied`. The packet rules themselves live in
//! [`crate::packet`]; this module only loads, calls and stores.

use std::collections::HashMap;
use std::io;

use rocksdb::DB;
use rocksdb::WriteBatch;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec;
use super::keys;
use crate::packet::Claim;
use crate::packet::GrabOutcome;
use crate::packet::NewPacket;
use crate::packet::OpenOutcome;
use crate::packet::Packet;
use crate::packet::PacketError;
use crate::packet::PacketId;
use crate::raft::Command;
use crate::raft::Reply;

/// Pending writes of one apply batch over the committed state of one group.
pub struct Txn<'a> {
    db: &'a DB,
    group: u32,
    batch: WriteBatch,
    pending: HashMap<Vec<u8>, Vec<u8>>,
}

impl<'a> Txn<'a> {
    pub fn new(db: &'a DB, group: u32) -> Self {
        Txn { db, group, batch: WriteBatch::default(), pending: HashMap::new() }
    }

    fn cf(&self) -> &'a rocksdb::ColumnFamily {
        self.db.cf_handle(keys::CF_SM).expect("cf sm")
    }

    fn get<T: DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        if let Some(bytes) = self.pending.get(key) {
            return Ok(Some(codec::decode(bytes)?));
        }
        match self.db.get_cf(self.cf(), key).map_err(io::Error::other)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&mut self, key: Vec<u8>, value: &T) -> io::Result<()> {
        let bytes = codec::encode(value)?;
        self.batch.put_cf(self.cf(), &key, &bytes);
        self.pending.insert(key, bytes);
        Ok(())
    }

    /// Hands the collected writes to the caller, who adds the metadata and commits.
    pub fn into_batch(self) -> WriteBatch {
        self.batch
    }

    /// Applies one command. `Err` is a storage failure (the node must stop); a refused
    /// command is `Ok(Reply::Refused(..))` and writes nothing.
    pub fn apply(&mut self, command: &Command) -> io::Result<Reply> {
        match command {
            Command::Create(new) => self.create(new),
            Command::Grab { packet_id, user, at, open } => self.grab(packet_id, user, *at, *open),
            Command::Open { packet_id, user, at } => self.open(packet_id, user, *at),
        }
    }

    fn create(&mut self, new: &NewPacket) -> io::Result<Reply> {
        let g = self.group;
        let request_key = keys::request(g, &new.sender, &new.request_id);
        if let Some(existing_id) = self.get::<PacketId>(&request_key)? {
            // A retried create: answer with the packet the first attempt made.
            let packet = self.get::<Packet>(&keys::packet(g, &existing_id))?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidData, format!("request index points to missing packet {existing_id}"))
            })?;
            return Ok(Reply::Created(packet));
        }
        let packet_key = keys::packet(g, &new.packet_id);
        if self.get::<Packet>(&packet_key)?.is_some() {
            return Ok(Reply::Refused(PacketError::DuplicateId(new.packet_id.to_string())));
        }
        let packet = Packet::new(new.clone());
        self.put(packet_key, &packet)?;
        self.put(request_key, &new.packet_id)?;
        Ok(Reply::Created(packet))
    }

    fn load(&self, packet_id: &PacketId, user: &str) -> io::Result<Result<(Packet, Option<Claim>), PacketError>> {
        let g = self.group;
        let Some(packet) = self.get::<Packet>(&keys::packet(g, packet_id))? else {
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
                self.put(keys::packet(self.group, packet_id), &packet)?;
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
                self.put(keys::packet(self.group, &id), &packet)?;
                self.put(keys::claim(self.group, &id, user), &claim)?;
                Ok(Reply::Opened { claim })
            }
            Ok(OpenOutcome::AlreadyOpen(claim)) => Ok(Reply::Opened { claim }),
            Err(refusal) => Ok(Reply::Refused(refusal)),
        }
    }
}
