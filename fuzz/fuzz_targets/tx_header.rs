//! TX virtio-net header check; the body is shared with the stable replay
//! test (`secondary/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_secondary::tx_header::fuzz_tx_header(data));
