//! How values are encoded in RocksDB and in the Raft transport: JSON through serde.
//!
//! JSON is slower than a binary format but is self-describing, so openraft's serde types
//! (which use attributes such as `default` and `transparent`) round-trip exactly and stored
//! data can be read with ordinary tools. Everything goes through these two functions, so the
//! format can change in one place (with a migration) if profiling says it matters.

use std::io;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub fn encode<T: Serialize + ?Sized>(value: &T) -> io::Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    serde_json::from_slice(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}
