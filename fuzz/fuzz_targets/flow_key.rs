//! Flow-key parsing of a frame; the body is shared with the stable replay
//! test (`shared/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_shared::fuzz_flow_key(data));
