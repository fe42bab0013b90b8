//! In-memory implementations of the capture's seams, for the deterministic simulation test
//! (and any other test that wants a capture without a server): a ledger with DynamoDB's
//! conditional semantics, a store, and a scripted PostgreSQL (its WAL, slot and replication
//! streams), all in one [`World`] that injects faults and kills from a seed.
//!
//! A kill stops an incarnation at one of its operations, before or after the operation takes
//! effect (a lost reply): every later operation of that incarnation, including its spawned
//! flush and lease tasks, waits forever, as if the process were gone. A new incarnation then
//! starts from what the ledger, the store and the slot hold.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Notify;
use tokio::time::Instant;

use cdc_contract::ledger::{BatchItem, Checkpoint, FlushId, SnapshotState};
use cdc_contract::schema::{ColumnSchema, TableSchema};
use cdc_contract::{Lsn, Position, TableName};

use crate::ledger::{FlushRequest, Ledger, LedgerError};
use crate::notify::Notifier;
use crate::pgoutput::{OldTuple, PgOutput, Relation, RelationColumn, Value};
use crate::pipeline::CaptureError;
use crate::replication::PG_EPOCH_OFFSET_MICROS;
use crate::sink::{BatchSink, SinkError};
use crate::source::{Incoming, ReplicationSource, SlotStatus, Upstream};

/// `int8`'s and `text`'s type OIDs.
const INT8: u32 = 20;
const TEXT: u32 = 25;

/// One row change in the scripted WAL.
#[derive(Debug, Clone)]
pub struct Change {
    /// The table (index into [`World::tables`]).
    pub table: usize,
    /// `c`, `u`, `d` or `t`.
    pub op: char,
    /// The row's values (id first) for `c` and `u`; the key for `d`; empty for `t`.
    pub values: Vec<Option<Bytes>>,
    /// The table's column count when the change was made.
    pub columns: usize,
    /// The change's own WAL position.
    pub lsn: Lsn,
}

/// One committed transaction of the scripted WAL.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// Transaction id.
    pub xid: u32,
    /// Its commit record's position (the changes' order key).
    pub commit_lsn: Lsn,
    /// The end of its commit record.
    pub end_lsn: Lsn,
    /// Commit time, ms since the Unix epoch.
    pub commit_ms: i64,
    /// When it becomes visible, in simulated time since the start.
    pub appears: Duration,
    /// Its changes, in order.
    pub changes: Vec<Change>,
}

/// A fault to inject at an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail before taking effect (a transient error).
    Fail,
    /// Take effect, then fail (the reply is lost).
    LoseReply,
}

/// What the ledger holds.
#[derive(Debug, Default, Clone)]
pub struct LedgerState {
    /// Lease: owner, epoch, expiry (simulated).
    pub lease: Option<(String, u64, Instant)>,
    /// The last epoch handed out.
    pub epoch: u64,
    /// The checkpoint item.
    pub checkpoint: Option<Checkpoint>,
    /// Flush records by id.
    pub flushes: BTreeMap<(u64, u64), FlushRequest>,
    /// Batch items by (table, hour, sort key).
    pub batches: BTreeMap<(String, String), BatchItem>,
    /// Schema items by (table, version).
    pub schemas: BTreeSet<(String, String)>,
    /// The snapshot state item.
    pub snapshot: Option<SnapshotState>,
}

