#!/usr/bin/env bash
# test.sh: the whole qpnet test suite, from a fresh Debian 12 machine.
# Installs what is missing, checks formatting and lints, builds, and runs the
# unit and integration tests (TAPs in namespaces, a test VMM over vhost-user,
# a real Linux guest under QEMU). Needs root (namespaces, TAP devices).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "test.sh: the tests create network namespaces and TAP devices: run as root (sudo scripts/test.sh)" >&2
  exit 1
fi
bash scripts/install-deps.sh test
export PATH="$HOME/.cargo/bin:$PATH"
echo "== format" >&2
cargo fmt --all -- --check
echo "== clippy" >&2
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== build" >&2
cargo build --release --workspace
export QPNET_BIN="$PWD/target/release/qpnet"
echo "== tests" >&2
cargo test --release --workspace "$@"
