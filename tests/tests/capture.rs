//! The capture against a throwaway PostgreSQL and the AWS emulator, through the real binary.

use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};

use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::{replay, CaptureSetup};
use pipeline_tests::postgres::PgCluster;

const CAUGHT_UP: Duration = Duration::from_secs(90);

async fn setup(pg: &PgCluster, schema_sql: &str) -> anyhow::Result<String> {
    let db = pg.create_database("cap").await?;
    pg.execute(&db, schema_sql).await?;
    Ok(db)
}

fn ops(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["op"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[tokio::test]
async fn changes_arrive_as_envelopes_in_commit_order_with_ledger_and_notifications(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, n numeric(10,2));
         CREATE TABLE c (id int PRIMARY KEY, v text);",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;

    // Single statements, a multi-statement transaction, interleaved concurrent transactions,
    // an update changing the key, deletes and a truncate.
    pg.execute(&db, "INSERT INTO a VALUES (1, 'one')").await?;
    pg.execute(&db, "BEGIN; INSERT INTO a VALUES (2, 'two'); INSERT INTO b VALUES (1, 1.50); UPDATE a SET v = 'uno' WHERE id = 1; COMMIT;").await?;
    let t1 = pg.connect(&db).await?;
    let t2 = pg.connect(&db).await?;
    t1.batch_execute("BEGIN; INSERT INTO c VALUES (10, 'first-begun')")
        .await?;
    t2.batch_execute("BEGIN; INSERT INTO c VALUES (20, 'second-begun')")
        .await?;
    t1.batch_execute("INSERT INTO c VALUES (11, 'first-again')")
        .await?;
    t2.batch_execute("COMMIT").await?;
    t1.batch_execute("COMMIT").await?;
    pg.execute(&db, "UPDATE a SET id = 3 WHERE id = 2").await?;
    pg.execute(&db, "DELETE FROM b WHERE id = 1").await?;
    pg.execute(&db, "TRUNCATE c").await?;

    cap.run_until_caught_up(CAUGHT_UP).await?;

    let a = cap.recorded_events("public.a").await?;
    assert_eq!(ops(&a), ["c", "c", "u", "u"]);
    assert_eq!(a[0]["after"], json!({"id": 1, "v": "one"}));
    assert_eq!(a[0]["before"], Value::Null);
    assert_eq!(a[0]["source"]["table"], "a");
    assert_eq!(a[0]["source"]["snapshot"], "false");
    assert_eq!(a[0]["source"]["db"], db.as_str());
    assert_eq!(a[0]["source"]["name"], cap.slot.as_str());
    // The multi-statement transaction: one commit LSN, ordinals 1..3 across tables.
    assert_eq!(a[1]["source"]["commit_lsn"], a[2]["source"]["commit_lsn"]);
    assert_eq!(a[1]["transaction"]["total_order"], 1);
    assert_eq!(a[2]["transaction"]["total_order"], 3);
    assert_eq!(a[2]["transaction"]["data_collection_order"], 2);
    assert_eq!(a[2]["after"], json!({"id": 1, "v": "uno"}));
    // REPLICA IDENTITY DEFAULT: an update without key change has no before image; one that
    // changes the key carries the old key.
    assert_eq!(a[2]["before"], Value::Null);
    assert_eq!(a[3]["before"], json!({"id": 2}));
    assert_eq!(a[3]["after"], json!({"id": 3, "v": "two"}));
    let b = cap.recorded_events("public.b").await?;
    assert_eq!(ops(&b), ["c", "d"]);
    assert_eq!(b[0]["after"]["n"], "1.50");
    assert_eq!(b[1]["before"], json!({"id": 1}));
    assert_eq!(b[1]["after"], Value::Null);
    let c = cap.recorded_events("public.c").await?;
    // The second-begun transaction committed first: commit order, not begin order.
    assert_eq!(ops(&c), ["c", "c", "c", "t"]);
    assert_eq!(c[0]["after"]["id"], 20);
    assert_eq!(c[1]["after"]["id"], 10);
    assert_eq!(c[2]["after"]["id"], 11);
    assert_eq!(c[3]["before"], Value::Null);
    assert!(replay(&c).is_empty());
    // Commit LSNs never go backwards within a table.
    for events in [&a, &b, &c] {
        let lsns: Vec<u64> = events
            .iter()
            .map(|e| e["source"]["commit_lsn"].as_u64().unwrap_or(0))
            .collect();
        assert!(lsns.windows(2).all(|w| w[0] <= w[1]), "{lsns:?}");
    }

    // The ledger names every batch, with the staging layout's key, and the checkpoint covers them.
    let batches = cap.recorded_batches().await?;
    assert_eq!(batches.len(), 3);
    for (table, list) in &batches {
        for batch in list {
            assert!(
                batch.key.starts_with(&format!("_staging/{table}/")),
                "{}",
                batch.key
            );
            assert!(batch.key.ends_with(&format!(
                "{}-{}.jsonl.gz",
                batch.first.key(),
                batch.last.key()
            )));
        }
    }
    let checkpoint = cap.checkpoint().await?.context("checkpoint")?;
    let last_commit = c[3]["source"]["commit_lsn"].as_u64().unwrap_or(0);
    assert!(checkpoint.lsn.0 > last_commit);
    assert!(checkpoint.partial.is_none());
    // The slot never runs ahead of the ledger.
    assert!(cap.confirmed_flush_lsn().await? <= checkpoint.lsn);

    // SQS carries notifications naming the table-hours.
    let notes = aws.drain_queue().await?;
    assert!(!notes.is_empty());
    let mut named: Vec<String> = Vec::new();
    for body in &notes {
        let note: cdc_contract::notify::Notification = serde_json::from_str(body)?;
        assert_eq!(note.slot, cap.slot);
        named.extend(note.hours.iter().map(|h| h.table.to_string()));
    }
    for t in ["public.a", "public.b", "public.c"] {
        assert!(named.iter().any(|n| n == t), "{t} not notified: {named:?}");
    }
    Ok(())
}

#[tokio::test]
async fn every_builtin_type_family_maps_to_the_documented_json() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
         CREATE TABLE t (
            id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric(12,3), n_nan numeric, f4 real, f8 double precision,
            f_nan double precision, f_inf double precision, b boolean, txt text, vc varchar(5), ch char(3),
            ts timestamp, tstz timestamptz, tstz_inf timestamptz, d date, tm time, tmtz timetz, iv interval,
            u uuid, j json, jb jsonb, by bytea, ia int[], ta text[], m mood, dom posint, money_v money,
            inet_v inet, big_arr bigint[][]);",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(
        &db,
        r#"INSERT INTO t VALUES (1, -7, 9007199254740993, 1234.5, 'NaN', 1.5, 0.1, 'NaN', '-Infinity', true,
            E'héllo "wörld"\n✓', 'abc', 'x', '2025-01-08 10:30:00.123456', '2025-01-08 12:30:00.5+02', 'infinity',
            '2025-01-08', '10:30:00', '10:30:00+02', '1 year 2 months 3 days 04:05:06.5',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{"a" : [1, 2]}', '{"k": {"n": null}}', '\x48656c6c6f',
            '{1,NULL,3}', '{"a b",c}', 'happy', 5, 12.34, '10.0.0.1/8', '{{1,2},{3,4}}');
           INSERT INTO t (id) VALUES (2);"#,
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(events.len(), 2);
    let row = &events[0]["after"];
    let expect = json!({
        "id": 1, "i2": -7, "i8": 9007199254740993_i64, "n": "1234.500", "n_nan": "NaN", "f4": 1.5, "f8": 0.1,
        "f_nan": "NaN", "f_inf": "-Infinity", "b": true, "txt": "héllo \"wörld\"\n✓", "vc": "abc", "ch": "x  ",
        "ts": "2025-01-08T10:30:00.123456", "tstz": "2025-01-08T10:30:00.500000Z", "tstz_inf": "infinity",
        "d": "2025-01-08", "tm": "10:30:00", "tmtz": "10:30:00+02", "iv": "P1Y2M3DT4H5M6.5S",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "j": {"a": [1, 2]}, "jb": {"k": {"n": null}},
        "by": "SGVsbG8=", "ia": [1, null, 3], "ta": ["a b", "c"], "m": "happy", "dom": 5, "money_v": "$12.34",
        "inet_v": "10.0.0.1/8", "big_arr": [[1, 2], [3, 4]]
    });
    for (k, v) in expect.as_object().context("object")? {
        assert_eq!(&row[k], v, "column {k}");
    }
    // The infinite timestamp could not be converted: text form, column named in the event.
    assert_eq!(events[0]["raw_columns"], json!(["tstz_inf"]));
    // NULLs stay null.
    let nulls = &events[1]["after"];
    assert!(nulls
        .as_object()
        .context("object")?
        .iter()
        .all(|(k, v)| k == "id" || v.is_null()));
    Ok(())
}

