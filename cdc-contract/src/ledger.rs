//! The DynamoDB ledger's item layouts. One table, string keys `pk` and `sk`.
//!
//! The registry (`pk = slots`, `sk = {slot}`) names every slot.
//!
//! Per slot (`pk = slot#{slot}`): the [`Lease`] (`sk = lease`), the [`Checkpoint`]
//! (`sk = checkpoint`), the [`SnapshotState`] (`sk = snapshot`) and one [`FlushRecord`] per
//! committed flush (`sk = flush#{flush id}`).
//!
//! Per table-hour (`pk = batch#{slot}#{schema.table}#{hour}`): one [`BatchItem`] per staged
//! micro-batch, `sk = {first}-{last}#{flush id}`, so items sort by position. A batch item counts only
//! once the flush record that names its flush id exists: the capture writes batch items first, then
//! commits the flush record and the checkpoint in one conditional transaction. A batch item whose
//! flush record is missing while the checkpoint's flush sequence is at or past the item's is an
//! orphan of a flush that never committed and is never compacted.
//!
//! Per slot (`pk = pending#{slot}`): one [`PendingHour`] marker per table-hour with batches not yet
//! compacted, `sk = {hour}#{schema.table}`, so closed hours are found with one key-range query.
//!
//! Per table (`pk = schema#{slot}#{schema.table}`): one [`SchemaItem`] per schema version,
//! `sk = {version id}`.
//!
//! Per table-hour (`pk = hour#{slot}#{schema.table}`, `sk = {hour}`): the compactor's
//! [`HourRecord`] (claim, version, the `compacted_through` watermark) and
//! (`pk = part#{slot}#{schema.table}#{hour}`, `sk = {NNN}`) one [`PartItem`] per recorded part.
//! A batch is consumed once its last change is at or below the watermark; the compactor then
//! marks its item `compacted` with a TTL.
//!
//! Items that expire carry the TTL attribute [`TTL_ATTRIBUTE`] (seconds since the epoch).

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use serde::{Deserialize, Serialize};

use crate::{Hour, Lsn, Position, TableName};

/// Partition key attribute.
pub const PK: &str = "pk";
/// Sort key attribute.
pub const SK: &str = "sk";
/// The TTL attribute (epoch seconds) of items that expire.
pub const TTL_ATTRIBUTE: &str = "expires_at";

/// A DynamoDB item.
pub type Item = HashMap<String, AttributeValue>;

/// An item that does not have the layout this module describes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("ledger item {pk}/{sk}: attribute {attribute} is missing or malformed")]
pub struct ItemError {
    /// The item's partition key.
    pub pk: String,
    /// The item's sort key.
    pub sk: String,
    /// The attribute at fault.
    pub attribute: String,
}

/// Reads typed attributes out of an item, naming the attribute when one is wrong.
pub struct ItemReader<'a> {
    item: &'a Item,
}

impl<'a> ItemReader<'a> {
    /// A reader over `item`.
    pub fn new(item: &'a Item) -> Self {
        Self { item }
    }

    fn error(&self, attribute: &str) -> ItemError {
        let key = |k: &str| {
            self.item
                .get(k)
                .and_then(|v| v.as_s().ok())
                .cloned()
                .unwrap_or_default()
        };
        ItemError {
            pk: key(PK),
            sk: key(SK),
            attribute: attribute.to_owned(),
        }
    }

    /// A string attribute.
    pub fn s(&self, name: &str) -> Result<&'a str, ItemError> {
        self.item
            .get(name)
            .and_then(|v| v.as_s().ok())
            .map(String::as_str)
            .ok_or_else(|| self.error(name))
    }

    /// An optional string attribute.
    pub fn s_opt(&self, name: &str) -> Option<&'a str> {
        self.item
            .get(name)
            .and_then(|v| v.as_s().ok())
            .map(String::as_str)
    }

    /// A number attribute.
    pub fn n<T: std::str::FromStr>(&self, name: &str) -> Result<T, ItemError> {
        self.item
            .get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| self.error(name))
    }

    /// An optional number attribute.
    pub fn n_opt<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, ItemError> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(_) => self.n(name).map(Some),
        }
    }

    /// A list of strings.
    pub fn ss_list(&self, name: &str) -> Result<Vec<String>, ItemError> {
        match self.item.get(name) {
            None => Ok(Vec::new()),
            Some(AttributeValue::L(list)) => list
                .iter()
                .map(|v| v.as_s().cloned().map_err(|_| self.error(name)))
                .collect(),
            Some(_) => Err(self.error(name)),
        }
    }

    /// A string attribute parsed with `FromStr`.
    pub fn parsed<T: std::str::FromStr>(&self, name: &str) -> Result<T, ItemError> {
        self.s(name)?.parse().map_err(|_| self.error(name))
    }
}

/// A string attribute value.
pub fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// A number attribute value.
pub fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The key of an item.
pub fn key(pk: String, sk: String) -> Item {
    HashMap::from([(PK.to_owned(), s(pk)), (SK.to_owned(), s(sk))])
}

/// `slot#{slot}`: the slot's own items (lease, checkpoint, snapshot, flush records).
pub fn slot_pk(slot: &str) -> String {
    format!("slot#{slot}")
}

/// `slots`: the registry of slots (`sk = {slot}`, attributes `slot`, `created_ms`), written by each
/// capture at start, so the compactor finds every slot by key.
pub const SLOTS_PK: &str = "slots";

