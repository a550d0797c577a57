//! The payment ledger: a stand-in for the bank, built as a real durable service.
//!
//! Accounts hold integer cents, split into `available` and `held`. A two-phase transfer is
//! prepared (the amount moves from available to held on the source), then committed (held
//! leaves the source, the destination is credited) or aborted (held returns to available).
//! Every call is idempotent by its id and every state change is one atomic RocksDB write,
//! so the ledger is the source of truth for balances across crashes. Writes are made under
//! one lock (each call is read-check-write on several keys) without a sync; before a call
//! answers, one fsync of the WAL covers its write and everything it read (group commit:
//! concurrent calls share a sync, and no answer ever rests on state that is not on disk).
//! A batch call (`PrepareBatch`, `CommitBatch`) stages its items one after another, each
//! seeing the ones before it, and writes them all in one RocksDB write: one WAL record for
//! hundreds of transfers rather than one `write(2)` each.
//!
//! It knows nothing about red packets; `redpacket-payment` serves it over gRPC
//! ([`service`]), and the nodes' settlement drives it.

pub mod service;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use rocksdb::DB;
use rocksdb::Options;
use rocksdb::WriteBatch;
use rocksdb::WriteOptions;
use serde::Deserialize;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub type Cents = u64;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub available: Cents,
    pub held: Cents,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferState {
    Prepared,
    Committed,
    Aborted,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    pub id: String,
    pub from: String,
    pub to: String,
    pub amount: Cents,
    pub state: TransferState,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Deposit {
    account: String,
    amount: Cents,
}

/// The ledger's totals. Money is conserved when `available + held == deposited` and the
/// held money is exactly what prepared transfers hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Audit {
    pub accounts: u64,
    pub available: u128,
    pub held: u128,
    pub deposited: u128,
    pub prepared: u128,
    pub transfers: u64,
}

impl Audit {
    pub fn conserved(&self) -> bool {
        self.available + self.held == self.deposited && self.held == self.prepared
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("from_account: no account {0}")]
    UnknownAccount(String),
    #[error("from_account: {account} has {available} cents available, {needed} needed")]
    InsufficientFunds { account: String, available: Cents, needed: Cents },
    #[error("transfer_id: {0} was already used with different parameters")]
    Conflict(String),
    #[error("transfer_id: {0} is aborted")]
    Aborted(String),
    #[error("transfer_id: {0} is committed")]
    Committed(String),
    #[error("transfer_id: no transfer {0}")]
    NotFound(String),
    #[error("account {0}: balance would overflow")]
    Overflow(String),
    #[error("ledger storage: {0}")]
    Storage(String),
}

type Result<T> = std::result::Result<T, LedgerError>;

fn storage(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

const ACCOUNT: &str = "a/";
const TRANSFER: &str = "t/";
const DEPOSIT: &str = "d/";
const DEPOSITED: &str = "m/deposited";

/// Longest account or transfer id accepted.
pub const MAX_ID_BYTES: usize = 128;

fn check_id(field: &'static str, id: &str) -> Result<()> {
    if id.is_empty() {
        return Err(LedgerError::Invalid { field, reason: "must not be empty".into() });
    }
    if id.len() > MAX_ID_BYTES || id.chars().any(|c| c.is_control()) {
        return Err(LedgerError::Invalid { field, reason: format!("at most {MAX_ID_BYTES} printable bytes") });
    }
    Ok(())
}

fn check_amount(amount: Cents) -> Result<()> {
    if amount == 0 {
        return Err(LedgerError::Invalid { field: "amount_cents", reason: "must be positive".into() });
    }
    Ok(())
}

pub struct Ledger {
    db: DB,
    /// Serializes state changes: each is read-check-write on several keys.
    write: Mutex<()>,
    /// Writes made so far, and how many of them an fsync has covered.
    written: AtomicU64,
    synced: Mutex<u64>,
}

/// The writes of one call, or of every item of a batch call, not yet in RocksDB. Reads see
/// them first, so an item sees the items staged before it; they reach RocksDB together in
/// one atomic write (synced before the call answers), holding each key's last value only:
/// every payment of a batch changes the one escrow account, and writing each of its values
/// cost a memtable insert per transfer.
struct Staging<'a> {
    ledger: &'a Ledger,
    staged: HashMap<String, Vec<u8>>,
}

