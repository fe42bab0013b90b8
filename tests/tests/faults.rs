//! The fault suite: each test causes a fault for real (SIGKILL, AWS errors and timeouts through a
//! fault-injecting proxy, PostgreSQL restarts and cut connections, two captures on one slot, a
//! killed or doubled compactor, a bucket that disappears), then lets the pipeline finish and runs
//! `cdc-verify`: every change in the final files exactly once, and replaying them gives the
//! table's rows.
//!
//! `CDC_FAULT_ROUNDS` sets the SIGKILL rounds (3 by default; the long run uses 25 or more).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use tokio::task::JoinHandle;

use pipeline_tests::aws::AwsFixture;
use pipeline_tests::capture::CaptureSetup;
use pipeline_tests::faultproxy::{Fault, FaultProxy};
use pipeline_tests::postgres::PgCluster;
use pipeline_tests::Rng;

const CAUGHT_UP: Duration = Duration::from_secs(240);

const SCHEMA: &str = "CREATE TABLE a (id bigint PRIMARY KEY, v text, n numeric(12,2), tags text[], doc jsonb, at timestamptz DEFAULT now());
CREATE TABLE b (id bigserial PRIMARY KEY, note text);";

async fn database(pg: &PgCluster, preexisting: i64) -> anyhow::Result<String> {
    let db = pg.create_database("faults").await?;
    pg.execute(&db, SCHEMA).await?;
    if preexisting > 0 {
        pg.execute(
            &db,
            &format!(
                "INSERT INTO a (id, v, n, tags, doc) SELECT g, md5(g::text), g * 1.25, ARRAY['x', g::text], jsonb_build_object('g', g) FROM generate_series(1, {preexisting}) g"
            ),
        )
        .await?;
    }
    Ok(db)
}

/// A steady write load: small transactions of inserts, updates (some changing the key),
/// deletes, and two-table transactions, until stopped. Survives a restarting server by
/// reconnecting.
struct Load {
    stop: Arc<AtomicBool>,
    statements: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Load {
    fn start(pg: &PgCluster, db: &str, first_id: i64) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let statements = Arc::new(AtomicU64::new(0));
        let conn_str = pg.conn_str(db);
        let (s, n) = (stop.clone(), statements.clone());
        let task = tokio::spawn(async move {
            let mut rng = Rng::new(first_id as u64 * 0x2545_F491);
            let mut next = first_id;
            let mut client: Option<tokio_postgres::Client> = None;
            while !s.load(Ordering::Relaxed) {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    match tokio_postgres::connect(&conn_str, tokio_postgres::NoTls).await {
                        Ok((c, conn)) => {
                            tokio::spawn(conn);
                            client = Some(c);
                        }
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    }
                }
                let Some(c) = client.as_ref() else { continue };
                let r = rng.below(100);
                let sql = if r < 50 {
                    let k = 1 + rng.below(20) as i64;
                    let sql = format!(
                        "INSERT INTO a (id, v, n, tags, doc) SELECT g, md5(g::text), g * 0.5, ARRAY[g::text], jsonb_build_object('g', g, 'r', {r}) FROM generate_series({next}, {}) g",
                        next + k - 1
                    );
                    next += k;
                    sql
                } else if r < 75 {
                    format!(
                        "UPDATE a SET v = v || 'u', n = n + 1, doc = doc || '{{\"u\": true}}' WHERE id % 53 = {}",
                        rng.below(53)
                    )
                } else if r < 85 {
                    format!("DELETE FROM a WHERE id % 197 = {}", rng.below(197))
                } else if r < 90 {
                    // A key change: the row moves past every id the load will insert.
                    "UPDATE a SET id = id + 1000000000 WHERE id = (SELECT min(id) FROM a WHERE id < 1000000000)".to_owned()
                } else {
                    format!(
                        "BEGIN; INSERT INTO b (note) SELECT 'n' || g FROM generate_series(1, {}) g; UPDATE a SET tags = tags || 'b'::text WHERE id % 89 = {}; DELETE FROM b WHERE id % 31 = {}; COMMIT;",
                        1 + rng.below(5),
                        rng.below(89),
                        rng.below(31)
                    )
                };
                match c.batch_execute(&sql).await {
                    Ok(()) => {
                        n.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        // The server went away mid-statement: whether it committed or not, the
                        // table's rows are what verification compares with.
                        client = None;
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5 + rng.below(20))).await;
            }
            Ok(())
        });
        Load {
            stop,
            statements,
            task,
        }
    }

    async fn stop(self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await??;
        Ok(self.statements.load(Ordering::Relaxed))
    }
}

