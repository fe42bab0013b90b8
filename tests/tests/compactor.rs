//! The compactor against the AWS emulator: batches staged exactly as the capture records them
//! (`pipeline_tests::staging`), compacted through the library, the shell commands and the Lambda
//! binary under cargo-lambda; final files read back with pyarrow and DuckDB.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use cdc_contract::layout::{Format, Layout};
use cdc_contract::ledger::{
    self, BatchItem, Checkpoint, FlushId, HourRecord, PartItem, PendingHour, SnapshotState,
};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, Position, TableName};
use compactor::config::Settings;
use compactor::ledger::{Claim, DynamoLedger, Ledger, LedgerError, Recorded};
use compactor::store::{ObjectStore, S3Store, StoreError};
use compactor::{Compactor, HourState, SweepRequest};
use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::{event_position, replay};
use pipeline_tests::staging::{column, now_ms, Change, ColumnExt, StagedBatch, Stager};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

const HOUR: &str = "2025-01-08T10";

fn hour() -> Hour {
    HOUR.parse().expect("hour")
}

/// Commit time `minute:second` into the test hour, in µs.
fn at(minute: i64, second: i64) -> i64 {
    (hour().start_millis() + (minute * 60 + second) * 1000) * 1000 + 123_456
}

fn config(aws: &AwsFixture) -> Settings {
    let mut c = Settings::new(&aws.bucket, &aws.table);
    c.hour_claim = Duration::from_secs(2);
    c.straggler_window = Duration::from_secs(2);
    c
}

fn compactor_with(aws: &AwsFixture, config: Settings) -> Compactor {
    Compactor::from_sdk(config, &aws.config)
}

fn users_schema() -> TableSchema {
    TableSchema {
        table: TableName::new("public", "users"),
        columns: vec![
            column("id", "integer", 23).key(),
            column("name", "text", 25),
            column("price", "numeric(10,2)", 1700).numeric(10, 2),
            column("ratio", "double precision", 701),
            column("big", "numeric", 1700),
            column("flag", "boolean", 16),
            column("created", "timestamp with time zone", 1184),
            column("local_ts", "timestamp without time zone", 1114),
            column("birth_day", "date", 1082),
            column("at_time", "time without time zone", 1083),
            column("doc", "jsonb", 3802),
            column("tags", "text[]", 1009).array_of(25),
            column("scores", "integer[]", 1007).array_of(23),
            column("blob", "bytea", 17),
            column("uid", "uuid", 2950),
            column("dur", "interval", 1186),
            column("mood", "mood", 16_400).typmod(-1),
            column("small", "smallint", 21),
            column("big_id", "bigint", 20),
            column("f4", "real", 700),
        ],
    }
    .with_enum_as_text()
}

trait EnumAsText {
    fn with_enum_as_text(self) -> Self;
}

impl EnumAsText for TableSchema {
    /// The capture types enums as text (base_oid 25).
    fn with_enum_as_text(mut self) -> Self {
        for c in &mut self.columns {
            if c.type_oid == 16_400 {
                c.base_oid = 25;
            }
        }
        self
    }
}

fn full_row(id: i64) -> Value {
    json!({
        "id": id, "name": format!("user {id}"), "price": "1234.50", "ratio": 0.25,
        "big": "123456789012345678901234567890123456789012.5", "flag": true,
        "created": "2025-01-08T10:30:00.123456Z", "local_ts": "2025-01-08T10:30:00.000001",
        "birth_day": "2025-01-08", "at_time": "10:30:00.5", "doc": {"a": [1, "x"], "b": null},
        "tags": ["a", "b c", null], "scores": [1, 2, 3], "blob": "SGVsbG8=",
        "uid": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "dur": "P1Y2M3DT4H5M6.5S",
        "mood": "happy", "small": -7, "big_id": 9_007_199_254_740_993i64, "f4": 1.5
    })
}

/// Runs a Python snippet from the repository's `.venv`, returning its standard output as JSON.
fn python_json(script: &str, args: &[&str]) -> anyhow::Result<Value> {
    let python = repo_root().join(".venv/bin/python");
    let out = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!("python failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    serde_json::from_slice(&out.stdout).context("python output is not JSON")
}

/// Reads every Parquet file under a table directory with pyarrow (Hive partitioning) and
/// DuckDB (`read_parquet(..., hive_partitioning=true)`): schema types and rows, with values in
/// JSON-comparable forms (decimals and timestamps as text, bytes as base64, DuckDB's zoned
/// timestamps as epoch microseconds).
const READ_PARQUET: &str = r#"
import os, sys, json, base64, math, decimal, datetime
import pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq, duckdb
root = sys.argv[1]
def conv(v):
    if v is None: return None
    if isinstance(v, bool): return v
    if isinstance(v, float):
        if math.isnan(v): return "NaN"
        if math.isinf(v): return "Infinity" if v > 0 else "-Infinity"
        return v
    if isinstance(v, decimal.Decimal): return str(v)
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None: return v.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return v.strftime("%Y-%m-%dT%H:%M:%S.%f")
    if isinstance(v, (datetime.date, datetime.time)): return v.isoformat()
    if isinstance(v, (bytes, bytearray)): return base64.b64encode(v).decode()
    if isinstance(v, (list, tuple)): return [conv(x) for x in v]
    if isinstance(v, dict): return {str(k): conv(x) for k, x in v.items()}
    return v
def pa_map(v):
    return None if v is None else {k: x for k, x in v}
dataset = ds.dataset(root, format="parquet", partitioning="hive")
table = dataset.to_table()
rows = []
for r in table.to_pylist():
    r["_raw"] = pa_map(r.get("_raw"))
    rows.append({k: conv(v) for k, v in r.items()})
rows.sort(key=lambda r: (r["_lsn"], r["_seq"]))
out = {"files": sorted(dataset.files),
       "pyarrow": {"schema": {f.name: str(f.type) for f in table.schema}, "rows": rows}}
con = duckdb.connect()
src = f"read_parquet('{root}/**/*.parquet', hive_partitioning=true, union_by_name=true)"
rel = con.sql(f"SELECT * FROM {src}")
types = {n: str(t) for n, t in zip(rel.columns, rel.types)}
cols = [f'epoch_us("{n}") AS "{n}"' if t == "TIMESTAMP WITH TIME ZONE" else f'"{n}"' for n, t in types.items()]
rel = con.sql(f"SELECT {', '.join(cols)} FROM {src} ORDER BY _lsn, _seq")
out["duckdb"] = {"types": types, "rows": [dict(zip(rel.columns, [conv(x) for x in row])) for row in rel.fetchall()]}
print(json.dumps(out))
# pyarrow's thread pools can abort the interpreter's teardown; the answer is printed.
sys.stdout.flush()
os._exit(0)
"#;

/// Downloads every object under `prefix` into `dir`, keeping the keys as paths.
async fn download(aws: &AwsFixture, prefix: &str, dir: &Path) -> anyhow::Result<Vec<String>> {
    let keys = aws.list_keys(prefix).await?;
    for key in &keys {
        let path = dir.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, aws.get_bytes(key).await?)?;
    }
    Ok(keys)
}

async fn read_parquet(aws: &AwsFixture, table: &TableName) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let prefix = format!("{table}/parquet/");
    let keys = download(aws, &prefix, dir.path()).await?;
    if !keys.iter().any(|k| k.ends_with(".parquet")) {
        bail!("no parquet files under {prefix}");
    }
    let root = dir.path().join(format!("{table}/parquet"));
    python_json(READ_PARQUET, &[&root.to_string_lossy()])
}

/// The final JSONL events of a table-hour, read through the manifest, in file order.
async fn final_events(
    aws: &AwsFixture,
    table: &TableName,
    hour: Hour,
) -> anyhow::Result<Vec<Value>> {
    let layout = Layout::new("");
    let manifest: Value = serde_json::from_slice(
        &aws.get_bytes(&layout.manifest_key(table, Format::Jsonl, hour))
            .await?,
    )?;
    let mut events = Vec::new();
    for part in manifest["parts"].as_array().context("manifest parts")? {
        let key = part["key"].as_str().context("part key")?;
        let lines = aws.read_jsonl_gz(key).await?;
        if lines.len() as u64 != part["rows"].as_u64().unwrap_or(0) {
            bail!(
                "{key} holds {} lines, manifest says {}",
                lines.len(),
                part["rows"]
            );
        }
        events.extend(lines);
    }
    Ok(events)
}

/// Fails unless `events` are in strictly increasing (commit LSN, ordinal) order: each once.
fn assert_each_once_in_order(events: &[Value]) -> anyhow::Result<()> {
    let mut last = None;
    for ev in events {
        let pos = event_position(ev)?;
        if last.is_some_and(|l| pos <= l) {
            bail!("event {pos} repeated or out of order");
        }
        last = Some(pos);
    }
    Ok(())
}

/// Every one of the `staged` changes of the test hour is final once, in order.
async fn assert_all_final_once(
    aws: &AwsFixture,
    table: &TableName,
    staged: usize,
) -> anyhow::Result<()> {
    let events = final_events(aws, table, hour()).await?;
    assert_each_once_in_order(&events)?;
    assert_eq!(events.len(), staged, "every staged change is final");
    Ok(())
}

async fn parts(
    aws: &AwsFixture,
    slot: &str,
    table: &TableName,
    hour: Hour,
) -> anyhow::Result<Vec<PartItem>> {
    let mut parts: Vec<PartItem> = aws
        .query_ledger(&ledger::part_pk(slot, table, hour))
        .await?
        .iter()
        .map(PartItem::from_item)
        .collect::<Result<_, _>>()?;
    parts.sort_by_key(|p| p.part);
    Ok(parts)
}

async fn hour_record(
    aws: &AwsFixture,
    slot: &str,
    table: &TableName,
    hour: Hour,
) -> anyhow::Result<Option<HourRecord>> {
    Ok(
        match aws
            .get_ledger_item(&ledger::hour_pk(slot, table), &ledger::hour_sk(hour))
            .await?
        {
            Some(i) => Some(HourRecord::from_item(&i)?),
            None => None,
        },
    )
}

async fn pending(aws: &AwsFixture, slot: &str) -> anyhow::Result<Vec<PendingHour>> {
    aws.query_ledger(&ledger::pending_pk(slot))
        .await?
        .iter()
        .map(|i| PendingHour::from_item(i).map_err(Into::into))
        .collect()
}

async fn batch_items(
    aws: &AwsFixture,
    slot: &str,
    table: &TableName,
    hour: Hour,
) -> anyhow::Result<Vec<BatchItem>> {
    aws.query_ledger(&ledger::batch_pk(slot, table, hour))
        .await?
        .iter()
        .map(|i| BatchItem::from_item(i).map_err(Into::into))
        .collect()
}

/// A table of `id` + a text column whose values barely compress, so small parts fill quickly.
fn notes_schema() -> TableSchema {
    TableSchema {
        table: TableName::new("public", "notes"),
        columns: vec![
            column("id", "integer", 23).key(),
            column("body", "text", 25),
        ],
    }
}

fn noisy(id: i64, round: i64) -> String {
    let mut x = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (round as u64);
    (0..24)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{:x}", x & 0xfff)
        })
        .collect()
}

/// Stages `n` inserts into `notes` in the test hour, `per_tx` per transaction, and flushes.
async fn stage_notes(
    stager: &mut Stager<'_>,
    first_id: i64,
    n: i64,
    per_tx: i64,
) -> anyhow::Result<Vec<String>> {
    let schema = notes_schema();
    let mut lines = Vec::new();
    let mut id = first_id;
    while id < first_id + n {
        let changes: Vec<Change> = (id..(id + per_tx).min(first_id + n))
            .map(|i| Change::insert(&schema, json!({"id": i, "body": noisy(i, 0)})))
            .collect();
        id += changes.len() as i64;
        lines.extend(stager.tx(at(10, id % 60), changes));
    }
    stager.flush(Some(now_ms())).await?;
    Ok(lines)
}