#[tokio::test]
async fn restarts_resume_without_loss_or_duplicates_after_clean_stops_and_crashes(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY, v int)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;

    let mut expected = 0;
    let write = |expected: &mut i32, n: i32| {
        let first = *expected;
        *expected += n;
        format!(
            "INSERT INTO t SELECT g, g FROM generate_series({}, {}) g",
            first + 1,
            first + n
        )
    };
    // A clean run, then a crash between upload and record, then between record and confirm.
    pg.execute(&db, &write(&mut expected, 50)).await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    for crash in ["after_upload", "after_record"] {
        pg.execute(&db, &write(&mut expected, 50)).await?;
        cap.env.push(("CDC_TEST_CRASH_AT".into(), crash.into()));
        let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
        assert!(
            !out.status.success(),
            "the crash hook {crash} must kill the capture"
        );
        cap.env.pop();
        let events = cap.recorded_events("public.t").await?;
        let before_restart = events.len();
        cap.run_until_caught_up(CAUGHT_UP).await?;
        let events = cap.recorded_events("public.t").await?;
        assert_eq!(
            events.len(),
            expected as usize,
            "after a crash {crash} (had {before_restart} before restart)"
        );
    }
    // A clean stop with SIGTERM while changes are buffered.
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "600000".into()));
    let child = cap.spawn(&[])?;
    pg.execute(&db, &write(&mut expected, 30)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cap.stop(child, Duration::from_secs(30)).await?;
    cap.env.pop();
    assert_eq!(
        cap.recorded_events("public.t").await?.len(),
        expected as usize
    );
    pg.execute(&db, &write(&mut expected, 5)).await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    let ids: Vec<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids, (1..=expected as i64).collect::<Vec<_>>());
    Ok(())
}

#[tokio::test]
async fn a_second_capture_records_nothing_while_the_first_holds_the_lease() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("LEASE_DURATION_MS".into(), "60000".into()));
    cap.create_publication_and_slot().await?;
    let first = cap.spawn(&[])?;
    pipeline_tests::wait_for(
        "the first capture's lease",
        Duration::from_secs(30),
        || async {
            Ok(aws
                .get_ledger_item(&cdc_contract::ledger::slot_pk(&cap.slot), "lease")
                .await?
                .map(|_| ()))
        },
    )
    .await?;
    let mut second = cap.spawn(&[])?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(1, 20)")
        .await?;
    pipeline_tests::wait_for(
        "the first capture to record",
        Duration::from_secs(30),
        || async {
            let n = cap.recorded_events("public.t").await?.len();
            Ok((n == 20).then_some(()))
        },
    )
    .await?;
    // The second one waits, saying why, and has recorded nothing: every flush so far is the first's.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        second.try_wait()?.is_none(),
        "the second capture must wait, not exit"
    );
    let batches = cap.recorded_batches().await?;
    let epochs: std::collections::BTreeSet<u64> = batches
        .values()
        .flatten()
        .map(|b| b.flush_id.epoch)
        .collect();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
    second.start_kill()?;
    second.wait().await?;
    let log = cap.log();
    assert!(log.contains("slot is leased by another capture"), "{log}");

    // The holder dies without releasing; a successor takes over once the lease expires... here,
    // a clean stop releases it at once.
    cap.stop(first, Duration::from_secs(60)).await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(21, 30)")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(events.len(), 30);
    let epochs: std::collections::BTreeSet<u64> = cap
        .recorded_batches()
        .await?
        .values()
        .flatten()
        .map(|b| b.flush_id.epoch)
        .collect();
    assert_eq!(
        epochs.len(),
        2,
        "the successor records under a new epoch: {epochs:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_fenced_capture_cannot_record() -> anyhow::Result<()> {
    // A capture whose lease was taken over (its epoch bumped behind its back) stops writing.
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("LEASE_DURATION_MS".into(), "60000".into()));
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    cap.create_publication_and_slot().await?;
    let child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the lease", Duration::from_secs(30), || async {
        Ok(aws
            .get_ledger_item(&cdc_contract::ledger::slot_pk(&cap.slot), "lease")
            .await?
            .map(|_| ()))
    })
    .await?;
    // Another owner takes the lease over (as after an expiry).
    aws.dynamodb
        .update_item()
        .table_name(&aws.table)
        .set_key(Some(cdc_contract::ledger::key(
            cdc_contract::ledger::slot_pk(&cap.slot),
            "lease".into(),
        )))
        .update_expression("SET #o = :o ADD epoch :one")
        .expression_attribute_names("#o", "owner")
        .expression_attribute_values(":o", cdc_contract::ledger::s("intruder"))
        .expression_attribute_values(":one", cdc_contract::ledger::n(1))
        .send()
        .await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(1, 10)")
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await??
        .status;
    assert!(!status.success());
    let log = cap.log();
    assert!(log.contains("lease lost"), "{log}");
    assert!(cap.recorded_events("public.t").await?.is_empty());
    assert_eq!(
        cap.confirmed_flush_lsn().await?,
        cap.checkpoint()
            .await?
            .map(|c| c.lsn)
            .unwrap_or_default()
            .max(cap.confirmed_flush_lsn().await?)
    );
    Ok(())
}

#[tokio::test]
async fn add_column_mid_stream_starts_a_new_schema_version() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY, v text)").await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, "INSERT INTO t VALUES (1, 'a')").await?;
    pg.execute(&db, "ALTER TABLE t ADD COLUMN extra numeric(5,1)")
        .await?;
    pg.execute(&db, "INSERT INTO t VALUES (2, 'b', 4.5)")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(events[0]["after"], json!({"id": 1, "v": "a"}));
    assert_eq!(
        events[1]["after"],
        json!({"id": 2, "v": "b", "extra": "4.5"})
    );
    let batches = cap.recorded_batches().await?;
    let list = &batches[&"public.t".parse()?];
    assert_eq!(list.len(), 2, "a schema change cuts the batch");
    assert_ne!(list[0].schema_id, list[1].schema_id);
    for b in list {
        let item = aws
            .get_ledger_item(
                &cdc_contract::ledger::schema_pk(&cap.slot, &b.table),
                &b.schema_id,
            )
            .await?
            .context("schema item")?;
        let schema = cdc_contract::ledger::SchemaItem::from_item(&item)?.schema;
        assert_eq!(schema.version_id(), b.schema_id);
    }
    let new = cdc_contract::ledger::SchemaItem::from_item(
        &aws.get_ledger_item(
            &cdc_contract::ledger::schema_pk(&cap.slot, &list[1].table),
            &list[1].schema_id,
        )
        .await?
        .context("schema")?,
    )?
    .schema;
    assert_eq!(
        new.columns.last().map(|c| c.type_name.as_str()),
        Some("numeric(5,1)")
    );
    assert!(new.columns[0].key);
    Ok(())
}

#[tokio::test]
async fn one_transaction_over_more_tables_than_a_dynamodb_transaction_holds_is_recorded(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let mut ddl = String::new();
    let mut insert = String::from("BEGIN;");
    for i in 0..130 {
        ddl.push_str(&format!("CREATE TABLE t{i} (id int PRIMARY KEY);"));
        insert.push_str(&format!("INSERT INTO t{i} VALUES ({i});"));
    }
    insert.push_str("COMMIT;");
    let db = setup(&pg, &ddl).await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, &insert).await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let batches = cap.recorded_batches().await?;
    assert_eq!(batches.len(), 130);
    let flushes: std::collections::BTreeSet<_> =
        batches.values().flatten().map(|b| b.flush_id).collect();
    assert_eq!(flushes.len(), 1, "one flush records the whole transaction");
    assert_eq!(cap.pending_hours().await?.len(), 130);
    Ok(())
}

