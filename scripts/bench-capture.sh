#!/usr/bin/env bash
# Drain benchmark of the capture (a command, not a test): builds a backlog in a throwaway
# PostgreSQL, then measures the capture draining it into the emulator (S3 + DynamoDB) at default
# settings, and pg_recvlogical with pgoutput draining a second slot to /dev/null. Workloads:
#   readme  ROWS rows of ~200 bytes (bigint, text, int, numeric, a 120-character text,
#           timestamptz) in 1,000-row transactions, plus updates and deletes of a tenth of them
#   mixed   ROWS rows of bigint, text, numeric(12,2), a 60-character text, timestamptz and a
#           small jsonb, in 1,000-row transactions (inserts only)
#
#   ./scripts/bench-capture.sh [--workload readme|mixed] [ROWS]     (default: readme, 1000000)
#
# BASELINE_BIN=path/to/capture also drains a third slot with another build of the capture (into
# its own bucket and ledger), so a change is compared with what it replaces in the same run.
# Each capture's CPU time (user, system) is printed too.
# PROFILE=strace also counts the capture's system calls (strace -c -f; the drain is then slower,
# only the counts mean anything) and PROFILE=perf samples it (perf record -g); the report is
# printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKLOAD=readme
if [ "${1:-}" = --workload ]; then
  WORKLOAD=${2:?--workload needs readme or mixed}
  shift 2
fi
case "$WORKLOAD" in
  readme | mixed) ;;
  *) echo "unknown workload $WORKLOAD (readme, mixed)" >&2; exit 2 ;;
esac
ROWS=${1:-1000000}
./scripts/setup.sh
cargo build --release -p capture --quiet
state=$(mktemp -d /tmp/bench-capture.XXXXXX)
chmod 755 "$state"  # the server runs as the postgres account under root
# shellcheck source=scripts/pg.sh
. scripts/pg.sh
# shellcheck source=scripts/moto.sh
. scripts/moto.sh
cleanup() { stop_pg "$state/pg"; stop_moto; rm -rf "$state"; }
trap cleanup EXIT
start_pg "$state/pg"
start_moto "$state/moto.log"
psql_pg "$state/pg" postgres -c "CREATE DATABASE bench" >/dev/null
if [ "$WORKLOAD" = readme ]; then
  table_sql="CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), note text, at timestamptz)"
else
  table_sql="CREATE TABLE items (id bigint PRIMARY KEY, kind text, amount numeric(12,2), note text, at timestamptz, attrs jsonb)"
fi
psql_pg "$state/pg" bench >/dev/null <<SQL
$table_sql;
CREATE PUBLICATION bench_pub FOR TABLE items;
SELECT pg_create_logical_replication_slot('bench_capture', 'pgoutput');
SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput');
SELECT pg_create_logical_replication_slot('bench_baseline', 'pgoutput');
SQL
if [ "$WORKLOAD" = readme ]; then
echo "building the backlog: $ROWS rows in 1,000-row transactions, plus updates and deletes" >&2
psql_pg "$state/pg" bench >/dev/null <<SQL
DO \$\$
BEGIN
  FOR b IN 0..($ROWS / 1000 - 1) LOOP
    INSERT INTO items
      SELECT g, 'item-' || g, g % 100, (g % 10000) / 100.0, repeat('x', 120), now()
      FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
    COMMIT;
  END LOOP;
  FOR b IN 0..($ROWS / 10000 - 1) LOOP
    UPDATE items SET qty = qty + 1 WHERE id > b * 10000 AND id <= b * 10000 + 500;
    DELETE FROM items WHERE id > b * 10000 + 500 AND id <= b * 10000 + 1000;
    COMMIT;
  END LOOP;
END
\$\$;
SQL
changes=$(( ROWS + ROWS / 10 ))
else
echo "building the backlog: $ROWS rows (jsonb, numeric, timestamptz) in 1,000-row transactions" >&2
psql_pg "$state/pg" bench >/dev/null <<SQL
DO \$\$
BEGIN
  FOR b IN 0..($ROWS / 1000 - 1) LOOP
    INSERT INTO items
      SELECT g, 'kind-' || (g % 7), (g % 1000000) / 100.0, repeat('n', 60), now(),
             jsonb_build_object('k', g % 13, 'tag', 'x' || (g % 5), 'ok', g % 2 = 0)
      FROM generate_series(b * 1000 + 1, b * 1000 + 1000) g;
    COMMIT;
  END LOOP;
END
\$\$;
SQL
changes=$ROWS
fi
target=$(psql_pg "$state/pg" bench -At -c "SELECT pg_current_wal_lsn()")
wal_bytes=$(psql_pg "$state/pg" bench -At -c "SELECT pg_wal_lsn_diff('$target', confirmed_flush_lsn) FROM pg_replication_slots WHERE slot_name = 'bench_capture'")