#[tokio::test]
async fn final_files_follow_the_layout_and_read_back_typed_in_pyarrow_and_duckdb(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_types").await?;
    let users = users_schema();
    let mut row3 = full_row(3);
    row3["price"] = json!("NaN");
    row3["ratio"] = json!("NaN");
    row3["created"] = json!("infinity");
    row3["birth_day"] = json!("infinity");
    let mut nulls = serde_json::Map::new();
    for c in &users.columns {
        nulls.insert(c.name.clone(), Value::Null);
    }
    nulls.insert("id".into(), json!(2));
    let mut toasted = full_row(1);
    toasted["doc"] = json!("__debezium_unavailable_value");
    toasted["name"] = json!("renamed");
    let staged = [
        stager.tx(
            at(5, 0),
            vec![
                Change::insert(&users, full_row(1)),
                Change::insert(&users, Value::Object(nulls)),
            ],
        ),
        stager.tx(
            at(6, 0),
            vec![Change::insert(&users, row3).raw(&["created", "birth_day"])],
        ),
        stager.tx(
            at(7, 0),
            vec![
                Change::update(&users, toasted),
                Change::delete(&users, json!({"id": 2})),
            ],
        ),
    ]
    .concat();
    stager.flush(Some(now_ms())).await?;

    let c = compactor_with(&aws, config(&aws));
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.hours.len(), 1);
    assert_eq!(report.hours[0].state, HourState::Done);
    assert_eq!(report.rows(), 5);

    // The layout: one prefix per format, parts named with the attempt, a manifest each.
    let t = users.table.clone();
    let recorded = parts(&aws, "slot_types", &t, hour()).await?;
    assert_eq!(recorded.len(), 1);
    let attempt = &recorded[0].attempt;
    let keys = aws.list_keys("public.users/").await?;
    assert_eq!(
        keys,
        vec![
            "public.users/jsonl/year=2025/month=01/day=08/hour=10/_manifest.json".to_string(),
            format!("public.users/jsonl/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-000-{attempt}.jsonl.gz"),
            "public.users/parquet/year=2025/month=01/day=08/hour=10/_manifest.json".to_string(),
            format!("public.users/parquet/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-000-{attempt}.parquet"),
        ]
    );
    let manifest: Value = serde_json::from_slice(&aws.get_bytes(&keys[2]).await?)?;
    assert_eq!(manifest["rows"], 5);
    assert_eq!(manifest["parts"][0]["key"], keys[3].as_str());

    // JSONL: the staged lines, unchanged.
    let events = final_events(&aws, &t, hour()).await?;
    let staged_values: Vec<Value> = staged
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    assert_eq!(events, staged_values);
    let jsonl_text = {
        let gz = aws.get_bytes(&keys[1]).await?;
        let mut s = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut s)?;
        s
    };
    assert_eq!(jsonl_text, staged.join("\n") + "\n");

    // Parquet, through pyarrow and DuckDB.
    let read = read_parquet(&aws, &t).await?;
    let schema = &read["pyarrow"]["schema"];
    let expect_types = [
        ("_op", "string"),
        ("_lsn", "int64"),
        ("_seq", "int64"),
        ("_tx_id", "int64"),
        ("_commit_ts", "timestamp[us, tz=UTC]"),
        ("_raw", "map<string, string ('_raw')>"),
        ("id", "int32"),
        ("name", "string"),
        ("price", "decimal128(10, 2)"),
        ("ratio", "double"),
        ("big", "string"),
        ("flag", "bool"),
        ("created", "timestamp[us, tz=UTC]"),
        ("local_ts", "timestamp[us]"),
        ("birth_day", "date32[day]"),
        ("at_time", "time64[us]"),
        ("doc", "string"),
        ("tags", "list<element: string>"),
        ("scores", "list<element: int32>"),
        ("blob", "binary"),
        ("uid", "string"),
        ("dur", "string"),
        ("mood", "string"),
        ("small", "int16"),
        ("big_id", "int64"),
        ("f4", "float"),
        ("year", "int32"),
        ("month", "int32"),
        ("day", "int32"),
        ("hour", "int32"),
    ];
    for (name, ty) in expect_types {
        let got = schema[name].as_str().unwrap_or("missing");
        assert!(
            got == ty || (name == "_raw" && got.starts_with("map<string, string")),
            "pyarrow type of {name}: {got}, expected {ty}"
        );
    }
    let rows = read["pyarrow"]["rows"].as_array().context("rows")?;
    assert_eq!(rows.len(), 5);
    let r1 = &rows[0];
    assert_eq!(r1["_op"], "c");
    assert_eq!(r1["_commit_ts"], "2025-01-08T10:05:00.123456Z");
    assert_eq!(r1["id"], 1);
    assert_eq!(r1["price"], "1234.50");
    assert_eq!(r1["big"], "123456789012345678901234567890123456789012.5");
    assert_eq!(r1["created"], "2025-01-08T10:30:00.123456Z");
    assert_eq!(r1["local_ts"], "2025-01-08T10:30:00.000001");
    assert_eq!(r1["at_time"], "10:30:00.500000");
    assert_eq!(
        serde_json::from_str::<Value>(r1["doc"].as_str().unwrap_or(""))?,
        json!({"a": [1, "x"], "b": null})
    );
    assert_eq!(r1["tags"], json!(["a", "b c", null]));
    assert_eq!(r1["scores"], json!([1, 2, 3]));
    assert_eq!(r1["blob"], "SGVsbG8=");
    assert_eq!(r1["dur"], "P1Y2M3DT4H5M6.5S");
    assert_eq!(r1["mood"], "happy");
    assert_eq!(r1["big_id"], 9_007_199_254_740_993i64);
    assert_eq!(r1["_raw"], Value::Null);
    let r2 = &rows[1];
    for c in &users.columns {
        if c.name != "id" {
            assert_eq!(
                r2[&c.name],
                Value::Null,
                "column {} of the all-null row",
                c.name
            );
        }
    }
    let r3 = &rows[2];
    assert_eq!(r3["price"], Value::Null);
    assert_eq!(r3["ratio"], "NaN", "a float NaN is a NaN");
    assert_eq!(r3["created"], Value::Null);
    assert_eq!(
        r3["_raw"],
        json!({"price": "NaN", "created": "infinity", "birth_day": "infinity"})
    );
    let r4 = &rows[3];
    assert_eq!(r4["_op"], "u");
    assert_eq!(r4["doc"], Value::Null);
    assert_eq!(r4["_raw"], json!({"doc": "__debezium_unavailable_value"}));
    let r5 = &rows[4];
    assert_eq!(
        (r5["_op"].as_str(), r5["id"].as_i64(), r5["_seq"].as_i64()),
        (Some("d"), Some(2), Some(2))
    );
    assert_eq!(r5["_lsn"], r4["_lsn"], "one transaction, one commit LSN");

    let duck = &read["duckdb"];
    let types = &duck["types"];
    for (name, ty) in [
        ("_lsn", "BIGINT"),
        ("_commit_ts", "TIMESTAMP WITH TIME ZONE"),
        ("price", "DECIMAL(10,2)"),
        ("created", "TIMESTAMP WITH TIME ZONE"),
        ("local_ts", "TIMESTAMP"),
        ("at_time", "TIME"),
        ("tags", "VARCHAR[]"),
        ("scores", "INTEGER[]"),
        ("blob", "BLOB"),
        ("small", "SMALLINT"),
        ("_raw", "MAP(VARCHAR, VARCHAR)"),
        ("hour", "BIGINT"),
    ] {
        assert_eq!(types[name].as_str(), Some(ty), "duckdb type of {name}");
    }
    let drows = duck["rows"].as_array().context("duckdb rows")?;
    assert_eq!(drows.len(), 5);
    assert_eq!(drows[0]["price"], "1234.50");
    assert_eq!(drows[0]["created"], 1_736_332_200_123_456i64);
    assert_eq!(drows[0]["_commit_ts"], at(5, 0));
    assert_eq!(drows[0]["hour"], 10);
    assert_eq!(drows[2]["_raw"]["price"], "NaN");
    assert_eq!(drows[1]["name"], Value::Null);

    // The consumed batch: its staging object tagged for expiry, its item marked with a TTL.
    let items = batch_items(&aws, "slot_types", &t, hour()).await?;
    assert!(items.iter().all(|b| b.compacted));
    let raw = aws
        .query_ledger(&ledger::batch_pk("slot_types", &t, hour()))
        .await?;
    assert!(raw.iter().all(|i| i.contains_key(ledger::TTL_ATTRIBUTE)));
    let tags = aws
        .s3
        .get_object_tagging()
        .bucket(&aws.bucket)
        .key(&items[0].key)
        .send()
        .await?;
    assert!(tags
        .tag_set()
        .iter()
        .any(|t| t.key() == "compacted" && t.value() == "true"));
    assert!(pending(&aws, "slot_types").await?.is_empty());
    Ok(())
}

/// Deterministic pseudo-random numbers for the workload.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::test]
async fn replaying_the_final_events_reproduces_the_table_state() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_replay").await?;
    stager.batch_rows = 37;
    let schema = notes_schema();
    let mut expected: BTreeMap<String, Value> = BTreeMap::new();
    let mut rng = Lcg(7);
    let hours = [hour(), hour().next()];
    for (h, start) in hours.iter().enumerate() {
        for tx in 0..60i64 {
            let mut changes = Vec::new();
            for _ in 0..(1 + rng.next(4)) {
                let id = rng.next(40) as i64;
                let key = json!(id).to_string();
                match (expected.contains_key(&key), rng.next(3)) {
                    (false, _) => {
                        let row = json!({"id": id, "body": noisy(id, tx)});
                        expected.insert(key, row.clone());
                        changes.push(Change::insert(&schema, row));
                    }
                    (true, 0) => {
                        expected.remove(&key);
                        changes.push(Change::delete(&schema, json!({"id": id})));
                    }
                    (true, _) => {
                        let row = json!({"id": id, "body": noisy(id, tx + 1000)});
                        expected.insert(key, row.clone());
                        changes.push(Change::update(&schema, row));
                    }
                }
            }
            let us = (start.start_millis() + tx * 50_000) * 1000 + h as i64;
            stager.tx(us, changes);
            if tx % 17 == 16 {
                stager.flush(Some(now_ms())).await?;
            }
        }
        stager.flush(Some(now_ms())).await?;
    }

    let mut cfg = config(&aws);
    cfg.part_max_bytes = 8192;
    let report = compactor_with(&aws, cfg)
        .sweep(&SweepRequest::default())
        .await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.hours.iter().all(|h| h.state == HourState::Done));
    assert!(
        report.hours.iter().map(|h| h.parts).sum::<u32>() > 2,
        "small parts roll"
    );

    let mut events = Vec::new();
    for h in hours {
        events.extend(final_events(&aws, &schema.table, h).await?);
    }
    assert_each_once_in_order(&events)?;
    assert_eq!(replay(&events), expected);
    let read = read_parquet(&aws, &schema.table).await?;
    assert_eq!(
        read["pyarrow"]["rows"].as_array().map(Vec::len),
        Some(events.len())
    );
    Ok(())
}

