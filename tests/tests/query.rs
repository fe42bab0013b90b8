//! Querying the pipeline's output where it lands: the Glue Data Catalog tables the compactor
//! keeps (against the emulator's Glue API), and the current-state view run by DuckDB over the
//! compacted Parquet files of a real PostgreSQL workload, compared with the table itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::process::Command;

use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, TableName};
use compactor::catalog::{Catalog, GlueCatalog, TableDef};
use compactor::config::Settings;
use compactor::{Compactor, SweepRequest};
use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::CaptureSetup;
use pipeline_tests::postgres::PgCluster;
use pipeline_tests::staging::{column, now_ms, Change, ColumnExt, Stager};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn events_v1() -> TableSchema {
    TableSchema {
        table: TableName::new("public", "Events"),
        columns: vec![
            column("id", "integer", 23).key(),
            column("body", "text", 25),
            column("price", "numeric(10,2)", 1700).numeric(10, 2),
            column("at", "timestamp with time zone", 1184),
            column("tags", "text[]", 1009).array_of(25),
            column("_op", "text", 25),
        ],
    }
}

/// Commit time `minute` into `hour`, in µs.
fn at(hour: Hour, minute: i64) -> i64 {
    (hour.start_millis() + minute * 60_000) * 1000
}

async fn glue_database(aws: &AwsFixture) -> anyhow::Result<String> {
    let name = format!("cdc_{}", uuid::Uuid::new_v4().simple());
    create_database(aws, &name).await?;
    Ok(name)
}

async fn create_database(aws: &AwsFixture, name: &str) -> anyhow::Result<()> {
    aws_sdk_glue::Client::new(&aws.config)
        .create_database()
        .database_input(
            aws_sdk_glue::types::DatabaseInput::builder()
                .name(name)
                .build()?,
        )
        .send()
        .await
        .with_context(|| format!("creating Glue database {name}"))?;
    Ok(())
}

fn compactor(aws: &AwsFixture, database: &str) -> Compactor {
    let mut config = Settings::new(&aws.bucket, &aws.table);
    config.glue_database = Some(database.to_owned());
    Compactor::from_sdk(config, &aws.config)
}

async fn catalog_table(aws: &AwsFixture, database: &str, name: &str) -> anyhow::Result<TableDef> {
    let catalog = GlueCatalog::new(aws_sdk_glue::Client::new(&aws.config), database);
    Ok(catalog
        .get(name)
        .await?
        .with_context(|| format!("no catalog table {name}"))?
        .def)
}

fn columns(def: &TableDef) -> Vec<(&str, &str)> {
    def.columns
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect()
}