/// Everything the simulated capture talks to.
pub struct World {
    /// Faults and kills come from here.
    pub rng: StdRng,
    /// The incarnation whose operations run; older ones wait forever.
    pub generation: u64,
    /// Operations run so far.
    pub ops: u64,
    /// Kill the current incarnation at this operation (before or after it takes effect).
    pub kill_at: Option<(u64, bool)>,
    /// The current incarnation was killed.
    pub killed: bool,
    /// A paused writer: an earlier incarnation that was frozen (not killed) while its successor
    /// started. Its connection to the server is gone when it wakes; its ledger and store calls
    /// still go through.
    pub zombie: Option<u64>,
    /// The paused writer has not woken yet: its operations wait.
    pub zombie_paused: bool,
    /// Probability of a fault per fallible operation.
    pub fault_rate: f64,
    /// Probability of a stream break per message.
    pub break_rate: f64,
    /// The ledger.
    pub ledger: LedgerState,
    /// The store's objects.
    pub objects: BTreeMap<String, Bytes>,
    /// Captured tables: name and OID.
    pub tables: Vec<(TableName, u32)>,
    /// The WAL: committed transactions in commit order.
    pub wal: Vec<Transaction>,
    /// The slot's confirmed position.
    pub confirmed: Lsn,
    /// When the simulation started.
    pub start: Instant,
    /// Broken invariants, as found.
    pub violations: Vec<String>,
    /// A digest of the operations, to check runs repeat.
    pub trace: u64,
    /// Wakes the harness when a kill happens.
    pub kill_notice: Arc<Notify>,
    /// Stored objects already read back, by key and size.
    parsed: BTreeMap<String, (usize, Vec<Replayed>)>,
}

/// A handle on the world for one incarnation.
#[derive(Clone)]
pub struct Handle {
    world: Arc<Mutex<World>>,
    generation: u64,
}

/// What an operation may do.
enum Gate {
    Go,
    Fault(Fault),
    /// Take effect, then die.
    DieAfter,
    /// An operation of the paused writer, woken: ledger and store calls go through without
    /// faults; the server's connections are gone.
    Zombie,
}

impl World {
    /// A world with `tables` captured tables and the given WAL.
    pub fn new(seed: u64, tables: Vec<(TableName, u32)>, wal: Vec<Transaction>) -> Self {
        World {
            rng: StdRng::seed_from_u64(seed ^ 0x005e_ed0f_fa17),
            generation: 0,
            ops: 0,
            kill_at: None,
            killed: false,
            zombie: None,
            zombie_paused: false,
            fault_rate: 0.0,
            break_rate: 0.0,
            ledger: LedgerState::default(),
            objects: BTreeMap::new(),
            tables,
            wal,
            confirmed: Lsn::ZERO,
            start: Instant::now(),
            violations: Vec::new(),
            trace: 0xcbf2_9ce4_8422_2325,
            kill_notice: Arc::new(Notify::new()),
            parsed: BTreeMap::new(),
        }
    }

    /// Transactions visible now.
    fn visible(&self) -> usize {
        let elapsed = self.start.elapsed();
        self.wal.partition_point(|t| t.appears <= elapsed)
    }

    /// The server's current WAL position: past every visible commit, at most the next commit.
    fn current_lsn(&self) -> Lsn {
        let visible = self.visible();
        let done = visible
            .checked_sub(1)
            .map(|i| self.wal[i].end_lsn)
            .unwrap_or(Lsn(0x100_0000));
        match self.wal.get(visible) {
            Some(next) => Lsn(done.0.max(next.commit_lsn.0.saturating_sub(8))),
            None => done,
        }
    }

