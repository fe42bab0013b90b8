//! Compaction planning: which hours are closed, and which of an hour's batch items count.
//!
//! A batch item counts only once the flush record naming its flush exists. One whose flush
//! record is missing while the slot's checkpoint has reached its flush sequence is an orphan of
//! a flush that never committed (and never can: the checkpoint only moves forward); one whose
//! flush sequence is past the checkpoint may still be committing, so the hour waits for it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use cdc_contract::ledger::{BatchItem, Checkpoint, FlushId, SnapshotState};
use cdc_contract::{Hour, TableName};

use crate::ledger::{FlushSeen, Ledger, LedgerError};

/// The first hour that is still open: every earlier hour ended more than `grace` before the
/// checkpoint's closing time (the later of its last commit and the last time it was caught up).
pub fn first_open_hour(checkpoint: &Checkpoint, grace: Duration) -> Hour {
    let closing = checkpoint.closing_ms() - grace.as_millis() as i64;
    // Hour H is closed when H's end < closing, i.e. H < the hour holding (closing - 1 ms).
    Hour::from_millis(closing - 1)
}

/// True when `hour` is closed for `checkpoint`.
pub fn is_closed(hour: Hour, checkpoint: &Checkpoint, grace: Duration) -> bool {
    hour < first_open_hour(checkpoint, grace)
}

/// One slot's state for one run: its checkpoint (read before any flush record, so a missing
/// record with a sequence at or below it is a final verdict) and the flush records looked up.
pub struct SlotRun {
    /// The slot.
    pub slot: String,
    /// Its checkpoint at the start of the run.
    pub checkpoint: Checkpoint,
    /// Its initial snapshot's state, when it took one.
    pub snapshot: Option<SnapshotState>,
    flushes: Mutex<HashMap<FlushId, Option<FlushSeen>>>,
}

/// What a batch item is worth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// Its flush committed.
    Valid,
    /// Its flush never committed and never will.
    Orphan,
    /// Its flush may still be committing.
    Undecided,
}

/// An hour's batch items, sorted out.
#[derive(Debug, Clone, Default)]
pub struct HourBatches {
    /// Valid batches in position order, up to the first undecided one.
    pub valid: Vec<BatchItem>,
    /// Orphans.
    pub orphans: Vec<BatchItem>,
    /// True when an undecided batch stopped the list: the hour stays pending.
    pub undecided: bool,
    /// The flushes of valid batches whose records, when this run read them, had every
    /// table-hour done but this one ([`FlushSeen::last_undone`]).
    pub last_undone: HashSet<FlushId>,
}

impl SlotRun {
    /// The run state of `slot` at `checkpoint`.
    pub fn new(slot: impl Into<String>, checkpoint: Checkpoint) -> Self {
        SlotRun {
            slot: slot.into(),
            checkpoint,
            snapshot: None,
            flushes: Mutex::new(HashMap::new()),
        }
    }

    /// The same, knowing the slot's snapshot state: while a snapshot is incomplete its batches
    /// are undecided, since a capture that finds it incomplete retires them and takes it again.
    pub fn with_snapshot(mut self, snapshot: Option<SnapshotState>) -> Self {
        self.snapshot = snapshot;
        self
    }

