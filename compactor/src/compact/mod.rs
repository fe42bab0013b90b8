//! Compacting one table-hour, part by part.
//!
//! 1. Sort the hour's batch items out (valid, orphan, undecided) and read the hour record.
//!    Batches whose last change is at or below the record's `compacted_through` watermark are
//!    consumed; later ones (late batches too) are to do.
//! 2. Claim the hour: store the record with its version bumped and this attempt's id, on
//!    condition that nobody changed it since it was read and no live claim holds it. A claim that
//!    lapsed without a clean release means a previous attempt died: list the hour's prefixes and
//!    delete every part file no recorded part names (safe now: the dead attempt can no longer
//!    record, its version is gone), and list them again once the straggler window has passed
//!    (by then the dead attempt cannot finish an upload either).
//! 3. Stream the batches to do, one at a time (download ahead, gunzip and parse line by line,
//!    skipping changes at or below the watermark), into parts; each finished part's files are
//!    uploaded, then recorded with the record's new state in one conditional transaction, then
//!    the manifests are rewritten. A lost claim stops the attempt, which deletes its own files.
//!    Once the last part is recorded, a watermark short of the batches read whole (their last
//!    lines dead letters) is raised to their end, on the same condition, so they are consumed
//!    rather than left to do for ever. Then the claim is released; after a failure it is given
//!    up unreleased, so the next run cleans up.
//! 4. Consume the batches by whole flushes, once the watermark passes all of a flush's batches
//!    in the hour: tag their staging objects, mark their items compacted (with a TTL, 25 to a
//!    request), tell the flush record the table-hour is done; the flushes ready at one time
//!    together, each step for all before the next. Flushes a recorded part passes are consumed
//!    beside the writing of the later parts (`finish::EarlyConsumption`), the rest after it.
//!    Then delete orphan items, and clear the pending marker unless a batch is undecided or not
//!    consumed, a recheck is to come, or a flush touched it meanwhile.
//!
//! `compact_hour` below runs the steps in order, one call each: step 1 here, step 2 (the
//! claim, its renewal, the cleanup after a lapsed claim and the release) in `claim.rs`, step 3
//! in `parts.rs`, step 4 in `finish.rs`. The steps take a `Deps`, the few things of the
//! [`Compactor`] they use, not the compactor.

mod claim;
mod finish;
mod parts;
mod whole;

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use cdc_contract::layout::{Format, Layout};
use cdc_contract::ledger::{BatchItem, HourRecord, PendingHour};
use cdc_contract::metrics as names;
use cdc_contract::{Hour, Position, TableName};

use crate::dead_letter::DeadLetterNotifier;
use crate::ledger::Ledger;
use crate::part::{Limits, PartError};
use crate::plan::{HourBatches, SlotRun};
use crate::retry::retry;
use crate::store::ObjectStore;
use crate::{now_ms, Compactor};

use claim::{claim, Cleanup};
use finish::{consume_early, finish, Consumed, EarlyConsumption};
pub(crate) use parts::SchemaCache;

/// Why compacting an hour stopped.
#[derive(Debug, thiserror::Error)]
pub enum HourError {
    /// The ledger or S3 failed.
    #[error(transparent)]
    Aws(#[from] cdc_contract::aws::AwsError),
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
            HourError::Aws(e) => e.is_transient(),
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
    /// Stop by this time (the invocation's deadline less a margin): the part being written
    /// ends at the next batch and is recorded, the hour stays pending, and the next run goes
    /// on after it. At least one batch is written once the hour is taken, so every run makes
    /// progress.
    pub stop_at: Option<Instant>,
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
    /// Where the hour's time went, in ms from its start: its batch items and record read and
    /// sorted out (step 1), ...
    pub planned_ms: u64,
    /// ... its parts written and recorded and the claim released (step 3; as `planned_ms` when
    /// there was nothing to write), ...
    pub written_ms: u64,
    /// ... and everything done (step 4: consuming what the run's early consumption had not,
    /// orphans, the marker).
    pub done_ms: u64,
    /// The schema version and last position of the last part written, if any.
    #[serde(skip)]
    pub latest_part: Option<(String, Position)>,
}

impl HourReport {
    /// A report of `job` that did nothing yet.
    pub(crate) fn new(slot: &str, job: &HourJob, state: HourState) -> Self {
        HourReport {
            slot: slot.to_owned(),
            table: job.table.to_string(),
            hour: job.hour.to_string(),
            state,
            parts: 0,
            rows: 0,
            bytes: 0,
            dead_letters: 0,
            consumed_batches: 0,
            orphans_removed: 0,
            stale_files_removed: 0,
            planned_ms: 0,
            written_ms: 0,
            done_ms: 0,
            latest_part: None,
        }
    }
}

/// What an hour's steps use of the [`Compactor`]: its seams, where files go, the few settings
/// they read and the schema cache. Built once per hour.
#[derive(Clone, Copy)]
struct Deps<'a> {
    ledger: &'a dyn Ledger,
    /// An `Arc`, shared with the task that downloads staging objects ahead.
    store: &'a Arc<dyn ObjectStore>,
    notifier: Option<&'a dyn DeadLetterNotifier>,
    layout: &'a Layout,
    schemas: &'a SchemaCache,
    /// The final formats.
    formats: &'a [Format],
    /// How long a claim holds the hour, in ms.
    claim_ms: i64,
    /// How long after a lapsed attempt the hour's files are listed again, in ms.
    straggler_window_ms: i64,
    /// The size limits of a part.
    limits: Limits,
    /// How long consumed batch items live on, in seconds.
    batch_ttl_seconds: i64,
    /// When to stop writing (see [`HourJob::stop_at`]).
    stop_at: Option<Instant>,
}

