#!/usr/bin/env bash
# Example Slurm array job: run one study as N shards in parallel, then build one report.
#
#   sbatch --array=0-7 scripts/slurm-study.sh study.toml          # 8 shards: 0/8 ... 7/8
#   # when all array tasks are done:
#   mergeattack report study-out/results-*.sqlite -o study-out/report
#
# The report's metrics.csv is byte-identical to the one of a single unsharded run of the same
# config and seed (whatever the thread counts or interruptions); timings.csv holds each setting's
# seconds per phase. Adversarial images of each shard are saved under $OUT/adversarial/.
#
# Shard i takes settings i, i+n, i+2n, ... of the study's fixed enumeration (`--shard i/n`,
# 0-based). Each shard writes its own results store, so shards never contend for one SQLite file;
# `mergeattack report` reads several stores together. A shard that is killed (time limit,
# preemption) loses at most the setting in flight: resubmitting the same array index resumes it.
#
#SBATCH --job-name=mergeattack-study
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%A_%a.out
# For the CUDA execution provider add e.g. `#SBATCH --gres=gpu:1` and `device = "cuda"` in the config.
set -euo pipefail

CONFIG=${1:-examples/study.toml}
OUT=${OUT:-study-out}
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array=0-(N-1)}"
COUNT=${SLURM_ARRAY_TASK_COUNT:?submit with sbatch --array=0-(N-1)}
# Shards are 0-based and every index must be covered: submit --array=0-(N-1) (no gaps, no stride).
INDEX=$(( SLURM_ARRAY_TASK_ID - ${SLURM_ARRAY_TASK_MIN:-0} ))

mkdir -p "$OUT"
srun mergeattack study \
    --config "$CONFIG" \
    --shard "${INDEX}/${COUNT}" \
    --threads "${SLURM_CPUS_PER_TASK:-8}" \
    --out "$OUT" \
    --quiet \
    --no-report \
    --store "$OUT/results-${INDEX}-of-${COUNT}.sqlite"
