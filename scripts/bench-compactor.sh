#!/usr/bin/env bash
# Compaction benchmark (not a test): stages ROWS (default 1,000,000) ~500-byte change events into
# one hour of the AWS emulator, compacts them with the release build, and prints rows/s, MB/s,
# CPU time and peak RSS beside arrow's ArrowWriter (same typed rows, from memory) and DuckDB
# (the same staged files into one Parquet file).
#   ./scripts/bench-compactor.sh [--workload readme|mixed] [--store disk|emulator] [--rows N]
#                                [--batch-rows N] [--part-max-bytes N] [--no-duckdb]
#                                [--cpu-share F] [--formats jsonl,parquet,avro]
# --formats sets OUTPUT_FORMATS (default jsonl,parquet); `--formats parquet` writes what DuckDB
# writes.
# --cpu-share F runs the compaction under a CPU quota of F CPUs (a cgroup: needs root).
#   ./scripts/bench-compactor.sh --lambda-sizes [--rows N] ...
# runs it once per Lambda memory size (512, 1024, 1769, 3008 MB) at that size's CPU share
# (1 vCPU per 1,769 MB), without DuckDB.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck source=scripts/moto.sh
. scripts/moto.sh
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  mkdir -p target
  start_moto target/moto-bench.log
  trap stop_moto EXIT
fi
if [ "${1:-}" = "--lambda-sizes" ]; then
  shift
  cargo bench -p compactor --bench compact --no-run
  for mb in 512 1024 1769 3008; do
    share=$(python3 -c "print(round($mb / 1769, 3))")
    echo "=== Lambda ${mb} MB: ${share} vCPU"
    cargo bench -p compactor --bench compact -- --no-duckdb --cpu-share "$share" "$@"
  done
else
  cargo bench -p compactor --bench compact -- "$@"
fi
