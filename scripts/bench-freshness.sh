#!/usr/bin/env bash
# Measures commit-to-queryable latency: how long after its commit a row is in a Parquet part a
# manifest lists (what the catalog table and the views read), with OPEN_HOUR_COMPACT_MINUTES as
# set, the capture running continuously and the compactor swept on a fixed schedule (the
# deployment's EventBridge rule, every 5 minutes by default).
#
#   ./scripts/bench-freshness.sh [--minutes N] [--duration MIN] [--sweep-every SEC] [--write-every SEC]
#
# --minutes      OPEN_HOUR_COMPACT_MINUTES (default 15, the deployment's default; 0: closed hours only)
# --duration     how long rows are written (default 45 minutes); the run then waits for the last
#                rows to become queryable (at most the interval plus an hour's close)
# --sweep-every  seconds between scheduled sweeps (default 300)
# --write-every  seconds between single-row commits (default 20)
#
# Prints the latency distribution, the parts each table-hour got, and what they cost in requests.
# Takes as long as --duration says, plus the wait: run it in the background. Uses the debug build.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=15 duration=45 sweep_every=300 write_every=20
while [ $# -gt 0 ]; do
  case $1 in
    --minutes) minutes=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --sweep-every) sweep_every=$2; shift 2 ;;
    --write-every) write_every=$2; shift 2 ;;
    *) echo "error: unknown argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
done
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
# shellcheck source=scripts/pg.sh
. scripts/pg.sh
# shellcheck source=scripts/moto.sh
. scripts/moto.sh
./scripts/setup.sh >/dev/null
cargo build --workspace --quiet

work=$(mktemp -d /tmp/bench-freshness.XXXXXX)
chmod 755 "$work"
pg_home=$(pg_cluster_home "$work/pg")
capture_pid=
cleanup() {
  [ -n "$capture_pid" ] && kill "$capture_pid" 2>/dev/null || true
  stop_pg "$pg_home" || true
  stop_moto || true
}
trap cleanup EXIT
start_pg "$pg_home"
psql_pg "$pg_home" postgres -c "CREATE DATABASE bench" >/dev/null
psql_pg "$pg_home" bench -c "CREATE TABLE events (id bigint PRIMARY KEY, v text); CREATE PUBLICATION bench_pub FOR TABLE events" >/dev/null
start_moto "$work/moto.log"
export S3_BUCKET_NAME=bench LEDGER_TABLE=bench-ledger
.venv/bin/python - <<'PY'
import os, boto3
kw = dict(endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
boto3.client("s3", **kw).create_bucket(Bucket=os.environ["S3_BUCKET_NAME"])
boto3.client("dynamodb", **kw).create_table(
    TableName=os.environ["LEDGER_TABLE"],
    AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "S"}],
    KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
    BillingMode="PAY_PER_REQUEST")
PY
export POSTGRES_HOST=127.0.0.1 POSTGRES_PORT=$PG_PORT POSTGRES_DATABASE=bench POSTGRES_USER=postgres \
  POSTGRES_PASSWORD=postgres PGSSLMODE=disable CDC_SLOT_NAME=bench_slot CDC_PUBLICATION=bench_pub \
  HEALTH_PORT=0 OPEN_HOUR_COMPACT_MINUTES=$minutes
"$target_dir/debug/capture" >"$work/capture.log" 2>&1 &
capture_pid=$!
echo "[bench-freshness] OPEN_HOUR_COMPACT_MINUTES=$minutes, a sweep every ${sweep_every}s, a row every ${write_every}s for ${duration} min (logs in $work)"

WORK=$work DURATION=$duration SWEEP_EVERY=$sweep_every WRITE_EVERY=$write_every MINUTES=$minutes \
COMPACTOR="$target_dir/debug/compactor" PSQL_PORT=$PG_PORT .venv/bin/python - <<'PY'
import io, json, os, statistics, subprocess, sys, time
import boto3, pyarrow.parquet as pq
env = os.environ
s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1")
bucket = env["S3_BUCKET_NAME"]
duration, sweep_every, write_every = float(env["DURATION"]) * 60, float(env["SWEEP_EVERY"]), float(env["WRITE_EVERY"])
minutes = int(env["MINUTES"])

