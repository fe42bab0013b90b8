//! A randomized model of the chunked backfill against its invariant: replaying the recorded
//! events by order key gives the table.
//!
//! The model is a keyed table and its transactions, each with an xid taken when it begins, a
//! commit record written into the WAL when it commits, and a moment it becomes visible to new
//! snapshots, any time after its commit record (a synchronous standby, a slow backend): commit
//! order, xid order and visibility order all differ. Some transactions commit before the slot's
//! stream starts (their rows are in the table, not in the stream) and may still be invisible
//! when the backfill starts. The real [`Assembler`] and [`Tracker`] take the stream and place
//! the chunks; the reads follow `PgChunkSource`'s rules (an xid of its own, the wait for every
//! older xid, the largest key as the bound, a snapshot of what is visible), and a watermark is
//! written into the WAL after each read. Flushes record what is buffered at random moments,
//! and the stream breaks at random moments: what was not recorded is streamed again from the
//! recorded checkpoint and the chunk awaited is let go; an operator asks for the table again at
//! random moments. Every schedule comes from a seed.
//!
//! [`Tracker`]: crate::backfill::Tracker

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use cdc_contract::event::Op;
use cdc_contract::ledger::Checkpoint;
use cdc_contract::schema::{ColumnSchema, TableSchema};
use cdc_contract::{Lsn, TableName};

use crate::assemble::{Assembler, Want};
use crate::backfill::{Chunk, Start, Texts, XidSnapshot};
use crate::encode::TableEncoder;
use crate::pgoutput::{OldTuple, Relation, RelationColumn, Value};

const OID: u32 = 16384;
const KEYS: i64 = 30;

#[derive(Debug, Clone)]
struct Txn {
    xid: u32,
    /// (key, new value; None: delete), decided when it commits.
    changes: Vec<(i64, Option<String>)>,
    committed: bool,
    visible: bool,
}

#[derive(Debug, Clone, Copy)]
enum Record {
    Commit(usize),
    Watermark(u64),
}

struct Model {
    rng: StdRng,
    initial: BTreeMap<i64, String>,
    txns: Vec<Txn>,
    /// Transactions in commit order.
    committed: Vec<usize>,
    /// The table after every committed transaction.
    latest: BTreeMap<i64, String>,
    wal: Vec<Record>,
    /// Records before it were written before the slot's stream starts.
    stream_start: usize,
    streamed: usize,
    next_xid: u32,
    /// The first read's own xid, while it waits for older ones.
    own: Option<u32>,
    waiting: Option<(Chunk, u64)>,
    seq: u64,
    log: Vec<String>,
}

fn text(v: &str) -> Value {
    Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes()))
}

/// The WAL position of record `i`: a transaction's changes at +1.., its commit record at +50,
/// its end at +58; a watermark message ends at +50.
fn at(i: usize) -> u64 {
    1000 + 100 * i as u64
}

