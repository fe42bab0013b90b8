//! Step 4 of an hour: the consumed batches' staging objects tagged for expiry and their items
//! marked compacted, the orphan items removed, the pending marker cleared when nothing is left.

use futures::StreamExt;

use cdc_contract::ledger::{BatchItem, HourRecord};

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
    // Futures collected first: a stream holding the closure would make the compaction's
    // future lose `Send` (the closure's borrow is not general enough).
    let pending: Vec<_> = consumed
        .iter()
        .map(|b| consume(ledger, &**deps.store, slot, b, expires_at))
        .collect();
    let results = futures::stream::iter(pending)
        .buffer_unordered(8)
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

/// Tags a consumed batch's staging object for expiry, then marks its item compacted.
async fn consume(
    ledger: &dyn Ledger,
    store: &dyn ObjectStore,
    slot: &str,
    batch: &BatchItem,
    expires_at: i64,
) -> Result<(), HourError> {
    retry("tag staging object", || {
        store.tag(&batch.key, &[("compacted", "true")])
    })
    .await?;
    retry("mark batch compacted", || {
        ledger.mark_compacted(slot, batch, expires_at)
    })
    .await?;
    // After the item says compacted: the flush record may expire once all its hours are.
    retry("note flush hour compacted", || {
        ledger.flush_hour_done(slot, batch, expires_at)
    })
    .await?;
    Ok(())
}
