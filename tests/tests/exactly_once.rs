//! The exactly-once holes of issue 15, each driven by its scenario against a throwaway
//! PostgreSQL, the AWS emulator and the real binaries. Every test names its item.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::CaptureSetup;
use pipeline_tests::pgproxy::PgProxy;
use pipeline_tests::postgres::PgCluster;
use pipeline_tests::wait_for;

const CAUGHT_UP: Duration = Duration::from_secs(90);

async fn setup(pg: &PgCluster, schema_sql: &str) -> anyhow::Result<String> {
    let db = pg.create_database("eo").await?;
    pg.execute(&db, schema_sql).await?;
    Ok(db)
}

/// A database whose table `t` holds rows 1..=`rows` (about 60 bytes each) and a publication for
/// all tables, with no slot yet: the first capture creates the slot and snapshots them.
async fn rows_before_any_slot(pg: &PgCluster, rows: u32) -> anyhow::Result<String> {
    setup(
        pg,
        &format!(
            "CREATE TABLE t (id int PRIMARY KEY, v text);
             INSERT INTO t SELECT g, repeat('x', 50) FROM generate_series(1, {rows}) g;
             CREATE PUBLICATION pub_all FOR ALL TABLES;"
        ),
    )
    .await
}

fn ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| {
            e["after"]["id"]
                .as_i64()
                .or_else(|| e["before"]["id"].as_i64())
                .unwrap_or(-1)
        })
        .collect()
}

/// Ends the slot's walsender, as a network cut or a server-side timeout would.
async fn terminate_walsender(pg: &PgCluster, db: &str, slot: &str) -> anyhow::Result<()> {
    let client = pg.connect(db).await?;
    wait_for("the slot's walsender", Duration::from_secs(30), || async {
        let row = client
            .query_one(
                "SELECT count(pg_terminate_backend(active_pid)) FROM pg_replication_slots \
                 WHERE slot_name = $1 AND active_pid IS NOT NULL",
                &[&slot],
            )
            .await?;
        Ok((row.get::<_, i64>(0) > 0).then_some(()))
    })
    .await
}

/// Issue 15, item 1: tables with identical columns share a schema version id; each still gets
/// its own schema item, so every table-hour compacts.
#[tokio::test]
async fn tables_with_identical_columns_each_get_their_schema_and_compact() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let tables: Vec<String> = (0..6).map(|i| format!("tenant_{i}")).collect();
    let mut ddl = String::new();
    let mut insert = String::from("BEGIN;");
    let mut update = String::from("BEGIN;");
    for t in &tables {
        ddl.push_str(&format!("CREATE TABLE {t} (id int PRIMARY KEY, v text);"));
        insert.push_str(&format!("INSERT INTO {t} VALUES (1, 'a'), (2, 'b');"));
        update.push_str(&format!("UPDATE {t} SET v = 'c' WHERE id = 1;"));
    }
    insert.push_str("COMMIT;");
    update.push_str("COMMIT;");
    let db = setup(&pg, &ddl).await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, &insert).await?;
    pg.execute(&db, &update).await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;

    for t in &tables {
        let items = aws
            .query_ledger(&cdc_contract::ledger::schema_pk(
                &cap.slot,
                &format!("public.{t}").parse()?,
            ))
            .await?;
        assert_eq!(items.len(), 1, "public.{t} has its schema item");
    }
    let names: Vec<String> = tables.iter().map(|t| format!("public.{t}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    cap.compact_and_verify(&names).await?;
    Ok(())
}

/// Issue 15, item 2: changes buffered when the stream breaks are discarded and sent again from
/// the checkpoint. A heartbeat due while the new stream has not resent them yet (the server
/// decoding first, here a proxy holding its bytes for 3 s) must not record a checkpoint past
/// them: 10 of 10 rows were confirmed away and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_changes_survive_a_reconnect_whose_stream_resumes_late() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    let proxy = PgProxy::start(pg.port).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.extend([
        ("POSTGRES_PORT".into(), proxy.port.to_string()),
        ("FLUSH_INTERVAL_MS".into(), "60000".into()),
        ("HEARTBEAT_INTERVAL_MS".into(), "1000".into()),
    ]);
    cap.create_publication_and_slot().await?;
    let child = cap.spawn(&[])?;
    // Streaming, idle: heartbeats are recorded.
    wait_for("a first heartbeat", Duration::from_secs(60), || async {
        Ok(cap.checkpoint().await?.filter(|c| c.flush_seq > 1))
    })
    .await
    .with_context(|| cap.log())?;

    pg.execute(
        &db,
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 10) g",
    )
    .await?;
    // The capture receives and buffers them (the flush interval is a minute).
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.hold_next_stream(Duration::from_secs(3));
    terminate_walsender(&pg, &db, &cap.slot).await?;
    wait_for("the held reconnect", Duration::from_secs(30), || async {
        Ok((proxy.streams_held() > 0).then_some(()))
    })
    .await
    .with_context(|| cap.log())?;
    // Heartbeats are due during the hold; then the resent rows arrive.
    tokio::time::sleep(Duration::from_secs(5)).await;
    cap.stop(child, Duration::from_secs(60)).await?;

    let events = cap.recorded_events("public.t").await?;
    assert_eq!(ids(&events), (1..=10).collect::<Vec<_>>(), "{}", cap.log());
    // And nothing is confirmed past what the ledger holds: a fresh run records nothing new.
    cap.env.truncate(cap.env.len() - 3);
    cap.run_until_caught_up(CAUGHT_UP).await?;
    assert_eq!(ids(&cap.recorded_events("public.t").await?).len(), 10);
    Ok(())
}

