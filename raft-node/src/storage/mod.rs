//! Durable storage of a node: one RocksDB instance holding every group's Raft log, vote and
//! state machine (see [`keys`] for the layout), plus snapshot files.

pub mod apply;
pub mod codec;
pub mod keys;
pub mod log_store;
pub mod pending;
pub mod state_machine;
pub mod view;
pub mod wal_sync;

use std::io;
use std::path::Path;
use std::path::PathBuf;
use std::sync::Arc;

use rocksdb::ColumnFamilyDescriptor;
use rocksdb::DB;
use rocksdb::Options;
use rocksdb::ReadOptions;

pub use self::log_store::GroupLogStore;
pub use self::state_machine::AppliedState;
pub use self::state_machine::GroupStateMachine;
use self::pending::PendingTransfers;
use self::view::PacketViews;
use self::wal_sync::WalSyncer;
use crate::packet::Claim;
use crate::packet::Packet;
use crate::packet::PacketId;
use crate::packet::transfer::Transfer;
use crate::packet::transfer::is_pay_id;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("rocksdb at {path}: {source}")]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("data directory {path} belongs to node {stored}, but this node is configured as {configured}")]
    WrongNode { path: PathBuf, stored: u64, configured: u64 },
    #[error(
        "data directory {path} was created with {stored} groups, but the configuration says {configured}; the group count is fixed when a cluster is created"
    )]
    WrongGroups { path: PathBuf, stored: u32, configured: u32 },
    #[error("data directory {path} was written in the {stored} format, but this version reads and writes {expected}; start the node on an empty data directory and let it catch up from its group peers")]
    WrongFormat { path: PathBuf, stored: String, expected: String },
    #[error("storage: {0}")]
    Io(#[from] io::Error),
}

/// A node's open database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    wal: WalSyncer,
    snapshot_dir: PathBuf,
    /// Signalled when an apply records a funding transfer, so the settler acts at once.
    settle_wake: Arc<tokio::sync::Notify>,
    /// The applied packets of every group, in memory.
    views: Arc<PacketViews>,
    /// The unsettled transfer ids of every group, in memory.
    pending: Arc<PendingTransfers>,
}