/// Sort key of the lease.
pub const LEASE_SK: &str = "lease";
/// Sort key of the checkpoint.
pub const CHECKPOINT_SK: &str = "checkpoint";
/// Sort key of the snapshot state.
pub const SNAPSHOT_SK: &str = "snapshot";

/// `flush#{flush id}`.
pub fn flush_sk(flush_id: &FlushId) -> String {
    format!("flush#{flush_id}")
}

/// `batch#{slot}#{schema.table}#{hour}`: the batch items of one table-hour.
pub fn batch_pk(slot: &str, table: &TableName, hour: Hour) -> String {
    format!("batch#{slot}#{table}#{hour}")
}

/// `{first}-{last}#{flush id}`.
pub fn batch_sk(first: Position, last: Position, flush_id: &FlushId) -> String {
    format!("{}-{}#{flush_id}", first.key(), last.key())
}

/// `pending#{slot}`: the pending table-hour markers of a slot.
pub fn pending_pk(slot: &str) -> String {
    format!("pending#{slot}")
}

/// `{hour}#{schema.table}`: sorts by hour, so every hour before H is `sk < "{H}"`.
pub fn pending_sk(hour: Hour, table: &TableName) -> String {
    format!("{hour}#{table}")
}

/// `schema#{slot}#{schema.table}`.
pub fn schema_pk(slot: &str, table: &TableName) -> String {
    format!("schema#{slot}#{table}")
}

/// `hour#{slot}#{schema.table}`: the compactor's hour records of a table, `sk = {hour}`.
pub fn hour_pk(slot: &str, table: &TableName) -> String {
    format!("hour#{slot}#{table}")
}

/// `part#{slot}#{schema.table}#{hour}`: the parts of one compacted hour, `sk = {NNN}`.
pub fn part_pk(slot: &str, table: &TableName, hour: Hour) -> String {
    format!("part#{slot}#{table}#{hour}")
}

/// A flush's id: its sequence number in the slot and the lease epoch of the task that made it.
/// Unique: a sequence number is committed at most once, and one epoch has one writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlushId {
    /// Position in the slot's chain of flushes (the checkpoint holds the last committed one).
    pub seq: u64,
    /// The writer's lease epoch.
    pub epoch: u64,
}

impl std::fmt::Display for FlushId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:012}-{}", self.seq, self.epoch)
    }
}

impl std::str::FromStr for FlushId {
    type Err = crate::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || crate::ParseError::new("flush id", s);
        let (seq, epoch) = s.split_once('-').ok_or_else(err)?;
        Ok(FlushId {
            seq: seq.parse().map_err(|_| err())?,
            epoch: epoch.parse().map_err(|_| err())?,
        })
    }
}

/// A slot's registration (`pk = slots`, `sk = {slot}`): how the compactor finds every slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRegistration {
    /// The slot.
    pub slot: String,
    /// When it was registered (ms since the epoch).
    pub created_ms: i64,
}

impl SlotRegistration {
    /// The full item.
    pub fn to_item(&self) -> Item {
        let mut item = key(SLOTS_PK.into(), self.slot.clone());
        item.insert("slot".to_owned(), s(self.slot.clone()));
        item.insert("created_ms".to_owned(), n(self.created_ms));
        item
    }

    /// Reads a registration (the slot from the sort key, which every version wrote).
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(SlotRegistration {
            slot: r.s(SK)?.to_owned(),
            created_ms: r.n_opt("created_ms")?.unwrap_or(0),
        })
    }
}

/// The slot's lease: one writer at a time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The holder's id (unique per capture process).
    pub owner: String,
    /// Incremented by every acquisition; every ledger write is conditional on it.
    pub epoch: u64,
    /// Expiry, ms since the epoch; the holder renews before it.
    pub expires_ms: i64,
}

impl Lease {
    /// Reads a lease item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(Lease {
            owner: r.s("owner")?.to_owned(),
            epoch: r.n("epoch")?,
            expires_ms: r.n("expires_ms")?,
        })
    }

    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(slot_pk(slot), LEASE_SK.into());
        item.extend([
            ("owner".to_owned(), s(self.owner.clone())),
            ("epoch".to_owned(), n(self.epoch)),
            ("expires_ms".to_owned(), n(self.expires_ms)),
        ]);
        item
    }
}

/// Where the slot's recorded changes end.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// End LSN of the last commit whose changes are all recorded. Replication restarts here and
    /// every change at or below it is dropped.
    pub lsn: Lsn,
    /// Inside a transaction larger than a batch: the last recorded change. Its transaction's
    /// later changes are still to come; earlier ones are recorded.
    pub partial: Option<Position>,
    /// Commit time of the last recorded transaction (ms since the epoch).
    pub commit_ms: i64,
    /// When the capture was last known caught up with the server (ms since the epoch).
    pub caught_up_ms: Option<i64>,
    /// Sequence number of the last committed flush.
    pub flush_seq: u64,
    /// Id of the last committed flush (empty before the first).
    pub flush_id: String,
    /// The backfill's progress as of this checkpoint (None: recorded before backfills were
    /// kept here). Recorded in the same write as the rows it counts, so it is never ahead of
    /// them and never behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backfill: Option<Backfill>,
    /// The server timeline `lsn` is on (None: recorded before timelines were kept). After a
    /// failover the capture goes on only when `lsn` is on the promoted server's history.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
}

