//! See `cairnd::fuzzing::import_manifest`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cairnd::fuzzing::import_manifest(data));
