//! Transaction assembly: pgoutput messages in, encoded events buffered per table-hour out. Owns
//! the relations, the open transaction, what the server has proven sent, and the one place
//! checkpoints are built ([`Assembler::take_flush`]). No I/O: the streamer feeds it and carries
//! out the flushes it asks for.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use cdc_contract::event::Op;
use cdc_contract::ledger::{Backfill, Checkpoint};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, Lsn, Position, TableName};

use crate::backfill::Tracker;
use crate::batch::{Batcher, Segment};
use crate::config::Settings;
use crate::encode::{Image, TableEncoder, TxContext};
use crate::pgoutput::{DecodeError, OldTuple, Relation, Value};
use crate::pipeline::now_ms;
use crate::replication::PG_EPOCH_OFFSET_MICROS;

/// Why a flush is wanted; [`Assembler::take_flush`] turns it into the checkpoint to record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Between transactions: everything up to the last commit's end (after a commit that filled
    /// the batch, or when the flush interval elapsed).
    Committed,
    /// A transaction larger than a batch, recorded up to its change `pos`.
    MidTransaction {
        /// The last buffered change.
        pos: Position,
        /// Its transaction's commit time (ms).
        commit_ms: i64,
    },
    /// While idle: the position the server proved everything before sent.
    Heartbeat {
        /// That position.
        lsn: Lsn,
        /// When the capture was last proven caught up.
        caught_up_ms: Option<i64>,
    },
    /// Stopping: what is buffered, mid-transaction or not.
    Shutdown,
    /// Snapshot rows, while the snapshot is read: the recorded position does not move.
    SnapshotRows {
        /// The snapshot's start time (ms).
        started_ms: i64,
    },
    /// The snapshot's end: its consistent point.
    SnapshotDone {
        /// The slot's consistent point.
        consistent: Lsn,
        /// The snapshot's start time (ms).
        started_ms: i64,
    },
}

struct RelState {
    encoder: Arc<TableEncoder>,
    captured: bool,
    /// Column names, for the backfill's tracker.
    names: Arc<[String]>,
}

/// A held change of a table without a key waiting for its read.
pub struct Held {
    xid: u32,
    /// An update, delete or truncate (anything but an insert).
    rewrites: bool,
    oid: u32,
    encoder: Arc<TableEncoder>,
    hour: Hour,
    pos: Position,
    commit_ms: i64,
    event: Vec<u8>,
}

struct Tx {
    ctx: TxContext,
    ordinal: u32,
    per_table: HashMap<u32, u32>,
    last: Option<Position>,
}

/// The assembler's state.
pub struct Assembler {
    slot: String,
    database: String,
    tables: Vec<TableName>,
    flush_max_bytes: usize,
    flush_interval: Duration,
    heartbeat_interval: Duration,
    grace_ms: i64,
    relations: HashMap<u32, RelState>,
    batcher: Batcher,
    /// The last checkpoint the ledger recorded.
    recorded: Checkpoint,
    tx: Option<Tx>,
    last_commit_end: Lsn,
    last_commit_ms: i64,
    /// What the server has proven sent on this stream: every transaction committed before it
    /// was received (a commit's end, or a keepalive's position while between transactions).
    /// Reset to the recorded checkpoint on reconnect: a stream's proof says nothing of the next.
    server_end: Lsn,
    /// A caught-up probe not proven yet: the server's WAL position read at a time. Once
    /// `server_end` reaches it, everything committed before that time has been received.
    probe: Option<(Lsn, i64)>,
    /// The last proven probe: `server_end` reached this position, so every change committed
    /// before this time is at or below it.
    caught_up: Option<(Lsn, i64)>,
    idle_since_record: Instant,
    target: Option<Lsn>,
    /// The backfill's progress as of what is buffered (recorded with it); None: not kept.
    backfill: Option<Backfill>,
    /// The timeline of the server streamed from (recorded with each checkpoint).
    timeline: Option<u32>,
    /// Streamed changes of the tables being backfilled.
    pub tracker: Tracker,
    /// Tables without a key waiting for their read, whose changes are held.
    holding: std::collections::HashSet<TableName>,
    held: Vec<Held>,
}

