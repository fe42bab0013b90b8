//! Server versions and roles: a server older than 14 is refused; a failover slot (17+) carries
//! the capture to a promoted standby exactly once; without one, or when the standby had not
//! received what the capture recorded, the capture stops and says how to go on; a standby (16+)
//! can be captured from; generated columns appear alike in the snapshot and the stream.
//!
//! The clusters of other versions come from `scripts/pg-versions.sh` (`.pg/<major>/bin`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::{replay, CaptureSetup};
use pipeline_tests::endpoint::Endpoint;
use pipeline_tests::postgres::{pg_bin_of, ClusterOptions, PgCluster};
use pipeline_tests::wait_for;

const CAUGHT_UP: Duration = Duration::from_secs(90);

fn cluster_of(major: u32, extra_conf: &[&str]) -> anyhow::Result<PgCluster> {
    PgCluster::start_with(ClusterOptions {
        pg_bin: Some(pg_bin_of(major)?),
        extra_conf: extra_conf.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
}

#[tokio::test]
async fn a_server_older_than_14_is_refused_naming_its_version() -> anyhow::Result<()> {
    let pg = cluster_of(13, &[])?;
    let aws = AwsFixture::new().await?;
    let db = pg.create_database("old").await?;
    pg.execute(&db, "CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    let out = tokio::time::timeout(
        CAUGHT_UP,
        cap.command()?.arg("--exit-when-caught-up").output(),
    )
    .await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("PostgreSQL 13.")
            && log.contains("is not supported")
            && log.contains("14 or later"),
        "{log}"
    );
    // Nothing was created on the server.
    let client = pg.connect(&db).await?;
    let slots: i64 = client
        .query_one("SELECT count(*) FROM pg_replication_slots", &[])
        .await?
        .get(0);
    assert_eq!(slots, 0);
    Ok(())
}

/// Writes transactions through `port` until stopped: inserts, updates and deletes on `t`,
/// reconnecting after errors (a failover cuts the connection). Returns how many committed.
fn spawn_writer(port: u16, db: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut committed = 0u64;
        let mut next_id = 1_000_000i64;
        while !stop.load(Ordering::SeqCst) {
            let conn = format!(
                "host=127.0.0.1 port={port} user=postgres password={} dbname={db} connect_timeout=5",
                pipeline_tests::postgres::SUPERUSER_PASSWORD
            );
            let Ok((client, connection)) =
                tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            tokio::spawn(async move {
                let _ = connection.await;
            });
            while !stop.load(Ordering::SeqCst) {
                let sql = format!(
                    "BEGIN; INSERT INTO t (id, v, n) VALUES ({a}, repeat('x', 200), 0), ({b}, 'y', 0); \
                     UPDATE t SET n = n + 1, v = 'u' WHERE id = {a}; DELETE FROM t WHERE id = {c}; COMMIT",
                    a = next_id,
                    b = next_id + 1,
                    c = next_id - 9
                );
                match client.batch_execute(&sql).await {
                    Ok(()) => {
                        committed += 1;
                        next_id += 2;
                    }
                    Err(_) => break,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        committed
    })
}

/// A database named after `prefix` holding table `t` (the writer's) with 300 rows.
async fn table_of_300_rows(primary: &PgCluster, prefix: &str) -> anyhow::Result<String> {
    let db = primary.create_database(prefix).await?;
    primary
        .execute(
            &db,
            "CREATE TABLE t (id bigint PRIMARY KEY, v text, n int);
             INSERT INTO t SELECT g, 'before', 0 FROM generate_series(1, 300) g;",
        )
        .await?;
    Ok(db)
}

/// The physical slot a standby made by [`PgCluster::standby_of`] streams through.
async fn physical_slot(primary: &PgCluster) -> anyhow::Result<String> {
    let client = primary.connect("postgres").await?;
    Ok(client
        .query_one(
            "SELECT slot_name::text FROM pg_replication_slots WHERE slot_type = 'physical'",
            &[],
        )
        .await?
        .get(0))
}

/// Waits until `standby` has replayed everything `primary` wrote so far.
async fn standby_caught_up(primary: &PgCluster, standby: &PgCluster) -> anyhow::Result<()> {
    let p = primary.connect("postgres").await?;
    let lsn: String = p
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let s = standby.connect("postgres").await?;
    wait_for(
        "the standby to replay the primary's WAL",
        CAUGHT_UP,
        || async {
            let behind: bool = s
                .query_one(
                    "SELECT pg_wal_lsn_diff($1::text::pg_lsn, pg_last_wal_replay_lsn()) > 0",
                    &[&lsn],
                )
                .await?
                .get(0);
            Ok((!behind).then_some(()))
        },
    )
    .await
}

/// The capture's checkpoint reaches `server`'s current WAL position.
async fn recorded_up_to_now(cap: &CaptureSetup<'_>, server: &PgCluster) -> anyhow::Result<()> {
    let client = server.connect("postgres").await?;
    let now: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let now: cdc_contract::Lsn = now.parse()?;
    wait_for(
        "the checkpoint to reach the server's position",
        CAUGHT_UP,
        || async { Ok(cap.checkpoint().await?.filter(|c| c.lsn >= now).map(|_| ())) },
    )
    .await
    .with_context(|| cap.log())
}

/// Waits until `standby` holds a synchronized copy of failover slot `slot`, ready for use
/// after a promotion.
async fn synchronized_slot(standby: &PgCluster, slot: &str) -> anyhow::Result<()> {
    let on_standby = standby.connect("postgres").await?;
    wait_for(
        "the standby's synchronized slot",
        Duration::from_secs(120),
        || async {
            let row = on_standby
                .query_opt(
                    "SELECT synced AND NOT temporary FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?;
            Ok(row
                .map(|r| r.get::<_, bool>(0))
                .filter(|ready| *ready)
                .map(|_| ()))
        },
    )
    .await
    .with_context(|| standby.server_log())
}

#[tokio::test]
async fn a_failover_slot_carries_the_capture_to_the_promoted_standby_exactly_once(
) -> anyhow::Result<()> {
    let primary = cluster_of(17, &[])?;
    let aws = AwsFixture::new().await?;
    let db = table_of_300_rows(&primary, "failover").await?;
    let standby = PgCluster::standby_of(&primary, &["sync_replication_slots = on"])?;
    // The primary sends changes to the capture only once the standby has them.
    let physical = physical_slot(&primary).await?;
    let admin = primary.connect("postgres").await?;
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET synchronized_standby_slots = '{physical}'"
        ))
        .await?;
    admin.batch_execute("SELECT pg_reload_conf()").await?;

    let endpoint = Endpoint::start(primary.port).await?;
    let mut cap = CaptureSetup::new(&primary, &db, &aws);
    cap.env.extend([
        ("POSTGRES_PORT".into(), endpoint.port.to_string()),
        ("CDC_SLOT_FAILOVER".into(), "true".into()),
        ("HEARTBEAT_INTERVAL_MS".into(), "500".into()),
    ]);
    let child = cap.spawn(&[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(endpoint.port, db.clone(), stop.clone());

    // The slot is a failover slot, and the standby keeps a synchronized copy of it.
    let slot = cap.slot.clone();
    let on_primary = primary.connect("postgres").await?;
    wait_for("the failover slot on the primary", CAUGHT_UP, || async {
        let row = on_primary
            .query_opt(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok(row.map(|r| r.get::<_, bool>(0)).filter(|f| *f))
    })
    .await
    .with_context(|| cap.log())?;
    synchronized_slot(&standby, &slot).await?;
    // Streaming under load, then the primary dies and the standby takes over at the endpoint.
    tokio::time::sleep(Duration::from_secs(2)).await;
    primary.stop("immediate")?;
    standby.promote()?;
    endpoint.move_to(standby.port);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let committed = writer.await?;
    assert!(
        committed > 20,
        "the writer committed only {committed} transactions"
    );

    let mut after = CaptureSetup::new(&standby, &db, &aws);
    after.slot = cap.slot.clone();
    recorded_up_to_now(&after, &standby).await?;
    cap.stop(child, Duration::from_secs(30)).await?;
    let log = cap.log();
    assert!(log.contains("the server was promoted"), "{log}");
    // Every row the new primary has, once, and nothing it does not.
    after
        .compact_and_verify(&["public.t"])
        .await
        .with_context(|| log.clone())?;
    Ok(())
}

#[tokio::test]
async fn without_a_failover_slot_a_failover_stops_the_capture_and_its_way_out_keeps_every_change(
) -> anyhow::Result<()> {
    let primary = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = table_of_300_rows(&primary, "nofailover").await?;
    let standby = PgCluster::standby_of(&primary, &[])?;
    let endpoint = Endpoint::start(primary.port).await?;
    let mut cap = CaptureSetup::new(&primary, &db, &aws);
    cap.env.extend([
        ("POSTGRES_PORT".into(), endpoint.port.to_string()),
        ("HEARTBEAT_INTERVAL_MS".into(), "500".into()),
    ]);
    if primary.version_num().await? < 170_000 {
        // No failover slots before 17: asking for one is refused, naming the version.
        let out = cap
            .command()?
            .env("CDC_SLOT_FAILOVER", "true")
            .arg("--exit-when-caught-up")
            .output()
            .await?;
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{log}");
        assert!(
            log.contains("CDC_SLOT_FAILOVER needs PostgreSQL 17 or later"),
            "{log}"
        );
    }
    let mut child = cap.spawn(&[])?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(endpoint.port, db.clone(), stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await?;
    recorded_up_to_now(&cap, &primary).await?;
    // A clean failover: the standby has everything; the slot stayed on the old primary.
    standby_caught_up(&primary, &standby).await?;
    // (A fast shutdown would wait up to wal_sender_timeout for the capture to confirm the
    // shutdown checkpoint, which it confirms only once recorded.)
    primary.stop("immediate")?;
    standby.promote()?;
    endpoint.move_to(standby.port);
    standby
        .execute(&db, "INSERT INTO t VALUES (-1, 'after', 0)")
        .await?;

    let status = tokio::time::timeout(CAUGHT_UP, child.wait())
        .await
        .context("the capture went on without its slot")??;
    assert!(!status.success());
    let log = cap.log();
    assert!(log.contains("the server was promoted"), "{log}");

    // Started again, it says what happened and how to go on.
    let mut after = CaptureSetup::new(&standby, &db, &aws);
    after.slot = cap.slot.clone();
    after.env = cap.env.clone();
    let out = after
        .command()?
        .arg("--exit-when-caught-up")
        .output()
        .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("does not exist but the ledger holds a checkpoint")
            && log.contains("CDC_RECREATE_SLOT=true"),
        "{log}"
    );
    // The way out: a new slot and a snapshot of every table; what was recorded stays.
    after.env.push(("CDC_RECREATE_SLOT".into(), "true".into()));
    after.run_until_caught_up(CAUGHT_UP).await?;
    after.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

/// A failover slot without `synchronized_standby_slots`: the capture can record changes the
/// standby never received. The promoted standby keeps the slot, and once its WAL has grown past
/// the checkpoint nothing but the timeline shows that those positions now name other
/// transactions: streaming on would skip them.
#[tokio::test]
async fn a_failover_to_a_standby_that_missed_recorded_changes_stops_the_capture(
) -> anyhow::Result<()> {
    let primary = cluster_of(17, &[])?;
    let aws = AwsFixture::new().await?;
    let db = primary.create_database("lostfailover").await?;
    primary
        .execute(&db, "CREATE TABLE t (id bigint PRIMARY KEY, v text, n int)")
        .await?;
    let standby = PgCluster::standby_of(&primary, &["sync_replication_slots = on"])?;
    let endpoint = Endpoint::start(primary.port).await?;
    let mut cap = CaptureSetup::new(&primary, &db, &aws);
    cap.env.extend([
        ("POSTGRES_PORT".into(), endpoint.port.to_string()),
        ("HEARTBEAT_INTERVAL_MS".into(), "500".into()),
        ("CDC_SLOT_FAILOVER".into(), "true".into()),
    ]);
    let mut child = cap.spawn(&[])?;
    primary
        .execute(&db, "INSERT INTO t VALUES (1, 'both', 0)")
        .await?;
    recorded_up_to_now(&cap, &primary).await?;
    let slot = cap.slot.clone();
    synchronized_slot(&standby, &slot).await?;
    standby_caught_up(&primary, &standby).await?;
    assert!(
        cap.log().contains("synchronized_standby_slots is empty"),
        "{}",
        cap.log()
    );
    // The standby stops receiving; the capture records more from the primary.
    let s = standby.connect("postgres").await?;
    s.batch_execute("ALTER SYSTEM SET primary_conninfo = ''")
        .await?;
    s.batch_execute("SELECT pg_reload_conf()").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    primary
        .execute(
            &db,
            "INSERT INTO t SELECT g, repeat('p', 500), 0 FROM generate_series(2, 2000) g",
        )
        .await?;
    recorded_up_to_now(&cap, &primary).await?;
    let recorded = cap.checkpoint().await?.context("checkpoint")?.lsn;
    // The failover: the standby is promoted without those rows, and its WAL grows past the
    // checkpoint before the capture reaches it (so only the timeline tells what happened).
    primary.stop("immediate")?;
    standby.promote()?;
    let p = standby.connect(&db).await?;
    for i in 0.. {
        let end: String = p
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        if end.parse::<cdc_contract::Lsn>()? > recorded {
            break;
        }
        anyhow::ensure!(i < 100, "the new primary's WAL does not grow");
        p.batch_execute(&format!("INSERT INTO t VALUES (-{i} - 10, 'new', 0)"))
            .await?;
        p.batch_execute("SELECT pg_switch_wal()").await?;
    }
    p.batch_execute("INSERT INTO t VALUES (-1, 'unseen unless caught', 0)")
        .await?;
    endpoint.move_to(standby.port);
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .with_context(|| format!("the capture went on past a lost failover: {}", cap.log()))??;
    assert!(!status.success());
    let log = cap.log();
    assert!(
        log.contains("a failover lost changes the capture had recorded")
            && log.contains("new CDC_SLOT_NAME"),
        "{log}"
    );
    // A capture started afterwards refuses too: the checkpoint names the timeline it is on.
    let out = tokio::time::timeout(
        CAUGHT_UP,
        cap.command()?.arg("--exit-when-caught-up").output(),
    )
    .await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("a failover lost changes the capture had recorded"),
        "{log}"
    );
    Ok(())
}

/// The database is restored from a backup taken before what the capture recorded (same
/// server, same timeline, the slot as it was): its WAL ends before the checkpoint, and its new
/// transactions will take the positions the capture has recorded past. The capture refuses
/// rather than skip them.
#[tokio::test]
async fn a_database_restored_from_an_older_backup_stops_the_capture() -> anyhow::Result<()> {
    let primary = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = primary.create_database("restored").await?;
    primary
        .execute(&db, "CREATE TABLE t (id bigint PRIMARY KEY, v text)")
        .await?;
    let endpoint = Endpoint::start(primary.port).await?;
    let mut cap = CaptureSetup::new(&primary, &db, &aws);
    cap.env
        .push(("POSTGRES_PORT".into(), endpoint.port.to_string()));
    primary
        .execute(&db, "INSERT INTO t VALUES (1, 'in the backup')")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let backup = PgCluster::copy_of(&primary)?;
    primary
        .execute(
            &db,
            "INSERT INTO t SELECT g, repeat('r', 300) FROM generate_series(2, 3000) g",
        )
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    // The restore: the endpoint now reaches the backup.
    primary.stop("immediate")?;
    endpoint.move_to(backup.port);
    let out = tokio::time::timeout(
        CAUGHT_UP,
        cap.command()?.arg("--exit-when-caught-up").output(),
    )
    .await??;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(
        log.contains("the server's WAL ends at") && log.contains("new CDC_SLOT_NAME"),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_standby_can_be_captured_from_with_snapshots_off() -> anyhow::Result<()> {
    let primary = cluster_of(16, &[])?;
    let aws = AwsFixture::new().await?;
    let db = primary.create_database("standby").await?;
    primary
        .execute(
            &db,
            "CREATE TABLE t (id bigint PRIMARY KEY, v text, n int);
             CREATE PUBLICATION pub_all FOR ALL TABLES;",
        )
        .await?;
    let standby = PgCluster::standby_of(&primary, &[])?;
    standby_caught_up(&primary, &standby).await?;
    let mut cap = CaptureSetup::new(&standby, &db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "500".into()));

    // A snapshot cannot be taken there: refused, saying what to set.
    let out = cap.command()?.arg("--exit-when-caught-up").output().await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("CDC_SNAPSHOT=never"), "{log}");

    cap.env.extend([
        ("CDC_SNAPSHOT".into(), "never".into()),
        ("CDC_BACKFILL_NEW_TABLES".into(), "false".into()),
    ]);
    // Creating a slot on a standby waits for the primary's next running-transactions record.
    let stop = Arc::new(AtomicBool::new(false));
    let nudger = {
        let (stop, p) = (stop.clone(), primary.connect("postgres").await?);
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let _ = p.batch_execute("SELECT pg_log_standby_snapshot()").await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let first = cap.run_until_caught_up(CAUGHT_UP).await;
    stop.store(true, Ordering::SeqCst);
    nudger.await?;
    first?;
    primary
        .execute(
            &db,
            "INSERT INTO t SELECT g, 'v' || g, 0 FROM generate_series(1, 500) g;
             UPDATE t SET n = 1 WHERE id % 7 = 0;
             DELETE FROM t WHERE id % 11 = 0;",
        )
        .await?;
    standby_caught_up(&primary, &standby).await?;
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!log.contains("heartbeat message failed"), "{log}");
    let events = cap.recorded_events("public.t").await?;
    let state = replay(&events);
    assert_eq!(state.len(), 500 - 500 / 11, "{log}");
    cap.compact_and_verify(&["public.t"]).await?;

    // A snapshot asked for while capturing from the standby is left for a primary, said once;
    // the capture goes on streaming.
    let asked = cap
        .command()?
        .args(["request-snapshot", "--table", "public.t"])
        .output()
        .await?;
    assert!(
        asked.status.success(),
        "{}",
        String::from_utf8_lossy(&asked.stderr)
    );
    primary
        .execute(&db, "INSERT INTO t VALUES (9001, 'late', 0)")
        .await?;
    standby_caught_up(&primary, &standby).await?;
    let out = cap.run_until_caught_up(CAUGHT_UP).await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("a backfill request cannot be served: the server is a standby"),
        "{log}"
    );
    let events = cap.recorded_events("public.t").await?;
    assert!(events.iter().all(|e| e["op"] != "r"), "no snapshot row");
    assert_eq!(replay(&events).len(), 500 - 500 / 11 + 1);

    // Recreating the slot there would leave a gap no snapshot can fill: refused.
    let out = cap
        .command()?
        .env("CDC_RECREATE_SLOT", "true")
        .arg("--exit-when-caught-up")
        .output()
        .await?;
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{log}");
    assert!(log.contains("new CDC_SLOT_NAME"), "{log}");

    // The standby is promoted while the capture streams from it: it goes on, and a later start
    // on the promoted server goes on too (its records are on that server's own WAL).
    let child = cap.spawn(&[])?;
    wait_for("the capture to stream", CAUGHT_UP, || async {
        Ok(cap.log().contains("streaming slot=").then_some(()))
    })
    .await?;
    primary.stop("immediate")?;
    standby.promote()?;
    standby
        .execute(&db, "INSERT INTO t VALUES (9002, 'promoted', 0)")
        .await?;
    recorded_up_to_now(&cap, &standby).await?;
    cap.stop(child, Duration::from_secs(30)).await?;
    standby
        .execute(&db, "INSERT INTO t VALUES (9003, 'after restart', 0)")
        .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let events = cap.recorded_events("public.t").await?;
    assert_eq!(replay(&events).len(), 500 - 500 / 11 + 3, "{}", cap.log());
    cap.compact_and_verify(&["public.t"]).await?;
    Ok(())
}

#[tokio::test]
async fn generated_columns_appear_alike_in_the_snapshot_and_the_stream() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let version = pg.version_num().await?;
    // 18 publishes stored generated columns when the publication says so (and never virtual
    // ones); before 18, pgoutput never sends them.
    let cases: &[bool] = if version >= 180_000 {
        &[true, false]
    } else {
        &[false]
    };
    for &publishes_generated in cases {
        // A bucket per case: both write table public.t.
        let aws = AwsFixture::new().await?;
        let virtual_column = if version >= 180_000 {
            ", half int GENERATED ALWAYS AS (a / 2) VIRTUAL"
        } else {
            ""
        };
        let db = pg.create_database("gen").await?;
        pg.execute(
            &db,
            &format!(
                "CREATE TABLE t (id int PRIMARY KEY, a int, twice int GENERATED ALWAYS AS (a * 2) STORED{virtual_column});
                 INSERT INTO t (id, a) SELECT g, g FROM generate_series(1, 50) g;
                 CREATE PUBLICATION pub_all FOR ALL TABLES{};",
                if publishes_generated {
                    " WITH (publish_generated_columns = stored)"
                } else {
                    ""
                }
            ),
        )
        .await?;
        let cap = CaptureSetup::new(&pg, &db, &aws);
        cap.run_until_caught_up(CAUGHT_UP).await?;
        pg.execute(
            &db,
            "INSERT INTO t (id, a) VALUES (51, 51); UPDATE t SET a = 100 WHERE id = 1;",
        )
        .await?;
        cap.run_until_caught_up(CAUGHT_UP).await?;
        let events = cap.recorded_events("public.t").await?;
        let snapshot: Vec<_> = events.iter().filter(|e| e["op"] == "r").collect();
        let streamed: Vec<_> = events.iter().filter(|e| e["op"] != "r").collect();
        assert_eq!(snapshot.len(), 50);
        assert_eq!(streamed.len(), 2);
        for e in snapshot.iter().chain(&streamed) {
            let after = e["after"].as_object().context("after")?;
            assert_eq!(
                after.contains_key("twice"),
                publishes_generated,
                "PostgreSQL {version}: {e}"
            );
            assert!(!after.contains_key("half"), "PostgreSQL {version}: {e}");
            if publishes_generated {
                assert_eq!(after["twice"], after["a"].as_i64().context("a")? * 2, "{e}");
            }
        }
        cap.compact_and_verify(&["public.t"]).await?;
    }
    Ok(())
}
