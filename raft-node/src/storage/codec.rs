//! How values are encoded in RocksDB, in snapshots and in the Raft transport: bincode 1
//! through serde.
//!
//! Everything goes through these two functions. JSON was used first; profiling put it at 7 %
//! of all CPU on the hot-packet workload (every log entry is encoded once and decoded for each
//! follower and each apply). bincode writes fields in order with fixed-size integers: no
//! field names, no number formatting, smaller WAL records. It is not self-describing, which
//! openraft's serde types allow (they avoid `deserialize_any`). The format is pinned (`=1.3.3`)
//! because the bytes are on disk; a data directory records which codec and key layout wrote
//! it ([`FORMAT`]), and a node refuses one written by another.

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The codec and the key layout ([`super::keys`]) as recorded in a data directory. Layout 2
/// keeps an unsettled transfer under `U` only (layout 1 wrote it under `T` with an empty `U`
/// index entry).
pub const FORMAT: &str = "bincode-1/layout-2";

pub fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    bincode::serialize(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    bincode::deserialize(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