/// What the chunked backfill has read and has still to read.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Backfill {
    /// Tables still to read, in order; the first is the one being read.
    pub pending: Vec<TableProgress>,
    /// Captured tables read completely, or known when no snapshot was asked for: a table of
    /// neither list is new to the capture.
    pub known: Vec<TableName>,
    /// Sort keys of the backfill requests taken (recorded with the progress they asked for):
    /// a request listed here is not taken again, and is deleted once recorded. An entry goes
    /// when its request is no longer in the ledger.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taken: Vec<String>,
}

/// One table's backfill progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableProgress {
    /// The table.
    pub table: TableName,
    /// The key of the last row recorded, as its columns' text (None: nothing read yet); the
    /// next chunk starts after it.
    pub after: Option<Vec<Option<String>>>,
    /// The ordering key's column names `after` is in (empty: nothing read yet). A read that
    /// finds another ordering key (the replica identity changed) starts the table again from
    /// its first key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key: Vec<String>,
    /// Rows recorded.
    pub rows: u64,
    /// Chunks recorded.
    pub chunks: u64,
    /// When the table's backfill was asked for (ms since the epoch).
    pub requested_ms: i64,
    /// The table has no key (no primary key, no replica identity index): it is read in one
    /// chunk, and its streamed changes are held until that chunk is placed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keyless: bool,
}

impl TableProgress {
    /// A table whose backfill starts from its first key.
    pub fn new(table: TableName, requested_ms: i64) -> Self {
        TableProgress {
            table,
            after: None,
            key: Vec::new(),
            rows: 0,
            chunks: 0,
            requested_ms,
            keyless: false,
        }
    }
}

impl Backfill {
    /// True when `table` is read, known, or waiting to be read.
    pub fn knows(&self, table: &TableName) -> bool {
        self.known.contains(table) || self.pending.iter().any(|p| &p.table == table)
    }

    /// Asks for `table` to be read (again, from its first key, if it is read already or being
    /// read); false when it is already waiting from its first key.
    pub fn request(&mut self, table: &TableName, now_ms: i64) -> bool {
        if let Some(p) = self.pending.iter_mut().find(|p| &p.table == table) {
            if p.after.is_none() {
                return false;
            }
            *p = TableProgress::new(table.clone(), now_ms);
            return true;
        }
        self.known.retain(|t| t != table);
        self.pending.push(TableProgress::new(table.clone(), now_ms));
        true
    }

    /// Records that `table` is read completely.
    pub fn finish(&mut self, table: &TableName) {
        self.pending.retain(|p| &p.table != table);
        if !self.known.contains(table) {
            self.known.push(table.clone());
        }
    }
}

/// Sort key prefix of the backfill requests ([`backfill_request_sk`]).
pub const BACKFILL_REQUEST_PREFIX: &str = "backfill-request#";

/// What a backfill request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackfillRequest {
    /// The initial snapshot, written before the capture creates its slot: every captured
    /// table, tables without a key included.
    Initial,
    /// Every captured table again (an operator's `*`, or a recreated slot).
    All,
    /// One table.
    Table(TableName),
}

/// Sort key of a request to backfill while the capture runs: `backfill-request#{id}#{what}`,
/// `id` unique per request (nanoseconds since the epoch, zero-padded so requests list in the
/// order they were made) and `what` one of `!initial`, `*` or `schema.table`. The running
/// capture records the request's sort key in its checkpoint with the progress it makes
/// (`Backfill::taken`), so a request is taken once, then deletes it.
pub fn backfill_request_sk(which: &BackfillRequest, id: u64) -> String {
    let what = match which {
        BackfillRequest::Initial => "!initial".to_owned(),
        BackfillRequest::All => "*".to_owned(),
        BackfillRequest::Table(t) => t.to_string(),
    };
    format!("{BACKFILL_REQUEST_PREFIX}{id:020}#{what}")
}

/// What a backfill request's sort key asks for.
pub fn parse_backfill_request_sk(sk: &str) -> Option<BackfillRequest> {
    let rest = sk.strip_prefix(BACKFILL_REQUEST_PREFIX)?;
    let (id, what) = rest.split_once('#')?;
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    match what {
        "!initial" => Some(BackfillRequest::Initial),
        "*" => Some(BackfillRequest::All),
        name => name.parse().ok().map(BackfillRequest::Table),
    }
}

