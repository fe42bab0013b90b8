//! The chunked backfill: a table's existing rows read in key order, a chunk at a time, in short
//! ordinary transactions, while the stream goes on; each chunk placed in the stream at a high
//! watermark (a logical message) and recorded atomically with its progress in the checkpoint.
//!
//! Correctness rests on the chunk's transaction snapshot, not on a low watermark: a chunk read
//! under snapshot `S` and placed at watermark `H` (written after the read) is the table as of
//! `H` except for the changes of transactions streamed before `H` that `S` does not see. Those
//! are exactly the streamed transactions whose xid `S` counts as running or future; their keys
//! are dropped from the chunk (the stream carries their newer state). Every transaction `S`
//! sees committed before the read, so before `H`; none of its changes follows the chunk. A low
//! watermark would not do: a transaction whose commit record precedes it can still be invisible
//! to the read (its commit record is written before it becomes visible, and it waits there for
//! a synchronous standby), and its change would then be overwritten by the older chunk row.
//!
//! To judge a streamed transaction, its changes must have been tracked: tracking of a table
//! starts when it becomes pending on a stream; its first chunk on that stream then takes an xid
//! of its own (`x0 - 1`, assigned after tracking began) and waits until every older xid has
//! ended, as slot creation waits for running transactions. Every transaction a later read
//! cannot see has a younger xid, assigned after tracking began, so its commit record follows
//! the stream position where tracking began: it was tracked.
//!
//! The same first read takes the table's largest key (`upto`), after that wait: the backfill
//! ends there. A row with a larger key was inserted (or moved there by a key-changing update)
//! by a transaction that read did not see, so the stream carries it; without the bound a table
//! taking inserts faster than chunks are read would never be done.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;

use cdc_contract::TableName;

use crate::pgoutput::{self, Relation, Value};
use crate::pipeline::{now_ms, CaptureError};
use crate::replication::{quote_ident, quote_literal, ConnectParams};

/// Prefix of the high watermarks' logical messages.
pub const WATERMARK_PREFIX: &str = "pg-cdc-s3-backfill";

/// A transaction snapshot as `pg_current_snapshot()` gives it: 64-bit xids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XidSnapshot {
    /// Every xid below it has ended.
    pub xmin: u64,
    /// Every xid at or above it had not started.
    pub xmax: u64,
    /// Running between them.
    pub xip: HashSet<u64>,
}

impl FromStr for XidSnapshot {
    type Err = String;

    /// Parses `xmin:xmax:xip,xip`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("bad snapshot {s:?}");
        let mut parts = s.split(':');
        let xmin = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xmax = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let xip = match parts.next() {
            None | Some("") => HashSet::new(),
            Some(list) => list
                .split(',')
                .map(|x| x.parse().map_err(|_| bad()))
                .collect::<Result<_, _>>()?,
        };
        Ok(XidSnapshot { xmin, xmax, xip })
    }
}

impl XidSnapshot {
    /// A 32-bit xid (as pgoutput sends it) widened to 64 bits: the one nearest `xmax`.
    pub fn widen(&self, xid: u32) -> u64 {
        let diff = xid.wrapping_sub(self.xmax as u32) as i32;
        self.xmax.wrapping_add_signed(i64::from(diff))
    }

    /// True when this snapshot sees transaction `xid`'s changes (it committed before).
    pub fn sees(&self, xid: u32) -> bool {
        let full = self.widen(xid);
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

/// Column values as text, in order (None: SQL NULL); a row, or a key.
pub type Texts = Vec<Option<String>>;

/// What a chunk read asks for.
#[derive(Debug, Clone)]
pub struct ChunkRequest {
    /// The table.
    pub table: TableName,
    /// Read after this key (None: from the first).
    pub after: Option<Vec<Option<String>>>,
    /// The ordering key's column names `after` is in (empty: any).
    pub key: Vec<String>,
    /// Where tracking started; None: take it now (and wait for older transactions to end).
    pub start: Option<Start>,
    /// Rows to read at most.
    pub limit: usize,
    /// Read the whole table at once, in no order (a table without a key).
    pub whole: bool,
}

/// A table's tracking start on one stream, taken by its first read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// Every xid below it had ended before the read; every transaction at or above it started
    /// after tracking began.
    pub x0: u64,
    /// The table's largest key then (None: the table was empty): the backfill ends there.
    pub upto: Option<Texts>,
}

/// One chunk, read.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The table.
    pub table: TableName,
    /// The table's published columns as the read saw them; None: the table is gone or no longer
    /// published.
    pub relation: Option<Relation>,
    /// The key the read started after (as asked).
    pub after: Option<Texts>,
    /// The ordering key's column names (empty: the table has none).
    pub key: Vec<String>,
    /// The rows' published columns' text, with each row's key.
    pub rows: Vec<(Texts, Texts)>,
    /// True when the table has no rows after this chunk.
    pub last: bool,
    /// The read's snapshot.
    pub snapshot: XidSnapshot,
    /// Where tracking started.
    pub start: Start,
    /// Text bytes read.
    pub bytes: usize,
    /// When it was read (ms since the epoch).
    pub read_ms: i64,
    /// How long its transaction was open (ms).
    pub transaction_ms: u64,
}