/// Issue 15, item 14: a heartbeat while the stream is stalled (the server still decoding, here
/// a proxy holding its bytes) must not claim the capture caught up: a recorded checkpoint's
/// caught-up time never passes the commit time of a change it does not cover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_never_records_a_caught_up_time_past_a_missing_change(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    let proxy = PgProxy::start(pg.port).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.extend([
        ("POSTGRES_PORT".into(), proxy.port.to_string()),
        ("HEARTBEAT_INTERVAL_MS".into(), "500".into()),
    ]);
    cap.create_publication_and_slot().await?;
    let child = cap.spawn(&[])?;
    wait_for("a first heartbeat", Duration::from_secs(60), || async {
        Ok(cap.checkpoint().await?.filter(|c| c.caught_up_ms.is_some()))
    })
    .await
    .with_context(|| cap.log())?;

    // The stream breaks and comes back stalled for 4 s; a row commits during the stall.
    proxy.hold_next_stream(Duration::from_secs(4));
    terminate_walsender(&pg, &db, &cap.slot).await?;
    wait_for("the held reconnect", Duration::from_secs(30), || async {
        Ok((proxy.streams_held() > 0).then_some(()))
    })
    .await?;
    let client = pg.connect(&db).await?;
    let row = client
        .query_one(
            "WITH i AS (INSERT INTO t VALUES (1, 'x') RETURNING 1) \
             SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8, pg_current_wal_lsn()::text FROM i",
            &[],
        )
        .await?;
    let committed_after_ms: i64 = row.get(0);
    let insert_lsn: cdc_contract::Lsn = row.get::<_, String>(1).parse()?;
    // Watch every checkpoint recorded until the row is in.
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let cp = cap.checkpoint().await?.context("checkpoint")?;
        let done = cp.lsn > insert_lsn;
        seen.push(cp);
        if done {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the row was not recorded: {}",
            cap.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cap.stop(child, Duration::from_secs(60)).await?;
    for cp in &seen {
        if cp.lsn <= insert_lsn {
            assert!(
                cp.caught_up_ms.unwrap_or(0) < committed_after_ms,
                "checkpoint at {} (before the row) claims caught up at {:?}, after the row's commit at ~{committed_after_ms}",
                cp.lsn,
                cp.caught_up_ms
            );
        }
    }
    assert_eq!(ids(&cap.recorded_events("public.t").await?), vec![1]);
    Ok(())
}

