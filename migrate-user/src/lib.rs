//! tcpmig: move live TCP connections between hosts with a blackout that does not grow with
//! their number.
//!
//! One module per plane: [`freeze`] (eBPF programs that stop a service's traffic with one map
//! update), [`repair`] (bulk TCP_REPAIR dump and restore), [`image`] (the format connections
//! travel in), [`net`] (namespaces, addresses, announcements), [`handoff`] (giving restored
//! sockets to the application), and [`migrate`] (a standalone migration, or a dump to a file) and
//! [`criu`] (CRIU's action script) on top of them. [`shard`] gives threads fd tables of their
//! own, for more sockets than one table holds. [`sys`] holds every raw kernel call: the rest of
//! the crate is safe Rust, and the compiler holds it to that (`unsafe_code` is denied outside
//! `sys`). The library never prints: it returns values and errors, and logs with `tracing`.
//!
//! docs/architecture.md in the repository maps each step of a migration to its module and
//! function.
#![deny(unsafe_code)]

pub mod criu;
pub mod freeze;
pub mod handoff;
pub mod image;
pub mod migrate;
pub mod net;
pub mod repair;
pub mod shard;
#[allow(unsafe_code)]
pub mod sys;
pub mod tuple;
