#!/usr/bin/env bash
# Installs what the tests need, then runs every test: the Rust workspace (unit and integration
# tests against throwaway PostgreSQL clusters and the AWS emulator) and infra/'s CDK tests.
#
# AWS_ENDPOINT_URL set: tests use that emulator (e.g. LocalStack from docker-compose) instead of
# starting moto.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
# One build, never rebuilt in place: incremental state would only cost disk (gigabytes) and time.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
df -h . | awk 'NR==2 {print "[test] disk: " $4 " free of " $2}' >&2 || true

./scripts/setup.sh
# The other server versions the tests run against (13 to test its refusal, 14, 16, 17, 18).
./scripts/pg-versions.sh

# infra/ needs no cargo: run it beside the Rust build.
mkdir -p target
infra_log=target/infra-test.log
( ./infra/scripts/test.sh >"$infra_log" 2>&1; echo $? >"$infra_log.rc" ) &
infra_pid=$!

echo "[test] building the workspace" >&2
cargo build --workspace --all-targets --locked

# shellcheck source=scripts/moto.sh
. scripts/moto.sh
if [ -z "${AWS_ENDPOINT_URL:-}" ]; then
  start_moto target/moto.log
  trap stop_moto EXIT
  echo "[test] AWS emulator (moto) at $AWS_ENDPOINT_URL" >&2
else
  export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-test} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-test}
  export AWS_REGION=${AWS_REGION:-us-east-1}
  echo "[test] using the AWS emulator at $AWS_ENDPOINT_URL" >&2
fi
export PATH="$PWD/.venv/bin:$PATH"

rust_rc=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast --failure-output final || rust_rc=$?
else
  cargo test --workspace --locked --no-fail-fast || rust_rc=$?
fi

# The focused subset on every other supported server version (the full suite ran on the
# system's, 15): streaming, every type family, restarts and crashes, schema change, snapshots,
# TOAST, start-up checks, generated columns, failover without a failover slot. Tests that pick
# their own version (13's refusal, 16's standby, 17's failover slot) ran above.
subset='binary(capture) & (test(=changes_arrive_as_envelopes_in_commit_order_with_ledger_and_notifications)
  | test(=every_builtin_type_family_maps_to_the_documented_json)
  | test(=restarts_resume_without_loss_or_duplicates_after_clean_stops_and_crashes)
  | test(=add_column_mid_stream_starts_a_new_schema_version)
  | test(=a_new_slot_snapshots_existing_rows_once_then_streams_without_a_gap)
  | test(=a_table_backfilled_while_writes_hit_it_replays_to_the_table)
  | test(=a_table_without_a_key_is_read_once_while_it_changes)
  | test(=start_up_checks_fire_on_databases_that_trip_them)
  | test(=the_snapshot_honours_the_publications_column_list_and_row_filter))
  | binary(exactly_once) & (test(=unchanged_toast_values_are_written_under_replica_identity_full)
  | test(=a_lost_slot_is_recreated_keeping_what_the_ledger_recorded)
  | test(=buffered_changes_survive_a_reconnect_whose_stream_resumes_late))
  | binary(faults) & test(=the_capture_killed_at_random_moments_under_steady_writes_loses_and_doubles_nothing)
  | binary(versions) & (test(=generated_columns_appear_alike_in_the_snapshot_and_the_stream)
  | test(=without_a_failover_slot_a_failover_stops_the_capture_and_its_way_out_keeps_every_change))'
matrix_rc=0
matrix_times=""
for major in 14 16 17 18; do
  filter=$subset
  # Column lists and row filters are 15's.
  [ "$major" = 14 ] && filter="($subset) & !test(=the_snapshot_honours_the_publications_column_list_and_row_filter)"
  echo "[test] PostgreSQL $major: the focused subset" >&2
  began=$(date +%s)
  if cargo nextest --version >/dev/null 2>&1; then
    PG_BIN="$PWD/.pg/$major/bin" cargo nextest run --workspace --locked --no-fail-fast \
      --failure-output final -E "$filter" || matrix_rc=1
  else
    echo "[test] cargo-nextest is needed for the version matrix" >&2
    matrix_rc=1
  fi
  matrix_times="$matrix_times $major:$(( $(date +%s) - began ))s"
done

# The README's first command, from a private directory, on the build above.
demo_rc=0
./scripts/test-demo.sh || demo_rc=$?

wait "$infra_pid" || true
infra_rc=$(cat "$infra_log.rc" 2>/dev/null || echo 1)
echo "----- infra tests (infra/scripts/test.sh) -----"
tail -n 40 "$infra_log"

verdict() { [ "$1" = 0 ] && echo passed || echo FAILED; }
echo "[test] rust tests: $(verdict "$rust_rc"), PostgreSQL 14-18 subset: $(verdict "$matrix_rc") ($matrix_times ), demo: $(verdict "$demo_rc"), infra tests: $(verdict "$infra_rc"), $(( $(date +%s) - started )) s" >&2
[ "$rust_rc" = 0 ] && [ "$matrix_rc" = 0 ] && [ "$demo_rc" = 0 ] && [ "$infra_rc" = 0 ]
