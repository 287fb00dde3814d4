//! Descriptor-chain walking and the TX and RX paths over guest memory built
//! from the input; the body is shared with the stable replay test
//! (`tests/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_secondary::fuzz::fuzz_chain(data));
