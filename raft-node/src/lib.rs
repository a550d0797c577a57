//! A redpacket node: red packets in a consensus-replicated store.
//!
//! - [`packet`]: the packet rules (amounts, grab, open, expiry), pure and deterministic;
//! - [`storage`]: one RocksDB per node holding every group's log and state machine;
//! - [`raft`]: openraft types, the multi-group container, transport and leader balance;
//! - [`service`]: the gRPC services (packets, admin, Raft transport);
//! - [`node`], [`dev`], [`config`], [`cli`]: running it.

/// jemalloc serves every allocation of a process that links this crate: the node, the
/// payment ledger, and the load generator that hosts both. A grab allocates in many small
/// pieces (request, log entry, keys and values, replies), and glibc's malloc was a fifth of
/// the CPU of a `hot` race (`_int_malloc`, `_int_free`, `malloc_consolidate`). Alternating
/// builds with and without it: `hot` was faster in 5 pairs of 5 (+4 to +20 %) and `many` in
/// 8 of 9 (-0.4 to +23 %), with less node CPU per grab in 12 of the 14. (mimalloc, tried
/// earlier, doubled the CPU.)
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
