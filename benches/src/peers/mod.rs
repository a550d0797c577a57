//! The designs redpacket is compared with, driven by the same race (`crate::load`):
//! PostgreSQL with seed 002's compare-and-set, and Redis with a Lua script.

pub mod postgres;
pub mod redis;
