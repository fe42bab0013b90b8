//! Staging micro-batches exactly as the capture records them, without PostgreSQL: gzipped JSONL
//! change events under `Layout::staging_key`, schema items, batch items, then the flush record
//! and the checkpoint in one transaction, then the pending markers. The compactor's tests build
//! their hours with it (and the benchmark its million rows).
//!
//! Events are written in the capture's own field order, so staged lines look like the real ones.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use anyhow::Context;
use cdc_contract::dynamo::{Expr, Tx, TxWrite};
use serde_json::Value;

use cdc_contract::event::Op;
use cdc_contract::layout::Layout;
use cdc_contract::ledger::{self, BatchItem, Checkpoint, FlushId, PendingHour, SchemaItem};
use cdc_contract::schema::{ColumnSchema, TableSchema};
use cdc_contract::{Hour, Lsn, Position, TableName};

use crate::aws::AwsFixture;

/// A column of a staged table's schema.
pub fn column(name: &str, type_name: &str, oid: u32) -> ColumnSchema {
    ColumnSchema {
        name: name.into(),
        type_name: type_name.into(),
        type_oid: oid,
        typmod: -1,
        key: false,
        base_oid: oid,
        element_oid: None,
    }
}

/// Builders on [`ColumnSchema`] for tests.
pub trait ColumnExt {
    /// Part of the key.
    fn key(self) -> Self;
    /// With this type modifier.
    fn typmod(self, typmod: i32) -> Self;
    /// `numeric(p,s)`.
    fn numeric(self, precision: i32, scale: i32) -> Self;
    /// An array of `element`.
    fn array_of(self, element: u32) -> Self;
}

impl ColumnExt for ColumnSchema {
    fn key(mut self) -> Self {
        self.key = true;
        self
    }
    fn typmod(mut self, typmod: i32) -> Self {
        self.typmod = typmod;
        self
    }
    fn numeric(self, precision: i32, scale: i32) -> Self {
        self.typmod(((precision << 16) | (scale & 0x7ff)) + 4)
    }
    fn array_of(mut self, element: u32) -> Self {
        self.element_oid = Some(element);
        self
    }
}

/// One change to stage: the row images as the capture encodes them (natural JSON values).
#[derive(Debug, Clone)]
pub struct Change {
    /// The table's schema at the change.
    pub schema: TableSchema,
    /// The operation.
    pub op: Op,
    /// The before image.
    pub before: Option<Value>,
    /// The after image.
    pub after: Option<Value>,
    /// Columns given as PostgreSQL text.
    pub raw_columns: Vec<String>,
}

impl Change {
    /// An insert.
    pub fn insert(schema: &TableSchema, after: Value) -> Self {
        Change {
            schema: schema.clone(),
            op: Op::Create,
            before: None,
            after: Some(after),
            raw_columns: Vec::new(),
        }
    }
    /// An update (no before image, as with REPLICA IDENTITY DEFAULT and an unchanged key).
    pub fn update(schema: &TableSchema, after: Value) -> Self {
        Change {
            op: Op::Update,
            ..Change::insert(schema, after)
        }
    }
    /// A delete with the key-only before image.
    pub fn delete(schema: &TableSchema, before: Value) -> Self {
        Change {
            schema: schema.clone(),
            op: Op::Delete,
            before: Some(before),
            after: None,
            raw_columns: Vec::new(),
        }
    }
    /// Columns given as PostgreSQL text.
    pub fn raw(mut self, columns: &[&str]) -> Self {
        self.raw_columns = columns.iter().map(|c| (*c).to_owned()).collect();
        self
    }
}

/// A staged line waiting for a flush.
#[derive(Debug, Clone)]
pub struct StagedLine {
    /// The table's schema.
    pub schema: Arc<TableSchema>,
    /// Its version id.
    pub schema_id: Arc<str>,
    /// The hour of its commit.
    pub hour: Hour,
    /// Its position.
    pub position: Position,
    /// Its commit time (ms).
    pub commit_ms: i64,
    /// The JSON line (without newline).
    pub line: String,
}

/// Stages batches for one slot into an [`AwsFixture`].
pub struct Stager<'a> {
    /// The AWS resources.
    pub aws: &'a AwsFixture,
    /// The slot.
    pub slot: String,
    /// The layout (base path `S3_BASE_PATH`).
    pub layout: Layout,
    /// The writer's lease epoch.
    pub epoch: u64,
    /// Changes per staged batch at most.
    pub batch_rows: usize,
    /// Last committed flush sequence.
    pub seq: u64,
    /// The checkpoint as last recorded.
    pub checkpoint: Checkpoint,
    next_lsn: u64,
    xid: i64,
    buffer: Vec<StagedLine>,
    schemas: Vec<(Arc<TableSchema>, Arc<str>)>,
}

