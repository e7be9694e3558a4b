#!/usr/bin/env bash
# The engine benchmark: benches/engine.rs (criterion; ViT-B/32-sized random CLIP vision tower,
# batch 32, 2 threads: forward and forward + input gradient images/s, session creation, peak RSS
# of the memory-only run: MERGEATTACK_BENCH_MEMORY=1),
# then the same computation in PyTorch eager (scripts/clip_reference/bench_torch.py) when torch is
# importable by $PYTHON (default python3), and the ratios.
#
#   scripts/bench-engine.sh            # PROFILE=release by default; PROFILE=dev builds faster
#                                      # (the hot path is ONNX Runtime's own code either way)
#   BENCH_AB=1 scripts/bench-engine.sh # also: pre-packed against fed weights, passes alternated in
#                                      # one process (robust to other load on the machine)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-release}"
PYTHON="${PYTHON:-python3}"
lscpu | grep -E "Model name|^CPU\(s\)" || true
# The machine may be shared: report its load before and after (timings need a quiet machine).
echo "load before: $(cut -d" " -f1-3 /proc/loadavg)"
log="$(mktemp)"
# Peak resident memory of one model doing a forward pass and a forward + input gradient, alone in
# its process (the criterion run below also creates extra models for the session-creation timing).
MERGEATTACK_BENCH_MEMORY=1 cargo bench --profile "$PROFILE" --bench engine 2>&1 | grep engine-memory-only || true
cargo bench --profile "$PROFILE" --bench engine -- --noplot 2>&1 | tee "$log"
ips() { # criterion's mean time per batch -> images/s
  "$PYTHON" -c "import json,sys; e=json.load(open(sys.argv[1])); print(${MERGEATTACK_BENCH_BATCH:-32}/(e['mean']['point_estimate']*1e-9))" \
    "target/criterion/engine/$1/new/estimates.json"
}
fwd="$(ips forward)"; grad="$(ips forward_input_grad)"
echo "mergeattack (ONNX Runtime): forward ${fwd} images/s, forward+input grad ${grad} images/s"
grep engine-summary "$log" || true
"$PYTHON" scripts/clip_reference/bench_torch.py --threads "${MERGEATTACK_BENCH_THREADS:-2}" \
  --batch "${MERGEATTACK_BENCH_BATCH:-32}" --rust-forward "$fwd" --rust-grad "$grad"
if [ -n "${BENCH_AB:-}" ]; then
  MERGEATTACK_BENCH_AB=";MERGEATTACK_FED_WEIGHTS=1" MERGEATTACK_BENCH_REPS="${MERGEATTACK_BENCH_REPS:-6}" \
    cargo bench --profile "$PROFILE" --bench engine 2>&1 | grep "^ab" || true
fi
rm -f "$log"
echo "load after: $(cut -d" " -f1-3 /proc/loadavg)"
