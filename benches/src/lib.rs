//! redpacket's benchmarks.
//!
//! - `cargo bench -p redpacket-bench`: criterion benches of the amount algorithm (`amounts`)
//!   and of one state-machine apply on RocksDB (`apply`);
//! - `cargo run --release -p redpacket-bench -- hot|many|mixed`: the load generator
//!   ([`local`] starts a local cluster of real processes for it; [`load`] races grabs on any
//!   [`load::Target`], [`mixed`] runs the mixed workload, [`peers`] are PostgreSQL and Redis,
//!   [`cpu`] says which process spent the CPU).

pub mod cpu;
pub mod load;
pub mod local;
pub mod mixed;
pub mod peers;