#[tokio::test]
async fn local_test_mode_prints_events_and_resumes_from_its_file() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    let dir = tempfile::tempdir()?;
    let ledger_file = dir.path().join("ledger.json");
    cap.env.push((
        "LOCAL_LEDGER_FILE".into(),
        ledger_file.display().to_string(),
    ));
    // No AWS setting at all: local mode must not need them.
    let run = |cap: &CaptureSetup<'_>| {
        let mut cmd = cap.command()?;
        cmd.env_remove("S3_BUCKET_NAME")
            .env_remove("LEDGER_TABLE")
            .env("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
            .args(["--local-test-mode", "--exit-when-caught-up"]);
        anyhow::Ok(cmd)
    };
    pg.execute(&db, "INSERT INTO t VALUES (1), (2)").await?;
    let out = tokio::time::timeout(CAUGHT_UP, run(&cap)?.output()).await??;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["after"]["id"], 2);
    assert!(ledger_file.is_file());
    pg.execute(&db, "INSERT INTO t VALUES (3)").await?;
    let out = tokio::time::timeout(CAUGHT_UP, run(&cap)?.output()).await??;
    let text = String::from_utf8(out.stdout)?;
    assert_eq!(text.lines().count(), 1, "only the new change: {text}");
    assert!(aws.list_keys("").await?.is_empty(), "nothing goes to AWS");

    // A ledger file that cannot be written: a clear error, and nothing confirmed, so the next
    // run with a writable file gets the change again.
    pg.execute(&db, "INSERT INTO t VALUES (4)").await?;
    let confirmed = cap.confirmed_flush_lsn().await?;
    let unwritable = dir.path().join("missing").join("ledger.json");
    let out = tokio::time::timeout(
        CAUGHT_UP,
        run(&cap)?
            .env("LOCAL_LEDGER_FILE", unwritable.display().to_string())
            .output(),
    )
    .await??;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("local ledger {}", unwritable.display())),
        "{err}"
    );
    assert_eq!(cap.confirmed_flush_lsn().await?, confirmed);
    let out = tokio::time::timeout(CAUGHT_UP, run(&cap)?.output()).await??;
    let text = String::from_utf8(out.stdout)?;
    assert!(text.contains(r#""id":4"#), "{text}");
    Ok(())
}

#[tokio::test]
async fn bad_settings_fail_fast_naming_the_setting() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "SELECT 1").await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("S3_BUCKET_NAME", "")], "S3_BUCKET_NAME"),
        (vec![("CDC_SLOT_NAME", "Bad-Name")], "CDC_SLOT_NAME"),
        (vec![("CDC_TABLES", "nodot")], "CDC_TABLES"),
        (vec![("FLUSH_MAX_BYTES", "10")], "FLUSH_MAX_BYTES"),
        (vec![("PGSSLMODE", "sometimes")], "PGSSLMODE"),
        (
            vec![("S3_BUCKET_NAME", "no-such-bucket-here")],
            "S3_BUCKET_NAME",
        ),
        (vec![("LEDGER_TABLE", "no-such-table")], "LEDGER_TABLE"),
    ];
    for (env, setting) in cases {
        let mut cmd = cap.command()?;
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output()).await??;
        assert!(!out.status.success(), "{env:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(setting),
            "{env:?}: error does not name {setting}: {err}"
        );
    }
    // A wrong password: the capture waits for it to be fixed (a first deployment's secret may
    // not be set yet), with a clear reason that never prints the password.
    let mut cap = cap;
    cap.env
        .push(("POSTGRES_PASSWORD".into(), "s3cr3t-Pa55".into()));
    let mut child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the refusal logged", Duration::from_secs(30), || async {
        Ok(cap.log().contains("waiting for the database").then_some(()))
    })
    .await?;
    child.start_kill()?;
    child.wait().await?;
    let err = cap.log();
    assert!(err.contains("password authentication failed"), "{err}");
    assert!(
        !err.contains("s3cr3t-Pa55"),
        "the password must never be printed: {err}"
    );
    Ok(())
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA and a server certificate for localhost/127.0.0.1 signed by it.
fn make_certs(dir: &std::path::Path) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    )?;
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "other.key",
            "-out",
            "other-ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=other-ca",
        ],
    )?;
    Ok(())
}

#[tokio::test]
async fn tls_verify_full_connects_to_a_trusted_server_and_refuses_others() -> anyhow::Result<()> {
    let certs = tempfile::tempdir()?;
    make_certs(certs.path())?;
    let opts = pipeline_tests::postgres::ClusterOptions {
        extra_conf: vec!["ssl = on".into(), "ssl_cert_file = 'server.crt'".into(), "ssl_key_file = 'server.key'".into()],
        hba: Some("local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n".into()),
        data_files: vec![
            ("server.crt".into(), std::fs::read(certs.path().join("server.crt"))?, 0o644),
            ("server.key".into(), std::fs::read(certs.path().join("server.key"))?, 0o600),
        ],
        ..Default::default()
    };
    let pg = PgCluster::start_with(opts)?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database_over_socket("tls").await?;
    pg.execute_over_socket(
        &db,
        "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    pg.execute_over_socket(
        &db,
        &format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            cap.slot
        ),
    )
    .await?;
    pg.execute_over_socket(&db, "INSERT INTO t VALUES (1)")
        .await?;
    let ca = certs.path().join("ca.crt").display().to_string();
    cap.env.extend([
        ("POSTGRES_HOST".to_string(), "localhost".to_string()),
        ("PGSSLMODE".to_string(), "verify-full".to_string()),
        ("PGSSLROOTCERT".to_string(), ca),
    ]);
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    assert_eq!(cap.recorded_events("public.t").await?.len(), 1);
    // SCRAM over TLS is bound to the server's certificate (the server checks the binding: a
    // wrong hash fails the login).
    let log = String::from_utf8_lossy(&out.stderr);
    let line = log
        .lines()
        .find(|l| l.contains("replication connection authenticated"))
        .unwrap_or_default();
    assert!(
        line.contains("tls=true") && line.contains("channel_binding=true"),
        "{log}"
    );

    // A root that did not sign the server's certificate: refused.
    let other = certs.path().join("other-ca.crt").display().to_string();
    let out = cap
        .command()?
        .env("PGSSLROOTCERT", &other)
        .arg("--exit-when-caught-up")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.to_lowercase().contains("certificate"), "{err}");

    // A server without TLS, with TLS required: refused, nothing recorded.
    let plain = PgCluster::start()?;
    let out = cap
        .command()?
        .env("POSTGRES_HOST", "127.0.0.1")
        .env("POSTGRES_PORT", plain.port.to_string())
        .env("PGSSLMODE", "require")
        .arg("--exit-when-caught-up")
        .output()
        .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not support TLS"), "{err}");
    Ok(())
}

/// `cdc-status` against a running pipeline: the lease holder, the checkpoint, the slot on the
/// server, the finished backfill and the pending hour while the capture runs; after compaction
/// no pending hour and the last compaction named; dead letters counted in the queue and the
/// bucket; its text form says the same.
#[tokio::test]
async fn cdc_status_reports_a_running_pipeline() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text); \
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g; \
         CREATE PUBLICATION pub_all FOR ALL TABLES",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    let child = cap.spawn(&[])?;
    // The snapshot's rows recorded, and a streamed change after it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let done = cap.checkpoint().await?.is_some_and(|c| {
            c.backfill
                .is_some_and(|b| b.pending.is_empty() && !b.known.is_empty())
        });
        if done {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "no snapshot: {}",
            cap.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pg.execute(&db, "UPDATE t SET v = 'changed' WHERE id = 1")
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !ops(&cap.recorded_events("public.t").await?).contains(&"u".to_owned()) {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "not recorded: {}",
            cap.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before = cap.checkpoint().await?.unwrap_or_default().lsn;

    // Dead letters: one notification in the dead-letter queue, one record set aside.
    let dlq = aws
        .sqs
        .create_queue()
        .queue_name(pipeline_tests::unique_name("dlq-"))
        .send()
        .await?
        .queue_url
        .unwrap_or_default();
    aws.sqs
        .send_message()
        .queue_url(&dlq)
        .message_body("{}")
        .send()
        .await?;
    aws.put_bytes("_dead_letter/public.t/2026/01/01/00/x.json", b"{}".to_vec())
        .await?;

    let running = cap.status(&["--notify-dlq-url", &dlq]).await?;
    let after = cap.checkpoint().await?.unwrap_or_default().lsn;
    let slots = running["slots"].as_array().cloned().unwrap_or_default();
    assert_eq!(slots.len(), 1, "only this slot: {running}");
    let slot = &slots[0];
    assert_eq!(slot["slot"], cap.slot.as_str());
    assert_eq!(slot["lease"]["live"], true, "{slot}");
    assert!(slot["lease"]["owner"]
        .as_str()
        .is_some_and(|o| !o.is_empty()));
    let reported: cdc_contract::Lsn = slot["checkpoint"]["lsn"]
        .as_str()
        .unwrap_or_default()
        .parse()?;
    assert!(reported >= before && reported <= after, "{slot}");
    assert_eq!(slot["replication"]["exists"], true);
    assert_eq!(slot["replication"]["active"], true, "{slot}");
    assert!(slot["replication"]["lag_bytes"]
        .as_i64()
        .is_some_and(|b| b >= 0));
    assert_eq!(
        slot["backfill"]["pending"].as_array().map(Vec::len),
        Some(0)
    );
    assert_eq!(slot["backfill"]["tables_done"], 1);
    assert!(
        slot["pending_hours"].as_u64().is_some_and(|n| n >= 1),
        "{slot}"
    );
    assert!(slot["oldest_pending_hour"].is_string());
    assert!(slot["last_compaction"].is_null());
    assert_eq!(running["notify_dead_letters"], 1);
    assert_eq!(running["dead_letter_objects"], 1);

    cap.stop(child, Duration::from_secs(30)).await?;
    cap.compact(10).await?;
    let after = cap.status(&[]).await?;
    let slot = &after["slots"][0];
    assert_eq!(slot["pending_hours"], 0, "{after}");
    assert_eq!(slot["last_compaction"]["table"], "public.t", "{after}");
    assert_eq!(slot["replication"]["active"], false);
    assert!(after["notify_dead_letters"].is_null(), "not asked for");

    // The text form, for people.
    let mut cmd = cap.base_command("cdc-status")?;
    let out = cmd.output().await?;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("slot {}", cap.slot)), "{text}");
    assert!(text.contains("compacted    public.t"), "{text}");
    assert!(text.contains("pending      none"), "{text}");
    Ok(())
}

