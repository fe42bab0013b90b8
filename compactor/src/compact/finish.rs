//! Step 4 of an hour: the consumed batches' staging objects tagged for expiry and their items
//! marked compacted, the orphan items removed, the pending marker cleared when nothing is left.
//!
//! Batches are consumed by whole flushes: a flush's batches in the hour once every one of them is
//! at or below the watermark, then the flush is told the table-hour is done (its record may then
//! expire, and a batch of it not yet consumed would be judged an orphan). The flushes ready at
//! one time go together, step by step ([`consume`]). A flush whose batches the watermark has
//! passed while later parts are still being written is consumed then ([`EarlyConsumption`]),
//! beside the writing; the rest here, after it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use futures::{StreamExt, TryStreamExt};
use tokio::sync::mpsc;

use cdc_contract::dynamo::BATCH_WRITE_MAX;
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
    consume(
        ledger,
        &**deps.store,
        slot,
        &work,
        &batches.last_undone,
        expires_at,
    )
    .await
    .1?;
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

/// Requests in flight at once: the steps below are small requests, one per batch, per 25
/// batches or per flush, and their time is the ledger's and S3's latency.
const CONCURRENCY: usize = 16;

/// Consumes `flushes`, each given as its batches of this table-hour not marked yet (none when
/// all are) and one batch naming the flush: tags every staging object for expiry, then marks
/// every item compacted ([`BATCH_WRITE_MAX`] to a request, across flushes: a capture's flush
/// holds one batch per table, hour and schema version), then notes the table-hour done in each
/// flush's record. Each step starts once the one before is done for all, so a flush is told only
/// after all its batches are marked, and a batch marked only after its object is tagged (a mark
/// without a tag would leave the object for ever). Gives the flushes told and the first error: a
/// tag or mark that fails stops its step and the steps after it (no flush told; a failing object
/// holds back the others of the job, all left to a later run), a tell that fails leaves only its
/// flush untold. Everything repeats harmlessly. A flush in `last_undone` is told, and its record
/// set to expire, in one request.
async fn consume(
    ledger: &dyn Ledger,
    store: &dyn ObjectStore,
    slot: &str,
    flushes: &[(Vec<&BatchItem>, &BatchItem)],
    last_undone: &HashSet<FlushId>,
    expires_at: i64,
) -> (Vec<FlushId>, Result<(), HourError>) {
    let batches: Vec<&BatchItem> = flushes
        .iter()
        .flat_map(|(unmarked, _)| unmarked.iter().copied())
        .collect();
    // Futures collected before they are streamed: a stream holding the closure would make the
    // compaction's future lose `Send` (the closure's borrow is not general enough).
    let tags: Vec<_> = batches
        .iter()
        .map(|batch| {
            retry("tag staging object", || {
                store.tag(&batch.key, &[("compacted", "true")])
            })
        })
        .collect();
    if let Err(error) = all_of(tags).await {
        return (Vec::new(), Err(error));
    }
    let marks: Vec<_> = batches
        .chunks(BATCH_WRITE_MAX)
        .map(|chunk| {
            retry("mark batches compacted", || {
                ledger.mark_compacted(slot, chunk, expires_at)
            })
        })
        .collect();
    if let Err(error) = all_of(marks).await {
        return (Vec::new(), Err(error));
    }
    // After the items say compacted: the flush record may expire once all its hours are.
    let tells: Vec<_> = flushes
        .iter()
        .map(|(_, flush)| {
            let last = last_undone.contains(&flush.flush_id);
            tell(ledger, slot, flush, expires_at, last)
        })
        .collect();
    let told = futures::stream::iter(tells)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let mut done = Vec::with_capacity(told.len());
    let mut first_error = Ok(());
    for result in told {
        match result {
            Ok(flush) => done.push(flush),
            Err(error) => {
                if first_error.is_ok() {
                    first_error = Err(error);
                }
            }
        }
    }
    (done, first_error)
}

/// Runs `steps`, [`CONCURRENCY`] at once, until all have succeeded or one has failed (those in
/// flight then are dropped).
async fn all_of<E, F>(steps: Vec<F>) -> Result<(), HourError>
where
    F: std::future::Future<Output = Result<(), E>>,
    HourError: From<E>,
{
    futures::stream::iter(steps)
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await
        .map(|_| ())
        .map_err(HourError::from)
}

/// Notes `flush`'s table-hour done in its flush record; gives the flush.
async fn tell(
    ledger: &dyn Ledger,
    slot: &str,
    flush: &BatchItem,
    expires_at: i64,
    last: bool,
) -> Result<FlushId, HourError> {
    retry("note flush hour compacted", || {
        ledger.flush_hour_done(slot, flush, expires_at, last)
    })
    .await?;
    Ok(flush.flush_id)
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

/// Consumes the flushes `rx` hands over until it closes: all those waiting at once, together,
/// while the next ones queue. A flush that fails is left to [`finish`] (the steps repeat
/// harmlessly).
pub(super) async fn consume_early(
    deps: Deps<'_>,
    slot: &str,
    mut rx: mpsc::UnboundedReceiver<Vec<BatchItem>>,
    last_undone: &HashSet<FlushId>,
) -> Consumed {
    let mut done = Consumed::default();
    while let Some(first) = rx.recv().await {
        let mut groups = vec![first];
        while let Ok(group) = rx.try_recv() {
            groups.push(group);
        }
        let expires_at = now_ms() / 1000 + deps.batch_ttl_seconds;
        let work: Vec<(Vec<&BatchItem>, &BatchItem)> = groups
            .iter()
            .filter_map(|group| Some((group.iter().collect(), group.first()?)))
            .collect();
        let (told, result) = consume(
            deps.ledger,
            &**deps.store,
            slot,
            &work,
            last_undone,
            expires_at,
        )
        .await;
        if let Err(error) = result {
            tracing::warn!(slot = %slot, error = %error, "could not consume flushes' batches beside the writing; the hour's end does it");
        }
        let told: HashSet<FlushId> = told.into_iter().collect();
        for (batches, flush) in &work {
            if told.contains(&flush.flush_id) {
                done.flushes.insert(flush.flush_id);
                done.batches += batches.len();
            }
        }
    }
    done
}
