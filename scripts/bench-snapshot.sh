#!/usr/bin/env bash
# Snapshot benchmark of the capture (a command, not a test): a throwaway PostgreSQL holds one
# table of ROWS rows (~200 bytes each); a new slot's initial snapshot (the chunked backfill) is
# taken into the emulator (S3 + DynamoDB) at default settings, and the same table is read with
# psql's \copy (SELECT * FROM items ORDER BY id) TO /dev/null in the same run. Prints both rates,
# their ratio, the capture's peak RSS and the longest transaction a chunk held open.
#
#   ./scripts/bench-snapshot.sh [ROWS]        (default 5000000; BENCH_LOG=file keeps the capture's log)
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-5000000}
./scripts/setup.sh
cargo build --release -p capture --quiet
state=$(mktemp -d /tmp/bench-snapshot.XXXXXX)
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
echo "loading $ROWS rows" >&2
psql_pg "$state/pg" bench >/dev/null <<SQL
CREATE TABLE items (id bigint PRIMARY KEY, name text, qty int, price numeric(10,2), note text, at timestamptz);
INSERT INTO items
  SELECT g, 'item-' || g, g % 100, (g % 10000) / 100.0, repeat('x', 120), now()
  FROM generate_series(1, $ROWS) g;
VACUUM ANALYZE items;
CREATE PUBLICATION bench_pub FOR TABLE items;
SQL
table_bytes=$(psql_pg "$state/pg" bench -At -c "SELECT pg_table_size('items')")

.venv/bin/python - <<'PY'
import os, boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
boto3.client("s3", **kw).create_bucket(Bucket="bench-bucket")
boto3.client("dynamodb", **kw).create_table(TableName="bench-ledger",
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    BillingMode="PAY_PER_REQUEST")
PY

# The reference first, with a warm cache for both (the load just wrote the table).
cstart=$(date +%s.%N)
psql_pg "$state/pg" bench -c "\\copy (SELECT * FROM items ORDER BY id) TO '/dev/null'" >/dev/null
cend=$(date +%s.%N)

start=$(date +%s.%N)
POSTGRES_HOST=127.0.0.1 POSTGRES_PORT=$PG_PORT POSTGRES_DATABASE=bench POSTGRES_USER=postgres POSTGRES_PASSWORD=postgres \
PGSSLMODE=disable CDC_SLOT_NAME=bench_snapshot CDC_PUBLICATION=bench_pub S3_BUCKET_NAME=bench-bucket \
LEDGER_TABLE=bench-ledger HEALTH_PORT=0 RUST_LOG=info,capture::stream=debug \
  ${BENCH_WRAP:-} ./target/release/capture --exit-when-caught-up >/dev/null 2>"$state/capture.log"
end=$(date +%s.%N)
if [ -n "${BENCH_LOG:-}" ]; then cp "$state/capture.log" "$BENCH_LOG"; fi
peak_kib=$(grep -o 'peak_rss_kib=[0-9]*' "$state/capture.log" | tail -n1 | cut -d= -f2)
longest_ms=$(grep -o 'transaction_ms=[0-9]*' "$state/capture.log" | cut -d= -f2 | sort -n | tail -n1)
chunks=$(grep -c 'backfill chunk placed' "$state/capture.log" || true)
read_rows=$(grep -o 'chunk placed table=public.items rows=[0-9]*' "$state/capture.log" | awk -F= '{s += $NF} END {print s + 0}')

python3 - "$ROWS" "$start" "$end" "$cstart" "$cend" "$peak_kib" "$longest_ms" "$chunks" "$read_rows" "$table_bytes" <<'PY'
import sys
rows, s, e, cs, ce, peak, longest, chunks, read, size = sys.argv[1:]
rows = int(rows); cap = float(e) - float(s); cp = float(ce) - float(cs)
print(f"table: {rows:,} rows, {int(size) / 1e6:.0f} MB on disk")
print(f"capture snapshot : {cap:6.2f} s  {rows / cap:10,.0f} rows/s  ({int(read):,} rows in {chunks} chunks, into the emulator)  peak RSS {int(peak) / 1024:.0f} MiB  longest chunk transaction {int(longest)} ms")
print(f"psql \\copy        : {cp:6.2f} s  {rows / cp:10,.0f} rows/s  (ORDER BY id, to /dev/null)")
print(f"ratio (capture rate / \\copy rate): {cp / cap:.2f}")
PY
