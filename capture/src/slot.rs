//! The replication slot: checked, created with an exported snapshot (its intent recorded
//! first), or retaken when an initial snapshot did not complete. Every step is safe to die at.

use std::time::Duration;

use cdc_contract::ledger::{Checkpoint, SnapshotState};
use cdc_contract::Lsn;

use crate::catalog::Catalog;
use crate::config::{Settings, SnapshotMode};
use crate::lease::Lease;
use crate::ledger::{Ledger, LedgerError};
use crate::pipeline::{crash_point, now_ms, CaptureError};
use crate::replication::{quote_ident, ConnectParams, ReplicationConnection};
use crate::retry::{retry, Policy};

/// Retries a ledger call while it fails transiently (the flushes' backoff, for about five
/// minutes), so one lost reply at start-up neither stops the capture nor leaves a step half done.
pub(crate) async fn retry_ledger<T, F, Fut>(what: &str, call: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    retry(
        what,
        None,
        Policy::Attempts(40),
        None,
        LedgerError::is_transient,
        call,
    )
    .await
}

/// A slot just created with an exported snapshot; the connection that exported it stays open
/// until the snapshot is read.
pub struct ExportedSnapshot {
    pub(crate) _conn: ReplicationConnection,
    pub(crate) name: String,
    pub(crate) consistent_lsn: Lsn,
}

/// Checks the slot and publication; creates the slot when it is missing and the ledger has no
/// checkpoint. A missing slot with a checkpoint is a definite error: its changes are gone.
///
/// Every step is safe to die at (issue 15, items 3 and 4). A new slot that will be snapshotted
/// is announced in the ledger (an incomplete snapshot state) before it exists, so a slot found
/// with an incomplete state is always ours to retake. A retake retires the abandoned snapshot's
/// batches first, then drops and recreates the slot: dying anywhere leaves the incomplete state
/// in place, and the next start retakes again.
pub async fn ensure_slot(
    settings: &Settings,
    params: &ConnectParams,
    catalog: &Catalog,
    checkpoint: &Option<Checkpoint>,
    ledger: &dyn Ledger,
    lease: &Lease,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    let client = catalog.client();
    let findings =
        crate::checks::run(client, &settings.flags.publication, &settings.tables).await?;
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
    let initial = settings.flags.snapshot != SnapshotMode::Never;
    // An unfinished snapshot is taken again whatever CDC_SNAPSHOT says now: its slot was made
    // for it, and its batches wait for it (the mode only decides what a new slot gets).
    let unfinished = retry_ledger("reading the snapshot state", || ledger.load_snapshot())
        .await?
        .filter(|state| !state.complete);
    if let (None, Some(state)) = (&slot, &unfinished) {
        // Died during a retake after the slot was dropped, or before a new slot existed.
        tracing::warn!(slot = %settings.slot, "the initial snapshot did not complete: creating the slot and taking it again");
        return retake_snapshot(settings, params, client, ledger, state, false, lease).await;
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
                return retake_snapshot(settings, params, client, ledger, &state, true, lease)
                    .await;
            }
            if wal_status == "lost" {
                if settings.flags.recreate_slot {
                    tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is invalidated; recreating it and taking a new snapshot, keeping what the ledger recorded");
                    // The intent first: from then on this is a retake (drop, create), and dying
                    // anywhere leads the next start to retake again.
                    let intent = record_intent(ledger, lease).await?;
                    return retake_snapshot(settings, params, client, ledger, &intent, true, lease)
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
            if settings.flags.recreate_slot {
                tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is gone; recreating it and taking a new snapshot, keeping what the ledger recorded");
                return create_with_snapshot(settings, params, ledger, lease).await;
            }
            Err(CaptureError::Setup(format!(
                "replication slot {:?} does not exist but the ledger holds a checkpoint for it: changes since \
                 the checkpoint are gone. Start the capture with CDC_RECREATE_SLOT=true to recreate the slot and \
                 fill the gap with a new snapshot, keeping what the ledger recorded (do not delete ledger items)",
                settings.slot
            )))
        }
        None if initial => create_with_snapshot(settings, params, ledger, lease).await,
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
    lease: &Lease,
) -> Result<Option<ExportedSnapshot>, CaptureError> {
    record_intent(ledger, lease).await?;
    crash_point("after_snapshot_intent");
    lease.fence(ledger).await?;
    let exported = create_slot(settings, params, true).await?;
    crash_point("after_slot_created");
    Ok(exported)
}

/// Records that a slot is about to be created for a snapshot (an incomplete state with no
/// consistent point yet), under the lease; returns it.
async fn record_intent(ledger: &dyn Ledger, lease: &Lease) -> Result<SnapshotState, CaptureError> {
    let intent = SnapshotState {
        complete: false,
        consistent_lsn: Lsn::ZERO,
        started_ms: now_ms(),
    };
    retry_ledger("recording the snapshot intent", || {
        ledger.save_snapshot(&intent, &lease.owner, lease.epoch)
    })
    .await?;
    Ok(intent)
}

/// Takes an unfinished initial snapshot again: retires its batches, drops the slot (when it
/// exists), creates it anew. The incomplete state stays recorded until the new snapshot records
/// its own, so dying at any step leads the next start here again.
async fn retake_snapshot(
    settings: &Settings,
    params: &ConnectParams,
    client: &tokio_postgres::Client,
    ledger: &dyn Ledger,
    state: &SnapshotState,
    slot_exists: bool,
    lease: &Lease,
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
        lease.fence(ledger).await?;
        drop_slot(client, &settings.slot).await?;
        crash_point("after_slot_dropped");
    }
    lease.fence(ledger).await?;
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

pub(crate) async fn create_slot(
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
