//! Step 4 of an hour: the consumed batches' staging objects tagged for expiry and their items
//! marked compacted, the orphan items removed, the pending marker cleared when nothing is left.

use std::collections::BTreeMap;

use futures::StreamExt;

use cdc_contract::ledger::{BatchItem, FlushId, HourRecord};

use super::{Deps, HourError, HourJob, HourReport, HourState};
use crate::ledger::Ledger;
use crate::now_ms;
use crate::plan::HourBatches;
use crate::retry::retry;
use crate::store::ObjectStore;

/// Consumes the batches at or below `record`'s watermark, removes the orphan items and leaves
/// the hour: its counts and state go into `report`.
pub(super) async fn finish(
    deps: Deps<'_>,
    slot: &str,
    job: &HourJob,
    batches: &HourBatches,
    record: &HourRecord,
    report: &mut HourReport,
) -> Result<(), HourError> {
    let ledger = deps.ledger;
    // Consumed batches: tag their staging objects for expiry, then mark their items.
    let through = record.compacted_through;
    let consumed: Vec<&BatchItem> = batches
        .valid
        .iter()
        .filter(|b| !b.compacted && through.is_some_and(|w| b.last <= w))
        .collect();
    let expires_at = now_ms() / 1000 + deps.batch_ttl_seconds;
    // By flush: each flush is told this table-hour is done once, after every consumed batch of
    // it in the hour says compacted (its record may then expire, and a batch of it not yet
    // marked would be judged an orphan).
    let mut by_flush: BTreeMap<FlushId, Vec<&BatchItem>> = BTreeMap::new();
    for b in consumed.iter().copied() {
        by_flush.entry(b.flush_id).or_default().push(b);
    }
    // Futures collected first: a stream holding the closure would make the compaction's
    // future lose `Send` (the closure's borrow is not general enough).
    let pending: Vec<_> = by_flush
        .values()
        .map(|batches| consume(ledger, &**deps.store, slot, batches, expires_at))
        .collect();
    let results = futures::stream::iter(pending)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r?;
    }
    report.consumed_batches = consumed.len();
    let orphans = &batches.orphans;
    for orphan in orphans {
        retry("delete orphan batch item", || {
            ledger.delete_batch(slot, orphan)
        })
        .await?;
    }
    report.orphans_removed = orphans.len();
    if !orphans.is_empty() {
        tracing::info!(slot = %slot, table = %job.table, hour = %job.hour, items = orphans.len(), "removed orphan batch items (their flush never committed)");
    }

    let all_consumed = batches
        .valid
        .iter()
        .all(|b| through.is_some_and(|w| b.last <= w));
    // A recheck still to come keeps the pending marker, so a sweep returns to the hour.
    let recheck_waiting = record.recheck_after_ms != 0;
    report.state = if batches.undecided || !all_consumed || recheck_waiting {
        HourState::Pending
    } else {
        match &job.marker {
            Some(marker) => {
                if retry("clear pending hour", || ledger.clear_pending(slot, marker)).await? {
                    HourState::Done
                } else {
                    HourState::Pending
                }
            }
            None => HourState::Done,
        }
    };
    Ok(())
}

/// Requests in flight at once: the steps below are one small request per batch (or flush), and
/// their time is the ledger's and S3's latency.
const CONCURRENCY: usize = 16;

/// Tags the consumed batches' staging objects for expiry and marks their items compacted (one
/// flush's batches of this table-hour, one after the other), then notes the table-hour done in
/// the flush's record.
async fn consume(
    ledger: &dyn Ledger,
    store: &dyn ObjectStore,
    slot: &str,
    batches: &[&BatchItem],
    expires_at: i64,
) -> Result<(), HourError> {
    for batch in batches {
        retry("tag staging object", || {
            store.tag(&batch.key, &[("compacted", "true")])
        })
        .await?;
        retry("mark batch compacted", || {
            ledger.mark_compacted(slot, batch, expires_at)
        })
        .await?;
    }
    // After the items say compacted: the flush record may expire once all its hours are.
    if let Some(batch) = batches.first() {
        retry("note flush hour compacted", || {
            ledger.flush_hour_done(slot, batch, expires_at)
        })
        .await?;
    }
    Ok(())
}
