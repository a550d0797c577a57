//! One group's state machine, persisted in RocksDB (`sm` and `sm_meta` column families).
//!
//! The state lives in RocksDB, not in memory: each `apply` call commits the writes of all
//! its entries, `last_applied` and the membership in one atomic `WriteBatch`, so after a
//! crash the state and `last_applied` always agree and Raft re-applies exactly what is
//! missing. Snapshots are a consistent RocksDB snapshot of the group's key range, kept in a
//! file so a lagging or new replica can be brought up to date after the log was purged.

use std::fs;
use std::io;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use futures::Stream;
use futures::TryStreamExt;
use openraft::EntryPayload;
use openraft::OptionalSend;
use openraft::RaftSnapshotBuilder;
use openraft::alias::LogIdOf;
use openraft::alias::SnapshotMetaOf;
use openraft::alias::SnapshotOf;
use openraft::alias::StoredMembershipOf;
use openraft::entry::RaftEntry;
use openraft::storage::EntryResponder;
use openraft::storage::RaftStateMachine;
use rocksdb::DB;
use rocksdb::ReadOptions;
use rocksdb::WriteBatch;
use serde::Deserialize;
use serde::Serialize;

use super::apply::Txn;
use super::codec;
use super::keys;
use super::pending::PendingTransfers;
use super::view::PacketViews;
use crate::raft::Reply;
use crate::raft::TypeConfig;

/// What the state machine has applied: stored under the group key in `sm_meta`, written in
/// the same batch as the state it describes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AppliedState {
    pub last_applied: Option<LogIdOf<TypeConfig>>,
    pub membership: StoredMembershipOf<TypeConfig>,
}

/// A snapshot's payload: the group's `sm` key/value pairs (without the group prefix),
/// each as a length-prefixed key then a length-prefixed value.
pub type SnapshotData = Vec<u8>;

#[derive(Clone)]
pub struct GroupStateMachine {
    db: Arc<DB>,
    group: u32,
    snapshot_path: PathBuf,
    settle_wake: Arc<tokio::sync::Notify>,
    views: Arc<PacketViews>,
    pending: Arc<PendingTransfers>,
    /// What the last apply committed, so the next one need not read and decode it again
    /// (`None`: read it from RocksDB).
    applied: Option<AppliedState>,
}

impl GroupStateMachine {
    pub fn new(
        db: Arc<DB>,
        group: u32,
        snapshot_dir: PathBuf,
        settle_wake: Arc<tokio::sync::Notify>,
        views: Arc<PacketViews>,
        pending: Arc<PendingTransfers>,
    ) -> Self {
        let snapshot_path = snapshot_dir.join(format!("group-{group:04}.snap"));
        GroupStateMachine { db, group, snapshot_path, settle_wake, views, pending, applied: None }
    }

    pub fn group(&self) -> u32 {
        self.group
    }

    pub fn applied_state_now(&self) -> io::Result<AppliedState> {
        read_applied(&self.db, self.group, None)
    }

    fn write_snapshot_file(&self, meta: &SnapshotMetaOf<TypeConfig>, data: &[u8]) -> io::Result<()> {
        let header = codec::encode(meta)?;
        let tmp = self.snapshot_path.with_extension("snap.tmp");
        {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&(header.len() as u64).to_be_bytes())?;
            f.write_all(&header)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        fs::rename(&tmp, &self.snapshot_path)?;
        if let Some(dir) = self.snapshot_path.parent() {
            fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn read_snapshot_file(&self) -> io::Result<Option<(SnapshotMetaOf<TypeConfig>, SnapshotData)>> {
        let bytes = match fs::read(&self.snapshot_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "truncated snapshot file");
        let len = u64::from_be_bytes(bytes.get(..8).ok_or_else(bad)?.try_into().unwrap()) as usize;
        let header = bytes.get(8..8 + len).ok_or_else(bad)?;
        let meta = codec::decode(header)?;
        Ok(Some((meta, bytes[8 + len..].to_vec())))
    }
}

fn read_applied(db: &DB, group: u32, snapshot: Option<&rocksdb::Snapshot<'_>>) -> io::Result<AppliedState> {
    let cf = db.cf_handle(keys::CF_SM_META).expect("cf sm_meta");
    let key = keys::group_prefix(group);
    let bytes = match snapshot {
        Some(s) => s.get_cf(cf, key),
        None => db.get_cf(cf, key),
    }
    .map_err(io::Error::other)?;
    match bytes {
        Some(b) => codec::decode(&b),
        None => Ok(AppliedState::default()),
    }
}

/// Reads the group's state and metadata from one consistent RocksDB snapshot.
fn dump_group(db: &DB, group: u32) -> io::Result<(AppliedState, SnapshotData)> {
    let snap = db.snapshot();
    let applied = read_applied(db, group, Some(&snap))?;
    let cf = db.cf_handle(keys::CF_SM).expect("cf sm");
    let mut opts = ReadOptions::default();
    opts.set_iterate_lower_bound(keys::group_prefix(group).to_vec());
    opts.set_iterate_upper_bound(keys::group_end(group));
    let mut data = Vec::new();
    for item in snap.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(io::Error::other)?;
        let k = &k[4..];
        data.extend_from_slice(&(k.len() as u32).to_be_bytes());
        data.extend_from_slice(k);
        data.extend_from_slice(&(v.len() as u32).to_be_bytes());
        data.extend_from_slice(&v);
    }
    Ok((applied, data))
}

/// Splits snapshot data back into key/value pairs.
fn parse_snapshot(data: &[u8]) -> io::Result<Vec<(&[u8], &[u8])>> {
    fn take<'a>(rest: &mut &'a [u8]) -> io::Result<&'a [u8]> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed snapshot data");
        let len = u32::from_be_bytes(rest.get(..4).ok_or_else(bad)?.try_into().unwrap()) as usize;
        let item = rest.get(4..4 + len).ok_or_else(bad)?;
        *rest = &rest[4 + len..];
        Ok(item)
    }
    let mut pairs = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let k = take(&mut rest)?;
        let v = take(&mut rest)?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

