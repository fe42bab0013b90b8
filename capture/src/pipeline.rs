//! The capture's run: take the lease, make sure of the slot (and its snapshot), then stream
//! from the ledger's checkpoint. The stages live in their own modules: [`crate::lease`],
//! [`crate::slot`], [`crate::snapshot`], [`crate::assemble`] and [`crate::stream`].

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::connect::{connect_at_start, connect_params, PgUpstream};
use crate::flush::FlushError;
use crate::lease::Lease;
use crate::ledger::{Ledger, LedgerError};
use crate::notify::Notifier;
use crate::pgoutput;
use crate::replication::ReplicationError;
use crate::sink::BatchSink;
use crate::source::Upstream;
use crate::stream::Streamer;
use cdc_contract::Lsn;

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
    /// A connection to the database was lost: reconnect and resume from the checkpoint.
    #[error("connection lost: {0}")]
    Disconnected(String),
}

impl CaptureError {
    /// True when reconnecting and resuming from the recorded checkpoint may succeed.
    pub fn is_reconnectable(&self) -> bool {
        match self {
            CaptureError::Replication(e) => e.is_transient(),
            CaptureError::Sql(e) => e.is_closed() || e.code().is_none(),
            CaptureError::Disconnected(_) => true,
            _ => false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// Shutdown was asked for; buffered changes were recorded.
    Shutdown,
    /// `--exit-when-caught-up`: everything committed before the start is recorded.
    CaughtUp,
    /// `CDC_SNAPSHOT=initial_only`: the initial snapshot is recorded complete.
    SnapshotTaken,
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

/// Runs the capture until shutdown, `--exit-when-caught-up`, or a definite error.
pub async fn run(
    settings: Settings,
    deps: Deps,
    shutdown: CancellationToken,
) -> Result<Stopped, CaptureError> {
    let Some(lease) = acquire(&settings, &deps, &shutdown).await? else {
        return Ok(Stopped::Shutdown);
    };
    let result = stream(&settings, &deps, &lease, &shutdown).await;
    lease.end(deps.ledger.as_ref(), &deps.health, &result).await;
    result
}

/// Runs the streaming part of a capture against any [`Upstream`] whose slot exists: the lease,
/// the checkpoint, then streaming until shutdown, `target` (a position every change committed
/// before is to be recorded) or a definite error. The simulation test drives this.
pub async fn run_upstream(
    settings: &Settings,
    deps: &Deps,
    upstream: &mut dyn Upstream,
    target: Option<cdc_contract::Lsn>,
    shutdown: &CancellationToken,
) -> Result<Stopped, CaptureError> {
    let Some(lease) = acquire(settings, deps, shutdown).await? else {
        return Ok(Stopped::Shutdown);
    };
    let result = async {
        let checkpoint = load_checkpoint(deps.ledger.as_ref())
            .await?
            .unwrap_or_default();
        let mut s = Streamer::new(
            settings,
            deps,
            &lease.owner,
            lease.epoch,
            checkpoint,
            target.map(|t| (t, now_ms())),
        );
        s.run(upstream, shutdown, &lease.lost).await
    }
    .await;
    lease.end(deps.ledger.as_ref(), &deps.health, &result).await;
    result
}

/// Takes the slot's lease (None: shutdown came first).
async fn acquire(
    settings: &Settings,
    deps: &Deps,
    shutdown: &CancellationToken,
) -> Result<Option<Lease>, CaptureError> {
    Lease::acquire(
        deps.ledger.clone(),
        &settings.slot,
        settings.lease_duration(),
        &deps.health,
        shutdown,
    )
    .await
}

async fn stream(
    settings: &Settings,
    deps: &Deps,
    lease: &Lease,
    shutdown: &CancellationToken,
) -> Result<Stopped, CaptureError> {
    let params = connect_params(settings)?;
    let checkpoint = load_checkpoint(deps.ledger.as_ref()).await?;
    let Some(client) =
        connect_at_start(settings, &params, &deps.health, shutdown, &lease.lost).await?
    else {
        return Ok(Stopped::Shutdown);
    };
    let mut upstream = PgUpstream::new(settings, params, client)
        .with_timeline(checkpoint.as_ref().and_then(|c| c.timeline));
    crate::slot::ensure_slot(
        settings,
        upstream.params(),
        &upstream.catalog,
        &checkpoint,
        deps.ledger.as_ref(),
        lease,
    )
    .await?;
    // Taken before the position is read: everything committed before it is below the target.
    let target_ms = now_ms();
    let target = if settings.flags.exit_when_caught_up {
        let lsn = upstream.catalog.current_wal_lsn().await?;
        tracing::info!(target = %lsn, "will exit once everything committed before this position is recorded");
        Some((lsn, target_ms))
    } else {
        None
    };
    let fresh = checkpoint.as_ref().is_none_or(|c| c.lsn == Lsn::ZERO);
    let mut s = Streamer::new(
        settings,
        deps,
        &lease.owner,
        lease.epoch,
        checkpoint.unwrap_or_default(),
        target,
    );
    if s.asm.backfill().is_none() {
        // The first run of a pipeline (or the first since backfills were recorded in the
        // checkpoint): the tables published now are known; the initial snapshot's request,
        // when the capture created the slot, makes them pending at the stream's start.
        let initial = fresh
            && crate::slot::retry_ledger("reading backfill requests", || {
                deps.ledger.backfill_requests()
            })
            .await?
            .iter()
            .any(|sk| {
                cdc_contract::ledger::parse_backfill_request_sk(sk)
                    == Some(cdc_contract::ledger::BackfillRequest::Initial)
            });
        let published = upstream.published().await?.unwrap_or_default();
        if initial {
            tracing::info!(tables = published.len(), "initial snapshot started: backfilling every captured table in chunks while streaming");
            s.asm.update_backfill(|_| {});
        } else {
            if !fresh {
                tracing::info!(tables = published.len(), "the checkpoint predates recorded backfills: the tables published now are taken as read; tables added later are backfilled");
            }
            s.asm.update_backfill(|b| b.known.extend(published));
        }
    }
    s.run(&mut upstream, shutdown, &lease.lost).await
}

/// The ledger's checkpoint, read with retries: one lost reply at start-up does not stop the
/// capture.
async fn load_checkpoint(
    ledger: &dyn Ledger,
) -> Result<Option<cdc_contract::ledger::Checkpoint>, CaptureError> {
    Ok(crate::slot::retry_ledger("reading the checkpoint", || ledger.load_checkpoint()).await?)
}

/// Fault-injection hook for the crash tests (`CDC_TEST_CRASH_AT`): aborts the process, as if
/// killed, at the named step.
pub(crate) fn crash_point(point: &str) {
    if std::env::var("CDC_TEST_CRASH_AT").ok().as_deref() == Some(point) {
        tracing::error!(point, "CDC_TEST_CRASH_AT: aborting");
        std::process::abort();
    }
}

pub(crate) fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