#[tokio::test]
async fn an_sqs_batch_reports_only_the_bad_message_as_failed() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_sqs").await?;
    stage_notes(&mut stager, 1, 20, 5).await?;
    let note =
        json!({"slot": "slot_sqs", "flush_id": "000000000001-1", "commit_ms": 1, "hours": []})
            .to_string();
    let event = json!({"Records": [
        {"messageId": "good-1", "body": note, "eventSource": "aws:sqs"},
        {"messageId": "bad-2", "body": "{not json", "eventSource": "aws:sqs"},
        {"messageId": "good-3", "body": note, "eventSource": "aws:sqs"},
    ]});
    let c = compactor_with(&aws, config(&aws));
    let answer = c.handle(event).await?;
    assert_eq!(
        answer,
        json!({"batchItemFailures": [{"itemIdentifier": "bad-2"}]})
    );
    // The sweep ran anyway.
    assert_eq!(
        final_events(&aws, &notes_schema().table, hour())
            .await?
            .len(),
        20
    );
    let answer = c
        .handle(json!({"Records": [{"messageId": "ok", "body": note}]}))
        .await?;
    assert_eq!(answer, json!({"batchItemFailures": []}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hour_compacted_twice_or_concurrently_holds_each_change_once() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_twice").await?;
    stager.batch_rows = 50;
    let staged = stage_notes(&mut stager, 1, 400, 7).await?;
    let mut cfg = config(&aws);
    cfg.part_max_bytes = 8192;
    // Two invocations at once, on two threads.
    let run = |c: Compactor| tokio::spawn(async move { c.sweep(&SweepRequest::default()).await });
    let a = run(compactor_with(&aws, cfg.clone()));
    let b = run(compactor_with(&aws, cfg.clone()));
    let (ra, rb) = (a.await??, b.await??);
    assert!(
        ra.failures.is_empty() && rb.failures.is_empty(),
        "{:?} {:?}",
        ra.failures,
        rb.failures
    );
    let states: Vec<HourState> = ra.hours.iter().chain(&rb.hours).map(|h| h.state).collect();
    let written: u32 = ra.hours.iter().chain(&rb.hours).map(|h| h.parts).sum();
    assert!(written > 0, "one of them compacted the hour: {states:?}");
    // Whoever was busy left the hour pending; a later run finishes it.
    let again = compactor_with(&aws, cfg.clone())
        .sweep(&SweepRequest::default())
        .await?;
    assert!(again.failures.is_empty(), "{:?}", again.failures);
    let t = notes_schema().table;
    let before = parts(&aws, "slot_twice", &t, hour()).await?;
    // And once more, compacting an already compacted hour directly: nothing is rewritten.
    let direct = compactor_with(&aws, cfg)
        .handle(json!({"action": "compact", "table": "public.notes", "hour": HOUR}))
        .await?;
    assert_eq!(direct["hours"][0]["parts"], 0);
    assert_eq!(parts(&aws, "slot_twice", &t, hour()).await?, before);

    let events = final_events(&aws, &t, hour()).await?;
    assert_each_once_in_order(&events)?;
    assert_eq!(events.len(), staged.len());
    let read = read_parquet(&aws, &t).await?;
    let positions: BTreeSet<(i64, i64)> = read["pyarrow"]["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .map(|r| {
            (
                r["_lsn"].as_i64().unwrap_or(-1),
                r["_seq"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(positions.len(), staged.len());
    assert_eq!(
        read["pyarrow"]["rows"].as_array().map(Vec::len),
        Some(staged.len())
    );
    // Only recorded parts' files exist.
    let recorded: BTreeSet<String> = before
        .iter()
        .flat_map(|p| p.files.iter().map(|f| f.key.clone()))
        .collect();
    let finals: BTreeSet<String> = aws
        .list_keys("public.notes/")
        .await?
        .into_iter()
        .filter(|k| !k.ends_with("_manifest.json"))
        .collect();
    assert_eq!(finals, recorded);
    assert!(pending(&aws, "slot_twice").await?.is_empty());
    Ok(())
}

/// A process that dies: after `kill_after` recorded parts, the next part's files are uploaded
/// and then every call fails, as if the Lambda were killed between upload and record.
struct Mortal {
    dead: AtomicBool,
    records: AtomicU32,
    kill_after: u32,
    /// Each time a flush was told a table-hour is done: the flush, the batch items of it in
    /// that table-hour not yet marked compacted then, and the parts recorded by then.
    flush_done: std::sync::Mutex<Vec<(FlushId, usize, u32)>>,
    /// While not 0, telling a flush its hour is done fails (after its batches were marked).
    fail_flush_done: AtomicU32,
    /// Batches marked compacted while the hour record's watermark was below their last change
    /// (their changes not all in recorded parts): must stay empty.
    premature: std::sync::Mutex<Vec<String>>,
    /// How long each upload of a part (multipart) takes before it is sent.
    part_delay: Duration,
    /// The upload of a part that fails (1-based, over the process's life); 0: none.
    fail_part_at: u32,
    parts: AtomicU32,
}

impl Mortal {
    /// Alive until `kill_after` parts are recorded; nothing else fails.
    fn new(kill_after: u32) -> Arc<Self> {
        Arc::new(Mortal {
            dead: AtomicBool::new(false),
            records: AtomicU32::new(0),
            kill_after,
            flush_done: Default::default(),
            fail_flush_done: AtomicU32::new(0),
            premature: Default::default(),
            part_delay: Duration::ZERO,
            fail_part_at: 0,
            parts: AtomicU32::new(0),
        })
    }

    /// Never killed; each upload of a part takes `delay`, and the `fail_at`-th fails (0: none).
    fn slow_uploads(delay: Duration, fail_at: u32) -> Arc<Self> {
        let mut m = Mortal::new(u32::MAX);
        if let Some(m) = Arc::get_mut(&mut m) {
            m.part_delay = delay;
            m.fail_part_at = fail_at;
        }
        m
    }

    /// Before an upload of a part: its delay, and the injected failure.
    async fn part_upload(&self) -> Result<(), StoreError> {
        tokio::time::sleep(self.part_delay).await;
        if self.parts.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_part_at {
            return Err(StoreError::Definite("injected: upload part failed".into()));
        }
        self.check(StoreError::Definite)
    }

    /// Fails the test if a batch was marked compacted before the watermark passed it.
    fn assert_none_premature(&self) -> anyhow::Result<()> {
        let premature = self.premature.lock().map_err(|_| anyhow::anyhow!("lock"))?;
        assert!(
            premature.is_empty(),
            "batches marked compacted before the recorded parts held them: {premature:?}"
        );
        Ok(())
    }

    fn check<E>(&self, err: impl Fn(String) -> E) -> Result<(), E> {
        if self.dead.load(Ordering::SeqCst) {
            Err(err("the process is dead".into()))
        } else {
            Ok(())
        }
    }
}

struct MortalLedger(Arc<DynamoLedger>, Arc<Mortal>);

/// A compactor on the emulator whose ledger is `mortal`'s (its store is the emulator's own).
fn failing_ledger_compactor(aws: &AwsFixture, cfg: Settings, mortal: &Arc<Mortal>) -> Compactor {
    let ledger = Arc::new(MortalLedger(
        Arc::new(DynamoLedger::new(aws.dynamodb.clone(), &aws.table)),
        mortal.clone(),
    ));
    let store = Arc::new(S3Store::new(aws.s3.clone(), &aws.bucket));
    Compactor::new(cfg, store, ledger, None)
}
struct MortalStore(Arc<S3Store>, Arc<Mortal>);

#[async_trait]
impl Ledger for MortalLedger {
    async fn slots(&self) -> Result<Vec<String>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.slots().await
    }
    async fn checkpoint(&self, slot: &str) -> Result<Option<Checkpoint>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.checkpoint(slot).await
    }
    async fn hour_records(
        &self,
        slot: &str,
        table: &TableName,
    ) -> Result<Vec<HourRecord>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.hour_records(slot, table).await
    }
    async fn snapshot(&self, slot: &str) -> Result<Option<SnapshotState>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.snapshot(slot).await
    }
    async fn pending_hours(
        &self,
        slot: &str,
        before: Option<Hour>,
    ) -> Result<Vec<PendingHour>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.pending_hours(slot, before).await
    }
    async fn batches(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<BatchItem>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.batches(slot, table, hour).await
    }
    async fn flush_recorded(
        &self,
        slot: &str,
        id: &FlushId,
    ) -> Result<Option<compactor::ledger::FlushSeen>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.flush_recorded(slot, id).await
    }
    async fn schema(
        &self,
        slot: &str,
        table: &TableName,
        id: &str,
    ) -> Result<Option<TableSchema>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.schema(slot, table, id).await
    }
    async fn hour_record(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Option<HourRecord>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.hour_record(slot, table, hour).await
    }
    async fn parts(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<PartItem>, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.parts(slot, table, hour).await
    }
    async fn claim_hour(
        &self,
        slot: &str,
        seen: u64,
        claimed: &HourRecord,
        now: i64,
    ) -> Result<Claim, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.claim_hour(slot, seen, claimed, now).await
    }
    async fn renew_claim(
        &self,
        slot: &str,
        record: &HourRecord,
        until: i64,
    ) -> Result<bool, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.renew_claim(slot, record, until).await
    }
    async fn record_part(
        &self,
        slot: &str,
        part: &PartItem,
        v: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        if self.1.records.fetch_add(1, Ordering::SeqCst) == self.1.kill_after {
            self.1.dead.store(true, Ordering::SeqCst);
            return Err(LedgerError::Definite("killed".into()));
        }
        self.0.record_part(slot, part, v, next).await
    }
    async fn raise_watermark(
        &self,
        slot: &str,
        v: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.raise_watermark(slot, v, next).await
    }
    async fn release_hour(&self, slot: &str, record: &HourRecord) -> Result<(), LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.release_hour(slot, record).await
    }
    async fn mark_compacted(
        &self,
        slot: &str,
        batches: &[&BatchItem],
        exp: i64,
    ) -> Result<(), LedgerError> {
        self.1.check(LedgerError::Definite)?;
        for batch in batches {
            let through = self
                .0
                .hour_record(slot, &batch.table, batch.hour)
                .await?
                .and_then(|r| r.compacted_through);
            if through.is_none_or(|w| batch.last > w) {
                if let Ok(mut p) = self.1.premature.lock() {
                    p.push(format!(
                        "{} (last {:?}, watermark {through:?})",
                        batch.key, batch.last
                    ));
                }
            }
        }
        self.0.mark_compacted(slot, batches, exp).await
    }
    async fn delete_batch(&self, slot: &str, batch: &BatchItem) -> Result<(), LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.delete_batch(slot, batch).await
    }
    async fn flush_hour_done(
        &self,
        slot: &str,
        batch: &BatchItem,
        exp: i64,
        last: bool,
    ) -> Result<(), LedgerError> {
        self.1.check(LedgerError::Definite)?;
        let unmarked = self
            .0
            .batches(slot, &batch.table, batch.hour)
            .await?
            .iter()
            .filter(|b| b.flush_id == batch.flush_id && !b.compacted)
            .count();
        if self.1.fail_flush_done.load(Ordering::SeqCst) != 0 {
            return Err(LedgerError::Definite(
                "the process died before telling".into(),
            ));
        }
        let recorded = self.1.records.load(Ordering::SeqCst);
        if let Ok(mut calls) = self.1.flush_done.lock() {
            calls.push((batch.flush_id, unmarked, recorded));
        }
        self.0.flush_hour_done(slot, batch, exp, last).await
    }
    async fn clear_pending(&self, slot: &str, marker: &PendingHour) -> Result<bool, LedgerError> {
        self.1.check(LedgerError::Definite)?;
        self.0.clear_pending(slot, marker).await
    }
}

#[async_trait]
impl ObjectStore for MortalStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.get(key).await
    }
    async fn put(&self, key: &str, body: Bytes, ct: &str) -> Result<(), StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.put(key, body, ct).await
    }
    async fn create_multipart(&self, key: &str, ct: &str) -> Result<String, StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.create_multipart(key, ct).await
    }
    async fn upload_part(
        &self,
        key: &str,
        id: &str,
        n: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        self.1.part_upload().await?;
        self.0.upload_part(key, id, n, body).await
    }
    async fn complete_multipart(
        &self,
        key: &str,
        id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.complete_multipart(key, id, parts).await
    }
    async fn abort_multipart(&self, key: &str, id: &str) -> Result<(), StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.abort_multipart(key, id).await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.list(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.delete(keys).await
    }
    async fn tag(&self, key: &str, tags: &[(&str, &str)]) -> Result<(), StoreError> {
        self.1.check(StoreError::Definite)?;
        self.0.tag(key, tags).await
    }
}

