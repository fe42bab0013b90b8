//! The capture's run: take the lease, resume from the ledger's checkpoint, stream, batch, flush,
//! confirm. Reconnects on transient failures; stops on definite ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use cdc_contract::event::Op;
use cdc_contract::layout::Layout;
use cdc_contract::ledger::Checkpoint;
use cdc_contract::{metrics, Hour, Lsn, Position, TableName};

use crate::batch::Batcher;
use crate::catalog::Catalog;
use crate::config::{Settings, SnapshotMode};
use crate::encode::{Image, TableEncoder, TxContext};
use crate::flush::{FlushError, FlushOutcome, Flusher};
use crate::ledger::{Ledger, LedgerError};
use crate::notify::Notifier;
use crate::pgoutput::{self, OldTuple, PgOutput};
use crate::replication::{
    quote_ident, ConnectParams, ReplicationConnection, ReplicationError, ReplicationMessage,
    ReplicationStream, PG_EPOCH_OFFSET_MICROS,
};
use crate::sink::BatchSink;

/// Why the capture stopped.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    /// Another task took the lease over.
    #[error("lease lost, stopping without writing further: {0}")]
    LeaseLost(String),
    /// The ledger failed definitely.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// A flush failed definitely.
    #[error(transparent)]
    Flush(#[from] FlushError),
    /// The replication connection failed definitely.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// An SQL query failed.
    #[error("sql: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// pgoutput sent something undecodable.
    #[error(transparent)]
    Decode(#[from] pgoutput::DecodeError),
    /// The source is not set up as the capture needs.
    #[error("{0}")]
    Setup(String),
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was asked for; buffered changes were recorded.
    Shutdown,
    /// `--exit-when-caught-up`: everything committed before the start is recorded.
    CaughtUp,
}

/// The capture's collaborators.
pub struct Deps {
    /// The ledger.
    pub ledger: Arc<dyn Ledger>,
    /// Where batches go.
    pub sink: Arc<dyn BatchSink>,
    /// The compactor's notifications.
    pub notifier: Arc<dyn Notifier>,
    /// Where EMF metric lines go (None: not emitted).
    pub metrics: Option<Arc<dyn Fn(String) + Send + Sync>>,
    /// What `/healthz` reports.
    pub health: Arc<crate::health::Health>,
}

struct RelState {
    encoder: Arc<TableEncoder>,
    captured: bool,
}

struct Tx {
    ctx: TxContext,
    ordinal: u32,
    per_table: HashMap<u32, u32>,
    last: Option<Position>,
}

/// Runs the capture until shutdown, `--exit-when-caught-up`, or a definite error.
pub async fn run(
    settings: Settings,
    deps: Deps,
    shutdown: CancellationToken,
) -> Result<Stopped, CaptureError> {
    let owner = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
    let lease_ms = settings.lease_duration().as_millis() as i64;

    // The lease: wait while another live task holds it.
    let epoch = loop {
        match deps.ledger.acquire_lease(&owner, lease_ms).await {
            Ok(epoch) => break epoch,
            Err(LedgerError::Held {
                owner: holder,
                expires_ms,
            }) => {
                let wait =
                    (expires_ms - chrono::Utc::now().timestamp_millis()).clamp(500, lease_ms / 3);
                tracing::warn!(slot = %settings.slot, holder = %holder, retry_in_ms = wait, "slot is leased by another capture; waiting for it to stop or expire");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Stopped::Shutdown),
                    _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                }
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "taking the lease failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    tracing::info!(slot = %settings.slot, owner = %owner, epoch, "lease taken");
    deps.health.set_lease(true);

    let lease_lost = CancellationToken::new();
    let renewal = tokio::spawn(renew_lease(
        deps.ledger.clone(),
        owner.clone(),
        epoch,
        settings.lease_duration(),
        lease_lost.clone(),
        shutdown.child_token(),
    ));

    let result = stream(&settings, &deps, &owner, epoch, &shutdown, &lease_lost).await;
    renewal.abort();
    deps.health.set_streaming(false);
    deps.health.set_lease(false);
    if !matches!(result, Err(CaptureError::LeaseLost(_))) {
        if let Err(error) = deps.ledger.release_lease(&owner, epoch).await {
            tracing::warn!(error = %error, "releasing the lease failed; a successor waits for its expiry");
        }
    }
    result
}

async fn renew_lease(
    ledger: Arc<dyn Ledger>,
    owner: String,
    epoch: u64,
    duration: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(duration / 3) => {}
        }
        match ledger
            .renew_lease(&owner, epoch, duration.as_millis() as i64)
            .await
        {
            Ok(()) => last_ok = Instant::now(),
            Err(e) if e.is_transient() && last_ok.elapsed() < duration => {
                tracing::warn!(error = %e, "lease renewal failed; retrying");
            }
            Err(e) => {
                tracing::error!(error = %e, epoch, "lease lost");
                lost.cancel();
                return;
            }
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "capture".into())
}

fn connect_params(settings: &Settings) -> Result<ConnectParams, CaptureError> {
    let cfg = &settings.config;
    let tls = crate::tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())
        .map_err(|e| CaptureError::Setup(e.to_string()))?;
    Ok(ConnectParams {
        host: cfg.host.clone(),
        port: cfg.port,
        user: settings.username.clone(),
        password: cfg.password.clone(),
        database: settings.database.clone(),
        ssl_mode: cfg.sslmode,
        tls,
        connect_timeout: Duration::from_secs(30),
    })
}

/// A slot just created with an exported snapshot; the connection that exported it stays open
/// until the snapshot is read.
struct ExportedSnapshot {
    _conn: ReplicationConnection,
    name: String,
    consistent_lsn: Lsn,
}

/// Fault-injection hook for the crash tests (`CDC_TEST_CRASH_AT`): aborts the process, as if
/// killed, at the named step.
fn crash_point(point: &str) {
    if std::env::var("CDC_TEST_CRASH_AT").ok().as_deref() == Some(point) {
        tracing::error!(point, "CDC_TEST_CRASH_AT: aborting");
        std::process::abort();
    }
}