impl Store {
    /// Opens (or creates) the database under `dir`, checking that it belongs to this node
    /// and has the configured number of groups.
    pub fn open(dir: &Path, node_id: u64, groups: u32) -> Result<Store, StoreError> {
        let db_path = dir.join("db");
        let snapshot_dir = dir.join("snapshots");
        std::fs::create_dir_all(&snapshot_dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_bottommost_compression_type(rocksdb::DBCompressionType::Zstd);
        opts.increase_parallelism(2);
        let cfs = keys::ALL_CFS.iter().map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
            if *name == keys::CF_SM {
                // Point lookups of claims that do not exist yet (every first grab, twice: the
                // fast path and apply) skip disk,
                let mut block = rocksdb::BlockBasedOptions::default();
                block.set_bloom_filter(10.0, false);
                cf_opts.set_block_based_table_factory(&block);
                // and the memtable's skip list: with a bloom filter over whole keys (10 % of
                // the memtable's size) a miss is a few hash probes instead of a search down
                // every level. One pair of sustained `many` races: skip-list lookups took
                // 4.4 % of node CPU without, 1.8 % with, plus 0.5 % for the probes.
                cf_opts.set_memtable_whole_key_filtering(true);
                cf_opts.set_memtable_prefix_bloom_ratio(0.1);
            }
            ColumnFamilyDescriptor::new(*name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs)
            .map_err(|source| StoreError::Open { path: db_path.clone(), source })?;
        let db = Arc::new(db);
        let views = Arc::new(PacketViews::new(groups));
        let pending = Arc::new(PendingTransfers::new(groups));
        let store = Store { wal: WalSyncer::start(&db), db, snapshot_dir, settle_wake: Arc::default(), views, pending };
        store.check_identity(&db_path, node_id, groups)?;
        for group in 0..groups {
            store.pending.load(group, unsettled_ids(&store.db, group)?);
        }
        Ok(store)
    }

    fn check_identity(&self, path: &Path, node_id: u64, groups: u32) -> Result<(), StoreError> {
        let cf = self.db.cf_handle(keys::CF_NODE).expect("cf node");
        let read_u64 = |key: &[u8]| -> Result<Option<u64>, StoreError> {
            let v = self.db.get_cf(cf, key).map_err(io::Error::other)?;
            Ok(v.map(|b| u64::from_be_bytes(b.as_slice().try_into().unwrap_or([0; 8]))))
        };
        let stored_id = read_u64(keys::NODE_ID)?;
        // A directory with an identity but no recorded codec predates the record: JSON.
        let format = self.db.get_cf(cf, keys::NODE_FORMAT).map_err(io::Error::other)?;
        let stored_format = match (format, stored_id) {
            (Some(format), _) => Some(String::from_utf8_lossy(&format).into_owned()),
            (None, Some(_)) => Some("json".to_string()),
            (None, None) => None,
        };
        match stored_format {
            Some(stored) if stored != codec::FORMAT => {
                return Err(StoreError::WrongFormat { path: path.into(), stored, expected: codec::FORMAT.to_string() });
            }
            Some(_) => {}
            None => self.db.put_cf(cf, keys::NODE_FORMAT, codec::FORMAT).map_err(io::Error::other)?,
        }
        match stored_id {
            Some(stored) if stored != node_id => {
                return Err(StoreError::WrongNode { path: path.into(), stored, configured: node_id });
            }
            Some(_) => {}
            None => self.db.put_cf(cf, keys::NODE_ID, node_id.to_be_bytes()).map_err(io::Error::other)?,
        }
        match read_u64(keys::NODE_GROUPS)? {
            Some(stored) if stored != u64::from(groups) => {
                return Err(StoreError::WrongGroups { path: path.into(), stored: stored as u32, configured: groups });
            }
            Some(_) => {}
            None => self.db.put_cf(cf, keys::NODE_GROUPS, u64::from(groups).to_be_bytes()).map_err(io::Error::other)?,
        }
        self.db.flush_wal(true).map_err(io::Error::other)?;
        Ok(())
    }

    pub fn log_store(&self, group: u32) -> GroupLogStore {
        GroupLogStore::new(self.db.clone(), group, self.wal.clone())
    }

    pub fn state_machine(&self, group: u32) -> GroupStateMachine {
        GroupStateMachine::new(self.db.clone(), group, self.snapshot_dir.clone(), self.settle_wake.clone(), self.views.clone(), self.pending.clone())
    }

    /// Woken when any group records a new funding transfer.
    pub fn settle_wake(&self) -> &Arc<tokio::sync::Notify> {
        &self.settle_wake
    }

    /// Reads of one group's applied state.
    pub fn reader(&self, group: u32) -> StateReader<'_> {
        StateReader { db: &self.db, views: &self.views, pending: &self.pending, group }
    }

    pub fn db(&self) -> &Arc<DB> {
        &self.db
    }
}

/// Read access to one group's applied packet state.
pub struct StateReader<'a> {
    db: &'a DB,
    views: &'a PacketViews,
    pending: &'a PendingTransfers,
    group: u32,
}