fn json(v: impl Into<Value>) -> String {
    v.into().to_string()
}

/// One event line in the capture's field order.
#[allow(clippy::too_many_arguments)]
pub fn event_line(
    slot: &str,
    db: &str,
    change: &Change,
    xid: i64,
    commit_lsn: u64,
    prev_commit_end: u64,
    lsn: u64,
    commit_us: i64,
    ordinal: u32,
    table_ordinal: u32,
) -> String {
    // An image's members in the table's column order, as the capture writes them (then any
    // member the schema does not name).
    let image = |v: &Option<Value>| match v {
        Some(Value::Object(members)) => {
            let columns = &change.schema.columns;
            let known = columns
                .iter()
                .filter_map(|c| members.get_key_value(c.name.as_str()));
            let unknown = members
                .iter()
                .filter(|(name, _)| !columns.iter().any(|c| c.name == **name));
            let text: Vec<String> = known
                .chain(unknown)
                .map(|(name, value)| format!("{}:{value}", json(name.as_str())))
                .collect();
            format!("{{{}}}", text.join(","))
        }
        Some(v) => v.to_string(),
        None => "null".into(),
    };
    let t = &change.schema.table;
    let mut line = format!(
        "{{\"before\":{},\"after\":{},\"source\":{{\"version\":\"0.1.0\",\"connector\":\"postgresql\",\"name\":{},\"ts_ms\":{},\"ts_us\":{},\"snapshot\":\"false\",\"db\":{},\"sequence\":{},\"schema\":{},\"table\":{},\"txId\":{},\"lsn\":{},\"commit_lsn\":{}}},\"op\":\"{}\",\"ts_ms\":{},\"transaction\":{{\"id\":\"{}:{}\",\"total_order\":{},\"data_collection_order\":{}}}",
        image(&change.before),
        image(&change.after),
        json(slot),
        commit_us.div_euclid(1000),
        commit_us,
        json(db),
        json(format!("[\"{prev_commit_end}\",\"{lsn}\"]")),
        json(t.schema.as_str()),
        json(t.name.as_str()),
        xid,
        lsn,
        commit_lsn,
        change.op.code(),
        commit_us.div_euclid(1000) + 5,
        xid,
        commit_lsn,
        ordinal,
        table_ordinal,
    );
    if !change.raw_columns.is_empty() {
        line.push_str(&format!(
            ",\"raw_columns\":{}",
            json(change.raw_columns.clone())
        ));
    }
    line.push('}');
    line
}

