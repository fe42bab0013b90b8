//! `cdc-status`: an operator's view of each slot, from the ledger (and, when given, the database
//! and the notification dead-letter queue): who holds the lease, where the checkpoint is and how
//! old it is, the backfill's progress, the hours waiting for compaction, the last compaction,
//! and what was set aside as dead letters.

use serde::Serialize;

use cdc_contract::ledger::{self as items, Checkpoint, Lease};
use cdc_contract::TableName;
use compactor::ledger::{DynamoLedger, Ledger};

/// Everything `cdc-status` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// When it was read (ms since the epoch).
    pub read_ms: i64,
    /// One entry per slot.
    pub slots: Vec<SlotStatus>,
    /// Objects under `{base}/_dead_letter/` (records the compactor could not read), when the
    /// bucket is given; counted up to 10,000.
    pub dead_letter_objects: Option<u64>,
    /// Messages in the notification dead-letter queue, when its URL is given.
    pub notify_dead_letters: Option<u64>,
}

/// One slot.
#[derive(Debug, Clone, Serialize)]
pub struct SlotStatus {
    /// The slot.
    pub slot: String,
    /// The lease, if one was ever taken.
    pub lease: Option<LeaseStatus>,
    /// The checkpoint, if one was recorded.
    pub checkpoint: Option<CheckpointStatus>,
    /// The slot on the server, when the database was given.
    pub replication: Option<ReplicationStatus>,
    /// The backfill, when the checkpoint records one.
    pub backfill: Option<BackfillStatus>,
    /// Table-hours with batches not compacted yet.
    pub pending_hours: usize,
    /// The oldest of them (`YYYY-MM-DDTHH`).
    pub oldest_pending_hour: Option<String>,
    /// Seconds since the end of the oldest pending hour (0 while it is open).
    pub oldest_pending_age_s: Option<i64>,
    /// The hour record changed last by the compactor.
    pub last_compaction: Option<CompactionStatus>,
}

/// A lease.
#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    /// The holder.
    pub owner: String,
    /// Its epoch.
    pub epoch: u64,
    /// True while it has not expired.
    pub live: bool,
    /// Milliseconds until it expires (negative: expired that long ago).
    pub expires_in_ms: i64,
}

/// A checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointStatus {
    /// Its LSN.
    pub lsn: String,
    /// Commit time of the last recorded transaction (ms since the epoch; 0: none yet).
    pub commit_ms: i64,
    /// Seconds since the capture was last known caught up (or since the last recorded commit).
    pub age_s: Option<i64>,
    /// The last committed flush.
    pub flush_seq: u64,
}

/// The slot as the server sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationStatus {
    /// The slot exists.
    pub exists: bool,
    /// A walsender streams from it.
    pub active: bool,
    /// `confirmed_flush_lsn`.
    pub confirmed_flush_lsn: Option<String>,
    /// Bytes of WAL between the server's current position and the confirmed one.
    pub lag_bytes: Option<i64>,
    /// `wal_status` (`reserved`, `extended`, `unreserved`, `lost`).
    pub wal_status: Option<String>,
}

/// The backfill.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillStatus {
    /// Tables still to read, the first being read.
    pub pending: Vec<TableBackfill>,
    /// Tables read (or known without a read).
    pub tables_done: usize,
}

/// One table's backfill.
#[derive(Debug, Clone, Serialize)]
pub struct TableBackfill {
    /// The table.
    pub table: String,
    /// Rows recorded.
    pub rows: u64,
    /// Chunks recorded.
    pub chunks: u64,
    /// When it was asked for (ms since the epoch).
    pub requested_ms: i64,
}

/// The last compaction.
#[derive(Debug, Clone, Serialize)]
pub struct CompactionStatus {
    /// The table.
    pub table: String,
    /// The hour.
    pub hour: String,
    /// When its record last changed (ms since the epoch).
    pub updated_ms: i64,
    /// Seconds since then.
    pub age_s: i64,
}