    /// Judges one batch item (flush records are looked up once per run).
    pub async fn validity(
        &self,
        ledger: &dyn Ledger,
        batch: &BatchItem,
    ) -> Result<Validity, LedgerError> {
        // Decided valid when it was compacted; its flush record may have expired since (issue
        // 15, item 13).
        if batch.compacted {
            return Ok(Validity::Valid);
        }
        if let Some(s) = &self.snapshot {
            if !s.complete && s.holds(batch.first, batch.last) {
                return Ok(Validity::Undecided);
            }
        }
        let id = batch.flush_id;
        // The checkpoint was read before the hour's items were, and a flush's record commits
        // with the checkpoint after all its items are written: a flush at or below the
        // checkpoint had all its items in the query. A newer one may have committed after the
        // query saw only some of them, so its record is not even looked at: its batches wait
        // for a later run, else the watermark would pass the ones not seen, and they would be
        // skipped.
        if id.seq > self.checkpoint.flush_seq {
            return Ok(Validity::Undecided);
        }
        let known = self
            .flushes
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(Option::is_some));
        let recorded = match known {
            Some(r) => r,
            None => {
                let seen = ledger.flush_recorded(&self.slot, &id).await?;
                let r = seen.is_some();
                if let Ok(mut m) = self.flushes.lock() {
                    m.insert(id, seen);
                }
                r
            }
        };
        Ok(if recorded {
            Validity::Valid
        } else {
            Validity::Orphan
        })
    }

    /// Looks up, in as few requests as the ledger allows, the flush records that judging
    /// `items` needs and this run has not seen yet.
    async fn look_up_flushes(
        &self,
        ledger: &dyn Ledger,
        items: &[BatchItem],
    ) -> Result<(), LedgerError> {
        let unknown: Vec<FlushId> = {
            let Ok(known) = self.flushes.lock() else {
                return Ok(());
            };
            let mut ids: Vec<FlushId> = items
                .iter()
                .filter(|b| {
                    !b.compacted
                        && b.flush_id.seq <= self.checkpoint.flush_seq
                        && !known.contains_key(&b.flush_id)
                })
                .map(|b| b.flush_id)
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let mut recorded = ledger.flushes_recorded(&self.slot, &unknown).await?;
        if let Ok(mut known) = self.flushes.lock() {
            for id in unknown {
                known.insert(id, recorded.remove(&id));
            }
        }
        Ok(())
    }

    /// Reads and sorts out the batch items of a table-hour.
    pub async fn hour_batches(
        &self,
        ledger: &dyn Ledger,
        table: &TableName,
        hour: Hour,
    ) -> Result<HourBatches, LedgerError> {
        let mut items = ledger.batches(&self.slot, table, hour).await?;
        items.sort_by(|a, b| a.first.cmp(&b.first).then(a.last.cmp(&b.last)));
        self.look_up_flushes(ledger, &items).await?;
        let mut out = HourBatches::default();
        let table_hour = cdc_contract::ledger::pending_sk(hour, table);
        for item in items {
            match self.validity(ledger, &item).await? {
                Validity::Valid => {
                    let last = self.flushes.lock().ok().is_some_and(|m| {
                        m.get(&item.flush_id)
                            .and_then(Option::as_ref)
                            .is_some_and(|seen| seen.last_undone(&table_hour))
                    });
                    if last {
                        out.last_undone.insert(item.flush_id);
                    }
                    out.valid.push(item);
                }
                Validity::Orphan => out.orphans.push(item),
                Validity::Undecided => {
                    // Nothing after it may be compacted before it is decided: once compacted,
                    // a position is below the watermark for good.
                    out.undecided = true;
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(commit_ms: i64, caught_up_ms: Option<i64>) -> Checkpoint {
        Checkpoint {
            commit_ms,
            caught_up_ms,
            ..Default::default()
        }
    }

    #[test]
    fn an_hour_closes_once_the_checkpoint_is_past_its_end_plus_grace() {
        let h: Hour = "2025-01-08T10".parse().unwrap();
        let grace = Duration::from_secs(300);
        let end = h.end_millis();
        assert!(!is_closed(h, &cp(end + 300_000, None), grace));
        assert!(is_closed(h, &cp(end + 300_001, None), grace));
        assert!(is_closed(h, &cp(0, Some(end + 300_001)), grace));
        assert!(!is_closed(h, &cp(end - 1, Some(end)), grace));
        assert!(!is_closed(h.next(), &cp(end + 300_001, None), grace));
        assert_eq!(first_open_hour(&cp(end + 300_001, None), grace), h.next());
    }
}