impl Checkpoint {
    /// Reads a checkpoint item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        let partial = match r.s_opt("partial") {
            None | Some("") => None,
            Some(p) => Some(p.parse().map_err(|_| r.error("partial"))?),
        };
        Ok(Checkpoint {
            lsn: Lsn::from_key(r.s("lsn")?).map_err(|_| r.error("lsn"))?,
            partial,
            commit_ms: r.n("commit_ms")?,
            caught_up_ms: r.n_opt("caught_up_ms")?,
            flush_seq: r.n("flush_seq")?,
            flush_id: r.s_opt("flush_id").unwrap_or_default().to_owned(),
            backfill: match r.s_opt("backfill") {
                None | Some("") => None,
                Some(text) => Some(serde_json::from_str(text).map_err(|_| r.error("backfill"))?),
            },
            timeline: r.n_opt("timeline")?,
        })
    }

    /// The checkpoint's attributes (without the key).
    pub fn attributes(&self) -> Item {
        let mut item = HashMap::from([
            ("lsn".to_owned(), s(self.lsn.key())),
            (
                "partial".to_owned(),
                s(self.partial.map(|p| p.key()).unwrap_or_default()),
            ),
            ("commit_ms".to_owned(), n(self.commit_ms)),
            ("flush_seq".to_owned(), n(self.flush_seq)),
            ("flush_id".to_owned(), s(self.flush_id.clone())),
        ]);
        if let Some(c) = self.caught_up_ms {
            item.insert("caught_up_ms".to_owned(), n(c));
        }
        if let Some(t) = self.timeline {
            item.insert("timeline".to_owned(), n(t));
        }
        if let Some(b) = &self.backfill {
            // Serializing plain strings and numbers cannot fail.
            item.insert(
                "backfill".to_owned(),
                s(serde_json::to_string(b).unwrap_or_default()),
            );
        }
        item
    }

    /// The full item, as written by the flush of lease `epoch` at `updated_ms`.
    pub fn to_item(&self, slot: &str, epoch: u64, updated_ms: i64) -> Item {
        let mut item = key(slot_pk(slot), CHECKPOINT_SK.into());
        item.extend(self.attributes());
        item.insert("epoch".to_owned(), n(epoch));
        item.insert("updated_ms".to_owned(), n(updated_ms));
        item
    }

    /// True when a change at `pos` is already recorded and must be dropped on resume.
    pub fn covers(&self, pos: Position) -> bool {
        // `lsn` is a commit's end: every transaction committed before it has a smaller commit LSN.
        pos.commit_lsn < self.lsn || self.partial.is_some_and(|p| pos <= p)
    }

    /// The time up to which the slot's hours may close: the later of the last commit and the
    /// last time the capture was caught up.
    pub fn closing_ms(&self) -> i64 {
        self.commit_ms.max(self.caught_up_ms.unwrap_or(0))
    }
}

/// A committed flush: exists only if its transaction committed; it validates its batch items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlushRecord {
    /// The flush.
    pub id: FlushId,
    /// The table-hours it added batches to, as `{hour}#{schema.table}` (pending markers' sort keys).
    pub hours: Vec<String>,
    /// When it was committed (ms since the epoch).
    pub created_ms: i64,
    /// The checkpoint it recorded (its LSN).
    pub lsn: Lsn,
    /// When DynamoDB may delete it ([`TTL_ATTRIBUTE`], s since the epoch): a record that
    /// validates no batch only needs to outlive a lost reply's retry.
    pub expires_at: Option<i64>,
}

impl FlushRecord {
    /// Reads a flush record.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(FlushRecord {
            id: FlushId {
                seq: r.n("seq")?,
                epoch: r.n("epoch")?,
            },
            hours: r.ss_list("hours")?,
            created_ms: r.n("created_ms")?,
            lsn: match r.s_opt("lsn") {
                Some(l) => Lsn::from_key(l).map_err(|_| r.error("lsn"))?,
                None => Lsn::ZERO,
            },
            expires_at: r.n_opt(TTL_ATTRIBUTE)?,
        })
    }

    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(slot_pk(slot), flush_sk(&self.id));
        item.extend([
            ("seq".to_owned(), n(self.id.seq)),
            ("epoch".to_owned(), n(self.id.epoch)),
            ("created_ms".to_owned(), n(self.created_ms)),
            ("lsn".to_owned(), s(self.lsn.key())),
            (
                "hours".to_owned(),
                AttributeValue::L(self.hours.iter().map(|h| s(h.clone())).collect()),
            ),
        ]);
        if let Some(at) = self.expires_at {
            item.insert(TTL_ATTRIBUTE.to_owned(), n(at));
        }
        item
    }
}

/// One staged micro-batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchItem {
    /// The table.
    pub table: TableName,
    /// The UTC hour of its commits.
    pub hour: Hour,
    /// The staging object's S3 key.
    pub key: String,
    /// First change.
    pub first: Position,
    /// Last change.
    pub last: Position,
    /// Number of changes.
    pub rows: u64,
    /// Gzipped size.
    pub bytes: u64,
    /// Commit time of the first change (ms).
    pub first_commit_ms: i64,
    /// Commit time of the last change (ms).
    pub last_commit_ms: i64,
    /// Version id of the table schema its rows follow ([`crate::schema::TableSchema::version_id`]).
    pub schema_id: String,
    /// The flush that recorded it.
    pub flush_id: FlushId,
    /// Set by the compactor once the batch's rows are in recorded final parts.
    pub compacted: bool,
}

impl BatchItem {
    /// The item's partition key.
    pub fn pk(&self, slot: &str) -> String {
        batch_pk(slot, &self.table, self.hour)
    }