#[tokio::test]
async fn the_catalog_table_follows_compactions_schema_changes_and_years() -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    let db = glue_database(&aws).await?;
    let mut stager = Stager::new(&aws, "slot_catalog").await?;
    let v1 = events_v1();
    let old_hour: Hour = "2024-12-31T23".parse()?;
    let new_hour: Hour = "2025-01-08T10".parse()?;
    stager.tx(
        at(old_hour, 1),
        vec![Change::insert(
            &v1,
            json!({"id": 1, "body": "a", "price": "1.50", "at": "2024-12-31T23:01:00.000000Z", "tags": ["x"], "_op": "mine"}),
        )],
    );
    stager.flush(Some(now_ms())).await?;
    let c = compactor(&aws, &db);
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!((report.catalog_updates, report.catalog_failures), (1, 0));

    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(
        columns(&def),
        [
            ("_op", "string"),
            ("_lsn", "bigint"),
            ("_seq", "bigint"),
            ("_tx_id", "bigint"),
            ("_commit_ts", "timestamp"),
            ("_raw", "map<string,string>"),
            ("_key_before", "struct<id:int>"),
            ("id", "int"),
            ("body", "string"),
            ("price", "decimal(10,2)"),
            ("at", "timestamp"),
            ("tags", "array<string>"),
            ("_op_", "string"),
        ]
    );
    let keys: Vec<(&str, &str)> = def
        .partition_keys
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    assert_eq!(
        keys,
        [
            ("year", "int"),
            ("month", "int"),
            ("day", "int"),
            ("hour", "int")
        ]
    );
    let location = format!("s3://{}/public.Events/parquet/", aws.bucket);
    assert_eq!(def.location, location);
    let p = |k: &str| def.parameters.get(k).map(String::as_str);
    assert_eq!(p("projection.enabled"), Some("true"));
    assert_eq!(p("projection.year.range"), Some("2024,2024"));
    assert_eq!(p("projection.month.range"), Some("1,12"));
    assert_eq!(p("projection.month.digits"), Some("2"));
    assert_eq!(p("projection.day.range"), Some("1,31"));
    assert_eq!(p("projection.hour.range"), Some("0,23"));
    assert_eq!(p("projection.hour.digits"), Some("2"));
    assert_eq!(
        p("storage.location.template"),
        Some(
            format!("{location}year=${{year}}/month=${{month}}/day=${{day}}/hour=${{hour}}/")
                .as_str()
        )
    );
    assert_eq!(p("classification"), Some("parquet"));
    assert_eq!(p("cdc.source_table"), Some("public.Events"));
    assert_eq!(p("cdc.schema_id"), Some(v1.version_id().as_str()));
    // The template names a prefix the compactor really wrote.
    let written = aws.list_keys("public.Events/parquet/").await?;
    assert!(
        written
            .iter()
            .any(|k| k.starts_with("public.Events/parquet/year=2024/month=12/day=31/hour=23/")),
        "{written:?}"
    );

    // A column added, in a later hour of another year: appended, the year range grows.
    let mut v2 = v1.clone();
    v2.columns.push(column("score", "integer", 23));
    stager.tx(
        at(new_hour, 5),
        vec![Change::insert(
            &v2,
            json!({"id": 2, "body": "b", "score": 7}),
        )],
    );
    stager.flush(Some(now_ms())).await?;
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!((report.catalog_updates, report.catalog_failures), (1, 0));
    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(columns(&def).last(), Some(&("score", "int")));
    assert_eq!(def.columns.len(), 14);
    assert_eq!(
        def.parameters
            .get("projection.year.range")
            .map(String::as_str),
        Some("2024,2025")
    );
    assert_eq!(def.parameters.get("cdc.schema_id"), Some(&v2.version_id()));

    // A late batch of the old hour, written with the old version, leaves the columns alone,
    // and a fresh compactor (no memory of the table) agrees.
    stager.tx(
        at(old_hour, 30),
        vec![Change::insert(&v1, json!({"id": 3, "body": "late"}))],
    );
    stager.flush(Some(now_ms())).await?;
    let report = compactor(&aws, &db).sweep(&SweepRequest::default()).await?;
    assert_eq!(report.rows(), 1);
    assert_eq!((report.catalog_updates, report.catalog_failures), (0, 0));
    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(def.parameters.get("cdc.schema_id"), Some(&v2.version_id()));
    assert_eq!(def.columns.len(), 14);

    // A type change readers cannot widen: the table takes the latest type.
    let mut v3 = v2.clone();
    v3.columns[6] = column("score", "text", 25);
    stager.tx(
        at(new_hour, 40),
        vec![Change::insert(&v3, json!({"id": 4, "score": "high"}))],
    );
    stager.flush(Some(now_ms())).await?;
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!((report.catalog_updates, report.catalog_failures), (1, 0));
    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(columns(&def).last(), Some(&("score", "string")));
    Ok(())
}

#[tokio::test]
async fn a_failed_catalog_update_never_holds_compaction_back_and_is_tried_again(
) -> anyhow::Result<()> {
    let aws = AwsFixture::new().await?;
    // The database does not exist yet: every Glue call fails.
    let db = format!("cdc_{}", uuid::Uuid::new_v4().simple());
    let mut stager = Stager::new(&aws, "slot_catalog_down").await?;
    let v1 = events_v1();
    let hour: Hour = "2025-01-08T10".parse()?;
    stager.tx(
        at(hour, 1),
        vec![Change::insert(&v1, json!({"id": 1, "body": "a"}))],
    );
    stager.flush(Some(now_ms())).await?;
    let c = compactor(&aws, &db);
    let report = c.sweep(&SweepRequest::default()).await?;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert_eq!(report.rows(), 1, "the hour was compacted");
    assert_eq!(report.hours[0].state, compactor::HourState::Done);
    assert_eq!((report.catalog_updates, report.catalog_failures), (0, 1));

    // Once the catalog answers, the next sweep (with nothing new to compact) catches up.
    create_database(&aws, &db).await?;
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(report.rows(), 0);
    assert_eq!((report.catalog_updates, report.catalog_failures), (1, 0));
    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(def.parameters.get("cdc.schema_id"), Some(&v1.version_id()));

    // A second source table whose name maps to the same catalog name is refused, not
    // written over.
    let mut other = events_v1();
    other.table = TableName::new("public", "events");
    stager.tx(
        at(hour, 2),
        vec![Change::insert(&other, json!({"id": 1, "body": "x"}))],
    );
    stager.flush(Some(now_ms())).await?;
    let report = c.sweep(&SweepRequest::default()).await?;
    assert_eq!(report.rows(), 1);
    assert_eq!((report.catalog_updates, report.catalog_failures), (0, 1));
    let def = catalog_table(&aws, &db, "public__events").await?;
    assert_eq!(
        def.parameters.get("cdc.source_table").map(String::as_str),
        Some("public.Events")
    );
    Ok(())
}