/// Part files of several 8 MiB upload chunks are uploaded behind the reading (the next batches
/// are read while a chunk goes out), and parts roll meanwhile: every part recorded holds all
/// its bytes; an upload that fails behind the reading fails the hour with nothing of its part
/// recorded and no upload left open; the next run writes each change once.
#[tokio::test]
async fn parts_uploaded_behind_the_reading_hold_every_change_once_through_a_failed_upload(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_behind").await?;
    stager.batch_rows = 250;
    let schema = notes_schema();
    // About 3.6 KB of barely compressible text a row: some 25 MB of staged JSON; Parquet files
    // of more than one upload chunk.
    let mut staged = Vec::new();
    for tx in 0..70i64 {
        let changes: Vec<Change> = (tx * 100 + 1..=tx * 100 + 100)
            .map(|i| {
                let body: String = (0..50).map(|r| noisy(i, r)).collect();
                Change::insert(&schema, json!({"id": i, "body": body}))
            })
            .collect();
        staged.extend(stager.tx(at(10, tx), changes));
    }
    stager.flush(Some(now_ms())).await?;
    let mut cfg = config(&aws);
    cfg.part_max_bytes = 9 << 20;
    cfg.row_group_bytes = 1 << 20;
    let t = schema.table.clone();

    let inner = Arc::new(S3Store::new(aws.s3.clone(), &aws.bucket));
    let ledger = || Arc::new(DynamoLedger::new(aws.dynamodb.clone(), &aws.table));
    let slow = |fail_at| {
        let store = MortalStore(
            inner.clone(),
            Mortal::slow_uploads(Duration::from_millis(300), fail_at),
        );
        Compactor::new(cfg.clone(), Arc::new(store), ledger(), None)
    };

    // The fifth chunk fails: the first part (each file a chunk and a rest) is recorded; the
    // second part's first chunk fails behind the reading.
    let failed = slow(5).sweep(&SweepRequest::default()).await?;
    assert_eq!(failed.failures.len(), 1, "{failed:?}");
    assert!(
        format!("{:?}", failed.failures).contains("injected"),
        "the hour fails on the upload that failed: {:?}",
        failed.failures
    );
    let recorded = parts(&aws, "slot_behind", &t, hour()).await?;
    assert_eq!(
        recorded.len(),
        1,
        "only the part uploaded whole is recorded"
    );
    let open = aws
        .s3
        .list_multipart_uploads()
        .bucket(&aws.bucket)
        .send()
        .await?;
    assert!(
        open.uploads().is_empty(),
        "the failed part's uploads are abandoned: {:?}",
        open.uploads()
    );

    // The next runs (slow, without failures) finish the hour.
    let mut done = false;
    for _ in 0..10 {
        let report = slow(0).sweep(&SweepRequest::default()).await?;
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        if report.hours.iter().all(|h| h.state == HourState::Done) && !report.hours.is_empty() {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(done, "the hour is compacted");
    let all = parts(&aws, "slot_behind", &t, hour()).await?;
    assert!(all.len() >= 3, "parts rolled: {}", all.len());
    assert_eq!(all[0], recorded[0], "the recorded part is kept as it was");
    assert_all_final_once(&aws, &t, staged.len()).await?;
    let read = read_parquet(&aws, &t).await?;
    let typed = read["duckdb"]["rows"].as_array().map(Vec::len);
    assert_eq!(
        typed,
        Some(staged.len()),
        "every change in the Parquet parts"
    );
    Ok(())
}

/// A compaction killed between uploading a part and recording it: the next run removes the
/// unrecorded files, and (issue 15, item 11) lists the hour again once the dead attempt could no
/// longer complete an upload, so a late one does not stay as a stray file.
#[tokio::test]
async fn a_run_killed_mid_hour_resumes_and_its_unrecorded_files_are_removed() -> anyhow::Result<()>
{
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_kill").await?;
    stager.batch_rows = 40;
    let staged = stage_notes(&mut stager, 1, 300, 3).await?;
    let mut cfg = config(&aws);
    cfg.part_max_bytes = 8192;
    let t = notes_schema().table;

    let mortal = Mortal::new(1);
    let store = Arc::new(MortalStore(
        Arc::new(S3Store::new(aws.s3.clone(), &aws.bucket)),
        mortal.clone(),
    ));
    let ledger = Arc::new(MortalLedger(
        Arc::new(DynamoLedger::new(aws.dynamodb.clone(), &aws.table)),
        mortal.clone(),
    ));
    let doomed = Compactor::new(cfg.clone(), store, ledger, None);
    let report = doomed.sweep(&SweepRequest::default()).await?;
    assert_eq!(
        report.failures.len(),
        1,
        "the killed run fails its hour: {report:?}"
    );

    let recorded = parts(&aws, "slot_kill", &t, hour()).await?;
    assert_eq!(recorded.len(), 1, "one part was recorded before the kill");
    let doomed_attempt = recorded[0].attempt.clone();
    let left_behind: Vec<String> = aws
        .list_keys("public.notes/")
        .await?
        .into_iter()
        .filter(|k| k.contains(&format!("-001-{doomed_attempt}")))
        .collect();
    assert_eq!(
        left_behind.len(),
        2,
        "the unrecorded part's files were uploaded before the kill"
    );
    let record = hour_record(&aws, "slot_kill", &t, hour())
        .await?
        .context("hour record")?;
    assert!(
        record.claim_until_ms > 0,
        "the dead attempt never released its claim"
    );

    // While the dead attempt's claim holds, another run leaves the hour alone.
    let c = compactor_with(&aws, cfg.clone());
    let busy = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(busy.hours[0].state, HourState::Busy);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let resumed = c.sweep(&SweepRequest::default()).await?;
    assert!(resumed.failures.is_empty(), "{:?}", resumed.failures);
    assert_eq!(resumed.hours[0].stale_files_removed, 2);
    // The dead attempt might still be alive and finish an upload later (issue 15, item 11): a
    // stalled PUT of its next part completes after the cleanup listed the hour. The hour stays
    // pending until the straggler window has passed, then is listed again.
    assert_eq!(resumed.hours[0].state, HourState::Pending);
    let late_keys: Vec<String> = left_behind
        .iter()
        .map(|k| {
            k.replace(
                &format!("-001-{doomed_attempt}"),
                &format!("-002-{doomed_attempt}"),
            )
        })
        .collect();
    for key in &late_keys {
        aws.put_bytes(key, b"a late upload".to_vec()).await?;
    }
    let early = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(
        early.hours[0].state,
        HourState::Pending,
        "the window has not passed"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let rechecked = c.sweep(&SweepRequest::default()).await?;
    assert!(rechecked.failures.is_empty(), "{:?}", rechecked.failures);
    assert_eq!(rechecked.hours[0].state, HourState::Done);
    assert_eq!(
        rechecked.hours[0].stale_files_removed, 2,
        "the late upload is removed"
    );

    let all = parts(&aws, "slot_kill", &t, hour()).await?;
    assert_eq!(all[0], recorded[0], "the recorded part is kept as it was");
    let keys: BTreeSet<String> = aws
        .list_keys("public.notes/")
        .await?
        .into_iter()
        .filter(|k| !k.ends_with("_manifest.json"))
        .collect();
    let expected: BTreeSet<String> = all
        .iter()
        .flat_map(|p| p.files.iter().map(|f| f.key.clone()))
        .collect();
    assert_eq!(keys, expected, "no unrecorded file survives the next run");
    let events = final_events(&aws, &t, hour()).await?;
    assert_each_once_in_order(&events)?;
    assert_eq!(events.len(), staged.len());
    let read = read_parquet(&aws, &t).await?;
    assert_eq!(
        read["duckdb"]["rows"].as_array().map(Vec::len),
        Some(staged.len())
    );
    mortal.assert_none_premature()?;
    Ok(())
}

#[tokio::test]
async fn a_late_batch_becomes_an_extra_part_of_its_hour() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_late").await?;
    let first = stage_notes(&mut stager, 1, 30, 5).await?;
    let c = compactor_with(&aws, config(&aws));
    c.sweep(&SweepRequest::default()).await?;
    let t = notes_schema().table;
    let before = parts(&aws, "slot_late", &t, hour()).await?;
    assert_eq!(before.len(), 1);

    let late = stage_notes(&mut stager, 100, 10, 5).await?;
    assert_eq!(
        pending(&aws, "slot_late").await?.len(),
        1,
        "the late flush marks the hour again"
    );
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(report.hours[0].parts, 1);
    let after = parts(&aws, "slot_late", &t, hour()).await?;
    assert_eq!(after.len(), 2);
    assert_eq!(after[0], before[0], "nothing compacted is rewritten");
    assert_eq!(after[1].part, 1);
    assert_eq!(after[1].rows, late.len() as u64);
    let events = final_events(&aws, &t, hour()).await?;
    assert_each_once_in_order(&events)?;
    assert_eq!(events.len(), first.len() + late.len());
    assert!(pending(&aws, "slot_late").await?.is_empty());
    Ok(())
}

/// An invocation near its deadline: a sweep past its stop time takes no hour on; an hour taken
/// with its stop time passed writes one batch, ends its part cleanly and stays pending, and the
/// next run goes on after that part. Run after run, the hour ends whole, each change once.
#[tokio::test]
async fn a_run_at_its_deadline_ends_the_part_cleanly_and_the_next_run_goes_on() -> anyhow::Result<()>
{
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_deadline").await?;
    stager.batch_rows = 40;
    let staged = stage_notes(&mut stager, 1, 200, 4).await?;
    let t = notes_schema().table;
    let batches = batch_items(&aws, "slot_deadline", &t, hour()).await?.len();
    assert!(batches >= 4, "several batches: {batches}");
    let c = compactor_with(&aws, config(&aws));

    let late = c
        .sweep(&SweepRequest {
            stop_at: Some(std::time::Instant::now()),
            ..Default::default()
        })
        .await?;
    assert!(late.failures.is_empty(), "{:?}", late.failures);
    assert_eq!(late.hours[0].state, HourState::Pending);
    assert_eq!(
        late.hours[0].parts, 0,
        "no hour taken on past the stop time"
    );
    assert!(parts(&aws, "slot_deadline", &t, hour()).await?.is_empty());

    let ledger = DynamoLedger::new(aws.dynamodb.clone(), &aws.table);
    let checkpoint = ledger
        .checkpoint("slot_deadline")
        .await?
        .context("checkpoint")?;
    let run = compactor::plan::SlotRun::new("slot_deadline", checkpoint);
    let mut runs = 0;
    loop {
        let marker = pending(&aws, "slot_deadline").await?.into_iter().next();
        let job = compactor::HourJob {
            table: t.clone(),
            hour: hour(),
            marker,
            stop_at: Some(std::time::Instant::now()),
        };
        let before = parts(&aws, "slot_deadline", &t, hour()).await?.len();
        let report = c.compact_hour(&run, &job).await?;
        runs += 1;
        let after = parts(&aws, "slot_deadline", &t, hour()).await?;
        assert!(
            after.len() > before,
            "run {runs} recorded a part: {report:?}"
        );
        // Whatever is recorded so far is final and whole: each change once, in order.
        let events = final_events(&aws, &t, hour()).await?;
        assert_each_once_in_order(&events)?;
        assert_eq!(
            events.len() as u64,
            after.iter().map(|p| p.rows).sum::<u64>()
        );
        if report.state == HourState::Done {
            assert_eq!(events.len(), staged.len());
            break;
        }
        assert_eq!(report.state, HourState::Pending);
        assert!(runs < batches, "more runs than batches");
    }
    assert!(runs > 1, "the stop time split the hour");
    assert!(pending(&aws, "slot_deadline").await?.is_empty());
    Ok(())
}

/// Runs cut short by their deadline consume a flush's batches in the hour a few at a time: the
/// flush is told the table-hour is done (after which its record may expire and a batch of it
/// still unconsumed would be judged an orphan, its changes never compacted) only once all its
/// batches there are consumed.
#[tokio::test]
async fn a_flush_split_across_deadline_runs_hears_its_hour_is_done_only_at_the_end(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_split_flush").await?;
    stager.batch_rows = 20;
    // Two flushes of several batches each in one table-hour.
    let mut staged = stage_notes(&mut stager, 1, 100, 4).await?;
    staged.extend(stage_notes(&mut stager, 101, 80, 4).await?);
    let t = notes_schema().table;
    let items = batch_items(&aws, "slot_split_flush", &t, hour()).await?;
    let flushes: BTreeSet<FlushId> = items.iter().map(|b| b.flush_id).collect();
    assert_eq!(flushes.len(), 2);
    assert!(
        items.len() >= 8,
        "several batches per flush: {}",
        items.len()
    );
    let mortal = Mortal::new(u32::MAX);
    let c = failing_ledger_compactor(&aws, config(&aws), &mortal);
    let checkpoint = DynamoLedger::new(aws.dynamodb.clone(), &aws.table)
        .checkpoint("slot_split_flush")
        .await?
        .context("checkpoint")?;
    let run = compactor::plan::SlotRun::new("slot_split_flush", checkpoint);
    let mut runs = 0;
    loop {
        let marker = pending(&aws, "slot_split_flush").await?.into_iter().next();
        let job = compactor::HourJob {
            table: t.clone(),
            hour: hour(),
            marker,
            stop_at: Some(std::time::Instant::now()),
        };
        let report = c.compact_hour(&run, &job).await?;
        runs += 1;
        if report.state == HourState::Done {
            break;
        }
        assert!(runs <= items.len(), "more runs than batches: {report:?}");
    }
    assert!(runs > 2, "the stop time split the flushes: {runs} runs");
    let calls = mortal
        .flush_done
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();
    assert!(
        calls.iter().all(|c| c.1 == 0),
        "a flush was told its hour is done with batches of it there unconsumed: {calls:?}"
    );
    // Told by the run that consumed its last batch here (and again, harmlessly, by the run
    // that ends the hour).
    let told: BTreeSet<FlushId> = calls.iter().map(|c| c.0).collect();
    assert_eq!(told, flushes);
    assert_all_final_once(&aws, &t, staged.len()).await?;
    mortal.assert_none_premature()?;
    Ok(())
}

/// The capture writes a flush's batch items and then, in one transaction, its record and the
/// checkpoint. A sweep that queried the hour's items while some of a flush's items were still
/// being written, and found its record committed by the time it looked, must not compact the
/// batches it saw: they would raise the watermark past the ones it missed, which the next run
/// would then skip. Such a flush is newer than the checkpoint the sweep read first, so it is
/// undecided until a later sweep; every change ends up final once.
#[tokio::test]
async fn a_flush_newer_than_the_checkpoint_read_waits_even_if_its_record_is_found(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let slot = "slot_racing_flush";
    let mut stager = Stager::new(&aws, slot).await?;
    stager.batch_rows = 20;
    let mut staged = stage_notes(&mut stager, 1, 40, 4).await?;
    let dynamo = DynamoLedger::new(aws.dynamodb.clone(), &aws.table);
    // The checkpoint as a sweep read it, before the next flush committed.
    let before = dynamo.checkpoint(slot).await?.context("checkpoint")?;
    let t = notes_schema().table;
    let seen: BTreeSet<String> = batch_items(&aws, slot, &t, hour())
        .await?
        .into_iter()
        .map(|b| b.key)
        .collect();
    staged.extend(stage_notes(&mut stager, 41, 60, 4).await?);
    let newer: Vec<BatchItem> = batch_items(&aws, slot, &t, hour())
        .await?
        .into_iter()
        .filter(|b| !seen.contains(&b.key))
        .collect();
    assert!(newer.len() >= 3, "the newer flush has several batches");
    // The sweep's query saw all but the newer flush's first batch: its item not written yet.
    let missing = newer[0].clone();
    dynamo.delete_batch(slot, &missing).await?;
    let c = compactor_with(&aws, config(&aws));
    let run = compactor::plan::SlotRun::new(slot, before);
    let job = compactor::HourJob {
        table: t.clone(),
        hour: hour(),
        marker: pending(&aws, slot).await?.into_iter().next(),
        stop_at: None,
    };
    c.compact_hour(&run, &job).await?;
    // The missing item lands; the next sweep reads a newer checkpoint.
    aws.put_ledger_item(missing.to_item(slot)).await?;
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_all_final_once(&aws, &t, staged.len()).await?;
    Ok(())
}

#[tokio::test]
async fn orphan_batches_are_never_compacted() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_orphan").await?;
    let schema = notes_schema();
    let a = stager.tx(
        at(1, 0),
        vec![Change::insert(&schema, json!({"id": 1, "body": "a"}))],
    );
    stager.flush(Some(now_ms())).await?;
    // A flush whose batch items were written but whose record never committed (crash).
    stager.tx(
        at(2, 0),
        vec![Change::insert(&schema, json!({"id": 2, "body": "orphan"}))],
    );
    let orphans = stager.flush_uncommitted().await?;
    // The next writer (new epoch) records its own flush with the same sequence number.
    stager.restart().await?;
    let c_lines = stager.tx(
        at(3, 0),
        vec![Change::insert(&schema, json!({"id": 3, "body": "c"}))],
    );
    stager.flush(Some(now_ms())).await?;
    // And a flush still committing (sequence past the checkpoint): the hour waits for it.
    stager.tx(
        at(4, 0),
        vec![Change::insert(
            &schema,
            json!({"id": 4, "body": "in flight"}),
        )],
    );
    let in_flight = stager.flush_uncommitted().await?;

    let c = compactor_with(&aws, config(&aws));
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(
        report.hours[0].state,
        HourState::Pending,
        "waits for the flush in flight"
    );
    assert_eq!(report.hours[0].orphans_removed, 1);
    let events = final_events(&aws, &schema.table, hour()).await?;
    let expected: Vec<Value> = [a, c_lines]
        .concat()
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    assert_eq!(
        events, expected,
        "orphan and undecided batches are not in the final files"
    );
    let items = batch_items(&aws, "slot_orphan", &schema.table, hour()).await?;
    assert!(
        !items.iter().any(|b| b.flush_id == orphans[0].item.flush_id),
        "orphan items removed"
    );
    assert!(items
        .iter()
        .any(|b| b.flush_id == in_flight[0].item.flush_id && !b.compacted));
    let tags = aws
        .s3
        .get_object_tagging()
        .bucket(&aws.bucket)
        .key(&orphans[0].item.key)
        .send()
        .await?;
    assert!(
        tags.tag_set().is_empty(),
        "an orphan's staging object is left alone"
    );
    assert_eq!(pending(&aws, "slot_orphan").await?.len(), 1);
    let read = read_parquet(&aws, &schema.table).await?;
    let ids: Vec<i64> = read["pyarrow"]["rows"]
        .as_array()
        .context("rows")?
        .iter()
        .filter_map(|r| r["id"].as_i64())
        .collect();
    assert_eq!(ids, vec![1, 3]);
    Ok(())
}

/// A flush is told that a table-hour is done (after which its record may expire) once, and only
/// when every batch of it in that hour is marked compacted: a batch of it still unmarked would
/// otherwise be judged an orphan by a run after the record expired.
#[tokio::test]
async fn a_flush_hears_its_hour_is_done_once_after_all_its_batches_are_marked() -> anyhow::Result<()>
{
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_flush_done").await?;
    stager.batch_rows = 10;
    // Three flushes of several batches each in one table-hour.
    for f in 0..3 {
        stage_notes(&mut stager, 1 + f * 60, 60, 3).await?;
    }
    let t = notes_schema().table;
    let flushes: BTreeSet<FlushId> = batch_items(&aws, "slot_flush_done", &t, hour())
        .await?
        .iter()
        .map(|b| b.flush_id)
        .collect();
    assert_eq!(flushes.len(), 3);
    let mortal = Mortal::new(u32::MAX);
    let c = failing_ledger_compactor(&aws, config(&aws), &mortal);
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.hours[0].consumed_batches, 18);
    let calls = mortal
        .flush_done
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();
    let told: Vec<FlushId> = calls.iter().map(|c| c.0).collect();
    assert_eq!(
        told.iter().copied().collect::<BTreeSet<_>>(),
        flushes,
        "every flush is told"
    );
    assert_eq!(told.len(), flushes.len(), "each flush once: {calls:?}");
    assert!(
        calls.iter().all(|c| c.1 == 0),
        "told only once all its batches in the hour were marked: {calls:?}"
    );
    mortal.assert_none_premature()?;
    Ok(())
}