/// Issue 15, item 7: a LATIN1 database's text reaches staging as the same UTF-8 whether it was
/// read by the snapshot or streamed.
#[tokio::test]
async fn a_latin1_database_streams_the_same_text_as_its_snapshot() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = pipeline_tests::unique_name("latin");
    pg.execute(
        "postgres",
        &format!(
            "CREATE DATABASE {db} ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        ),
    )
    .await?;
    pg.execute(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY, v text, j jsonb);
         INSERT INTO t VALUES (1, 'café', '{\"k\": \"é\"}');
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    // The first run creates the slot and snapshots row 1.
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(
        &db,
        "UPDATE t SET v = v || ' crème' WHERE id = 1;
         INSERT INTO t VALUES (2, 'é', '{\"é\": [\"ü\"]}');",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    let ops: Vec<&str> = events.iter().filter_map(|e| e["op"].as_str()).collect();
    assert_eq!(ops, ["r", "u", "c"]);
    assert_eq!(events[0]["after"]["v"], "café");
    assert_eq!(events[0]["after"]["j"], json!({"k": "é"}));
    assert_eq!(events[1]["after"]["v"], "café crème");
    assert_eq!(events[1]["after"]["j"], json!({"k": "é"}));
    assert_eq!(events[2]["after"]["v"], "é");
    assert_eq!(events[2]["after"]["j"], json!({"é": ["ü"]}));
    cap.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

/// Issue 15, item 9: under REPLICA IDENTITY FULL an update that leaves a TOASTed value
/// unchanged still carries the value (the old row has it); DEFAULT keeps the placeholder.
#[tokio::test]
async fn unchanged_toast_values_are_written_under_replica_identity_full() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE full_t (id int PRIMARY KEY, n int, big text);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         ALTER TABLE full_t ALTER COLUMN big SET STORAGE EXTERNAL;
         CREATE TABLE default_t (id int PRIMARY KEY, n int, big text);
         ALTER TABLE default_t ALTER COLUMN big SET STORAGE EXTERNAL;",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    // Large and incompressible enough to be stored out of line.
    let big: String = (0..12_000)
        .map(|i| char::from(b'a' + ((i * 7919 + i / 13) % 26) as u8))
        .collect();
    for t in ["full_t", "default_t"] {
        pg.execute(&db, &format!("INSERT INTO {t} VALUES (1, 0, '{big}')"))
            .await?;
        pg.execute(&db, &format!("UPDATE {t} SET n = 1 WHERE id = 1"))
            .await?;
    }
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let full = cap.recorded_events("public.full_t").await?;
    assert_eq!(full.len(), 2);
    assert_eq!(full[1]["op"], "u");
    assert_eq!(full[1]["after"]["n"], 1);
    assert_eq!(full[1]["after"]["big"].as_str(), Some(big.as_str()));
    assert_eq!(full[1]["before"]["big"].as_str(), Some(big.as_str()));
    let default = cap.recorded_events("public.default_t").await?;
    assert_eq!(
        default[1]["after"]["big"],
        cdc_contract::event::UNAVAILABLE_VALUE,
        "without the old row the value is unknown: the placeholder stays"
    );
    cap.compact_and_verify(&["public.full_t"]).await?;
    Ok(())
}

/// Issue 15, item 10: `box[]` separates its elements with `;`, streamed and in the snapshot.
#[tokio::test]
async fn arrays_of_box_keep_their_elements_whole() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, b box[]);
         INSERT INTO t VALUES (1, ARRAY[box '((0,0),(1,1))', box '((2,2),(3,3))']);
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(
        &db,
        "INSERT INTO t VALUES (2, ARRAY[box '((5,5),(4,4))', NULL])",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(events.len(), 2);
    assert_eq!(
        events[0]["after"]["b"],
        json!(["(1,1),(0,0)", "(3,3),(2,2)"])
    );
    assert_eq!(events[1]["after"]["b"], json!(["(5,5),(4,4)", null]));
    assert!(events.iter().all(|e| e.get("raw_columns").is_none()));
    cap.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

/// While a write loop inserts as fast as it can, the capture backfills the table: every order
/// key is recorded once, no snapshot row shares a commit LSN with a streamed change, and each
/// snapshot row's commit LSN is its chunk's watermark (`source.lsn`).
#[tokio::test]
async fn snapshot_keys_never_collide_with_streamed_keys() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id bigserial PRIMARY KEY, v int);
         INSERT INTO t (v) SELECT g FROM generate_series(1, 5000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let stop_writes = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let client = pg.connect(&db).await?;
        let stop_writes = stop_writes.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop_writes.load(std::sync::atomic::Ordering::Relaxed) {
                client.batch_execute("INSERT INTO t (v) VALUES (0)").await?;
                n += 1;
            }
            anyhow::Ok(n)
        })
    };
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "16384".into()));
    let child = cap.spawn(&[])?;
    wait_for("the backfill recorded", Duration::from_secs(90), || async {
        Ok(cap.log().contains("backfill complete").then_some(()))
    })
    .await
    .with_context(|| cap.log())?;
    stop_writes.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await??;
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;

    // Recorded events come back in order key order, each key once (checked by the reader).
    let events = cap.recorded_events("public.t").await?;
    let streamed: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| e["op"] != "r")
        .filter_map(|e| e["source"]["commit_lsn"].as_u64())
        .collect();
    let reads: Vec<&Value> = events.iter().filter(|e| e["op"] == "r").collect();
    assert!(written > 10 && !streamed.is_empty(), "{written} inserts");
    assert!(!reads.is_empty());
    for read in &reads {
        let lsn = read["source"]["commit_lsn"]
            .as_u64()
            .context("commit_lsn")?;
        assert!(
            !streamed.contains(&lsn),
            "a snapshot row shares commit LSN {lsn}"
        );
        assert_eq!(read["source"]["lsn"].as_u64(), Some(lsn));
    }
    cap.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

