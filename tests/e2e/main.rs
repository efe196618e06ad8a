//! End-to-end tests: the real `cairnd` and `cairnctl` binaries, real unix sockets, real SQLite
//! files in temp dirs, real components built from `tests/components`, real HTTP.

mod access;
mod bad_input;
mod commands;
mod events;
mod fleet;
mod host_apis;
mod hostile;
mod import;
mod keyvalue;
mod lifecycle;
mod limits;
mod metrics;
mod outbound;
mod pools;
mod requests;
mod schedule;
mod service;
mod store;