/// Stages `flushes` flushes of one two-change batch each in `slot`'s one table-hour, compacts
/// them through a fault proxy that injects nothing, checks that the hour is done with every
/// batch consumed, and gives the requests the compaction made by operation.
async fn compact_one_batch_flushes_counting_requests(
    aws: &AwsFixture,
    slot: &str,
    flushes: u64,
) -> anyhow::Result<BTreeMap<String, u64>> {
    use pipeline_tests::faultproxy::FaultProxy;
    let mut stager = Stager::new(aws, slot).await?;
    for f in 0..flushes as i64 {
        stage_notes(&mut stager, 1 + f * 2, 2, 2).await?;
    }
    let items = batch_items(aws, slot, &notes_schema().table, hour()).await?;
    assert_eq!(items.len() as u64, flushes, "one batch per flush");
    let proxy = FaultProxy::start(&aws.endpoint, 0, Vec::new()).await?;
    let sdk = pipeline_tests::aws::sdk_config(&proxy.endpoint).await;
    let report = Compactor::from_sdk(config(aws), &sdk)
        .sweep(&SweepRequest::default())
        .await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.hours.len(), 1);
    assert_eq!(report.hours[0].state, HourState::Done);
    assert_eq!(report.hours[0].consumed_batches as u64, flushes);
    Ok(proxy.operations())
}

/// Consuming an hour costs the ledger one write request per 25 batches, not one per batch: the
/// items of many flushes are marked together (DynamoDB `BatchWriteItem`). A capture's flush holds
/// one batch per table, hour and schema version, so marking a flush's batches together would
/// save nothing; here every flush holds one. Each staging object is still tagged on its own (S3
/// has no batch tagging), and each flush told once.
#[tokio::test]
async fn an_hours_batches_are_marked_compacted_25_to_a_request() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let slot = "slot_marks_together";
    let flushes: u64 = 60;
    let ops = compact_one_batch_flushes_counting_requests(&aws, slot, flushes).await?;
    let t = notes_schema().table;
    let marked = batch_items(&aws, slot, &t, hour()).await?;
    assert!(marked.iter().all(|b| b.compacted), "every batch marked");
    let expiring = aws
        .dynamodb
        .scan()
        .table_name(&aws.table)
        .send()
        .await?
        .items()
        .iter()
        .filter(|i| {
            i.get("pk")
                .and_then(|v| v.as_s().ok())
                .is_some_and(|pk| pk.starts_with("batch#"))
                && i.contains_key(cdc_contract::ledger::TTL_ATTRIBUTE)
        })
        .count() as u64;
    assert_eq!(expiring, flushes, "every batch item has its TTL");

    let count = |op: &str| ops.get(op).copied().unwrap_or(0);
    assert!(count("s3:PUT?tagging") >= flushes, "{ops:?}");
    assert!(
        count("dynamodb:BatchWriteItem") <= flushes.div_ceil(25),
        "marks 25 to a request: {ops:?}"
    );
    // Per flush: its table-hour noted done and its record set to expire in one request (its
    // only table-hour); besides those, the hour's release.
    assert!(
        count("dynamodb:UpdateItem") <= flushes + 8,
        "no update per batch, one per flush: {ops:?}"
    );
    Ok(())
}

/// The ledger actions infra grants the compactor's role (CDK's `LEDGER_ACTIONS` and Terraform's
/// `ledger_actions`, read from their sources) cover every DynamoDB call a compaction makes: the
/// emulator checks no permission, so a call the policies miss would only fail on AWS.
#[tokio::test]
async fn every_ledger_call_of_a_compaction_is_granted_by_infra() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let called: BTreeSet<String> =
        compact_one_batch_flushes_counting_requests(&aws, "slot_granted", 3)
            .await?
            .into_keys()
            .filter_map(|op| {
                op.strip_prefix("dynamodb:")
                    .map(|a| format!("dynamodb:{a}"))
            })
            // Authorised item by item as PutItem, UpdateItem, DeleteItem or ConditionCheckItem.
            .filter(|a| a != "dynamodb:TransactWriteItems")
            .collect();
    assert!(called.contains("dynamodb:BatchGetItem"), "{called:?}");
    let infra = Path::new(env!("CARGO_MANIFEST_DIR")).join("../infra");
    for (file, list) in [
        ("lib/capture.ts", "LEDGER_ACTIONS = ["),
        ("terraform/capture.tf", "ledger_actions = ["),
    ] {
        let text = std::fs::read_to_string(infra.join(file))?;
        let start = text.find(list).context(list)? + list.len();
        let end = start + text[start..].find(']').context("the list's end")?;
        let granted: BTreeSet<String> = text[start..end]
            .split(['\'', '"'])
            .filter(|w| w.starts_with("dynamodb:"))
            .map(str::to_owned)
            .collect();
        let missing: Vec<&String> = called.difference(&granted).collect();
        assert!(missing.is_empty(), "{file} does not grant {missing:?}");
    }
    Ok(())
}

/// An hour written into many parts: a flush whose batches the recorded parts have passed is
/// consumed while the later parts are written, not after the last one, and still only once all
/// its batches in the hour are marked; every batch is consumed once and every change is final
/// once.
#[tokio::test]
async fn flushes_the_recorded_parts_pass_are_consumed_while_later_parts_are_written(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_early").await?;
    // First a flush of one batch of several chunks (parts roll inside it: its last rows are
    // in a part not recorded when the parts before are), then flushes of small batches.
    stager.batch_rows = 10_000;
    let mut staged = stage_notes(&mut stager, 1, 7_000, 100).await?;
    stager.batch_rows = 10;
    for f in 0..6 {
        staged.extend(stage_notes(&mut stager, 7_001 + f * 60, 60, 3).await?);
    }
    let t = notes_schema().table;
    let items = batch_items(&aws, "slot_early", &t, hour()).await?;
    let flushes: BTreeSet<FlushId> = items.iter().map(|b| b.flush_id).collect();
    assert_eq!(flushes.len(), 7);
    assert!(items.iter().any(|b| b.rows == 7_000), "one big batch");
    let mortal = Mortal::new(u32::MAX);
    let mut cfg = config(&aws);
    cfg.part_max_bytes = 4096;
    let c = failing_ledger_compactor(&aws, cfg, &mortal);
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let hour_report = &report.hours[0];
    assert_eq!(hour_report.state, HourState::Done);
    assert_eq!(hour_report.consumed_batches, items.len());
    let parts_written = hour_report.parts;
    assert!(parts_written >= 4, "many parts: {parts_written}");
    let calls = mortal
        .flush_done
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .clone();
    assert!(
        calls.iter().all(|c| c.1 == 0),
        "told only once all its batches in the hour were marked: {calls:?}"
    );
    let told: Vec<FlushId> = calls.iter().map(|c| c.0).collect();
    assert_eq!(told.iter().copied().collect::<BTreeSet<_>>(), flushes);
    assert_eq!(told.len(), flushes.len(), "each flush once: {calls:?}");
    assert!(
        calls.iter().any(|c| c.2 < parts_written),
        "a flush was consumed before the last part was recorded: {calls:?}"
    );
    assert!(
        batch_items(&aws, "slot_early", &t, hour())
            .await?
            .iter()
            .all(|b| b.compacted),
        "every batch marked"
    );
    assert_all_final_once(&aws, &t, staged.len()).await?;
    mortal.assert_none_premature()?;
    Ok(())
}

/// Batches that each start with the last change of the batch before them (their ranges
/// overlap, as when a change is delivered twice): every change lands once, in order in the
/// final JSONL, and once in the Parquet parts, while parts roll among the batches. The batches after the
/// one being read are parsed ahead of their turn against a floor below the real one (the last
/// change before the batch being read), so the repeated change is seen there as new and must be
/// found a duplicate when its batch's turn comes.
#[tokio::test]
async fn a_change_repeated_by_the_next_batch_lands_once() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_overlap").await?;
    let schema = notes_schema();
    let mut staged = 0;
    let mut previous: Option<StagedBatch> = None;
    for b in 0..12 {
        if let Some(p) = &previous {
            stager.repeat_last(&schema, p);
        }
        let changes = (0..6)
            .map(|k| {
                let id = b * 6 + k;
                Change::insert(&schema, json!({"id": id, "body": noisy(id, 0)}))
            })
            .collect();
        stager.tx(at(1, b), changes);
        staged += 6;
        previous = stager.flush(Some(now_ms())).await?.into_iter().last();
    }
    let t = schema.table.clone();
    let items = batch_items(&aws, "slot_overlap", &t, hour()).await?;
    assert_eq!(items.len(), 12);
    assert!(
        items.windows(2).all(|w| w[1].first == w[0].last),
        "each batch starts with the last change of the one before"
    );
    let mut cfg = config(&aws);
    cfg.part_max_bytes = 4096;
    let c = compactor_with(&aws, cfg);
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let hour_report = &report.hours[0];
    assert_eq!(hour_report.state, HourState::Done);
    assert!(
        hour_report.parts >= 2,
        "parts rolled: {}",
        hour_report.parts
    );
    assert_eq!(hour_report.rows, staged as u64, "each change written once");
    assert!(
        hour_report.planned_ms <= hour_report.written_ms
            && hour_report.written_ms <= hour_report.done_ms,
        "the steps' times follow each other: {hour_report:?}"
    );
    assert_all_final_once(&aws, &t, staged).await?;
    let read = read_parquet(&aws, &t).await?;
    let ids: Vec<i64> = read["pyarrow"]["rows"]
        .as_array()
        .context("parquet rows")?
        .iter()
        .map(|r| r["id"].as_i64().context("id"))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(
        ids,
        (0..staged as i64).collect::<Vec<_>>(),
        "the Parquet parts too, each change once (read sorted by position)"
    );
    Ok(())
}

