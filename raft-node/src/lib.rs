//! A redpacket node: red packets in a consensus-replicated store.
//!
//! - [`packet`]: the packet rules (amounts, grab, open, expiry), pure and deterministic;
//! - [`storage`]: one RocksDB per node holding every group's log and state machine;
//! - [`raft`]: openraft types, the multi-group container, transport and leader balance;
//! - [`service`]: the gRPC services (packets, admin, Raft transport);
//! - [`node`], [`dev`], [`config`], [`cli`]: running it.

pub mod auth;
pub mod cli;
pub mod config;
pub mod dev;
pub mod ledger;
pub mod metrics;
pub mod node;
pub mod packet;
pub mod raft;
pub mod reconcile;
pub mod service;
pub mod settlement;
pub mod storage;