/// The capture killed at random steps of taking its initial snapshot (after asking for it,
/// after creating the slot, after uploading a chunk's batches, after recording them), with the
/// compactor running in between: every row arrives once, and the next change after it.
#[tokio::test]
async fn a_snapshot_survives_a_crash_at_every_step_of_taking_it() -> anyhow::Result<()> {
    use std::os::unix::process::ExitStatusExt;
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = rows_before_any_slot(&pg, 3000).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_MAX_BYTES".into(), "65536".into()));
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "16384".into()));

    // CDC_TEST_SEED replays a schedule a failure named.
    let seed = match std::env::var("CDC_TEST_SEED") {
        Ok(s) => s.parse()?,
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos() as u64,
    };
    let mut rng = seed;
    let mut next = move |n: usize| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((rng >> 33) as usize) % n
    };
    let mut slot_exists = false;
    let mut schedule = Vec::new();
    for _ in 0..4 {
        let choices: &[&str] = if slot_exists {
            &["after_upload", "after_record"]
        } else {
            &[
                "after_backfill_requested",
                "after_slot_created",
                "after_record",
            ]
        };
        let point = choices[next(choices.len())];
        schedule.push(point);
        cap.env.push(("CDC_TEST_CRASH_AT".into(), point.into()));
        let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
        cap.env.pop();
        if slot_exists && out.status.success() {
            // The backfill was recorded whole before this run: nothing was left to upload or
            // record, and the run caught up.
            break;
        }
        assert_eq!(
            out.status.signal(),
            Some(6),
            "seed {seed}, schedule {schedule:?}: the capture did not die at {point}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        slot_exists = point != "after_backfill_requested";
        // The compactor may run at any time meanwhile.
        let sweep = cap.compactor_command()?.output().await?;
        assert!(
            sweep.status.success(),
            "{}",
            String::from_utf8_lossy(&sweep.stderr)
        );
    }
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| format!("seed {seed}, schedule {schedule:?}"))?;
    pg.execute(&db, "INSERT INTO t VALUES (3001, 'after')")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(
        ids(&events),
        (1..=3001).collect::<Vec<_>>(),
        "seed {seed}, schedule {schedule:?}"
    );
    assert_eq!(events.iter().filter(|e| e["op"] == "r").count(), 3000);
    let reports = cap.compact_and_verify(&["public.t"]).await?;
    assert_eq!(
        reports[0]["final_changes"], 3001,
        "seed {seed}, schedule {schedule:?}"
    );
    Ok(())
}

