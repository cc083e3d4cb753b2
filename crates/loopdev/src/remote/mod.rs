//! Remote loop devices, wire-compatible with osbuild's `remoteloop`: a server that attaches loop devices
//! for clients on an AF_UNIX `SOCK_SEQPACKET` socket, and the client that asks for them.
//!
//! Layers, bottom up: `seqpacket` (the syscalls), `jsoncomm` (one JSON message per packet, fds in
//! `SCM_RIGHTS`, the `<args-via-fd>` memfd form), `wire` (the request and reply JSON), `server`, `client`.

mod attach;
pub mod client;
mod closer;
mod drainer;
mod fdbudget;
pub mod jsoncomm;
mod keeper;
mod options;
pub mod seqpacket;
pub mod server;
pub mod untrusted;
pub mod wire;
mod workers;

pub use client::Client;
pub use options::{ServerOptions, DEFAULT_LIMITS, DEFAULT_MAX_CONNECTIONS};
pub use server::{Server, Stats};
pub use wire::{Exception, Reply, Request};
