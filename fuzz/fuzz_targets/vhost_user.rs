//! The primary's vhost-user request handling: a hostile VMM's messages, with
//! arbitrary payloads and fds, over a socketpair, with fake workers; the
//! body is shared with the stable replay test (`tests/tests/fuzz_replay.rs`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qpnet_primary::fuzz::fuzz_vhost_user(data));