/// Issue 15, item 8: identifiers that are not S3-friendly (a table named `a/b`, a schema with a
/// dot, a `%`, a name ending in a space, which a reader trimming the text would lose) each map
/// to one key segment that reads back as the same table, so the slot's every table compacts and
/// verifies, and no table's files land under another's prefix.
#[tokio::test]
async fn odd_table_names_compact_under_their_own_prefix() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE \"a/b\" (id int PRIMARY KEY, v text);
         CREATE SCHEMA \"we.ird\";
         CREATE TABLE \"we.ird\".\"x%y\" (id int PRIMARY KEY, v text);
         CREATE TABLE plain (id int PRIMARY KEY, v text);
         CREATE TABLE \"pad \" (id int PRIMARY KEY, v text);",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(
        &db,
        "INSERT INTO \"a/b\" VALUES (1, 'one');
         INSERT INTO \"we.ird\".\"x%y\" VALUES (1, 'one');
         INSERT INTO plain VALUES (1, 'one');
         INSERT INTO \"pad \" VALUES (1, 'one'), (2, 'two');
         UPDATE \"a/b\" SET v = 'uno';",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.a%2Fb").await?;
    assert_eq!(events.len(), 2);
    assert_eq!(events[0]["source"]["table"], "a/b");
    let events = cap.recorded_events("we%2Eird.x%25y").await?;
    assert_eq!(events[0]["source"]["schema"], "we.ird");
    assert_eq!(events[0]["source"]["table"], "x%y");
    let pad = cdc_contract::TableName::new("public", "pad ").to_string();
    let events = cap.recorded_events(&pad).await?;
    assert_eq!(events[0]["source"]["table"], "pad ");
    let names = ["public.a%2Fb", "we%2Eird.x%25y", "public.plain", &pad];
    let reports = cap.compact_and_verify(&names).await?;
    assert_eq!(reports[3]["final_changes"], 2, "{reports:?}");
    assert!(
        cap.pending_hours().await?.is_empty(),
        "every table-hour compacted"
    );

    let keys = aws.list_keys("").await?;
    for name in names {
        let finals: Vec<&String> = keys
            .iter()
            .filter(|k| {
                k.contains(&format!("/{name}/jsonl/")) || k.starts_with(&format!("{name}/jsonl/"))
            })
            .collect();
        assert!(!finals.is_empty(), "{name} has final files: {keys:?}");
    }
    // Every final key has the layout's depth: no identifier added a segment.
    for key in keys.iter().filter(|k| k.contains("/jsonl/year=")) {
        let after_table = key.split("/jsonl/").nth(1).unwrap_or("");
        assert_eq!(after_table.split('/').count(), 5, "{key}");
    }
    Ok(())
}

/// DynamoDB's size of an item: attribute names plus values (strings and numbers by length, lists
/// by their elements plus a byte each and 3 for the list).
fn item_size(item: &cdc_contract::ledger::Item) -> usize {
    fn value(v: &aws_sdk_dynamodb::types::AttributeValue) -> usize {
        use aws_sdk_dynamodb::types::AttributeValue as A;
        match v {
            A::S(s) | A::N(s) => s.len(),
            A::L(list) => 3 + list.iter().map(|v| value(v) + 1).sum::<usize>(),
            A::Bool(_) | A::Null(_) => 1,
            other => format!("{other:?}").len(),
        }
    }
    item.iter().map(|(k, v)| k.len() + value(v)).sum()
}

