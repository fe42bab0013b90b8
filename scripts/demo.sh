#!/usr/bin/env bash
# Runs the pipeline end to end on local defaults: a throwaway PostgreSQL loaded from init-db.sql,
# the AWS emulator (moto) with the bucket, ledger table and queue, sample writes, then the capture
# and the compactor; shows the final files and checks them with cdc-verify.
#
#   ./scripts/demo.sh         start everything and run the demo (leaves the servers running)
#   ./scripts/demo.sh stop    stop the servers and remove the demo's state (.local/demo)
#
# The demo's state lives in .local/demo. Under root the PostgreSQL server runs as the 'postgres'
# account; when that account cannot enter the repository's directories (a clone in a private home),
# the cluster goes to a fresh directory under /tmp instead, named in .local/demo/pg_home.
# CARGO_TARGET_DIR is honoured (the binaries are taken from there).
set -euo pipefail
cd "$(dirname "$0")/.."
state=$PWD/.local/demo
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
# shellcheck source=scripts/pg.sh
. scripts/pg.sh
# shellcheck source=scripts/moto.sh
. scripts/moto.sh

if [ "${1:-}" = stop ]; then
  pg_home=$state/pg
  [ -f "$state/pg_home" ] && pg_home=$(cat "$state/pg_home")
  stop_pg "$pg_home"
  [ -f "$state/moto.pid" ] && kill "$(cat "$state/moto.pid")" 2>/dev/null || true
  if [ "$pg_home" != "$state/pg" ]; then rm -rf "$pg_home"; fi
  rm -rf "$state"
  echo "demo stopped and removed"
  exit 0
fi
if [ -n "${1:-}" ]; then
  echo "error: unknown argument '$1'; usage: ./scripts/demo.sh [stop]" >&2
  exit 2
fi

if [ -d "$state" ]; then
  echo "error: a demo is already set up in $state (its servers may still be running)." >&2
  echo "  fix: run ./scripts/demo.sh stop, then ./scripts/demo.sh again" >&2
  exit 1
fi

failed() {
  echo >&2
  echo "[demo] stopped at an error (above). Logs and the servers' state are in $state;" >&2
  echo "       ./scripts/demo.sh stop stops what was started and removes it." >&2
}
trap failed ERR

# run_step LOG BINARY ARGS...: runs one of the workspace's binaries, metrics to metrics.log and logs to
# LOG; on failure shows the log's last lines, since the cause is there.
run_step() {
  local log=$1 bin=$2; shift 2
  if ! "$target_dir/debug/$bin" "$@" >>"$state/metrics.log" 2>>"$log"; then
    echo "error: $bin $* failed; the end of $log:" >&2
    pg_log_tail "$log" 20
    return 1
  fi
}

./scripts/setup.sh
if [ -n "${CDC_DEMO_PREBUILT:-}" ]; then
  # scripts/test-demo.sh: the test command has just built these (with every target).
  echo "[demo] using the binaries already built in $target_dir/debug"
  for bin in capture compactor cdc-verify; do
    [ -x "$target_dir/debug/$bin" ] || { echo "error: $target_dir/debug/$bin is not built" >&2; exit 1; }
  done
else
  if [ -x "$target_dir/debug/capture" ]; then
    echo "[demo] building the workspace (only what changed)"
  else
    echo "[demo] building the workspace: the first run compiles every dependency, about 15 minutes on 2 cores"
    echo "       (later runs take seconds); cargo's progress follows"
  fi
  cargo build --workspace
fi

mkdir -p "$state"
pg_home=$(pg_cluster_home "$state/pg")
echo "$pg_home" >"$state/pg_home"
if [ "$pg_home" != "$state/pg" ]; then
  echo "[demo] the 'postgres' account the server runs as cannot enter $PWD's parent directories:"
  echo "       the throwaway cluster goes to $pg_home instead"
fi
start_pg "$pg_home"
psql_pg "$pg_home" postgres -c "CREATE DATABASE app"
psql_pg "$pg_home" app -f init-db.sql >/dev/null
start_moto "$state/moto.log"
echo "$MOTO_PID" >"$state/moto.pid"
disown "$MOTO_PID" 2>/dev/null || true

export S3_BUCKET_NAME=cdc-demo LEDGER_TABLE=cdc-ledger S3_BASE_PATH=cdc
STATE_QUEUE_FILE="$state/queue_url" .venv/bin/python - <<'PY'
import os, boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
boto3.client("s3", **kw).create_bucket(Bucket=os.environ["S3_BUCKET_NAME"])
boto3.client("dynamodb", **kw).create_table(
    TableName=os.environ["LEDGER_TABLE"],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    BillingMode="PAY_PER_REQUEST")
