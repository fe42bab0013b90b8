//! The replication slot: checked, created, or recreated when asked (after a durable request
//! to backfill every table). Every step is safe to die at.

use std::time::Duration;

use cdc_contract::ledger::{Checkpoint, SnapshotState};
use cdc_contract::Lsn;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::lease::Lease;
use crate::ledger::{Ledger, LedgerError};
use crate::pipeline::{crash_point, CaptureError};
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

/// Makes sure the slot exists and is usable: creates it for a new pipeline, recreates it when
/// `CDC_RECREATE_SLOT` asks (after asking, durably, for every table to be backfilled again),
/// and finishes what an initial snapshot of an earlier version left (an exported snapshot read
/// in one transaction: its batches are retired and the tables backfilled instead).
pub async fn ensure_slot(
    settings: &Settings,
    params: &ConnectParams,
    catalog: &Catalog,
    checkpoint: &Option<Checkpoint>,
    ledger: &dyn Ledger,
    lease: &Lease,
) -> Result<(), CaptureError> {
    let client = catalog.client();
    let server = crate::checks::server(client).await?;
    let needs = crate::checks::Needs {
        failover: settings.flags.slot_failover,
        snapshots: settings.flags.snapshot != crate::config::SnapshotMode::Never
            || settings.flags.backfill_new_tables
            || settings.flags.recreate_slot,
    };
    act_on(crate::checks::server_findings(&server, needs))?;
    tracing::info!(version = %server.version, standby = server.in_recovery, "connected to the server");
    act_on(crate::checks::run(client, &settings.flags.publication, &settings.tables).await?)?;
    // `failover` is a column from 17 on.
    let failover_column = if server.version_num >= 170_000 {
        "failover"
    } else {
        "false"
    };
    let slot = client
        .query_opt(
            &format!(
                "SELECT plugin, database, coalesce(wal_status, ''), {failover_column} \
                 FROM pg_replication_slots WHERE slot_name = $1"
            ),
            &[&settings.slot],
        )
        .await?;
    if settings.flags.slot_failover {
        // (A failover slot on a standby was refused above.)
        warn_unless_standbys_wait(client).await?;
    }
    if let Some(row) = &slot {
        let plugin: Option<String> = row.get(0);
        let database: Option<String> = row.get(1);
        if plugin.as_deref() != Some("pgoutput")
            || database.as_deref() != Some(settings.database.as_str())
        {
            return Err(CaptureError::Setup(format!(
                "CDC_SLOT_NAME: slot {:?} exists but is not a pgoutput slot of database {:?}",
                settings.slot, settings.database
            )));
        }
    }
    // An initial snapshot an earlier version started in one transaction and did not finish:
    // its rows are retired and every table is backfilled instead, on a new slot.
    let unfinished = retry_ledger("reading the snapshot state", || ledger.load_snapshot())
        .await?
        .filter(|state| !state.complete);
    if let Some(state) = unfinished {
        tracing::warn!(slot = %settings.slot, "an initial snapshot of an earlier version did not complete: retiring its rows, recreating the slot and backfilling every table");
        if state.consistent_lsn > Lsn::ZERO {
            let retired = retry_ledger("retiring the abandoned snapshot", || {
                ledger.retire_snapshot(&state)
            })
            .await?;
            tracing::info!(retired, "batches of the abandoned snapshot retired");
        }
        request_initial(ledger).await?;
        if slot.is_some() {
            lease.fence(ledger).await?;
            drop_slot(client, &settings.slot).await?;
        }
        lease.fence(ledger).await?;
        create_slot(settings, params).await?;
        let done = SnapshotState {
            complete: true,
            ..state
        };
        retry_ledger("recording the old snapshot finished", || {
            ledger.save_snapshot(&done, &lease.owner, lease.epoch)
        })
        .await?;
        return Ok(());
    }
    let recorded = checkpoint.as_ref().is_some_and(|c| c.lsn > Lsn::ZERO);
    match slot {
        Some(row) => {
            let wal_status: String = row.get(2);
            if wal_status == "lost" {
                if settings.flags.recreate_slot {
                    tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is invalidated; recreating it and backfilling every table, keeping what the ledger recorded");
                    request_all(ledger).await?;
                    crash_point("after_backfill_requested");
                    lease.fence(ledger).await?;
                    drop_slot(client, &settings.slot).await?;
                    crash_point("after_slot_dropped");
                    lease.fence(ledger).await?;
                    create_slot(settings, params).await?;
                    crash_point("after_slot_created");
                    return Ok(());
                }
                return Err(CaptureError::Setup(format!(
                    "replication slot {:?} is invalidated (wal_status = lost): the WAL it needed was removed and \
                     changes since the ledger's checkpoint are gone. Start the capture with CDC_RECREATE_SLOT=true \
                     to recreate the slot and backfill every table again, keeping what the ledger recorded",
                    settings.slot
                )));
            }
            let failover: bool = row.get(3);
            if settings.flags.slot_failover && !failover {
                lease.fence(ledger).await?;
                make_failover(params, &settings.slot).await?;
            }
            Ok(())
        }
        None if recorded => {
            if settings.flags.recreate_slot {
                tracing::warn!(slot = %settings.slot, "CDC_RECREATE_SLOT: the slot is gone; recreating it and backfilling every table, keeping what the ledger recorded");
                request_all(ledger).await?;
                crash_point("after_backfill_requested");
                lease.fence(ledger).await?;
                create_slot(settings, params).await?;
                crash_point("after_slot_created");
                return Ok(());
            }
            Err(CaptureError::Setup(format!(
                "replication slot {:?} does not exist but the ledger holds a checkpoint for it: changes since \
                 the checkpoint are gone. Start the capture with CDC_RECREATE_SLOT=true to recreate the slot and \
                 backfill every table again, keeping what the ledger recorded (do not delete ledger items)",
                settings.slot
            )))
        }
        None => {
            // The snapshot is asked for durably before the slot exists: a task killed between
            // the two finds the request and the slot, and reads the tables.
            if settings.flags.snapshot != crate::config::SnapshotMode::Never {
                request_initial(ledger).await?;
                crash_point("after_backfill_requested");
            }
            lease.fence(ledger).await?;
            create_slot(settings, params).await?;
            crash_point("after_slot_created");
            Ok(())
        }
    }
}