impl Model {
    fn new(seed: u64) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let initial = (1..=KEYS)
            .filter(|_| rng.random_bool(0.6))
            .map(|k| (k, format!("init-{k}")))
            .collect::<BTreeMap<_, _>>();
        Model {
            rng,
            latest: initial.clone(),
            initial,
            txns: Vec::new(),
            committed: Vec::new(),
            wal: Vec::new(),
            stream_start: 0,
            streamed: 0,
            next_xid: 100,
            own: None,
            waiting: None,
            seq: 0,
            log: Vec::new(),
        }
    }

    fn begin(&mut self) {
        self.txns.push(Txn {
            xid: self.next_xid,
            changes: Vec::new(),
            committed: false,
            visible: false,
        });
        self.log.push(format!("begin xid {}", self.next_xid));
        self.next_xid += 1;
    }

    /// Commits running transaction `t`: its changes touch keys no invisible committed
    /// transaction holds (a row lock waits for the holder to end).
    fn commit(&mut self, t: usize) {
        let locked: HashSet<i64> = self
            .txns
            .iter()
            .filter(|x| x.committed && !x.visible)
            .flat_map(|x| x.changes.iter().map(|(k, _)| *k))
            .collect();
        let mut changes = Vec::new();
        for _ in 0..self.rng.random_range(1..=3) {
            let k = self.rng.random_range(1..=KEYS + 5);
            if locked.contains(&k) || changes.iter().any(|(c, _)| *c == k) {
                continue;
            }
            let exists = self.latest.contains_key(&k);
            let value = if exists && self.rng.random_bool(0.35) {
                None
            } else {
                Some(format!("x{}-{k}", self.txns[t].xid))
            };
            match &value {
                Some(v) => self.latest.insert(k, v.clone()),
                None => self.latest.remove(&k),
            };
            changes.push((k, value));
        }
        let txn = &mut self.txns[t];
        txn.changes = changes;
        txn.committed = true;
        self.committed.push(t);
        self.log.push(format!(
            "commit xid {} at {} {:?}",
            txn.xid,
            at(self.wal.len()) + 50,
            txn.changes
        ));
        self.wal.push(Record::Commit(t));
    }

    /// Where record `i` ends.
    fn end(&self, i: usize) -> u64 {
        match self.wal[i] {
            Record::Commit(_) => at(i) + 58,
            Record::Watermark(_) => at(i) + 50,
        }
    }

    /// The table as a snapshot taken now sees it, and that snapshot.
    fn snapshot(&self) -> (BTreeMap<i64, String>, XidSnapshot) {
        let mut state = self.initial.clone();
        for &t in &self.committed {
            if self.txns[t].visible {
                for (k, v) in &self.txns[t].changes {
                    match v {
                        Some(v) => state.insert(*k, v.clone()),
                        None => state.remove(k),
                    };
                }
            }
        }
        let xip: HashSet<u64> = self
            .txns
            .iter()
            .filter(|t| !t.visible)
            .map(|t| u64::from(t.xid))
            .collect();
        let xmax = u64::from(self.next_xid);
        let xmin = xip.iter().copied().min().unwrap_or(xmax);
        (state, XidSnapshot { xmin, xmax, xip })
    }

    /// Streams the next record into the assembler; true when one was there.
    fn stream(
        &mut self,
        asm: &mut Assembler,
        encoder: &Arc<TableEncoder>,
        rows_placed: &mut u64,
    ) -> bool {
        let Some(record) = self.wal.get(self.streamed).copied() else {
            return false;
        };
        let i = self.streamed;
        self.streamed += 1;
        match record {
            Record::Commit(t) => {
                let txn = self.txns[t].clone();
                asm.begin(Lsn(at(i) + 50), 0, txn.xid);
                for (n, (k, v)) in txn.changes.iter().enumerate() {
                    let lsn = Lsn(at(i) + 1 + n as u64);
                    let key = k.to_string();
                    let result = match v {
                        Some(v) => {
                            let op = if n % 2 == 0 { Op::Update } else { Op::Create };
                            asm.change(OID, op, None, Some(&[text(&key), text(v)]), lsn)
                        }
                        None => asm.change(
                            OID,
                            Op::Delete,
                            Some(OldTuple::Key(vec![text(&key), Value::Null])),
                            None,
                            lsn,
                        ),
                    };
                    result.expect("change");
                }
                asm.commit(Lsn(at(i) + 58), 0);
            }
            Record::Watermark(seq) => {
                let Some((chunk, _)) = self.waiting.take_if(|(_, s)| *s == seq) else {
                    return true;
                };
                let high = Lsn(at(i) + 50 - 1);
                match asm.place_chunk(&chunk, encoder, high) {
                    Some((rows, _)) => {
                        *rows_placed += rows;
                        self.log.push(format!(
                            "placed chunk {seq} at {} ({rows} of {} rows)",
                            high.0,
                            chunk.rows.len()
                        ));
                    }
                    None => self.log.push(format!("chunk {seq} refused")),
                }
            }
        }
        true
    }

    /// A chunk read, as `PgChunkSource` does it; false when it waits for older xids.
    fn read(&mut self, asm: &mut Assembler, table: &TableName, limit: usize) -> bool {
        let Some(pending) = asm
            .backfill()
            .and_then(|b| b.pending.iter().find(|p| &p.table == table))
            .cloned()
        else {
            return false;
        };
        let start = match asm.tracker.start(table) {
            Some(start) => start,
            None => {
                let own = *self.own.get_or_insert_with(|| {
                    self.next_xid += 1;
                    self.next_xid - 1
                });
                if self.txns.iter().any(|t| t.xid < own && !t.visible) {
                    return false;
                }
                self.own = None;
                let (state, _) = self.snapshot();
                let upto = state.keys().next_back().map(|k| vec![Some(k.to_string())]);
                Start {
                    x0: u64::from(own) + 1,
                    upto,
                }
            }
        };
        let (state, snapshot) = self.snapshot();
        let after: Option<i64> = pending
            .after
            .as_ref()
            .and_then(|a| a.first().cloned().flatten())
            .and_then(|a| a.parse().ok());
        let upto: Option<i64> = start
            .upto
            .as_ref()
            .and_then(|a| a.first().cloned().flatten())
            .and_then(|a| a.parse().ok());
        let rows: Vec<(Texts, Texts)> = state
            .iter()
            .filter(|(k, _)| after.is_none_or(|a| **k > a) && upto.is_some_and(|u| **k <= u))
            .take(limit)
            .map(|(k, v)| {
                (
                    vec![Some(k.to_string()), Some(v.clone())],
                    vec![Some(k.to_string())],
                )
            })
            .collect();
        let last = rows.len() < limit || rows.last().map(|(_, k)| k) == start.upto.as_ref();
        asm.tracker.set_start(table, start.clone());
        self.seq += 1;
        self.log.push(format!(
            "read chunk {} after {after:?} upto {upto:?}: {} rows, snapshot {snapshot:?}",
            self.seq,
            rows.len()
        ));
        self.waiting = Some((
            Chunk {
                table: table.clone(),
                relation: Some(relation()),
                after: pending.after.clone(),
                key: vec!["id".into()],
                rows,
                last,
                snapshot,
                start,
                bytes: 0,
                read_ms: 0,
                transaction_ms: 0,
            },
            self.seq,
        ));
        self.wal.push(Record::Watermark(self.seq));
        true
    }
}

