//! Avro final files and zstd-compressed JSONL parts, from a real PostgreSQL workload: the Avro
//! parts read back with fastavro (an independent reader) hold the Parquet parts' rows value for
//! value, under each codec, and `cdc-verify` checks both outputs clean.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::CaptureSetup;
use pipeline_tests::postgres::PgCluster;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Reads every Avro part under `root/avro` with fastavro and its Parquet twin (same name,
/// `.parquet`) with pyarrow, and compares them row for row and column for column (Avro
/// names map back to the PostgreSQL names through `cdc.column`). Prints a JSON summary.
const COMPARE: &str = r#"
import datetime, decimal, glob, json, os, sys, uuid
import fastavro, pyarrow.parquet as pq
root = sys.argv[1]
summary = {"parts": [], "rows": 0, "raw": {}, "key_moves": 0, "uuids": 0, "decimals": 0}

def norm(v):
    if isinstance(v, uuid.UUID):
        return str(v)
    if isinstance(v, decimal.Decimal):
        return ("decimal", str(v))
    if isinstance(v, datetime.datetime):
        return ("datetime", v.isoformat())
    if isinstance(v, (datetime.date, datetime.time)):
        return (type(v).__name__, v.isoformat())
    if isinstance(v, dict):
        return {k: norm(x) for k, x in v.items()}
    if isinstance(v, list):
        if all(isinstance(x, tuple) and len(x) == 2 for x in v) and v:
            return {k: norm(x) for k, x in v}
        return [norm(x) for x in v]
    return v

for path in sorted(glob.glob(f"{root}/avro/**/*.avro", recursive=True)):
    twin = path.replace("/avro/", "/parquet/").removesuffix(".avro") + ".parquet"
    with open(path, "rb") as f:
        reader = fastavro.reader(f)
        schema = reader.writer_schema
        meta = reader.metadata
        records = list(reader)
    names = {f["name"]: f.get("cdc.column", f["name"]) for f in schema["fields"]}
    table = pq.read_table(twin)
    expected = table.to_pylist()
    assert len(records) == len(expected), (path, len(records), len(expected))
    for i, (a, p) in enumerate(zip(records, expected)):
        a = {names[k]: norm(v) for k, v in a.items()}
        p = {k: norm(v) for k, v in p.items()}
        # Parquet's _raw is an empty map where nothing was kept; Avro's null.
        for row in (a, p):
            if row.get("_raw") == {}:
                row["_raw"] = None
        assert a == p, f"{path} row {i}:\n avro    {a}\n parquet {p}"
        for k, v in (a.get("_raw") or {}).items():
            summary["raw"][k] = v
        if a.get("_key_before") is not None:
            summary["key_moves"] += 1
        if isinstance(a.get("u"), str):
            summary["uuids"] += 1
        if isinstance(a.get("amount"), tuple):
            summary["decimals"] += 1
    types = {f["name"]: f["type"] for f in schema["fields"]}
    summary["parts"].append({
        "key": os.path.relpath(path, root),
        "codec": reader.codec,
        "table": meta.get("cdc.table"),
        "schema_id": meta.get("cdc.schema_id"),
        "rows": len(records),
        "types": types,
    })
    summary["rows"] += len(records)
print(json.dumps(summary))
"#;

/// Downloads `prefix` (every format of one table) into a temporary directory.
async fn download(aws: &AwsFixture, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for key in aws.list_keys(prefix).await? {
        let path = dir.path().join(&key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, aws.get_bytes(&key).await?)?;
    }
    Ok(dir)
}

fn compare(root: &Path) -> anyhow::Result<Value> {
    let python = repo_root().join(".venv/bin/python");
    let run = std::process::Command::new(&python)
        .arg("-c")
        .arg(COMPARE)
        .arg(root)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !run.status.success() {
        bail!(
            "the Avro parts differ from the Parquet parts: {}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    serde_json::from_slice(&run.stdout).context("the comparison's summary")
}

fn set_env(setup: &mut CaptureSetup<'_>, name: &str, value: &str) {
    setup.env.retain(|(k, _)| k != name);
    setup.env.push((name.into(), value.into()));
}

#[tokio::test]
async fn avro_parts_of_a_real_workload_read_back_with_fastavro_as_the_parquet_rows(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database("avro").await?;
    pg.execute(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, u uuid, amount numeric(12,2), \
         at timestamptz, local_at timestamp, d date, t time, doc jsonb, note text, \
         big text, small int2, tags text[], \"Odd Name\" text);
         ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await?;
    let mut setup = CaptureSetup::new(&pg, &db, &aws);
    setup.create_publication_and_slot().await?;
    set_env(&mut setup, "OUTPUT_FORMATS", "jsonl,parquet,avro");
    let big: String = (0..4000)
        .map(|i| format!("{:x}", (i * 7919) % 4093))
        .collect();

    // Three rounds of changes, each compacted with another codec: the later rounds become
    // additional parts of the same (open) hour.
    let rounds: [(&str, String); 3] = [
        (
            "deflate",
            format!(
                "INSERT INTO items SELECT g, ('a0eebc99-9c0b-4ef8-bb6d-' || lpad(to_hex(g), 12, '0'))::uuid, \
                 g + 0.25, '2025-01-08 10:00:00.123456+00'::timestamptz + g * interval '1 second', \
                 '2025-01-08 10:00:00.5'::timestamp - g * interval '1 day', date '2025-01-08' + g, \
                 time '10:30:00.25' + g * interval '1 minute', ('{{\"k\": ' || g || ', \"a\": [1, \"x\"]}}')::jsonb, \
                 'n' || g, CASE WHEN g % 3 = 0 THEN '{big}' END, (g - 20)::int2, ARRAY['x', NULL, 'y' || g], \
                 CASE WHEN g % 2 = 0 THEN 'odd ' || g END \
                 FROM generate_series(1, 40) g;
                 INSERT INTO items (id) VALUES (100);"
            ),
        ),
        (
            "snappy",
            // Updates leaving the large value unchanged (TOAST placeholder to _raw), NaN.
            "UPDATE items SET note = note || '-u', amount = amount + 1 WHERE id % 3 = 0;
             UPDATE items SET amount = 'NaN' WHERE id = 10;
             UPDATE items SET u = NULL, at = NULL, d = NULL WHERE id = 11;"
                .into(),
        ),
        (
            "zstd",
            // Key changes and deletes.
            "UPDATE items SET id = id + 1000 WHERE id IN (1, 2);
             DELETE FROM items WHERE id IN (4, 1002);"
                .into(),
        ),
    ];
    for (codec, sql) in &rounds {
        pg.execute(&db, sql).await?;
        setup.run_until_caught_up(Duration::from_secs(120)).await?;
        set_env(&mut setup, "AVRO_CODEC", codec);
        setup.compact(10).await?;
    }
    let v = setup.verify(&["public.items"], &[]).await?;
    if v.code != 0 {
        bail!(
            "cdc-verify exited {}: {}\n{}",
            v.code,
            serde_json::to_string_pretty(&v.reports)?,
            v.stderr
        );
    }

    let dir = download(&aws, "public.items/").await?;
    let summary = compare(&dir.path().join("public.items"))?;
    let parts = summary["parts"].as_array().context("parts")?;
    // 41 inserts, 13 + 1 + 1 updates, 2 key moves, 2 deletes.
    assert_eq!(summary["rows"], 60, "{summary}");
    let mut codecs: Vec<&str> = parts.iter().filter_map(|p| p["codec"].as_str()).collect();
    codecs.sort();
    assert_eq!(codecs, ["deflate", "snappy", "zstandard"], "{summary}");
    for p in parts {
        assert_eq!(p["table"], "public.items");
        assert!(p["schema_id"].as_str().is_some_and(|s| !s.is_empty()));
        let types = &p["types"];
        assert_eq!(types["u"][1]["logicalType"], "uuid");
        assert_eq!(types["amount"][1]["logicalType"], "decimal");
        assert_eq!(types["amount"][1]["scale"], 2);
        assert_eq!(types["at"][1]["logicalType"], "timestamp-micros");
        assert_eq!(
            types["local_at"][1]["logicalType"],
            "local-timestamp-micros"
        );
        assert_eq!(types["d"][1]["logicalType"], "date");
        assert_eq!(types["t"][1]["logicalType"], "time-micros");
        assert_eq!(types["_commit_ts"]["logicalType"], "timestamp-micros");
        assert_eq!(types["_raw"][1]["type"], "map");
        assert_eq!(types["_key_before"][1]["type"], "record");
        assert!(types.get("Odd_Name").is_some(), "{types}");
    }
    assert_eq!(summary["raw"]["amount"], "NaN", "{summary}");
    assert_eq!(
        summary["raw"]["big"], "__debezium_unavailable_value",
        "{summary}"
    );
    assert_eq!(summary["key_moves"], 2, "{summary}");
    assert!(summary["uuids"].as_u64().is_some_and(|n| n >= 40));
    assert!(summary["decimals"].as_u64().is_some_and(|n| n >= 50));

    // Each hour's Avro manifest lists the recorded parts.
    let manifests = aws.list_keys("public.items/avro/").await?;
    let manifest = manifests
        .iter()
        .find(|k| k.ends_with("/_manifest.json"))
        .context("no Avro manifest")?;
    let m: Value = serde_json::from_slice(&aws.get_bytes(manifest).await?)?;
    let listed = m["parts"].as_array().context("manifest parts")?;
    assert_eq!(listed.len(), 3, "{m}");
    assert!(listed
        .iter()
        .all(|p| p["key"].as_str().is_some_and(|k| k.ends_with(".avro"))));
    Ok(())
}

#[tokio::test]
async fn zstd_jsonl_parts_are_named_listed_readable_and_verified() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database("zstd").await?;
    pg.execute(&db, "CREATE TABLE notes (id int PRIMARY KEY, body text);")
        .await?;
    let mut setup = CaptureSetup::new(&pg, &db, &aws);
    setup.create_publication_and_slot().await?;
    pg.execute(
        &db,
        "INSERT INTO notes SELECT g, repeat('y', g) FROM generate_series(1, 80) g;
         UPDATE notes SET body = 'changed' WHERE id % 10 = 0;
         DELETE FROM notes WHERE id = 7;",
    )
    .await?;
    set_env(&mut setup, "OUTPUT_FORMATS", "jsonl");
    set_env(&mut setup, "JSONL_COMPRESSION", "zstd");
    setup.run_until_caught_up(Duration::from_secs(120)).await?;
    setup.compact_and_verify(&["public.notes"]).await?;

    let keys = aws.list_keys("public.notes/").await?;
    let parts: Vec<&String> = keys
        .iter()
        .filter(|k| !k.ends_with("/_manifest.json"))
        .collect();
    assert!(!parts.is_empty());
    assert!(
        parts
            .iter()
            .all(|k| k.starts_with("public.notes/jsonl/") && k.ends_with(".jsonl.zst")),
        "{keys:?}"
    );
    let mut rows = 0;
    for key in &parts {
        let bytes = aws.get_bytes(key).await?;
        assert_eq!(
            &bytes[..4],
            &[0x28, 0xb5, 0x2f, 0xfd],
            "{key} is a zstd frame"
        );
        let events = aws.read_jsonl_gz(key).await?;
        assert!(events.iter().all(|e| e["source"]["table"] == "notes"));
        rows += events.len();
    }
    let manifest = keys
        .iter()
        .find(|k| k.ends_with("/_manifest.json"))
        .context("no manifest")?;
    let m: Value = serde_json::from_slice(&aws.get_bytes(manifest).await?)?;
    let listed: Vec<&str> = m["parts"]
        .as_array()
        .context("manifest parts")?
        .iter()
        .filter_map(|p| p["key"].as_str())
        .collect();
    let mut expected: Vec<&str> = parts.iter().map(|k| k.as_str()).collect();
    expected.sort();
    let mut listed_sorted = listed.clone();
    listed_sorted.sort();
    assert_eq!(listed_sorted, expected);
    let manifest_rows: u64 = m["parts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["rows"].as_u64())
        .sum();
    assert_eq!(manifest_rows as usize, rows);
    // 80 inserts, 8 updates, 1 delete.
    assert_eq!(rows, 80 + 8 + 1, "{rows} changes");
    Ok(())
}