/// Retries a ledger call while it fails transiently (the flushes' backoff, for about five
/// minutes), so one lost reply at start-up neither stops the capture nor leaves a step half done.
async fn retry_ledger<T, F, Fut>(what: &str, mut call: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Err(e) if e.is_transient() && attempt < 40 => {
                let wait = crate::flush::backoff(attempt);
                tracing::warn!(error = %e, attempt, retry_in_ms = wait.as_millis() as u64, "{what} failed; retrying");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Checks the slot and publication; creates the slot when it is missing and the ledger has no
/// checkpoint. A missing slot with a checkpoint is a definite error: its changes are gone.
///
/// Every step is safe to die at (issue 15, items 3 and 4). A new slot that will be snapshotted
/// is announced in the ledger (an incomplete snapshot state) before it exists, so a slot found
/// with an incomplete state is always ours to retake. A retake retires the abandoned snapshot's
/// batches first, then drops and recreates the slot: dying anywhere leaves the incomplete state
/// in place, and the next start retakes again.
async fn ensure_slot(
    settings: &Settings,
    params: &ConnectParams,
    catalog: &Catalog,
    checkpoint: &Option<Checkpoint>,
    ledger: &dyn Ledger,
    owner: &str,
    epoch: u64,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    let client = catalog.client();
    let findings =
        crate::checks::run(client, &settings.config.publication, &settings.tables).await?;
    for finding in findings {
        match finding {
            crate::checks::Finding::Fatal(message) => return Err(CaptureError::Setup(message)),
            crate::checks::Finding::Warning(message) => tracing::warn!("start-up check: {message}"),
        }
    }
    let slot = client
        .query_opt(
            "SELECT plugin, database, coalesce(wal_status, '') FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot],
        )
        .await?;
    let initial = settings.config.snapshot == SnapshotMode::Initial;
    // An unfinished snapshot is taken again whatever CDC_SNAPSHOT says now: its slot was made
    // for it, and its batches wait for it (the mode only decides what a new slot gets).
    let unfinished = retry_ledger("reading the snapshot state", || ledger.load_snapshot())
        .await?
        .filter(|state| !state.complete);
    let lease_ms = settings.lease_duration().as_millis() as i64;
    if let (None, Some(state)) = (&slot, &unfinished) {
        // Died during a retake after the slot was dropped, or before a new slot existed.
        tracing::warn!(slot = %settings.slot, "the initial snapshot did not complete: creating the slot and taking it again");
        return retake_snapshot(
            settings, params, client, ledger, state, false, owner, epoch, lease_ms,
        )
        .await;
    }
    match slot {
        Some(row) => {
            let plugin: Option<String> = row.get(0);
            let database: Option<String> = row.get(1);
            let wal_status: String = row.get(2);
            if plugin.as_deref() != Some("pgoutput")
                || database.as_deref() != Some(settings.database.as_str())
            {
                return Err(CaptureError::Setup(format!(
                    "CDC_SLOT_NAME: slot {:?} exists but is not a pgoutput slot of database {:?}",
                    settings.slot, settings.database
                )));
            }
            if let Some(state) = unfinished {
                tracing::warn!(slot = %settings.slot, "the initial snapshot did not complete: recreating the slot and taking it again");
                return retake_snapshot(
                    settings, params, client, ledger, &state, true, owner, epoch, lease_ms,
                )
                .await;
            }
            if wal_status == "lost" {
                if settings.config.recreate_slot {
                    tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is invalidated; recreating it and taking a new snapshot, keeping what the ledger recorded");
                    // The intent first: from then on this is a retake (drop, create), and dying
                    // anywhere leads the next start to retake again.
                    let intent = record_intent(ledger, owner, epoch).await?;
                    return retake_snapshot(
                        settings, params, client, ledger, &intent, true, owner, epoch, lease_ms,
                    )
                    .await;
                }
                return Err(CaptureError::Setup(format!(
                    "replication slot {:?} is invalidated (wal_status = lost): the WAL it needed was removed and \
                     changes since the ledger's checkpoint are gone. Start the capture with CDC_RECREATE_SLOT=true \
                     to recreate the slot and fill the gap with a new snapshot, keeping what the ledger recorded",
                    settings.slot
                )));
            }
            Ok(None)
        }
        None if checkpoint.as_ref().is_some_and(|c| c.lsn > Lsn::ZERO) => {
            if settings.config.recreate_slot {
                tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is gone; recreating it and taking a new snapshot, keeping what the ledger recorded");
                return create_with_snapshot(settings, params, ledger, owner, epoch, lease_ms)
                    .await;
            }
            Err(CaptureError::Setup(format!(
                "replication slot {:?} does not exist but the ledger holds a checkpoint for it: changes since \
                 the checkpoint are gone. Start the capture with CDC_RECREATE_SLOT=true to recreate the slot and \
                 fill the gap with a new snapshot, keeping what the ledger recorded (do not delete ledger items)",
                settings.slot
            )))
        }
        None if initial => {
            create_with_snapshot(settings, params, ledger, owner, epoch, lease_ms).await
        }
        None => create_slot(settings, params, false).await,
    }
}

/// Creates the slot with an exported snapshot, its intent recorded first: a slot that exists
/// with an incomplete snapshot state is always ours to retake (issue 15, item 3). The ledger's
/// checkpoint, flush numbers and epoch stay: the new snapshot's keys sort after everything
/// recorded, since a new slot's consistent point is past any position streamed before.
async fn create_with_snapshot(
    settings: &Settings,
    params: &ConnectParams,
    ledger: &dyn Ledger,
    owner: &str,
    epoch: u64,
    lease_ms: i64,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    record_intent(ledger, owner, epoch).await?;
    crash_point("after_snapshot_intent");
    fence(ledger, owner, epoch, lease_ms).await?;
    let exported = create_slot(settings, params, true).await?;
    crash_point("after_slot_created");
    Ok(exported)
}

/// Records that a slot is about to be created for a snapshot (an incomplete state with no
/// consistent point yet), under the lease; returns it.
async fn record_intent(
    ledger: &dyn Ledger,
    owner: &str,
    epoch: u64,
) -> Result<cdc_contract::ledger::SnapshotState, CaptureError> {
    let intent = cdc_contract::ledger::SnapshotState {
        complete: false,
        consistent_lsn: Lsn::ZERO,
        started_ms: now_ms(),
    };
    retry_ledger("recording the snapshot intent", || {
        ledger.save_snapshot(&intent, owner, epoch)
    })
    .await?;
    Ok(intent)
}

/// Proves this task still holds the lease right before it drops or creates the slot: a task
/// whose lease lapsed during slow start-up steps (retries) must not touch a successor's slot.
async fn fence(
    ledger: &dyn Ledger,
    owner: &str,
    epoch: u64,
    lease_ms: i64,
) -> Result<(), CaptureError> {
    match retry_ledger("renewing the lease", || {
        ledger.renew_lease(owner, epoch, lease_ms)
    })
    .await
    {
        Ok(()) => Ok(()),
        Err(e @ LedgerError::Transient(_)) => Err(e.into()),
        Err(e) => Err(CaptureError::LeaseLost(e.to_string())),
    }
}

/// Takes an unfinished initial snapshot again: retires its batches, drops the slot (when it
/// exists), creates it anew. The incomplete state stays recorded until the new snapshot records
/// its own, so dying at any step leads the next start here again.
#[allow(clippy::too_many_arguments)]
async fn retake_snapshot(
    settings: &Settings,
    params: &ConnectParams,
    client: &tokio_postgres::Client,
    ledger: &dyn Ledger,
    state: &cdc_contract::ledger::SnapshotState,
    slot_exists: bool,
    owner: &str,
    epoch: u64,
    lease_ms: i64,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    // An intent (no consistent point yet) never wrote a batch: nothing to look for.
    if state.consistent_lsn > Lsn::ZERO {
        let retired = retry_ledger("retiring the abandoned snapshot", || {
            ledger.retire_snapshot(state)
        })
        .await?;
        tracing::info!(retired, "batches of the abandoned snapshot retired");
    }
    crash_point("after_snapshot_retired");
    if slot_exists {
        fence(ledger, owner, epoch, lease_ms).await?;
        drop_slot(client, &settings.slot).await?;
        crash_point("after_slot_dropped");
    }
    fence(ledger, owner, epoch, lease_ms).await?;
    let exported = create_slot(settings, params, true).await?;
    crash_point("after_slot_created");
    Ok(exported)
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), CaptureError> {
    // The previous task's walsender may still hold the slot for a moment after a crash.
    for attempt in 0..30u32 {
        match client
            .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if e.code().map(|c| c.code()) == Some("55006") && attempt < 29 => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

async fn create_slot(
    settings: &Settings,
    params: &ConnectParams,
    export: bool,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    let mut conn = ReplicationConnection::connect(params).await?;
    let rows = conn
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput {}",
            quote_ident(&settings.slot),
            if export {
                "EXPORT_SNAPSHOT"
            } else {
                "NOEXPORT_SNAPSHOT"
            }
        ))
        .await?;
    tracing::info!(slot = %settings.slot, "replication slot created");
    if !export {
        return Ok(None);
    }
    let row = rows
        .first()
        .ok_or_else(|| CaptureError::Setup("CREATE_REPLICATION_SLOT returned no row".into()))?;
    let consistent_lsn = row
        .get(1)
        .and_then(|v| v.as_deref())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            CaptureError::Setup("CREATE_REPLICATION_SLOT returned no consistent point".into())
        })?;
    let name = row.get(2).and_then(|v| v.clone()).ok_or_else(|| {
        CaptureError::Setup("CREATE_REPLICATION_SLOT exported no snapshot".into())
    })?;
    Ok(Some(ExportedSnapshot {
        _conn: conn,
        name,
        consistent_lsn,
    }))
}

