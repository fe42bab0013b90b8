#!/usr/bin/env bash
# The README's first command as a newcomer runs it: ./scripts/demo.sh, then ./scripts/demo.sh stop,
# from a copy of this checkout inside a directory only its owner can enter (mode 700, like root's
# home or any mktemp -d). Reuses this checkout's binaries (CARGO_TARGET_DIR, CDC_DEMO_PREBUILT) and
# .venv, so nothing is compiled or installed twice. Called by scripts/test.sh after the workspace is built.
#
# Checks: the demo exits 0 and cdc-verify finds nothing; the private directories keep their modes;
# stop leaves no server running and no state behind.
set -euo pipefail
cd "$(dirname "$0")/.."
src=$PWD
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$src/target}
# The binaries test.sh built: a build from the copy would compile the workspace again, and, without
# the tests' tokio features, the dependencies under tokio too (9 minutes and 2 GB on 2 cores).
export CDC_DEMO_PREBUILT=1

outer=$(mktemp -d)            # mode 700, owned by the caller
home=$outer/home
mkdir -m 700 "$home"
repo=$home/pg-cdc-s3
log=$(mktemp)
cleanup() {
  [ -x "$repo/scripts/demo.sh" ] && "$repo/scripts/demo.sh" stop >/dev/null 2>&1 || true
  rm -rf "$outer" "$log"
}
trap cleanup EXIT

fail() {
  echo "demo test: FAILED: $*" >&2
  echo "----- demo output -----" >&2
  tail -n 60 "$log" >&2
  echo "demo: 0 passed, 1 failed"
  exit 1
}

# The checkout as it is (tracked and new files, not ignored ones), like a fresh clone.
mkdir "$repo"
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar -C "$src" --null -T - -cf - | tar -C "$repo" -xf -
ln -s "$src/.venv" "$repo/.venv"

echo "[test-demo] ./scripts/demo.sh from $repo (parents mode 700)" >&2
(cd "$repo" && ./scripts/demo.sh) >"$log" 2>&1 || fail "./scripts/demo.sh exited $?"

grep -q '^== cdc-verify' "$log" || fail "the demo did not reach cdc-verify"
grep -q 'Stop with:' "$log" || fail "the demo did not print its closing lines"
for table in public.users public.orders; do
  grep -q "$table" "$log" || fail "cdc-verify's report does not name $table"
done
pg_home=$(cat "$repo/.local/demo/pg_home")
if [ "$(id -u)" = 0 ]; then
  case $pg_home in
    "$repo"/*) fail "under root the cluster was put in $pg_home, which the postgres account cannot reach" ;;
  esac
  grep -q "cluster goes to $pg_home" "$log" || fail "the demo did not say where the cluster went"
fi
grep -q "data in $pg_home" "$log" || fail "the closing lines do not name the cluster's directory"
[ "$(stat -c %a "$outer")" = 700 ] || fail "the demo changed the mode of $outer"
[ "$(stat -c %a "$home")" = 700 ] || fail "the demo changed the mode of $home"
pg_pid=$(head -n 1 "$pg_home/data/postmaster.pid" 2>/dev/null) || fail "no server pid in $pg_home"
kill -0 "$pg_pid" 2>/dev/null || fail "the demo's server is not running after the demo"

again=$( (cd "$repo" && ./scripts/demo.sh) 2>&1 ) && fail "a second demo while one is set up did not refuse"
grep -q 'demo.sh stop' <<<"$again" || fail "the refusal of a second demo does not say how to fix it"

(cd "$repo" && ./scripts/demo.sh stop) >>"$log" 2>&1 || fail "./scripts/demo.sh stop exited $?"
[ ! -e "$repo/.local/demo" ] || fail "stop left $repo/.local/demo"
[ ! -e "$pg_home" ] || fail "stop left the cluster's directory $pg_home"
for _ in $(seq 1 50); do kill -0 "$pg_pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pg_pid" 2>/dev/null && fail "the demo's server (pid $pg_pid) still runs after stop"

echo "[test-demo] demo and stop passed from a private directory" >&2
echo "demo: 1 passed, 0 failed"