/// A server that asks for a cleartext or an MD5 password over a connection without TLS is
/// refused (the password is not sent) unless `CDC_ALLOW_UNENCRYPTED_PASSWORD` allows it.
#[tokio::test]
async fn a_password_is_not_sent_unencrypted_unless_allowed() -> anyhow::Result<()> {
    for method in ["password", "md5"] {
        let opts = pipeline_tests::postgres::ClusterOptions {
            extra_conf: vec!["password_encryption = md5".into()],
            hba: Some(format!(
                "local all all trust\nhost all all 127.0.0.1/32 {method}\n"
            )),
            ..Default::default()
        };
        let pg = PgCluster::start_with(opts)?;
        let aws = AwsFixture::new().await?;
        let db = pg.create_database_over_socket("plain").await?;
        // Stored as MD5 (password_encryption), so `md5` in pg_hba.conf asks for MD5.
        pg.execute_over_socket(
            &db,
            &format!(
                "CREATE TABLE t (id int PRIMARY KEY); CREATE PUBLICATION pub_all FOR ALL TABLES; \
                 ALTER ROLE postgres PASSWORD '{}'",
                pipeline_tests::postgres::SUPERUSER_PASSWORD
            ),
        )
        .await?;
        let mut cap = CaptureSetup::new(&pg, &db, &aws);
        pg.execute_over_socket(&db, "INSERT INTO t VALUES (1)")
            .await?;
        cap.env
            .extend([("PGSSLMODE".to_string(), "prefer".to_string())]);
        let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
        assert!(!out.status.success(), "{method}: the capture must refuse");
        let err = String::from_utf8_lossy(&out.stderr);
        let kind = if method == "md5" { "MD5" } else { "cleartext" };
        assert!(
            err.contains(&format!(
                "asks for a {kind} password over a connection that is not encrypted"
            )),
            "{method}: {err}"
        );
        assert!(cap.recorded_events("public.t").await?.is_empty());

        cap.env
            .push(("CDC_ALLOW_UNENCRYPTED_PASSWORD".into(), "true".into()));
        cap.run_until_caught_up(CAUGHT_UP).await?;
        assert_eq!(cap.recorded_events("public.t").await?.len(), 1, "{method}");
    }
    Ok(())
}

#[tokio::test]
async fn a_two_million_row_transaction_streams_through_in_bounded_memory() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE big (id int PRIMARY KEY, v text)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    // Default flush settings.
    cap.env.retain(|(k, _)| k != "FLUSH_INTERVAL_MS");
    cap.create_publication_and_slot().await?;
    pg.execute(
        &db,
        "INSERT INTO big SELECT g, 'row-' || g FROM generate_series(1, 2000000) g",
    )
    .await?;
    let out = cap.run_until_caught_up(Duration::from_secs(600)).await?;
    let log = String::from_utf8_lossy(&out.stderr);
    let peak_kib: u64 = log
        .lines()
        .filter_map(|l| l.split("peak_rss_kib=").nth(1))
        .next_back()
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .context("peak_rss_kib in the stop line")?;
    assert!(peak_kib < 150 * 1024, "peak RSS {peak_kib} KiB");
    let batches = cap.recorded_batches().await?;
    let list = &batches[&"public.big".parse()?];
    assert!(
        list.len() > 1,
        "a transaction larger than a batch streams out as several batches"
    );
    let rows: u64 = list.iter().map(|b| b.rows).sum();
    assert_eq!(rows, 2_000_000);
    // Contiguous ordinals 1..=2,000,000 across the batches, one commit LSN.
    let mut next = 1;
    for b in list {
        assert_eq!(b.first.ordinal, next);
        assert_eq!(b.first.commit_lsn, list[0].first.commit_lsn);
        next = b.last.ordinal + 1;
    }
    assert_eq!(next, 2_000_001);
    Ok(())
}

#[tokio::test]
async fn aws_errors_and_lost_replies_neither_stop_the_capture_nor_lose_or_double_changes(
) -> anyhow::Result<()> {
    use pipeline_tests::faultproxy::{Fault, FaultProxy};
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY)",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    // Every third call to S3, DynamoDB or SQS fails: 503, throttled, or its reply lost after it
    // took effect.
    let proxy = FaultProxy::start(
        &aws.endpoint,
        3,
        vec![Fault::Unavailable, Fault::LoseReply, Fault::Throttle],
    )
    .await?;
    cap.env
        .push(("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone()));
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "100".into()));
    let child = cap.spawn(&[])?;
    for round in 0..20 {
        let base = round * 10;
        pg.execute(
            &db,
            &format!(
                "BEGIN; INSERT INTO t SELECT g, 'v' || g FROM generate_series({}, {}) g; INSERT INTO u VALUES ({round}); COMMIT;",
                base + 1,
                base + 10
            ),
        )
        .await?;
        if round % 5 == 4 {
            pg.execute(
                &db,
                &format!("UPDATE t SET v = 'changed' WHERE id <= {base}"),
            )
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // 200 inserts, then updates of ids <= 40, 90, 140 and 190.
    let expected_t = 200 + 40 + 90 + 140 + 190;
    pipeline_tests::wait_for(
        "every change recorded",
        Duration::from_secs(120),
        || async {
            // Both tables: a flush's pending markers are written after its commit, and a
            // failed one is written again by the flush's retry, so one table may lag the other.
            let n = cap.recorded_events("public.t").await?.len();
            let m = cap.recorded_events("public.u").await?.len();
            Ok((n >= expected_t && m >= 20).then_some(n))
        },
    )
    .await?;
    let mut child = child;
    assert!(
        child.try_wait()?.is_none(),
        "the capture keeps running through AWS faults"
    );
    let t = cap.recorded_events("public.t").await?;
    let u = cap.recorded_events("public.u").await?;
    assert_eq!(t.len(), expected_t, "no change lost or doubled");
    assert_eq!(u.len(), 20);
    let state = replay(&t);
    assert_eq!(state.len(), 200);
    assert_eq!(state.values().filter(|r| r["v"] == "changed").count(), 190);
    assert!(proxy.faults() >= 5, "faults injected: {}", proxy.faults());
    child.start_kill()?;
    Ok(())
}

/// `GET /healthz`: its status code and body.
async fn healthz(port: u16) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let response = tokio::time::timeout(Duration::from_secs(60), exchange)
        .await
        .context("/healthz did not answer within 60 s")??;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("not an HTTP response: {response:?}"))?;
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Ok((status, body))
}

async fn healthcheck(cap: &CaptureSetup<'_>, port: u16) -> anyhow::Result<bool> {
    let status = cap
        .command()?
        .env("HEALTH_PORT", port.to_string())
        .arg("healthcheck")
        .status()
        .await?;
    Ok(status.success())
}

#[tokio::test]
async fn healthz_turns_unhealthy_when_the_stream_is_cut_and_the_capture_resumes_after_a_restart(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    cap.env.push(("HEALTH_PORT".into(), port.to_string()));
    let mut child = cap.spawn(&[])?;
    pipeline_tests::wait_for("healthy", Duration::from_secs(30), || async {
        Ok(healthcheck(&cap, port).await?.then_some(()))
    })
    .await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(1, 10)")
        .await?;
    pipeline_tests::wait_for("first rows", Duration::from_secs(30), || async {
        Ok((cap.recorded_events("public.t").await?.len() == 10).then_some(()))
    })
    .await?;

    // PostgreSQL stops (fast shutdown): the stream is cut, /healthz says so, the capture waits.
    pg.stop("fast")?;
    pipeline_tests::wait_for("unhealthy", Duration::from_secs(30), || async {
        Ok((!healthcheck(&cap, port).await?).then_some(()))
    })
    .await?;
    assert!(child.try_wait()?.is_none(), "the capture keeps retrying");
    pg.restart_stopped()?;
    pipeline_tests::wait_for("healthy again", Duration::from_secs(60), || async {
        Ok(healthcheck(&cap, port).await?.then_some(()))
    })
    .await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(11, 20)")
        .await?;
    // The replication connection is cut from the server side mid-stream, too.
    pg.execute(
        &db,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_replication",
    )
    .await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(21, 30)")
        .await?;
    pipeline_tests::wait_for(
        "every row after the restarts",
        Duration::from_secs(60),
        || async { Ok((cap.recorded_events("public.t").await?.len() >= 30).then_some(())) },
    )
    .await
    .with_context(|| cap.log())?;
    let ids: Vec<i64> = cap
        .recorded_events("public.t")
        .await?
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids, (1..=30).collect::<Vec<_>>());
    child.start_kill()?;
    Ok(())
}

