//! cairn-ctl: the client that reaches the daemon over its unix socket, and the mapping from
//! protocol errors to exit codes. What the daemon shares with the CLI (the protocol, the
//! manifest, the fleet document) is in `cairn-core`. Nothing here depends on wasmtime.

pub mod client;
pub mod exit;