    /// The item's sort key.
    pub fn sk(&self) -> String {
        batch_sk(self.first, self.last, &self.flush_id)
    }

    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(self.pk(slot), self.sk());
        item.extend([
            ("table".to_owned(), s(self.table.to_string())),
            ("hour".to_owned(), s(self.hour.to_string())),
            ("key".to_owned(), s(self.key.clone())),
            ("first".to_owned(), s(self.first.key())),
            ("last".to_owned(), s(self.last.key())),
            ("rows".to_owned(), n(self.rows)),
            ("bytes".to_owned(), n(self.bytes)),
            ("first_commit_ms".to_owned(), n(self.first_commit_ms)),
            ("last_commit_ms".to_owned(), n(self.last_commit_ms)),
            ("schema_id".to_owned(), s(self.schema_id.clone())),
            ("flush_id".to_owned(), s(self.flush_id.to_string())),
            ("flush_seq".to_owned(), n(self.flush_id.seq)),
            ("compacted".to_owned(), AttributeValue::Bool(self.compacted)),
        ]);
        item
    }

    /// Reads a batch item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(BatchItem {
            table: r.parsed("table")?,
            hour: r.parsed("hour")?,
            key: r.s("key")?.to_owned(),
            first: r.parsed("first")?,
            last: r.parsed("last")?,
            rows: r.n("rows")?,
            bytes: r.n("bytes")?,
            first_commit_ms: r.n("first_commit_ms")?,
            last_commit_ms: r.n("last_commit_ms")?,
            schema_id: r.s("schema_id")?.to_owned(),
            flush_id: r.parsed("flush_id")?,
            compacted: item
                .get("compacted")
                .and_then(|v| v.as_bool().ok())
                .copied()
                .unwrap_or(false),
        })
    }
}

/// A table-hour with batches not yet compacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingHour {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
    /// The last flush that added batches to it; the compactor removes the marker only if this is
    /// still the value it saw (a later flush keeps the marker alive).
    pub flush_seq: u64,
}

impl PendingHour {
    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(pending_pk(slot), pending_sk(self.hour, &self.table));
        item.extend([
            ("table".to_owned(), s(self.table.to_string())),
            ("hour".to_owned(), s(self.hour.to_string())),
            ("flush_seq".to_owned(), n(self.flush_seq)),
        ]);
        item
    }

    /// Reads a pending marker.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(PendingHour {
            table: r.parsed("table")?,
            hour: r.parsed("hour")?,
            flush_seq: r.n("flush_seq")?,
        })
    }
}

/// A schema version of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaItem {
    /// The schema.
    pub schema: crate::schema::TableSchema,
}

impl SchemaItem {
    /// The full item (`columns` holds the schema as JSON).
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(
            schema_pk(slot, &self.schema.table),
            self.schema.version_id(),
        );
        let json = serde_json::to_string(&self.schema).unwrap_or_default();
        item.insert("schema".to_owned(), s(json));
        item
    }

    /// Reads a schema item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        let schema = serde_json::from_str(r.s("schema")?).map_err(|_| r.error("schema"))?;
        Ok(SchemaItem { schema })
    }
}

/// Sort key of an hour record: the hour (`2025-01-08T10`).
pub fn hour_sk(hour: Hour) -> String {
    hour.to_string()
}

/// Sort key of a part item: the part number, zero-padded to three digits (`007`).
pub fn part_sk(part: u32) -> String {
    format!("{part:03}")
}

/// The compactor's record of one table-hour (`pk = hour#{slot}#{schema.table}`, `sk = {hour}`).
///
/// Every change to it is conditional on [`HourRecord::version`]: a compactor claims the hour by
/// bumping the version, and records each part in one transaction that puts the [`PartItem`] and
/// bumps the version again, so two invocations of one hour can never both record a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HourRecord {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
    /// Bumped by every claim, every recorded part and every raise of the watermark.
    pub version: u64,
    /// The last change written to a recorded part, or the last change of the batches an attempt
    /// read whole past it (their last lines, or whole objects, stored as dead letters): every
    /// valid batch whose last change is at or below it is consumed; later batches (late ones
    /// too) become new parts.
    pub compacted_through: Option<Position>,
    /// The number the next part gets.
    pub next_part: u32,
    /// Changes in recorded parts.
    pub rows: u64,
    /// Bytes of recorded parts, every format.
    pub bytes: u64,
    /// The attempt that holds the hour (empty when none ever did).
    pub claim_attempt: String,
    /// Until when the claim holds (ms since the epoch); 0 once released cleanly. A claim that
    /// expired without release means its attempt may have left unrecorded files behind.
    pub claim_until_ms: i64,
    /// Last change (ms since the epoch).
    pub updated_ms: i64,
    /// When an attempt cleaned up after one whose claim lapsed, that attempt may still be alive
    /// and complete an upload later: the hour's prefixes are listed again once this time has
    /// passed (ms since the epoch; 0: nothing to recheck).
    pub recheck_after_ms: i64,
}

impl HourRecord {
    /// A record for an hour never compacted before (version 0; not stored yet).
    pub fn new(table: TableName, hour: Hour) -> Self {
        HourRecord {
            table,
            hour,
            version: 0,
            compacted_through: None,
            next_part: 0,
            rows: 0,
            bytes: 0,
            claim_attempt: String::new(),
            claim_until_ms: 0,
            updated_ms: 0,
            recheck_after_ms: 0,
        }
    }

    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(hour_pk(slot, &self.table), hour_sk(self.hour));
        item.extend([
            ("table".to_owned(), s(self.table.to_string())),
            ("hour".to_owned(), s(self.hour.to_string())),
            ("version".to_owned(), n(self.version)),
            (
                "compacted_through".to_owned(),
                s(self.compacted_through.map(|p| p.key()).unwrap_or_default()),
            ),
            ("next_part".to_owned(), n(self.next_part)),
            ("rows".to_owned(), n(self.rows)),
            ("bytes".to_owned(), n(self.bytes)),
            ("claim_attempt".to_owned(), s(self.claim_attempt.clone())),
            ("claim_until_ms".to_owned(), n(self.claim_until_ms)),
            ("updated_ms".to_owned(), n(self.updated_ms)),
            ("recheck_after_ms".to_owned(), n(self.recheck_after_ms)),
        ]);
        item
    }

    /// Reads an hour record.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        let compacted_through = match r.s_opt("compacted_through") {
            None | Some("") => None,
            Some(p) => Some(p.parse().map_err(|_| r.error("compacted_through"))?),
        };
        Ok(HourRecord {
            table: r.parsed("table")?,
            hour: r.parsed("hour")?,
            version: r.n("version")?,
            compacted_through,
            next_part: r.n("next_part")?,
            rows: r.n("rows")?,
            bytes: r.n("bytes")?,
            claim_attempt: r.s_opt("claim_attempt").unwrap_or_default().to_owned(),
            claim_until_ms: r.n_opt("claim_until_ms")?.unwrap_or(0),
            updated_ms: r.n_opt("updated_ms")?.unwrap_or(0),
            recheck_after_ms: r.n_opt("recheck_after_ms")?.unwrap_or(0),
        })
    }
}

