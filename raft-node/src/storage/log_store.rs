//! One group's Raft log and vote, kept in the node's shared RocksDB (`log` and `raft`
//! column families, under the group's prefix).

use std::fmt::Debug;
use std::io;
use std::ops::Bound;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::LogState;
use openraft::OptionalSend;
use openraft::RaftLogReader;
use openraft::alias::EntryOf;
use openraft::alias::LogIdOf;
use openraft::alias::VoteOf;
use openraft::entry::RaftEntry;
use openraft::storage::IOFlushed;
use openraft::storage::RaftLogStorage;
use rocksdb::DB;
use rocksdb::Direction;
use rocksdb::IteratorMode;
use rocksdb::ReadOptions;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::codec;
use super::keys;
use super::wal_sync::WalSyncer;
use crate::raft::TypeConfig;

/// How durable a write of the `raft` family must be.
#[derive(Clone, Copy)]
enum Durability {
    Synced,
    Memory,
}

#[derive(Clone)]
pub struct GroupLogStore {
    db: Arc<DB>,
    group: u32,
    wal: WalSyncer,
}

impl GroupLogStore {
    pub fn new(db: Arc<DB>, group: u32, wal: WalSyncer) -> Self {
        GroupLogStore { db, group, wal }
    }

    fn cf_log(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(keys::CF_LOG).expect("cf log")
    }

    fn cf_raft(&self) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(keys::CF_RAFT).expect("cf raft")
    }

    fn get_raft<T: DeserializeOwned>(&self, tag: u8) -> io::Result<Option<T>> {
        match self.db.get_cf(self.cf_raft(), keys::raft(self.group, tag)).map_err(io::Error::other)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// `Durability::Synced` is on disk when this returns; `Durability::Memory` skips the WAL
    /// altogether, so a crash loses it unless a memtable flush has written it since.
    fn put_raft<T: Serialize>(&self, tag: u8, value: &T, durability: Durability) -> io::Result<()> {
        let mut opts = WriteOptions::default();
        match durability {
            Durability::Synced => opts.set_sync(true),
            Durability::Memory => opts.disable_wal(true),
        }
        self.db
            .put_cf_opt(self.cf_raft(), keys::raft(self.group, tag), codec::encode(value)?, &opts)
            .map_err(io::Error::other)
    }

    /// Read options bounded to this group's log range.
    fn log_range(&self, start: u64) -> ReadOptions {
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(keys::log(self.group, start).to_vec());
        opts.set_iterate_upper_bound(keys::group_end(self.group));
        opts
    }

    /// Index of the group's last log entry, if any.
    pub fn last_index(&self) -> io::Result<Option<u64>> {
        let mut it = self.db.iterator_cf_opt(self.cf_log(), self.log_range(0), IteratorMode::End);
        match it.next() {
            Some(item) => Ok(Some(keys::log_index(&item.map_err(io::Error::other)?.0))),
            None => Ok(None),
        }
    }
}

impl RaftLogReader<TypeConfig> for GroupLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => *x + 1,
            Bound::Unbounded => 0,
        };
        let from = keys::log(self.group, start);
        let it = self.db.iterator_cf_opt(
            self.cf_log(),
            self.log_range(start),
            IteratorMode::From(&from, Direction::Forward),
        );
        let mut entries = Vec::new();
        for item in it {
            let (key, value) = item.map_err(io::Error::other)?;
            let index = keys::log_index(&key);
            if !range.contains(&index) {
                break;
            }
            let entry: EntryOf<TypeConfig> = codec::decode(&value)?;
            debug_assert_eq!(entry.index(), index);
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.get_raft(keys::RAFT_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for GroupLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged: Option<LogIdOf<TypeConfig>> = self.get_raft(keys::RAFT_PURGED)?;
        let mut it = self.db.iterator_cf_opt(self.cf_log(), self.log_range(0), IteratorMode::End);
        let last = match it.next() {
            Some(item) => {
                let (_, value) = item.map_err(io::Error::other)?;
                let entry: EntryOf<TypeConfig> = codec::decode(&value)?;
                Some(entry.log_id())
            }
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        // A vote must be durable before it is answered: synced write.
        let this = self.clone();
        let vote = *vote;
        tokio::task::spawn_blocking(move || this.put_raft(keys::RAFT_VOTE, &vote, Durability::Synced))
            .await
            .map_err(io::Error::other)?
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        // Kept out of the WAL: this runs on every commit of every group, on every node, and a
        // WAL record costs a write(2) each time. Any older value is still a committed log id,
        // and openraft raises one below the applied state to it, so losing the latest value
        // in a crash only means the state machine waits for the leader's next commit to catch
        // up instead of re-applying on its own at startup.
        self.put_raft(keys::RAFT_COMMITTED, &committed, Durability::Memory)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self.get_raft::<Option<LogIdOf<TypeConfig>>>(keys::RAFT_COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<TypeConfig>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        for entry in entries {
            batch.put_cf(self.cf_log(), keys::log(self.group, entry.index()), codec::encode(&entry)?);
        }
        // Written now, so the entries are readable when this returns; durable when the
        // shared WAL sync completes the callback.
        self.db.write(batch).map_err(io::Error::other)?;
        self.wal.after_sync(callback);
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogIdOf<TypeConfig>>) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        tracing::debug!(group = self.group, from, "truncate log");
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(self.cf_log(), keys::log(self.group, from).to_vec(), keys::group_end(self.group));
        self.db.write(batch).map_err(io::Error::other)
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        tracing::debug!(group = self.group, upto = log_id.index(), "purge log");
        // Record the purge point first: entries at or below it are ignored from then on.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf_raft(), keys::raft(self.group, keys::RAFT_PURGED), codec::encode(&log_id)?);
        batch.delete_range_cf(self.cf_log(), keys::log(self.group, 0), keys::log(self.group, log_id.index() + 1));
        self.db.write(batch).map_err(io::Error::other)
    }
}
