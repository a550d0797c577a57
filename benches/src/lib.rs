//! redpacket's benchmarks. `cargo bench -p redpacket-bench` runs the criterion benches:
//! `amounts` (the amount algorithm) and `apply` (one state-machine apply on RocksDB).
//! The load generator against a running cluster comes with the performance work.
