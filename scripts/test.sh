#!/usr/bin/env bash
# Installs what the tests need, then runs every test: the Rust workspace (unit and integration
# tests against throwaway PostgreSQL clusters and the AWS emulator) and infra/'s CDK tests.
#
# AWS_ENDPOINT_URL set: tests use that emulator (e.g. LocalStack from docker-compose) instead of
# starting moto.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)

./scripts/setup.sh

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

# The README's first command, from a private directory, on the build above.
demo_rc=0
./scripts/test-demo.sh || demo_rc=$?

wait "$infra_pid" || true
infra_rc=$(cat "$infra_log.rc" 2>/dev/null || echo 1)
echo "----- infra tests (infra/scripts/test.sh) -----"
tail -n 40 "$infra_log"

verdict() { [ "$1" = 0 ] && echo passed || echo FAILED; }
echo "[test] rust tests: $(verdict "$rust_rc"), demo: $(verdict "$demo_rc"), infra tests: $(verdict "$infra_rc"), $(( $(date +%s) - started )) s" >&2
[ "$rust_rc" = 0 ] && [ "$demo_rc" = 0 ] && [ "$infra_rc" = 0 ]