impl Chunk {
    /// The key the next chunk starts after.
    pub fn next_after(&self) -> Option<Vec<Option<String>>> {
        self.rows.last().map(|(_, key)| key.clone())
    }
}

/// Reads chunks: the seam between the backfill and the database.
#[async_trait]
pub trait ChunkSource: Send + Sync {
    /// Reads one chunk.
    async fn read(&self, req: ChunkRequest) -> Result<Chunk, CaptureError>;
}

/// A table as the publication publishes it.
#[derive(Debug, Clone)]
pub struct Published {
    /// The table.
    pub table: TableName,
    /// The published columns (PostgreSQL 15+ column lists); None: every column.
    pub columns: Option<Vec<String>>,
    /// The publication's row filter (PostgreSQL 15+), as SQL.
    pub row_filter: Option<String>,
}

/// The captured tables (`CDC_TABLES`, or every table of the publication) with the
/// publication's column list and row filter of each. A table of `CDC_TABLES` outside the
/// publication is left out: nothing of it is streamed either.
pub async fn published_tables(
    client: &tokio_postgres::Client,
    publication: &str,
    tables: &[TableName],
) -> Result<Vec<Published>, tokio_postgres::Error> {
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let sql = if version >= 150_000 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter::text \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    };
    let rows = client.query(sql, &[&publication]).await?;
    let published = rows
        .iter()
        .map(|r| Published {
            table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            columns: r.get(2),
            row_filter: r.get(3),
        })
        .filter(|p| tables.is_empty() || tables.contains(&p.table));
    Ok(published.collect())
}

/// Reads chunks from PostgreSQL on a connection of its own.
pub struct PgChunkSource {
    params: ConnectParams,
    publication: String,
    client: Mutex<Option<tokio_postgres::Client>>,
}

impl PgChunkSource {
    /// A chunk source connecting with `params`, reading what `publication` publishes.
    pub fn new(params: ConnectParams, publication: String) -> Self {
        PgChunkSource {
            params,
            publication,
            client: Mutex::new(None),
        }
    }
}

fn first_text(messages: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

async fn query_u64(client: &tokio_postgres::Client, sql: &str) -> Result<u64, CaptureError> {
    first_text(&client.simple_query(sql).await?)
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| CaptureError::Setup(format!("{sql}: no number returned")))
}

#[async_trait]
impl ChunkSource for PgChunkSource {
    async fn read(&self, req: ChunkRequest) -> Result<Chunk, CaptureError> {
        // The connection is taken out while it reads: a read dropped halfway (its task
        // aborted on a reconnect) drops its connection, never leaving one inside a transaction.
        let mut guard = self.client.lock().await;
        let client = match guard.take() {
            Some(c) if !c.is_closed() => c,
            _ => crate::catalog::connect(&self.params)
                .await
                .map_err(|e| CaptureError::Disconnected(format!("backfill connection: {e}")))?,
        };
        let chunk = self.read_on(&client, req).await?;
        *guard = Some(client);
        Ok(chunk)
    }
}