/// Issue 15, item 6: one transaction over thousands of tables (long names, as multi-tenant
/// schemas have) is recorded in flushes whose records each stay under DynamoDB's 400 KB item
/// limit; before, one flush record named every table-hour (about 400 KB here, 10,000 tables
/// overflowed it), and the flush could never be recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transaction_over_thousands_of_tables_fits_dynamodb_items() -> anyhow::Result<()> {
    const TABLES: usize = 5000;
    // One transaction locks every table and its index.
    let pg = PgCluster::start_with(pipeline_tests::postgres::ClusterOptions {
        extra_conf: vec!["max_locks_per_transaction = 512".into()],
        ..Default::default()
    })?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database("eo").await?;
    let prefix = "tenant_0123456789_abcdefghijklmnopqrstuvwxyz_0123456789_";
    for chunk in (0..TABLES).collect::<Vec<_>>().chunks(500) {
        let ddl: String = chunk
            .iter()
            .map(|i| format!("CREATE TABLE {prefix}{i} (id int PRIMARY KEY);"))
            .collect();
        pg.execute(&db, &ddl).await?;
    }
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    let mut insert = String::from("BEGIN;");
    for i in 0..TABLES {
        insert.push_str(&format!("INSERT INTO {prefix}{i} VALUES ({i});"));
    }
    insert.push_str("COMMIT;");
    pg.execute(&db, &insert).await?;
    cap.run_until_caught_up(Duration::from_secs(600)).await?;

    let slot_items = aws
        .query_ledger(&cdc_contract::ledger::slot_pk(&cap.slot))
        .await?;
    let flushes: Vec<_> = slot_items
        .iter()
        .filter(|i| {
            i.get("sk")
                .and_then(|v| v.as_s().ok())
                .is_some_and(|sk| sk.starts_with("flush#"))
        })
        .collect();
    let with_rows: Vec<_> = flushes
        .iter()
        .filter(|f| {
            f.get("hours")
                .and_then(|h| h.as_l().ok())
                .is_some_and(|l| !l.is_empty())
        })
        .collect();
    assert!(
        with_rows.len() >= 2,
        "{} flushes recorded the transaction",
        with_rows.len()
    );
    for f in &flushes {
        assert!(
            item_size(f) < 400 * 1024,
            "a flush record of {} bytes",
            item_size(f)
        );
    }
    // Every table-hour is named by exactly one flush record and has its pending marker (the
    // emulator scans a table per query, so no query per table here).
    let named: std::collections::BTreeSet<String> = with_rows
        .iter()
        .flat_map(|f| {
            f.get("hours")
                .and_then(|h| h.as_l().ok())
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|h| h.as_s().ok().cloned())
        .collect();
    let listed: usize = with_rows
        .iter()
        .map(|f| {
            f.get("hours")
                .and_then(|h| h.as_l().ok())
                .map_or(0, Vec::len)
        })
        .sum();
    assert_eq!((named.len(), listed), (TABLES, TABLES));
    assert_eq!(cap.pending_hours().await?.len(), TABLES);
    Ok(())
}

/// Issue 15, item 12: a slot lost while the ledger holds recorded but uncompacted batches. The
/// documented way out used to be deleting the slot's ledger items, which orphaned those batches
/// and restarted flush numbers. Now the capture stops naming `CDC_RECREATE_SLOT`; with it, the
/// slot is recreated and a new snapshot fills the gap while every recorded batch stays valid.
#[tokio::test]
async fn a_lost_slot_is_recreated_keeping_what_the_ledger_recorded() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = rows_before_any_slot(&pg, 50).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(
        &db,
        "INSERT INTO t SELECT g, 'streamed' FROM generate_series(51, 100) g",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let before = cap.checkpoint().await?.context("checkpoint")?;

    // The slot is lost; what changes meanwhile is never streamed.
    pg.execute(
        &db,
        &format!("SELECT pg_drop_replication_slot('{}')", cap.slot),
    )
    .await?;
    pg.execute(
        &db,
        "UPDATE t SET v = 'while lost' WHERE id <= 10;
         INSERT INTO t SELECT g, 'while lost' FROM generate_series(101, 110) g;",
    )
    .await?;
    let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("CDC_RECREATE_SLOT=true"), "{stderr}");

    cap.env.push(("CDC_RECREATE_SLOT".into(), "true".into()));
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recreating it and backfilling every table")
    );
    cap.env.pop();
    pg.execute(&db, "INSERT INTO t VALUES (111, 'after')")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;

    let after = cap.checkpoint().await?.context("checkpoint")?;
    assert!(after.flush_seq > before.flush_seq && after.lsn > before.lsn);
    let events = cap.recorded_events("public.t").await?;
    let reads = events.iter().filter(|e| e["op"] == "r").count();
    let creates: Vec<i64> = ids(&events
        .iter()
        .filter(|e| e["op"] == "c")
        .cloned()
        .collect::<Vec<_>>());
    assert_eq!(reads, 50 + 110, "both snapshots");
    assert_eq!(creates, (51..=100).chain([111]).collect::<Vec<_>>());
    // Every recorded batch is compacted (none orphaned), and replaying gives the table.
    let reports = cap.compact_and_verify(&["public.t"]).await?;
    assert_eq!(reports[0]["final_changes"], 50 + 50 + 110 + 1);
    Ok(())
}