struct Streamer<'a> {
    settings: &'a Settings,
    flusher: Arc<Flusher>,
    catalog: Catalog,
    relations: HashMap<u32, RelState>,
    batcher: Batcher,
    recorded: Checkpoint,
    inflight: Option<tokio::task::JoinHandle<Result<FlushOutcome, FlushError>>>,
    tx: Option<Tx>,
    last_commit_end: Lsn,
    last_commit_ms: i64,
    /// What the server has proven sent on this stream: every transaction committed before it
    /// was received (a commit's end, or a keepalive's position while between transactions).
    /// Reset to the recorded checkpoint on reconnect: a stream's proof says nothing of the next.
    server_end: Lsn,
    /// A caught-up probe not proven yet: the server's WAL position read at a time. Once
    /// `server_end` reaches it, everything committed before that time has been received.
    probe: Option<(Lsn, i64)>,
    /// The last proven probe: `server_end` reached this position, so every change committed
    /// before this time is at or below it.
    caught_up: Option<(Lsn, i64)>,
    idle_since_record: Instant,
    target: Option<Lsn>,
    metrics: Option<Arc<dyn Fn(String) + Send + Sync>>,
    health: Arc<crate::health::Health>,
    grace_ms: i64,
}

async fn stream(
    settings: &Settings,
    deps: &Deps,
    owner: &str,
    epoch: u64,
    shutdown: &CancellationToken,
    lease_lost: &CancellationToken,
) -> Result<Stopped, CaptureError> {
    let params = connect_params(settings)?;
    let checkpoint = deps.ledger.load_checkpoint().await?;
    let Some(client) =
        connect_at_start(settings, &params, &deps.health, shutdown, lease_lost).await?
    else {
        return Ok(Stopped::Shutdown);
    };
    let catalog = Catalog::new(client);
    let exported = ensure_slot(
        settings,
        &params,
        &catalog,
        &checkpoint,
        deps.ledger.as_ref(),
        owner,
        epoch,
    )
    .await?;
    // Taken before the position is read: everything committed before it is below the target.
    let target_ms = now_ms();
    let target = if settings.config.exit_when_caught_up {
        let lsn = catalog.current_wal_lsn().await?;
        tracing::info!(target = %lsn, "will exit once everything committed before this position is recorded");
        Some(lsn)
    } else {
        None
    };
    let recorded = checkpoint.unwrap_or_default();
    tracing::info!(lsn = %recorded.lsn, partial = ?recorded.partial.map(|p| p.key()), flush_seq = recorded.flush_seq, "resuming from the ledger's checkpoint");
    let flusher = Arc::new(Flusher {
        slot: settings.slot.clone(),
        layout: Layout::new(&settings.config.s3_base_path),
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
    let mut s = Streamer {
        settings,
        flusher,
        catalog,
        relations: HashMap::new(),
        batcher: Batcher::default(),
        last_commit_end: recorded.lsn,
        last_commit_ms: recorded.commit_ms,
        server_end: recorded.lsn,
        probe: target.map(|t| (t, target_ms)),
        caught_up: None,
        recorded,
        inflight: None,
        tx: None,
        idle_since_record: Instant::now(),
        target,
        metrics: deps.metrics.clone(),
        health: deps.health.clone(),
        grace_ms: settings.config.close_grace_seconds as i64 * 1000,
    };

    if let Some(exported) = exported {
        s.snapshot(&params, exported, deps.ledger.as_ref(), owner, epoch)
            .await?;
    }

    let mut attempt = 0u32;
    loop {
        if s.catalog.client().is_closed() {
            match crate::catalog::connect(&params).await {
                Ok(client) => s.catalog = Catalog::new(client),
                Err(e) => {
                    let wait = Duration::from_millis((500u64 << attempt.min(6)).min(30_000));
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "sql connection failed; retrying");
                    attempt += 1;
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(Stopped::Shutdown),
                        _ = lease_lost.cancelled() => return Err(CaptureError::LeaseLost("renewal failed".into())),
                        _ = tokio::time::sleep(wait) => continue,
                    }
                }
            }
        }
        // The slot must not be ahead of the ledger: PostgreSQL would silently start past the
        // checkpoint, and the changes between would be lost (a slot another task recreated).
        if s.recorded.lsn > Lsn::ZERO {
            match slot_confirmed(s.catalog.client(), &settings.slot).await {
                Ok(Some(confirmed)) if confirmed > s.recorded.lsn => {
                    return Err(CaptureError::Setup(format!(
                        "replication slot {:?} is confirmed up to {confirmed}, past the ledger's checkpoint {}: \
                         changes between them are gone (was the slot recreated by another task?). Start the \
                         capture with CDC_RECREATE_SLOT=true after dropping the slot to fill the gap with a new snapshot",
                        settings.slot, s.recorded.lsn
                    )));
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(error = %error, "reading the slot's confirmed position failed")
                }
            }
        }
        let conn = match connect_and_start(settings, &params, s.recorded.lsn).await {
            Ok(c) => {
                attempt = 0;
                c
            }
            Err(e) if e.is_transient() => {
                let wait = Duration::from_millis((500u64 << attempt.min(6)).min(30_000));
                tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "replication connection failed; retrying");
                attempt += 1;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(Stopped::Shutdown),
                    _ = lease_lost.cancelled() => return Err(CaptureError::LeaseLost("renewal failed".into())),
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
            Err(e) => return Err(e.into()),
        };
        s.health.set_streaming(true);
        let outcome = s.run_stream(conn, shutdown, lease_lost).await;
        s.health.set_streaming(false);
        match outcome {
            Ok(stopped) => return Ok(stopped),
            Err(CaptureError::Replication(e)) if e.is_transient() => {
                tracing::warn!(error = %e, "replication stream broke; reconnecting from the recorded checkpoint");
                s.reset_after_disconnect().await?;
            }
            Err(CaptureError::Sql(e)) if e.is_closed() || e.code().is_none() => {
                tracing::warn!(error = %e, "sql connection broke; reconnecting from the recorded checkpoint");
                s.reset_after_disconnect().await?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// The slot's `confirmed_flush_lsn` (None: no such slot, or never confirmed).
async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|t| t.parse().ok()))
}

/// Why a first connection failed, and what fixes it, when waiting may help: the database is
/// unreachable or refuses the login (a first deployment before its password secret or security
/// group is set up). None for anything else (a missing database, bad TLS settings): definite.
fn waiting_reason(error: &tokio_postgres::Error, settings: &Settings) -> Option<String> {
    let cfg = &settings.config;
    match error.code().map(|c| c.code()) {
        Some("28P01") | Some("28000") => Some(format!(
            "the database refused the login of {:?}: set the password in POSTGRES_PASSWORD (the \
             deployment's secret) and allow the user in pg_hba.conf",
            settings.username
        )),
        Some("57P03") | Some("53300") => Some(
            "the database cannot take a connection now (starting up, or too many connections)"
                .into(),
        ),
        Some(_) => None,
        None if !unreachable(error) => None,
        None => Some(format!(
            "cannot reach {}:{}: check POSTGRES_HOST, POSTGRES_PORT and the network path (the \
             database's security group must admit the capture)",
            cfg.host, cfg.port
        )),
    }
}

/// True when a connection failed on the network path (refused, reset, timed out, no route, a
/// name that does not resolve yet), not on TLS or a protocol error.
fn unreachable(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | ConnectionReset
                    | ConnectionAborted
                    | TimedOut
                    | NotConnected
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
            ) || io.to_string().contains("lookup address");
        }
        source = e.source();
    }
    false
}