fn relation() -> Relation {
    Relation {
        oid: OID,
        namespace: "public".into(),
        name: "t".into(),
        replica_identity: b'd',
        columns: vec![
            RelationColumn {
                key: true,
                name: "id".into(),
                type_oid: 20,
                typmod: -1,
            },
            RelationColumn {
                key: false,
                name: "v".into(),
                type_oid: 25,
                typmod: -1,
            },
        ],
    }
}

fn schema(table: &TableName) -> TableSchema {
    let column = |name: &str, type_name: &str, oid: u32, key: bool| ColumnSchema {
        name: name.into(),
        type_name: type_name.into(),
        type_oid: oid,
        typmod: -1,
        key,
        base_oid: oid,
        element_oid: None,
    };
    TableSchema {
        table: table.clone(),
        columns: vec![
            column("id", "bigint", 20, true),
            column("v", "text", 25, false),
        ],
    }
}

fn settings() -> crate::config::Settings {
    use clap::Parser;
    let args = [
        "capture",
        "--database",
        "app",
        "--username",
        "cdc",
        "--slot-name",
        "model",
        "--local-test-mode",
    ];
    match crate::config::Flags::try_parse_from(args).map(crate::config::Flags::validate) {
        Ok(Ok(settings)) => settings,
        other => panic!("settings: {other:?}"),
    }
}