impl PgChunkSource {
    async fn read_on(
        &self,
        client: &tokio_postgres::Client,
        req: ChunkRequest,
    ) -> Result<Chunk, CaptureError> {
        let x0 = match &req.start {
            Some(start) => start.x0,
            None => {
                // An xid of our own, assigned now (after tracking began); then every older one
                // must end. A snapshot's xmax would not do: a transaction whose commit record is
                // written (before tracking began) can hold a larger xid and still be running.
                let own =
                    query_u64(client, "BEGIN; SELECT pg_current_xact_id()::text; COMMIT").await?;
                let x0 = own + 1;
                let started = std::time::Instant::now();
                let mut logged = started;
                loop {
                    let xmin = query_u64(
                        client,
                        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text",
                    )
                    .await?;
                    if xmin >= x0 {
                        break;
                    }
                    if logged.elapsed() >= Duration::from_secs(30) {
                        logged = std::time::Instant::now();
                        tracing::warn!(table = %req.table, waited_s = started.elapsed().as_secs(), oldest_xid = xmin, "backfill waits for transactions older than its start to end (see pg_stat_activity)");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                x0
            }
        };
        let published = published_tables(client, &self.publication, &[])
            .await?
            .into_iter()
            .find(|p| p.table == req.table);
        let empty = |snapshot| Chunk {
            table: req.table.clone(),
            relation: None,
            after: req.after.clone(),
            key: Vec::new(),
            rows: Vec::new(),
            last: true,
            snapshot,
            start: Start { x0, upto: None },
            bytes: 0,
            read_ms: now_ms(),
            transaction_ms: 0,
        };
        let Some(published) = published else {
            let snapshot = current_snapshot(client).await?;
            return Ok(empty(snapshot));
        };
        let Some((rel, key)) =
            relation_of(client, &req.table, published.columns.as_deref()).await?
        else {
            let snapshot = current_snapshot(client).await?;
            return Ok(empty(snapshot));
        };
        let keyed = !key.is_empty() && !req.whole;
        if req.after.is_some()
            && !req.key.is_empty()
            && key.iter().map(|(n, _)| n).ne(req.key.iter())
        {
            // The ordering key changed (the replica identity did): `after` cannot be compared
            // with it. The chunk, empty, says so with its key; its table starts again.
            let snapshot = current_snapshot(client).await?;
            return Ok(Chunk {
                relation: Some(rel),
                key: key.into_iter().map(|(n, _)| n).collect(),
                last: false,
                ..empty(snapshot)
            });
        }
        let start = match req.start.clone() {
            Some(start) => start,
            None => Start {
                x0,
                upto: if keyed {
                    largest_key(client, &req.table, &key).await?
                } else {
                    None
                },
            },
        };
        let mut sql = String::from("SELECT ");
        let mut list: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
        if !req.whole {
            list.extend(key.iter().map(|(name, _)| quote_ident(name)));
        }
        if list.is_empty() {
            list.push("NULL".into());
        }
        sql.push_str(&list.join(", "));
        sql.push_str(&format!(
            " FROM {}.{}",
            quote_ident(&req.table.schema),
            quote_ident(&req.table.name)
        ));
        let mut conditions = Vec::new();
        if let Some(filter) = &published.row_filter {
            conditions.push(format!("({filter})"));
        }
        let row_of = |values: &[Option<String>]| {
            let names: Vec<String> = key.iter().map(|(n, _)| quote_ident(n)).collect();
            let values: Vec<String> = key
                .iter()
                .zip(values)
                .map(|((_, ty), v)| match v {
                    Some(v) => format!("{}::{ty}", quote_literal(v)),
                    None => "NULL".into(),
                })
                .collect();
            (names.join(", "), values.join(", "))
        };
        if keyed {
            if let Some(after) = &req.after {
                let (names, values) = row_of(after);
                conditions.push(format!("({names}) > ({values})"));
            }
            match &start.upto {
                Some(upto) => {
                    let (names, values) = row_of(upto);
                    conditions.push(format!("({names}) <= ({values})"));
                }
                None => conditions.push("false".into()),
            }
        }
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        if keyed {
            let names: Vec<String> = key.iter().map(|(n, _)| quote_ident(n)).collect();
            sql.push_str(&format!(
                " ORDER BY {} LIMIT {}",
                names.join(", "),
                req.limit
            ));
        }
        let began = std::time::Instant::now();
        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let read = async {
            let snapshot = current_snapshot(client).await?;
            let messages = client.simple_query(&sql).await?;
            Ok::<_, CaptureError>((snapshot, messages))
        }
        .await;
        let end = client.batch_execute("COMMIT").await;
        let transaction_ms = began.elapsed().as_millis() as u64;
        let (snapshot, messages) = read?;
        end?;
        let width = rel.columns.len();
        let mut rows = Vec::new();
        let mut bytes = 0;
        for message in messages {
            let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                continue;
            };
            let text = |i: usize| {
                let v = row.get(i).map(str::to_owned);
                v
            };
            let values: Vec<Option<String>> = (0..width).map(text).collect();
            bytes += values.iter().flatten().map(|v| v.len() + 1).sum::<usize>();
            let key_values: Vec<Option<String>> = if keyed {
                (width..width + key.len()).map(text).collect()
            } else {
                Vec::new()
            };
            rows.push((values, key_values));
        }
        let last =
            !keyed || rows.len() < req.limit || rows.last().map(|(_, k)| k) == start.upto.as_ref();
        Ok(Chunk {
            table: req.table,
            relation: Some(rel),
            after: req.after,
            key: if keyed {
                key.into_iter().map(|(n, _)| n).collect()
            } else {
                Vec::new()
            },
            rows,
            last,
            snapshot,
            start,
            bytes,
            read_ms: now_ms(),
            transaction_ms,
        })
    }
}

/// The largest key of `table` (columns `key` with their types) as text; None when it is empty.
async fn largest_key(
    client: &tokio_postgres::Client,
    table: &TableName,
    key: &[(String, String)],
) -> Result<Option<Texts>, CaptureError> {
    // The columns themselves (a simple query returns their text): `ORDER BY` a name of the
    // output would otherwise order by the text.
    let columns: Vec<String> = key.iter().map(|(n, _)| quote_ident(n)).collect();
    let order: Vec<String> = key
        .iter()
        .map(|(n, _)| format!("{} DESC", quote_ident(n)))
        .collect();
    let sql = format!(
        "SELECT {} FROM {}.{} ORDER BY {} LIMIT 1",
        columns.join(", "),
        quote_ident(&table.schema),
        quote_ident(&table.name),
        order.join(", ")
    );
    let messages = client.simple_query(&sql).await?;
    Ok(messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => Some(
            (0..key.len())
                .map(|i| r.get(i).map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }))
}

async fn current_snapshot(client: &tokio_postgres::Client) -> Result<XidSnapshot, CaptureError> {
    first_text(
        &client
            .simple_query("SELECT pg_current_snapshot()::text")
            .await?,
    )
    .ok_or_else(|| CaptureError::Setup("pg_current_snapshot() returned nothing".into()))?
    .parse()
    .map_err(CaptureError::Setup)
}

/// A table's columns as pgoutput would describe them (replica identity columns as the key),
/// and its ordering key as column names and types: the replica identity index when the table
/// has one (the columns the stream's old-key images carry), else the primary key; None when
/// the table is gone. The columns are the published ones when `published` names them (15+),
/// else every column; generated columns only where pgoutput sends them (stored ones a
/// publication publishes, from 18 on: before, `pg_publication_tables` lists them but the
/// stream never carries them).
pub async fn relation_of(
    client: &tokio_postgres::Client,
    table: &TableName,
    published: Option<&[String]>,
) -> Result<Option<(Relation, Vec<(String, String)>)>, CaptureError> {
    let rows = client
        .query(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                    CASE c.relreplident \
                      WHEN 'f' THEN true \
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND a.attnum = ANY(i.indkey)) \
                      WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
                      ELSE false END, \
                    a.attgenerated <> '', \
                    a.attgenerated = 's' AND current_setting('server_version_num')::int >= 180000 \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(None);
    };
    let oid: u32 = first.get(0);
    let identity: String = first.get(1);
    let columns = rows
        .iter()
        .filter(|r| {
            let (generated, publishable) = (r.get::<_, bool>(6), r.get::<_, bool>(7));
            match published {
                _ if generated && !publishable => false,
                Some(names) => names.contains(&r.get::<_, String>(2)),
                None => !generated,
            }
        })
        .map(|r| pgoutput::RelationColumn {
            key: r.get(5),
            name: r.get(2),
            type_oid: r.get(3),
            typmod: r.get(4),
        })
        .collect();
    let key = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod) \
             FROM (SELECT indrelid, indkey FROM pg_index WHERE indrelid = $1 \
                   AND (indisprimary OR indisreplident) AND indisvalid \
                   ORDER BY indisreplident DESC, indisprimary DESC LIMIT 1) i \
             CROSS JOIN LATERAL generate_subscripts(i.indkey, 1) AS k \
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[k] \
             ORDER BY k",
            &[&oid],
        )
        .await?
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect();
    Ok(Some((
        Relation {
            oid,
            namespace: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: identity.bytes().next().unwrap_or(b'd'),
            columns,
        },
        key,
    )))
}