/// The first SQL connection. While the database is unreachable or refuses the login, retries
/// with backoff (up to 30 s), logging the reason and the fix; `/healthz` stays healthy meanwhile.
/// None when shutdown was asked for.
async fn connect_at_start(
    settings: &Settings,
    params: &ConnectParams,
    health: &crate::health::Health,
    shutdown: &CancellationToken,
    lease_lost: &CancellationToken,
) -> Result<Option<tokio_postgres::Client>, CaptureError> {
    let mut attempt = 0u32;
    loop {
        match crate::catalog::connect(params).await {
            Ok(client) => {
                if attempt > 0 {
                    tracing::info!("connected to the database");
                }
                health.set_waiting_for_database(None);
                return Ok(Some(client));
            }
            Err(e) => {
                let Some(reason) = waiting_reason(&e, settings) else {
                    return Err(e.into());
                };
                let wait = Duration::from_millis((1000u64 << attempt.min(5)).min(30_000));
                // A server error displays as "db error"; its message says what was refused.
                let detail = match e.as_db_error() {
                    Some(db) => format!("{}: {}", db.code().code(), db.message()),
                    None => e.to_string(),
                };
                tracing::error!(error = %detail, reason = %reason, retry_in_ms = wait.as_millis() as u64, "waiting for the database");
                health.set_waiting_for_database(Some(reason));
                attempt += 1;
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = lease_lost.cancelled() => return Err(CaptureError::LeaseLost("renewal failed".into())),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

async fn connect_and_start(
    settings: &Settings,
    params: &ConnectParams,
    start: Lsn,
) -> Result<ReplicationStream, ReplicationError> {
    let conn = ReplicationConnection::connect(params).await?;
    let stream = conn
        .start_replication(&settings.slot, start, &settings.config.publication)
        .await?;
    tracing::info!(slot = %settings.slot, start = %start, "streaming");
    Ok(stream)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Streamer<'_> {
    async fn reset_after_disconnect(&mut self) -> Result<(), CaptureError> {
        // What was buffered but not recorded is sent again from the recorded checkpoint.
        self.wait_inflight().await?;
        self.batcher.take();
        self.tx = None;
        self.relations.clear();
        self.last_commit_end = self.recorded.lsn;
        self.last_commit_ms = self.recorded.commit_ms;
        // The broken stream's proof is void: what it sent past the checkpoint was discarded and
        // is sent again (issue 15, item 2). Probes restart too.
        self.server_end = self.recorded.lsn;
        self.probe = None;
        self.caught_up = None;
        Ok(())
    }

    /// The server proved everything committed before `lsn` sent on this stream.
    fn server_reached(&mut self, lsn: Lsn) {
        self.server_end = self.server_end.max(lsn);
        if let Some((at, time)) = self.probe {
            if self.server_end >= at {
                self.caught_up = Some((at, time));
                self.probe = None;
            }
        }
    }

    async fn run_stream(
        &mut self,
        mut conn: ReplicationStream,
        shutdown: &CancellationToken,
        lease_lost: &CancellationToken,
    ) -> Result<Stopped, CaptureError> {
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut slot_tick = tokio::time::interval(self.settings.heartbeat_interval());
        slot_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let flush_interval = self.settings.flush_interval();
        loop {
            let flush_deadline = self
                .batcher
                .oldest()
                .map(|o| tokio::time::Instant::from_std(o + flush_interval));
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.flush_on_shutdown().await?;
                    let lsn = self.recorded.lsn;
                    let _ = conn.send_status(lsn, lsn, false).await;
                    tracing::info!(lsn = %lsn, "stopped on request; buffered changes recorded");
                    return Ok(Stopped::Shutdown);
                }
                _ = lease_lost.cancelled() => {
                    return Err(CaptureError::LeaseLost("renewal was refused".into()));
                }
                done = async { self.inflight.as_mut().expect("guarded").await }, if self.inflight.is_some() => {
                    self.inflight = None;
                    self.flush_done(done)?;
                    let lsn = self.recorded.lsn;
                    conn.send_status(lsn, lsn, false).await?;
                    if self.caught_up() {
                        return Ok(Stopped::CaughtUp);
                    }
                }
                _ = sleep_until(flush_deadline), if flush_deadline.is_some() && self.tx.is_none() => {
                    self.start_flush(Checkpoint {
                        lsn: self.last_commit_end,
                        partial: None,
                        commit_ms: self.last_commit_ms,
                        ..Default::default()
                    }, false).await?;
                }
                msg = conn.next() => {
                    match msg? {
                        ReplicationMessage::XLogData { data, wal_start, .. } => {
                            self.handle(pgoutput::decode(data)?, wal_start).await?;
                        }
                        ReplicationMessage::Keepalive { wal_end, reply_requested } => {
                            tracing::trace!(wal_end = %wal_end, reply_requested, "keepalive");
                            if self.tx.is_none() {
                                self.server_reached(wal_end);
                            }
                            self.maybe_heartbeat().await?;
                            if self.caught_up() && self.tx.is_none() {
                                return Ok(Stopped::CaughtUp);
                            }
                            if reply_requested {
                                let lsn = self.recorded.lsn;
                                conn.send_status(lsn, lsn, false).await?;
                            }
                        }
                    }
                }
                _ = slot_tick.tick() => {
                    self.slot_heartbeat().await?;
                }
                _ = status_tick.tick() => {
                    let lsn = self.recorded.lsn;
                    conn.send_status(lsn, lsn, false).await?;
                    self.maybe_heartbeat().await?;
                    if self.caught_up() && self.tx.is_none() {
                        return Ok(Stopped::CaughtUp);
                    }
                }
            }
        }
    }

    /// The initial snapshot: every captured table read in key order inside the slot's exported
    /// snapshot, as op "r" events at the slot's consistent point, one ordinal per table.
    async fn snapshot(
        &mut self,
        params: &ConnectParams,
        exported: ExportedSnapshot,
        ledger: &dyn Ledger,
        owner: &str,
        epoch: u64,
    ) -> Result<(), CaptureError> {
        let started_ms = now_ms();
        let consistent = exported.consistent_lsn;
        let mut state = cdc_contract::ledger::SnapshotState {
            complete: false,
            consistent_lsn: consistent,
            started_ms,
        };
        retry_ledger("recording the snapshot state", || {
            ledger.save_snapshot(&state, owner, epoch)
        })
        .await?;
        let reader = crate::catalog::connect(params).await?;
        reader
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                crate::replication::quote_literal(&exported.name)
            ))
            .await?;
        let tables: Vec<TableName> = if self.settings.tables.is_empty() {
            reader
                .query(
                    "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2",
                    &[&self.settings.config.publication],
                )
                .await?
                .iter()
                .map(|r| TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)))
                .collect()
        } else {
            self.settings.tables.clone()
        };
        tracing::info!(tables = tables.len(), consistent = %consistent, "initial snapshot started");
        // Rows are keyed one below the consistent point, so no streamed change shares a key
        // (issue 15, item 5).
        let rows_lsn = state.rows_lsn();
        let ctx = TxContext {
            xid: None,
            commit_lsn: rows_lsn,
            commit_us: started_ms * 1000,
            prev_commit_end: Lsn::ZERO,
            snapshot: true,
        };
        let hour = Hour::from_millis(started_ms);
        let mut total = 0u64;
        for table in &tables {
            let (rel, order_by) = relation_of(&reader, table).await?;
            let schema = self.catalog.table_schema(&rel, false).await?;
            let encoder = Arc::new(TableEncoder::new(
                schema,
                &self.settings.slot,
                &self.settings.database,
            ));
            let columns: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
            reader
                .batch_execute(&format!(
                    "DECLARE cdc_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{}{}",
                    if columns.is_empty() {
                        "NULL".to_owned()
                    } else {
                        columns.join(", ")
                    },
                    quote_ident(&table.schema),
                    quote_ident(&table.name),
                    order_by
                ))
                .await?;
            let mut ordinal = 0u32;
            loop {
                let messages = reader.simple_query("FETCH 5000 FROM cdc_snapshot").await?;
                let mut fetched = 0;
                for message in messages {
                    let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                        continue;
                    };
                    fetched += 1;
                    ordinal += 1;
                    let values: Vec<pgoutput::Value> = (0..rel.columns.len())
                        .map(|i| match row.get(i) {
                            Some(text) => pgoutput::Value::Text(bytes::Bytes::copy_from_slice(
                                text.as_bytes(),
                            )),
                            None => pgoutput::Value::Null,
                        })
                        .collect();
                    let pos = Position::new(rows_lsn, ordinal);
                    let now = now_ms();
                    let enc = encoder.clone();
                    self.batcher
                        .push(rel.oid, &encoder, hour, pos, started_ms, |out| {
                            enc.write_event(
                                out,
                                Op::Read,
                                None,
                                Some(&values),
                                &ctx,
                                consistent,
                                ordinal,
                                ordinal,
                                now,
                            );
                        });
                    if self.batcher.full(self.settings.config.flush_max_bytes) {
                        let checkpoint = Checkpoint {
                            lsn: self.recorded.lsn,
                            partial: self.recorded.partial,
                            commit_ms: started_ms,
                            ..Default::default()
                        };
                        self.start_flush(checkpoint, false).await?;
                    }
                }
                if fetched == 0 {
                    break;
                }
            }
            reader.batch_execute("CLOSE cdc_snapshot").await?;
            total += u64::from(ordinal);
            tracing::info!(table = %table, rows = ordinal, "table snapshot read");
        }
        reader.batch_execute("COMMIT").await?;
        drop(exported);
        let checkpoint = Checkpoint {
            lsn: consistent,
            partial: None,
            commit_ms: started_ms,
            ..Default::default()
        };
        self.start_flush(checkpoint, true).await?;
        self.wait_inflight().await?;
        state.complete = true;
        retry_ledger("recording the snapshot complete", || {
            ledger.save_snapshot(&state, owner, epoch)
        })
        .await?;
        self.last_commit_end = consistent;
        self.last_commit_ms = started_ms;
        self.server_end = self.server_end.max(consistent);
        tracing::info!(rows = total, "initial snapshot complete");
        Ok(())
    }

    /// On the heartbeat timer: emit a logical message while idle, so a quiet database's slot
    /// still sees WAL and moves, and report slot health and lag.
    async fn slot_heartbeat(&mut self) -> Result<(), CaptureError> {
        let client = self.catalog.client();
        if self.tx.is_none() && self.batcher.is_empty() {
            if let Err(error) = client
                .execute(
                    "SELECT pg_logical_emit_message(false, 'pg-cdc-s3', 'heartbeat')",
                    &[],
                )
                .await
            {
                if error.is_closed() {
                    // Reconnect (both connections): without this one no probe is proven again.
                    return Err(CaptureError::Sql(error));
                }
                tracing::warn!(error = %error, "heartbeat message failed (grant EXECUTE on pg_logical_emit_message)");
            }
        }
        // Read before the query: everything committed before this time is below the position read.
        let probe_ms = now_ms();
        let row = match client
            .query_opt(
                "SELECT pg_current_wal_lsn()::text, coalesce(wal_status, ''), safe_wal_size \
                 FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.settings.slot],
            )
            .await
        {
            Ok(row) => row,
            Err(error) if error.is_closed() => return Err(CaptureError::Sql(error)),
            Err(error) => {
                tracing::warn!(error = %error, "reading slot health failed");
                return Ok(());
            }
        };
        let Some(row) = row else {
            return Err(CaptureError::Setup(format!(
                "replication slot {:?} was dropped while streaming",
                self.settings.slot
            )));
        };
        let current: Lsn = row.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO);
        if self.probe.is_none() && current > Lsn::ZERO {
            self.probe = Some((current, probe_ms));
            self.server_reached(Lsn::ZERO);
        }
        let wal_status: String = row.get(1);
        let safe_wal: Option<i64> = row.get(2);
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
            let lag_bytes = current.0.saturating_sub(self.recorded.lsn.0) as f64;
            let lag_s = ((now - self.recorded.closing_ms()).max(0) / 1000) as f64;
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

    fn caught_up(&self) -> bool {
        match self.target {
            Some(target) => {
                self.recorded.lsn >= target
                    && self.recorded.partial.is_none()
                    && self.batcher.is_empty()
                    && self.inflight.is_none()
            }
            None => false,
        }
    }

    /// While idle: record the position the server says everything before is sent (and so
    /// processed), at the heartbeat rate, or at once when `--exit-when-caught-up` reached its
    /// target.
    async fn maybe_heartbeat(&mut self) -> Result<(), CaptureError> {
        if self.tx.is_some() || self.inflight.is_some() {
            return Ok(());
        }
        if !self.batcher.is_empty() {
            // `--exit-when-caught-up` has everything it waits for: record it now.
            if self.target.is_some_and(|t| self.server_end >= t) {
                let checkpoint = Checkpoint {
                    lsn: self.last_commit_end,
                    partial: None,
                    commit_ms: self.last_commit_ms,
                    ..Default::default()
                };
                return self.start_flush(checkpoint, false).await;
            }
            return Ok(());
        }
        let reached_target = self
            .target
            .is_some_and(|t| self.server_end >= t && self.recorded.lsn < t);
        let due = self.idle_since_record.elapsed() >= self.settings.heartbeat_interval();
        if !(due || reached_target) {
            return Ok(());
        }
        let lsn = self.server_end.max(self.last_commit_end);
        if self.recorded.partial.is_some_and(|p| lsn <= p.commit_lsn) {
            // The server is resending a transaction recorded in part: nothing to record until
            // it has come again past its recorded part.
            return Ok(());
        }
        // The caught-up time comes from a proven probe, never from the clock: while the server
        // is still decoding (a large transaction, a stalled stream) nothing is proven (item 14).
        let caught_up_ms = self
            .caught_up
            .filter(|(at, _)| *at <= lsn)
            .map(|(_, time)| time)
            .max(self.recorded.caught_up_ms);
        let closing_ms = self.last_commit_ms.max(caught_up_ms.unwrap_or(0));
        // Notify when the closing time passes an hour's end plus the grace period.
        let closes_hour = Hour::from_millis(self.recorded.closing_ms() - self.grace_ms)
            != Hour::from_millis(closing_ms - self.grace_ms);
        self.last_commit_end = lsn;
        let checkpoint = Checkpoint {
            lsn,
            partial: None,
            commit_ms: self.last_commit_ms,
            caught_up_ms,
            ..Default::default()
        };
        self.start_flush(checkpoint, closes_hour).await
    }

    async fn handle(&mut self, msg: PgOutput, wal_start: Lsn) -> Result<(), CaptureError> {
        match msg {
            PgOutput::Begin {
                final_lsn,
                commit_ts,
                xid,
            } => {
                self.tx = Some(Tx {
                    ctx: TxContext {
                        xid: Some(xid),
                        commit_lsn: final_lsn,
                        commit_us: commit_ts + PG_EPOCH_OFFSET_MICROS,
                        prev_commit_end: self.last_commit_end,
                        snapshot: false,
                    },
                    ordinal: 0,
                    per_table: HashMap::new(),
                    last: None,
                });
            }
            PgOutput::Commit {
                end_lsn, commit_ts, ..
            } => {
                self.tx = None;
                self.last_commit_end = end_lsn;
                self.last_commit_ms = (commit_ts + PG_EPOCH_OFFSET_MICROS).div_euclid(1000);
                self.server_reached(end_lsn);
                let due = self.batcher.full(self.settings.config.flush_max_bytes)
                    || self
                        .batcher
                        .oldest()
                        .is_some_and(|o| o.elapsed() >= self.settings.flush_interval());
                if due {
                    self.start_flush(
                        Checkpoint {
                            lsn: end_lsn,
                            partial: None,
                            commit_ms: self.last_commit_ms,
                            ..Default::default()
                        },
                        false,
                    )
                    .await?;
                }
            }
            PgOutput::Relation(rel) => {
                let table = TableName::new(rel.namespace.clone(), rel.name.clone());
                let captured =
                    self.settings.tables.is_empty() || self.settings.tables.contains(&table);
                let previous = self
                    .relations
                    .get(&rel.oid)
                    .map(|r| r.encoder.schema_id.clone());
                let schema = self.catalog.table_schema(&rel, previous.is_some()).await?;
                let encoder =
                    TableEncoder::new(schema, &self.settings.slot, &self.settings.database);
                match previous {
                    Some(old) if old == encoder.schema_id => {
                        // Same columns: keep the encoder so batches are not cut.
                        return Ok(());
                    }
                    Some(old) => {
                        tracing::info!(table = %table, old_version = %old, new_version = %encoder.schema_id, "schema change")
                    }
                    None => {
                        tracing::debug!(table = %table, version = %encoder.schema_id, "relation")
                    }
                }
                self.relations.insert(
                    rel.oid,
                    RelState {
                        encoder: Arc::new(encoder),
                        captured,
                    },
                );
            }
            PgOutput::Insert { rel, new } => {
                self.change(rel, Op::Create, None, Some(&new), wal_start)
                    .await?
            }
            PgOutput::Update { rel, old, new } => {
                self.change(rel, Op::Update, old, Some(&new), wal_start)
                    .await?
            }
            PgOutput::Delete { rel, old } => {
                self.change(rel, Op::Delete, old, None, wal_start).await?
            }
            PgOutput::Truncate { rels, .. } => {
                for rel in rels {
                    self.change(rel, Op::Truncate, None, None, wal_start)
                        .await?;
                }
            }
            PgOutput::Type { .. } | PgOutput::Origin { .. } | PgOutput::Message { .. } => {}
        }
        Ok(())
    }

    async fn change(
        &mut self,
        rel: u32,
        op: Op,
        old: Option<OldTuple>,
        new: Option<&[pgoutput::Value]>,
        lsn: Lsn,
    ) -> Result<(), CaptureError> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(CaptureError::Decode(pgoutput::DecodeError(
                "change outside a transaction".into(),
            )));
        };
        tx.ordinal += 1;
        let pos = Position::new(tx.ctx.commit_lsn, tx.ordinal);
        let Some(state) = self.relations.get(&rel) else {
            return Err(CaptureError::Decode(pgoutput::DecodeError(format!(
                "change for relation {rel} before its Relation message"
            ))));
        };
        if !state.captured || self.recorded.covers(pos) {
            return Ok(());
        }
        let table_ordinal = {
            let n = tx.per_table.entry(rel).or_insert(0);
            *n += 1;
            *n
        };
        tx.last = Some(pos);
        let ctx = tx.ctx;
        let encoder = state.encoder.clone();
        let commit_ms = ctx.commit_us.div_euclid(1000);
        let hour = Hour::from_millis(commit_ms);
        let now = now_ms();
        self.batcher
            .push(rel, &encoder, hour, pos, commit_ms, |out| {
                let before = match &old {
                    Some(OldTuple::Key(v)) => Some(Image::KeyOnly(v)),
                    Some(OldTuple::Full(v)) => Some(Image::Full(v)),
                    None => None,
                };
                encoder.write_event(
                    out,
                    op,
                    before,
                    new,
                    &ctx,
                    lsn,
                    pos.ordinal,
                    table_ordinal,
                    now,
                );
            });
        if self.batcher.full(self.settings.config.flush_max_bytes) {
            // A transaction larger than a batch: record what we have, mid-transaction.
            self.start_flush(
                Checkpoint {
                    lsn: self.last_commit_end,
                    partial: Some(pos),
                    commit_ms,
                    ..Default::default()
                },
                false,
            )
            .await?;
        }
        Ok(())
    }

    async fn wait_inflight(&mut self) -> Result<(), CaptureError> {
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
                if self.settings.config.metrics_per_table {
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
        debug_assert!(
            progress(cp) >= progress(&self.recorded),
            "progress only moves forward"
        );
        self.recorded = outcome.checkpoint;
        self.idle_since_record = Instant::now();
        self.health.recorded(now_ms());
        Ok(())
    }

    async fn start_flush(
        &mut self,
        mut checkpoint: Checkpoint,
        notify_empty: bool,
    ) -> Result<(), CaptureError> {
        self.wait_inflight().await?;
        // The checkpoint never moves backwards, and keeps the caught-up time it had.
        if progress(&checkpoint) < progress(&self.recorded) {
            checkpoint.lsn = self.recorded.lsn;
            checkpoint.partial = self.recorded.partial;
        }
        checkpoint.caught_up_ms = checkpoint.caught_up_ms.max(self.recorded.caught_up_ms);
        checkpoint.commit_ms = checkpoint.commit_ms.max(self.recorded.commit_ms);
        let segments = self.batcher.take();
        // Flush numbers strictly increase (item 2): the previous flush has completed and every
        // completed flush becomes `recorded` (its checkpoint is never lower, see above), so a
        // number is never reused and taken for an earlier flush "already recorded".
        let seq = self.recorded.flush_seq + 1;
        let flusher = self.flusher.clone();
        self.inflight = Some(tokio::spawn(async move {
            flusher.flush(segments, checkpoint, seq, notify_empty).await
        }));
        Ok(())
    }

    async fn flush_on_shutdown(&mut self) -> Result<(), CaptureError> {
        if !self.batcher.is_empty() {
            let checkpoint = match &self.tx {
                Some(tx) => Checkpoint {
                    lsn: self.last_commit_end,
                    partial: tx.last.or(self
                        .recorded
                        .partial
                        .filter(|p| p.commit_lsn == tx.ctx.commit_lsn)),
                    commit_ms: tx.ctx.commit_us.div_euclid(1000),
                    ..Default::default()
                },
                None => Checkpoint {
                    lsn: self.last_commit_end,
                    partial: None,
                    commit_ms: self.last_commit_ms,
                    ..Default::default()
                },
            };
            self.start_flush(checkpoint, false).await?;
        }
        self.wait_inflight().await
    }
}