/// A run that marks a flush's batches and dies before telling the flush its hour is done: the
/// next run has no batch of it left to consume, and still tells it before the hour is done, so
/// the flush record expires rather than staying for good.
#[tokio::test]
async fn a_flush_left_untold_by_a_dead_run_is_told_by_the_next() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_untold").await?;
    stager.batch_rows = 10;
    for f in 0..2 {
        stage_notes(&mut stager, 1 + f * 30, 30, 3).await?;
    }
    let t = notes_schema().table;
    let flushes: BTreeSet<FlushId> = batch_items(&aws, "slot_untold", &t, hour())
        .await?
        .iter()
        .map(|b| b.flush_id)
        .collect();
    assert_eq!(flushes.len(), 2);
    let mortal = Mortal::new(u32::MAX);
    mortal.fail_flush_done.store(1, Ordering::SeqCst);
    let c = failing_ledger_compactor(&aws, config(&aws), &mortal);
    let first = c.sweep(&SweepRequest::default()).await?;
    assert!(
        !first.failures.is_empty(),
        "the first run died telling: {first:?}"
    );
    assert!(
        batch_items(&aws, "slot_untold", &t, hour())
            .await?
            .iter()
            .all(|b| b.compacted),
        "its batches were marked"
    );
    mortal.fail_flush_done.store(0, Ordering::SeqCst);
    let second = c.sweep(&SweepRequest::default()).await?;
    assert!(second.failures.is_empty(), "{:?}", second.failures);
    assert_eq!(second.hours[0].state, HourState::Done);
    let told: BTreeSet<FlushId> = mortal
        .flush_done
        .lock()
        .map_err(|_| anyhow::anyhow!("lock"))?
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(told, flushes, "every flush told in the end");
    assert!(pending(&aws, "slot_untold").await?.is_empty());
    mortal.assert_none_premature()?;
    Ok(())
}

/// A flush record expires once every table-hour it names is noted done, and not before: told
/// its last undone table-hour (as the plan read it) it is noted and set to expire in one request,
/// an expiry already set is kept, and a table-hour told while another is undone leaves it.
#[tokio::test]
async fn a_flush_record_expires_in_the_request_that_notes_its_last_hour() -> anyhow::Result<()> {
    use cdc_contract::ledger::{self, FlushRecord, TTL_ATTRIBUTE};
    let aws = AwsFixture::new().await?;
    let slot = "slot_last_hour";
    let l = DynamoLedger::new(aws.dynamodb.clone(), aws.table.clone());
    let id = FlushId { seq: 7, epoch: 1 };
    let (a, b) = (TableName::new("public", "a"), TableName::new("public", "b"));
    let record = FlushRecord {
        id,
        hours: vec![
            ledger::pending_sk(hour(), &a),
            ledger::pending_sk(hour(), &b),
        ],
        created_ms: now_ms(),
        lsn: Default::default(),
        expires_at: None,
    };
    aws.put_ledger_item(record.to_item(slot)).await?;
    let batch = |table: &TableName| BatchItem {
        table: table.clone(),
        hour: hour(),
        key: format!("_staging/{table}/x.jsonl.gz"),
        first: Position::default(),
        last: Position::default(),
        rows: 1,
        bytes: 1,
        first_commit_ms: 0,
        last_commit_ms: 0,
        schema_id: "s".into(),
        flush_id: id,
        compacted: true,
    };
    let expiry = || async {
        let item = aws
            .get_ledger_item(&ledger::slot_pk(slot), &ledger::flush_sk(&id))
            .await?
            .context("the record")?;
        anyhow::Ok(item.get(TTL_ATTRIBUTE).and_then(|v| v.as_n().ok()).cloned())
    };
    let seen = |found: &std::collections::HashMap<FlushId, compactor::ledger::FlushSeen>| {
        found.get(&id).cloned().unwrap_or_default()
    };

    let first = seen(&l.flushes_recorded(slot, &[id]).await?);
    let (ha, hb) = (
        ledger::pending_sk(hour(), &a),
        ledger::pending_sk(hour(), &b),
    );
    assert!(!first.last_undone(&ha) && !first.last_undone(&hb));
    l.flush_hour_done(slot, &batch(&a), 1_000, false).await?;
    assert_eq!(expiry().await?, None, "table b is not done yet");

    let second = seen(&l.flushes_recorded(slot, &[id]).await?);
    assert!(second.last_undone(&hb) && !second.last_undone(&ha));
    l.flush_hour_done(slot, &batch(&b), 2_000, true).await?;
    assert_eq!(expiry().await?.as_deref(), Some("2000"));
    // A retry (its reply lost) keeps the expiry it set.
    l.flush_hour_done(slot, &batch(&b), 3_000, true).await?;
    assert_eq!(expiry().await?.as_deref(), Some("2000"));
    let done = seen(&l.flushes_recorded(slot, &[id]).await?);
    assert_eq!(done.undone, Some(Default::default()));
    // A record gone: nothing to note, no error, nothing written.
    let gone = FlushId { seq: 8, epoch: 1 };
    l.flush_hour_done(
        slot,
        &BatchItem {
            flush_id: gone,
            ..batch(&a)
        },
        1,
        true,
    )
    .await?;
    assert!(l.flushes_recorded(slot, &[gone]).await?.is_empty());
    Ok(())
}

/// A flush with batches in two tables' hours: compacting one table-hour leaves its record
/// without an expiry (the other's batches still need it), compacting the other sets it.
#[tokio::test]
async fn a_flush_of_two_table_hours_expires_only_once_both_are_compacted() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let slot = "slot_two_hours";
    let mut stager = Stager::new(&aws, slot).await?;
    let (notes, users) = (notes_schema(), users_schema());
    stager.tx(
        at(10, 1),
        vec![
            Change::insert(&notes, json!({"id": 1, "body": "x"})),
            Change::insert(&users, full_row(1)),
        ],
    );
    stager.flush(Some(now_ms())).await?;
    let ttl = cdc_contract::ledger::TTL_ATTRIBUTE;
    let expiring = || async {
        let records = aws
            .query_ledger(&cdc_contract::ledger::slot_pk(slot))
            .await?
            .into_iter()
            .filter(|r| {
                r.get("hours")
                    .is_some_and(|h| h.as_l().is_ok_and(|l| l.len() == 2))
            })
            .collect::<Vec<_>>();
        assert_eq!(records.len(), 1, "one flush record naming both table-hours");
        anyhow::Ok(records[0].contains_key(ttl))
    };
    // The users table-hour is held back (its pending marker set aside) for the first sweep.
    let markers = aws
        .query_ledger(&cdc_contract::ledger::pending_pk(slot))
        .await?;
    let users_marker = markers
        .into_iter()
        .find(|m| PendingHour::from_item(m).is_ok_and(|p| p.table == users.table))
        .context("the users table-hour's marker")?;
    let users_hour = PendingHour::from_item(&users_marker)?;
    aws.delete_ledger_item(
        &cdc_contract::ledger::pending_pk(slot),
        &cdc_contract::ledger::pending_sk(users_hour.hour, &users_hour.table),
    )
    .await?;
    let c = compactor_with(&aws, config(&aws));
    for (table, expires) in [(&notes.table, false), (&users.table, true)] {
        if expires {
            aws.put_ledger_item(users_marker.clone()).await?;
        }
        let report = c.sweep(&SweepRequest::default()).await?;
        assert!(report.failures.is_empty(), "{:?}", report.failures);
        let done: Vec<&String> = report
            .hours
            .iter()
            .filter(|h| h.state == HourState::Done && h.consumed_batches > 0)
            .map(|h| &h.table)
            .collect();
        assert_eq!(done, vec![&table.to_string()], "{report:?}");
        assert_eq!(expiring().await?, expires, "after {table}");
    }
    Ok(())
}

/// The flush records an hour's batches need are read a hundred keys per request: every id
/// whose record exists is found, across requests, and none that is missing.
#[tokio::test]
async fn flush_records_are_looked_up_many_at_a_time() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let table = cdc_contract::dynamo::Table::new(aws.dynamodb.clone(), aws.table.clone());
    let ids: Vec<FlushId> = (1..=250)
        .map(|seq| FlushId {
            seq,
            epoch: 1 + seq % 2,
        })
        .collect();
    let exists = |id: &FlushId| !id.seq.is_multiple_of(3);
    let items = ids
        .iter()
        .filter(|id| exists(id))
        .map(|id| ledger::key(ledger::slot_pk("slot_many"), ledger::flush_sk(id)))
        .collect();
    table.put_all("put flush records", items).await?;
    // A record of the same flush in another slot does not count.
    let missing = ids[2];
    table
        .put_all(
            "put flush record",
            vec![ledger::key(
                ledger::slot_pk("slot_other"),
                ledger::flush_sk(&missing),
            )],
        )
        .await?;

    let l = DynamoLedger::new(aws.dynamodb.clone(), aws.table.clone());
    let found = l.flushes_recorded("slot_many", &ids).await?;
    let expected: std::collections::HashSet<FlushId> = ids.iter().copied().filter(exists).collect();
    assert_eq!(found.len(), 167);
    assert_eq!(
        found
            .keys()
            .copied()
            .collect::<std::collections::HashSet<_>>(),
        expected
    );
    assert!(!found.contains_key(&missing));
    assert!(l.flushes_recorded("slot_many", &[]).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn open_hours_wait_unless_asked() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_open").await?;
    let schema = notes_schema();
    let now = now_ms();
    let current = Hour::from_millis(now);
    stager.tx(
        now * 1000,
        vec![Change::insert(&schema, json!({"id": 1, "body": "now"}))],
    );
    stager.flush(Some(now)).await?;
    let c = compactor_with(&aws, config(&aws));
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(
        report.hours.is_empty(),
        "an open hour is not compacted: {report:?}"
    );
    assert_eq!(pending(&aws, "slot_open").await?.len(), 1);
    assert!(aws.list_keys("public.notes/").await?.is_empty());

    let answer = c
        .handle(json!({"action": "sweep", "include_open": true}))
        .await?;
    assert_eq!(answer["hours"][0]["rows"], 1);
    assert_eq!(answer["hours"][0]["hour"], current.to_string());
    assert!(pending(&aws, "slot_open").await?.is_empty());
    assert_eq!(final_events(&aws, &schema.table, current).await?.len(), 1);
    Ok(())
}

/// `OPEN_HOUR_COMPACT_MINUTES` (here a 5-second interval): an open hour is compacted once that
/// long has passed since its start or its last compaction, each time into extra parts, and not
/// before; every change lands once.
#[tokio::test]
async fn open_hours_are_compacted_at_the_set_interval() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_fresh").await?;
    let schema = notes_schema();
    let mut config = config(&aws);
    let every = Duration::from_secs(5);
    config.open_hour_every = Some(every);
    let c = compactor_with(&aws, config);
    let current = Hour::from_millis(now_ms());
    let sweep_rows = || async {
        let r = c.sweep(&SweepRequest::default()).await?;
        anyhow::ensure!(r.failures.is_empty(), "{:?}", r.failures);
        Ok::<u64, anyhow::Error>(r.rows())
    };
    let write = |stager: &mut Stager<'_>, id: i64| {
        stager.tx(
            now_ms() * 1000,
            vec![Change::insert(&schema, json!({"id": id, "body": "x"}))],
        );
    };
    write(&mut stager, 1);
    stager.flush(Some(now_ms())).await?;
    // Due once the interval has passed since the hour began (at once, unless the hour is
    // younger than that).
    let started = std::time::Instant::now();
    while sweep_rows().await? == 0 {
        anyhow::ensure!(
            started.elapsed() < 2 * every,
            "the open hour was never compacted"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if Hour::from_millis(now_ms()) != current {
        // The hour closed meanwhile: what follows would test closed hours.
        return Ok(());
    }
    let first_done = std::time::Instant::now();
    // A change right after: not due yet (unless this machine took most of the interval to get
    // here), then due once the interval has passed since that compaction.
    write(&mut stager, 2);
    stager.flush(Some(now_ms())).await?;
    let early = first_done.elapsed() < every / 2;
    let rows_now = sweep_rows().await?;
    if early {
        assert_eq!(rows_now, 0, "compacted again before the interval");
    }
    let mut rows = rows_now;
    while rows == 0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        rows = sweep_rows().await?;
        if rows == 0 {
            anyhow::ensure!(first_done.elapsed() < 3 * every, "never compacted again");
        }
    }
    assert_eq!(rows, 1);
    if Hour::from_millis(now_ms()) != current {
        return Ok(());
    }
    let recorded = parts(&aws, "slot_fresh", &schema.table, current).await?;
    assert_eq!(recorded.len(), 2, "one extra part per compaction");
    let events = final_events(&aws, &schema.table, current).await?;
    assert_eq!(events.len(), 2);
    assert_each_once_in_order(&events)?;
    Ok(())
}