/// One final file of a part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartFile {
    /// Its format.
    pub format: crate::layout::Format,
    /// Its S3 key ([`crate::layout::Layout::part_key`]).
    pub key: String,
    /// Its size.
    pub bytes: u64,
}

/// A recorded part of a compacted hour (`pk = part#{slot}#{schema.table}#{hour}`,
/// `sk = {NNN}`): the same changes in every configured format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartItem {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
    /// The part number.
    pub part: u32,
    /// The compaction attempt that wrote its files (part of each file name).
    pub attempt: String,
    /// Number of changes.
    pub rows: u64,
    /// First change.
    pub first: Position,
    /// Last change.
    pub last: Position,
    /// Commit time of the first change (ms).
    pub first_commit_ms: i64,
    /// Commit time of the last change (ms).
    pub last_commit_ms: i64,
    /// The schema version its Parquet file follows.
    pub schema_id: String,
    /// Its files, one per format.
    pub files: Vec<PartFile>,
    /// When it was recorded (ms since the epoch).
    pub created_ms: i64,
}

impl PartItem {
    /// The full item (`files` is a map from format to `{key, bytes}`).
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(part_pk(slot, &self.table, self.hour), part_sk(self.part));
        let files = self
            .files
            .iter()
            .map(|f| {
                (
                    f.format.dir().to_owned(),
                    AttributeValue::M(HashMap::from([
                        ("key".to_owned(), s(f.key.clone())),
                        ("bytes".to_owned(), n(f.bytes)),
                    ])),
                )
            })
            .collect();
        item.extend([
            ("table".to_owned(), s(self.table.to_string())),
            ("hour".to_owned(), s(self.hour.to_string())),
            ("part".to_owned(), n(self.part)),
            ("attempt".to_owned(), s(self.attempt.clone())),
            ("rows".to_owned(), n(self.rows)),
            ("first".to_owned(), s(self.first.key())),
            ("last".to_owned(), s(self.last.key())),
            ("first_commit_ms".to_owned(), n(self.first_commit_ms)),
            ("last_commit_ms".to_owned(), n(self.last_commit_ms)),
            ("schema_id".to_owned(), s(self.schema_id.clone())),
            ("files".to_owned(), AttributeValue::M(files)),
            ("created_ms".to_owned(), n(self.created_ms)),
        ]);
        item
    }

    /// Reads a part item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        let files_map = item
            .get("files")
            .and_then(|v| v.as_m().ok())
            .ok_or_else(|| r.error("files"))?;
        let mut files = Vec::with_capacity(files_map.len());
        for (format, file) in files_map {
            let file = file.as_m().map_err(|_| r.error("files"))?;
            let fr = ItemReader::new(file);
            files.push(PartFile {
                format: format.parse().map_err(|_| r.error("files"))?,
                key: fr.s("key").map_err(|_| r.error("files"))?.to_owned(),
                bytes: fr.n("bytes").map_err(|_| r.error("files"))?,
            });
        }
        files.sort_by_key(|f| f.format);
        Ok(PartItem {
            table: r.parsed("table")?,
            hour: r.parsed("hour")?,
            part: r.n("part")?,
            attempt: r.s("attempt")?.to_owned(),
            rows: r.n("rows")?,
            first: r.parsed("first")?,
            last: r.parsed("last")?,
            first_commit_ms: r.n("first_commit_ms")?,
            last_commit_ms: r.n("last_commit_ms")?,
            schema_id: r.s("schema_id")?.to_owned(),
            files,
            created_ms: r.n("created_ms")?,
        })
    }
}

/// State of the slot's initial snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotState {
    /// True once every snapshot row is recorded.
    pub complete: bool,
    /// The slot's consistent point: every transaction committed before it is in the snapshot,
    /// every later one is streamed.
    pub consistent_lsn: Lsn,
    /// Snapshot start time (ms): the commit time of every snapshot row.
    pub started_ms: i64,
}

/// The commit LSN of the snapshot rows of a slot whose consistent point is `consistent`: one
/// below it. A transaction whose commit record starts exactly at the consistent point is
/// streamed with that commit LSN, so rows keyed at the point itself could share order keys
/// with it; one below, no streamed key can (every streamed commit LSN is at or above the point).
pub fn snapshot_rows_lsn(consistent: Lsn) -> Lsn {
    Lsn(consistent.0.saturating_sub(1))
}

