//! cairnd: the cairn daemon. Everything is in the library (`lib.rs`), so that the fuzz targets
//! reach the same parsers the daemon runs.

fn main() {
    cairnd::cli();
}