#[tokio::test]
async fn an_idle_databases_slot_keeps_advancing_while_another_database_writes() -> anyhow::Result<()>
{
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let idle_db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let busy_db = setup(&pg, "CREATE TABLE busy (id int PRIMARY KEY)").await?;
    let mut cap = CaptureSetup::new(&pg, &idle_db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "300".into()));
    cap.create_publication_and_slot().await?;
    let child = cap.spawn(&[])?;
    let start = cap.confirmed_flush_lsn().await?;
    for i in 0..20 {
        pg.execute(
            &busy_db,
            &format!(
                "INSERT INTO busy SELECT generate_series({}, {})",
                i * 100 + 1,
                i * 100 + 100
            ),
        )
        .await?;
    }
    let busy_client = pg.connect(&busy_db).await?;
    let busy_end: String = busy_client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let busy_end: cdc_contract::Lsn = busy_end.parse()?;
    let moved = pipeline_tests::wait_for(
        "the idle slot's confirmed_flush_lsn to pass the busy database's writes",
        Duration::from_secs(60),
        || async {
            let now = cap.confirmed_flush_lsn().await?;
            Ok((now >= busy_end).then_some(now))
        },
    )
    .await?;
    assert!(moved > start);
    // What is confirmed is recorded: the ledger's checkpoint is at or past it.
    let checkpoint = cap.checkpoint().await?.context("checkpoint")?;
    assert!(checkpoint.lsn >= moved);
    assert!(checkpoint.caught_up_ms.is_some());
    drop(child);
    Ok(())
}

#[tokio::test]
async fn start_up_checks_fire_on_databases_that_trip_them() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE keyed (id int PRIMARY KEY);
         CREATE TABLE nokey (v text);
         CREATE TABLE parted (id int, at date) PARTITION BY RANGE (at);
         CREATE TABLE parted_2025 PARTITION OF parted FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
         CREATE ROLE plain LOGIN PASSWORD 'plainpw';
         CREATE PUBLICATION partial_pub FOR TABLE keyed, parted_2025;",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    let run = |env: Vec<(&str, &str)>| {
        let mut cmd = cap.command()?;
        cmd.arg("--exit-when-caught-up");
        for (k, v) in env {
            cmd.env(k, v);
        }
        anyhow::Ok(cmd)
    };
    // A missing publication is created (all tables), then tables without a key are reported.
    let out = run(vec![("CDC_PUBLICATION", "created_pub")])?
        .output()
        .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("publication created"), "{log}");
    assert!(
        log.contains("public.nokey has no primary key or replica identity"),
        "{log}"
    );
    assert!(!log.contains("public.keyed has no primary key"), "{log}");

    // A configured table the publication misses: stop, with the fix.
    let out = run(vec![
        ("CDC_PUBLICATION", "partial_pub"),
        ("CDC_TABLES", "public.keyed,public.nokey"),
    ])?
    .output()
    .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("CDC_TABLES: ") && log.contains("nokey") && log.contains("not in publication"),
        "{log}"
    );

    // A partition published on its own.
    let out = run(vec![
        ("CDC_PUBLICATION", "partial_pub"),
        ("CDC_SLOT_NAME", "other_slot"),
    ])?
    .output()
    .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("public.parted_2025 is a partition published on its own"),
        "{log}"
    );

    // A role without REPLICATION.
    let out = run(vec![
        ("CDC_PUBLICATION", "partial_pub"),
        ("POSTGRES_USER", "plain"),
        ("POSTGRES_PASSWORD", "plainpw"),
        ("CDC_SLOT_NAME", "plain_slot"),
    ])?
    .output()
    .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        log.contains("POSTGRES_USER plain may not replicate"),
        "{log}"
    );

    // wal_level below logical.
    let replica = PgCluster::start_with(pipeline_tests::postgres::ClusterOptions {
        extra_conf: vec!["wal_level = replica".into()],
        ..Default::default()
    })?;
    let out = run(vec![
        ("POSTGRES_PORT", &replica.port.to_string()),
        ("POSTGRES_DATABASE", "postgres"),
    ])?
    .output()
    .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(log.contains("wal_level is replica"), "{log}");
    Ok(())
}

#[tokio::test]
async fn a_dropped_slot_with_a_checkpoint_stops_the_capture_with_the_way_out() -> anyhow::Result<()>
{
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, "INSERT INTO t VALUES (1)").await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(
        &db,
        &format!("SELECT pg_drop_replication_slot('{}')", cap.slot),
    )
    .await?;
    let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
    assert!(!out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("does not exist but the ledger holds a checkpoint"),
        "{log}"
    );
    assert!(log.contains("CDC_RECREATE_SLOT=true"), "{log}");
    Ok(())
}

async fn table_state(
    pg: &PgCluster,
    db: &str,
    sql: &str,
) -> anyhow::Result<std::collections::BTreeMap<String, Value>> {
    let client = pg.connect(db).await?;
    let rows = client.query(sql, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| {
            let id: i32 = r.get(0);
            let v: Option<String> = r.get(1);
            (id.to_string(), json!({"id": id, "v": v}))
        })
        .collect())
}

