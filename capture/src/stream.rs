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
use crate::backfill::{Chunk, ChunkRequest, WATERMARK_PREFIX};
use crate::config::Settings;
use crate::encode::TableEncoder;
use crate::flush::{FlushError, FlushOutcome, Flusher};
use crate::pgoutput::PgOutput;
use crate::pipeline::{now_ms, CaptureError, Deps, Stopped};
use crate::source::{Incoming, ReplicationSource, SlotStatus, Upstream};

type Inflight = tokio::task::JoinHandle<Result<FlushOutcome, FlushError>>;
type Reading = tokio::task::JoinHandle<Result<Chunk, CaptureError>>;

/// The backfill's side of the streamer: the chunk being read and the chunks waiting for their
/// high watermarks (two at most: the next chunk is read while the last one waits).
#[derive(Default)]
struct Chunks {
    reading: Option<Reading>,
    /// Read chunks and their high watermarks' contents, in the order they were read.
    waiting: std::collections::VecDeque<(Chunk, String)>,
    /// Not before this (after a failed or refused read).
    not_before: Option<tokio::time::Instant>,
    /// Rows one chunk reads (adapted to the chunk size in bytes).
    rows: usize,
    /// Watermark contents are unique to this run.
    run: String,
    seq: u64,
    /// The encoder of each table's chunks.
    encoders: std::collections::HashMap<cdc_contract::TableName, Arc<TableEncoder>>,
    failures: u32,
    /// The backfill requests were listed once: until then no table counts as new (an initial
    /// snapshot's request not yet taken would read it a second time).
    requests_listed: bool,
    /// Requests left untaken because the server cannot be snapshotted (a standby), each
    /// reported once.
    unserved: std::collections::HashSet<String>,
}

