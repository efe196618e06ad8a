//! cairn-ctl: the control protocol both `cairnd` and `cairnctl` compile, the client that reaches
//! the daemon over its unix socket, and the mapping from protocol errors to exit codes.
//! Nothing here depends on wasmtime: this crate is what a tool needs to drive a device.
//!
//! Layout: `proto` (generated from `proto/cairn.proto`), `paths` (where the socket lives by
//! default), `client` (connect over a unix socket), `exit` (gRPC status → exit code).

pub mod client;
pub mod exit;
pub mod paths;

pub mod proto {
    tonic::include_proto!("cairn.v1");
}