#[tokio::test]
async fn unreadable_lines_go_to_the_dead_letter_prefix_and_the_hour_completes() -> anyhow::Result<()>
{
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_dead").await?;
    let schema = notes_schema();
    let good1 = stager.tx(
        at(1, 0),
        vec![Change::insert(&schema, json!({"id": 1, "body": "x"}))],
    );
    stager.garbage(&schema, hour(), "{\"this is\": \"not an event\"}");
    let good2 = stager.tx(
        at(2, 0),
        vec![Change::insert(&schema, json!({"id": 2, "body": "y"}))],
    );
    let batches = stager.flush(Some(now_ms())).await?;
    assert_eq!(batches.len(), 1);
    let mut cfg = config(&aws);
    cfg.dead_letter_queue_url = Some(aws.queue_url.clone());
    let report = compactor_with(&aws, cfg)
        .sweep(&SweepRequest::default())
        .await?;
    assert_eq!(report.hours[0].state, HourState::Done);
    assert_eq!(report.hours[0].dead_letters, 1);
    assert_eq!(report.hours[0].rows, 2);
    let dead = aws.list_keys("_dead_letter/").await?;
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].starts_with("_dead_letter/public.notes/2025/01/08/10/"),
        "{}",
        dead[0]
    );
    let record: Value = serde_json::from_slice(&aws.get_bytes(&dead[0]).await?)?;
    assert_eq!(record["staging_key"], batches[0].item.key.as_str());
    assert_eq!(record["line"], 2);
    assert_eq!(record["raw"], "{\"this is\": \"not an event\"}");
    assert!(record["reason"]
        .as_str()
        .unwrap_or("")
        .contains("not a change event"));
    let notices = aws.drain_queue().await?;
    assert_eq!(notices.len(), 1);
    let notice: Value = serde_json::from_str(&notices[0])?;
    assert_eq!(notice["records"], 1);
    let events = final_events(&aws, &schema.table, hour()).await?;
    let expected: Vec<Value> = [good1, good2]
        .concat()
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    assert_eq!(events, expected);
    Ok(())
}

/// Four flushes of one table-hour whose staging objects cannot be read to their end: the first
/// holds its first change and then a gzip member cut short (its second change), the second is
/// not gzip at all, the third ends cleanly after the first of its two changes, the fourth holds
/// the first of its two changes and then a line that is not a change event. Returns the
/// readable lines and the last position of the fourth batch.
async fn stage_batches_unreadable_at_their_end(
    aws: &AwsFixture,
    slot: &str,
) -> anyhow::Result<(Vec<String>, Position)> {
    let mut stager = Stager::new(aws, slot).await?;
    let schema = notes_schema();
    let note = |id: i64, body: &str| Change::insert(&schema, json!({"id": id, "body": body}));
    let good = stager.tx(at(1, 0), vec![note(1, "x")]);
    let lost = stager.tx(at(2, 0), vec![note(2, "y")]);
    let cut = stager.flush(Some(now_ms())).await?;
    stager.tx(at(3, 0), vec![note(3, "z")]);
    let whole = stager.flush(Some(now_ms())).await?;
    let kept = stager.tx(at(4, 0), vec![note(4, "v"), note(5, "w")]);
    let short = stager.flush(Some(now_ms())).await?;
    let sixth = stager.tx(at(5, 0), vec![note(6, "u"), note(7, "t")]);
    let mixed = stager.flush(Some(now_ms())).await?;
    anyhow::ensure!(cut.len() == 1 && whole.len() == 1 && short.len() == 1 && mixed.len() == 1);
    let gzip = |line: &str| pipeline_tests::staging::gzip(format!("{line}\n").as_bytes());
    let mut cut_short = gzip(&good[0])?;
    let tail = gzip(&lost[0])?;
    cut_short.extend_from_slice(&tail[..tail.len() / 2]);
    for (key, body) in [
        (&cut[0].item.key, cut_short),
        (
            &whole[0].item.key,
            b"\x1f\x8b\x08\x00 not a gzip stream".to_vec(),
        ),
        (&short[0].item.key, gzip(&kept[0])?),
        (
            &mixed[0].item.key,
            gzip(&format!("{}\n{{\"not\": \"an event\"}}", sixth[0]))?,
        ),
    ] {
        aws.put_bytes(key, body).await?;
    }
    let readable = vec![good[0].clone(), kept[0].clone(), sixth[0].clone()];
    Ok((readable, mixed[0].item.last))
}

/// What [`stage_batches_unreadable_at_their_end`]'s hour must look like once compacted: the
/// readable change written once, both batches consumed, the watermark at the second batch's
/// end, no pending marker, each object's dead letter and copy stored; and a further sweep
/// finds nothing to do, stores and announces nothing.
async fn assert_unreadable_ends_consumed(
    aws: &AwsFixture,
    slot: &str,
    good: &[String],
    end: Position,
) -> anyhow::Result<()> {
    let t = notes_schema().table;
    let events = final_events(aws, &t, hour()).await?;
    let expected: Vec<Value> = good
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()?;
    assert_eq!(events, expected);
    assert_eq!(parts(aws, slot, &t, hour()).await?.len(), 1);
    let items = batch_items(aws, slot, &t, hour()).await?;
    assert_eq!(items.len(), 4);
    assert!(items.iter().all(|b| b.compacted), "{items:?}");
    let through = hour_record(aws, slot, &t, hour())
        .await?
        .and_then(|r| r.compacted_through);
    assert_eq!(through, Some(end));
    assert!(pending(aws, slot).await?.is_empty());
    // Each unreadable object: a record of where it stopped, and its copy; the fourth's bad line
    // its own record too.
    let dead = aws.list_keys("_dead_letter/").await?;
    assert_eq!(dead.len(), 9, "{dead:?}");
    aws.drain_queue().await?;

    let mut cfg = config(aws);
    cfg.dead_letter_queue_url = Some(aws.queue_url.clone());
    let again = compactor_with(aws, cfg)
        .sweep(&SweepRequest::default())
        .await?;
    assert!(
        again
            .hours
            .iter()
            .all(|h| h.dead_letters == 0 && h.rows == 0),
        "{again:?}"
    );
    assert!(aws.drain_queue().await?.is_empty());
    assert_eq!(parts(aws, slot, &t, hour()).await?.len(), 1);
    Ok(())
}

/// Batches whose last lines cannot be read (an object cut short after its first line, one not
/// gzip at all, one ending cleanly before the last change its item records, one short after a
/// bad line): the lines that can be read are written, the rest (or the object) go to the
/// dead-letter prefix, and each batch is consumed as one whose unreadable lines sit in the
/// middle would be. The watermark cannot stop at the last line written: the batch would stay to
/// do and its hour pending for ever, its dead letters stored and announced again at every sweep.
#[tokio::test]
async fn a_batch_unreadable_at_its_end_or_whole_is_consumed_and_its_hour_completes(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let slot = "slot_dead_end";
    let (good, end) = stage_batches_unreadable_at_their_end(&aws, slot).await?;
    let mut cfg = config(&aws);
    cfg.dead_letter_queue_url = Some(aws.queue_url.clone());
    let report = compactor_with(&aws, cfg)
        .sweep(&SweepRequest::default())
        .await?;
    assert_eq!(report.hours.len(), 1);
    assert_eq!(report.hours[0].state, HourState::Done, "{report:?}");
    assert_eq!(report.hours[0].rows, 3);
    assert_eq!(report.hours[0].dead_letters, 5);
    assert_eq!(report.hours[0].consumed_batches, 4);
    // Each unreadable object announced once.
    let notices = aws.drain_queue().await?;
    assert_eq!(notices.len(), 4);
    assert!(
        notices
            .iter()
            .any(|n| n.contains("ends before the last change its batch item records")),
        "{notices:?}"
    );
    assert_unreadable_ends_consumed(&aws, slot, &good, end).await
}

/// The same hour compacted through a proxy that hits every `n`-th request with a fault: its
/// reply lost after it took effect, the connection dropped before it, 503 or throttled (a
/// random `n` from 2 to 5 and a random cycle of faults that starts with a lost reply, each round
/// a different set of the run's requests, the watermark's raise among them in some), sweeping
/// again after a failed run as Lambda retries: the same end state.
#[tokio::test]
async fn a_batch_unreadable_at_its_end_is_consumed_once_through_lost_replies() -> anyhow::Result<()>
{
    use pipeline_tests::faultproxy::{Fault, FaultProxy};
    let mut rng = pipeline_tests::Rng::from_time();
    const FAULTS: [Fault; 4] = [
        Fault::LoseReply,
        Fault::Drop,
        Fault::Unavailable,
        Fault::Throttle,
    ];
    for _ in 0..3 {
        let n = 2 + rng.below(4);
        let mut cycle = vec![Fault::LoseReply];
        cycle.extend((0..rng.below(4)).map(|_| FAULTS[rng.below(4) as usize]));
        eprintln!("faults on one request in {n}, in turn: {cycle:?}");
        let aws = AwsFixture::new().await?;
        let slot = "slot_dead_end_lost";
        let (good, end) = stage_batches_unreadable_at_their_end(&aws, slot).await?;
        let proxy = FaultProxy::start(&aws.endpoint, n, cycle).await?;
        let sdk = pipeline_tests::aws::sdk_config(&proxy.endpoint).await;
        let mut cfg = config(&aws);
        cfg.dead_letter_queue_url = Some(aws.queue_url.clone());
        let compactor = Compactor::from_sdk(cfg, &sdk);
        let mut done = false;
        for _ in 0..20 {
            // A clean sweep with nothing left busy or pending (a run before may have ended it).
            if let Ok(r) = compactor.sweep(&SweepRequest::default()).await {
                if r.failures.is_empty() && r.hours.iter().all(|h| h.state == HourState::Done) {
                    done = true;
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            done,
            "faults on one request in {n}: the hour never completed"
        );
        assert!(proxy.faults() > 0);
        drop(proxy);
        assert_unreadable_ends_consumed(&aws, slot, &good, end).await?;
    }
    Ok(())
}

/// The ledger's conditional writes whose reply is lost after they took effect (the SDK sends
/// them again, and the condition then fails) are recognised as done: a claim taken is not a busy
/// hour, a raised watermark is not a lost claim, a cleared pending marker is not one still
/// pending. And the conditions still hold against others: a raise by an attempt that lost the
/// claim is lost, a marker a later flush moved on is not cleared.
#[tokio::test]
async fn ledger_writes_whose_reply_is_lost_are_recognised_as_done() -> anyhow::Result<()> {
    use pipeline_tests::faultproxy::{Fault, FaultProxy};
    let aws = AwsFixture::new().await?;
    let slot = "slot_lost_replies";
    let t = notes_schema().table;
    // A ledger behind a fresh proxy: its first request is forwarded and the reply lost.
    let behind_proxy = || async {
        let mut cycle = vec![Fault::None; 8];
        cycle[1] = Fault::LoseReply;
        let proxy = FaultProxy::start(&aws.endpoint, 1, cycle).await?;
        let sdk = pipeline_tests::aws::sdk_config(&proxy.endpoint).await;
        let ledger = DynamoLedger::new(aws_sdk_dynamodb::Client::new(&sdk), &aws.table);
        anyhow::Ok((proxy, ledger))
    };
    let direct = DynamoLedger::new(aws.dynamodb.clone(), &aws.table);

    let claimed = HourRecord {
        version: 1,
        claim_attempt: "attempt-1".into(),
        claim_until_ms: now_ms() + 60_000,
        ..HourRecord::new(t.clone(), hour())
    };
    let (proxy, ledger) = behind_proxy().await?;
    let claim = ledger.claim_hour(slot, 0, &claimed, now_ms()).await?;
    assert_eq!(
        (claim, proxy.faults()),
        (Claim::Claimed(claimed.clone()), 1)
    );
    let other = HourRecord {
        claim_attempt: "attempt-2".into(),
        ..claimed.clone()
    };
    assert_eq!(
        direct.claim_hour(slot, 0, &other, now_ms()).await?,
        Claim::Busy
    );

    let raised = HourRecord {
        version: 2,
        compacted_through: Some(Position::new(cdc_contract::Lsn(0x100), 1)),
        ..claimed.clone()
    };
    let (proxy, ledger) = behind_proxy().await?;
    let outcome = ledger.raise_watermark(slot, 1, &raised).await?;
    assert_eq!((outcome, proxy.faults()), (Recorded::Yes, 1));
    assert_eq!(
        hour_record(&aws, slot, &t, hour()).await?,
        Some(raised.clone())
    );
    let stale = HourRecord {
        version: 3,
        claim_attempt: "attempt-0".into(),
        compacted_through: Some(Position::new(cdc_contract::Lsn(0x200), 1)),
        ..raised.clone()
    };
    assert_eq!(
        direct.raise_watermark(slot, 2, &stale).await?,
        Recorded::Lost
    );
    assert_eq!(hour_record(&aws, slot, &t, hour()).await?, Some(raised));

    let marker = |flush_seq| PendingHour {
        table: t.clone(),
        hour: hour(),
        flush_seq,
    };
    let table = aws.ledger_table();
    table.put("marker", marker(7).to_item(slot), None).await?;
    let (proxy, ledger) = behind_proxy().await?;
    let cleared = ledger.clear_pending(slot, &marker(7)).await?;
    assert_eq!((cleared, proxy.faults()), (true, 1));
    assert!(pending(&aws, slot).await?.is_empty());
    table.put("marker", marker(8).to_item(slot), None).await?;
    assert!(!direct.clear_pending(slot, &marker(7)).await?);
    assert_eq!(pending(&aws, slot).await?, vec![marker(8)]);
    Ok(())
}

/// A part that ends without a row (its only batch unreadable) before a schema change: the
/// next part takes its number, and its files must start afresh. An Avro file's header is
/// output as soon as its part is opened; the header of the part without rows must not stay in
/// front of the next part's file.
#[tokio::test]
async fn a_part_left_without_rows_at_a_schema_change_leaves_nothing_in_the_next_parts_files(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_empty_part").await?;
    let v1 = notes_schema();
    let mut v2 = v1.clone();
    v2.columns.push(column("score", "integer", 23));
    stager.tx(
        at(1, 0),
        vec![Change::insert(&v1, json!({"id": 1, "body": "v1"}))],
    );
    let unreadable = stager.flush(Some(now_ms())).await?;
    anyhow::ensure!(unreadable.len() == 1);
    aws.put_bytes(
        &unreadable[0].item.key,
        pipeline_tests::staging::gzip(b"{\"not\": \"an event\"}\n")?,
    )
    .await?;
    let kept = stager.tx(
        at(2, 0),
        vec![Change::insert(
            &v2,
            json!({"id": 2, "body": "v2", "score": 5}),
        )],
    );
    stager.flush(Some(now_ms())).await?;
    let mut cfg = config(&aws);
    cfg.formats = vec![Format::Jsonl, Format::Parquet, Format::Avro];
    let report = compactor_with(&aws, cfg)
        .sweep(&SweepRequest::default())
        .await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(report.hours[0].dead_letters > 0, "{report:?}");
    let recorded = parts(&aws, "slot_empty_part", &v1.table, hour()).await?;
    assert_eq!(recorded.len(), 1, "the part without rows is not recorded");
    assert_eq!(recorded[0].schema_id, v2.version_id());
    let avro = recorded[0]
        .files
        .iter()
        .find(|f| f.format == Format::Avro)
        .context("an Avro file")?;
    let bytes = aws.get_bytes(&avro.key).await?;
    assert!(bytes.starts_with(b"Obj\x01"), "an Avro file");
    assert_eq!(
        bytes.windows(4).filter(|w| w == b"Obj\x01").count(),
        1,
        "one header: the part without rows left none of its own in front"
    );
    let events = final_events(&aws, &v1.table, hour()).await?;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0], serde_json::from_str::<Value>(&kept[0])?);
    Ok(())
}