#[tokio::test]
async fn a_new_slot_snapshots_existing_rows_once_then_streams_without_a_gap() -> anyhow::Result<()>
{
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'old-' || g FROM generate_series(1, 3000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_MAX_BYTES".into(), "65536".into()));
    let child = cap.spawn(&[])?;
    // Writes while the snapshot runs and after it.
    for i in 0..40 {
        pg.execute(
            &db,
            &format!(
                "BEGIN; UPDATE t SET v = 'new-{i}' WHERE id % 40 = {i}; INSERT INTO t VALUES ({}, 'ins'); DELETE FROM t WHERE id = {}; COMMIT;",
                10_000 + i,
                i * 7 + 1
            ),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.t").await?;
    let reads: Vec<&Value> = events.iter().filter(|e| e["op"] == "r").collect();
    let read_ids: std::collections::BTreeSet<i64> = reads
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(read_ids.len(), reads.len(), "no row read twice");
    assert!(reads.iter().all(|e| e["source"]["snapshot"] == "true"));
    // A row is left out of its chunk only when a write the chunk's read did not see reached
    // it before the chunk's watermark: the stream carries that row's newer state.
    let streamed_ids: std::collections::BTreeSet<i64> = events
        .iter()
        .filter(|e| e["op"] != "r")
        .map(|e| {
            let image = if e["after"].is_null() {
                &e["before"]
            } else {
                &e["after"]
            };
            image["id"].as_i64().unwrap_or(0)
        })
        .collect();
    let state = table_state(&pg, &db, "SELECT id, v FROM t").await?;
    for id in state.keys() {
        let id: i64 = id.parse()?;
        assert!(
            read_ids.contains(&id) || streamed_ids.contains(&id),
            "row {id} neither read nor streamed"
        );
    }
    assert_eq!(
        replay(&events),
        state,
        "replaying the events gives the table"
    );
    Ok(())
}

/// SIGKILL at random moments while three tables are backfilled in many chunks, with writes
/// between the kills: every row arrives once (no chunk staged twice), replaying each table's
/// events gives the table, and the recorded progress never goes back.
#[tokio::test]
async fn a_backfill_killed_at_random_moments_resumes_and_every_row_arrives_once(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         CREATE TABLE c (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, repeat('a', 100) FROM generate_series(1, 4000) g;
         INSERT INTO b SELECT g, repeat('b', 100) FROM generate_series(1, 3000) g;
         INSERT INTO c SELECT g, repeat('c', 100) FROM generate_series(1, 2000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_MAX_BYTES".into(), "65536".into()));
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "16384".into()));
    let seed: u64 = std::env::var("CDC_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng = rng
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (rng >> 33) % n
    };
    // (table, rows recorded) per observation; a table read completely counts as u64::MAX.
    let mut seen: Vec<std::collections::BTreeMap<String, u64>> = Vec::new();
    let mut mid_backfill = 0;
    for round in 0..6u64 {
        let child = cap.spawn(&[])?;
        tokio::time::sleep(Duration::from_millis(300 + next(1200))).await;
        let mut child = child;
        child.start_kill()?;
        child.wait().await?;
        pg.execute(
            &db,
            &format!(
                "UPDATE a SET v = 'upd-{round}' WHERE id % 97 = {round};
                 INSERT INTO b VALUES ({}, 'new');
                 DELETE FROM c WHERE id = {};",
                100_000 + round,
                round * 13 + 1
            ),
        )
        .await?;
        let Some(backfill) = cap.checkpoint().await?.and_then(|c| c.backfill) else {
            continue;
        };
        let mut progress = std::collections::BTreeMap::new();
        for t in &backfill.known {
            progress.insert(t.to_string(), u64::MAX);
        }
        for p in &backfill.pending {
            progress.insert(p.table.to_string(), p.rows);
            if p.rows > 0 {
                mid_backfill += 1;
            }
        }
        if let Some(before) = seen.last() {
            for (table, rows) in before {
                let now = progress.get(table).copied().unwrap_or(0);
                assert!(
                    now >= *rows,
                    "seed {seed}: {table}'s recorded progress went back from {rows} to {now}"
                );
            }
        }
        seen.push(progress);
    }
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| format!("seed {seed}"))?;
    let backfill = cap
        .checkpoint()
        .await?
        .and_then(|c| c.backfill)
        .context("backfill progress in the checkpoint")?;
    assert!(backfill.pending.is_empty(), "seed {seed}: {backfill:?}");
    assert_eq!(backfill.known.len(), 3, "seed {seed}: {backfill:?}");
    for table in ["a", "b", "c"] {
        let events = cap.recorded_events(&format!("public.{table}")).await?;
        let reads: Vec<i64> = events
            .iter()
            .filter(|e| e["op"] == "r")
            .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
            .collect();
        let distinct: std::collections::BTreeSet<i64> = reads.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            reads.len(),
            "seed {seed}: a row of {table} read twice"
        );
        let state = table_state(&pg, &db, &format!("SELECT id, v FROM {table}")).await?;
        assert_eq!(
            replay(&events),
            state,
            "seed {seed}: replaying {table}'s events gives the table"
        );
    }
    eprintln!("seed {seed}: {mid_backfill} kill(s) observed mid-backfill");
    let reports = cap
        .compact_and_verify(&["public.a", "public.b", "public.c"])
        .await?;
    assert_eq!(reports.len(), 3);
    Ok(())
}

#[tokio::test]
async fn every_metric_line_is_emf_with_documented_names() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(&pg, "CREATE TABLE t (id int PRIMARY KEY)").await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    pg.execute(&db, "INSERT INTO t SELECT generate_series(1, 100)")
        .await?;
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    let catalogue = cdc_contract::metrics::catalogue();
    let mut seen = std::collections::BTreeSet::new();
    for line in String::from_utf8(out.stdout)?.lines() {
        let v: Value = serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        let cw = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cw["Namespace"], catalogue.namespace.as_str());
        assert_eq!(cw["Dimensions"], json!([[catalogue.dimension]]));
        assert_eq!(v[&catalogue.dimension], cap.slot.as_str());
        assert!(v["_aws"]["Timestamp"].is_i64());
        for m in cw["Metrics"].as_array().context("Metrics")? {
            let name = m["Name"].as_str().context("Name")?;
            let def = catalogue
                .metrics
                .iter()
                .find(|d| d.name == name)
                .with_context(|| format!("undocumented metric {name}"))?;
            assert_eq!(def.emitter, "capture");
            assert_eq!(m["Unit"], def.unit.as_str());
            assert!(v[name].is_number(), "{name} has no value: {line}");
            seen.insert(name.to_owned());
        }
    }
    for expected in [
        "FlushRows",
        "FlushBytes",
        "FlushLatency",
        "CommitToLedgerLatency",
        "ReplicationLagBytes",
        "ReplicationLagSeconds",
    ] {
        assert!(
            seen.contains(expected),
            "{expected} never emitted: {seen:?}"
        );
    }

    // Per-table dimensions only when asked for: flush rows and bytes per table.
    pg.execute(
        &db,
        "CREATE TABLE u (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(101, 130); INSERT INTO u SELECT generate_series(1, 7)",
    )
    .await?;
    let mut per_table = CaptureSetup::new(&pg, &db, &aws);
    per_table.slot = cap.slot.clone();
    per_table
        .env
        .push(("METRICS_PER_TABLE".into(), "true".into()));
    // Table u is new to the capture: streamed only, so the flushed rows are its inserts.
    per_table
        .env
        .push(("CDC_BACKFILL_NEW_TABLES".into(), "false".into()));
    let out = per_table.run_until_caught_up(CAUGHT_UP).await?;
    let mut rows: std::collections::BTreeMap<String, f64> = Default::default();
    for line in String::from_utf8(out.stdout)?.lines() {
        let v: Value = serde_json::from_str(line)?;
        let dims = &v["_aws"]["CloudWatchMetrics"][0]["Dimensions"];
        if *dims == json!([[catalogue.dimension, catalogue.table_dimension]]) {
            let table = v[&catalogue.table_dimension].as_str().context("Table")?;
            *rows.entry(table.to_owned()).or_default() +=
                v["FlushRows"].as_f64().context("rows")?;
            assert!(v["FlushBytes"].as_f64().is_some_and(|b| b > 0.0), "{line}");
        }
    }
    assert_eq!(rows.get("public.t"), Some(&30.0), "{rows:?}");
    assert_eq!(rows.get("public.u"), Some(&7.0), "{rows:?}");
    Ok(())
}

/// Issue 18, item 1: a first deployment whose database refuses the login (the password secret not
/// set yet) does not crash-loop into a rollback: the capture stays up and healthy, says why and
/// what fixes it, and once the login is fixed it goes on without a restart.
#[tokio::test]
async fn a_capture_whose_login_is_refused_waits_healthy_and_goes_on_once_fixed(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY); CREATE ROLE cdc LOGIN SUPERUSER PASSWORD 'not-yet'",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    cap.env.extend([
        ("HEALTH_PORT".into(), port.to_string()),
        ("POSTGRES_USER".into(), "cdc".into()),
        ("POSTGRES_PASSWORD".into(), "the-secret".into()),
    ]);
    let mut child = cap.spawn(&[])?;
    pipeline_tests::wait_for(
        "the login refused twice",
        Duration::from_secs(60),
        || async { Ok((cap.log().matches("waiting for the database").count() >= 2).then_some(())) },
    )
    .await?;
    assert!(child.try_wait()?.is_none(), "the capture keeps waiting");
    assert!(cap.log().contains("POSTGRES_PASSWORD"), "{}", cap.log());
    assert!(healthcheck(&cap, port).await?, "healthy while it waits");

    pg.execute(&db, "ALTER ROLE cdc PASSWORD 'the-secret'")
        .await?;
    pg.execute(&db, "INSERT INTO t VALUES (1), (2)").await?;
    pipeline_tests::wait_for("the rows recorded", Duration::from_secs(90), || async {
        Ok((cap.recorded_events("public.t").await?.len() == 2).then_some(()))
    })
    .await
    .with_context(|| cap.log())?;
    assert!(child.try_wait()?.is_none(), "no restart");
    assert!(cap.log().contains("connected to the database"));
    child.start_kill()?;
    Ok(())
}

/// A publication's column list and row filter (PostgreSQL 15+) hold for the snapshot exactly as
/// for the stream: an excluded column or a filtered-out row never reaches S3.
#[tokio::test]
async fn the_snapshot_honours_the_publications_column_list_and_row_filter() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE users (id int PRIMARY KEY, name text, secret text);
         INSERT INTO users SELECT g, 'name-' || g, 'secret-' || g FROM generate_series(1, 1000) g;
         CREATE TABLE other (id int PRIMARY KEY, v text);
         INSERT INTO other SELECT g, 'v' FROM generate_series(1, 10) g;
         CREATE PUBLICATION pub_all FOR TABLE users (id, name) WHERE (id % 2 = 0), other;",
    )
    .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    let child = cap.spawn(&[])?;
    // Streamed once the slot exists (after its snapshot's consistent point): the same rules.
    let client = pg.connect(&db).await?;
    let deadline = std::time::Instant::now() + CAUGHT_UP;
    while client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1",
            &[&cap.slot],
        )
        .await?
        .is_none()
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no slot: {}",
            cap.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.execute(
        &db,
        "INSERT INTO users SELECT g, 'name-' || g, 'secret-' || g FROM generate_series(1001, 1010) g;
         UPDATE users SET name = 'renamed', secret = 'changed' WHERE id IN (2, 3, 1002, 1003);",
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.users").await?;
    let reads: Vec<&Value> = events.iter().filter(|e| e["op"] == "r").collect();
    // The backfill runs while the stream goes on: the rows inserted after the slot may be read
    // as well (after their streamed insert), and a row the read did not see changed is left to
    // the stream.
    let read_ids: std::collections::BTreeSet<i64> = reads
        .iter()
        .filter_map(|e| e["after"]["id"].as_i64())
        .collect();
    assert_eq!(read_ids.len(), reads.len(), "no row read twice");
    assert!(
        (2..=1000)
            .step_by(2)
            .filter(|id| !read_ids.contains(id))
            .all(|id| id == 2),
        "only the rows the filter admits, and all of them, are read: {} reads",
        reads.len()
    );
    assert!(read_ids.iter().all(|id| id % 2 == 0 && *id <= 1010));
    for event in &events {
        let after = &event["after"];
        let id = after["id"].as_i64().context("id")?;
        assert_eq!(id % 2, 0, "a filtered-out row was recorded: {event}");
        assert!(
            after.get("secret").is_none() && !event.to_string().contains("secret-"),
            "an excluded column was recorded: {event}"
        );
        assert!(after.get("name").is_some(), "{event}");
    }
    let streamed: Vec<i64> = events
        .iter()
        .filter(|e| e["op"] != "r")
        .filter_map(|e| e["after"]["id"].as_i64())
        .collect();
    assert_eq!(streamed, vec![1002, 1004, 1006, 1008, 1010, 2, 1002]);
    // A table without a list or filter is read whole.
    let other = cap.recorded_events("public.other").await?;
    assert_eq!(other.len(), 10);
    assert!(other.iter().all(|e| e["after"]["v"] == "v"));
    Ok(())
}