fn total(reports: &[Value], field: &str) -> u64 {
    reports.iter().filter_map(|r| r[field].as_u64()).sum()
}

/// Guarantee 4: the slot's confirmed position is never past the ledger's checkpoint. A
/// checkpoint at 0/0 (only snapshot progress recorded so far) names no position: streaming
/// starts where the capture created the slot, which is the slot's confirmed position until
/// the capture confirms one it recorded (the capture's own start check skips it alike).
async fn assert_slot_behind_ledger(cap: &CaptureSetup<'_>) -> anyhow::Result<()> {
    if let Some(cp) = cap
        .checkpoint()
        .await?
        .filter(|cp| cp.lsn > cdc_contract::Lsn::ZERO)
    {
        let confirmed = cap.confirmed_flush_lsn().await?;
        anyhow::ensure!(
            confirmed <= cp.lsn,
            "the slot confirmed {confirmed}, past the ledger's checkpoint {}",
            cp.lsn
        );
    }
    Ok(())
}

async fn sigterm(child: &mut tokio::process::Child) -> anyhow::Result<()> {
    if let Some(pid) = child.id() {
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_capture_killed_at_random_moments_under_steady_writes_loses_and_doubles_nothing(
) -> anyhow::Result<()> {
    let rounds: u32 = std::env::var("CDC_FAULT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let started = Instant::now();
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 3000).await?;
    // No slot yet: the first capture creates the publication and the slot and snapshots the
    // existing rows, so early kills land mid-snapshot too.
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("FLUSH_INTERVAL_MS".into(), "200".into()));
    let load = Load::start(&pg, &db, 100_000);
    let mut rng = Rng::from_time();
    // Meanwhile the compactor sweeps open hours over and over, as a busy deployment's triggers
    // would: it meets incomplete snapshots, hours still being written and late batches.
    let stop = AtomicBool::new(false);
    let sweeps = AtomicU64::new(0);
    let sweeper = async {
        while !stop.load(Ordering::Relaxed) {
            let mut cmd = cap.compactor_command()?;
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            cmd.status().await?;
            sweeps.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        Ok::<(), anyhow::Error>(())
    };
    let kills = async {
        let result = async {
            for round in 0..rounds {
                let mut child = cap.spawn(&[])?;
                let ms = 300 + rng.below(2500);
                tokio::time::sleep(Duration::from_millis(ms)).await;
                anyhow::ensure!(
                    child.try_wait()?.is_none(),
                    "round {round}: the capture exited by itself: {}",
                    cap.log()
                );
                child.start_kill()?;
                child.wait().await?;
                assert_slot_behind_ledger(&cap).await?;
            }
            Ok(())
        }
        .await;
        stop.store(true, Ordering::Relaxed);
        result
    };
    let (killed, swept) = tokio::join!(kills, sweeper);
    killed?;
    swept?;
    let statements = load.stop().await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    assert_slot_behind_ledger(&cap).await?;
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    let changes = total(&reports, "final_changes");
    assert!(changes > 3000, "{reports:?}");
    assert_eq!(
        total(&reports, "replayed_rows"),
        total(&reports, "table_rows")
    );
    eprintln!(
        "SIGKILL run: {rounds} rounds, {} compactor sweeps meanwhile, {statements} write statements, {changes} changes in the final files, verified: lost 0, duplicated 0, {:.0} s",
        sweeps.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_errors_timeouts_and_dropped_connections_before_capture_and_compactor_lose_nothing(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 500).await?;
    // Every fourth call to S3, DynamoDB or SQS, from the capture and the compactor alike: 503,
    // throttled, reply lost after it took effect, connection dropped before it, or a reply held
    // beyond the clients' attempt timeout.
    let proxy = FaultProxy::start(
        &aws.endpoint,
        4,
        vec![
            Fault::Unavailable,
            Fault::Throttle,
            Fault::LoseReply,
            Fault::Drop,
            Fault::Slow,
        ],
    )
    .await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env
        .push(("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone()));
    cap.env
        .push(("AWS_ATTEMPT_TIMEOUT_MS".into(), "1500".into()));
    // A compaction that failed and could not give its claim up blocks its hour this long.
    cap.env.push(("HOUR_CLAIM_SECONDS".into(), "3".into()));
    let mut child = cap.spawn(&[])?;
    let load = Load::start(&pg, &db, 100_000);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let statements = load.stop().await?;
    // The capture kept going through the faults: still running, and recording.
    anyhow::ensure!(
        child.try_wait()?.is_none(),
        "the capture exited: {}",
        cap.log()
    );
    anyhow::ensure!(cap.checkpoint().await?.is_some(), "nothing recorded");
    sigterm(&mut child).await?;
    // Still through the proxy.
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let faults_capture = proxy.faults();
    // The compactor, through the same faults, until a sweep ends clean (Lambda retries).
    cap.compact(20).await?;
    let faults = proxy.faults();
    cap.env.retain(|(k, _)| !k.starts_with("AWS_"));
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    assert!(
        faults_capture >= 10 && faults > faults_capture,
        "faults injected: {faults_capture} before compaction, {faults} in all"
    );
    eprintln!(
        "AWS faults: {statements} write statements, {faults} faults injected ({faults_capture} on the capture), {} changes verified",
        total(&reports, "final_changes")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_and_cut_replication_connections_are_resumed() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 200).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env.push(("HEARTBEAT_INTERVAL_MS".into(), "500".into()));
    let mut child = cap.spawn(&[])?;
    pipeline_tests::wait_for("the first checkpoint", CAUGHT_UP, || async {
        Ok(cap.checkpoint().await?.map(|_| ()))
    })
    .await?;
    let load = Load::start(&pg, &db, 100_000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..2 {
        // Cut the replication connection mid-stream.
        pg.execute(
            &db,
            &format!(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{}' AND active_pid IS NOT NULL",
                cap.slot
            ),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    // A fast shutdown and a restart of the server.
    pg.stop("fast")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.restart_stopped()?;
    let before = cap.checkpoint().await?.map(|c| c.lsn).unwrap_or_default();
    let deadline = Instant::now() + CAUGHT_UP;
    loop {
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "the capture exited instead of reconnecting: {}",
            cap.log()
        );
        if cap.checkpoint().await?.is_some_and(|c| c.lsn > before) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the capture recorded nothing after the restart: {}",
            cap.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let statements = load.stop().await?;
    sigterm(&mut child).await?;
    let log = cap.log();
    assert!(log.contains("retrying"), "{log}");
    cap.run_until_caught_up(CAUGHT_UP).await?;
    assert_slot_behind_ledger(&cap).await?;
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    assert!(statements > 0 && total(&reports, "final_changes") > 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_second_capture_takes_over_when_the_holder_is_killed() -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 100).await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    // As in an ECS rolling deployment: the old task runs, the new one starts beside it.
    let mut old = cap.spawn(&[])?;
    pipeline_tests::wait_for("the first checkpoint", CAUGHT_UP, || async {
        Ok(cap.checkpoint().await?.map(|_| ()))
    })
    .await?;
    let load = Load::start(&pg, &db, 100_000);
    let mut new = cap.spawn(&[])?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(new.try_wait()?.is_none(), "the new task waits");
    let epochs = |batches: std::collections::BTreeMap<_, Vec<cdc_contract::ledger::BatchItem>>| {
        batches
            .values()
            .flatten()
            .map(|b| b.flush_id.epoch)
            .collect::<std::collections::BTreeSet<u64>>()
    };
    assert_eq!(
        epochs(cap.recorded_batches().await?).len(),
        1,
        "only the lease holder records"
    );
    // The holder dies without a word; the waiting task takes over once the lease lapses.
    old.start_kill()?;
    old.wait().await?;
    pipeline_tests::wait_for("the new task to record", CAUGHT_UP, || async {
        Ok((epochs(cap.recorded_batches().await?).len() == 2).then_some(()))
    })
    .await?;
    let _ = load.stop().await?;
    sigterm(&mut new).await?;
    let log = cap.log();
    assert!(log.contains("slot is leased by another capture"), "{log}");
    cap.run_until_caught_up(CAUGHT_UP).await?;
    cap.compact_and_verify(&["public.a", "public.b"]).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compactor_killed_mid_hour_or_run_twice_at_once_leaves_each_change_once(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 0).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.create_publication_and_slot().await?;
    for i in 0..6 {
        pg.execute(
            &db,
            &format!(
                "INSERT INTO a (id, v, n, tags, doc) SELECT g, repeat(md5(g::text), 4), g, ARRAY[g::text], jsonb_build_object('g', g) FROM generate_series({}, {}) g; UPDATE a SET v = 'u' WHERE id % 10 = {i}",
                i * 5000 + 1,
                i * 5000 + 5000
            ),
        )
        .await?;
    }
    cap.run_until_caught_up(CAUGHT_UP).await?;
    // Small parts, so a compaction is many recorded steps and a kill lands between them.
    cap.env.push(("PART_MAX_BYTES".into(), "65536".into()));
    cap.env.push(("HOUR_CLAIM_SECONDS".into(), "2".into()));
    let mut rng = Rng::from_time();
    let mut killed = 0;
    for _ in 0..3 {
        let mut child = cap
            .compactor_command()?
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        tokio::time::sleep(Duration::from_millis(200 + rng.below(1500))).await;
        if child.try_wait()?.is_none() {
            killed += 1;
        }
        child.start_kill()?;
        child.wait().await?;
        // Let the killed attempt's claim lapse.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    // Two invocations at once; then one more finishes whatever the busy one left.
    let (a, b) = tokio::join!(
        cap.compactor_command()?.output(),
        cap.compactor_command()?.output()
    );
    let (a, b) = (a?, b?);
    assert!(
        a.status.success() && b.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    let reports = cap.compact_and_verify(&["public.a"]).await?;
    assert_eq!(total(&reports, "final_changes"), 30_000 + 10_500);
    assert!(total(&reports, "parts") > 3, "{reports:?}");
    eprintln!("compactor killed {killed} time(s) mid-run");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_disappears_stops_the_capture_without_confirming_past_the_ledger(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 0).await?;
    let proxy = FaultProxy::start(&aws.endpoint, 0, vec![]).await?;
    let mut cap = CaptureSetup::new(&pg, &db, &aws);
    cap.env
        .push(("AWS_ENDPOINT_URL".into(), proxy.endpoint.clone()));
    cap.create_publication_and_slot().await?;
    let mut child = cap.spawn(&[])?;
    pg.execute(
        &db,
        "INSERT INTO b (note) SELECT 'n' || g FROM generate_series(1, 100) g",
    )
    .await?;
    pipeline_tests::wait_for("100 recorded changes", CAUGHT_UP, || async {
        Ok((cap.recorded_events("public.b").await?.len() == 100).then_some(()))
    })
    .await?;
    proxy.force(Some(Fault::NoSuchBucket));
    pg.execute(
        &db,
        "INSERT INTO b (note) SELECT 'm' || g FROM generate_series(1, 100) g",
    )
    .await?;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .context("the capture must stop when its bucket is gone")??;
    assert!(!status.success());
    let log = cap.log();
    assert!(log.contains("NoSuchBucket"), "{log}");
    assert_eq!(cap.recorded_events("public.b").await?.len(), 100);
    assert_slot_behind_ledger(&cap).await?;
    // A restarted task refuses to start while the bucket is missing, naming the setting.
    let out = cap.command()?.output().await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("S3_BUCKET_NAME"), "{err}");
    // The bucket is back: nothing was lost.
    proxy.force(None);
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let reports = cap.compact_and_verify(&["public.b"]).await?;
    assert_eq!(total(&reports, "final_changes"), 200);
    Ok(())
}

#[tokio::test]
async fn verify_passes_a_clean_pipeline_and_finds_changed_rows_duplicates_losses_and_strays(
) -> anyhow::Result<()> {
    let pg = PgCluster::start()?;
    let aws = AwsFixture::new().await?;
    let db = database(&pg, 300).await?;
    let cap = CaptureSetup::new(&pg, &db, &aws);
    cap.run_until_caught_up(CAUGHT_UP).await?;
    pg.execute(
        &db,
        "UPDATE a SET v = 'x', tags = ARRAY['y'] WHERE id <= 50; DELETE FROM a WHERE id > 280; UPDATE a SET id = id + 1000 WHERE id = 7; INSERT INTO b (note) VALUES ('one'), ('two')",
    )
    .await?;
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let reports = cap.compact_and_verify(&["public.a", "public.b"]).await?;
    assert_eq!(total(&reports, "final_changes"), 300 + 50 + 20 + 1 + 2);
    assert_eq!(total(&reports, "table_rows"), 280 + 2);

    let kinds = |v: &pipeline_tests::capture::Verified| -> Vec<String> {
        v.reports
            .iter()
            .flat_map(|r| r["findings"].as_object().cloned().unwrap_or_default())
            .map(|(k, _)| k)
            .collect()
    };
    // A change made while no capture runs: the final files are behind the table.
    pg.execute(&db, "UPDATE a SET v = 'unseen' WHERE id = 100")
        .await?;
    let v = cap.verify(&["public.a"], &[]).await?;
    assert_eq!(v.code, 1, "{v:?}");
    assert_eq!(kinds(&v), ["rows"], "{v:?}");
    // Recorded but not compacted: unchecked without --include-staging, checked with it.
    cap.run_until_caught_up(CAUGHT_UP).await?;
    let v = cap.verify(&["public.a"], &["--include-staging"]).await?;
    assert_eq!(v.code, 0, "{v:?}");
    assert_eq!(v.reports[0]["staged_changes"], 1);
    cap.compact(3).await?;

    // A line doubled in a final JSONL file.
    let keys = aws.list_keys("public.a/jsonl/").await?;
    let part = keys
        .iter()
        .find(|k| k.ends_with(".jsonl.gz"))
        .context("a jsonl part")?
        .clone();
    let lines = aws.read_jsonl_gz(&part).await?;
    let mut text = String::new();
    for l in lines.iter().chain(lines.first()) {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, text.as_bytes())?;
    let original = aws.get_bytes(&part).await?;
    aws.put_bytes(&part, gz.finish()?).await?;
    let v = cap.verify(&["public.a"], &[]).await?;
    assert_eq!(v.code, 1);
    let found = kinds(&v);
    assert!(found.contains(&"duplicate".to_owned()), "{v:?}");
    // The same file gone.
    aws.s3
        .delete_object()
        .bucket(&aws.bucket)
        .key(&part)
        .send()
        .await?;
    let v = cap.verify(&["public.a"], &[]).await?;
    assert_eq!(v.code, 1);
    assert!(kinds(&v).contains(&"missing".to_owned()), "{v:?}");
    aws.put_bytes(&part, original).await?;
    assert_eq!(cap.verify(&["public.a"], &[]).await?.code, 0);
    // A file no recorded part names, in a settled hour.
    let stray = part.replace(".jsonl.gz", "-stray.jsonl.gz");
    aws.put_bytes(&stray, aws.get_bytes(&part).await?).await?;
    let v = cap.verify(&["public.a"], &[]).await?;
    assert_eq!(v.code, 1);
    assert_eq!(kinds(&v), ["stray_file"], "{v:?}");
    // A slot the ledger does not know: could not verify at all.
    let mut other = CaptureSetup::new(&pg, &db, &aws);
    other.slot = "no_such_slot".into();
    let v = other.verify(&["public.a"], &[]).await?;
    assert_eq!(v.code, 2, "{v:?}");
    assert!(v.stderr.contains("no_such_slot"), "{}", v.stderr);
    // Settings it cannot do without, or that are bad, are named (the same ones the capture and
    // the compactor take).
    for (args, setting) in [
        (["--s3-bucket", ""], "S3_BUCKET_NAME"),
        (["--ledger-table", " "], "LEDGER_TABLE"),
        (["--aws-attempt-timeout-ms", "5"], "AWS_ATTEMPT_TIMEOUT_MS"),
    ] {
        let v = cap.verify(&["public.a"], &args).await?;
        assert_eq!(v.code, 2, "{v:?}");
        assert!(v.stderr.contains(setting), "{setting}: {}", v.stderr);
    }
    Ok(())
}