impl Assembler {
    /// An assembler resuming from the recorded checkpoint; `target` (with the time it was read)
    /// for `--exit-when-caught-up`.
    pub fn new(settings: &Settings, recorded: Checkpoint, target: Option<(Lsn, i64)>) -> Self {
        let mut asm = Assembler {
            slot: settings.slot.clone(),
            database: settings.database.clone(),
            tables: settings.tables.clone(),
            flush_max_bytes: settings.flags.flush_max_bytes,
            flush_interval: settings.flush_interval(),
            heartbeat_interval: settings.heartbeat_interval(),
            grace_ms: settings.shared.close_grace.as_millis() as i64,
            relations: HashMap::new(),
            batcher: Batcher::default(),
            last_commit_end: recorded.lsn,
            last_commit_ms: recorded.commit_ms,
            server_end: recorded.lsn,
            probe: target,
            caught_up: None,
            tx: None,
            idle_since_record: Instant::now(),
            target: target.map(|(lsn, _)| lsn),
            backfill: recorded.backfill.clone(),
            timeline: recorded.timeline,
            tracker: Tracker::default(),
            holding: Default::default(),
            held: Vec::new(),
            recorded,
        };
        asm.holding_changed();
        asm
    }

    fn holding_changed(&mut self) {
        self.holding = self
            .backfill
            .iter()
            .flat_map(|b| b.pending.iter())
            .filter(|p| p.keyless)
            .map(|p| p.table.clone())
            .collect();
        for p in self.backfill.iter().flat_map(|b| b.pending.iter()) {
            self.tracker.track(&p.table);
        }
    }

    /// The backfill's progress as of what is buffered.
    pub fn backfill(&self) -> Option<&Backfill> {
        self.backfill.as_ref()
    }

    /// Changes the backfill's progress (recorded with the next flush); the tables it waits
    /// for are tracked from now on.
    pub fn update_backfill(&mut self, change: impl FnOnce(&mut Backfill)) {
        change(self.backfill.get_or_insert_with(Backfill::default));
        self.holding_changed();
    }

    /// The last recorded checkpoint: the only position ever confirmed.
    pub fn recorded(&self) -> &Checkpoint {
        &self.recorded
    }