def psql(sql):
    subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", env["PSQL_PORT"], "-U", "postgres", "-d", "bench", "-c", sql],
                   check=True, env={**env, "PGPASSWORD": "postgres"}, stdout=subprocess.DEVNULL)

def queryable():
    """Ids in the Parquet parts the manifests list, and the parts per hour."""
    ids, parts = set(), {}
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="public.events/parquet/")
    for page in pages:
        for o in page.get("Contents", []):
            if not o["Key"].endswith("_manifest.json"):
                continue
            m = json.loads(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            parts[o["Key"]] = len(m["parts"])
            for p in m["parts"]:
                body = s3.get_object(Bucket=bucket, Key=p["key"])["Body"].read()
                ids.update(pq.read_table(io.BytesIO(body), columns=["id"]).column("id").to_pylist())
    return ids, parts

def requests():
    """Requests the emulator has answered so far: S3 (path-style, under the bucket) and the rest
    (DynamoDB, SQS and Glue all POST to /). The capture's own requests during a sweep count too."""
    s3_n = other = 0
    with open(os.path.join(env["WORK"], "moto.log")) as f:
        for line in f:
            if f'"GET /{bucket}' in line or f'"PUT /{bucket}' in line or f'"DELETE /{bucket}' in line or f'"HEAD /{bucket}' in line or f'"POST /{bucket}' in line:
                s3_n += 1
            elif '"POST / ' in line:
                other += 1
    return (s3_n, other)

costs = {}
committed, latency, sweeps = {}, {}, 0
start = time.time()
next_write, next_sweep, next_id = start, start + sweep_every, 1
deadline = start + duration
# After the last write: wait for the interval, then for the hour to close (plus the grace).
give_up = deadline + max(minutes, 1) * 60 + 3600 + 900
while True:
    now = time.time()
    if now < deadline and now >= next_write:
        psql(f"INSERT INTO events VALUES ({next_id}, 'x')")
        committed[next_id] = time.time()
        next_id += 1
        next_write += write_every
    if now >= next_sweep:
        before = requests()
        out = subprocess.run([env["COMPACTOR"], "sweep"], capture_output=True, text=True)
        after = requests()
        sweeps += 1
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            sys.exit("a sweep failed")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        kind = "compacting" if any(h["parts"] > 0 for h in report["hours"]) else "idle"
        costs.setdefault(kind, []).append(tuple(a - b for a, b in zip(after, before)))
        seen = time.time()
        ids, parts = queryable()
        for i in ids:
            if i in committed and i not in latency:
                latency[i] = seen - committed[i]
        next_sweep += sweep_every
        print(f"[bench-freshness] {(seen - start) / 60:5.1f} min: sweep {sweeps}, {len(latency)}/{len(committed)} rows queryable", flush=True)
        if now >= deadline and len(latency) == len(committed):
            break
        if now >= give_up:
            sys.exit("rows still not queryable long after the last write")
    time.sleep(0.2)

values = sorted(latency.values())
q = lambda f: values[min(len(values) - 1, int(f * len(values)))]
print()
print(f"commit-to-queryable latency, OPEN_HOUR_COMPACT_MINUTES={minutes}, sweeps every {sweep_every:.0f} s, {len(values)} rows over {duration/60:.0f} min:")
print(f"  min {values[0]/60:.1f} min, median {statistics.median(values)/60:.1f} min, p90 {q(0.9)/60:.1f} min, max {values[-1]/60:.1f} min")
for kind, runs in sorted(costs.items()):
    n = len(runs)
    print(f"{kind} sweeps: {n}, on average {sum(r[0] for r in runs) / n:.1f} S3 requests and "
          f"{sum(r[1] for r in runs) / n:.1f} DynamoDB/Glue requests each")
print("parts per table-hour (Parquet manifests):")
for k, n in sorted(parts.items()):
    print(f"  {k.split('/parquet/')[1].rsplit('/', 1)[0]}: {n} part(s)")
PY
