//! tcpmig: move live TCP connections between hosts with a blackout that does not grow with
//! their number.
//!
//! One module per plane: [`freeze`] (eBPF programs that stop a service's traffic with one map
//! update), [`repair`] (bulk TCP_REPAIR dump and restore), [`image`] (the format connections
//! travel in), [`net`] (namespaces, addresses, announcements), and [`migrate`] and [`criu`] on top
//! of them. [`shard`] gives threads fd tables of their own, for more sockets than one table holds.
//! The library never prints: it returns values and errors, and logs with `tracing`.
pub mod criu;
pub mod freeze;
pub mod handoff;
pub mod image;
pub mod migrate;
pub mod net;
pub mod repair;
pub mod shard;
pub mod sys;
pub mod tuple;
