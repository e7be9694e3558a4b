#!/usr/bin/env bash
# The whole test suite: fetch the pinned external artifacts (cached, SHA-256 verified), then run
# every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo run --quiet -p mergeattack-harness --bin mergeattack -- setup
# Tests run side by side, each with its own ONNX Runtime sessions: their intra-op threads sleep
# instead of spinning while they wait (the tool spins by default; outputs are the same either way).
export MERGEATTACK_ORT_CONFIG="${MERGEATTACK_ORT_CONFIG:-session.intra_op.allow_spinning=0}"
cargo test --workspace "$@"