/// Runs the DuckDB view over the local Parquet tree and prints the view's rows as JSON: values
/// in forms comparable with PostgreSQL's text (decimals as text, timestamps as epoch µs, JSON
/// parsed), `_raw` restored into typed columns that are null.
const RUN_VIEW: &str = r#"
import os, sys, json, duckdb
sql_path, dialect, root = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect()
sql = open(sql_path).read()
if dialect == "athena":
    import re, sqlglot
    # The whole statement parses as Trino SQL (anything outside Trino's grammar fails here).
    sqlglot.parse_one(sql, read="trino")
    # sqlglot has no DuckDB form of Trino's map_filter: the one call is taken out before the
    # statement is translated and run (it only drops TOAST placeholders from _raw).
    sql, n = re.subn(r"map_filter\(_raw, \(k, v\) -> v <> '[a-z_]+'\)", "_raw", sql)
    assert n == 1, sql
    sql = sqlglot.transpile(sql, read="trino", write="duckdb", unsupported_level=sqlglot.ErrorLevel.RAISE)[0]
    con.execute("CREATE SCHEMA cdc_glue")
    con.execute(f"CREATE VIEW cdc_glue.public__items AS SELECT * FROM read_parquet('{root}/year=*/month=*/day=*/hour=*/*.parquet', hive_partitioning = true, union_by_name = true)")
    view = "cdc_glue.public__items_current"
else:
    view = "public__items_current"
con.execute(sql)
rel = con.sql(f'SELECT id, name, CAST(amount AS VARCHAR) AS amount, _raw[\'amount\'] AS amount_raw, doc, epoch_us("at") AS at_us, big, extra FROM {view} ORDER BY id')
rows = []
for r in rel.fetchall():
    row = dict(zip(rel.columns, r))
    if row["amount"] is None: row["amount"] = row["amount_raw"]
    del row["amount_raw"]
    row["doc"] = None if row["doc"] is None else json.loads(row["doc"])
    rows.append(row)
print(json.dumps(rows))
sys.stdout.flush()
os._exit(0)
"#;