impl RaftSnapshotBuilder<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<TypeConfig, SnapshotData>, io::Error> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let (applied, data) = dump_group(&this.db, this.group)?;
            let meta = SnapshotMetaOf::<TypeConfig> {
                last_log_id: applied.last_applied,
                last_membership: applied.membership,
            };
            this.write_snapshot_file(&meta, &data)?;
            tracing::info!(group = this.group, bytes = data.len(), last = ?meta.last_log_id, "built snapshot");
            Ok(SnapshotOf::<TypeConfig, SnapshotData> { meta, snapshot: data })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl RaftStateMachine<TypeConfig> for GroupStateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogIdOf<TypeConfig>>, StoredMembershipOf<TypeConfig>), io::Error> {
        let state = self.applied_state_now()?;
        Ok((state.last_applied, state.membership))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend {
        let db = self.db.clone();
        let mut state = match self.applied.take() {
            Some(state) => state,
            None => self.applied_state_now()?,
        };
        let mut txn = Txn::new(&db, self.group, &self.views);
        let mut replies = Vec::new();
        let mut applied = 0usize;
        while let Some((entry, responder)) = entries.try_next().await? {
            applied += 1;
            if applied == 2 {
                // Crash in the middle of a batch: nothing of it may reach the state.
                fail::fail_point!("apply-mid-batch", |_| std::process::abort());
            }
            let log_id = entry.log_id();
            let reply = match entry.payload {
                EntryPayload::Blank => Reply::Empty,
                EntryPayload::Normal(ref command) => txn.apply(command)?,
                EntryPayload::Membership(ref membership) => {
                    state.membership = StoredMembershipOf::<TypeConfig>::new(Some(log_id), membership.clone());
                    Reply::Empty
                }
            };
            state.last_applied = Some(log_id);
            if let Some(responder) = responder {
                replies.push((responder, reply));
            }
        }
        let wake = txn.recorded_funding();
        let (mut batch, packets, pending) = txn.into_batch()?;
        let cf_meta = db.cf_handle(keys::CF_SM_META).expect("cf sm_meta");
        batch.put_cf(cf_meta, keys::group_prefix(self.group), codec::encode(&state)?);
        // Not synced: the log entries are already durable, and RocksDB's single WAL recovers
        // a prefix, so a crash loses at most a suffix of applies that Raft will redo.
        db.write(batch).map_err(io::Error::other)?;
        self.views.applied(self.group, packets);
        self.pending.applied(self.group, pending);
        self.applied = Some(state);
        if wake {
            self.settle_wake.notify_one();
        }
        for (responder, reply) in replies {
            responder.send(reply);
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMetaOf<TypeConfig>, snapshot: SnapshotData) -> Result<(), io::Error> {
        self.applied = None;
        let this = self.clone();
        let meta = meta.clone();
        tokio::task::spawn_blocking(move || {
            let db = &this.db;
            let cf = db.cf_handle(keys::CF_SM).expect("cf sm");
            let cf_meta = db.cf_handle(keys::CF_SM_META).expect("cf sm_meta");
            let mut batch = WriteBatch::default();
            batch.delete_range_cf(cf, keys::group_prefix(this.group).to_vec(), keys::group_end(this.group));
            for (k, v) in parse_snapshot(&snapshot)? {
                let mut key = keys::group_prefix(this.group).to_vec();
                key.extend_from_slice(k);
                batch.put_cf(cf, key, v);
            }
            let state = AppliedState { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
            batch.put_cf(cf_meta, keys::group_prefix(this.group), codec::encode(&state)?);
            let mut opts = rocksdb::WriteOptions::default();
            opts.set_sync(true);
            db.write_opt(batch, &opts).map_err(io::Error::other)?;
            this.views.clear(this.group);
            this.pending.load(this.group, super::unsettled_ids(db, this.group)?);
            this.write_snapshot_file(&meta, &snapshot)?;
            tracing::info!(group = this.group, bytes = snapshot.len(), last = ?meta.last_log_id, "installed snapshot");
            Ok(())
        })
        .await
        .map_err(io::Error::other)?
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<SnapshotOf<TypeConfig, SnapshotData>>, io::Error> {
        Ok(self.read_snapshot_file()?.map(|(meta, snapshot)| SnapshotOf::<TypeConfig, SnapshotData> { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_data_round_trips() {
        let mut data = Vec::new();
        for (k, v) in [(b"a".as_slice(), b"1".as_slice()), (b"bb", b""), (b"", b"ccc")] {
            data.extend_from_slice(&(k.len() as u32).to_be_bytes());
            data.extend_from_slice(k);
            data.extend_from_slice(&(v.len() as u32).to_be_bytes());
            data.extend_from_slice(v);
        }
        let pairs = parse_snapshot(&data).unwrap();
        assert_eq!(pairs, vec![(b"a".as_slice(), b"1".as_slice()), (b"bb", b""), (b"", b"ccc")]);
        assert!(parse_snapshot(&data[..data.len() - 1]).is_err());
    }
}