impl StateReader<'_> {
    /// The packet as applied: shared from the in-memory view when it has it, else read from
    /// RocksDB (without filling the view: only the state machine does that).
    pub fn packet(&self, id: &PacketId) -> io::Result<Option<Arc<Packet>>> {
        if let Some(packet) = self.views.get(self.group, id) {
            return Ok(Some(packet));
        }
        Ok(self.get::<Packet>(&keys::packet(self.group, id))?.map(Arc::new))
    }

    pub fn claim(&self, id: &PacketId, user: &str) -> io::Result<Option<Claim>> {
        self.get(&keys::claim(self.group, id, user))
    }

    /// Every claim on the packet, in share order.
    pub fn claims(&self, id: &PacketId) -> io::Result<Vec<Claim>> {
        let cf = self.db.cf_handle(keys::CF_SM).expect("cf sm");
        let prefix = keys::claims_of(self.group, id);
        let mut upper = prefix.clone();
        upper.push(0xff);
        let mut opts = ReadOptions::default();
        opts.set_iterate_upper_bound(upper);
        let mut claims = Vec::new();
        for item in self.db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(io::Error::other)?;
            if !k.starts_with(&prefix) {
                break;
            }
            claims.push(codec::decode::<Claim>(&v)?);
        }
        claims.sort_by_key(|c| c.share_index);
        Ok(claims)
    }

    /// A transfer, settled or not (it is stored under exactly one of the two keys). `U` is
    /// read first: settling deletes it and writes `T` in one batch, so a miss there means `T`
    /// is already visible, whereas reading `T` first could miss a transfer moving between them.
    pub fn transfer(&self, id: &str) -> io::Result<Option<Transfer>> {
        match self.get(&keys::unsettled(self.group, id))? {
            Some(pending) => Ok(Some(pending)),
            None => self.get(&keys::transfer(self.group, id)),
        }
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> io::Result<Option<T>> {
        let cf = self.db.cf_handle(keys::CF_SM).expect("cf sm");
        match self.db.get_cf(cf, key).map_err(io::Error::other)? {
            Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Keys (and values) under `prefix`, at most `limit`.
    fn scan(&self, prefix: &[u8], limit: usize) -> io::Result<Vec<KeyValue>> {
        scan(self.db, prefix, limit)
    }

    /// Transfers recorded but not yet settled, at most `limit`, in id order. The ids come
    /// from memory ([`pending`]); each transfer is read by key (one settled meanwhile is
    /// left out).
    pub fn unsettled(&self, limit: usize) -> io::Result<Vec<Transfer>> {
        self.unsettled_where(limit, |_| true)
    }

    /// As [`StateReader::unsettled`], fundings and refunds only (a racing group's payments
    /// wait: `crate::settlement`).
    pub fn unsettled_except_payments(&self, limit: usize) -> io::Result<Vec<Transfer>> {
        self.unsettled_where(limit, |id| !is_pay_id(id))
    }

    fn unsettled_where(&self, limit: usize, keep: impl Fn(&str) -> bool) -> io::Result<Vec<Transfer>> {
        let mut out = Vec::new();
        for id in self.pending.first(self.group, limit, keep) {
            if let Some(transfer) = self.get(&keys::unsettled(self.group, &id))? {
                out.push(transfer);
            }
        }
        Ok(out)
    }

    /// How many transfers are unsettled.
    pub fn unsettled_count(&self) -> usize {
        self.pending.count(self.group)
    }

    /// When this node last applied a payment of this group (its own clock; `None`: not since
    /// it started).
    pub fn last_payment_recorded(&self) -> Option<std::time::Instant> {
        self.pending.last_payment(self.group)
    }

    /// Packets whose expiry time is at or before `now` and that are not closed yet.
    pub fn expired(&self, now: u64, limit: usize) -> io::Result<Vec<PacketId>> {
        let mut out = Vec::new();
        for (k, _) in self.scan(&keys::expiry_all(self.group), limit)? {
            let Some((at, id)) = keys::parse_expiry(&k) else { continue };
            if at > now {
                break;
            }
            out.push(PacketId::parse(id).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?);
        }
        Ok(out)
    }

    /// The applied index and a digest of every key and value of the group's state, read
    /// from one RocksDB snapshot: equal on replicas that applied the same log.
    pub fn digest(&self) -> io::Result<(Option<u64>, u64)> {
        let snap = self.db.snapshot();
        let cf = self.db.cf_handle(keys::CF_SM).expect("cf sm");
        let cf_meta = self.db.cf_handle(keys::CF_SM_META).expect("cf sm_meta");
        let applied: AppliedState = match snap.get_cf(cf_meta, keys::group_prefix(self.group)).map_err(io::Error::other)? {
            Some(b) => codec::decode(&b)?,
            None => AppliedState::default(),
        };
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(keys::group_prefix(self.group).to_vec());
        opts.set_iterate_upper_bound(keys::group_end(self.group));
        for item in snap.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(io::Error::other)?;
            hasher.update(&(k.len() as u32).to_be_bytes());
            hasher.update(&k);
            hasher.update(&(v.len() as u32).to_be_bytes());
            hasher.update(&v);
        }
        Ok((applied.last_applied.map(|l| l.index), hasher.digest()))
    }

    /// Node ids retired for good (kept in group 0).
    pub fn retired_nodes(&self) -> io::Result<Vec<u64>> {
        let prefix = keys::retired_all(self.group);
        let mut out = Vec::new();
        for (k, _) in self.scan(&prefix, usize::MAX)? {
            out.push(u64::from_be_bytes(k[prefix.len()..].try_into().map_err(io::Error::other)?));
        }
        Ok(out)
    }

    /// Holder of the membership-change lock (kept in group 0) and when it lapses.
    pub fn membership_lock(&self) -> io::Result<Option<(String, u64)>> {
        self.get(&keys::membership_lock(self.group))
    }

    /// Every packet and transfer of the group, from one consistent RocksDB snapshot, for
    /// reconciliation.
    pub fn dump(&self) -> io::Result<(Vec<Packet>, Vec<Transfer>)> {
        let snap = self.db.snapshot();
        let cf = self.db.cf_handle(keys::CF_SM).expect("cf sm");
        let read_all = |prefix: Vec<u8>| -> io::Result<Vec<Box<[u8]>>> {
            let mut opts = ReadOptions::default();
            opts.set_iterate_upper_bound(keys::prefix_end(&prefix));
            let mut out = Vec::new();
            for item in snap.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
                out.push(item.map_err(io::Error::other)?.1);
            }
            Ok(out)
        };
        let packets = read_all(keys::packet_all(self.group))?.iter().map(|v| codec::decode(v)).collect::<io::Result<_>>()?;
        let mut transfers = Vec::new();
        for prefix in [keys::unsettled_all(self.group), keys::transfer_all(self.group)] {
            for v in read_all(prefix)? {
                transfers.push(codec::decode(&v)?);
            }
        }
        Ok((packets, transfers))
    }

    pub fn applied(&self) -> io::Result<AppliedState> {
        let cf = self.db.cf_handle(keys::CF_SM_META).expect("cf sm_meta");
        match self.db.get_cf(cf, keys::group_prefix(self.group)).map_err(io::Error::other)? {
            Some(b) => codec::decode(&b),
            None => Ok(AppliedState::default()),
        }
    }
}

/// A key and its value, as read from RocksDB.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// Keys (and values) of the `sm` family under `prefix`, at most `limit`.
fn scan(db: &DB, prefix: &[u8], limit: usize) -> io::Result<Vec<KeyValue>> {
    let cf = db.cf_handle(keys::CF_SM).expect("cf sm");
    let mut opts = ReadOptions::default();
    opts.set_iterate_upper_bound(keys::prefix_end(prefix));
    let mut out = Vec::new();
    for item in db.iterator_cf_opt(cf, opts, rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward)) {
        if out.len() >= limit {
            break;
        }
        out.push(item.map_err(io::Error::other)?);
    }
    Ok(out)
}

/// The ids of a group's unsettled transfers, from a scan of its `U` keys: done when the store
/// opens and after a snapshot install, never on the settler's path.
pub(crate) fn unsettled_ids(db: &DB, group: u32) -> io::Result<Vec<String>> {
    scan(db, &keys::unsettled_all(group), usize::MAX)?
        .iter()
        .map(|(key, _)| {
            keys::parse_unsettled(group, key)
                .map(str::to_string)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unsettled-transfer key is not UTF-8"))
        })
        .collect()
}