/// `/healthz` is a liveness probe: 200 while an initial snapshot makes progress under the lease,
/// however long it takes (the deployed health check would otherwise replace the task after about
/// 2.5 minutes and a first deployment on a large database would never get past its snapshot).
#[tokio::test]
async fn healthz_stays_healthy_throughout_a_long_snapshot() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, repeat('x', 40) || g FROM generate_series(1, 3000000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    cap.env.push(("HEALTH_PORT".into(), port.to_string()));
    let mut child = cap.spawn(&[])?;
    // From the moment the stream is up: before it (the snapshot is announced first), the task is
    // starting, which ECS's health check grace period covers.
    pipeline_tests::wait_for("the snapshot to start", Duration::from_secs(60), || async {
        let log = cap.log();
        Ok(
            (log.contains("initial snapshot started") && log.contains("streaming slot="))
                .then_some(()),
        )
    })
    .await?;
    let mut polls = 0;
    let mut unhealthy = Vec::new();
    while !cap.log().contains("backfill complete") {
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "the capture stopped: {}",
            cap.log()
        );
        // The answer itself, however slow a loaded machine makes it: a 503 is what fails.
        let (status, body) = healthz(port).await?;
        if status != 200 && !cap.log().contains("backfill complete") {
            unhealthy.push(format!("{status} {body}"));
        }
        polls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        polls >= 3,
        "the snapshot was too short to observe ({polls} polls)"
    );
    assert!(
        unhealthy.is_empty(),
        "/healthz was unhealthy at {} of {polls} polls during the snapshot: {unhealthy:?}\n{}",
        unhealthy.len(),
        cap.log()
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    pipeline_tests::wait_for("streaming and healthy", Duration::from_secs(30), || async {
        Ok(healthcheck(&cap, port).await?.then_some(()))
    })
    .await?;
    child.start_kill()?;
    Ok(())
}

/// `CDC_SNAPSHOT=initial_only` takes the initial snapshot and exits; a later run in `initial`
/// streams on from it without a gap or a second snapshot.
#[tokio::test]
async fn initial_only_takes_the_snapshot_and_exits_then_initial_streams_on() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'old' FROM generate_series(1, 500) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("CDC_SNAPSHOT".into(), "initial_only".into()));
    let out = tokio::time::timeout(CAUGHT_UP, cap.command()?.output())
        .await
        .context("initial_only did not exit")??;
    anyhow::ensure!(
        out.status.success(),
        "exit {:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(events.len(), 500);
    assert!(events.iter().all(|e| e["op"] == "r"));
    pg.execute(
        &db,
        "INSERT INTO t VALUES (501, 'new'); UPDATE t SET v = 'changed' WHERE id = 1;",
    )
    .await?;
    cap.env.retain(|(k, _)| k != "CDC_SNAPSHOT");
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(
        ops(&events[500..]),
        vec!["c", "u"],
        "streamed on, no second snapshot"
    );
    let state = table_state(&pg, &db, "SELECT id, v FROM t").await?;
    assert_eq!(replay(&events), state);
    Ok(())
}

/// SIGTERM during a long initial snapshot stops the capture within seconds (ECS kills a task 30 s
/// after SIGTERM) with its progress recorded; the next start resumes after the last recorded
/// chunk and every row arrives once.
#[tokio::test]
async fn sigterm_during_a_snapshot_stops_at_once_and_the_next_start_resumes_it(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE big (id int PRIMARY KEY, v text);
         INSERT INTO big SELECT g, 'v' || g FROM generate_series(1, 300000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_MAX_BYTES".into(), "1048576".into()));
    let child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the snapshot to start", Duration::from_secs(60), || async {
        Ok(cap.log().contains("initial snapshot started").then_some(()))
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    anyhow::ensure!(
        !cap.log().contains("backfill complete"),
        "the snapshot ended before the signal: make the table larger"
    );
    cap.stop(child, Duration::from_secs(30)).await?;
    assert!(
        cap.log().contains("stopped on request during a backfill"),
        "{}",
        cap.log()
    );
    let recorded = cap
        .checkpoint()
        .await?
        .and_then(|c| c.backfill)
        .and_then(|b| b.pending.first().map(|p| p.rows))
        .unwrap_or(0);
    assert!(recorded > 0, "progress recorded at the stop");
    cap.run_until_caught_up(Duration::from_secs(180))
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.big").await?;
    let ids: std::collections::BTreeSet<i64> = events
        .iter()
        .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(events.len(), 300_000, "every row once");
    assert_eq!(ids.len(), 300_000);
    Ok(())
}

/// Writes from several sessions hit a table while it is backfilled in small chunks: updates
/// and deletes of rows inside, before and after the chunk being read, inserts past its end,
/// and transactions held open across chunk reads. Replaying the recorded events by order key
/// gives the table, no row is read twice, and `cdc-verify --compare-rows` agrees.
#[tokio::test]
async fn a_table_backfilled_while_writes_hit_it_replays_to_the_table() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, repeat('x', 80) || g FROM generate_series(1, 20000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "32768".into()));
    let child = cap.spawn(&[])?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..3u64 {
        let client = pg.connect(&db).await?;
        let stop = stop.clone();
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            let mut rng = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(w + 1);
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let a = 1 + next(20_000);
                let b = 1 + next(20_000);
                let sql = match w {
                    // Short transactions anywhere in the key range.
                    0 => format!(
                        "BEGIN; UPDATE t SET v = 'w0-{i}' WHERE id = {a}; DELETE FROM t WHERE id = {b}; \
                         INSERT INTO t VALUES ({}, 'ins') ON CONFLICT (id) DO UPDATE SET v = 'reins'; COMMIT;",
                        1 + next(20_000)
                    ),
                    // Inserts past the end and key changes.
                    1 => format!(
                        "BEGIN; INSERT INTO t VALUES ({}, 'tail'); UPDATE t SET id = {} WHERE id = {a}; COMMIT;",
                        20_000 + i,
                        100_000 + w * 100_000 + i
                    ),
                    // Transactions held open across chunk reads.
                    _ => format!(
                        "BEGIN; UPDATE t SET v = 'long-{i}' WHERE id IN ({a}, {b}); SELECT pg_sleep(0.15); COMMIT;"
                    ),
                };
                if let Err(e) = client.batch_execute(&sql).await {
                    // A key change can collide with another writer's: that transaction rolls back.
                    let _ = client.batch_execute("ROLLBACK").await;
                    if e.code().is_none() {
                        return Err(anyhow::anyhow!(e));
                    }
                }
                // Paced: in a tight loop the writers ran 16,000 transactions in 12 s alone, and
                // the backfill took over 120 s once in a full run on two loaded cores.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok::<_, anyhow::Error>(i)
        }));
    }
    pipeline_tests::wait_for("the backfill to end", Duration::from_secs(300), || async {
        Ok(cap.log().contains("backfill complete").then_some(()))
    })
    .await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut transactions = 0;
    for w in writers {
        transactions += w.await??;
    }
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.t").await?;
    let reads: Vec<i64> = events
        .iter()
        .filter(|e| e["op"] == "r")
        .map(|e| e["after"]["id"].as_i64().unwrap_or(0))
        .collect();
    let distinct: std::collections::BTreeSet<i64> = reads.iter().copied().collect();
    assert_eq!(distinct.len(), reads.len(), "no row read twice");
    assert!(
        transactions > 20,
        "only {transactions} write transactions ran"
    );
    let state = table_state(&pg, &db, "SELECT id, v FROM t").await?;
    assert_eq!(
        replay(&events),
        state,
        "replaying the events gives the table"
    );
    cap.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

/// A table added to the publication while the capture runs is backfilled: its rows from
/// before arrive as op "r", its later changes streamed, and the replay is the table.
#[tokio::test]
async fn a_table_added_to_the_publication_later_gets_its_history() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' FROM generate_series(1, 100) g;
         INSERT INTO b SELECT g, 'b' FROM generate_series(1, 3000) g;
         CREATE PUBLICATION pub_all FOR TABLE a;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "500".into()));
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    let child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the first backfill", Duration::from_secs(60), || async {
        Ok(cap.log().contains("backfill complete").then_some(()))
    })
    .await?;
    pg.execute(
        &db,
        "UPDATE b SET v = 'before-add' WHERE id <= 10;
         ALTER PUBLICATION pub_all ADD TABLE b;
         UPDATE b SET v = 'after-add' WHERE id BETWEEN 11 AND 20;
         DELETE FROM b WHERE id BETWEEN 21 AND 30;
         INSERT INTO b VALUES (5000, 'new');",
    )
    .await?;
    pipeline_tests::wait_for(
        "the new table's backfill",
        Duration::from_secs(60),
        || async {
            Ok(cap
                .log()
                .contains("table backfilled table=public.b")
                .then_some(()))
        },
    )
    .await?;
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.b").await?;
    let reads = events.iter().filter(|e| e["op"] == "r").count();
    assert!(reads >= 2960, "{reads} rows of the new table read");
    let state = table_state(&pg, &db, "SELECT id, v FROM b").await?;
    assert_eq!(replay(&events), state);
    // The first table was not read again.
    let a = cap.recorded_events("public.a").await?;
    assert_eq!(a.iter().filter(|e| e["op"] == "r").count(), 100);
    cap.compact_and_verify(&["public.a", "public.b"]).await?;
    Ok(())
}

