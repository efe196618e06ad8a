//! See `cairnd::fuzzing::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cairnd::fuzzing::config(data));
