//! The streamer: the select loop over the replication stream, the flush timers and the
//! heartbeat, carrying out the flushes the [`Assembler`] asks for (one in flight at a time)
//! and confirming only what the ledger recorded, in one place ([`Streamer::confirm`]).
//! Reconnects from the recorded checkpoint when the stream or the SQL connection breaks.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use cdc_contract::event::Op;
use cdc_contract::layout::Layout;
use cdc_contract::ledger::Checkpoint;
use cdc_contract::{metrics, Lsn};

use crate::assemble::{Assembler, Want};
use crate::config::Settings;
use crate::flush::{FlushError, FlushOutcome, Flusher};
use crate::pgoutput::PgOutput;
use crate::pipeline::{now_ms, CaptureError, Deps, Stopped};
use crate::source::{Incoming, ReplicationSource, SlotStatus, Upstream};

type Inflight = tokio::task::JoinHandle<Result<FlushOutcome, FlushError>>;

/// The streaming side of a run.
pub struct Streamer<'a> {
    settings: &'a Settings,
    flusher: Arc<Flusher>,
    /// Transaction assembly and the checkpoints.
    pub asm: Assembler,
    inflight: Option<Inflight>,
    metrics: Option<Arc<dyn Fn(String) + Send + Sync>>,
    health: Arc<crate::health::Health>,
}

impl<'a> Streamer<'a> {
    /// A streamer resuming from `recorded`, writing under the lease `owner`/`epoch`; `target`
    /// (with the time it was read) for `--exit-when-caught-up`.
    pub fn new(
        settings: &'a Settings,
        deps: &Deps,
        owner: &str,
        epoch: u64,
        recorded: Checkpoint,
        target: Option<(Lsn, i64)>,
    ) -> Self {
        tracing::info!(lsn = %recorded.lsn, partial = ?recorded.partial.map(|p| p.key()), flush_seq = recorded.flush_seq, "resuming from the ledger's checkpoint");
        let flusher = Arc::new(Flusher {
            slot: settings.slot.clone(),
            layout: Layout::new(&settings.shared.base_path),
            sink: deps.sink.clone(),
            ledger: deps.ledger.clone(),
            notifier: deps.notifier.clone(),
            owner: owner.to_owned(),
            epoch,
            upload_concurrency: 8,
            crash_at: std::env::var("CDC_TEST_CRASH_AT")
                .ok()
                .filter(|v| !v.is_empty()),
        });
        Streamer {
            settings,
            flusher,
            asm: Assembler::new(settings, recorded, target),
            inflight: None,
            metrics: deps.metrics.clone(),
            health: deps.health.clone(),
        }
    }