/// One streamed change to a table being backfilled, kept until every later chunk's read sees
/// its transaction.
#[derive(Debug, Clone)]
enum Touch {
    /// Row images (old and new) of a change, with the columns they follow.
    Rows {
        xid: u32,
        names: Arc<[String]>,
        images: Vec<Vec<Value>>,
    },
    /// A truncate.
    Truncate { xid: u32 },
}

impl Touch {
    fn xid(&self) -> u32 {
        match self {
            Touch::Rows { xid, .. } | Touch::Truncate { xid } => *xid,
        }
    }
}

/// What a chunk must leave out.
#[derive(Debug, PartialEq, Eq)]
pub enum Dropped {
    /// Rows with these keys.
    Keys(HashSet<Vec<Option<String>>>),
    /// Every row: a truncate the read did not see.
    All,
    /// A change the read did not see touched a row whose key cannot be told (an unchanged
    /// TOASTed key column): the chunk is read again later.
    Unknown,
}

/// The streamed changes of the tables being backfilled, by table.
#[derive(Debug, Default)]
pub struct Tracker {
    history: HashMap<TableName, Vec<Touch>>,
    /// Per tracked table, where its tracking started on this stream (None: not yet; the next
    /// chunk's read takes it).
    start: HashMap<TableName, Option<Start>>,
}

