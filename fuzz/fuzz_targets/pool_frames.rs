//! See `cairnd::fuzzing::pool_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| cairnd::fuzzing::pool_frames(data));