.venv/bin/python - <<'PY'
import os, boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
for name in ("bench", "baseline"):
    boto3.client("s3", **kw).create_bucket(Bucket=f"{name}-bucket")
    boto3.client("dynamodb", **kw).create_table(TableName=f"{name}-ledger",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
        BillingMode="PAY_PER_REQUEST")
PY

# drain BINARY SLOT NAME: the capture BINARY drains SLOT into bucket and ledger NAME; its CPU
# seconds (user system) land in $state/NAME.cpu.
drain() {
  POSTGRES_HOST=127.0.0.1 POSTGRES_PORT=$PG_PORT POSTGRES_DATABASE=bench POSTGRES_USER=postgres POSTGRES_PASSWORD=postgres \
  PGSSLMODE=disable CDC_SLOT_NAME=$2 CDC_PUBLICATION=bench_pub S3_BUCKET_NAME=$3-bucket \
  LEDGER_TABLE=$3-ledger HEALTH_PORT=0 RUST_LOG=info \
    /usr/bin/time -f "%U %S" -o "$state/$3.cpu" ${PROFILER:-} "$1" --exit-when-caught-up >/dev/null 2>"$state/$3.log"
}
case "${PROFILE:-}" in
  "") ;;
  strace) PROFILER="strace -c -f -o $state/strace.txt" ;;
  perf) PROFILER="perf record -F 499 -g -o $state/perf.data --" ;;
  *) echo "unknown PROFILE $PROFILE (strace, perf)" >&2; exit 2 ;;
esac

start=$(date +%s.%N)
drain ./target/release/capture bench_capture bench
end=$(date +%s.%N)
PROFILER=
cp "$state/bench.log" "$state/capture.log"
peak_kib=$(grep -o 'peak_rss_kib=[0-9]*' "$state/capture.log" | tail -n1 | cut -d= -f2)
staged=$(.venv/bin/python -c "
import os, boto3
s3 = boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'], region_name='us-east-1')
total = 0
for page in s3.get_paginator('list_objects_v2').paginate(Bucket='bench-bucket'):
    total += sum(o['Size'] for o in page.get('Contents', []))
print(total)")

rstart=$(date +%s.%N)
PGPASSWORD=postgres "$(pg_bindir)/pg_recvlogical" -h 127.0.0.1 -p "$PG_PORT" -U postgres -d bench \
  --slot bench_recvlogical --start --endpos "$target" -o proto_version=1 -o publication_names=bench_pub \
  -f /dev/null --no-loop
rend=$(date +%s.%N)

bstart=0 bend=0
if [ -n "${BASELINE_BIN:-}" ]; then
  bstart=$(date +%s.%N)
  drain "$BASELINE_BIN" bench_baseline baseline
  bend=$(date +%s.%N)
fi

WORKLOAD=$WORKLOAD python3 - "$changes" "$start" "$end" "$rstart" "$rend" "$peak_kib" "$wal_bytes" "$staged" "$bstart" "$bend" "$state" <<'PY'
import os, sys
changes, s, e, rs, re_, peak, wal, staged, bs, be, state = sys.argv[1:]
changes = int(changes); cap = float(e) - float(s); rec = float(re_) - float(rs); wal = int(wal)
def cpu(name):
    try:
        u, sy = open(f"{state}/{name}.cpu").read().split()[-2:]
        return f"  CPU {float(u):.2f} s user {float(sy):.2f} s system"
    except (OSError, ValueError):
        return ""
print(f"backlog ({os.environ.get('WORKLOAD', 'readme')}): {changes:,} changes, {wal / 1e6:.1f} MB of WAL")
print(f"capture        : {cap:6.2f} s  {changes / cap:10,.0f} changes/s  {wal / cap / 1e6:6.1f} MB/s of WAL  peak RSS {int(peak) / 1024:.0f} MiB  staged {int(staged) / 1e6:.1f} MB gzip{cpu('bench')}")
print(f"pg_recvlogical : {rec:6.2f} s  {changes / rec:10,.0f} changes/s  {wal / rec / 1e6:6.1f} MB/s of WAL  (to /dev/null)")
print(f"ratio (capture rate / pg_recvlogical rate): {rec / cap:.2f}")
if float(be) > 0:
    base = float(be) - float(bs)
    print(f"baseline build : {base:6.2f} s  {changes / base:10,.0f} changes/s{cpu('baseline')}")
    print(f"ratio (capture rate / baseline rate): {base / cap:.2f}; baseline / pg_recvlogical: {rec / base:.2f}")
PY
case "${PROFILE:-}" in
  strace) echo "system calls of the capture (strace -c -f):"; head -n 16 "$state/strace.txt" ;;
  perf) echo "top of the capture's profile (perf, self time):"
        perf report -i "$state/perf.data" --no-children --stdio --percent-limit 2 2>/dev/null \
          | grep -E '^ +[0-9.]+%' | head -n 15 ;;
esac
