#!/usr/bin/env bash
# Compaction benchmark (not a test): stages ROWS (default 1,000,000) ~500-byte change events into
# one hour of the AWS emulator, compacts them with the release build, and prints rows/s, MB/s,
# CPU time and peak RSS beside arrow's ArrowWriter (same typed rows, from memory) and DuckDB
# (the same staged files into one Parquet file).
#   ./scripts/bench-compactor.sh [--rows N] [--batch-rows N] [--part-max-bytes N] [--no-duckdb]
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
cargo bench -p compactor --bench compact -- "$@"