impl Tracker {
    /// Starts tracking `table` (if not tracked yet).
    pub fn track(&mut self, table: &TableName) {
        self.start.entry(table.clone()).or_insert(None);
    }

    /// Stops tracking `table`.
    pub fn untrack(&mut self, table: &TableName) {
        self.start.remove(table);
        self.history.remove(table);
    }

    /// True when `table` is tracked.
    pub fn tracks(&self, table: &TableName) -> bool {
        self.start.contains_key(table)
    }

    /// Where tracking of `table` started, once a read took it.
    pub fn start(&self, table: &TableName) -> Option<Start> {
        self.start.get(table).cloned().flatten()
    }

    /// Notes where tracking of `table` started, as its first read took it.
    pub fn set_start(&mut self, table: &TableName, start: Start) {
        if let Some(slot) = self.start.get_mut(table) {
            slot.get_or_insert(start);
        }
    }

    /// `table`'s next read takes its tracking start again (its ordering key changed, and the
    /// bound with it); what is tracked stays.
    pub fn restart(&mut self, table: &TableName) {
        if let Some(slot) = self.start.get_mut(table) {
            *slot = None;
        }
    }

    /// A stream broke: tracking starts again on the next one.
    pub fn reset(&mut self) {
        self.history.clear();
        for start in self.start.values_mut() {
            *start = None;
        }
    }

    /// A streamed change of transaction `xid` to `table` (when tracked): its old and new rows.
    pub fn row_change(
        &mut self,
        table: &TableName,
        xid: u32,
        names: &Arc<[String]>,
        images: Vec<Vec<Value>>,
    ) {
        if self.tracks(table) {
            self.history
                .entry(table.clone())
                .or_default()
                .push(Touch::Rows {
                    xid,
                    names: names.clone(),
                    images,
                });
        }
    }

    /// A streamed truncate of `table` by transaction `xid`.
    pub fn truncate(&mut self, table: &TableName, xid: u32) {
        if self.tracks(table) {
            self.history
                .entry(table.clone())
                .or_default()
                .push(Touch::Truncate { xid });
        }
    }

    /// What a chunk of `table` read under `snapshot` leaves out, its key being the columns
    /// `key`; then forgets every change that snapshot sees (every later read sees them too).
    pub fn dropped(
        &mut self,
        table: &TableName,
        snapshot: &XidSnapshot,
        key: &[String],
    ) -> Dropped {
        let mut keys = HashSet::new();
        let mut all = false;
        let mut unknown = false;
        if let Some(touches) = self.history.get(table) {
            for touch in touches.iter().filter(|t| !snapshot.sees(t.xid())) {
                match touch {
                    Touch::Truncate { .. } => all = true,
                    Touch::Rows { names, images, .. } => {
                        for image in images {
                            match key_of(names, image, key) {
                                Some(k) => {
                                    keys.insert(k);
                                }
                                None => unknown = true,
                            }
                        }
                    }
                }
            }
        }
        for touches in self.history.values_mut() {
            touches.retain(|t| snapshot.widen(t.xid()) >= snapshot.xmin);
        }
        if unknown {
            Dropped::Unknown
        } else if all {
            Dropped::All
        } else {
            Dropped::Keys(keys)
        }
    }
}