/// What reading the status can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The ledger.
    #[error("ledger: {0}")]
    Ledger(#[from] cdc_contract::aws::AwsError),
    /// A ledger item is not what the contract says.
    #[error("ledger item: {0}")]
    Item(#[from] cdc_contract::ledger::ItemError),
}

/// Reads the status of `slots` (every registered slot when empty) from the ledger.
pub async fn read_slots(
    ledger: &DynamoLedger,
    table: &cdc_contract::dynamo::Table,
    slots: &[String],
    now_ms: i64,
) -> Result<Vec<SlotStatus>, StatusError> {
    let slots = if slots.is_empty() {
        let mut all = ledger.slots().await?;
        all.sort();
        all
    } else {
        slots.to_vec()
    };
    let mut out = Vec::new();
    for slot in slots {
        let lease = table
            .get(items::slot_pk(&slot), items::LEASE_SK.to_owned())
            .await?
            .map(|item| Lease::from_item(&item))
            .transpose()?
            .map(|l| LeaseStatus {
                live: l.expires_ms > now_ms,
                expires_in_ms: l.expires_ms - now_ms,
                owner: l.owner,
                epoch: l.epoch,
            });
        let checkpoint = ledger.checkpoint(&slot).await?;
        let pending = ledger.pending_hours(&slot, None).await?;
        let oldest = pending.iter().map(|p| p.hour).min();
        let mut tables: Vec<TableName> = pending.iter().map(|p| p.table.clone()).collect();
        if let Some(b) = checkpoint.as_ref().and_then(|c| c.backfill.as_ref()) {
            tables.extend(b.known.iter().cloned());
            tables.extend(b.pending.iter().map(|p| p.table.clone()));
        }
        tables.sort();
        tables.dedup();
        let mut last: Option<CompactionStatus> = None;
        for t in &tables {
            for record in ledger.hour_records(&slot, t).await? {
                if record.version > 0
                    && last
                        .as_ref()
                        .is_none_or(|l| record.updated_ms > l.updated_ms)
                {
                    last = Some(CompactionStatus {
                        table: t.to_string(),
                        hour: record.hour.to_string(),
                        updated_ms: record.updated_ms,
                        age_s: (now_ms - record.updated_ms) / 1000,
                    });
                }
            }
        }
        out.push(SlotStatus {
            backfill: checkpoint
                .as_ref()
                .and_then(|c| c.backfill.as_ref())
                .map(|b| BackfillStatus {
                    pending: b
                        .pending
                        .iter()
                        .map(|p| TableBackfill {
                            table: p.table.to_string(),
                            rows: p.rows,
                            chunks: p.chunks,
                            requested_ms: p.requested_ms,
                        })
                        .collect(),
                    tables_done: b.known.len(),
                }),
            checkpoint: checkpoint.as_ref().map(|c| checkpoint_status(c, now_ms)),
            lease,
            replication: None,
            pending_hours: pending.len(),
            oldest_pending_hour: oldest.map(|h| h.to_string()),
            oldest_pending_age_s: oldest.map(|h| ((now_ms - h.end_millis()) / 1000).max(0)),
            last_compaction: last,
            slot,
        });
    }
    Ok(out)
}

fn checkpoint_status(c: &Checkpoint, now_ms: i64) -> CheckpointStatus {
    let since = c.caught_up_ms.unwrap_or(c.commit_ms).max(c.commit_ms);
    CheckpointStatus {
        lsn: c.lsn.to_string(),
        commit_ms: c.commit_ms,
        age_s: (since > 0).then(|| (now_ms - since) / 1000),
        flush_seq: c.flush_seq,
    }
}

/// The slot `slot` as the server sees it.
pub async fn replication_status(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<ReplicationStatus, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                    wal_status::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(match row {
        None => ReplicationStatus {
            exists: false,
            active: false,
            confirmed_flush_lsn: None,
            lag_bytes: None,
            wal_status: None,
        },
        Some(r) => ReplicationStatus {
            exists: true,
            active: r.get(0),
            confirmed_flush_lsn: r.get(1),
            lag_bytes: r.get(2),
            wal_status: r.get(3),
        },
    })
}

/// The status as text, a block per slot.
pub fn render_text(status: &Status) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    if status.slots.is_empty() {
        s.push_str("no slot is registered in the ledger\n");
    }
    for slot in &status.slots {
        let _ = writeln!(s, "slot {}", slot.slot);
        match &slot.lease {
            Some(l) if l.live => {
                let _ = writeln!(s, "  lease        held by {} (epoch {})", l.owner, l.epoch);
            }
            Some(l) => {
                let _ = writeln!(
                    s,
                    "  lease        expired {} s ago (last holder {}, epoch {})",
                    -l.expires_in_ms / 1000,
                    l.owner,
                    l.epoch
                );
            }
            None => s.push_str("  lease        never taken\n"),
        }
        match &slot.checkpoint {
            Some(c) => {
                let age = c
                    .age_s
                    .map_or("no commit yet".to_owned(), |a| format!("{a} s old"));
                let _ = writeln!(s, "  checkpoint   {} ({age}, flush {})", c.lsn, c.flush_seq);
            }
            None => s.push_str("  checkpoint   none\n"),
        }
        if let Some(r) = &slot.replication {
            if r.exists {
                let _ = writeln!(
                    s,
                    "  replication  {}, confirmed {}, lag {} bytes, wal {}",
                    if r.active { "active" } else { "inactive" },
                    r.confirmed_flush_lsn.as_deref().unwrap_or("-"),
                    r.lag_bytes.map_or("-".to_owned(), |b| b.to_string()),
                    r.wal_status.as_deref().unwrap_or("-"),
                );
            } else {
                s.push_str("  replication  the slot does not exist on the server\n");
            }
        }
        match &slot.backfill {
            Some(b) if b.pending.is_empty() => {
                let _ = writeln!(s, "  backfill     done ({} tables)", b.tables_done);
            }
            Some(b) => {
                let _ = writeln!(
                    s,
                    "  backfill     {} tables to read, {} done",
                    b.pending.len(),
                    b.tables_done
                );
                for t in &b.pending {
                    let _ = writeln!(
                        s,
                        "               {}: {} rows in {} chunks",
                        t.table, t.rows, t.chunks
                    );
                }
            }
            None => {}
        }
        match &slot.oldest_pending_hour {
            Some(h) => {
                let _ = writeln!(
                    s,
                    "  pending      {} table-hours, oldest {h} (closed {} s ago)",
                    slot.pending_hours,
                    slot.oldest_pending_age_s.unwrap_or(0)
                );
            }
            None => s.push_str("  pending      none\n"),
        }
        match &slot.last_compaction {
            Some(c) => {
                let _ = writeln!(
                    s,
                    "  compacted    {} {} ({} s ago)",
                    c.table, c.hour, c.age_s
                );
            }
            None => s.push_str("  compacted    nothing yet\n"),
        }
    }
    if let Some(n) = status.dead_letter_objects {
        let _ = writeln!(s, "dead letters   {n} objects under _dead_letter/");
    }
    if let Some(n) = status.notify_dead_letters {
        let _ = writeln!(s, "notify DLQ     {n} messages");
    }
    s
}
