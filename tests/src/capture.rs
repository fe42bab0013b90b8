//! Driving the real `capture` binary against a throwaway cluster and the emulator, and reading
//! back what it recorded (through the ledger, as the compactor does).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;
use tokio::process::{Child, Command};

use cdc_contract::ledger::{self, BatchItem, Checkpoint, FlushId};
use cdc_contract::{Hour, Position, TableName};

use crate::aws::AwsFixture;
use crate::postgres::PgCluster;

/// One source database and slot, with the AWS fixture the capture writes to.
pub struct CaptureSetup<'a> {
    /// The cluster.
    pub pg: &'a PgCluster,
    /// The database.
    pub db: String,
    /// The slot.
    pub slot: String,
    /// The publication.
    pub publication: String,
    /// AWS resources.
    pub aws: &'a AwsFixture,
    /// Extra environment (flush settings, ...).
    pub env: Vec<(String, String)>,
}

impl<'a> CaptureSetup<'a> {
    /// A setup for `db` with a fresh slot name and publication `pub_all`.
    pub fn new(pg: &'a PgCluster, db: &str, aws: &'a AwsFixture) -> Self {
        Self {
            pg,
            db: db.to_owned(),
            slot: crate::unique_name("slot_"),
            publication: "pub_all".into(),
            aws,
            env: vec![
                ("FLUSH_INTERVAL_MS".into(), "300".into()),
                ("LEASE_DURATION_MS".into(), "3000".into()),
                ("HEALTH_PORT".into(), "0".into()),
            ],
        }
    }

    /// Creates the publication (for all tables) and the slot, so later writes are captured.
    pub async fn create_publication_and_slot(&self) -> anyhow::Result<()> {
        self.pg
            .execute(
                &self.db,
                &format!("CREATE PUBLICATION {} FOR ALL TABLES", self.publication),
            )
            .await?;
        self.pg
            .execute(
                &self.db,
                &format!(
                    "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
                    self.slot
                ),
            )
            .await
    }

