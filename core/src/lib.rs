//! cairn-core: what both binaries share, so that the daemon depends on no part of the CLI and
//! the CLI on no part of the daemon. Nothing here depends on wasmtime or SQLite.
//!
//! Layout: `spec` and `digest` (the typed app manifest both sides parse), `fleet` (the signed
//! desired-state document devices accept from the upstream lattice), `proto` (the control
//! protocol, generated from `proto/cairn.proto`), `paths` (where the socket and state live by
//! default), `time` (UTC times without a tz database), `levels` (log levels and how streams rank),
//! `cron` (the five-field expressions of `[[schedule]] cron`), `outbound` (`[outbound]
//! allowed_hosts` and the address rule), `text` (cutting text to a byte bound).

pub mod cron;
pub mod digest;
pub mod fleet;
pub mod levels;
pub mod outbound;
pub mod paths;
pub mod spec;
pub mod text;
pub mod time;

pub mod proto {
    tonic::include_proto!("cairn.v1");
}
