//! The `qpnet` binary: everything is in the library (`lib.rs`).

fn main() {
    qpnet_primary::main()
}