#[tokio::test]
async fn a_schema_change_mid_hour_starts_a_new_part() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_schema").await?;
    let v1 = notes_schema();
    let mut v2 = v1.clone();
    v2.columns.push(column("score", "integer", 23));
    let mut v3 = v2.clone();
    v3.columns[2] = column("score", "text", 25);
    stager.tx(
        at(1, 0),
        vec![Change::insert(&v1, json!({"id": 1, "body": "v1"}))],
    );
    stager.tx(
        at(2, 0),
        vec![Change::insert(
            &v2,
            json!({"id": 2, "body": "v2", "score": 5}),
        )],
    );
    stager.tx(
        at(3, 0),
        vec![Change::insert(
            &v3,
            json!({"id": 3, "body": "v3", "score": "high"}),
        )],
    );
    stager.flush(Some(now_ms())).await?;
    let report = compactor_with(&aws, config(&aws))
        .sweep(&SweepRequest::default())
        .await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let recorded = parts(&aws, "slot_schema", &v1.table, hour()).await?;
    let ids: Vec<&str> = recorded.iter().map(|p| p.schema_id.as_str()).collect();
    assert_eq!(ids, [v1.version_id(), v2.version_id(), v3.version_id()]);
    let read = read_parquet(&aws, &v1.table).await?;
    let rows = read["duckdb"]["rows"].as_array().context("rows")?;
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0]["score"],
        Value::Null,
        "a column added later is null before it"
    );
    assert_eq!(
        read["duckdb"]["types"]["score"], "VARCHAR",
        "int and text unite as text"
    );
    Ok(())
}

fn bin(name: &str) -> anyhow::Result<PathBuf> {
    pipeline_tests::bins::bin_path(name)
}

fn shell_env(aws: &AwsFixture) -> Vec<(String, String)> {
    let mut env = aws.env();
    env.push(("RUST_LOG".into(), "info".into()));
    env.push(("LOG_FORMAT".into(), "text".into()));
    env
}

async fn run_compactor(
    aws: &AwsFixture,
    args: &[&str],
    stdin: Option<&str>,
) -> anyhow::Result<(bool, String, String)> {
    let mut cmd = tokio::process::Command::new(bin("compactor")?);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(shell_env(aws))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().context("starting compactor")?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use tokio::io::AsyncWriteExt;
        pipe.write_all(text.as_bytes()).await?;
    }
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

fn last_json_line(stdout: &str) -> anyhow::Result<Value> {
    let line = stdout.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("last line is not JSON: {line}"))
}

#[tokio::test]
async fn the_cli_invokes_one_handler_call_and_sweeps_from_the_shell() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_cli").await?;
    stage_notes(&mut stager, 1, 10, 5).await?;

    // A bad setting is refused at start-up, naming it.
    let (ok, _, err) = run_compactor(&aws, &["--part-max-bytes", "lots", "sweep"], None).await?;
    assert!(!ok);
    assert!(err.contains("PART_MAX_BYTES"), "{err}");

    let events = repo_root().join("compactor/events");
    let sqs = events.join("sqs.json");
    let (ok, out, err) =
        run_compactor(&aws, &["invoke", "--event", &sqs.to_string_lossy()], None).await?;
    assert!(ok, "{err}");
    assert_eq!(last_json_line(&out)?, json!({"batchItemFailures": []}));
    assert!(
        out.lines().any(|l| l.contains("\"CompactionRows\":10")),
        "an EMF line: {out}"
    );
    assert_eq!(
        final_events(&aws, &notes_schema().table, hour())
            .await?
            .len(),
        10
    );

    stage_notes(&mut stager, 100, 5, 5).await?;
    let (ok, out, err) = run_compactor(
        &aws,
        &["invoke", "--event", "-"],
        Some(r#"{"action":"sweep"}"#),
    )
    .await?;
    assert!(ok, "{err}");
    assert_eq!(last_json_line(&out)?["hours"][0]["rows"], 5);

    stage_notes(&mut stager, 200, 3, 3).await?;
    let (ok, out, err) = run_compactor(&aws, &["sweep", "--include-open"], None).await?;
    assert!(ok, "{err}");
    assert_eq!(last_json_line(&out)?["hours"][0]["rows"], 3);
    assert_eq!(
        final_events(&aws, &notes_schema().table, hour())
            .await?
            .len(),
        18
    );

    let (ok, _, err) = run_compactor(
        &aws,
        &["invoke", "--event", "-"],
        Some(r#"{"action":"dance"}"#),
    )
    .await?;
    assert!(!ok);
    assert!(err.contains("unknown action"), "{err}");
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The Lambda binary under cargo-lambda's local runtime: `cargo lambda watch --only-lambda-apis`
/// emulates the Lambda APIs (no build), the already-built binary serves them, and
/// `cargo lambda invoke --data-file` sends each trigger kind.
#[tokio::test]
async fn the_lambda_binary_answers_cargo_lambda_invoke_for_each_trigger() -> anyhow::Result<()> {
    let cargo_lambda = repo_root().join(".venv/bin/cargo-lambda");
    if !cargo_lambda.is_file() {
        bail!(
            "{} is missing: run ./scripts/setup.sh",
            cargo_lambda.display()
        );
    }
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_lambda").await?;
    stage_notes(&mut stager, 1, 10, 5).await?;

    let port = free_port()?;
    let mut watch = tokio::process::Command::new(&cargo_lambda)
        .args([
            "lambda",
            "watch",
            "--only-lambda-apis",
            "-A",
            "127.0.0.1",
            "-P",
            &port.to_string(),
        ])
        .current_dir(repo_root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting cargo lambda watch")?;
    pipeline_tests::wait_for(
        "the cargo-lambda emulator",
        Duration::from_secs(30),
        || async {
            Ok(std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ()))
        },
    )
    .await?;

    let mut function = tokio::process::Command::new(bin("compactor")?)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(shell_env(&aws))
        .env(
            "AWS_LAMBDA_RUNTIME_API",
            format!("http://127.0.0.1:{port}/.rt"),
        )
        .env("AWS_LAMBDA_FUNCTION_NAME", "_")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the compactor under the emulated runtime")?;

    let invoke = |file: PathBuf| {
        let cargo_lambda = cargo_lambda.clone();
        async move {
            let out = tokio::time::timeout(
                Duration::from_secs(60),
                tokio::process::Command::new(&cargo_lambda)
                    .args([
                        "lambda",
                        "invoke",
                        "-A",
                        "127.0.0.1",
                        "-P",
                        &port.to_string(),
                        "--data-file",
                    ])
                    .arg(&file)
                    .output(),
            )
            .await??;
            if !out.status.success() {
                bail!(
                    "cargo lambda invoke {}: {}",
                    file.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            serde_json::from_slice::<Value>(&out.stdout)
                .with_context(|| format!("invoke answer: {}", String::from_utf8_lossy(&out.stdout)))
        }
    };
    let events = repo_root().join("compactor/events");
    let result = async {
        let answer = invoke(events.join("sqs.json")).await?;
        assert_eq!(answer, json!({"batchItemFailures": []}));
        assert_eq!(
            final_events(&aws, &notes_schema().table, hour())
                .await?
                .len(),
            10
        );
        let answer = invoke(events.join("sweep.json")).await?;
        assert_eq!(answer["slots"], json!(["slot_lambda"]));
        let answer = invoke(events.join("scheduled.json")).await?;
        assert_eq!(answer["failures"], json!([]));
        let answer = invoke(events.join("compact.json")).await?;
        assert_eq!(answer["hours"][0]["table"], "public.users");
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let _ = function.kill().await;
    let _ = watch.kill().await;
    if result.is_err() {
        let mut err = String::new();
        if let Some(mut e) = function.stderr.take() {
            use tokio::io::AsyncReadExt;
            let _ = e.read_to_string(&mut err).await;
        }
        eprintln!("compactor stderr:\n{err}");
    }
    result
}

/// Issue 18, item 2: a table-hour that cannot be compacted (here its schema item is gone) reaches
/// the platform: a sweep invocation fails (the Lambda's Errors alarm), an SQS batch reports the
/// message naming that hour as failed and only that one (redelivered, then dead-lettered), and
/// `OldestPendingHourAge` says how long the oldest closed hour has waited.
#[tokio::test]
async fn a_poisoned_hour_fails_the_invocation_and_raises_the_oldest_pending_age(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "slot_poison").await?;
    let notes = notes_schema();
    let users = users_schema();
    stager.tx(
        at(1, 0),
        vec![Change::insert(&notes, json!({"id": 1, "body": "x"}))],
    );
    stager.tx(at(2, 0), vec![Change::insert(&users, full_row(1))]);
    stager.flush(Some(now_ms())).await?;
    // The poison: the notes table's schema item is gone.
    aws.delete_ledger_item(
        &cdc_contract::ledger::schema_pk("slot_poison", &notes.table),
        &notes.version_id(),
    )
    .await?;

    let c = compactor_with(&aws, config(&aws));
    let sweep = c.handle(json!({"action": "sweep"})).await;
    let err = sweep.expect_err("a sweep with a failed hour fails the invocation");
    assert!(err.to_string().contains("public.notes"), "{err}");
    assert!(!err.is_transient(), "a missing schema needs a person");

    let note = |table: &TableName| {
        json!({
            "slot": "slot_poison", "flush_id": "x", "commit_ms": 0, "caught_up_ms": null,
            "hours": [{"table": table.to_string(), "hour": hour().to_string()}]
        })
        .to_string()
    };
    let answer = c
        .handle(json!({"Records": [
            {"messageId": "names-the-poisoned-hour", "body": note(&notes.table)},
            {"messageId": "names-a-good-hour", "body": note(&users.table)},
        ]}))
        .await?;
    assert_eq!(
        answer,
        json!({"batchItemFailures": [{"itemIdentifier": "names-the-poisoned-hour"}]})
    );
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(report.pending_closed_hours, 1);
    let expected_age = (now_ms() - hour().end_millis()) / 1000;
    assert!(
        (report.oldest_pending_age_seconds as i64 - expected_age).abs() < 60,
        "{} vs {expected_age}",
        report.oldest_pending_age_seconds
    );

    // The binary emits it as an EMF metric line, and exits non-zero.
    let (ok, stdout, _) = run_compactor(&aws, &["sweep"], None).await?;
    assert!(!ok);
    let metric = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l.get("OldestPendingHourAge").is_some())
        .context("an OldestPendingHourAge line")?;
    assert!(metric["OldestPendingHourAge"].as_f64().unwrap_or(0.0) > 3600.0);
    Ok(())
}