/// Asks, durably, for the initial snapshot: every captured table read, tables without a key
/// included.
async fn request_initial(ledger: &dyn Ledger) -> Result<(), CaptureError> {
    use cdc_contract::ledger::{backfill_request_sk, BackfillRequest};
    let sk = backfill_request_sk(&BackfillRequest::Initial, request_id());
    retry_ledger("requesting the initial snapshot", || {
        ledger.put_backfill_request(&sk)
    })
    .await?;
    Ok(())
}

/// Asks, durably, for every captured table to be backfilled (the running capture takes the
/// request once the slot streams).
async fn request_all(ledger: &dyn Ledger) -> Result<(), CaptureError> {
    use cdc_contract::ledger::{backfill_request_sk, BackfillRequest};
    let sk = backfill_request_sk(&BackfillRequest::All, request_id());
    retry_ledger("requesting a backfill of every table", || {
        ledger.put_backfill_request(&sk)
    })
    .await?;
    Ok(())
}

/// A backfill request's unique id: nanoseconds since the epoch.
pub fn request_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Stops at the first fatal start-up finding; logs the warnings.
fn act_on(findings: Vec<crate::checks::Finding>) -> Result<(), CaptureError> {
    for finding in findings {
        match finding {
            crate::checks::Finding::Fatal(message) => return Err(CaptureError::Setup(message)),
            crate::checks::Finding::Warning(message) => tracing::warn!("start-up check: {message}"),
        }
    }
    Ok(())
}

/// Runs `call` again, once a second for up to 30 s, while it fails because the slot is in use
/// (SQLSTATE 55006): the previous task's walsender may hold the slot for a moment after a crash.
async fn while_slot_in_use<T, E, F, Fut>(
    mut call: F,
    code: impl Fn(&E) -> Option<&str>,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Err(e) if code(&e) == Some("55006") && attempt < 29 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            result => return result,
        }
    }
}

async fn drop_slot(client: &tokio_postgres::Client, slot: &str) -> Result<(), CaptureError> {
    while_slot_in_use(
        || async move {
            client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await
        },
        |e: &tokio_postgres::Error| e.code().map(|c| c.code()),
    )
    .await?;
    Ok(())
}

/// Creates the slot (no exported snapshot: the backfill reads tables in chunks of their own),
/// as a failover slot when `CDC_SLOT_FAILOVER` asks (17+, checked at start).
pub(crate) async fn create_slot(
    settings: &Settings,
    params: &ConnectParams,
) -> Result<(), CaptureError> {
    let mut conn = ReplicationConnection::connect(params).await?;
    let slot = quote_ident(&settings.slot);
    let sql = if settings.flags.slot_failover {
        format!(
            "CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput (SNAPSHOT 'nothing', FAILOVER true)"
        )
    } else {
        format!("CREATE_REPLICATION_SLOT {slot} LOGICAL pgoutput NOEXPORT_SNAPSHOT")
    };
    // On a standby the slot is ready only once the primary logs its running transactions
    // (every 15 s, or at once with `SELECT pg_log_standby_snapshot()` on the primary).
    tracing::info!(slot = %settings.slot, failover = settings.flags.slot_failover, "creating the replication slot (on a standby: waits for the primary's next running-transactions record)");
    conn.simple_query(&sql).await?;
    tracing::info!(slot = %settings.slot, "replication slot created");
    Ok(())
}

/// Makes an existing slot a failover slot (17+).
async fn make_failover(params: &ConnectParams, slot: &str) -> Result<(), CaptureError> {
    let sql = format!(
        "ALTER_REPLICATION_SLOT {} (FAILOVER true)",
        quote_ident(slot)
    );
    while_slot_in_use(
        || async {
            let mut conn = ReplicationConnection::connect(params).await?;
            conn.simple_query(&sql).await
        },
        crate::replication::ReplicationError::code,
    )
    .await?;
    tracing::info!(slot, "replication slot made a failover slot");
    Ok(())
}

/// A failover slot alone does not make a failover exact: unless the primary waits for its
/// standbys (`synchronized_standby_slots`) before sending changes, the capture can record a
/// transaction the promoted standby never received.
async fn warn_unless_standbys_wait(client: &tokio_postgres::Client) -> Result<(), CaptureError> {
    let standbys: String = client
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await?
        .get(0);
    if standbys.trim().is_empty() {
        tracing::warn!("CDC_SLOT_FAILOVER: synchronized_standby_slots is empty on the primary, so changes can reach the capture before the standby has them; after a failover to that standby the capture stops rather than skip (the server's WAL is behind the checkpoint). Set synchronized_standby_slots to the standby's physical slot");
    }
    Ok(())
}