/// `capture request-snapshot --table public.a` while the capture streams: table a is read
/// again (each row once more, as op "r"), table b is not, and both replay to their tables.
#[tokio::test]
async fn a_snapshot_of_one_table_asked_for_while_others_stream() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE a (id int PRIMARY KEY, v text);
         CREATE TABLE b (id int PRIMARY KEY, v text);
         INSERT INTO a SELECT g, 'a' FROM generate_series(1, 2000) g;
         INSERT INTO b SELECT g, 'b' FROM generate_series(1, 500) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "500".into()));
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    let child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the initial backfill", Duration::from_secs(60), || async {
        Ok(cap.log().contains("backfill complete").then_some(()))
    })
    .await?;
    pg.execute(
        &db,
        "UPDATE a SET v = 'changed' WHERE id <= 5; INSERT INTO b VALUES (501, 'b')",
    )
    .await?;
    let out = cap
        .command()?
        .args(["request-snapshot", "--table", "public.a"])
        .output()
        .await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = cap
        .command()?
        .args(["request-snapshot", "--table", "no-dot"])
        .output()
        .await?;
    assert!(!bad.status.success(), "a malformed table name is refused");
    pipeline_tests::wait_for(
        "the asked-for backfill",
        Duration::from_secs(60),
        || async {
            Ok((cap.log().matches("table backfilled table=public.a").count() >= 2).then_some(()))
        },
    )
    .await?;
    pg.execute(&db, "UPDATE b SET v = 'later' WHERE id = 1")
        .await?;
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let a = cap.recorded_events("public.a").await?;
    assert_eq!(a.iter().filter(|e| e["op"] == "r").count(), 4000);
    assert_eq!(
        replay(&a),
        table_state(&pg, &db, "SELECT id, v FROM a").await?
    );
    let b = cap.recorded_events("public.b").await?;
    assert_eq!(b.iter().filter(|e| e["op"] == "r").count(), 500);
    assert_eq!(
        replay(&b),
        table_state(&pg, &db, "SELECT id, v FROM b").await?
    );
    // The request is gone once recorded: a restart does not read the table a third time.
    let requests = aws
        .ledger_table()
        .query_prefix(
            cdc_contract::ledger::slot_pk(&cap.slot),
            cdc_contract::ledger::BACKFILL_REQUEST_PREFIX,
        )
        .await?;
    assert!(requests.is_empty(), "{requests:?}");
    Ok(())
}

/// Replays events of a table without a key as a multiset of rows.
fn replay_rows(events: &[Value]) -> Vec<String> {
    let mut rows: Vec<String> = Vec::new();
    let remove = |rows: &mut Vec<String>, row: &Value| {
        let row = row.to_string();
        if let Some(i) = rows.iter().position(|r| *r == row) {
            rows.swap_remove(i);
        }
    };
    for ev in events {
        match ev["op"].as_str() {
            Some("c") | Some("r") => rows.push(ev["after"].to_string()),
            Some("u") => {
                remove(&mut rows, &ev["before"]);
                rows.push(ev["after"].to_string());
            }
            Some("d") => remove(&mut rows, &ev["before"]),
            Some("t") => rows.clear(),
            _ => {}
        }
    }
    rows.sort();
    rows
}

/// A table without a key (REPLICA IDENTITY FULL) is read in one chunk while inserts, updates
/// and deletes hit it: its changes are held until that read is placed, so replaying its events
/// as a multiset of rows gives the table, duplicates included.
#[tokio::test]
async fn a_table_without_a_key_is_read_once_while_it_changes() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = setup(
        &pg,
        "CREATE TABLE k (id int PRIMARY KEY, v text);
         INSERT INTO k SELECT g, repeat('k', 200) FROM generate_series(1, 20000) g;
         CREATE TABLE log (n int, v text);
         ALTER TABLE log REPLICA IDENTITY FULL;
         INSERT INTO log SELECT g % 50, 'same' FROM generate_series(1, 3000) g;
         CREATE PUBLICATION pub_all FOR ALL TABLES;",
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    cap.env
        .push(("CDC_SNAPSHOT_CHUNK_BYTES".into(), "65536".into()));
    let child = cap.spawn(&[])?;
    let client = pg.connect(&db).await?;
    for i in 0..60 {
        client
            .batch_execute(&format!(
                "BEGIN; INSERT INTO log VALUES ({}, 'same'), (7, 'new-{i}');
                 UPDATE log SET v = 'upd-{i}' WHERE ctid = (SELECT ctid FROM log WHERE n = {} LIMIT 1);
                 DELETE FROM log WHERE ctid = (SELECT ctid FROM log WHERE n = {} LIMIT 1);
                 COMMIT;",
                i % 50,
                i % 50,
                (i + 25) % 50
            ))
            .await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    pipeline_tests::wait_for("the backfill to end", Duration::from_secs(300), || async {
        Ok(cap.log().contains("backfill complete").then_some(()))
    })
    .await?;
    cap.stop(child, Duration::from_secs(60)).await?;
    cap.run_until_caught_up(CAUGHT_UP)
        .await
        .with_context(|| cap.log())?;
    let events = cap.recorded_events("public.log").await?;
    let reads = events.iter().filter(|e| e["op"] == "r").count();
    assert!(reads >= 2900, "{reads} rows read");
    let rows = client.query("SELECT n, v FROM log", &[]).await?;
    let mut table: Vec<String> = rows
        .iter()
        .map(|r| {
            json!({"n": r.get::<_, Option<i32>>(0), "v": r.get::<_, Option<String>>(1)}).to_string()
        })
        .collect();
    table.sort();
    assert_eq!(
        replay_rows(&events),
        table,
        "replaying the events gives the table"
    );
    // Asked again, it is refused: a second read would double its rows.
    cap.command()?
        .args(["request-snapshot", "--table", "public.log"])
        .output()
        .await?;
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a table without a key is not read again"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cap.recorded_events("public.log").await?.len(), events.len());
    Ok(())
}

/// A flush of more table-hours than a 256 KiB SQS message holds (the limit notifications keep
/// within; the emulator takes up to 1 MiB) is told in several messages, each within it, naming
/// every table-hour once.
#[tokio::test]
async fn a_notification_too_large_for_one_message_is_sent_in_several() -> anyhow::Result<()> {
    use capture::notify::{Notifier, SqsNotifier};
    use cdc_contract::notify::{Notification, TableHour, SQS_MAX_BODY_BYTES};

    let aws = AwsFixture::new().await?;
    let hours: Vec<TableHour> = (0..6000)
        .map(|i| TableHour {
            table: cdc_contract::TableName::new("public", format!("orders_partition_{i:05}")),
            hour: cdc_contract::Hour::from_millis(
                1_736_330_400_000 + i64::from(i % 24) * 3_600_000,
            ),
        })
        .collect();
    let note = Notification {
        slot: "app".into(),
        flush_id: "000000000042-1".into(),
        commit_ms: 1_736_332_200_123,
        caught_up_ms: None,
        hours: hours.clone(),
    };
    assert!(serde_json::to_string(&note)?.len() > SQS_MAX_BODY_BYTES);
    SqsNotifier::new(aws.sqs.clone(), aws.queue_url.clone())
        .notify(&note)
        .await
        .map_err(anyhow::Error::msg)?;
    let bodies = aws.drain_queue().await?;
    assert!(bodies.len() > 1, "{} messages", bodies.len());
    let mut told = Vec::new();
    for body in &bodies {
        assert!(
            body.len() <= SQS_MAX_BODY_BYTES,
            "a message of {} bytes",
            body.len()
        );
        let piece: Notification = serde_json::from_str(body)?;
        assert_eq!(
            (piece.slot.as_str(), piece.flush_id.as_str()),
            ("app", "000000000042-1")
        );
        told.extend(piece.hours);
    }
    told.sort();
    let mut expected = hours;
    expected.sort();
    assert_eq!(told, expected, "every table-hour told once");

    // A queue that is gone: every message fails, and the error names the send.
    let gone = format!("{}-gone", aws.queue_url);
    let error = SqsNotifier::new(aws.sqs.clone(), gone)
        .notify(&note)
        .await
        .expect_err("sending to a queue that does not exist fails");
    assert!(error.contains("send notification"), "{error}");
    Ok(())
}