impl Compactor {
    /// Compacts one table-hour of `slot`.
    pub async fn compact_hour(
        &self,
        slot: &SlotRun,
        job: &HourJob,
    ) -> Result<HourReport, HourError> {
        let started = Instant::now();
        let mut deps = self.deps();
        deps.stop_at = job.stop_at;

        // 1. Sort the batches out and read the record: what is to do, what to clean up.
        let (batches, record) = sort_out(deps.ledger, slot, job).await?;
        let todo = to_do(&batches.valid, record.compacted_through);
        let now = now_ms();
        let cleanup = Cleanup::of(&record, now);
        let planned_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(table = %job.table, hour = %job.hour, batches = batches.valid.len(), to_do = todo.len(), ms = planned_ms, "hour planned");

        let mut early = Consumed::default();
        let (record, mut report, written_ms) = if todo.is_empty() && !cleanup.is_due() {
            (
                record,
                HourReport::new(&slot.slot, job, HourState::Done),
                planned_ms,
            )
        } else {
            // 2. Claim the hour; after a lapsed claim, remove the files no part names.
            let Some(mut run) = claim(deps, &slot.slot, job, &record, now).await? else {
                return Ok(HourReport::new(&slot.slot, job, HourState::Busy));
            };
            tracing::debug!(table = %job.table, hour = %job.hour, ms = started.elapsed().as_millis() as u64, "hour claimed");
            // Flushes the recorded parts pass whole are consumed (step 4) beside the writing.
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            run.early = EarlyConsumption::new(&batches, record.compacted_through, tx);
            let writing = async {
                let result = async {
                    if cleanup.is_due() {
                        run.clean_up(cleanup).await?;
                    }
                    // 3. Write the batches to do into recorded parts.
                    if !todo.is_empty() {
                        run.write_parts(todo).await?;
                    }
                    Ok(())
                }
                .await;
                // Ends the early consumption's channel: it finishes what it was handed.
                run.early = None;
                let ended = run.end(result).await;
                (ended, started.elapsed().as_millis() as u64)
            };
            let ((ended, written_ms), consumed) = tokio::join!(
                writing,
                consume_early(deps, &slot.slot, rx, &batches.last_undone)
            );
            early = consumed;
            let (record, report) = ended?;
            tracing::debug!(table = %job.table, hour = %job.hour, ms = written_ms, "parts written, claim released");
            (record, report, written_ms)
        };
        report.planned_ms = planned_ms;
        report.written_ms = written_ms;

        // 4. Consume the batches the record covers, remove orphans, clear the marker.
        finish(
            deps,
            &slot.slot,
            job,
            &batches,
            &record,
            &early,
            &mut report,
        )
        .await?;
        report.done_ms = started.elapsed().as_millis() as u64;
        summarize(&slot.slot, job, &report, started);
        Ok(report)
    }

    /// What an hour's steps use of the compactor.
    fn deps(&self) -> Deps<'_> {
        let config = &self.config;
        Deps {
            ledger: &*self.ledger,
            store: &self.store,
            notifier: self.notifier.as_deref(),
            layout: &self.layout,
            schemas: &self.schemas,
            formats: &config.formats,
            claim_ms: config.hour_claim.as_millis() as i64,
            straggler_window_ms: config.straggler_window.as_millis() as i64,
            limits: Limits {
                part_max_bytes: config.part_max_bytes,
                row_group_bytes: config.row_group_bytes,
                compression: config.compression,
                gzip_level: config.jsonl_gzip_level,
                jsonl_compression: config.jsonl_compression,
                avro_codec: config.avro_codec,
            },
            batch_ttl_seconds: self.batch_ttl_seconds,
            stop_at: None,
        }
    }
}

/// Step 1: the hour's batch items sorted out, and its record (a new one when it has none).
async fn sort_out(
    ledger: &dyn Ledger,
    slot: &SlotRun,
    job: &HourJob,
) -> Result<(HourBatches, HourRecord), HourError> {
    let batches = slot.hour_batches(ledger, &job.table, job.hour).await?;
    let record = retry("get hour record", || {
        ledger.hour_record(&slot.slot, &job.table, job.hour)
    })
    .await?
    .unwrap_or_else(|| HourRecord::new(job.table.clone(), job.hour));
    Ok((batches, record))
}

/// The valid batches with changes past the watermark (late batches too).
fn to_do(valid: &[BatchItem], watermark: Option<Position>) -> Vec<BatchItem> {
    valid
        .iter()
        .filter(|b| watermark.is_none_or(|w| b.last > w))
        .cloned()
        .collect()
}

/// The hour's metrics, when it wrote anything, and its closing log line.
fn summarize(slot: &str, job: &HourJob, report: &HourReport, started: Instant) {
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
        crate::metrics::emit(slot, &values);
    }
    tracing::info!(
        slot = %slot, table = %job.table, hour = %job.hour, state = ?report.state,
        parts = report.parts, rows = report.rows, bytes = report.bytes,
        consumed = report.consumed_batches, planned_ms = report.planned_ms,
        written_ms = report.written_ms, ms = report.done_ms,
        "hour compacted"
    );
}

/// A short id unique to one compaction attempt (8 hex digits; never contains `-`).
pub fn new_attempt_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..8].to_owned()
}