/// Gzips bytes as the capture does (fast level).
pub fn gzip(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

/// A batch as staged: its item and its lines.
#[derive(Debug, Clone)]
pub struct StagedBatch {
    /// The ledger item.
    pub item: BatchItem,
    /// The JSON lines.
    pub lines: Vec<String>,
}

impl<'a> Stager<'a> {
    /// A stager for a new slot: registers it and takes the lease at epoch 1.
    pub async fn new(aws: &'a AwsFixture, slot: &str) -> anyhow::Result<Stager<'a>> {
        let reg = ledger::SlotRegistration {
            slot: slot.into(),
            created_ms: now_ms(),
        }
        .to_item();
        aws.ledger_table()
            .put("register slot", reg, None)
            .await
            .context("registering the slot")?;
        let stager = Stager {
            aws,
            slot: slot.to_owned(),
            layout: Layout::new(""),
            epoch: 1,
            batch_rows: 1000,
            seq: 0,
            checkpoint: Checkpoint::default(),
            next_lsn: 0x1000_0000,
            xid: 700,
            buffer: Vec::new(),
            schemas: Vec::new(),
        };
        stager.put_lease().await?;
        Ok(stager)
    }

    async fn put_lease(&self) -> anyhow::Result<()> {
        let lease = ledger::Lease {
            owner: "stager".into(),
            epoch: self.epoch,
            expires_ms: now_ms() + 60_000,
        }
        .to_item(&self.slot);
        self.aws
            .ledger_table()
            .put("write lease", lease, None)
            .await
            .context("writing the lease")?;
        Ok(())
    }

    /// A new writer takes the slot over (as after a capture crash): the epoch moves on.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.epoch += 1;
        self.buffer.clear();
        self.put_lease().await
    }

    /// The shared copy of a schema and its version id (computed once).
    fn schema_of(&mut self, schema: &TableSchema) -> (Arc<TableSchema>, Arc<str>) {
        if let Some((s, id)) = self.schemas.iter().find(|(s, _)| **s == *schema) {
            return (s.clone(), id.clone());
        }
        let entry = (
            Arc::new(schema.clone()),
            Arc::<str>::from(schema.version_id()),
        );
        self.schemas.push(entry.clone());
        entry
    }

    /// Stages one transaction committed at `commit_us` (µs); returns its lines.
    pub fn tx(&mut self, commit_us: i64, changes: Vec<Change>) -> Vec<String> {
        self.xid += 1;
        let prev_end = self.next_lsn;
        let first_change_lsn = self.next_lsn + 0x10;
        let commit_lsn = first_change_lsn + 0x40 * changes.len() as u64 + 0x10;
        self.next_lsn = commit_lsn + 0x30;
        let hour = Hour::from_micros(commit_us);
        let mut per_table: BTreeMap<TableName, u32> = BTreeMap::new();
        let mut lines = Vec::new();
        for (i, change) in changes.into_iter().enumerate() {
            let ordinal = i as u32 + 1;
            let table_ordinal = {
                let n = per_table.entry(change.schema.table.clone()).or_default();
                *n += 1;
                *n
            };
            let line = event_line(
                &self.slot,
                "app",
                &change,
                self.xid,
                commit_lsn,
                prev_end,
                first_change_lsn + 0x40 * i as u64,
                commit_us,
                ordinal,
                table_ordinal,
            );
            lines.push(line.clone());
            let (schema, schema_id) = self.schema_of(&change.schema);
            self.buffer.push(StagedLine {
                schema,
                schema_id,
                hour,
                position: Position::new(Lsn(commit_lsn), ordinal),
                commit_ms: commit_us.div_euclid(1000),
                line,
            });
        }
        lines
    }

    /// Stages the last change of `batch` again, at its own position, at the end of what is
    /// buffered: the next batch of its table-hour then starts with it and overlaps `batch`, as
    /// a batch holding a change delivered twice does.
    pub fn repeat_last(&mut self, schema: &TableSchema, batch: &StagedBatch) {
        let (schema, schema_id) = self.schema_of(schema);
        if let Some(line) = batch.lines.last() {
            self.buffer.push(StagedLine {
                schema,
                schema_id,
                hour: batch.item.hour,
                position: batch.item.last,
                commit_ms: batch.item.last_commit_ms,
                line: line.clone(),
            });
        }
    }

    /// Appends a line that is not a change event (for dead-letter tests) to the next batch of
    /// `schema`'s table in `hour`, positioned after the last staged change.
    pub fn garbage(&mut self, schema: &TableSchema, hour: Hour, line: &str) {
        let position = self.buffer.last().map(|l| l.position).unwrap_or_default();
        let (schema, schema_id) = self.schema_of(schema);
        self.buffer.push(StagedLine {
            schema,
            schema_id,
            hour,
            position,
            commit_ms: hour.start_millis(),
            line: line.to_owned(),
        });
    }

    /// Cuts the buffered lines into batches (per table, hour and schema version, at most
    /// `batch_rows` each) and uploads them; returns their items (not yet in the ledger).
    async fn upload(&mut self, id: FlushId) -> anyhow::Result<Vec<StagedBatch>> {
        let lines = std::mem::take(&mut self.buffer);
        let mut groups: BTreeMap<(TableName, Hour), Vec<Vec<StagedLine>>> = BTreeMap::new();
        for l in lines {
            let key = (l.schema.table.clone(), l.hour);
            let runs = groups.entry(key).or_default();
            let new_run = match runs.last() {
                Some(run) => run.len() >= self.batch_rows || run[0].schema_id != l.schema_id,
                None => true,
            };
            if new_run {
                runs.push(Vec::new());
            }
            if let Some(run) = runs.last_mut() {
                run.push(l);
            }
        }
        let mut batches = Vec::new();
        for ((table, hour), runs) in groups {
            for run in runs {
                let first = run[0].position;
                let last = run[run.len() - 1].position;
                let key = self.layout.staging_key(&table, hour, first, last);
                let mut text = String::new();
                for l in &run {
                    text.push_str(&l.line);
                    text.push('\n');
                }
                let gz = gzip(text.as_bytes())?;
                let bytes = gz.len() as u64;
                self.aws
                    .s3
                    .put_object()
                    .bucket(&self.aws.bucket)
                    .key(&key)
                    .content_type("application/x-ndjson")
                    .content_encoding("gzip")
                    .body(gz.into())
                    .send()
                    .await
                    .with_context(|| format!("uploading {key}"))?;
                batches.push(StagedBatch {
                    item: BatchItem {
                        table: table.clone(),
                        hour,
                        key,
                        first,
                        last,
                        rows: run.len() as u64,
                        bytes,
                        first_commit_ms: run[0].commit_ms,
                        last_commit_ms: run[run.len() - 1].commit_ms,
                        schema_id: run[0].schema_id.to_string(),
                        flush_id: id,
                        compacted: false,
                    },
                    lines: run.into_iter().map(|l| l.line).collect(),
                });
            }
        }
        Ok(batches)
    }

    async fn put_items(
        &self,
        batches: &[StagedBatch],
        schemas: &[TableSchema],
    ) -> anyhow::Result<()> {
        let table = self.aws.ledger_table();
        let schema_items = schemas.iter().map(|schema| {
            SchemaItem {
                schema: schema.clone(),
            }
            .to_item(&self.slot)
        });
        let batch_items = batches.iter().map(|b| b.item.to_item(&self.slot));
        table
            .put_all(
                "write schema and batch items",
                schema_items.chain(batch_items).collect(),
            )
            .await
            .context("writing schema and batch items")?;
        Ok(())
    }

    /// The schema items the buffered changes need: one per table and version, as the capture
    /// writes them (tables with the same columns share a version id, not an item).
    fn schemas_of(&self) -> Vec<TableSchema> {
        let mut out: Vec<TableSchema> = Vec::new();
        let mut ids: Vec<(&TableName, &str)> = Vec::new();
        for l in &self.buffer {
            let id = (&l.schema.table, &*l.schema_id);
            if !ids.contains(&id) {
                ids.push(id);
                out.push((*l.schema).clone());
            }
        }
        out
    }

    /// Records the buffered changes as one flush, as the capture does: batches uploaded, schema
    /// and batch items written, then the flush record and the checkpoint in one transaction
    /// (`caught_up_ms` as given), then the pending markers.
    pub async fn flush(&mut self, caught_up_ms: Option<i64>) -> anyhow::Result<Vec<StagedBatch>> {
        let id = FlushId {
            seq: self.seq + 1,
            epoch: self.epoch,
        };
        let schemas = self.schemas_of();
        let last = self.buffer.iter().max_by_key(|l| l.position).cloned();
        let batches = self.upload(id).await?;
        self.put_items(&batches, &schemas).await?;

        let mut hours: Vec<(TableName, Hour)> = batches
            .iter()
            .map(|b| (b.item.table.clone(), b.item.hour))
            .collect();
        hours.sort();
        hours.dedup();
        let mut checkpoint = self.checkpoint.clone();
        if let Some(l) = &last {
            checkpoint.lsn = Lsn(l.position.commit_lsn.0 + 0x30);
            checkpoint.commit_ms = l.commit_ms;
        }
        checkpoint.caught_up_ms = caught_up_ms.or(checkpoint.caught_up_ms);
        checkpoint.flush_seq = id.seq;
        checkpoint.flush_id = id.to_string();

        let flush_item = ledger::FlushRecord {
            id,
            hours: hours
                .iter()
                .map(|(t, h)| ledger::pending_sk(*h, t))
                .collect(),
            created_ms: now_ms(),
            lsn: checkpoint.lsn,
            expires_at: None,
        }
        .to_item(&self.slot);
        let cp_item = checkpoint.to_item(&self.slot, self.epoch, now_ms());
        let tx = self
            .aws
            .ledger_table()
            .transact(
                "record flush",
                vec![
                    TxWrite::Put {
                        item: flush_item,
                        expr: Some(Expr::when("attribute_not_exists(pk)")),
                    },
                    TxWrite::Put {
                        item: cp_item,
                        expr: None,
                    },
                ],
                None,
            )
            .await
            .context("recording the flush")?;
        anyhow::ensure!(tx == Tx::Committed, "recording the flush: {tx:?}");
        self.seq = id.seq;
        self.checkpoint = checkpoint;
        for (table, hour) in hours {
            let marker = PendingHour {
                table,
                hour,
                flush_seq: id.seq,
            };
            self.aws
                .ledger_table()
                .put("mark hour pending", marker.to_item(&self.slot), None)
                .await
                .context("marking an hour pending")?;
        }
        Ok(batches)
    }

    /// Uploads the buffered changes and writes their batch items as the next flush would, then
    /// "crashes" before the flush record: the items are orphans once a later flush commits.
    pub async fn flush_uncommitted(&mut self) -> anyhow::Result<Vec<StagedBatch>> {
        let id = FlushId {
            seq: self.seq + 1,
            epoch: self.epoch,
        };
        let schemas = self.schemas_of();
        let batches = self.upload(id).await?;
        self.put_items(&batches, &schemas).await?;
        Ok(batches)
    }

    /// Records an idle checkpoint (no batches) with a new caught-up time, as a heartbeat does.
    pub async fn heartbeat(&mut self, caught_up_ms: i64) -> anyhow::Result<()> {
        self.flush(Some(caught_up_ms)).await.map(|_| ())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