url = boto3.client("sqs", **kw).create_queue(QueueName="cdc-notify")["QueueUrl"]
open(os.environ["STATE_QUEUE_FILE"], "w").write(url)
PY
export NOTIFY_QUEUE_URL
NOTIFY_QUEUE_URL=$(cat "$state/queue_url")

export POSTGRES_HOST=127.0.0.1 POSTGRES_PORT=$PG_PORT POSTGRES_DATABASE=app POSTGRES_USER=cdc_user \
  POSTGRES_PASSWORD=cdc_password PGSSLMODE=disable CDC_SLOT_NAME=cdc_demo CDC_PUBLICATION=cdc_publication \
  FLUSH_INTERVAL_MS=1000

echo "[demo] first capture run: creates the replication slot and snapshots the existing rows (op r)"
run_step "$state/capture.log" capture --exit-when-caught-up

echo "[demo] sample writes: inserts, an update, a delete, in a few transactions"
psql_pg "$pg_home" app <<'SQL'
INSERT INTO users (email, full_name) VALUES ('linus@example.com', 'Linus'), ('barbara@example.com', 'Barbara Liskov');
BEGIN;
INSERT INTO orders (user_id, amount, items, tags) VALUES (1, 42.50, '[{"sku": "A-1", "qty": 2}]', '{new,web}');
INSERT INTO orders (user_id, amount, currency) VALUES (2, 9.99, 'USD');
UPDATE users SET status = 'vip', updated_at = now() WHERE id = 1;
COMMIT;
DELETE FROM users WHERE email = 'linus@example.com';
SQL

echo "[demo] capture: stream the changes into gzipped JSONL micro-batches and the ledger"
run_step "$state/capture.log" capture --exit-when-caught-up

echo
echo "== staged micro-batches (s3://$S3_BUCKET_NAME/$S3_BASE_PATH/_staging/...) =="
.venv/bin/python - <<'PY'
import gzip, json, os, boto3
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
bucket = os.environ["S3_BUCKET_NAME"]
for obj in s3.list_objects_v2(Bucket=bucket, Prefix=os.environ["S3_BASE_PATH"] + "/_staging/").get("Contents", []):
    print(obj["Key"])
    for line in gzip.decompress(s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()).splitlines():
        ev = json.loads(line)
        print("   ", ev["op"], json.dumps(ev["after"] or ev["before"])[:110])
PY

echo
echo "[demo] compactor: roll the batches into final hour-partitioned JSONL.gz and Parquet (open hours too)"
run_step "$state/compactor.log" compactor sweep --include-open

echo
echo "== final files (s3://$S3_BUCKET_NAME/$S3_BASE_PATH/{schema.table}/{format}/year=/month=/day=/hour=/) =="
.venv/bin/python - <<'PY'
import gzip, io, json, os, sys, boto3
import pyarrow.parquet as pq
s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
bucket, base = os.environ["S3_BUCKET_NAME"], os.environ["S3_BASE_PATH"]
keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base + "/")
        for o in page.get("Contents", []) if "/_staging/" not in o["Key"]]
for key in sorted(keys):
    print(key)
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if key.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(body))
        cols = [c for c in table.column_names if c not in ("_raw",)][:8]
        print("    parquet:", table.num_rows, "rows;", ", ".join(f"{f.name}:{f.type}" for f in table.schema)[:160])
        for row in table.select(cols).to_pylist():
            print("     ", {k: (str(v) if not isinstance(v, (int, float, type(None))) else v) for k, v in row.items()})
    elif key.endswith(".jsonl.gz"):
        for line in gzip.decompress(body).splitlines():
            ev = json.loads(line)
            print("    jsonl:", ev["op"], json.dumps(ev["after"] or ev["before"])[:100])
# pyarrow's thread pools can abort the interpreter's teardown ("terminate called without an
# active exception"); everything is printed by now, so leave without it.
sys.stdout.flush()
os._exit(0)
PY

echo
echo "== cdc-verify: each change once in the final files, and replaying them gives the tables' rows =="
"$target_dir"/debug/cdc-verify --table public.users,public.orders --compare-rows

cat <<MSG

Started:
  PostgreSQL  127.0.0.1:$PG_PORT  database app (init-db.sql loaded), user postgres / postgres,
              CDC user cdc_user / cdc_password, publication cdc_publication   (data in $pg_home)
  AWS (moto)  $AWS_ENDPOINT_URL  bucket $S3_BUCKET_NAME, ledger table $LEDGER_TABLE,
              queue $NOTIFY_QUEUE_URL
Stop with:    ./scripts/demo.sh stop
MSG
