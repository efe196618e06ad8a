//! See `cairnd::fuzzing::control_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cairnd::fuzzing::control_request(data));