    /// True inside a transaction.
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.batcher.is_empty()
    }

    /// True when the buffer holds a flush's worth.
    pub fn full(&self) -> bool {
        self.batcher.full(self.flush_max_bytes)
    }

    /// When the flush interval makes a flush due (between transactions only).
    pub fn flush_deadline(&self) -> Option<Instant> {
        match self.tx {
            Some(_) => None,
            None => self.batcher.oldest().map(|o| o + self.flush_interval),
        }
    }

    /// The one place checkpoints are built: the checkpoint `want` records, never behind the
    /// recorded one, with the next flush number, and the buffered segments it records.
    pub fn take_flush(&mut self, want: Want) -> (Vec<Segment>, Checkpoint, u64) {
        let recorded = &self.recorded;
        let (lsn, partial, commit_ms, caught_up_ms) = match want {
            Want::Committed => (self.last_commit_end, None, self.last_commit_ms, None),
            Want::MidTransaction { pos, commit_ms } => {
                (self.last_commit_end, Some(pos), commit_ms, None)
            }
            Want::Heartbeat { lsn, caught_up_ms } => (lsn, None, self.last_commit_ms, caught_up_ms),
            Want::Shutdown => match &self.tx {
                Some(tx) => (
                    self.last_commit_end,
                    tx.last.or(recorded
                        .partial
                        .filter(|p| p.commit_lsn == tx.ctx.commit_lsn)),
                    tx.ctx.commit_us.div_euclid(1000),
                    None,
                ),
                None => (self.last_commit_end, None, self.last_commit_ms, None),
            },
            Want::SnapshotRows { started_ms } => (recorded.lsn, recorded.partial, started_ms, None),
            Want::SnapshotDone {
                consistent,
                started_ms,
            } => (consistent, None, started_ms, None),
        };
        let mut checkpoint = Checkpoint {
            lsn,
            partial,
            commit_ms,
            caught_up_ms,
            ..Default::default()
        };
        // The checkpoint never moves backwards, and keeps the caught-up time it had.
        if progress(&checkpoint) < progress(recorded) {
            checkpoint.lsn = recorded.lsn;
            checkpoint.partial = recorded.partial;
        }
        checkpoint.caught_up_ms = checkpoint.caught_up_ms.max(recorded.caught_up_ms);
        checkpoint.backfill = self.backfill.clone();
        checkpoint.timeline = self.timeline.or(recorded.timeline);
        checkpoint.commit_ms = checkpoint.commit_ms.max(recorded.commit_ms);
        // Flush numbers strictly increase (issue 15, item 2): the previous flush has completed
        // and every completed flush becomes `recorded` (its checkpoint is never lower, see
        // above), so a number is never reused and taken for an earlier flush "already recorded".
        let seq = recorded.flush_seq + 1;
        (self.batcher.take(), checkpoint, seq)
    }

    /// The stream (re)started on a server of this timeline (None: unknown, the recorded one
    /// stands).
    pub fn set_timeline(&mut self, timeline: Option<u32>) {
        if timeline.is_some() {
            self.timeline = timeline;
        }
    }

    /// A flush completed: its checkpoint is recorded.
    pub fn flush_recorded(&mut self, checkpoint: Checkpoint) {
        debug_assert!(
            progress(&checkpoint) >= progress(&self.recorded),
            "progress only moves forward"
        );
        self.recorded = checkpoint;
        self.idle_since_record = Instant::now();
    }

    /// The stream broke: what was buffered but not recorded is sent again from the recorded
    /// checkpoint, and the broken stream's proof is void (issue 15, item 2). Probes restart.
    pub fn reset(&mut self) {
        self.batcher.take();
        self.tx = None;
        self.relations.clear();
        self.last_commit_end = self.recorded.lsn;
        self.last_commit_ms = self.recorded.commit_ms;
        self.server_end = self.recorded.lsn;
        self.probe = None;
        self.caught_up = None;
        self.backfill = self.recorded.backfill.clone();
        self.tracker.reset();
        self.held.clear();
        self.holding_changed();
    }

    /// A recreated slot starts at `lsn`, past the recorded checkpoint: the next flush records
    /// from there (the backfill asked for before the slot was recreated fills the gap).
    pub fn skip_to(&mut self, lsn: Lsn) {
        self.last_commit_end = self.last_commit_end.max(lsn);
        self.server_end = self.server_end.max(lsn);
    }

    /// The server proved everything committed before `lsn` sent on this stream.
    fn server_reached(&mut self, lsn: Lsn) {
        self.server_end = self.server_end.max(lsn);
        if let Some((at, time)) = self.probe {
            if self.server_end >= at {
                self.caught_up = Some((at, time));
                self.probe = None;
            }
        }
    }

    /// A keepalive: between transactions, everything committed before `wal_end` was sent.
    pub fn keepalive(&mut self, wal_end: Lsn) {
        if self.tx.is_none() {
            self.server_reached(wal_end);
        }
    }

    /// A caught-up probe: the server's WAL position `current`, read after `at_ms`.
    pub fn probe(&mut self, current: Lsn, at_ms: i64) {
        if self.probe.is_none() && current > Lsn::ZERO {
            self.probe = Some((current, at_ms));
            self.server_reached(Lsn::ZERO);
        }
    }

    /// `--exit-when-caught-up`: everything committed before the start is recorded.
    pub fn caught_up(&self, inflight: bool) -> bool {
        match self.target {
            Some(target) => {
                self.recorded.lsn >= target
                    && self.recorded.partial.is_none()
                    && self.batcher.is_empty()
                    && !inflight
            }
            None => false,
        }
    }

    /// While idle: the flush that records the position the server says everything before is
    /// sent (and so processed), at the heartbeat rate, or at once when `--exit-when-caught-up`
    /// reached its target; with whether it closes an hour (notify even without batches).
    pub fn heartbeat(&mut self, inflight: bool) -> Option<(Want, bool)> {
        if self.tx.is_some() || inflight {
            return None;
        }
        if !self.batcher.is_empty() {
            // `--exit-when-caught-up` has everything it waits for: record it now.
            if self.target.is_some_and(|t| self.server_end >= t) {
                return Some((Want::Committed, false));
            }
            return None;
        }
        let reached_target = self
            .target
            .is_some_and(|t| self.server_end >= t && self.recorded.lsn < t);
        let due = self.idle_since_record.elapsed() >= self.heartbeat_interval;
        if !(due || reached_target) {
            return None;
        }
        let lsn = self.server_end.max(self.last_commit_end);
        if self.recorded.partial.is_some_and(|p| lsn <= p.commit_lsn) {
            // The server is resending a transaction recorded in part: nothing to record until
            // it has come again past its recorded part.
            return None;
        }
        // The caught-up time comes from a proven probe, never from the clock: while the server
        // is still decoding (a large transaction, a stalled stream) nothing is proven (item 14).
        let caught_up_ms = self
            .caught_up
            .filter(|(at, _)| *at <= lsn)
            .map(|(_, time)| time)
            .max(self.recorded.caught_up_ms);
        let closing_ms = self.last_commit_ms.max(caught_up_ms.unwrap_or(0));
        // Notify when the closing time passes an hour's end plus the grace period.
        let closes_hour = Hour::from_millis(self.recorded.closing_ms() - self.grace_ms)
            != Hour::from_millis(closing_ms - self.grace_ms);
        self.last_commit_end = lsn;
        Some((Want::Heartbeat { lsn, caught_up_ms }, closes_hour))
    }

    /// A transaction begins.
    pub fn begin(&mut self, final_lsn: Lsn, commit_ts: i64, xid: u32) {
        self.tx = Some(Tx {
            ctx: TxContext {
                xid: Some(xid),
                commit_lsn: final_lsn,
                commit_us: commit_ts + PG_EPOCH_OFFSET_MICROS,
                prev_commit_end: self.last_commit_end,
                snapshot: false,
            },
            ordinal: 0,
            per_table: HashMap::new(),
            last: None,
        });
    }

    /// A transaction commits; a flush is wanted when the buffer is full or old enough.
    pub fn commit(&mut self, end_lsn: Lsn, commit_ts: i64) -> Option<Want> {
        self.tx = None;
        self.last_commit_end = end_lsn;
        self.last_commit_ms = (commit_ts + PG_EPOCH_OFFSET_MICROS).div_euclid(1000);
        self.server_reached(end_lsn);
        let due = self.full()
            || self
                .batcher
                .oldest()
                .is_some_and(|o| o.elapsed() >= self.flush_interval);
        due.then_some(Want::Committed)
    }

    /// True when a Relation message for `oid` was seen on this stream (its next one may be a
    /// schema change).
    pub fn knows(&self, oid: u32) -> bool {
        self.relations.contains_key(&oid)
    }

    /// A Relation message, with its table's schema.
    pub fn relation(&mut self, rel: &Relation, schema: TableSchema) {
        let table = TableName::new(rel.namespace.clone(), rel.name.clone());
        let captured = self.tables.is_empty() || self.tables.contains(&table);
        let previous = self
            .relations
            .get(&rel.oid)
            .map(|r| r.encoder.schema_id.clone());
        let encoder = TableEncoder::new(schema, &self.slot, &self.database);
        match previous {
            Some(old) if old == encoder.schema_id => {
                // Same columns: keep the encoder so batches are not cut.
                return;
            }
            Some(old) => {
                tracing::info!(table = %table, old_version = %old, new_version = %encoder.schema_id, "schema change")
            }
            None => tracing::debug!(table = %table, version = %encoder.schema_id, "relation"),
        }
        self.relations.insert(
            rel.oid,
            RelState {
                encoder: Arc::new(encoder),
                captured,
                names: rel.columns.iter().map(|c| c.name.clone()).collect(),
            },
        );
    }

    /// A row change; a flush is wanted when a transaction outgrows the batch.
    pub fn change(
        &mut self,
        rel: u32,
        op: Op,
        old: Option<OldTuple>,
        new: Option<&[Value]>,
        lsn: Lsn,
    ) -> Result<Option<Want>, DecodeError> {
        let Some(tx) = self.tx.as_mut() else {
            return Err(DecodeError("change outside a transaction".into()));
        };
        tx.ordinal += 1;
        let pos = Position::new(tx.ctx.commit_lsn, tx.ordinal);
        let Some(state) = self.relations.get(&rel) else {
            return Err(DecodeError(format!(
                "change for relation {rel} before its Relation message"
            )));
        };
        if !state.captured || self.recorded.covers(pos) {
            return Ok(None);
        }
        if let Some(xid) = tx.ctx.xid {
            let table = &state.encoder.table;
            if self.tracker.tracks(table) {
                if op == Op::Truncate {
                    self.tracker.truncate(table, xid);
                } else {
                    let mut images = Vec::with_capacity(2);
                    match &old {
                        Some(OldTuple::Key(v)) | Some(OldTuple::Full(v)) => images.push(v.clone()),
                        None => {}
                    }
                    if let Some(new) = new {
                        images.push(new.to_vec());
                    }
                    self.tracker.row_change(table, xid, &state.names, images);
                }
            }
        }
        let table_ordinal = {
            let n = tx.per_table.entry(rel).or_insert(0);
            *n += 1;
            *n
        };
        let ctx = tx.ctx;
        let encoder = state.encoder.clone();
        let commit_ms = ctx.commit_us.div_euclid(1000);
        let hour = Hour::from_millis(commit_ms);
        let now = now_ms();
        let write = |out: &mut Vec<u8>| {
            let before = match &old {
                Some(OldTuple::Key(v)) => Some(Image::KeyOnly(v)),
                Some(OldTuple::Full(v)) => Some(Image::Full(v)),
                None => None,
            };
            encoder.write_event(
                out,
                op,
                before,
                new,
                &ctx,
                lsn,
                pos.ordinal,
                table_ordinal,
                now,
            );
        };
        if self.holding.contains(&encoder.table) {
            // A table without a key waiting for its one read: its changes are held until the
            // read is placed (the read's snapshot decides which of them it already holds).
            let mut event = Vec::new();
            write(&mut event);
            self.held.push(Held {
                xid: ctx.xid.unwrap_or(0),
                rewrites: op != Op::Create,
                oid: rel,
                encoder: encoder.clone(),
                hour,
                pos,
                commit_ms,
                event,
            });
            return Ok(None);
        }
        tx.last = Some(pos);
        self.batcher
            .push(rel, &encoder, hour, pos, commit_ms, write);
        // A transaction larger than a batch: record what we have, mid-transaction.
        Ok(self
            .full()
            .then_some(Want::MidTransaction { pos, commit_ms }))
    }

    /// A backfill chunk at its high watermark `high` (the stream has just delivered it, between
    /// transactions): the rows the read's snapshot makes final, as op "r" keyed `(high, n)`,
    /// with the progress they make, buffered together so one flush records both. Returns the
    /// rows placed, or None when the chunk must be read again.
    pub fn place_chunk(
        &mut self,
        chunk: &crate::backfill::Chunk,
        encoder: &Arc<TableEncoder>,
        high: Lsn,
    ) -> Option<(u64, usize)> {
        use crate::backfill::Dropped;
        let current = self
            .backfill
            .as_ref()
            .and_then(|b| b.pending.iter().find(|p| p.table == chunk.table));
        let Some(current) = current.filter(|p| p.after == chunk.after) else {
            // Asked again (from its first key) while this chunk was read: the chunk is let go.
            return Some((0, 0));
        };
        if current.after.is_some() && !current.key.is_empty() && current.key != chunk.key {
            // Its ordering key changed (the replica identity did): the keys recorded so far
            // cannot be compared with the new one, so the table is read again from its first
            // key (the rows read already are read twice, as for a request).
            tracing::warn!(table = %chunk.table, "the table's ordering key changed during its backfill: reading it again from its first key");
            let table = chunk.table.clone();
            if let Some(p) = self
                .backfill
                .as_mut()
                .and_then(|b| b.pending.iter_mut().find(|p| p.table == table))
            {
                p.after = None;
                p.key.clear();
                // No key any more (REPLICA IDENTITY FULL or NOTHING, the key dropped): read
                // whole, its changes held.
                p.keyless = chunk.key.is_empty();
            }
            self.tracker.restart(&table);
            self.holding_changed();
            return Some((0, 0));
        }
        let dropped = self
            .tracker
            .dropped(&chunk.table, &chunk.snapshot, &chunk.key);
        if self.holding.contains(&chunk.table) {
            // A table without a key, read whole: its held changes the read did not see are
            // recorded at their own positions, then the read; those it saw it holds already.
            // An update, delete or truncate it did not see would act on rows before the read
            // adds them (a row would be doubled, or come back): read it again.
            let seen = |h: &Held| chunk.snapshot.sees(h.xid);
            if self
                .held
                .iter()
                .any(|h| h.encoder.table == chunk.table && h.rewrites && !seen(h))
            {
                return None;
            }
            self.release_held(&chunk.table, |h| !seen(h));
        }
        let dropped = if chunk.key.is_empty() {
            Dropped::Keys(Default::default())
        } else {
            dropped
        };
        let none = Default::default();
        let (all, keys) = match &dropped {
            Dropped::Unknown => return None,
            Dropped::All => (true, &none),
            Dropped::Keys(keys) => (false, keys),
        };
        let keep = |k: &crate::backfill::Texts| !all && !keys.contains(k);
        let ctx = TxContext {
            xid: None,
            commit_lsn: high,
            commit_us: chunk.read_ms * 1000,
            prev_commit_end: self.last_commit_end,
            snapshot: true,
        };
        let hour = Hour::from_millis(chunk.read_ms);
        let now = now_ms();
        let oid = chunk.relation.as_ref().map(|r| r.oid).unwrap_or(0);
        // The stream's encoder when the schema is the same: chunk rows and streamed changes
        // then share batches.
        let encoder = match self.relations.get(&oid) {
            Some(r) if r.encoder.schema_id == encoder.schema_id => &r.encoder.clone(),
            _ => encoder,
        };
        let mut ordinal = 0u32;
        let mut written = 0usize;
        for (values, key) in &chunk.rows {
            if !keep(key) {
                continue;
            }
            ordinal += 1;
            let pos = Position::new(high, ordinal);
            let values: Vec<Value> = values
                .iter()
                .map(|v| match v {
                    Some(t) => Value::Text(bytes::Bytes::copy_from_slice(t.as_bytes())),
                    None => Value::Null,
                })
                .collect();
            self.batcher
                .push(oid, encoder, hour, pos, chunk.read_ms, |out| {
                    let start = out.len();
                    encoder.write_event(
                        out,
                        Op::Read,
                        None,
                        Some(&values),
                        &ctx,
                        high,
                        pos.ordinal,
                        pos.ordinal,
                        now,
                    );
                    written += out.len() - start;
                });
        }
        let after = chunk.next_after();
        let backfill = self.backfill.get_or_insert_with(Backfill::default);
        if let Some(p) = backfill.pending.iter_mut().find(|p| p.table == chunk.table) {
            p.rows += u64::from(ordinal);
            p.chunks += 1;
            if after.is_some() {
                p.after = after;
                p.key = chunk.key.clone();
            }
        }
        if chunk.last {
            backfill.finish(&chunk.table);
            self.tracker.untrack(&chunk.table);
            self.holding_changed();
        }
        // The server proved everything before the watermark sent; nothing else sits at it.
        let past = Lsn(high.0 + 1);
        self.last_commit_end = self.last_commit_end.max(past);
        self.server_reached(past);
        Some((u64::from(ordinal), written))
    }

    /// Releases the held changes of `table`: those `keep` says are recorded at their own
    /// positions, the others forgotten.
    pub fn release_held(&mut self, table: &TableName, keep: impl Fn(&Held) -> bool) {
        let (mine, rest): (Vec<Held>, Vec<Held>) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|h| &h.encoder.table == table);
        self.held = rest;
        for h in mine.into_iter().filter(|h| keep(h)) {
            self.batcher
                .push(h.oid, &h.encoder, h.hour, h.pos, h.commit_ms, |out| {
                    out.extend_from_slice(&h.event)
                });
        }
    }

    /// One snapshot row of `encoder`'s table (relation `oid`), keyed `pos`, as op "r" in `ctx`;
    /// a flush is wanted when the buffer is full.
    #[allow(clippy::too_many_arguments)]
    pub fn snapshot_row(
        &mut self,
        oid: u32,
        encoder: &Arc<TableEncoder>,
        ctx: &TxContext,
        hour: Hour,
        pos: Position,
        consistent: Lsn,
        values: &[Value],
        started_ms: i64,
    ) -> Option<Want> {
        let now = now_ms();
        self.batcher
            .push(oid, encoder, hour, pos, started_ms, |out| {
                encoder.write_event(
                    out,
                    Op::Read,
                    None,
                    Some(values),
                    ctx,
                    consistent,
                    pos.ordinal,
                    pos.ordinal,
                    now,
                );
            });
        self.full().then_some(Want::SnapshotRows { started_ms })
    }

    /// The snapshot is recorded complete: streaming starts at its consistent point.
    pub fn snapshot_done(&mut self, consistent: Lsn, started_ms: i64) {
        self.last_commit_end = consistent;
        self.last_commit_ms = started_ms;
        self.server_end = self.server_end.max(consistent);
    }
}