/// Prints the view of `public.items` with `compactor view --dialect {dialect}` and runs it
/// over the Parquet tree at `root` (RUN_VIEW); its rows.
async fn run_view(
    setup: &CaptureSetup<'_>,
    root: &Path,
    dialect: &str,
) -> anyhow::Result<Vec<Value>> {
    let out = Command::new(pipeline_tests::bins::bin_path("compactor")?)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(setup.aws.env())
        .env("CDC_SLOT_NAME", &setup.slot)
        .env("GLUE_DATABASE", "cdc_glue")
        .args(["view", "--table", "public.items", "--dialect", dialect])
        .arg("--root")
        .arg(root)
        .stdin(Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!("compactor view: {}", String::from_utf8_lossy(&out.stderr));
    }
    let sql_path = root.join(format!("../{dialect}.sql"));
    std::fs::write(&sql_path, &out.stdout)?;
    let python = repo_root().join(".venv/bin/python");
    let run = std::process::Command::new(&python)
        .arg("-c")
        .arg(RUN_VIEW)
        .arg(&sql_path)
        .arg(dialect)
        .arg(root)
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !run.status.success() {
        bail!(
            "the {dialect} view failed in DuckDB: {}\n{}",
            String::from_utf8_lossy(&run.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    serde_json::from_slice(&run.stdout).context("the view's rows")
}

/// The table's rows in the same forms.
async fn table_rows(pg: &PgCluster, db: &str) -> anyhow::Result<Vec<Value>> {
    let client = pg.connect(db).await?;
    let rows = client
        .query(
            "SELECT json_build_object('id', id, 'name', name, 'amount', amount::text, \
             'doc', doc, 'at_us', (extract(epoch FROM at) * 1000000)::bigint, 'big', big, \
             'extra', extra)::text FROM items ORDER BY id",
            &[],
        )
        .await?;
    rows.iter()
        .map(|r| serde_json::from_str(r.get::<_, &str>(0)).context("row JSON"))
        .collect()
}

#[tokio::test]
async fn the_current_state_view_in_duckdb_equals_the_table() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database("view").await?;
    pg.execute(
        &db,
        "CREATE TABLE items (id int PRIMARY KEY, name text, amount numeric(12,2), doc jsonb, \
         at timestamptz, big text);
         ALTER TABLE items ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await?;
    let setup = CaptureSetup::new(&pg, &db, &aws);
    setup.create_publication_and_slot().await?;
    let big = |seed: i64| -> String {
        (0..3000)
            .map(|i| format!("{:x}", (seed * 7919 + i) % 4093))
            .collect()
    };
    // Rows that a truncate then wipes.
    pg.execute(
        &db,
        "INSERT INTO items SELECT g, 'gone', 1, '{}', now(), NULL FROM generate_series(1, 20) g;
         TRUNCATE items;",
    )
    .await?;
    // Inserts, some with large (out-of-line) values.
    for id in 1..=60i64 {
        let b = if id % 3 == 0 {
            format!("'{}'", big(id))
        } else {
            "NULL".into()
        };
        pg.execute(
            &db,
            &format!(
                "INSERT INTO items VALUES ({id}, 'n{id}', {id}.25, '{{\"k\": {id}, \"a\": [1, \"x\"]}}', \
                 '2025-01-08 10:00:00+00'::timestamptz + interval '{id} seconds', {b})"
            ),
        )
        .await?;
    }
    // Updates that leave the large value unchanged (the stream carries a placeholder).
    pg.execute(
        &db,
        "UPDATE items SET name = name || '-u', amount = amount + 1 WHERE id % 3 = 0",
    )
    .await?;
    // A second update of some of them, still without touching it.
    pg.execute(
        &db,
        "UPDATE items SET doc = '{\"second\": true}' WHERE id % 6 = 0",
    )
    .await?;
    // Key changes (rows without a large value), one moved twice.
    pg.execute(
        &db,
        "UPDATE items SET id = id + 1000 WHERE id IN (1, 2, 4, 5)",
    )
    .await?;
    pg.execute(
        &db,
        "UPDATE items SET id = 2000, name = 'moved twice' WHERE id = 1001",
    )
    .await?;
    // A key freed by a move is used again.
    pg.execute(
        &db,
        "INSERT INTO items VALUES (1, 'reused', 0, NULL, NULL, NULL)",
    )
    .await?;
    // Deletes, one of a key that had moved, and a delete then re-insert.
    pg.execute(&db, "DELETE FROM items WHERE id IN (7, 8, 1002, 9)")
        .await?;
    pg.execute(
        &db,
        "INSERT INTO items VALUES (9, 'back', 9, NULL, NULL, NULL)",
    )
    .await?;
    // Values the typed column cannot hold.
    pg.execute(&db, "UPDATE items SET amount = 'NaN' WHERE id = 10")
        .await?;
    // A schema change, then writes under the new version.
    pg.execute(&db, "ALTER TABLE items ADD COLUMN extra int")
        .await?;
    pg.execute(&db, "UPDATE items SET extra = id * 2 WHERE id % 4 = 0")
        .await?;
    pg.execute(
        &db,
        "INSERT INTO items VALUES (500, 'late', 5, '[]', now(), NULL, 1)",
    )
    .await?;
    // The large value changes for one row, stays for the others.
    pg.execute(
        &db,
        &format!("UPDATE items SET big = '{}' WHERE id = 12", big(99)),
    )
    .await?;

    setup.run_until_caught_up(Duration::from_secs(120)).await?;
    setup.compact_and_verify(&["public.items"]).await?;

    // The compacted files, as a user would download them, and the view the compactor writes.
    let dir = tempfile::tempdir()?;
    let prefix = "public.items/parquet/";
    for key in aws.list_keys(prefix).await? {
        let path = dir.path().join(&key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, aws.get_bytes(&key).await?)?;
    }
    let root = dir.path().join(prefix);
    let viewed = run_view(&setup, &root, "duckdb").await?;
    // The Athena statement, parsed as Trino SQL and translated to DuckDB's by sqlglot, over the
    // same files registered as the catalog table.
    let athena = run_view(&setup, &root, "athena").await?;
    let actual = table_rows(&pg, &db).await?;
    assert_eq!(
        athena, viewed,
        "the Athena view's rows are the DuckDB view's"
    );
    let by_id = |rows: &[Value]| -> BTreeMap<i64, Value> {
        rows.iter()
            .map(|r| (r["id"].as_i64().unwrap_or(-1), r.clone()))
            .collect()
    };
    let (viewed, actual) = (by_id(&viewed), by_id(&actual));
    assert_eq!(
        viewed.keys().collect::<Vec<_>>(),
        actual.keys().collect::<Vec<_>>(),
        "the view's keys are the table's"
    );
    for (id, row) in &actual {
        assert_eq!(&viewed[id], row, "row {id}");
    }
    // The workload did reach the paths the view handles.
    assert!(actual.contains_key(&2000) && !actual.contains_key(&1001));
    assert!(actual[&12]["big"].as_str().is_some_and(|b| b.len() > 1000));
    assert_eq!(actual[&10]["amount"], "NaN");
    Ok(())
}