impl SnapshotState {
    /// The commit LSN of this snapshot's rows ([`snapshot_rows_lsn`]).
    pub fn rows_lsn(&self) -> Lsn {
        snapshot_rows_lsn(self.consistent_lsn)
    }

    /// True when a batch from `first` to `last` holds only this snapshot's rows: at
    /// [`SnapshotState::rows_lsn`], or at the consistent point itself as earlier versions keyed
    /// them (only while the snapshot is incomplete, when nothing is streamed yet).
    pub fn holds(&self, first: Position, last: Position) -> bool {
        let rows = self.rows_lsn();
        (first.commit_lsn == rows && last.commit_lsn == rows)
            || (!self.complete
                && first.commit_lsn == self.consistent_lsn
                && last.commit_lsn == self.consistent_lsn)
    }

    /// Reads a snapshot state item.
    pub fn from_item(item: &Item) -> Result<Self, ItemError> {
        let r = ItemReader::new(item);
        Ok(SnapshotState {
            complete: r.s("state")? == "complete",
            consistent_lsn: Lsn::from_key(r.s("consistent_lsn")?)
                .map_err(|_| r.error("consistent_lsn"))?,
            started_ms: r.n("started_ms")?,
        })
    }

    /// The snapshot state's attributes (without the key).
    pub fn attributes(&self) -> Item {
        HashMap::from([
            (
                "state".to_owned(),
                s(if self.complete { "complete" } else { "running" }),
            ),
            ("consistent_lsn".to_owned(), s(self.consistent_lsn.key())),
            ("started_ms".to_owned(), n(self.started_ms)),
        ])
    }

