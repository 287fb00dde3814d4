//! Control-message decoding; the body is shared with the stable replay
//! test (`ipc/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_ipc::fuzz_ipc_decode(data));
