//! Replays the kept corpus of every fuzz target (`fuzz/corpus/<target>/`)
//! through the very body the fuzzer runs, on the stable toolchain, as part
//! of `cargo test`. A missing or empty corpus fails its test. Needs no root.

use std::path::Path;

/// Feed every file of `fuzz/corpus/<target>/` to `body`, one target at a
/// time: the `vhost_user` body counts this process's open fds.
fn replay(target: &str, body: fn(&[u8])) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let why = "it is kept in the repository (see ARCHITECTURE.md, \"Fuzzing\")";
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz corpus {} missing ({e}): {why}", dir.display()));
    let mut files = 0;
    for entry in entries {
        let path = entry.expect("corpus directory entry").path();
        if !path.is_file() {
            continue;
        }
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        body(&bytes);
        files += 1;
    }
    assert!(files > 0, "fuzz corpus {} is empty: {why}", dir.display());
    eprintln!("{files} inputs of {} replayed", dir.display());
}

#[test]
fn ipc_decode_corpus_replays() {
    replay("ipc_decode", qpnet_ipc::fuzz_ipc_decode);
}

#[test]
fn tx_header_corpus_replays() {
    replay("tx_header", qpnet_secondary::tx_header::fuzz_tx_header);
}

#[test]
fn flow_key_corpus_replays() {
    replay("flow_key", qpnet_shared::fuzz_flow_key);
}

#[test]
fn chain_corpus_replays() {
    replay("chain", qpnet_secondary::fuzz::fuzz_chain);
}

#[test]
fn stream_corpus_replays() {
    replay("stream", qpnet_secondary::fuzz::fuzz_stream);
}

#[test]
fn vhost_user_corpus_replays() {
    replay("vhost_user", qpnet_primary::fuzz::fuzz_vhost_user);
}