    /// The database, slot and AWS settings of this setup, as the capture and `cdc-verify` read
    /// them, in a command with an otherwise empty environment.
    pub fn base_command(&self, binary: &str) -> anyhow::Result<Command> {
        let mut cmd = Command::new(crate::bins::bin_path(binary)?);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("POSTGRES_HOST", "127.0.0.1")
            .env("POSTGRES_PORT", self.pg.port.to_string())
            .env("POSTGRES_DATABASE", &self.db)
            .env("POSTGRES_USER", "postgres")
            .env("POSTGRES_PASSWORD", crate::postgres::SUPERUSER_PASSWORD)
            .env("PGSSLMODE", "disable")
            .env("CDC_SLOT_NAME", &self.slot)
            .envs(self.aws.env())
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// The capture command with every setting pointing at this setup.
    pub fn command(&self) -> anyhow::Result<Command> {
        let mut cmd = self.base_command("capture")?;
        cmd.env("RUST_LOG", "info,capture=debug")
            .env("CDC_PUBLICATION", &self.publication)
            .env("HOSTNAME", "test")
            .envs(self.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Ok(cmd)
    }

    /// Runs the capture with `--exit-when-caught-up` and fails unless it exits 0 within `timeout`.
    pub async fn run_until_caught_up(
        &self,
        timeout: Duration,
    ) -> anyhow::Result<std::process::Output> {
        let mut cmd = self.command()?;
        cmd.arg("--exit-when-caught-up")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("starting capture")?;
        let stdout = read_to_end(child.stdout.take());
        let stderr = read_to_end(child.stderr.take());
        let status = match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status?,
            Err(_) => {
                let _ = child.kill().await;
                let log = stderr.await.unwrap_or_default();
                let log = String::from_utf8_lossy(&log);
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                bail!(
                    "capture --exit-when-caught-up did not finish within {timeout:?}; the end of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        };
        let out = std::process::Output {
            status,
            stdout: stdout.await?,
            stderr: stderr.await?,
        };
        if !out.status.success() {
            bail!(
                "capture exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out)
    }

    /// Starts the capture in the background; its log goes to [`CaptureSetup::log_path`] (a pipe
    /// nobody reads would fill up and block it).
    pub fn spawn(&self, args: &[&str]) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = self.command()?;
        cmd.args(args).stdout(Stdio::null()).stderr(log);
        cmd.spawn().context("starting capture")
    }

    /// Stops a spawned capture with SIGTERM (a clean stop: buffered changes are recorded) and
    /// fails unless it exits 0 within `within`.
    pub async fn stop(&self, child: Child, within: Duration) -> anyhow::Result<()> {
        let pid = child.id().context("pid")?;
        let sent = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()?;
        anyhow::ensure!(sent.success(), "kill -TERM {pid}: {sent}");
        let out = tokio::time::timeout(within, child.wait_with_output())
            .await
            .with_context(|| format!("the capture did not stop within {within:?} of SIGTERM"))??;
        anyhow::ensure!(
            out.status.success(),
            "capture exited {}: {}",
            out.status,
            self.log()
        );
        Ok(())
    }

    /// Where spawned captures of this setup log.
    pub fn log_path(&self) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("{}.capture.log", self.slot))
    }

    /// The spawned captures' log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The recorded checkpoint.
    pub async fn checkpoint(&self) -> anyhow::Result<Option<Checkpoint>> {
        let item = self
            .aws
            .get_ledger_item(&ledger::slot_pk(&self.slot), ledger::CHECKPOINT_SK)
            .await?;
        Ok(match item {
            Some(i) => Some(Checkpoint::from_item(&i)?),
            None => None,
        })
    }

    /// The slot's `confirmed_flush_lsn`.
    pub async fn confirmed_flush_lsn(&self) -> anyhow::Result<cdc_contract::Lsn> {
        let client = self.pg.connect(&self.db).await?;
        let row = client
            .query_one(
                "SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        Ok(row.get::<_, String>(0).parse()?)
    }

    /// Every valid batch the ledger holds for the slot (flush record present), by table, in
    /// position order; orphans (no flush record) are left out as the compactor leaves them out.
    pub async fn recorded_batches(&self) -> anyhow::Result<BTreeMap<TableName, Vec<BatchItem>>> {
        let mut tables: BTreeMap<TableName, Vec<BatchItem>> = BTreeMap::new();
        // The hours with batches: those pending, and those the compactor has records of (it
        // clears a compacted hour's marker).
        let mut hours = std::collections::BTreeSet::new();
        for marker in self
            .aws
            .query_ledger(&ledger::pending_pk(&self.slot))
            .await?
        {
            let m = ledger::PendingHour::from_item(&marker)?;
            hours.insert((m.table, m.hour));
        }
        let mut known: std::collections::BTreeSet<TableName> =
            hours.iter().map(|(t, _)| t.clone()).collect();
        if let Some(b) = self.checkpoint().await?.and_then(|c| c.backfill) {
            known.extend(b.known);
            known.extend(b.pending.into_iter().map(|p| p.table));
        }
        for table in known {
            for item in self
                .aws
                .query_ledger(&ledger::hour_pk(&self.slot, &table))
                .await?
            {
                let record = ledger::HourRecord::from_item(&item)?;
                hours.insert((table.clone(), record.hour));
            }
        }
        let mut flushes: BTreeMap<FlushId, bool> = BTreeMap::new();
        for (table, hour) in hours {
            let items = self
                .aws
                .query_ledger(&ledger::batch_pk(&self.slot, &table, hour))
                .await?;
            for item in items {
                let batch = BatchItem::from_item(&item)?;
                let valid = match flushes.get(&batch.flush_id) {
                    Some(v) => *v,
                    None => {
                        let v = self
                            .aws
                            .get_ledger_item(
                                &ledger::slot_pk(&self.slot),
                                &ledger::flush_sk(&batch.flush_id),
                            )
                            .await?
                            .is_some();
                        flushes.insert(batch.flush_id, v);
                        v
                    }
                };
                if valid {
                    tables.entry(batch.table.clone()).or_default().push(batch);
                }
            }
        }
        for batches in tables.values_mut() {
            batches.sort_by_key(|b| b.first);
        }
        Ok(tables)
    }

    /// Every recorded event of `table`, in (commit LSN, ordinal) order; fails if two recorded
    /// batches overlap or an event repeats.
    pub async fn recorded_events(&self, table: &str) -> anyhow::Result<Vec<Value>> {
        let table: TableName = table.parse()?;
        let batches = self.recorded_batches().await?;
        let mut events = Vec::new();
        let mut last: Option<Position> = None;
        for batch in batches.get(&table).map(Vec::as_slice).unwrap_or_default() {
            if let Some(prev) = last {
                if batch.first <= prev {
                    bail!(
                        "batch {} overlaps the previous one (ends {})",
                        batch.key,
                        prev
                    );
                }
            }
            let lines = self.aws.read_jsonl_gz(&batch.key).await?;
            if lines.len() as u64 != batch.rows {
                bail!(
                    "batch {} holds {} lines, ledger says {}",
                    batch.key,
                    lines.len(),
                    batch.rows
                );
            }
            for ev in lines {
                let pos = event_position(&ev)?;
                if last.is_some_and(|l| pos <= l) {
                    bail!("event {pos} out of order or repeated");
                }
                last = Some(pos);
                events.push(ev);
            }
        }
        Ok(events)
    }

    /// The `compactor` command (`sweep --include-open` for this setup's slot) with this setup's
    /// AWS settings and [`CaptureSetup::env`] (so a fault proxy applies to both; the compactor
    /// ignores the capture's own settings).
    pub fn compactor_command(&self) -> anyhow::Result<Command> {
        let mut cmd = Command::new(crate::bins::bin_path("compactor")?);
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "text")
            .envs(self.aws.env())
            .env("CDC_SLOT_NAME", &self.slot)
            // A killed attempt's hour is listed again after a second (not the Lambda's 15
            // minutes), so the test bed's sweeps settle within a test.
            .env("STRAGGLER_WINDOW_SECONDS", "1")
            .envs(self.env.iter().cloned())
            .args(["sweep", "--include-open"])
            .stdin(Stdio::null())
            .kill_on_drop(true);
        Ok(cmd)
    }

    /// Runs [`CaptureSetup::compactor_command`] until a sweep ends without failures and leaves
    /// every hour done (as Lambda retries and the scheduled sweep would), at most `attempts`
    /// times. Returns the last sweep report.
    pub async fn compact(&self, attempts: u32) -> anyhow::Result<Value> {
        let mut last = String::new();
        for attempt in 0..attempts {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
            }
            let out =
                tokio::time::timeout(Duration::from_secs(300), self.compactor_command()?.output())
                    .await
                    .context("compactor sweep did not finish in time")??;
            let stdout = String::from_utf8_lossy(&out.stdout);
            last = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                continue;
            }
            let line = stdout
                .lines()
                .last()
                .context("compactor printed no report")?;
            let report: Value = serde_json::from_str(line)?;
            let settled = report["hours"]
                .as_array()
                .is_some_and(|hours| hours.iter().all(|h| h["state"] == "done"));
            if settled {
                return Ok(report);
            }
        }
        bail!("compactor sweeps did not settle every hour: {last}")
    }

    /// Runs `cdc-verify` on `tables` with `--compare-rows` and JSON output (plus `extra`
    /// arguments). Returns its exit code and one report per table.
    pub async fn verify(&self, tables: &[&str], extra: &[&str]) -> anyhow::Result<Verified> {
        let mut cmd = self.base_command("cdc-verify")?;
        cmd.args([
            "--table",
            &tables.join(","),
            "--compare-rows",
            "--output",
            "json",
        ])
        .args(extra)
        .stdin(Stdio::null())
        .kill_on_drop(true);
        let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
            .await
            .context("cdc-verify did not finish in time")??;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let reports = stdout
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<Vec<Value>, _>>()
            .with_context(|| format!("cdc-verify printed {stdout}"))?;
        Ok(Verified {
            code: out.status.code().unwrap_or(-1),
            reports,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// Runs `cdc-status --output json` for this setup's slot (with the database, so the slot's
    /// state on the server is included) plus `extra` arguments; its report.
    pub async fn status(&self, extra: &[&str]) -> anyhow::Result<Value> {
        let mut cmd = self.base_command("cdc-status")?;
        cmd.args(["--output", "json"]).args(extra);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .context("cdc-status did not finish in time")??;
        anyhow::ensure!(
            out.status.success(),
            "cdc-status exited {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "cdc-status printed {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Compacts, then verifies `tables` against the final files, the ledger and the table rows;
    /// fails with the reports unless `cdc-verify` passes. Returns the reports.
    pub async fn compact_and_verify(&self, tables: &[&str]) -> anyhow::Result<Vec<Value>> {
        self.compact(10).await?;
        let v = self.verify(tables, &[]).await?;
        if v.code != 0 || v.reports.len() != tables.len() {
            bail!(
                "cdc-verify exited {}: {}\n{}",
                v.code,
                serde_json::to_string_pretty(&v.reports)?,
                v.stderr
            );
        }
        Ok(v.reports)
    }

    /// The hours the slot has batches for.
    pub async fn pending_hours(&self) -> anyhow::Result<Vec<(TableName, Hour)>> {
        let markers = self
            .aws
            .query_ledger(&ledger::pending_pk(&self.slot))
            .await?;
        markers
            .iter()
            .map(|m| {
                ledger::PendingHour::from_item(m)
                    .map(|p| (p.table, p.hour))
                    .map_err(Into::into)
            })
            .collect()
    }
}

/// What `cdc-verify` said.
#[derive(Debug)]
pub struct Verified {
    /// Exit code: 0 verified, 1 findings, 2 could not verify.
    pub code: i32,
    /// One JSON report per table.
    pub reports: Vec<Value>,
    /// Its log.
    pub stderr: String,
}

/// An event's (commit LSN, ordinal).
pub fn event_position(ev: &Value) -> anyhow::Result<Position> {
    let lsn = ev["source"]["commit_lsn"]
        .as_u64()
        .context("source.commit_lsn")?;
    let ord = ev["transaction"]["total_order"]
        .as_u64()
        .context("transaction.total_order")?;
    Ok(Position::new(cdc_contract::Lsn(lsn), ord as u32))
}

/// Replays events per key (`id` column) into the final table state.
pub fn replay(events: &[Value]) -> BTreeMap<String, Value> {
    let mut state = BTreeMap::new();
    for ev in events {
        match ev["op"].as_str() {
            Some("c") | Some("r") | Some("u") => {
                if let Some(before) = ev["before"].as_object() {
                    state.remove(&before["id"].to_string());
                }
                state.insert(ev["after"]["id"].to_string(), ev["after"].clone());
            }
            Some("d") => {
                state.remove(&ev["before"]["id"].to_string());
            }
            Some("t") => state.clear(),
            _ => {}
        }
    }
    state
}

/// Peak resident memory (VmHWM) of a running process, in KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Reads a child's pipe to its end in the background (an unread pipe would fill and block it).
fn read_to_end<R>(pipe: Option<R>) -> tokio::task::JoinHandle<Vec<u8>>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = tokio::io::AsyncReadExt::read_to_end(&mut pipe, &mut bytes).await;
        }
        bytes
    })
}
