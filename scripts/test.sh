#!/usr/bin/env bash
# The whole test suite: fetch the pinned external artifacts (cached, SHA-256 verified), then run
# every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p mergeattack-harness --bin mergeattack -- setup
cargo test --workspace "$@"