    fn mix(&mut self, what: &str, value: u64) {
        for byte in what.bytes().chain(value.to_le_bytes()) {
            self.trace ^= u64::from(byte);
            self.trace = self.trace.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Handle {
    /// A handle for the incarnation `generation`.
    pub fn new(world: Arc<Mutex<World>>, generation: u64) -> Self {
        Handle { world, generation }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        match self.world.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Counts an operation; decides faults and kills. A dead incarnation waits forever here, a
    /// paused one until it wakes.
    async fn gate(&self, what: &str, fallible: bool) -> Gate {
        loop {
            let decision = {
                let mut w = self.lock();
                if w.zombie == Some(self.generation) {
                    if w.zombie_paused {
                        Some(None)
                    } else {
                        w.mix(what, u64::MAX);
                        Some(Some(Gate::Zombie))
                    }
                } else if w.generation != self.generation || w.killed {
                    None
                } else {
                    w.ops += 1;
                    let ops = w.ops;
                    w.mix(what, ops);
                    match w.kill_at {
                        Some((at, after)) if at == ops => {
                            if after {
                                Some(Some(Gate::DieAfter))
                            } else {
                                w.killed = true;
                                w.kill_notice.notify_one();
                                None
                            }
                        }
                        _ => {
                            let rate = w.fault_rate;
                            if fallible && rate > 0.0 && w.rng.random_bool(rate) {
                                Some(Some(Gate::Fault(if w.rng.random_bool(0.5) {
                                    Fault::Fail
                                } else {
                                    Fault::LoseReply
                                })))
                            } else {
                                Some(Some(Gate::Go))
                            }
                        }
                    }
                }
            };
            match decision {
                Some(Some(gate)) => return gate,
                // Paused: look again later (simulated time).
                Some(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                None => std::future::pending().await,
            }
        }
    }

    /// After an operation took effect: dies if the gate said so (the reply is lost with the
    /// process), fails if the reply is to be lost.
    async fn after<T, E>(&self, gate: &Gate, ok: T, lost: impl FnOnce() -> E) -> Result<T, E> {
        match gate {
            Gate::DieAfter => {
                {
                    let mut w = self.lock();
                    w.killed = true;
                    w.kill_notice.notify_one();
                }
                std::future::pending().await
            }
            Gate::Fault(Fault::LoseReply) => Err(lost()),
            _ => Ok(ok),
        }
    }
}

fn transient(what: &str) -> LedgerError {
    LedgerError::Transient(format!("simulated: {what}"))
}

/// The in-memory ledger.
pub struct SimLedger(pub Handle);

#[async_trait]
impl Ledger for SimLedger {
    async fn acquire_lease(&self, owner: &str, duration_ms: i64) -> Result<u64, LedgerError> {
        let gate = self.0.gate("acquire", true);
        let gate = gate.await;
        if matches!(gate, Gate::Fault(Fault::Fail)) {
            return Err(transient("acquire lease"));
        }
        let epoch = {
            let mut w = self.0.lock();
            let now = Instant::now();
            if let Some((holder, _, expires)) = &w.ledger.lease {
                if holder != owner && *expires >= now {
                    let left = (*expires - now).as_millis() as i64;
                    return Err(LedgerError::Held {
                        owner: holder.clone(),
                        expires_ms: chrono::Utc::now().timestamp_millis() + left,
                    });
                }
            }
            w.ledger.epoch += 1;
            let epoch = w.ledger.epoch;
            w.ledger.lease = Some((
                owner.to_owned(),
                epoch,
                now + Duration::from_millis(duration_ms as u64),
            ));
            epoch
        };
        self.0
            .after(&gate, epoch, || transient("acquire lease reply"))
            .await
    }

    async fn renew_lease(
        &self,
        owner: &str,
        epoch: u64,
        duration_ms: i64,
    ) -> Result<(), LedgerError> {
        let gate = self.0.gate("renew", true).await;
        if matches!(gate, Gate::Fault(Fault::Fail)) {
            return Err(transient("renew lease"));
        }
        {
            let mut w = self.0.lock();
            match &mut w.ledger.lease {
                Some((o, e, expires)) if o == owner && *e == epoch => {
                    *expires = Instant::now() + Duration::from_millis(duration_ms as u64);
                }
                _ => return Err(LedgerError::Fenced(format!("epoch {epoch} was taken over"))),
            }
        }
        self.0
            .after(&gate, (), || transient("renew lease reply"))
            .await
    }

    async fn release_lease(&self, owner: &str, epoch: u64) -> Result<(), LedgerError> {
        let gate = self.0.gate("release", false).await;
        {
            let mut w = self.0.lock();
            let start = w.start;
            if let Some((o, e, expires)) = &mut w.ledger.lease {
                if o == owner && *e == epoch {
                    *expires = start;
                }
            }
        }
        self.0.after(&gate, (), || transient("release")).await
    }

    async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        let gate = self.0.gate("load_checkpoint", true).await;
        if matches!(gate, Gate::Fault(_)) {
            return Err(transient("load checkpoint"));
        }
        let cp = self.0.lock().ledger.checkpoint.clone();
        self.0
            .after(&gate, cp, || transient("load checkpoint"))
            .await
    }

    async fn load_snapshot(&self) -> Result<Option<SnapshotState>, LedgerError> {
        let gate = self.0.gate("load_snapshot", false).await;
        let state = self.0.lock().ledger.snapshot.clone();
        self.0
            .after(&gate, state, || transient("load snapshot"))
            .await
    }

    async fn save_snapshot(
        &self,
        state: &SnapshotState,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError> {
        let gate = self.0.gate("save_snapshot", false).await;
        {
            let mut w = self.0.lock();
            if !matches!(&w.ledger.lease, Some((o, e, _)) if o == owner && *e == epoch) {
                return Err(LedgerError::Fenced("lease lost".into()));
            }
            w.ledger.snapshot = Some(state.clone());
        }
        self.0.after(&gate, (), || transient("save snapshot")).await
    }

    async fn retire_snapshot(&self, _state: &SnapshotState) -> Result<u64, LedgerError> {
        Err(LedgerError::Definite(
            "the simulation takes no snapshot".into(),
        ))
    }

    async fn record_flush(
        &self,
        req: &FlushRequest,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError> {
        // The batch and schema items first, unconditionally (as DynamoDB's ledger does).
        let gate = self.0.gate("put_batches", true).await;
        if matches!(gate, Gate::Fault(Fault::Fail)) {
            return Err(transient("put batches"));
        }
        {
            let mut w = self.0.lock();
            for schema in &req.schemas {
                w.ledger
                    .schemas
                    .insert((schema.table.to_string(), schema.version_id()));
            }
            for batch in &req.batches {
                w.ledger
                    .batches
                    .insert((batch.table.to_string(), batch.sk()), batch.clone());
            }
        }
        self.0
            .after(&gate, (), || transient("put batches reply"))
            .await?;

        // Then the transaction: lease, new flush record, checkpoint with a lower number.
        let gate = self.0.gate("record_flush", true).await;
        if matches!(gate, Gate::Fault(Fault::Fail)) {
            return Err(transient("record flush"));
        }
        {
            let mut w = self.0.lock();
            let key = (req.id.seq, req.id.epoch);
            let leased = matches!(&w.ledger.lease, Some((o, e, _)) if o == owner && *e == epoch);
            let fresh = !w.ledger.flushes.contains_key(&key);
            let newer = w
                .ledger
                .checkpoint
                .as_ref()
                .is_none_or(|cp| cp.flush_seq < req.id.seq);
            if leased && fresh && newer {
                for schema in req
                    .batches
                    .iter()
                    .map(|b| (b.table.to_string(), b.schema_id.clone()))
                {
                    if !w.ledger.schemas.contains(&schema) {
                        w.violations.push(format!(
                            "flush {} names schema {schema:?}, which the ledger does not hold",
                            req.id
                        ));
                    }
                }
                // After every recorded flush: the checkpoint never covers less than before.
                let backwards = w.ledger.checkpoint.as_ref().and_then(|old| {
                    let new = &req.checkpoint;
                    let behind = new.lsn < old.lsn || old.partial.is_some_and(|p| !new.covers(p));
                    behind.then(|| {
                        format!(
                            "flush {} moved the checkpoint back from {} {:?} to {} {:?}",
                            req.id,
                            old.lsn,
                            old.partial.map(|p| p.key()),
                            new.lsn,
                            new.partial.map(|p| p.key())
                        )
                    })
                });
                w.violations.extend(backwards);
                w.ledger.flushes.insert(key, req.clone());
                w.ledger.checkpoint = Some(req.checkpoint.clone());
            } else if !fresh {
                // An earlier attempt committed (its reply was lost): the same flush, or a
                // number reused for another one.
                let same = w.ledger.flushes.get(&key).is_some_and(|f| {
                    f.checkpoint == req.checkpoint
                        && f.batches
                            .iter()
                            .map(BatchItem::sk)
                            .eq(req.batches.iter().map(BatchItem::sk))
                });
                if !same {
                    w.violations.push(format!(
                        "flush number {} was used for two different flushes",
                        req.id
                    ));
                }
            } else if !leased {
                return Err(LedgerError::Fenced(format!("epoch {epoch} was taken over")));
            } else {
                // DynamoDB would cancel this transaction every time, and the flush would retry
                // it forever: the capture wedges.
                let recorded = w.ledger.checkpoint.as_ref().map_or(0, |c| c.flush_seq);
                w.violations.push(format!(
                    "flush {} is numbered at or below the recorded flush {recorded}: it can never be recorded",
                    req.id
                ));
                return Err(LedgerError::Definite(
                    "flush number not above the checkpoint's".into(),
                ));
            }
        }
        self.0
            .after(&gate, (), || transient("record flush reply"))
            .await
    }
}

/// The in-memory store.
pub struct SimSink(pub Handle);

#[async_trait]
impl BatchSink for SimSink {
    async fn put_batch(&self, key: &str, jsonl: Bytes) -> Result<u64, SinkError> {
        let gate = self.0.gate("put_object", true).await;
        if matches!(gate, Gate::Fault(Fault::Fail)) {
            return Err(SinkError::Transient("simulated: put".into()));
        }
        let size = jsonl.len() as u64;
        self.0.lock().objects.insert(key.to_owned(), jsonl);
        self.0
            .after(&gate, size, || {
                SinkError::Transient("simulated: put reply".into())
            })
            .await
    }
}

/// Notifications go nowhere (the compactor's sweep finds everything).
pub struct SimNotifier;

#[async_trait]
impl Notifier for SimNotifier {
    async fn notify(&self, _note: &cdc_contract::notify::Notification) -> Result<(), String> {
        Ok(())
    }
}

fn disconnected(what: &str) -> CaptureError {
    CaptureError::Disconnected(format!("simulated: {what}"))
}

/// The scripted PostgreSQL.
pub struct SimUpstream(pub Handle);

/// The columns of a table with `n` columns: `id int8` (the key), then text columns.
fn relation_columns(n: usize) -> Vec<RelationColumn> {
    (0..n)
        .map(|i| RelationColumn {
            key: i == 0,
            name: if i == 0 { "id".into() } else { format!("c{i}") },
            type_oid: if i == 0 { INT8 } else { TEXT },
            typmod: -1,
        })
        .collect()
}

#[async_trait]
impl Upstream for SimUpstream {
    async fn reconnect_sql(&mut self) -> Result<(), CaptureError> {
        match self.0.gate("reconnect_sql", true).await {
            Gate::Fault(_) | Gate::Zombie => Err(disconnected("sql connection")),
            gate => self.0.after(&gate, (), || disconnected("sql")).await,
        }
    }

    async fn slot_confirmed(&mut self) -> Result<Option<Lsn>, CaptureError> {
        let gate = self.0.gate("slot_confirmed", false).await;
        if matches!(gate, Gate::Zombie) {
            return Err(disconnected("sql"));
        }
        let confirmed = self.0.lock().confirmed;
        self.0
            .after(&gate, Some(confirmed).filter(|c| *c > Lsn::ZERO), || {
                disconnected("sql")
            })
            .await
    }

    async fn start(&mut self, from: Lsn) -> Result<Box<dyn ReplicationSource>, CaptureError> {
        let gate = self.0.gate("start_replication", true).await;
        if matches!(gate, Gate::Fault(_) | Gate::Zombie) {
            return Err(disconnected("start replication"));
        }
        let (start, next) = {
            let w = self.0.lock();
            // The server starts at the later of the requested position and the confirmed one.
            let start = from.max(w.confirmed);
            let next = w.wal.partition_point(|t| t.commit_lsn < start);
            (start, next)
        };
        let source = SimSource {
            handle: self.0.clone(),
            next,
            sent_end: start,
            queue: std::collections::VecDeque::new(),
            relations: BTreeMap::new(),
            fresh: true,
        };
        self.0
            .after(
                &gate,
                Box::new(source) as Box<dyn ReplicationSource>,
                || disconnected("start"),
            )
            .await
    }

    async fn table_schema(
        &mut self,
        rel: &Relation,
        _refresh: bool,
    ) -> Result<TableSchema, CaptureError> {
        let gate = self.0.gate("table_schema", true).await;
        if matches!(gate, Gate::Fault(_) | Gate::Zombie) {
            return Err(disconnected("schema query"));
        }
        let schema = TableSchema {
            table: TableName::new(rel.namespace.clone(), rel.name.clone()),
            columns: rel
                .columns
                .iter()
                .map(|c| ColumnSchema {
                    name: c.name.clone(),
                    type_name: if c.type_oid == INT8 { "bigint" } else { "text" }.into(),
                    type_oid: c.type_oid,
                    typmod: c.typmod,
                    key: c.key,
                    base_oid: c.type_oid,
                    element_oid: None,
                })
                .collect(),
        };
        self.0
            .after(&gate, schema, || disconnected("schema reply"))
            .await
    }

    async fn emit_heartbeat(&mut self) -> Result<(), CaptureError> {
        match self.0.gate("emit_heartbeat", true).await {
            Gate::Fault(_) | Gate::Zombie => Err(disconnected("heartbeat")),
            gate => self.0.after(&gate, (), || disconnected("heartbeat")).await,
        }
    }

    async fn slot_status(&mut self, _slot: &str) -> Result<SlotStatus, CaptureError> {
        let gate = self.0.gate("slot_status", false).await;
        if matches!(gate, Gate::Zombie) {
            return Err(disconnected("slot status"));
        }
        let current = self.0.lock().current_lsn();
        self.0
            .after(
                &gate,
                SlotStatus::Present {
                    current,
                    wal_status: "reserved".into(),
                    safe_wal: None,
                },
                || disconnected("slot status"),
            )
            .await
    }
}

/// One simulated replication stream.
pub struct SimSource {
    handle: Handle,
    /// The next transaction to send.
    next: usize,
    /// Everything committed before this was sent (a commit's end, or the start).
    sent_end: Lsn,
    queue: std::collections::VecDeque<Incoming>,
    /// Column counts of the Relation messages sent on this stream.
    relations: BTreeMap<u32, usize>,
    /// Nothing sent yet: the server may take a while (decoding from the slot's restart point).
    fresh: bool,
}

impl SimSource {
    /// Queues transaction `i`'s messages, with Relation messages where this stream has not
    /// described the table at its current columns, and the odd keepalive inside it.
    fn queue_transaction(&mut self, w: &mut World, i: usize) {
        let tx = &w.wal[i];
        let commit_ts = tx.commit_ms * 1000 - PG_EPOCH_OFFSET_MICROS;
        self.queue.push_back(Incoming::Message {
            msg: PgOutput::Begin {
                final_lsn: tx.commit_lsn,
                commit_ts,
                xid: tx.xid,
            },
            wal_start: tx.commit_lsn,
        });
        for change in &tx.changes {
            let (name, oid) = w.tables[change.table].clone();
            if self.relations.get(&oid) != Some(&change.columns) {
                self.relations.insert(oid, change.columns);
                self.queue.push_back(Incoming::Message {
                    msg: PgOutput::Relation(Relation {
                        oid,
                        namespace: name.schema.clone(),
                        name: name.name.clone(),
                        replica_identity: b'd',
                        columns: relation_columns(change.columns),
                    }),
                    wal_start: change.lsn,
                });
            }
            let values: Vec<Value> = change
                .values
                .iter()
                .map(|v| match v {
                    Some(text) => Value::Text(text.clone()),
                    None => Value::Null,
                })
                .collect();
            let msg = match change.op {
                'c' => PgOutput::Insert {
                    rel: oid,
                    new: values,
                },
                'u' => PgOutput::Update {
                    rel: oid,
                    old: None,
                    new: values,
                },
                'd' => PgOutput::Delete {
                    rel: oid,
                    old: Some(OldTuple::Key(values)),
                },
                _ => PgOutput::Truncate {
                    rels: vec![oid],
                    options: 0,
                },
            };
            self.queue.push_back(Incoming::Message {
                msg,
                wal_start: change.lsn,
            });
            if w.rng.random_bool(0.02) {
                // The walsender may send keepalives while it sends a transaction.
                let wal_end = Lsn(w.rng.random_range(self.sent_end.0..=tx.end_lsn.0));
                self.queue.push_back(Incoming::Keepalive {
                    wal_end,
                    reply_requested: w.rng.random_bool(0.3),
                });
            }
        }
        self.queue.push_back(Incoming::Message {
            msg: PgOutput::Commit {
                commit_lsn: tx.commit_lsn,
                end_lsn: tx.end_lsn,
                commit_ts,
            },
            wal_start: tx.end_lsn,
        });
    }
}

#[async_trait]
impl ReplicationSource for SimSource {
    async fn next(&mut self) -> Result<Incoming, CaptureError> {
        let gate = self.handle.gate("next", false).await;
        if matches!(gate, Gate::Zombie) {
            return Err(disconnected(
                "replication stream (the paused task's connection is gone)",
            ));
        }
        let handle = self.handle.clone();
        let (delay, broken) = {
            let mut w = handle.lock();
            let rate = w.break_rate;
            let broken = rate > 0.0 && w.rng.random_bool(rate);
            let delay = if std::mem::take(&mut self.fresh) {
                // A new stream's first bytes come after the server decoded up to the start.
                w.rng.random_bool(0.5).then(|| w.rng.random_range(1..3000))
            } else {
                w.rng.random_bool(0.05).then(|| w.rng.random_range(1..400))
            };
            if self.queue.is_empty() && self.next < w.visible() {
                let i = self.next;
                self.next += 1;
                self.queue_transaction(&mut w, i);
            }
            (delay, broken)
        };
        if broken {
            return Err(disconnected("replication stream broke"));
        }
        if let Some(ms) = delay {
            // The bytes are late.
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let msg = match self.queue.pop_front() {
            Some(msg) => {
                if let Incoming::Message {
                    msg: PgOutput::Commit { end_lsn, .. },
                    ..
                } = &msg
                {
                    self.sent_end = *end_lsn;
                }
                msg
            }
            None => {
                // Nothing to send: a keepalive, at most at the next commit.
                let (wal_end, wait, reply_requested) = {
                    let mut w = self.handle.lock();
                    let ceiling = match w.wal.get(self.next) {
                        Some(t) => t.commit_lsn,
                        None => w.current_lsn(),
                    };
                    let wal_end = Lsn(w
                        .rng
                        .random_range(self.sent_end.0..=ceiling.0.max(self.sent_end.0)));
                    (
                        wal_end,
                        w.rng.random_range(10..1500),
                        w.rng.random_bool(0.5),
                    )
                };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                Incoming::Keepalive {
                    wal_end,
                    reply_requested,
                }
            }
        };
        self.handle.after(&gate, msg, || disconnected("next")).await
    }

    async fn confirm(&mut self, lsn: Lsn) -> Result<(), CaptureError> {
        let gate = self.handle.gate("confirm", false).await;
        if matches!(gate, Gate::Zombie) {
            return Err(disconnected(
                "replication stream (the paused task's connection is gone)",
            ));
        }
        {
            let mut w = self.handle.lock();
            let recorded = w
                .ledger
                .checkpoint
                .as_ref()
                .map(|c| c.lsn)
                .unwrap_or_default();
            if lsn > recorded {
                w.violations.push(format!(
                    "confirmed {lsn} past the ledger's checkpoint {recorded}"
                ));
            }
            if lsn > w.confirmed {
                w.confirmed = lsn;
            }
        }
        self.handle
            .after(&gate, (), || disconnected("confirm"))
            .await
    }
}

/// A change as recorded: its position, and a digest of its table, op and new row image.
pub type Replayed = (Position, u64);

/// The digest of a change's table, op and new row image.
fn digest(table: &str, op: &str, after: &serde_json::Value) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table
        .bytes()
        .chain([b'|'])
        .chain(op.bytes())
        .chain([b'|'])
        .chain(after.to_string().into_bytes())
    {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// A stored batch's events.
fn parse_batch(key: &str, table: &str, data: &[u8], problems: &mut Vec<String>) -> Vec<Replayed> {
    let mut out = Vec::new();
    for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let event: serde_json::Value = match serde_json::from_slice(line) {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("batch {key}: bad line: {e}"));
                continue;
            }
        };
        let commit = event["source"]["commit_lsn"].as_u64().unwrap_or(0);
        let ordinal = event["transaction"]["total_order"].as_u64().unwrap_or(0);
        let op = event["op"].as_str().unwrap_or("");
        out.push((
            Position::new(Lsn(commit), ordinal as u32),
            digest(table, op, &event["after"]),
        ));
    }
    out
}

impl World {
    /// The events of every batch whose flush is recorded, read back from the store; a missing
    /// or unreadable object is a violation.
    pub fn replay(&mut self) -> Vec<Replayed> {
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for batch in self.ledger.batches.values() {
            let id: FlushId = batch.flush_id;
            if !self.ledger.flushes.contains_key(&(id.seq, id.epoch)) {
                continue; // an orphan: its flush never committed
            }
            let Some(data) = self.objects.get(&batch.key) else {
                problems.push(format!("batch {} is recorded but not stored", batch.key));
                continue;
            };
            if self
                .parsed
                .get(&batch.key)
                .is_none_or(|(len, _)| *len != data.len())
            {
                let events = parse_batch(&batch.key, &batch.table.to_string(), data, &mut problems);
                self.parsed.insert(batch.key.clone(), (data.len(), events));
            }
            let events = self
                .parsed
                .get(&batch.key)
                .map(|(_, e)| e.as_slice())
                .unwrap_or(&[]);
            for event in events {
                if event.0 < batch.first || event.0 > batch.last {
                    problems.push(format!(
                        "batch {}: event {} outside its range",
                        batch.key,
                        event.0.key()
                    ));
                }
                out.push(*event);
            }
            if events.len() as u64 != batch.rows {
                problems.push(format!(
                    "batch {} records {} rows but holds {}",
                    batch.key,
                    batch.rows,
                    events.len()
                ));
            }
        }
        self.violations.extend(problems);
        out.sort_by_key(|e| e.0);
        out
    }

    /// Every committed change of the WAL as the capture must record it.
    pub fn expected(&self) -> Vec<Replayed> {
        let mut out = Vec::new();
        for tx in &self.wal {
            for (i, change) in tx.changes.iter().enumerate() {
                let (table, _) = &self.tables[change.table];
                let after = match change.op {
                    'c' | 'u' => {
                        let mut row = serde_json::Map::new();
                        for (c, col) in relation_columns(change.columns).iter().enumerate() {
                            let text = change
                                .values
                                .get(c)
                                .cloned()
                                .flatten()
                                .map(|v| String::from_utf8_lossy(&v).into_owned());
                            let value = match text {
                                None => serde_json::Value::Null,
                                Some(v) if c == 0 => {
                                    serde_json::Value::from(v.parse::<i64>().unwrap_or_default())
                                }
                                Some(v) => serde_json::Value::from(v),
                            };
                            row.insert(col.name.clone(), value);
                        }
                        serde_json::Value::Object(row)
                    }
                    _ => serde_json::Value::Null,
                };
                out.push((
                    Position::new(tx.commit_lsn, i as u32 + 1),
                    digest(&table.to_string(), &change.op.to_string(), &after),
                ));
            }
        }
        out
    }
}