/// One schedule; the model's log when the replay is not the table.
fn run(seed: u64) -> Result<u64, String> {
    let table = TableName::new("public", "t");
    let mut m = Model::new(seed);
    // Transactions before the stream starts: in the table, not in the stream; some not visible
    // yet when the backfill begins.
    for _ in 0..m.rng.random_range(0..4) {
        m.begin();
        let t = m.txns.len() - 1;
        m.commit(t);
        if m.rng.random_bool(0.5) {
            m.txns[t].visible = true;
        }
    }
    m.stream_start = m.wal.len();
    m.streamed = m.stream_start;
    let mut asm = Assembler::new(&settings(), Checkpoint::default(), None);
    asm.relation(&relation(), schema(&table));
    asm.update_backfill(|b| {
        b.request(&table, 0);
    });
    // The request is recorded before any chunk (the streamer records a backfill state change
    // on its own).
    let (_, checkpoint, _) = asm.take_flush(Want::Committed);
    asm.flush_recorded(checkpoint);
    let encoder = Arc::new(TableEncoder::new(schema(&table), "model", "app"));
    let budget = m.rng.random_range(5..40);
    let mut rows_placed = 0;
    let mut recorded = Vec::new();
    let mut breaks = 0;
    let mut requests = 0;
    for step in 0..100_000 {
        let running: Vec<usize> = (0..m.txns.len())
            .filter(|&t| !m.txns[t].committed)
            .collect();
        let invisible: Vec<usize> = (0..m.txns.len())
            .filter(|&t| m.txns[t].committed && !m.txns[t].visible)
            .collect();
        let backfilling = asm.backfill().is_some_and(|b| !b.pending.is_empty());
        let done = m.txns.len() >= budget
            && running.is_empty()
            && invisible.is_empty()
            && m.streamed == m.wal.len()
            && !backfilling;
        if done {
            break;
        }
        if step == 99_999 {
            return Err(format!("seed {seed}: no end\n{}", m.log.join("\n")));
        }
        match m.rng.random_range(0..14) {
            0 | 1 if m.txns.len() < budget && running.len() < 4 => m.begin(),
            2 | 3 if !running.is_empty() => {
                let t = running[m.rng.random_range(0..running.len())];
                m.commit(t);
            }
            4 | 5 if !invisible.is_empty() => {
                let t = invisible[m.rng.random_range(0..invisible.len())];
                m.txns[t].visible = true;
                m.log.push(format!("xid {} visible", m.txns[t].xid));
            }
            6 | 7 => {
                m.stream(&mut asm, &encoder, &mut rows_placed);
            }
            8 | 9 if m.waiting.is_none() && backfilling => {
                let limit = m.rng.random_range(1..8);
                m.read(&mut asm, &table, limit);
            }
            10 => {
                let (segments, checkpoint, _) = asm.take_flush(Want::Committed);
                m.log.push(format!("recorded up to {}", checkpoint.lsn.0));
                recorded.extend(segments);
                asm.flush_recorded(checkpoint);
            }
            11 if breaks < 4 && m.rng.random_bool(0.3) => {
                breaks += 1;
                // The stream breaks: what was not recorded is streamed again from the recorded
                // checkpoint, the chunk awaited is let go, tracking starts again.
                asm.reset();
                asm.relation(&relation(), schema(&table));
                m.waiting = None;
                m.own = None;
                let from = asm.recorded().lsn.0;
                m.streamed = (m.stream_start..m.wal.len())
                    .find(|&i| m.end(i) > from)
                    .unwrap_or(m.wal.len());
                m.log.push(format!(
                    "reconnect: streaming again from record {}",
                    m.streamed
                ));
            }
            12 if requests < 2 && m.rng.random_bool(0.2) => {
                // An operator asks for the table again, maybe while a chunk is awaited.
                requests += 1;
                asm.update_backfill(|b| {
                    b.request(&table, 1);
                });
                m.log.push("asked for again".into());
            }
            _ => {}
        }
    }
    let (segments, checkpoint, _) = asm.take_flush(Want::Committed);
    recorded.extend(segments);
    asm.flush_recorded(checkpoint);
    // Replay every recorded event by order key.
    let mut events: Vec<((u64, u64), serde_json::Value)> = Vec::new();
    for segment in recorded {
        for line in String::from_utf8_lossy(&segment.data).lines() {
            let e: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
            let key = (
                e["source"]["commit_lsn"].as_u64().unwrap_or(0),
                e["transaction"]["total_order"].as_u64().unwrap_or(0),
            );
            events.push((key, e));
        }
    }
    events.sort_by_key(|(k, _)| *k);
    let streamed: HashSet<u64> = events
        .iter()
        .filter(|(_, e)| e["op"] != "r")
        .map(|((lsn, _), _)| *lsn)
        .collect();
    let mut keys = HashSet::new();
    let mut replay = BTreeMap::new();
    for ((lsn, ordinal), e) in &events {
        if !keys.insert((*lsn, *ordinal)) {
            return Err(format!("seed {seed}: order key {lsn}/{ordinal} twice"));
        }
        if e["op"] == "r" && streamed.contains(lsn) {
            return Err(format!("seed {seed}: a read shares commit LSN {lsn}"));
        }
        let image = if e["op"] == "d" {
            &e["before"]
        } else {
            &e["after"]
        };
        let id = image["id"].as_i64().ok_or("no id")?;
        if e["op"] == "d" {
            replay.remove(&id);
        } else {
            replay.insert(id, image["v"].as_str().unwrap_or_default().to_owned());
        }
    }
    if replay != m.latest {
        let missing: Vec<_> = m
            .latest
            .iter()
            .filter(|(k, v)| replay.get(k) != Some(v))
            .collect();
        let extra: Vec<_> = replay
            .iter()
            .filter(|(k, v)| m.latest.get(k) != Some(v))
            .collect();
        return Err(format!(
            "seed {seed}: the replay is not the table: table has {missing:?}, replay has {extra:?}\n{}",
            m.log.join("\n")
        ));
    }
    Ok(rows_placed)
}

/// Many schedules, each from its seed (`BACKFILL_MODEL_SEED` runs one): the replay of the
/// recorded events is the table, no order key repeats, and no read shares a streamed
/// transaction's commit LSN.
#[test]
fn replaying_a_backfill_under_random_schedules_gives_the_table() {
    if let Ok(seed) = std::env::var("BACKFILL_MODEL_SEED") {
        let seed = seed.parse().expect("BACKFILL_MODEL_SEED: a number");
        if let Err(e) = run(seed) {
            panic!("{e}");
        }
        return;
    }
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut placed = 0;
    for i in 0..2000 {
        match run(base.wrapping_mul(7919).wrapping_add(i)) {
            Ok(rows) => placed += rows,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(placed > 0, "no chunk row was ever placed");
}
