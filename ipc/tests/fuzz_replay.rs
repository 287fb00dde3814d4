//! Replays the kept corpus of the `ipc_decode` fuzz target (`fuzz/corpus/ipc_decode/`)
//! through the very body the fuzzer runs, on the stable toolchain, as part
//! of `cargo test`. A missing or empty corpus fails the test.

use std::path::Path;

#[test]
fn ipc_decode_corpus_replays() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/ipc_decode");
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!(
            "fuzz corpus {} missing ({e}): it is kept in the repository (see ARCHITECTURE.md, \"Fuzzing\")",
            dir.display()
        )
    });
    let mut files = 0;
    for entry in entries {
        let path = entry.expect("corpus directory entry").path();
        if !path.is_file() {
            continue;
        }
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        eprintln!("replaying {}", path.display());
        qpnet_ipc::fuzz_ipc_decode(&bytes);
        files += 1;
    }
    assert!(
        files > 0,
        "fuzz corpus {} is empty: it is kept in the repository (see ARCHITECTURE.md, \"Fuzzing\")",
        dir.display()
    );
    eprintln!("{files} inputs of {} replayed", dir.display());
}
