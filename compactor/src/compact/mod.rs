//! Compacting one table-hour, part by part.
//!
//! 1. Sort the hour's batch items out (valid, orphan, undecided) and read the hour record.
//!    Batches whose last change is at or below the record's `compacted_through` watermark are
//!    consumed; later ones (late batches too) are to do.
//! 2. Claim the hour: store the record with its version bumped and this attempt's id, on
//!    condition that nobody changed it since it was read and no live claim holds it. A claim that
//!    lapsed without a clean release means a previous attempt died: list the hour's prefixes and
//!    delete every part file no recorded part names (safe now: the dead attempt can no longer
//!    record, its version is gone).
//! 3. Stream the batches to do, one at a time (download ahead, gunzip and parse line by line,
//!    skipping changes at or below the watermark), into parts; each finished part's files are
//!    uploaded, then recorded with the record's new state in one conditional transaction, then
//!    the manifests are rewritten. A lost claim stops the attempt, which deletes its own files.
//! 4. Tag the consumed batches' staging objects, mark their items compacted (with a TTL), delete
//!    orphan items, and clear the pending marker unless a flush touched it meanwhile.
//!
//! `compact_hour` below runs the steps in order; step 2's claim renewal and cleanup are in
//! `claim.rs`, step 3 in `parts.rs`, step 4's per-batch work in `finish.rs`.

mod claim;
mod finish;
mod parts;

use std::collections::HashSet;
use std::io::BufRead;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use cdc_contract::layout::Format;
use cdc_contract::ledger::{BatchItem, HourRecord, PartFile, PartItem, PendingHour};
use cdc_contract::metrics as names;
use cdc_contract::{Hour, Position, TableName};

use crate::dead_letter::{record_name, DeadLetter};
use crate::envelope::Envelope;
use crate::ledger::{Claim, LedgerError, Recorded};
use crate::manifest::{attempt_of, Manifest};
use crate::parquet_schema::PartSchema;
use crate::part::{FinishedPart, Limits, PartError, PartStats, PartWriter};
use crate::plan::{HourBatches, SlotRun};
use crate::retry::retry;
use crate::store::StoreError;
use crate::upload::FileUpload;
use crate::{now_ms, Compactor};

/// Why compacting an hour stopped.
#[derive(Debug, thiserror::Error)]
pub enum HourError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// S3 failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another attempt took the hour over; this one stopped and removed its own files.
    #[error("another compaction took the hour over")]
    ClaimLost,
    /// Something a retry cannot fix: a staging object or schema version the ledger names is
    /// missing, or a part could not be encoded.
    #[error("{0}")]
    Definite(String),
}

impl HourError {
    /// True when a later run may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        match self {
            HourError::Ledger(e) => e.is_transient(),
            HourError::Store(e) => e.is_transient(),
            HourError::ClaimLost => true,
            HourError::Definite(_) => false,
        }
    }
}

impl From<PartError> for HourError {
    fn from(e: PartError) -> Self {
        HourError::Definite(format!("writing a part: {e}"))
    }
}

/// One table-hour to compact.
#[derive(Debug, Clone)]
pub struct HourJob {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
    /// Its pending marker, if it has one (cleared once everything is compacted).
    pub marker: Option<PendingHour>,
}

/// How an hour was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HourState {
    /// Every recorded batch is compacted; the marker is cleared (or was not there).
    Done,
    /// A batch may still be committing, or a flush touched the hour meanwhile: a later run
    /// finishes it.
    Pending,
    /// Another compaction holds the hour.
    Busy,
}

/// What one table-hour compaction did.
#[derive(Debug, Clone, Serialize)]
pub struct HourReport {
    /// The slot.
    pub slot: String,
    /// `schema.table`.
    pub table: String,
    /// The hour.
    pub hour: String,
    /// How the hour was left.
    pub state: HourState,
    /// Parts written.
    pub parts: u32,
    /// Changes written.
    pub rows: u64,
    /// Bytes written, every format.
    pub bytes: u64,
    /// Lines sent to the dead-letter prefix.
    pub dead_letters: u64,
    /// Batches newly marked compacted.
    pub consumed_batches: usize,
    /// Orphan batch items removed.
    pub orphans_removed: usize,
    /// Files of dead attempts removed.
    pub stale_files_removed: usize,
}

/// The state of a claimed hour.
struct Claimed<'a> {
    c: &'a Compactor,
    slot: &'a SlotRun,
    table: TableName,
    hour: Hour,
    record: HourRecord,
    parts: Vec<PartItem>,
    attempt: String,
    last_renew_ms: i64,
    report: HourReport,
}