/// How far a checkpoint reaches: inside a transaction larger than a batch, its last recorded
/// change; otherwise just below the first change of a transaction committing at `lsn`. A
/// checkpoint `(X, none)` with `X` at or below a recorded `partial`'s commit is behind it, not
/// ahead: it does not cover that transaction's recorded changes.
fn progress(cp: &Checkpoint) -> Position {
    cp.partial.unwrap_or(Position::new(cp.lsn, 0))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// A table's columns as pgoutput would describe them (replica identity columns as the key), and
/// the ORDER BY that reads it in key order.
async fn relation_of(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<(pgoutput::Relation, String), CaptureError> {
    let rows = client
        .query(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                    CASE c.relreplident \
                      WHEN 'f' THEN true \
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND a.attnum = ANY(i.indkey)) \
                      WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
                      ELSE false END, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| CaptureError::Setup(format!("snapshot: table {table} not found")))?;
    let oid: u32 = first.get(0);
    let identity: String = first.get(1);
    let mut columns = Vec::with_capacity(rows.len());
    let mut pk = Vec::new();
    for r in &rows {
        let name: String = r.get(2);
        if r.get::<_, bool>(6) {
            pk.push(quote_ident(&name));
        }
        columns.push(pgoutput::RelationColumn {
            key: r.get(5),
            name,
            type_oid: r.get(3),
            typmod: r.get(4),
        });
    }
    let order_by = if pk.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", pk.join(", "))
    };
    Ok((
        pgoutput::Relation {
            oid,
            namespace: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: identity.bytes().next().unwrap_or(b'd'),
            columns,
        },
        order_by,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(lsn: u64, partial: Option<(u64, u32)>) -> Checkpoint {
        Checkpoint {
            lsn: Lsn(lsn),
            partial: partial.map(|(l, o)| Position::new(Lsn(l), o)),
            ..Default::default()
        }
    }

    /// A checkpoint inside a large transaction (its commit at 500, recorded through change 7)
    /// is ahead of a position the server proved before that commit, and behind one after it.
    #[test]
    fn progress_orders_checkpoints_by_what_they_cover() {
        let inside = cp(100, Some((500, 7)));
        assert!(progress(&cp(400, None)) < progress(&inside));
        assert!(
            progress(&cp(500, None)) < progress(&inside),
            "a commit at 500 is not covered by lsn 500"
        );
        assert!(progress(&cp(501, None)) > progress(&inside));
        assert!(progress(&cp(100, Some((500, 8)))) > progress(&inside));
        assert!(progress(&cp(100, None)) < progress(&inside));
    }
}
