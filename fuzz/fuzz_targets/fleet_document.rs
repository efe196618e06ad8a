//! See `cairnd::fuzzing::fleet_document`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cairnd::fuzzing::fleet_document(data));