impl Compactor {
    /// Compacts one table-hour of `slot`.
    pub async fn compact_hour(
        &self,
        slot: &SlotRun,
        job: &HourJob,
    ) -> Result<HourReport, HourError> {
        let started = Instant::now();
        let ledger = &*self.ledger;
        let HourBatches {
            valid,
            orphans,
            undecided,
        } = slot.hour_batches(ledger, &job.table, job.hour).await?;
        let record = retry("get hour record", || {
            ledger.hour_record(&slot.slot, &job.table, job.hour)
        })
        .await?
        .unwrap_or_else(|| HourRecord::new(job.table.clone(), job.hour));
        let mut report = HourReport {
            slot: slot.slot.clone(),
            table: job.table.to_string(),
            hour: job.hour.to_string(),
            state: HourState::Done,
            parts: 0,
            rows: 0,
            bytes: 0,
            dead_letters: 0,
            consumed_batches: 0,
            orphans_removed: 0,
            stale_files_removed: 0,
        };
        let watermark = record.compacted_through;
        let todo: Vec<BatchItem> = valid
            .iter()
            .filter(|b| watermark.is_none_or(|w| b.last > w))
            .cloned()
            .collect();
        let now = now_ms();
        let unreleased = record.version > 0 && record.claim_until_ms != 0;
        // A cleanup after a lapsed attempt is checked again once that attempt can no longer
        // complete an upload (issue 15, item 11).
        let recheck_due = record.recheck_after_ms != 0 && now >= record.recheck_after_ms;
        let mut record = record;
        if !todo.is_empty() || unreleased || recheck_due {
            if record.claim_until_ms >= now {
                tracing::info!(slot = %slot.slot, table = %job.table, hour = %job.hour, attempt = %record.claim_attempt, "hour is being compacted by another attempt");
                report.state = HourState::Busy;
                return Ok(report);
            }
            let attempt = new_attempt_id();
            let claimed = HourRecord {
                version: record.version + 1,
                claim_attempt: attempt.clone(),
                claim_until_ms: now + self.config.hour_claim.as_millis() as i64,
                updated_ms: now,
                ..record.clone()
            };
            let claim = retry("claim hour", || {
                ledger.claim_hour(&slot.slot, record.version, &claimed, now)
            })
            .await?;
            let Claim::Claimed(claimed) = claim else {
                report.state = HourState::Busy;
                return Ok(report);
            };
            let parts = retry("get parts", || {
                ledger.parts(&slot.slot, &job.table, job.hour)
            })
            .await?;
            let mut run = Claimed {
                c: self,
                slot,
                table: job.table.clone(),
                hour: job.hour,
                record: claimed,
                parts,
                attempt,
                last_renew_ms: now,
                report,
            };
            let straggler_window = self.config.straggler_window.as_millis() as i64;
            let result = async {
                if unreleased || recheck_due {
                    run.remove_unrecorded_files().await?;
                    run.write_manifests().await?;
                    // After a lapsed attempt, list again once it can no longer upload; a
                    // recheck that found the hour clean ends it.
                    run.record.recheck_after_ms = if unreleased && straggler_window > 0 {
                        now_ms() + straggler_window
                    } else {
                        0
                    };
                }
                if !todo.is_empty() {
                    run.write_parts(todo).await?;
                }
                Ok::<(), HourError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    retry("release hour", || {
                        ledger.release_hour(&slot.slot, &run.record)
                    })
                    .await?;
                }
                Err(e) => {
                    // Leave the claim lapsed but not released: the next run then removes any
                    // file this attempt left unrecorded.
                    if !matches!(e, HourError::ClaimLost) {
                        if let Err(error) = ledger.renew_claim(&slot.slot, &run.record, 1).await {
                            tracing::warn!(error = %error, "could not give the hour's claim up; it lapses by itself");
                        }
                    }
                    return Err(e);
                }
            }
            record = run.record;
            report = run.report;
        }

        // Consumed batches: tag their staging objects for expiry, then mark their items.
        let through = record.compacted_through;
        let consumed: Vec<&BatchItem> = valid
            .iter()
            .filter(|b| !b.compacted && through.is_some_and(|w| b.last <= w))
            .collect();
        let expires_at = now_ms() / 1000 + self.batch_ttl_seconds;
        // Futures collected first: a stream holding the closure would make the compaction's
        // future lose `Send` (the closure's borrow is not general enough).
        let pending: Vec<_> = consumed
            .iter()
            .map(|b| self.consume(&slot.slot, b, expires_at))
            .collect();
        let results = futures::stream::iter(pending)
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        for r in results {
            r?;
        }
        report.consumed_batches = consumed.len();
        for orphan in &orphans {
            retry("delete orphan batch item", || {
                ledger.delete_batch(&slot.slot, orphan)
            })
            .await?;
        }
        report.orphans_removed = orphans.len();
        if !orphans.is_empty() {
            tracing::info!(slot = %slot.slot, table = %job.table, hour = %job.hour, items = orphans.len(), "removed orphan batch items (their flush never committed)");
        }

        let all_consumed = valid.iter().all(|b| through.is_some_and(|w| b.last <= w));
        // A recheck still to come keeps the pending marker, so a sweep returns to the hour.
        let recheck_waiting = record.recheck_after_ms != 0;
        report.state = if undecided || !all_consumed || recheck_waiting {
            HourState::Pending
        } else {
            match &job.marker {
                Some(marker) => {
                    if retry("clear pending hour", || {
                        ledger.clear_pending(&slot.slot, marker)
                    })
                    .await?
                    {
                        HourState::Done
                    } else {
                        HourState::Pending
                    }
                }
                None => HourState::Done,
            }
        };
        if report.parts > 0 || report.dead_letters > 0 {
            let mut values = vec![
                (
                    names::COMPACTION_DURATION,
                    started.elapsed().as_secs_f64() * 1000.0,
                ),
                (names::COMPACTION_ROWS, report.rows as f64),
                (names::COMPACTION_BYTES, report.bytes as f64),
            ];
            if report.dead_letters > 0 {
                values.push((names::DEAD_LETTER_RECORDS, report.dead_letters as f64));
            }
            crate::metrics::emit(&slot.slot, &values);
        }
        tracing::info!(
            slot = %slot.slot, table = %job.table, hour = %job.hour, state = ?report.state,
            parts = report.parts, rows = report.rows, bytes = report.bytes,
            consumed = report.consumed_batches, ms = started.elapsed().as_millis() as u64,
            "hour compacted"
        );
        Ok(report)
    }
}

/// A short id unique to one compaction attempt (8 hex digits; never contains `-`).
pub fn new_attempt_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..8].to_owned()
}