/// The slot's flush records: (sort key, the item).
async fn flush_records(
    aws: &AwsFixture,
    slot: &str,
) -> anyhow::Result<Vec<(String, cdc_contract::ledger::Item)>> {
    Ok(aws
        .query_ledger(&cdc_contract::ledger::slot_pk(slot))
        .await?
        .into_iter()
        .filter_map(|i| {
            let sk = i.get("sk")?.as_s().ok()?.clone();
            sk.starts_with("flush#").then_some((sk, i))
        })
        .collect())
}

fn names_hours(item: &cdc_contract::ledger::Item) -> bool {
    item.get("hours")
        .and_then(|h| h.as_l().ok())
        .is_some_and(|l| !l.is_empty())
}

/// Issue 15, item 13: flush records no longer pile up (one per flush, heartbeats included, in one
/// partition). A heartbeat's record expires by itself; a record with batches expires once every
/// table-hour it names is compacted, and not before: an uncompacted batch keeps its record, so
/// the orphan rule holds. With the expired records gone, the history still verifies and a late
/// batch still compacts.
#[tokio::test]
async fn flush_records_expire_once_their_hours_are_compacted() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, v text); CREATE TABLE b (id int PRIMARY KEY, v text);",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(
        &db,
        "BEGIN; INSERT INTO a VALUES (1, 'x'); INSERT INTO b VALUES (1, 'y'); COMMIT;",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let ttl = cdc_contract::ledger::TTL_ATTRIBUTE;
    let records = flush_records(&aws, &cap.slot).await?;
    assert!(records.iter().any(|(_, r)| names_hours(r)));
    for (sk, r) in &records {
        assert_eq!(
            r.contains_key(ttl),
            !names_hours(r),
            "{sk}: only records without batches expire before compaction"
        );
    }

    cap.compact_and_verify(&["public.a", "public.b"]).await?;
    let records = flush_records(&aws, &cap.slot).await?;
    assert!(
        records.iter().all(|(_, r)| r.contains_key(ttl)),
        "every hour compacted: every record expires"
    );
    // DynamoDB's TTL deletes them.
    for (sk, _) in &records {
        aws.dynamodb
            .delete_item()
            .table_name(&aws.table)
            .key(
                "pk",
                aws_sdk_dynamodb::types::AttributeValue::S(cdc_contract::ledger::slot_pk(
                    &cap.slot,
                )),
            )
            .key("sk", aws_sdk_dynamodb::types::AttributeValue::S(sk.clone()))
            .send()
            .await?;
    }
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    assert_eq!(reports[0]["final_changes"], 1);
    assert_eq!(reports[1]["final_changes"], 1);

    // A later change to one table: its record waits for that table's hour only.
    pg.execute(&db, "INSERT INTO a VALUES (2, 'z')").await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let with_batches: Vec<_> = flush_records(&aws, &cap.slot)
        .await?
        .into_iter()
        .filter(|(_, r)| names_hours(r))
        .collect();
    assert_eq!(with_batches.len(), 1);
    assert!(!with_batches[0].1.contains_key(ttl));
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    assert_eq!(reports[0]["final_changes"], 2);
    let records = flush_records(&aws, &cap.slot).await?;
    assert!(records.iter().all(|(_, r)| r.contains_key(ttl)));
    Ok(())
}

/// Review of issue 15: a slot that is ahead of the ledger (recreated by another task, or by
/// hand) would make PostgreSQL start past the checkpoint and silently skip what lies between.
/// The capture refuses to stream from it, naming the way out.
#[tokio::test]
async fn a_slot_ahead_of_the_ledger_is_refused() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, "INSERT INTO t VALUES (1)").await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(&db, "INSERT INTO t VALUES (2)").await?;
    // The slot is recreated behind the capture's back: row 2 is before its start.
    pg.execute(
        &db,
        &format!("SELECT pg_drop_replication_slot('{}')", cap.slot),
    )
    .await?;
    pg.connect(&db)
        .await?
        .execute(
            "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&cap.slot],
        )
        .await?;
    pg.execute(&db, "INSERT INTO t VALUES (3)").await?;
    let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("past the ledger's checkpoint"), "{stderr}");
    assert_eq!(ids(&cap.recorded_events("public.t").await?), vec![1]);
    Ok(())
}