/// The values of columns `key` in a row image of columns `names`; None when one is missing or
/// unchanged TOAST. A key-only image carries the key (its other columns are null).
fn key_of(names: &[String], image: &[Value], key: &[String]) -> Option<Vec<Option<String>>> {
    key.iter()
        .map(|k| {
            let i = names.iter().position(|n| n == k)?;
            match image.get(i)? {
                Value::Null => Some(None),
                Value::Text(t) => Some(Some(String::from_utf8_lossy(t).into_owned())),
                Value::Unchanged => None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(s: &str) -> XidSnapshot {
        s.parse().unwrap()
    }

    #[test]
    fn a_snapshot_sees_ended_transactions_only() {
        let s = snap("100:110:103,107");
        assert!(s.sees(99));
        assert!(s.sees(104));
        assert!(!s.sees(103), "running");
        assert!(!s.sees(107), "running");
        assert!(!s.sees(110), "not started");
        assert!(!s.sees(200), "not started");
        assert_eq!(
            snap("5:5:"),
            XidSnapshot {
                xmin: 5,
                xmax: 5,
                xip: HashSet::new()
            }
        );
        assert!("x:1:".parse::<XidSnapshot>().is_err());
    }

    #[test]
    fn xids_widen_across_an_epoch() {
        // Epoch 1, xmax just past the wrap: xid 4294967290 is the previous epoch's.
        let s = snap(&format!("{}:{}:", (1u64 << 32) - 10, (1u64 << 32) + 5));
        assert_eq!(s.widen(4_294_967_290), (1u64 << 32) - 6);
        assert_eq!(s.widen(3), (1u64 << 32) + 3);
        assert!(s.sees(4_294_967_290) || s.widen(4_294_967_290) >= s.xmin);
        assert!(s.sees(3));
        assert!(!s.sees(5));
    }

    fn t(v: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(v.as_bytes()))
    }

    #[test]
    fn a_chunk_drops_the_keys_of_transactions_its_read_did_not_see() {
        let table = TableName::new("public", "t");
        let names: Arc<[String]> = vec!["id".to_owned(), "v".to_owned()].into();
        let mut tracker = Tracker::default();
        tracker.track(&table);
        tracker.row_change(&table, 101, &names, vec![vec![t("1"), t("a")]]);
        tracker.row_change(
            &table,
            103,
            &names,
            vec![vec![t("2"), Value::Null], vec![t("3"), t("b")]],
        );
        tracker.row_change(&table, 111, &names, vec![vec![t("4"), t("c")]]);
        // An untracked table's changes are not kept.
        tracker.row_change(
            &TableName::new("public", "u"),
            103,
            &names,
            vec![vec![t("9")]],
        );
        let s = snap("102:110:103");
        let key = vec!["id".to_owned()];
        let Dropped::Keys(keys) = tracker.dropped(&table, &s, &key) else {
            panic!("keys expected");
        };
        let expected: HashSet<_> = ["2", "3", "4"]
            .iter()
            .map(|k| vec![Some(k.to_string())])
            .collect();
        assert_eq!(keys, expected);
        // Seen by this read, so by every later one: forgotten.
        let later = snap("112:112:");
        assert_eq!(
            tracker.dropped(&table, &later, &key),
            Dropped::Keys(HashSet::new())
        );
    }

    #[test]
    fn an_unseen_truncate_drops_the_whole_chunk_and_an_unknown_key_rereads_it() {
        let table = TableName::new("public", "t");
        let names: Arc<[String]> = vec!["id".to_owned()].into();
        let key = vec!["id".to_owned()];
        let mut tracker = Tracker::default();
        tracker.track(&table);
        tracker.truncate(&table, 105);
        assert_eq!(
            tracker.dropped(&table, &snap("100:104:"), &key),
            Dropped::All
        );
        let mut tracker = Tracker::default();
        tracker.track(&table);
        tracker.row_change(&table, 105, &names, vec![vec![Value::Unchanged]]);
        assert_eq!(
            tracker.dropped(&table, &snap("100:104:"), &key),
            Dropped::Unknown
        );
    }
}
