//! Group commit for Raft log appends.
//!
//! A log append is acknowledged to Raft only once it is on disk. Writing each append with
//! `sync` would cost one fsync per append per group; instead appends are written unsynced
//! (so they are readable at once) and their completion callbacks queue here. One thread
//! fsyncs the shared WAL once for everything queued, then completes all of them: with 16
//! groups appending at once, one fsync covers them all. Because RocksDB has one WAL, the
//! fsync also covers every earlier write of any column family.

use std::io;
use std::sync::Arc;
use std::sync::Weak;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread;

use openraft::storage::IOFlushed;
use rocksdb::DB;

use crate::raft::TypeConfig;

/// WAL fsyncs done by this process so far (for the `wal_syncs_total` metric).
static SYNCS: AtomicU64 = AtomicU64::new(0);

pub fn syncs() -> u64 {
    SYNCS.load(Ordering::Relaxed)
}

#[derive(Clone)]
pub struct WalSyncer {
    tx: mpsc::Sender<IOFlushed<TypeConfig>>,
}

impl WalSyncer {
    /// Starts the sync thread; it ends when every `WalSyncer` clone is dropped. It holds the
    /// database weakly, so closing the store closes RocksDB on the caller's thread.
    pub fn start(db: &Arc<DB>) -> WalSyncer {
        let db: Weak<DB> = Arc::downgrade(db);
        let (tx, rx) = mpsc::channel::<IOFlushed<TypeConfig>>();
        thread::Builder::new()
            .name("wal-sync".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut waiting = vec![first];
                    waiting.extend(rx.try_iter());
                    let result = match db.upgrade() {
                        Some(db) => {
                            SYNCS.fetch_add(1, Ordering::Relaxed);
                            db.flush_wal(true).map_err(|e| e.to_string())
                        }
                        None => Err("database closed".to_string()),
                    };
                    for callback in waiting {
                        callback.io_completed(result.clone().map_err(io::Error::other));
                    }
                }
            })
            .expect("spawn wal-sync thread");
        WalSyncer { tx }
    }

    /// Completes `callback` once everything written so far is durable.
    pub fn after_sync(&self, callback: IOFlushed<TypeConfig>) {
        if let Err(mpsc::SendError(callback)) = self.tx.send(callback) {
            callback.io_completed(Err(io::Error::other("wal-sync thread has stopped")));
        }
    }
}