/// A snapshot killed after a recorded chunk resumes even when the capture restarts with
/// `CDC_SNAPSHOT=never` (the mode says how a new slot starts; recorded progress is kept).
#[tokio::test]
async fn an_unfinished_snapshot_is_resumed_whatever_the_snapshot_mode() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = rows_before_any_slot(&pg, 2000).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_MAX_BYTES".into(), "65536".into()));
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "16384".into()));
    cap.env
        .push(("CDC_TEST_CRASH_AT".into(), "after_record".into()));
    let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
    assert!(!out.status.success());
    cap.env.pop();
    let recorded = cap
        .checkpoint()
        .await?
        .and_then(|c| c.backfill)
        .context("progress recorded")?;
    assert!(
        recorded.pending.first().is_some_and(|p| p.rows > 0),
        "{recorded:?}"
    );
    cap.env.push(("CDC_SNAPSHOT".into(), "never".into()));
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(ids(&events), (1..=2000).collect::<Vec<_>>());
    let reports = cap.compact_and_verify(&["public.t"]).await?;
    assert_eq!(reports[0]["final_changes"], 2000);
    Ok(())
}

/// A slot whose initial snapshot an older version (one transaction on an exported snapshot)
/// left unfinished: the capture retires what it recorded, recreates the slot and backfills
/// every table, and records the old snapshot finished.
#[tokio::test]
async fn an_unfinished_snapshot_of_an_older_version_is_replaced_by_a_backfill() -> anyhow::Result<()>
{
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = rows_before_any_slot(&pg, 1500).await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    pg.execute(
        &db,
        &format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            cap.slot
        ),
    )
    .await?;
    let old = cdc_contract::ledger::SnapshotState {
        complete: false,
        consistent_lsn: cdc_contract::Lsn::ZERO,
        started_ms: 1,
    };
    aws.ledger_table()
        .put("old snapshot state", old.to_item(&cap.slot), None)
        .await?;
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("an initial snapshot of an earlier version did not complete"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(ids(&events), (1..=1500).collect::<Vec<_>>());
    let state = aws
        .ledger_table()
        .get(
            cdc_contract::ledger::slot_pk(&cap.slot),
            cdc_contract::ledger::SNAPSHOT_SK.into(),
        )
        .await?
        .context("snapshot state")?;
    assert!(cdc_contract::ledger::SnapshotState::from_item(&state)?.complete);
    Ok(())
}

/// Review of issue 15: the caught-up time comes from probes read over the SQL connection; when
/// only that connection dies, the capture reconnects it, and the caught-up time keeps moving
/// (hours keep closing on an idle database).
#[tokio::test]
async fn the_caught_up_time_keeps_moving_after_the_sql_connection_dies() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "300".into()));
    cap.create_publication_and_slot().await?;
    let child = cap.spawn(&[])?;
    wait_for("a caught-up time", Duration::from_secs(60), || async {
        Ok(cap.checkpoint().await?.and_then(|c| c.caught_up_ms))
    })
    .await
    .with_context(|| cap.log())?;
    let client = pg.connect(&db).await?;
    let killed = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE application_name = 'pg-cdc-s3-capture' AND backend_type = 'client backend'",
            &[],
        )
        .await?
        .get::<_, i64>(0);
    assert_eq!(killed, 1, "the capture's SQL connection");
    let cut_ms = chrono_now_ms();
    wait_for(
        "a caught-up time after the cut",
        Duration::from_secs(60),
        || async {
            Ok(cap
                .checkpoint()
                .await?
                .and_then(|c| c.caught_up_ms)
                .filter(|t| *t > cut_ms + 1000))
        },
    )
    .await
    .with_context(|| cap.log())?;
    cap.stop(child, Duration::from_secs(60)).await?;
    Ok(())
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
