//! cairn-ctl: the control protocol both `cairnd` and `cairnctl` compile, the client that reaches
//! the daemon over its unix socket, and the mapping from protocol errors to exit codes.
//! Nothing here depends on wasmtime: this crate is what a tool needs to drive a device.
//!
//! Layout: `proto` (generated from `proto/cairn.proto`), `paths` (where the socket lives by
//! default), `client` (connect over a unix socket), `exit` (gRPC status → exit code), `spec`
//! and `digest` (the typed app manifest both sides parse), `fleet` (the signed desired-state
//! document devices accept from the upstream lattice), `time` (UTC times without a tz database).

pub mod client;
pub mod digest;
pub mod exit;
pub mod fleet;
pub mod paths;
pub mod spec;
pub mod time;

pub mod proto {
    tonic::include_proto!("cairn.v1");
}
