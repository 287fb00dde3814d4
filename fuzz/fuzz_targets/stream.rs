//! A hostile stream peer against the worker's stream frame I/O (length
//! prefixes and frames cut anywhere, bad prefixes, reads into buffers of
//! any size), checked against a model; the body is shared with the stable
//! replay test (`tests/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_secondary::fuzz::fuzz_stream(data));
