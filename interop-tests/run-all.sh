#!/usr/bin/env bash
# Runs every test of the workspace, installing what the tests need first.
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Outside peers for interop tests are installed here as they are added (apt/npm/pip).
# The unit and integration tests need only the Rust toolchain.
need_rust() { command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup)" >&2; exit 1; }; }
need_rust

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
cargo test --workspace --all-targets
cargo test --workspace --doc