    /// The full item.
    pub fn to_item(&self, slot: &str) -> Item {
        let mut item = key(slot_pk(slot), SNAPSHOT_SK.into());
        item.extend(self.attributes());
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch() -> BatchItem {
        BatchItem {
            table: TableName::new("public", "users"),
            hour: "2025-01-08T10".parse().unwrap(),
            key: "_staging/x.jsonl.gz".into(),
            first: Position::new(Lsn(10), 1),
            last: Position::new(Lsn(20), 3),
            rows: 4,
            bytes: 99,
            first_commit_ms: 1,
            last_commit_ms: 2,
            schema_id: "00ff".into(),
            flush_id: FlushId { seq: 7, epoch: 2 },
            compacted: false,
        }
    }

    #[test]
    fn batch_items_round_trip_and_sort_by_position() {
        let b = batch();
        let item = b.to_item("s1");
        assert_eq!(BatchItem::from_item(&item).unwrap(), b);
        assert_eq!(
            item[PK].as_s().unwrap(),
            "batch#s1#public.users#2025-01-08T10"
        );
        assert_eq!(
            item[SK].as_s().unwrap(),
            "000000000000000A.00000001-0000000000000014.00000003#000000000007-2"
        );
    }

    #[test]
    fn malformed_items_name_the_attribute() {
        let mut item = batch().to_item("s1");
        item.insert("rows".into(), s("many"));
        let err = BatchItem::from_item(&item).unwrap_err();
        assert_eq!(err.attribute, "rows");
    }

    #[test]
    fn checkpoint_covers_what_is_recorded() {
        let cp = Checkpoint {
            lsn: Lsn(100),
            ..Default::default()
        };
        assert!(cp.covers(Position::new(Lsn(99), 5)));
        assert!(!cp.covers(Position::new(Lsn(100), 1)));
        assert!(!cp.covers(Position::new(Lsn(101), 1)));
        let partial = Checkpoint {
            lsn: Lsn(100),
            partial: Some(Position::new(Lsn(200), 10)),
            ..Default::default()
        };
        assert!(partial.covers(Position::new(Lsn(200), 10)));
        assert!(!partial.covers(Position::new(Lsn(200), 11)));
        assert!(partial.covers(Position::new(Lsn(100), 3)));
        assert!(!Checkpoint::default().covers(Position::new(Lsn(1), 1)));
        let round = Checkpoint::from_item(&partial.attributes()).unwrap();
        assert_eq!(round, partial);
    }

    #[test]
    fn hour_records_and_parts_round_trip() {
        let table = TableName::new("public", "users");
        let hour: Hour = "2025-01-08T10".parse().unwrap();
        let mut rec = HourRecord::new(table.clone(), hour);
        assert_eq!(HourRecord::from_item(&rec.to_item("s1")).unwrap(), rec);
        rec.version = 3;
        rec.compacted_through = Some(Position::new(Lsn(20), 3));
        rec.claim_attempt = "a1b2c3d4".into();
        let item = rec.to_item("s1");
        assert_eq!(item[PK].as_s().unwrap(), "hour#s1#public.users");
        assert_eq!(item[SK].as_s().unwrap(), "2025-01-08T10");
        assert_eq!(HourRecord::from_item(&item).unwrap(), rec);

        let part = PartItem {
            table,
            hour,
            part: 7,
            attempt: "a1b2c3d4".into(),
            rows: 10,
            first: Position::new(Lsn(10), 1),
            last: Position::new(Lsn(20), 3),
            first_commit_ms: 1,
            last_commit_ms: 2,
            schema_id: "00ff".into(),
            files: vec![
                PartFile {
                    format: crate::layout::Format::Jsonl,
                    key: "a.jsonl.gz".into(),
                    bytes: 5,
                },
                PartFile {
                    format: crate::layout::Format::Parquet,
                    key: "a.parquet".into(),
                    bytes: 6,
                },
            ],
            created_ms: 3,
        };
        let item = part.to_item("s1");
        assert_eq!(
            item[PK].as_s().unwrap(),
            "part#s1#public.users#2025-01-08T10"
        );
        assert_eq!(item[SK].as_s().unwrap(), "007");
        assert_eq!(PartItem::from_item(&item).unwrap(), part);
    }

    #[test]
    fn flush_ids_round_trip() {
        let id = FlushId { seq: 42, epoch: 3 };
        assert_eq!(id.to_string().parse::<FlushId>().unwrap(), id);
    }

    /// Every item the ledger holds reads back as it was written: one codec, both directions.
    #[test]
    fn every_item_round_trips() {
        let table = TableName::new("sales", "order/lines");
        let hour: Hour = "2025-01-08T10".parse().unwrap();
        let lease = Lease {
            owner: "capture-1".into(),
            epoch: 4,
            expires_ms: 1_700_000_000_000,
        };
        assert_eq!(Lease::from_item(&lease.to_item("s1")).unwrap(), lease);
        let registration = SlotRegistration {
            slot: "s1".into(),
            created_ms: 2,
        };
        assert_eq!(
            SlotRegistration::from_item(&registration.to_item()).unwrap(),
            registration
        );
        let cp = Checkpoint {
            lsn: Lsn(0x1_0000_0010),
            partial: Some(Position::new(Lsn(0x1_0000_0200), 7)),
            commit_ms: 5,
            caught_up_ms: Some(6),
            flush_seq: 9,
            flush_id: FlushId { seq: 9, epoch: 4 }.to_string(),
            backfill: None,
            timeline: None,
        };
        let item = cp.to_item("s1", 4, 77);
        assert_eq!(Checkpoint::from_item(&item).unwrap(), cp);
        let on_timeline = Checkpoint {
            timeline: Some(3),
            ..cp.clone()
        };
        let item = on_timeline.to_item("s1", 4, 77);
        assert_eq!(Checkpoint::from_item(&item).unwrap(), on_timeline);
        // With backfill progress: a key of several columns, one of them null.
        let mut backfill = Backfill {
            known: vec![TableName::new("s.x", "a/b")],
            ..Default::default()
        };
        assert!(backfill.request(&table, 5));
        assert!(
            !backfill.request(&table, 6),
            "already waiting from its first key"
        );
        backfill.pending[0].after = Some(vec![Some("7".into()), None]);
        backfill.pending[0].rows = 1000;
        assert!(
            backfill.request(&table, 7),
            "asked again: from its first key"
        );
        assert_eq!(backfill.pending[0].rows, 0);
        backfill.pending[0].after = Some(vec![Some("7".into()), None]);
        backfill.taken = vec![backfill_request_sk(&BackfillRequest::All, 12)];
        let cp = Checkpoint {
            backfill: Some(backfill.clone()),
            ..cp
        };
        let item = cp.to_item("s1", 4, 77);
        assert_eq!(Checkpoint::from_item(&item).unwrap(), cp);
        backfill.finish(&table);
        assert!(backfill.pending.is_empty() && backfill.knows(&table));
        for which in [
            BackfillRequest::Initial,
            BackfillRequest::All,
            BackfillRequest::Table(table.clone()),
        ] {
            let sk = backfill_request_sk(&which, 1_764_000_000_123_456_789);
            assert_eq!(parse_backfill_request_sk(&sk), Some(which));
        }
        assert!(
            backfill_request_sk(&BackfillRequest::All, 9)
                < backfill_request_sk(&BackfillRequest::All, 10),
            "requests list in the order they were made"
        );
        assert_eq!(parse_backfill_request_sk("backfill-request#public.t"), None);
        assert_eq!(item[SK].as_s().unwrap(), CHECKPOINT_SK);
        for expires_at in [None, Some(1_700_000_000)] {
            let record = FlushRecord {
                id: FlushId { seq: 9, epoch: 4 },
                hours: vec![pending_sk(hour, &table)],
                created_ms: 8,
                lsn: Lsn(0x20),
                expires_at,
            };
            assert_eq!(
                FlushRecord::from_item(&record.to_item("s1")).unwrap(),
                record
            );
        }
        for complete in [false, true] {
            let state = SnapshotState {
                complete,
                consistent_lsn: Lsn(0x30),
                started_ms: 3,
            };
            assert_eq!(
                SnapshotState::from_item(&state.to_item("s1")).unwrap(),
                state
            );
        }
        let pending = PendingHour {
            table: table.clone(),
            hour,
            flush_seq: 3,
        };
        assert_eq!(
            PendingHour::from_item(&pending.to_item("s1")).unwrap(),
            pending
        );
        let record = HourRecord {
            table: table.clone(),
            hour,
            version: 2,
            compacted_through: Some(Position::new(Lsn(0x40), 2)),
            next_part: 3,
            rows: 10,
            bytes: 20,
            claim_attempt: "a1".into(),
            claim_until_ms: 30,
            updated_ms: 40,
            recheck_after_ms: 50,
        };
        assert_eq!(
            HourRecord::from_item(&record.to_item("s1")).unwrap(),
            record
        );
        let schema = SchemaItem {
            schema: crate::schema::TableSchema {
                table: table.clone(),
                columns: Vec::new(),
            },
        };
        assert_eq!(
            SchemaItem::from_item(&schema.to_item("s1")).unwrap().schema,
            schema.schema
        );
    }
}
