//! A flush: upload the batches (in parallel), record them and the new checkpoint atomically
//! under the lease, notify the compactor. Transient failures are retried with backoff, forever:
//! a flush either completes or stops the capture with a definite error; it never confirms early.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use cdc_contract::layout::Layout;
use cdc_contract::ledger::{BatchItem, Checkpoint, FlushId};
use cdc_contract::notify::{Notification, TableHour};
use cdc_contract::schema::TableSchema;
use cdc_contract::TableName;

use crate::batch::Segment;
use crate::ledger::{FlushRequest, Ledger, LedgerError};
use crate::notify::Notifier;
use crate::retry::{retry, Policy};
use crate::sink::{BatchSink, SinkError};

/// Why a flush gave up.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The lease was taken over: this task must stop.
    #[error(transparent)]
    Fenced(LedgerError),
    /// The ledger refused for a reason retrying cannot fix.
    #[error(transparent)]
    Ledger(LedgerError),
    /// S3 refused for a reason retrying cannot fix (missing bucket, access denied).
    #[error(transparent)]
    Sink(SinkError),
}

/// What a completed flush recorded.
#[derive(Debug, Clone)]
pub struct FlushOutcome {
    /// The recorded checkpoint.
    pub checkpoint: Checkpoint,
    /// Changes recorded.
    pub rows: u64,
    /// Gzipped bytes uploaded.
    pub bytes: u64,
    /// Attempts that failed transiently.
    pub retries: u64,
    /// Upload plus record time.
    pub latency: Duration,
    /// Changes and gzipped bytes per table.
    pub tables: Vec<(TableName, u64, u64)>,
}

/// Everything a flush needs, shared by all flushes of a run.
pub struct Flusher {
    /// Slot (pipeline) name.
    pub slot: String,
    /// S3 layout.
    pub layout: Layout,
    /// Where batches go.
    pub sink: Arc<dyn BatchSink>,
    /// The ledger.
    pub ledger: Arc<dyn Ledger>,
    /// The compactor's notifications.
    pub notifier: Arc<dyn Notifier>,
    /// This task's lease owner id.
    pub owner: String,
    /// This task's lease epoch.
    pub epoch: u64,
    /// Parallel uploads per flush.
    pub upload_concurrency: usize,
    /// Fault-injection hook for the crash tests (`CDC_TEST_CRASH_AT`): the process aborts, as if
    /// killed, right after the uploads (`after_upload`) or right after the ledger record
    /// (`after_record`, before the confirmation).
    pub crash_at: Option<String>,
}

impl Flusher {
    fn crash_point(&self, point: &str, rows: u64) {
        if rows > 0 && self.crash_at.as_deref() == Some(point) {
            tracing::error!(point, "CDC_TEST_CRASH_AT: aborting");
            std::process::abort();
        }
    }

    /// Runs one flush of `segments` to `checkpoint` as flush number `seq`. `notify` says whether
    /// to notify when no batch was written (a heartbeat that closes an hour).
    pub async fn flush(
        &self,
        segments: Vec<Segment>,
        mut checkpoint: Checkpoint,
        seq: u64,
        notify_empty: bool,
    ) -> Result<FlushOutcome, FlushError> {
        let started = Instant::now();
        let id = FlushId {
            seq,
            epoch: self.epoch,
        };
        checkpoint.flush_seq = seq;
        checkpoint.flush_id = id.to_string();

        let mut schemas: Vec<TableSchema> = Vec::new();
        let mut uploads = Vec::with_capacity(segments.len());
        for seg in segments {
            let table = seg.encoder.table.clone();
            // A schema item is per table and version: tables with identical columns share a
            // version id, and each needs its own item (issue 15, item 1).
            if !schemas
                .iter()
                .any(|s| s.table == table && s.version_id() == seg.encoder.schema_id)
            {
                schemas.push(seg.encoder.schema.clone());
            }
            let key = self
                .layout
                .staging_key(&table, seg.hour, seg.first, seg.last);
            let item = BatchItem {
                table,
                hour: seg.hour,
                key: key.clone(),
                first: seg.first,
                last: seg.last,
                rows: seg.rows,
                bytes: 0,
                first_commit_ms: seg.first_commit_ms,
                last_commit_ms: seg.last_commit_ms,
                schema_id: seg.encoder.schema_id.clone(),
                flush_id: id,
                compacted: false,
            };
            uploads.push((item, Bytes::from(seg.data)));
        }

        let rows: u64 = uploads.iter().map(|(b, _)| b.rows).sum();
        let retry_count = AtomicU64::new(0);
        let batches: Vec<BatchItem> = futures::stream::iter(uploads)
            .map(|(mut item, data)| {
                let retry_count = &retry_count;
                async move {
                    let put = || self.sink.put_batch(&item.key, data.clone());
                    match retry(
                        "batch upload",
                        Some(&item.key),
                        Policy::Forever,
                        Some(retry_count),
                        SinkError::is_transient,
                        put,
                    )
                    .await
                    {
                        Ok(size) => {
                            item.bytes = size;
                            Ok::<_, FlushError>(item)
                        }
                        Err(e) => Err(FlushError::Sink(e)),
                    }
                }
            })
            .buffer_unordered(self.upload_concurrency.max(1))
            .try_collect()
            .await?;
        let bytes = batches.iter().map(|b| b.bytes).sum();
        self.crash_point("after_upload", rows);

        let request = FlushRequest {
            id,
            batches,
            schemas,
            checkpoint: checkpoint.clone(),
        };
        let subject = id.to_string();
        retry(
            "recording flush",
            Some(&subject),
            Policy::Forever,
            Some(&retry_count),
            LedgerError::is_transient,
            || self.ledger.record_flush(&request, &self.owner, self.epoch),
        )
        .await
        .map_err(|e| match e {
            e @ LedgerError::Fenced(_) => FlushError::Fenced(e),
            e => FlushError::Ledger(e),
        })?;
        let retries = retry_count.load(Ordering::Relaxed);

        self.crash_point("after_record", rows);

        if !request.batches.is_empty() || notify_empty {
            let mut hours: Vec<TableHour> = request
                .hours()
                .into_iter()
                .map(|(table, hour)| TableHour { table, hour })
                .collect();
            hours.dedup();
            let note = Notification {
                slot: self.slot.clone(),
                flush_id: id.to_string(),
                commit_ms: checkpoint.commit_ms,
                caught_up_ms: checkpoint.caught_up_ms,
                hours,
            };
            if let Err(error) = self.notifier.notify(&note).await {
                tracing::warn!(error = %error, flush = %id, "notification failed; the compactor's sweep will find the batches");
            }
        }
        let mut tables: Vec<(TableName, u64, u64)> = Vec::new();
        for b in &request.batches {
            match tables.iter_mut().find(|(t, _, _)| *t == b.table) {
                Some(entry) => {
                    entry.1 += b.rows;
                    entry.2 += b.bytes;
                }
                None => tables.push((b.table.clone(), b.rows, b.bytes)),
            }
        }
        Ok(FlushOutcome {
            checkpoint,
            rows,
            bytes,
            retries,
            latency: started.elapsed(),
            tables,
        })
    }
}