impl Staging<'_> {
    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.staged.get(key) {
            Some(b) => Ok(Some(serde_json::from_slice(b).map_err(storage)?)),
            None => self.ledger.get(key),
        }
    }

    fn account(&self, account: &str) -> Result<Option<Account>> {
        self.get(&format!("{ACCOUNT}{account}"))
    }

    /// Stages one operation's writes, all of them: an operation makes every check before
    /// it puts anything, so a refused one stages nothing.
    fn put_all(&mut self, change: Change) {
        self.staged.extend(change.0);
    }

    fn write(self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (key, bytes) in &self.staged {
            batch.put(key, bytes);
        }
        self.ledger.db.write_opt(batch, &WriteOptions::default()).map_err(storage)?;
        self.ledger.written.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The writes of one operation, encoded.
#[derive(Default)]
struct Change(Vec<(String, Vec<u8>)>);

impl Change {
    fn put<T: Serialize>(&mut self, key: String, value: &T) -> Result<()> {
        self.0.push((key, serde_json::to_vec(value).map_err(storage)?));
        Ok(())
    }
}

impl Ledger {
    pub fn open(dir: &Path) -> Result<Ledger> {
        std::fs::create_dir_all(dir).map_err(storage)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, dir.join("ledger")).map_err(storage)?;
        Ok(Ledger { db, write: Mutex::new(()), written: AtomicU64::new(0), synced: Mutex::new(0) })
    }

    /// Returns once every write made so far is on disk. Callers that arrive while an fsync
    /// runs wait for it, and usually find their write covered by it.
    fn durable<T>(&self, result: Result<T>) -> Result<T> {
        let target = self.written.load(Ordering::SeqCst);
        let mut synced = self.synced.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if *synced < target {
            let covered = self.written.load(Ordering::SeqCst);
            self.db.flush_wal(true).map_err(storage)?;
            *synced = covered;
        }
        result
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        match self.db.get(key).map_err(storage)? {
            Some(b) => Ok(Some(serde_json::from_slice(&b).map_err(storage)?)),
            None => Ok(None),
        }
    }

    /// Runs `ops` under the write lock, each on the writes of those before it, writes what
    /// they staged in one RocksDB write, and returns once it is on disk.
    fn staged<T>(&self, ops: impl FnOnce(&mut Staging) -> T) -> Result<T> {
        let result = {
            let _guard = self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut staging = Staging { ledger: self, staged: HashMap::new() };
            let result = ops(&mut staging);
            staging.write()?;
            result
        };
        self.durable(Ok(result))
    }

    pub fn account(&self, account: &str) -> Result<Option<Account>> {
        self.get(&format!("{ACCOUNT}{account}"))
    }

    pub fn balance(&self, account: &str) -> Result<Account> {
        check_id("account", account)?;
        Ok(self.account(account)?.unwrap_or_default())
    }

    pub fn transfer(&self, id: &str) -> Result<Transfer> {
        check_id("transfer_id", id)?;
        self.get(&format!("{TRANSFER}{id}"))?.ok_or_else(|| LedgerError::NotFound(id.to_string()))
    }

    /// Adds money from outside (opening the account if needed); idempotent by `deposit_id`.
    pub fn deposit(&self, deposit_id: &str, account: &str, amount: Cents) -> Result<Account> {
        self.staged(|st| deposit_in(st, deposit_id, account, amount))?
    }

    /// Many prepares, each exactly [`Ledger::prepare`], written and synced together.
    pub fn prepare_many(&self, items: &[(&str, &str, &str, Cents)]) -> Result<Vec<Result<Transfer>>> {
        self.staged(|st| items.iter().map(|(id, from, to, amount)| prepare_in(st, id, from, to, *amount)).collect())
    }

    /// Many commits, each exactly [`Ledger::commit`], written and synced together.
    pub fn commit_many(&self, ids: &[&str]) -> Result<Vec<Result<Transfer>>> {
        self.staged(|st| ids.iter().map(|id| commit_in(st, id)).collect())
    }

    /// Holds `amount` on `from` for a transfer to `to`.
    pub fn prepare(&self, id: &str, from: &str, to: &str, amount: Cents) -> Result<Transfer> {
        self.staged(|st| prepare_in(st, id, from, to, amount))?
    }

    /// Moves a prepared transfer's amount to its destination.
    pub fn commit(&self, id: &str) -> Result<Transfer> {
        self.staged(|st| commit_in(st, id))?
    }

    /// Releases a prepared transfer's hold. Aborting an unknown id records it as aborted.
    pub fn abort(&self, id: &str) -> Result<Transfer> {
        self.staged(|st| abort_in(st, id))?
    }

    /// Transfers whose id starts with `prefix`, in id order, after `start_after`.
    pub fn list_transfers(&self, prefix: &str, start_after: &str, limit: usize) -> Result<Vec<Transfer>> {
        let start = if start_after.is_empty() { format!("{TRANSFER}{prefix}") } else { format!("{TRANSFER}{start_after}\u{0}") };
        let full_prefix = format!("{TRANSFER}{prefix}");
        let mut out = Vec::new();
        for item in self.db.iterator(rocksdb::IteratorMode::From(start.as_bytes(), rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(full_prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            out.push(serde_json::from_slice(&v).map_err(storage)?);
        }
        Ok(out)
    }

    /// Totals over every account and transfer, read from one consistent snapshot.
    pub fn audit(&self) -> Result<Audit> {
        let snap = self.db.snapshot();
        let mut audit = Audit { deposited: 0, ..Audit::default() };
        if let Some(b) = snap.get(DEPOSITED).map_err(storage)? {
            audit.deposited = serde_json::from_slice(&b).map_err(storage)?;
        }
        for item in snap.iterator(rocksdb::IteratorMode::From(ACCOUNT.as_bytes(), rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(ACCOUNT.as_bytes()) {
                break;
            }
            let acc: Account = serde_json::from_slice(&v).map_err(storage)?;
            audit.accounts += 1;
            audit.available += u128::from(acc.available);
            audit.held += u128::from(acc.held);
        }
        for item in snap.iterator(rocksdb::IteratorMode::From(TRANSFER.as_bytes(), rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(storage)?;
            if !k.starts_with(TRANSFER.as_bytes()) {
                break;
            }
            let t: Transfer = serde_json::from_slice(&v).map_err(storage)?;
            audit.transfers += 1;
            if t.state == TransferState::Prepared {
                audit.prepared += u128::from(t.amount);
            }
        }
        Ok(audit)
    }
}

fn deposit_in(st: &mut Staging, deposit_id: &str, account: &str, amount: Cents) -> Result<Account> {
    check_id("deposit_id", deposit_id)?;
    check_id("account", account)?;
    check_amount(amount)?;
    let key = format!("{DEPOSIT}{deposit_id}");
    let wanted = Deposit { account: account.to_string(), amount };
    if let Some(existing) = st.get::<Deposit>(&key)? {
        if existing != wanted {
            return Err(LedgerError::Conflict(deposit_id.to_string()));
        }
        return Ok(st.account(account)?.unwrap_or_default());
    }
    let mut acc = st.account(account)?.unwrap_or_default();
    acc.available = acc.available.checked_add(amount).ok_or_else(|| LedgerError::Overflow(account.into()))?;
    let deposited: u128 = st.get(DEPOSITED)?.unwrap_or(0);
    let deposited = deposited.checked_add(u128::from(amount)).ok_or_else(|| LedgerError::Overflow(account.into()))?;
    let mut change = Change::default();
    change.put(key, &wanted)?;
    change.put(format!("{ACCOUNT}{account}"), &acc)?;
    change.put(DEPOSITED.to_string(), &deposited)?;
    st.put_all(change);
    Ok(acc)
}

fn prepare_in(st: &mut Staging, id: &str, from: &str, to: &str, amount: Cents) -> Result<Transfer> {
    check_id("transfer_id", id)?;
    check_id("from_account", from)?;
    check_id("to_account", to)?;
    check_amount(amount)?;
    if from == to {
        return Err(LedgerError::Invalid { field: "to_account", reason: "must differ from from_account".into() });
    }
    let key = format!("{TRANSFER}{id}");
    if let Some(existing) = st.get::<Transfer>(&key)? {
        if existing.state == TransferState::Aborted {
            // Abandoned (possibly before this prepare, delayed in the network, arrived).
            return Err(LedgerError::Aborted(id.to_string()));
        }
        if (existing.from.as_str(), existing.to.as_str(), existing.amount) != (from, to, amount) {
            return Err(LedgerError::Conflict(id.to_string()));
        }
        return Ok(existing);
    }
    let mut acc = st.account(from)?.ok_or_else(|| LedgerError::UnknownAccount(from.to_string()))?;
    if acc.available < amount {
        return Err(LedgerError::InsufficientFunds { account: from.to_string(), available: acc.available, needed: amount });
    }
    acc.available -= amount;
    acc.held = acc.held.checked_add(amount).ok_or_else(|| LedgerError::Overflow(from.into()))?;
    let transfer = Transfer { id: id.into(), from: from.into(), to: to.into(), amount, state: TransferState::Prepared };
    let mut change = Change::default();
    change.put(format!("{ACCOUNT}{from}"), &acc)?;
    change.put(key, &transfer)?;
    st.put_all(change);
    Ok(transfer)
}

fn commit_in(st: &mut Staging, id: &str) -> Result<Transfer> {
    check_id("transfer_id", id)?;
    let key = format!("{TRANSFER}{id}");
    let mut transfer: Transfer = st.get(&key)?.ok_or_else(|| LedgerError::NotFound(id.to_string()))?;
    match transfer.state {
        TransferState::Committed => return Ok(transfer),
        TransferState::Aborted => return Err(LedgerError::Aborted(id.to_string())),
        TransferState::Prepared => {}
    }
    let from = release_hold(st, &transfer)?;
    let mut to = st.account(&transfer.to)?.unwrap_or_default();
    to.available = to.available.checked_add(transfer.amount).ok_or_else(|| LedgerError::Overflow(transfer.to.clone()))?;
    transfer.state = TransferState::Committed;
    let mut change = Change::default();
    change.put(format!("{ACCOUNT}{}", transfer.from), &from)?;
    change.put(format!("{ACCOUNT}{}", transfer.to), &to)?;
    change.put(key, &transfer)?;
    st.put_all(change);
    Ok(transfer)
}

/// The source account of a prepared transfer, with the transfer's hold taken off.
fn release_hold(st: &Staging, transfer: &Transfer) -> Result<Account> {
    let id = &transfer.id;
    let mut from = st.account(&transfer.from)?.ok_or_else(|| storage(format!("{id}: source account vanished")))?;
    from.held = from.held.checked_sub(transfer.amount).ok_or_else(|| storage(format!("{id}: hold missing")))?;
    Ok(from)
}

fn abort_in(st: &mut Staging, id: &str) -> Result<Transfer> {
    check_id("transfer_id", id)?;
    let key = format!("{TRANSFER}{id}");
    let Some(mut transfer) = st.get::<Transfer>(&key)? else {
        let tombstone = Transfer { id: id.into(), from: String::new(), to: String::new(), amount: 0, state: TransferState::Aborted };
        let mut change = Change::default();
        change.put(key, &tombstone)?;
        st.put_all(change);
        return Ok(tombstone);
    };
    match transfer.state {
        TransferState::Aborted => return Ok(transfer),
        TransferState::Committed => return Err(LedgerError::Committed(id.to_string())),
        TransferState::Prepared => {}
    }
    let mut from = release_hold(st, &transfer)?;
    from.available = from.available.checked_add(transfer.amount).ok_or_else(|| LedgerError::Overflow(transfer.from.clone()))?;
    transfer.state = TransferState::Aborted;
    let mut change = Change::default();
    change.put(format!("{ACCOUNT}{}", transfer.from), &from)?;
    change.put(key, &transfer)?;
    st.put_all(change);
    Ok(transfer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger() -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(dir.path()).unwrap();
        (dir, l)
    }

    #[test]
    fn prepare_commit_moves_money_once() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 1000).unwrap();
        l.prepare("t1", "alice", "bob", 300).unwrap();
        assert_eq!(l.balance("alice").unwrap(), Account { available: 700, held: 300 });
        assert_eq!(l.commit("t1").unwrap().state, TransferState::Committed);
        assert_eq!(l.commit("t1").unwrap().state, TransferState::Committed, "repeatable");
        assert_eq!(l.prepare("t1", "alice", "bob", 300).unwrap().state, TransferState::Committed, "repeatable");
        assert_eq!(l.balance("alice").unwrap(), Account { available: 700, held: 0 });
        assert_eq!(l.balance("bob").unwrap(), Account { available: 300, held: 0 });
        assert!(l.audit().unwrap().conserved());
    }

    #[test]
    fn abort_releases_and_excludes_commit() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 1000).unwrap();
        l.prepare("t1", "alice", "bob", 300).unwrap();
        assert_eq!(l.abort("t1").unwrap().state, TransferState::Aborted);
        assert_eq!(l.abort("t1").unwrap().state, TransferState::Aborted);
        assert!(matches!(l.commit("t1"), Err(LedgerError::Aborted(_))));
        assert_eq!(l.balance("alice").unwrap(), Account { available: 1000, held: 0 });
        l.prepare("t2", "alice", "bob", 100).unwrap();
        l.commit("t2").unwrap();
        assert!(matches!(l.abort("t2"), Err(LedgerError::Committed(_))));
        assert!(l.audit().unwrap().conserved());
    }

    #[test]
    fn an_abort_that_overtakes_its_prepare_wins() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 1000).unwrap();
        l.abort("t1").unwrap();
        assert!(matches!(l.prepare("t1", "alice", "bob", 300), Err(LedgerError::Aborted(_))));
        assert_eq!(l.balance("alice").unwrap().held, 0);
    }

    #[test]
    fn refusals_change_nothing() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 100).unwrap();
        assert!(matches!(l.prepare("t1", "alice", "bob", 101), Err(LedgerError::InsufficientFunds { .. })));
        assert!(matches!(l.prepare("t1", "nobody", "bob", 1), Err(LedgerError::UnknownAccount(_))));
        assert!(matches!(l.prepare("t1", "alice", "bob", 0), Err(LedgerError::Invalid { field: "amount_cents", .. })));
        assert!(matches!(l.prepare("", "alice", "bob", 1), Err(LedgerError::Invalid { field: "transfer_id", .. })));
        assert!(matches!(l.commit("t9"), Err(LedgerError::NotFound(_))));
        l.prepare("t1", "alice", "bob", 10).unwrap();
        assert!(matches!(l.prepare("t1", "alice", "bob", 11), Err(LedgerError::Conflict(_))));
        assert!(matches!(l.deposit("d1", "alice", 99), Err(LedgerError::Conflict(_))));
        assert_eq!(l.balance("alice").unwrap(), Account { available: 90, held: 10 });
        let audit = l.audit().unwrap();
        assert_eq!((audit.deposited, audit.prepared, audit.transfers), (100, 10, 1));
        assert!(audit.conserved());
    }

    #[test]
    fn each_item_of_a_batch_sees_the_items_before_it() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 100).unwrap();
        let prepared = l.prepare_many(&[("t1", "alice", "bob", 60), ("t2", "alice", "carol", 60), ("t3", "alice", "carol", 40), ("t1", "alice", "bob", 60)]).unwrap();
        assert!(prepared[0].is_ok());
        assert!(matches!(prepared[1], Err(LedgerError::InsufficientFunds { available: 40, .. })), "{:?}", prepared[1]);
        assert!(prepared[2].is_ok(), "the refused item staged nothing: 40 are still available");
        assert_eq!(prepared[3].as_ref().unwrap().state, TransferState::Prepared, "a repeat in the same batch finds the first");
        assert_eq!(l.balance("alice").unwrap(), Account { available: 0, held: 100 });
        let committed = l.commit_many(&["t1", "t3", "t1", "t2"]).unwrap();
        assert_eq!(committed[2].as_ref().unwrap().state, TransferState::Committed, "a repeat commits once");
        assert!(matches!(committed[3], Err(LedgerError::NotFound(_))));
        assert_eq!(l.balance("alice").unwrap(), Account { available: 0, held: 0 });
        assert_eq!((l.balance("bob").unwrap().available, l.balance("carol").unwrap().available), (60, 40));
        assert!(l.audit().unwrap().conserved());
    }

    #[test]
    fn concurrent_calls_on_one_transfer_move_money_once() {
        let (_d, l) = ledger();
        l.deposit("d1", "alice", 1000).unwrap();
        std::thread::scope(|s| {
            for i in 0..8 {
                let l = &l;
                s.spawn(move || {
                    let _ = l.prepare("t1", "alice", "bob", 400);
                    if i % 2 == 0 {
                        let _ = l.commit("t1");
                    } else {
                        let _ = l.abort("t1");
                    }
                });
            }
        });
        let t = l.transfer("t1").unwrap();
        let (alice, bob) = (l.balance("alice").unwrap(), l.balance("bob").unwrap());
        match t.state {
            TransferState::Committed => assert_eq!((alice.available, bob.available), (600, 400)),
            TransferState::Aborted => assert_eq!((alice.available, bob.available), (1000, 0)),
            TransferState::Prepared => panic!("every thread decided"),
        }
        assert!(l.audit().unwrap().conserved());
    }

    #[test]
    fn the_ledger_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = Ledger::open(dir.path()).unwrap();
            l.deposit("d1", "alice", 500).unwrap();
            l.prepare("t1", "alice", "bob", 200).unwrap();
        }
        let l = Ledger::open(dir.path()).unwrap();
        assert_eq!(l.balance("alice").unwrap(), Account { available: 300, held: 200 });
        l.commit("t1").unwrap();
        assert!(l.audit().unwrap().conserved());
    }
}
