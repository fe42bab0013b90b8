//! Step 4 of an hour: the consumed batches' staging objects tagged for expiry and their items
//! marked compacted, the orphan items removed, the pending marker cleared when nothing is left.
//!
//! Batches are consumed a flush at a time: a flush's batches in the hour once every one of them
//! is at or below the watermark, then the flush is told the table-hour is done (its record may
//! then expire, and a batch of it not yet consumed would be judged an orphan). A flush whose
//! batches the watermark has passed while later parts are still being written is consumed then
//! ([`EarlyConsumption`]), beside the writing; the rest here, after it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use tokio::sync::mpsc;

use cdc_contract::ledger::{BatchItem, FlushId, HourRecord};
use cdc_contract::Position;

use super::{Deps, HourError, HourJob, HourReport, HourState};
use crate::ledger::Ledger;
use crate::now_ms;
use crate::plan::HourBatches;
use crate::retry::retry;
use crate::store::ObjectStore;

/// The hour's valid batches by flush.
fn by_flush(valid: &[BatchItem]) -> BTreeMap<FlushId, Vec<&BatchItem>> {
    let mut groups: BTreeMap<FlushId, Vec<&BatchItem>> = BTreeMap::new();
    for b in valid {
        groups.entry(b.flush_id).or_default().push(b);
    }
    groups
}

/// The flushes consumed while parts were still being written, and their batches marked.
#[derive(Debug, Default)]
pub(super) struct Consumed {
    flushes: BTreeSet<FlushId>,
    batches: usize,
}