    /// Streams until shutdown, `--exit-when-caught-up` or a definite error, reconnecting from
    /// the recorded checkpoint when a connection breaks.
    pub async fn run(
        &mut self,
        upstream: &mut dyn Upstream,
        shutdown: &CancellationToken,
        lease_lost: &CancellationToken,
    ) -> Result<Stopped, CaptureError> {
        let slot = &self.settings.slot;
        let mut attempt = 0u32;
        loop {
            let started = match upstream.reconnect_sql().await {
                Ok(()) => self.start(upstream).await.map_err(|e| ("replication", e)),
                Err(e) => Err(("sql", e)),
            };
            let mut source = match started {
                Ok(source) => {
                    attempt = 0;
                    source
                }
                // Transient failures are retried (any failure to open the SQL connection is).
                Err((which, e)) if e.is_reconnectable() => {
                    let wait = Duration::from_millis((500u64 << attempt.min(6)).min(30_000));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "{which} connection failed; retrying");
                    attempt += 1;
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(Stopped::Shutdown),
                        _ = lease_lost.cancelled() => return Err(CaptureError::LeaseLost("renewal failed".into())),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
                Err((_, e)) => return Err(e),
            };
            tracing::info!(slot = %slot, start = %self.asm.recorded().lsn, "streaming");
            self.health.set_streaming(true);
            let outcome = self
                .run_stream(upstream, source.as_mut(), shutdown, lease_lost)
                .await;
            self.health.set_streaming(false);
            match outcome {
                Ok(stopped) => return Ok(stopped),
                Err(e) if e.is_reconnectable() => {
                    let which = match e {
                        CaptureError::Replication(_) => "replication stream",
                        _ => "sql connection",
                    };
                    tracing::warn!(error = %e, "{which} broke; reconnecting from the recorded checkpoint");
                    // What was buffered but not recorded is sent again.
                    self.wait_inflight().await?;
                    self.asm.reset();
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Checks the slot is not ahead of the ledger, then starts a stream at the checkpoint.
    async fn start(
        &mut self,
        upstream: &mut dyn Upstream,
    ) -> Result<Box<dyn ReplicationSource>, CaptureError> {
        let recorded = self.asm.recorded().lsn;
        // The slot must not be ahead of the ledger: PostgreSQL would silently start past the
        // checkpoint, and the changes between would be lost (a slot another task recreated).
        if recorded > Lsn::ZERO {
            match upstream.slot_confirmed().await {
                Ok(Some(confirmed)) if confirmed > recorded => {
                    return Err(CaptureError::Setup(format!(
                        "replication slot {:?} is confirmed up to {confirmed}, past the ledger's checkpoint {recorded}: \
                         changes between them are gone (was the slot recreated by another task?). Start the \
                         capture with CDC_RECREATE_SLOT=true after dropping the slot to fill the gap with a new snapshot",
                        self.settings.slot
                    )));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "reading the slot's confirmed position failed")
                }
            }
        }
        upstream.start(recorded).await
    }

    /// The one place a position is confirmed: the recorded checkpoint's.
    async fn confirm(&self, source: &mut dyn ReplicationSource) -> Result<(), CaptureError> {
        source.confirm(self.asm.recorded().lsn).await
    }

    async fn run_stream(
        &mut self,
        upstream: &mut dyn Upstream,
        source: &mut dyn ReplicationSource,
        shutdown: &CancellationToken,
        lease_lost: &CancellationToken,
    ) -> Result<Stopped, CaptureError> {
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slot_tick = tokio::time::interval(self.settings.heartbeat_interval());
        slot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let flush_deadline = self.asm.flush_deadline();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.flush_on_shutdown().await?;
                    let _ = self.confirm(source).await;
                    tracing::info!(lsn = %self.asm.recorded().lsn, "stopped on request; buffered changes recorded");
                    return Ok(Stopped::Shutdown);
                }
                _ = lease_lost.cancelled() => {
                    return Err(CaptureError::LeaseLost("renewal was refused".into()));
                }
                done = async { self.inflight.as_mut().expect("guarded").await }, if self.inflight.is_some() => {
                    self.inflight = None;
                    self.flush_done(done)?;
                    self.confirm(source).await?;
                    if self.asm.caught_up(false) {
                        return Ok(Stopped::CaughtUp);
                    }
                }
                _ = sleep_until(flush_deadline), if flush_deadline.is_some() => {
                    self.flush(Want::Committed, false).await?;
                }
                msg = source.next() => {
                    match msg? {
                        Incoming::Message { msg, wal_start } => {
                            self.handle(upstream, msg, wal_start).await?;
                        }
                        Incoming::Keepalive { wal_end, reply_requested } => {
                            tracing::trace!(wal_end = %wal_end, reply_requested, "keepalive");
                            self.asm.keepalive(wal_end);
                            self.maybe_heartbeat().await?;
                            if self.asm.caught_up(self.inflight.is_some()) && !self.asm.in_transaction() {
                                return Ok(Stopped::CaughtUp);
                            }
                            if reply_requested {
                                self.confirm(source).await?;
                            }
                        }
                    }
                }
                _ = slot_tick.tick() => {
                    self.slot_heartbeat(upstream).await?;
                }
                _ = status_tick.tick() => {
                    self.confirm(source).await?;
                    self.maybe_heartbeat().await?;
                    if self.asm.caught_up(self.inflight.is_some()) && !self.asm.in_transaction() {
                        return Ok(Stopped::CaughtUp);
                    }
                }
            }
        }
    }