/// How far a checkpoint reaches: inside a transaction larger than a batch, its last recorded
/// change; otherwise just below the first change of a transaction committing at `lsn`. A
/// checkpoint `(X, none)` with `X` at or below a recorded `partial`'s commit is behind it, not
/// ahead: it does not cover that transaction's recorded changes.
pub fn progress(cp: &Checkpoint) -> Position {
    cp.partial.unwrap_or(Position::new(cp.lsn, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(lsn: u64, partial: Option<(u64, u32)>) -> Checkpoint {
        Checkpoint {
            lsn: Lsn(lsn),
            partial: partial.map(|(l, o)| Position::new(Lsn(l), o)),
            ..Default::default()
        }
    }

    fn settings() -> Settings {
        use clap::Parser;
        let args = [
            "capture",
            "--database",
            "app",
            "--username",
            "cdc",
            "--slot-name",
            "unit",
            "--local-test-mode",
        ];
        match crate::config::Flags::try_parse_from(args).map(crate::config::Flags::validate) {
            Ok(Ok(settings)) => settings,
            other => panic!("settings: {other:?}"),
        }
    }

    /// A table without a key (REPLICA IDENTITY FULL) read whole while it changes: an insert the
    /// read did not see is recorded before the read's rows; an update or a delete it did not
    /// see would act before the rows it acts on arrive, so the read is refused (read again);
    /// changes the read saw are in its rows already and are not recorded twice.
    #[test]
    fn a_keyless_read_places_unseen_inserts_and_is_refused_after_unseen_rewrites() {
        let table = TableName::new("public", "log");
        let rel = Relation {
            oid: 7,
            namespace: "public".into(),
            name: "log".into(),
            replica_identity: b'f',
            columns: vec![crate::pgoutput::RelationColumn {
                key: true,
                name: "v".into(),
                type_oid: 25,
                typmod: -1,
            }],
        };
        let schema = TableSchema {
            table: table.clone(),
            columns: vec![cdc_contract::schema::ColumnSchema {
                name: "v".into(),
                type_name: "text".into(),
                type_oid: 25,
                typmod: -1,
                key: true,
                base_oid: 25,
                element_oid: None,
            }],
        };
        let text = |v: &str| Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes()));
        for (rewrite, seen_by_read, placed) in [
            (false, false, true),
            (true, false, false),
            (true, true, true),
            (false, true, true),
        ] {
            let mut asm = Assembler::new(&settings(), Checkpoint::default(), None);
            asm.update_backfill(|b| {
                b.request(&table, 1);
                b.pending[0].keyless = true;
            });
            asm.relation(&rel, schema.clone());
            asm.begin(Lsn(100), 0, 50);
            if rewrite {
                let old = Some(OldTuple::Full(vec![text("a")]));
                asm.change(7, Op::Update, old, Some(&[text("b")]), Lsn(90))
                    .unwrap();
            } else {
                asm.change(7, Op::Create, None, Some(&[text("b")]), Lsn(90))
                    .unwrap();
            }
            asm.commit(Lsn(110), 0);
            assert!(asm.is_empty(), "held until the read is placed");
            let snapshot: crate::backfill::XidSnapshot = if seen_by_read {
                "51:51:".parse().unwrap()
            } else {
                "50:51:50".parse().unwrap()
            };
            let chunk = crate::backfill::Chunk {
                table: table.clone(),
                relation: Some(rel.clone()),
                after: None,
                key: Vec::new(),
                rows: vec![(vec![Some("a".into())], Vec::new())],
                last: true,
                snapshot,
                start: crate::backfill::Start { x0: 40, upto: None },
                bytes: 1,
                read_ms: 0,
                transaction_ms: 0,
            };
            let encoder = Arc::new(TableEncoder::new(schema.clone(), "unit", "app"));
            let got = asm.place_chunk(&chunk, &encoder, Lsn(200));
            assert_eq!(
                got.is_some(),
                placed,
                "rewrite {rewrite}, seen {seen_by_read}"
            );
            let segments = asm.batcher.take();
            let lines: Vec<String> = segments
                .iter()
                .flat_map(|s| {
                    String::from_utf8_lossy(&s.data)
                        .lines()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                })
                .collect();
            let ops: Vec<&str> = lines
                .iter()
                .map(|l| {
                    if l.contains(r#""op":"r""#) {
                        "r"
                    } else {
                        "change"
                    }
                })
                .collect();
            let expected: &[&str] = match (placed, seen_by_read) {
                (false, _) => &[],
                (true, true) => &["r"],
                (true, false) => &["change", "r"],
            };
            let mut sorted = ops.clone();
            sorted.sort_by_key(|op| *op == "r");
            assert_eq!(
                sorted, expected,
                "rewrite {rewrite}, seen {seen_by_read}: {lines:?}"
            );
        }
    }

    /// A table whose ordering key changes mid-backfill (its replica identity moved to another
    /// index): the recorded last key is in the old key's terms, so the first chunk read under
    /// the new key places nothing and the table starts again from its first key, and from then
    /// on the progress records the new key.
    #[test]
    fn a_changed_ordering_key_starts_the_table_again() {
        let table = TableName::new("public", "t");
        let column = |name: &str| crate::pgoutput::RelationColumn {
            key: name == "id",
            name: name.into(),
            type_oid: 25,
            typmod: -1,
        };
        let rel = Relation {
            oid: 8,
            namespace: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![column("id"), column("code")],
        };
        let schema = TableSchema {
            table: table.clone(),
            columns: ["id", "code"]
                .iter()
                .map(|name| cdc_contract::schema::ColumnSchema {
                    name: (*name).into(),
                    type_name: "text".into(),
                    type_oid: 25,
                    typmod: -1,
                    key: *name == "id",
                    base_oid: 25,
                    element_oid: None,
                })
                .collect(),
        };
        let encoder = Arc::new(TableEncoder::new(schema.clone(), "unit", "app"));
        let mut asm = Assembler::new(&settings(), Checkpoint::default(), None);
        asm.update_backfill(|b| {
            b.request(&table, 1);
        });
        asm.relation(&rel, schema);
        asm.tracker.track(&table);
        let s = |v: &str| Some(v.to_owned());
        let chunk = |after: Option<Vec<Option<String>>>, key: &str, rows: &[(&str, &str)]| {
            crate::backfill::Chunk {
                table: table.clone(),
                relation: Some(rel.clone()),
                after,
                key: vec![key.to_owned()],
                rows: rows
                    .iter()
                    .map(|(id, code)| {
                        let k = if key == "id" { id } else { code };
                        (vec![s(id), s(code)], vec![s(k)])
                    })
                    .collect(),
                last: false,
                snapshot: "100:100:".parse().unwrap(),
                start: crate::backfill::Start { x0: 90, upto: None },
                bytes: 1,
                read_ms: 0,
                transaction_ms: 0,
            }
        };
        let progress = |asm: &Assembler| asm.backfill().unwrap().pending[0].clone();
        let first = chunk(None, "id", &[("1", "z"), ("2", "y")]);
        let placed = asm.place_chunk(&first, &encoder, Lsn(200));
        assert_eq!(placed.map(|(rows, _)| rows), Some(2));
        assert_eq!(progress(&asm).after, Some(vec![s("2")]));
        assert_eq!(progress(&asm).key, vec!["id".to_owned()]);
        asm.tracker.set_start(&table, first.start.clone());

        // Read after "2" under the new key "code": it cannot resume there.
        let moved = chunk(Some(vec![s("2")]), "code", &[]);
        assert_eq!(asm.place_chunk(&moved, &encoder, Lsn(300)), Some((0, 0)));
        assert_eq!(
            progress(&asm).after,
            None,
            "started again from the first key"
        );
        assert!(progress(&asm).key.is_empty());
        assert_eq!(asm.tracker.start(&table), None, "the bound is taken again");

        let again = chunk(None, "code", &[("2", "y"), ("1", "z")]);
        let placed = asm.place_chunk(&again, &encoder, Lsn(400));
        assert_eq!(placed.map(|(rows, _)| rows), Some(2));
        assert_eq!(progress(&asm).after, Some(vec![s("z")]));
        assert_eq!(progress(&asm).key, vec!["code".to_owned()]);
    }

    /// A checkpoint inside a large transaction (its commit at 500, recorded through change 7)
    /// is ahead of a position the server proved before that commit, and behind one after it.
    #[test]
    fn progress_orders_checkpoints_by_what_they_cover() {
        let inside = cp(100, Some((500, 7)));
        assert!(progress(&cp(400, None)) < progress(&inside));
        assert!(
            progress(&cp(500, None)) < progress(&inside),
            "a commit at 500 is not covered by lsn 500"
        );
        assert!(progress(&cp(501, None)) > progress(&inside));
        assert!(progress(&cp(100, Some((500, 8)))) > progress(&inside));
        assert!(progress(&cp(100, None)) < progress(&inside));
    }
}
