#!/usr/bin/env bash
# Merge benchmark on ViT-B/32-shaped checkpoints (88 M f32 parameters each, pretrained + 8
# fine-tuned, generated once into target/bench-merge/, about 3.2 GB):
#   1. seconds and effective GB/s per method, beside a memory-copy baseline (benches/merge.rs);
#   2. the in-core kernels without file I/O (task-arithmetic, ties, emr, dare on 8 x 22 M entries
#      in memory, best of 3) beside a memcpy baseline measured in the same run, under glibc's
#      default allocator settings (as `mergeattack merge`) and again for task-arithmetic and ties
#      under the tool's session settings (MERGEATTACK_BENCH_MALLOPT=1: freed output pages reused),
#      and the SVD path of tsv-m on ViT-B/32 block shapes (full and top-96);
#   3. peak RSS of one `mergeattack merge` run per method, measured with GNU time
#      (`apt-get install -y time` if /usr/bin/time is missing).
# The 1-minute load average is printed next to the figures: compare only within one run.
# Usage: scripts/bench-merge.sh            (needs ~4 GB of disk under target/)
#        RSS_METHODS="task-arithmetic ties emr" scripts/bench-merge.sh   (peak RSS of fewer methods)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/time ]; then
    echo "GNU time is missing: apt-get install -y time" >&2
    exit 1
fi
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
MERGEATTACK_BENCH_FULL=1 cargo bench --bench merge
MERGEATTACK_BENCH_KERNELS=1 MERGEATTACK_BENCH_METHODS=task-arithmetic,ties,emr,dare cargo bench --bench merge
MERGEATTACK_BENCH_KERNELS=1 MERGEATTACK_BENCH_MALLOPT=1 MERGEATTACK_BENCH_METHODS=task-arithmetic,ties \
    cargo bench --bench merge
MERGEATTACK_BENCH_SVD=1 cargo bench --bench merge
cargo build --release --quiet -p mergeattack-harness --bin mergeattack
dir=target/bench-merge
models=()
for t in 0 1 2 3 4 5 6 7; do models+=("$dir/finetuned-$t.safetensors"); done
echo "peak RSS of \`mergeattack merge\` (8 models):"
for m in ${RSS_METHODS:-task-arithmetic ties emr dare tsv-m}; do
    log="$dir/time-$m.txt"
    if /usr/bin/time -v target/release/mergeattack merge --method "$m" --base "$dir/pretrained.safetensors" \
        --models "${models[@]}" -o "$dir/rss-$m.safetensors" >/dev/null 2>"$log"; then
        rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$log")
        wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$log")
        printf '  %-16s %8.1f MB  (wall %s, load %s)\n' "$m" "$(awk -v k="$rss" 'BEGIN {print k / 1024}')" "$wall" \
            "$(cut -d' ' -f1 /proc/loadavg)"
    else
        printf '  %-16s failed: %s\n' "$m" "$(grep '^error' "$log" | head -1)"
    fi
    rm -f "$dir"/rss-"$m"*.safetensors
done