    async fn handle(
        &mut self,
        upstream: &mut dyn Upstream,
        msg: PgOutput,
        wal_start: Lsn,
    ) -> Result<(), CaptureError> {
        let want = match msg {
            PgOutput::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                self.asm.begin(final_lsn, commit_ts, xid);
                None
            }
            PgOutput::Commit {
                end_lsn, commit_ts, ..
            } => self.asm.commit(end_lsn, commit_ts),
            PgOutput::Relation(rel) => {
                let schema = upstream.table_schema(&rel, self.asm.knows(rel.oid)).await?;
                self.asm.relation(&rel, schema);
                None
            }
            PgOutput::Insert { rel, new } => {
                self.asm
                    .change(rel, Op::Create, None, Some(&new), wal_start)?
            }
            PgOutput::Update { rel, old, new } => {
                self.asm
                    .change(rel, Op::Update, old, Some(&new), wal_start)?
            }
            PgOutput::Delete { rel, old } => {
                self.asm.change(rel, Op::Delete, old, None, wal_start)?
            }
            PgOutput::Truncate { rels, .. } => {
                for rel in rels {
                    if let Some(want) = self.asm.change(rel, Op::Truncate, None, None, wal_start)? {
                        self.flush(want, false).await?;
                    }
                }
                None
            }
            PgOutput::Type { .. } | PgOutput::Origin { .. } | PgOutput::Message { .. } => None,
        };
        if let Some(want) = want {
            self.flush(want, false).await?;
        }
        Ok(())
    }

    /// On the heartbeat timer: emit a logical message while idle, so a quiet database's slot
    /// still sees WAL and moves; take a caught-up probe; report slot health and lag.
    async fn slot_heartbeat(&mut self, upstream: &mut dyn Upstream) -> Result<(), CaptureError> {
        if !self.asm.in_transaction() && self.asm.is_empty() {
            // Fails only when the connection is lost: reconnect (both connections), since
            // without it no probe is proven again.
            upstream.emit_heartbeat().await?;
        }
        // Read before the query: everything committed before this time is below the position read.
        let probe_ms = now_ms();
        let (current, wal_status, safe_wal) =
            match upstream.slot_status(&self.settings.slot).await? {
                SlotStatus::Present {
                    current,
                    wal_status,
                    safe_wal,
                } => (current, wal_status, safe_wal),
                SlotStatus::Unread => return Ok(()),
                SlotStatus::Missing => {
                    return Err(CaptureError::Setup(format!(
                        "replication slot {:?} was dropped while streaming",
                        self.settings.slot
                    )))
                }
            };
        self.asm.probe(current, probe_ms);
        if wal_status == "lost" {
            return Err(CaptureError::Setup(format!(
                "replication slot {:?} is invalidated (wal_status = lost): changes since the checkpoint are gone",
                self.settings.slot
            )));
        }
        if wal_status == "unreserved" {
            tracing::warn!(slot = %self.settings.slot, "slot's WAL is unreserved: it will be lost at the next checkpoint unless the capture catches up");
        }
        if let Some(emit) = &self.metrics {
            let now = now_ms();
            let recorded = self.asm.recorded();
            let lag_bytes = current.0.saturating_sub(recorded.lsn.0) as f64;
            let lag_s = ((now - recorded.closing_ms()).max(0) / 1000) as f64;
            let mut values = vec![
                (metrics::REPLICATION_LAG_BYTES, lag_bytes),
                (metrics::REPLICATION_LAG_SECONDS, lag_s),
                (
                    metrics::SLOT_WAL_LOST,
                    if matches!(wal_status.as_str(), "lost" | "unreserved") {
                        1.0
                    } else {
                        0.0
                    },
                ),
            ];
            if let Some(safe) = safe_wal {
                values.push((metrics::SLOT_SAFE_WAL_BYTES, safe as f64));
            }
            emit(metrics::emf_line(&self.settings.slot, now, &values));
        }
        Ok(())
    }

    async fn maybe_heartbeat(&mut self) -> Result<(), CaptureError> {
        match self.asm.heartbeat(self.inflight.is_some()) {
            Some((want, notify_empty)) => self.flush(want, notify_empty).await,
            None => Ok(()),
        }
    }

    /// What `/healthz` reports.
    pub fn health(&self) -> &crate::health::Health {
        &self.health
    }

    /// Waits for the flush in flight, if any, and takes in its outcome.
    pub async fn wait_inflight(&mut self) -> Result<(), CaptureError> {
        if let Some(handle) = self.inflight.take() {
            let done = handle.await;
            self.flush_done(done)?;
        }
        Ok(())
    }

    fn flush_done(
        &mut self,
        done: Result<Result<FlushOutcome, FlushError>, tokio::task::JoinError>,
    ) -> Result<(), CaptureError> {
        let outcome = match done {
            Ok(Ok(o)) => o,
            Ok(Err(FlushError::Fenced(e))) => return Err(CaptureError::LeaseLost(e.to_string())),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(CaptureError::Setup(format!("flush task failed: {e}"))),
        };
        let cp = &outcome.checkpoint;
        tracing::debug!(lsn = %cp.lsn, rows = outcome.rows, bytes = outcome.bytes, latency_ms = outcome.latency.as_millis() as u64, "flush recorded");
        if let Some(emit) = &self.metrics {
            if outcome.rows > 0 {
                let now = now_ms();
                emit(metrics::emf_line(
                    &self.settings.slot,
                    now,
                    &[
                        (metrics::FLUSH_ROWS, outcome.rows as f64),
                        (metrics::FLUSH_BYTES, outcome.bytes as f64),
                        (metrics::FLUSH_LATENCY, outcome.latency.as_millis() as f64),
                        (metrics::FLUSH_RETRIES, outcome.retries as f64),
                        (
                            metrics::COMMIT_TO_LEDGER_LATENCY,
                            (now - cp.commit_ms).max(0) as f64,
                        ),
                    ],
                ));
                if self.settings.flags.metrics_per_table {
                    for (table, rows, bytes) in &outcome.tables {
                        emit(metrics::emf_table_line(
                            &self.settings.slot,
                            &table.to_string(),
                            now,
                            &[
                                (metrics::FLUSH_ROWS, *rows as f64),
                                (metrics::FLUSH_BYTES, *bytes as f64),
                            ],
                        ));
                    }
                }
            }
        }
        self.asm.flush_recorded(outcome.checkpoint);
        self.health.recorded(now_ms());
        Ok(())
    }

    /// Starts the flush `want` asks for, once the one in flight has completed.
    pub async fn flush(&mut self, want: Want, notify_empty: bool) -> Result<(), CaptureError> {
        self.wait_inflight().await?;
        let (segments, checkpoint, seq) = self.asm.take_flush(want);
        let flusher = self.flusher.clone();
        self.inflight = Some(tokio::spawn(async move {
            flusher.flush(segments, checkpoint, seq, notify_empty).await
        }));
        Ok(())
    }

    async fn flush_on_shutdown(&mut self) -> Result<(), CaptureError> {
        if !self.asm.is_empty() {
            self.flush(Want::Shutdown, false).await?;
        }
        self.wait_inflight().await
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