/// Consumes the batches at or below `record`'s watermark (but those of the flushes in
/// `early`), removes the orphan items and leaves the hour: its counts and state go into
/// `report`.
pub(super) async fn finish(
    deps: Deps<'_>,
    slot: &str,
    job: &HourJob,
    batches: &HourBatches,
    record: &HourRecord,
    early: &Consumed,
    report: &mut HourReport,
) -> Result<(), HourError> {
    let ledger = deps.ledger;
    let through = record.compacted_through;
    let expires_at = now_ms() / 1000 + deps.batch_ttl_seconds;
    let passed = |b: &BatchItem| through.is_some_and(|w| b.last <= w);
    let all_consumed = batches.valid.iter().all(passed);
    // A recheck still to come keeps the pending marker, so a sweep returns to the hour.
    let recheck_waiting = record.recheck_after_ms != 0;
    let ends_hour = !batches.undecided && all_consumed && !recheck_waiting;
    // A flush is consumed whole: all its batches in the hour at or below the watermark; those
    // not marked yet are marked, then the flush is told. With an undecided batch the list stops
    // there and may miss batches of a flush, so no flush is consumed (the hour stays pending
    // and a later run does it). A flush whose batches here were all marked before this run is
    // told again by the run that ends the hour: a run that died between marking its last batch
    // and telling it left it untold, with no batch of it left to consume (its record would
    // never expire); adding the hour to its done set again changes nothing.
    let mut work: Vec<(Vec<&BatchItem>, &BatchItem)> = Vec::new();
    if !batches.undecided {
        for (flush, group) in by_flush(&batches.valid) {
            if early.flushes.contains(&flush) || !group.iter().all(|b| passed(b)) {
                continue;
            }
            let unmarked: Vec<&BatchItem> =
                group.iter().copied().filter(|b| !b.compacted).collect();
            if !unmarked.is_empty() || ends_hour {
                work.push((unmarked, group[0]));
            }
        }
    }
    let consumed: usize = work.iter().map(|(unmarked, _)| unmarked.len()).sum();
    // Futures collected first: a stream holding the closure would make the compaction's
    // future lose `Send` (the closure's borrow is not general enough).
    let pending: Vec<_> = work
        .iter()
        .map(|(unmarked, flush)| consume(ledger, &**deps.store, slot, unmarked, flush, expires_at))
        .collect();
    let results = futures::stream::iter(pending)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for r in results {
        r?;
    }
    report.consumed_batches = early.batches + consumed;
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

    report.state = if !ends_hour {
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
/// flush's batches of this table-hour not marked yet, one after the other; none when all are),
/// then notes the table-hour done in the record of `flush`'s flush.
async fn consume(
    ledger: &dyn Ledger,
    store: &dyn ObjectStore,
    slot: &str,
    batches: &[&BatchItem],
    flush: &BatchItem,
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
    retry("note flush hour compacted", || {
        ledger.flush_hour_done(slot, flush, expires_at)
    })
    .await?;
    Ok(())
}

/// Consumption beside the writing: the parts recorded so far pass whole flushes, whose batches
/// this run has read (and stored the dead letters of), and those are consumed at once by
/// [`consume_early`] rather than after the hour's last part. Not built when an undecided batch
/// cut the hour's list short.
pub(super) struct EarlyConsumption {
    /// Flushes not handed over yet, with a batch not marked: all their batches in the hour.
    groups: BTreeMap<FlushId, Vec<BatchItem>>,
    /// Staging keys of the batches read by this run or below the watermark it started from.
    read: HashSet<String>,
    tx: mpsc::UnboundedSender<Vec<BatchItem>>,
}

impl EarlyConsumption {
    /// For the hour's `batches`, from the watermark the run starts at; flushes go to `tx`.
    pub(super) fn new(
        batches: &HourBatches,
        watermark: Option<Position>,
        tx: mpsc::UnboundedSender<Vec<BatchItem>>,
    ) -> Option<Self> {
        if batches.undecided {
            return None;
        }
        let groups = by_flush(&batches.valid)
            .into_iter()
            .filter(|(_, group)| group.iter().any(|b| !b.compacted))
            .map(|(flush, group)| (flush, group.into_iter().cloned().collect()))
            .collect();
        let read = batches
            .valid
            .iter()
            .filter(|b| watermark.is_some_and(|w| b.last <= w))
            .map(|b| b.key.clone())
            .collect();
        Some(EarlyConsumption { groups, read, tx })
    }

    /// `batch` was read whole and its dead letters are stored.
    pub(super) fn read(&mut self, batch: &BatchItem) {
        self.read.insert(batch.key.clone());
    }

    /// The recorded watermark is now `watermark`: the flushes it passes whole, all their
    /// batches read, are handed over.
    pub(super) fn offer(&mut self, watermark: Option<Position>) {
        let Some(w) = watermark else { return };
        let ready: Vec<FlushId> = self
            .groups
            .iter()
            .filter(|(_, group)| {
                group
                    .iter()
                    .all(|b| b.last <= w && self.read.contains(&b.key))
            })
            .map(|(flush, _)| *flush)
            .collect();
        for flush in ready {
            if let Some(group) = self.groups.remove(&flush) {
                let unmarked = group.into_iter().filter(|b| !b.compacted).collect();
                // The receiver outlives the writing; should it be gone, finish does it.
                let _ = self.tx.send(unmarked);
            }
        }
    }
}

/// Consumes the flushes `rx` hands over until it closes, [`CONCURRENCY`] at once. A flush
/// that fails is left to [`finish`] (the steps repeat harmlessly).
pub(super) async fn consume_early(
    deps: Deps<'_>,
    slot: &str,
    mut rx: mpsc::UnboundedReceiver<Vec<BatchItem>>,
) -> Consumed {
    let mut done = Consumed::default();
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    loop {
        tokio::select! {
            got = rx.recv(), if open && pending.len() < CONCURRENCY => match got {
                Some(group) => pending.push(consume_owned(deps, slot, group)),
                None => open = false,
            },
            Some((group, result)) = pending.next(), if !pending.is_empty() => match result {
                Ok(()) => {
                    if let Some(b) = group.first() {
                        done.flushes.insert(b.flush_id);
                    }
                    done.batches += group.len();
                }
                Err(error) => {
                    tracing::warn!(slot = %slot, error = %error, "could not consume a flush's batches beside the writing; the hour's end does it");
                }
            },
            else => break,
        }
    }
    done
}

/// [`consume`] of an owned group, which it gives back.
async fn consume_owned(
    deps: Deps<'_>,
    slot: &str,
    group: Vec<BatchItem>,
) -> (Vec<BatchItem>, Result<(), HourError>) {
    let expires_at = now_ms() / 1000 + deps.batch_ttl_seconds;
    let unmarked: Vec<&BatchItem> = group.iter().collect();
    let result = match group.first() {
        Some(flush) => {
            consume(
                deps.ledger,
                &**deps.store,
                slot,
                &unmarked,
                flush,
                expires_at,
            )
            .await
        }
        None => Ok(()),
    };
    (group, result)
}