/// The streaming side of a run.
pub struct Streamer<'a> {
    settings: &'a Settings,
    flusher: Arc<Flusher>,
    /// Transaction assembly and the checkpoints.
    pub asm: Assembler,
    inflight: Option<Inflight>,
    metrics: Option<Arc<dyn Fn(String) + Send + Sync>>,
    health: Arc<crate::health::Health>,
    ledger: Arc<dyn crate::ledger::Ledger>,
    chunks: Chunks,
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
            ledger: deps.ledger.clone(),
            chunks: Chunks {
                rows: 1000,
                run: format!("{}/{}", settings.slot, uuid::Uuid::new_v4().simple()),
                ..Default::default()
            },
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
                    self.drop_chunks();
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
                Ok(Some(confirmed)) if confirmed > recorded && self.recreated().await? => {
                    // The capture recreated the slot after asking for every table to be
                    // backfilled: the backfill fills the gap; streaming starts at the new slot.
                    tracing::info!(confirmed = %confirmed, recorded = %recorded, "the slot was recreated: streaming from its start, every table backfilled");
                    self.asm.skip_to(confirmed);
                }
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
        let source = upstream.start(recorded).await?;
        self.asm.set_timeline(upstream.timeline());
        Ok(source)
    }

    /// True when a backfill of every table is asked for and not yet recorded: the capture
    /// (re)created the slot after asking for it (`CDC_RECREATE_SLOT`, or an older version's
    /// unfinished snapshot replaced).
    async fn recreated(&self) -> Result<bool, CaptureError> {
        use cdc_contract::ledger::{parse_backfill_request_sk, BackfillRequest};
        let requests = crate::slot::retry_ledger("reading backfill requests", || {
            self.ledger.backfill_requests()
        })
        .await?;
        let taken = |sk: &String| {
            self.asm
                .recorded()
                .backfill
                .as_ref()
                .is_some_and(|b| b.taken.contains(sk))
        };
        Ok(requests.iter().any(|sk| {
            !taken(sk)
                && matches!(
                    parse_backfill_request_sk(sk),
                    Some(BackfillRequest::All | BackfillRequest::Initial)
                )
        }))
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
        // The backfill requests are listed before any message is taken in: until then a table
        // first seen cannot be told new (an initial request not yet taken would read it twice),
        // and one left untracked (a keyless table's inserts streamed unheld) would double rows.
        let mut wait = Duration::from_millis(500);
        loop {
            self.take_requests(upstream).await?;
            if self.chunks.requests_listed || self.asm.backfill().is_none() {
                break;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return self.stop_on_request(source).await,
                _ = lease_lost.cancelled() => {
                    return Err(CaptureError::LeaseLost("renewal was refused".into()));
                }
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(30));
        }
        loop {
            if let Some(stopped) = self.backfill_step(upstream).await? {
                return Ok(stopped);
            }
            let flush_deadline = self.asm.flush_deadline();
            let retry_read = self.chunks.not_before;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return self.stop_on_request(source).await,
                _ = lease_lost.cancelled() => {
                    return Err(CaptureError::LeaseLost("renewal was refused".into()));
                }
                done = async { self.inflight.as_mut().expect("guarded").await }, if self.inflight.is_some() => {
                    self.inflight = None;
                    self.flush_done(done)?;
                    self.confirm(source).await?;
                    if self.asm.caught_up(false) && self.backfill_recorded() {
                        return Ok(Stopped::CaughtUp);
                    }
                }
                read = async { self.chunks.reading.as_mut().expect("guarded").await }, if self.chunks.reading.is_some() => {
                    self.chunks.reading = None;
                    self.chunk_read(upstream, read).await?;
                }
                _ = sleep_until(retry_read), if retry_read.is_some() => {
                    self.chunks.not_before = None;
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
                            if self.asm.caught_up(self.inflight.is_some()) && !self.asm.in_transaction() && self.backfill_recorded() {
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
                    self.take_requests(upstream).await?;
                }
                _ = status_tick.tick() => {
                    self.confirm(source).await?;
                    self.maybe_heartbeat().await?;
                    if self.asm.caught_up(self.inflight.is_some()) && !self.asm.in_transaction() && self.backfill_recorded() {
                        return Ok(Stopped::CaughtUp);
                    }
                }
            }
        }
    }

    /// Shutdown was asked for: what is buffered is recorded and confirmed, then the run ends.
    async fn stop_on_request(
        &mut self,
        source: &mut dyn ReplicationSource,
    ) -> Result<Stopped, CaptureError> {
        self.flush_on_shutdown().await?;
        if let Some(p) = self
            .asm
            .recorded()
            .backfill
            .as_ref()
            .and_then(|b| b.pending.first())
        {
            tracing::info!(table = %p.table, rows = p.rows, "stopped on request during a backfill; the next start resumes after the last recorded chunk");
        }
        let _ = self.confirm(source).await;
        tracing::info!(lsn = %self.asm.recorded().lsn, "stopped on request; buffered changes recorded");
        Ok(Stopped::Shutdown)
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
                // A captured table first seen: backfilled before its changes are taken in, so
                // its tracking starts ahead of them.
                self.first_seen(
                    upstream,
                    &[cdc_contract::TableName::new(
                        rel.namespace.clone(),
                        rel.name.clone(),
                    )],
                )
                .await?;
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
            PgOutput::Message {
                transactional: false,
                lsn,
                prefix,
                content,
            } if prefix == WATERMARK_PREFIX => self.watermark(upstream, lsn, &content).await?,
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

    /// True when the recorded checkpoint has no table left to backfill.
    fn backfill_recorded(&self) -> bool {
        self.asm
            .recorded()
            .backfill
            .as_ref()
            .is_none_or(|b| b.pending.is_empty())
            && self.asm.backfill().is_none_or(|b| b.pending.is_empty())
    }

    /// The stream broke: the chunk being read or waiting is dropped (it is read again from the
    /// recorded progress, on the next stream).
    fn drop_chunks(&mut self) {
        if let Some(reading) = self.chunks.reading.take() {
            reading.abort();
        }
        self.chunks.waiting.clear();
    }

    /// Captured tables the backfill has not met: each is backfilled when
    /// `CDC_BACKFILL_NEW_TABLES` says so, else only known from now on.
    async fn first_seen(
        &mut self,
        upstream: &mut dyn Upstream,
        tables: &[cdc_contract::TableName],
    ) -> Result<(), CaptureError> {
        if !self.chunks.requests_listed {
            // Not before the requests are listed (the stream waits for that at its start): an
            // initial request not yet taken would read the table a second time.
            return Ok(());
        }
        let captured = &self.settings.tables;
        let new: Vec<_> = match self.asm.backfill() {
            None => return Ok(()),
            Some(b) => tables
                .iter()
                .filter(|t| !b.knows(t) && (captured.is_empty() || captured.contains(t)))
                .cloned()
                .collect(),
        };
        if new.is_empty() {
            return Ok(());
        }
        if self.settings.flags.backfill_new_tables {
            for table in &new {
                tracing::info!(table = %table, "new table: backfilling its rows");
            }
            self.backfill_tables(upstream, &new, false).await
        } else {
            for table in &new {
                tracing::info!(table = %table, "new table: streaming its changes (CDC_BACKFILL_NEW_TABLES=false)");
            }
            self.asm.update_backfill(|b| b.known.extend(new));
            Ok(())
        }
    }

    /// Asks for `tables` to be backfilled (again). A table without a key is read whole and
    /// cannot be read again without doubling its rows: asked again, it is refused, except by
    /// the initial snapshot's request (`initial`).
    pub async fn backfill_tables(
        &mut self,
        upstream: &mut dyn Upstream,
        tables: &[cdc_contract::TableName],
        initial: bool,
    ) -> Result<(), CaptureError> {
        let now = now_ms();
        for table in tables {
            let keyless = !upstream.has_key(table).await?;
            let known = self.asm.backfill().is_some_and(|b| b.known.contains(table));
            if keyless && known && !initial {
                tracing::warn!(table = %table, "a table without a key is not read again: its rows cannot be told apart, so a second read would double them (give it a primary key or a REPLICA IDENTITY USING INDEX)");
                continue;
            }
            self.asm.update_backfill(|b| {
                if b.request(table, now) {
                    if let Some(p) = b.pending.iter_mut().find(|p| &p.table == table) {
                        p.keyless = keyless;
                    }
                }
            });
        }
        Ok(())
    }

    /// Takes backfill requests from the ledger (each once: a request taken is recorded with the
    /// progress it asks for, then deleted), and tables the publication gained.
    async fn take_requests(&mut self, upstream: &mut dyn Upstream) -> Result<(), CaptureError> {
        use cdc_contract::ledger::{parse_backfill_request_sk, BackfillRequest};
        let Some(backfill) = self.asm.backfill() else {
            return Ok(());
        };
        let listed = match self.ledger.backfill_requests().await {
            Ok(r) => r,
            Err(error) => {
                tracing::warn!(error = %error, "reading backfill requests failed; trying again at the next heartbeat");
                return Ok(());
            }
        };
        self.chunks.requests_listed = true;
        // Taken requests gone from the ledger are forgotten; recorded ones are deleted.
        if backfill.taken.iter().any(|sk| !listed.contains(sk)) {
            self.asm
                .update_backfill(|b| b.taken.retain(|sk| listed.contains(sk)));
        }
        let recorded: Vec<String> = self
            .asm
            .recorded()
            .backfill
            .as_ref()
            .map(|b| b.taken.clone())
            .unwrap_or_default();
        let done: Vec<String> = listed
            .iter()
            .filter(|sk| recorded.contains(sk))
            .cloned()
            .collect();
        if !done.is_empty() {
            let ledger = self.ledger.clone();
            tokio::spawn(async move {
                for sk in done {
                    if let Err(error) = ledger.delete_backfill_request(&sk).await {
                        tracing::warn!(error = %error, request = %sk, "deleting a recorded backfill request failed; trying again at the next heartbeat");
                    }
                }
            });
        }
        let taken = |s: &Self, sk: &String| s.asm.backfill().is_some_and(|b| b.taken.contains(sk));
        let mut new: Vec<(String, BackfillRequest)> = listed
            .iter()
            .filter(|sk| !taken(self, sk))
            .filter_map(|sk| parse_backfill_request_sk(sk).map(|w| (sk.clone(), w)))
            .collect();
        // The initial snapshot first: its tables are not known yet, so none counts as new.
        new.sort_by_key(|(sk, w)| (*w != BackfillRequest::Initial, sk.clone()));
        if !new.is_empty() && !upstream.can_snapshot() {
            for (sk, _) in new {
                if self.chunks.unserved.insert(sk.clone()) {
                    tracing::error!(request = %sk, "a backfill request cannot be served: the server is a standby, where a snapshot cannot write its watermarks; it stays in the ledger and is taken once the capture runs against a primary");
                }
            }
            new = Vec::new();
        }
        let mut seen_new = false;
        for (sk, which) in new {
            if which != BackfillRequest::Initial && !seen_new {
                seen_new = true;
                if let Some(published) = upstream.published().await? {
                    self.first_seen(upstream, &published).await?;
                }
            }
            let tables: Vec<cdc_contract::TableName> = match &which {
                BackfillRequest::Table(table) => vec![table.clone()],
                BackfillRequest::All | BackfillRequest::Initial => {
                    match upstream.published().await? {
                        Some(t) => t,
                        None => continue,
                    }
                }
            };
            if which != BackfillRequest::Initial {
                for table in &tables {
                    tracing::info!(table = %table, "backfill requested");
                }
            }
            self.backfill_tables(upstream, &tables, which == BackfillRequest::Initial)
                .await?;
            self.asm.update_backfill(|b| b.taken.push(sk));
        }
        if !seen_new {
            if let Some(published) = upstream.published().await? {
                self.first_seen(upstream, &published).await?;
            }
        }
        Ok(())
    }

    /// Starts the next chunk's read when none is under way; in `initial_only`, stops once
    /// every table is read and recorded.
    async fn backfill_step(
        &mut self,
        upstream: &mut dyn Upstream,
    ) -> Result<Option<Stopped>, CaptureError> {
        let Some(backfill) = self.asm.backfill() else {
            return Ok(None);
        };
        // A standby cannot write watermarks: what is pending waits for a primary.
        if !upstream.can_snapshot() {
            return Ok(None);
        }
        // Progress without rows to carry it (an empty table, a chunk wholly dropped, a new
        // request): recorded on its own.
        if self.asm.recorded().backfill.as_ref() != Some(backfill)
            && self.inflight.is_none()
            && self.asm.is_empty()
            && !self.asm.in_transaction()
        {
            self.flush(Want::Committed, false).await?;
            return Ok(None);
        }
        let Some(backfill) = self.asm.backfill() else {
            return Ok(None);
        };
        let Some(next) = backfill.pending.first() else {
            if self.settings.flags.snapshot == crate::config::SnapshotMode::InitialOnly
                && self.backfill_recorded()
                && self.inflight.is_none()
                && self.asm.is_empty()
            {
                return Ok(Some(Stopped::SnapshotTaken));
            }
            return Ok(None);
        };
        if self.chunks.reading.is_some()
            || self
                .chunks
                .not_before
                .is_some_and(|t| t > tokio::time::Instant::now())
        {
            return Ok(None);
        }
        // The next chunk is read while the last one read waits for its watermark (one ahead at
        // most): it starts after that one's last key.
        let (after, key) = match self.chunks.waiting.back() {
            None => (next.after.clone(), next.key.clone()),
            Some((ahead, _))
                if self.chunks.waiting.len() < 2
                    && ahead.table == next.table
                    && ahead.after == next.after
                    && !ahead.last
                    && !next.keyless
                    && !ahead.rows.is_empty() =>
            {
                (ahead.next_after(), ahead.key.clone())
            }
            Some(_) => return Ok(None),
        };
        let Some(source) = upstream.chunk_source() else {
            return Ok(None);
        };
        let req = ChunkRequest {
            table: next.table.clone(),
            after,
            key,
            start: self.asm.tracker.start(&next.table),
            limit: self.chunks.rows,
            whole: next.keyless,
        };
        self.chunks.reading = Some(tokio::spawn(async move { source.read(req).await }));
        Ok(None)
    }

    /// A chunk's read ended: its high watermark is written, and the chunk waits for it.
    async fn chunk_read(
        &mut self,
        upstream: &mut dyn Upstream,
        read: Result<Result<Chunk, CaptureError>, tokio::task::JoinError>,
    ) -> Result<(), CaptureError> {
        let chunk = match read {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(error)) => {
                self.chunk_failed(&format!("reading a backfill chunk failed: {error}"));
                return Ok(());
            }
            Err(error) => {
                self.chunk_failed(&format!("the backfill reader failed: {error}"));
                return Ok(());
            }
        };
        self.chunks.failures = 0;
        // The tracking start a read took, only from a read the progress asks for (a chunk read
        // before its table started again carries a start that no longer holds).
        let current = self.asm.backfill().is_some_and(|b| {
            b.pending
                .first()
                .is_some_and(|p| p.table == chunk.table && p.after == chunk.after)
        });
        if current {
            self.asm
                .tracker
                .set_start(&chunk.table, chunk.start.clone());
        }
        self.chunks.seq += 1;
        let content = format!("{}/{}", self.chunks.run, self.chunks.seq);
        let high = upstream.emit_watermark(&content).await?;
        tracing::debug!(table = %chunk.table, rows = chunk.rows.len(), high = %high, transaction_ms = chunk.transaction_ms, "backfill chunk read");
        self.chunks.waiting.push_back((chunk, content));
        Ok(())
    }

    fn chunk_failed(&mut self, why: &str) {
        self.chunks.failures += 1;
        let wait = Duration::from_millis((500u64 << self.chunks.failures.min(6)).min(30_000));
        tracing::warn!(retry_in_ms = wait.as_millis() as u64, "{why}");
        self.chunks.not_before = Some(tokio::time::Instant::now() + wait);
    }

    /// A high watermark arrived: its chunk is placed here.
    async fn watermark(
        &mut self,
        upstream: &mut dyn Upstream,
        lsn: Lsn,
        content: &[u8],
    ) -> Result<Option<Want>, CaptureError> {
        let Some(i) = self
            .chunks
            .waiting
            .iter()
            .position(|(_, c)| c.as_bytes() == content)
        else {
            return Ok(None);
        };
        let Some((chunk, _)) = self.chunks.waiting.remove(i) else {
            return Ok(None);
        };
        if self.asm.in_transaction() {
            return Err(CaptureError::Setup(
                "a backfill watermark arrived inside a transaction".into(),
            ));
        }
        let encoder = match &chunk.relation {
            Some(rel) => {
                let schema = upstream.table_schema(rel, false).await?;
                let encoder =
                    TableEncoder::new(schema, &self.settings.slot, &self.settings.database);
                // The same encoder while the schema stays: the chunks share batches.
                match self.chunks.encoders.get(&chunk.table) {
                    Some(known) if known.schema_id == encoder.schema_id => known.clone(),
                    _ => {
                        let encoder = Arc::new(encoder);
                        self.chunks
                            .encoders
                            .insert(chunk.table.clone(), encoder.clone());
                        encoder
                    }
                }
            }
            None => {
                tracing::warn!(table = %chunk.table, "table gone or no longer published: its backfill ends");
                // What the stream gave of it while its read was awaited is recorded as it came.
                self.asm.release_held(&chunk.table, |_| true);
                self.asm.update_backfill(|b| b.finish(&chunk.table));
                self.asm.tracker.untrack(&chunk.table);
                return Ok(None);
            }
        };
        // pgoutput reports a message at the end of its WAL record, where the next record (a
        // commit, say) starts: the chunk takes the position just below, inside the message's
        // own record, where no commit record can start.
        let high = Lsn(lsn.0.saturating_sub(1));
        match self.asm.place_chunk(&chunk, &encoder, high) {
            Some((rows, bytes)) => {
                if rows > 0 {
                    // Rows per chunk follow the chunk size, in bytes of events.
                    let per_row = (bytes / rows as usize).max(1);
                    self.chunks.rows =
                        (self.settings.flags.snapshot_chunk_bytes / per_row).clamp(16, 1_000_000);
                }
                let pending = self
                    .asm
                    .backfill()
                    .is_some_and(|b| b.pending.iter().any(|p| p.table == chunk.table));
                if chunk.last && !pending {
                    tracing::info!(table = %chunk.table, "table backfilled");
                }
                tracing::debug!(table = %chunk.table, rows, bytes, "backfill chunk placed");
            }
            None => {
                // The chunk read ahead starts after this one: it goes too, read or being read.
                self.chunks.waiting.clear();
                if let Some(reading) = self.chunks.reading.take() {
                    reading.abort();
                }
                self.chunk_failed("reading the chunk again: a change its read did not see cannot be ordered around it (a key the change does not carry, or an update, delete or truncate of a table without a key)");
            }
        }
        Ok(self.asm.full().then_some(Want::Committed))
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
        let backfill = outcome.checkpoint.backfill.clone();
        let was_pending = self
            .asm
            .recorded()
            .backfill
            .as_ref()
            .is_some_and(|b| !b.pending.is_empty());
        let was_taken: Vec<String> = self
            .asm
            .recorded()
            .backfill
            .as_ref()
            .map(|b| b.taken.clone())
            .unwrap_or_default();
        if was_pending && backfill.as_ref().is_some_and(|b| b.pending.is_empty()) {
            tracing::info!("backfill complete: every table asked for is read and recorded");
        }
        self.asm.flush_recorded(outcome.checkpoint);
        self.health.recorded(now_ms());
        if let Some(b) = &backfill {
            if let Some(emit) = &self.metrics {
                let rows: u64 = b.pending.iter().map(|p| p.rows).sum();
                emit(metrics::emf_line(
                    &self.settings.slot,
                    now_ms(),
                    &[
                        (metrics::BACKFILL_TABLES_REMAINING, b.pending.len() as f64),
                        (metrics::BACKFILL_ROWS, rows as f64),
                    ],
                ));
            }
            // Requests this checkpoint records taken are done with.
            let fresh: Vec<String> = b
                .taken
                .iter()
                .filter(|sk| !was_taken.contains(sk))
                .cloned()
                .collect();
            if !fresh.is_empty() {
                let ledger = self.ledger.clone();
                tokio::spawn(async move {
                    for sk in fresh {
                        if let Err(error) = ledger.delete_backfill_request(&sk).await {
                            tracing::warn!(error = %error, request = %sk, "deleting a recorded backfill request failed; trying again at the next heartbeat");
                        }
                    }
                });
            }
        }
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
