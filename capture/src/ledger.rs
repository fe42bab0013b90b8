//! The capture's side of the ledger: the lease, the checkpoint and recording flushes.
//!
//! [`DynamoLedger`] is the DynamoDB ledger (item layouts in `cdc_contract::ledger`);
//! [`LocalLedger`] is LOCAL TEST MODE's file, which keeps only the checkpoint.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    ConditionCheck, Put, PutRequest, ReturnValue, TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;
use futures::{StreamExt, TryStreamExt};

use cdc_contract::ledger::SnapshotState;
use cdc_contract::ledger::{
    self as items, BatchItem, Checkpoint, FlushId, FlushRecord, Item, PendingHour, SchemaItem,
};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, Lsn, TableName};

/// What a ledger operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// Throttling, timeouts, 5xx, lost connections: retry.
    #[error("ledger unavailable: {0}")]
    Transient(String),
    /// Another task holds the slot's lease: this task must stop writing.
    #[error("lease lost: {0}")]
    Fenced(String),
    /// Another task holds a live lease.
    #[error("slot is leased by {owner} until {expires_ms} (ms since epoch)")]
    Held {
        /// The holder.
        owner: String,
        /// Its lease's expiry.
        expires_ms: i64,
    },
    /// Bad configuration or data (missing table, malformed item): a person must act.
    #[error("ledger error: {0}")]
    Definite(String),
}

impl LedgerError {
    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, LedgerError::Transient(_))
    }
}

fn classify<E: ProvideErrorMetadata + std::fmt::Debug, R>(
    what: &str,
    err: SdkError<E, R>,
) -> LedgerError {
    let code = err.code().unwrap_or("").to_owned();
    let message = format!("{what}: {}", cdc_contract::aws::error_text(&err));
    match &err {
        SdkError::ServiceError(_) => match code.as_str() {
            "ResourceNotFoundException"
            | "ValidationException"
            | "AccessDeniedException"
            | "UnrecognizedClientException" => LedgerError::Definite(message),
            _ => LedgerError::Transient(message),
        },
        SdkError::ConstructionFailure(_) => LedgerError::Definite(message),
        _ => LedgerError::Transient(message),
    }
}

/// A flush to record: its batches (already on S3), the schemas they follow and the new checkpoint.
#[derive(Debug, Clone)]
pub struct FlushRequest {
    /// The flush's id.
    pub id: FlushId,
    /// The batches.
    pub batches: Vec<BatchItem>,
    /// Schemas the batches name.
    pub schemas: Vec<TableSchema>,
    /// The checkpoint once recorded.
    pub checkpoint: Checkpoint,
}

impl FlushRequest {
    /// The distinct table-hours the flush adds batches to.
    pub fn hours(&self) -> Vec<(TableName, Hour)> {
        let mut hours: Vec<(TableName, Hour)> = self
            .batches
            .iter()
            .map(|b| (b.table.clone(), b.hour))
            .collect();
        hours.sort();
        hours.dedup();
        hours
    }
}

/// The capture's ledger operations.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Registers the slot, takes the lease (or fails with [`LedgerError::Held`]) and returns the
    /// new epoch.
    async fn acquire_lease(&self, owner: &str, duration_ms: i64) -> Result<u64, LedgerError>;
    /// Extends the lease; [`LedgerError::Fenced`] when it was taken over.
    async fn renew_lease(
        &self,
        owner: &str,
        epoch: u64,
        duration_ms: i64,
    ) -> Result<(), LedgerError>;
    /// Gives the lease up (clean shutdown), so a successor need not wait for expiry.
    async fn release_lease(&self, owner: &str, epoch: u64) -> Result<(), LedgerError>;
    /// The recorded checkpoint, if any; also restores what a crash after the last flush's commit
    /// may have left undone (its pending markers).
    async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError>;
    /// Records a flush atomically under the lease. Succeeds when an earlier attempt of the same
    /// flush committed (its reply lost); fails with [`LedgerError::Fenced`] when the lease is lost.
    /// The slot's snapshot state, if a snapshot was ever started.
    async fn load_snapshot(&self) -> Result<Option<SnapshotState>, LedgerError>;
    /// Records the snapshot state under the lease.
    async fn save_snapshot(
        &self,
        state: &SnapshotState,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError>;
    /// Retires the batches of an abandoned snapshot (every batch holding only its rows,
    /// [`SnapshotState::holds`]) so they are never compacted.
    async fn retire_snapshot(&self, state: &SnapshotState) -> Result<u64, LedgerError>;
    async fn record_flush(
        &self,
        req: &FlushRequest,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError>;
}

/// The DynamoDB ledger.
pub struct DynamoLedger {
    client: Client,
    table: String,
    slot: String,
    written_schemas: Mutex<HashSet<String>>,
}

/// How long the record of a flush without batches (a heartbeat) is kept.
const EMPTY_FLUSH_TTL_SECONDS: i64 = 24 * 3600;

/// Pending markers written at once.
const MARK_PENDING_CONCURRENCY: usize = 16;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl DynamoLedger {
    /// A ledger in `table` for `slot`.
    pub fn new(client: Client, table: String, slot: String) -> Self {
        Self {
            client,
            table,
            slot,
            written_schemas: Mutex::new(HashSet::new()),
        }
    }

    /// Fails with a clear error when the table does not exist or cannot be reached.
    pub async fn check(&self) -> Result<(), LedgerError> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map_err(|e| classify(&format!("ledger table {}", self.table), e))?;
        Ok(())
    }

    async fn get(&self, pk: String, sk: String) -> Result<Option<Item>, LedgerError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(items::key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| classify("get item", e))?;
        Ok(out.item)
    }

    async fn put_schemas(&self, schemas: &[TableSchema]) -> Result<(), LedgerError> {
        for schema in schemas {
            // Tables with the same columns share a version id: the item is per table and version.
            let id = format!("{}#{}", schema.table, schema.version_id());
            let known = self
                .written_schemas
                .lock()
                .map(|s| s.contains(&id))
                .unwrap_or(false);
            if known {
                continue;
            }
            let item = SchemaItem {
                schema: schema.clone(),
            }
            .to_item(&self.slot);
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .send()
                .await
                .map_err(|e| classify("put schema", e))?;
            if let Ok(mut s) = self.written_schemas.lock() {
                s.insert(id);
            }
        }
        Ok(())
    }

    async fn put_batches(&self, batches: &[BatchItem]) -> Result<(), LedgerError> {
        for chunk in batches.chunks(25) {
            let mut requests: Vec<WriteRequest> = chunk
                .iter()
                .map(|b| {
                    PutRequest::builder()
                        .set_item(Some(b.to_item(&self.slot)))
                        .build()
                        .map(|p| WriteRequest::builder().put_request(p).build())
                        .map_err(|e| LedgerError::Definite(e.to_string()))
                })
                .collect::<Result<_, _>>()?;
            let mut attempt = 0;
            while !requests.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.table, requests)
                    .send()
                    .await
                    .map_err(|e| classify("write batch items", e))?;
                requests = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(&self.table))
                    .unwrap_or_default();
                attempt += 1;
                if !requests.is_empty() {
                    if attempt > 8 {
                        return Err(LedgerError::Transient(
                            "batch items left unprocessed".into(),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50 << attempt.min(5)))
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn mark_pending(&self, hours: &[(TableName, Hour)], seq: u64) -> Result<(), LedgerError> {
        let updates: Vec<_> = hours
            .iter()
            .map(|(table, hour)| {
                let marker = PendingHour {
                    table: table.clone(),
                    hour: *hour,
                    flush_seq: seq,
                };
                let item = marker.to_item(&self.slot);
                async move {
                    // Only ever moves forward: a repair must not lower a later flush's mark.
                    let res = self
                        .client
                        .put_item()
                        .table_name(&self.table)
                        .set_item(Some(item))
                        .condition_expression("attribute_not_exists(pk) OR flush_seq <= :seq")
                        .expression_attribute_values(":seq", items::n(seq))
                        .send()
                        .await;
                    match res {
                        Ok(_) => Ok(()),
                        Err(e)
                            if e.as_service_error()
                                .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                        {
                            Ok(())
                        }
                        Err(e) => Err(classify("mark pending hour", e)),
                    }
                }
            })
            .collect();
        // Bounded: one flush may touch thousands of table-hours (issue 15, item 6), and
        // thousands of calls at once time out and starve the lease renewal.
        futures::stream::iter(updates)
            .buffer_unordered(MARK_PENDING_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// The condition every recording transaction carries: this task still holds the lease.
    fn lease_condition(&self, owner: &str, epoch: u64) -> Result<ConditionCheck, LedgerError> {
        ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::slot_pk(&self.slot),
                items::LEASE_SK.into(),
            )))
            .condition_expression("#owner = :owner AND epoch = :epoch")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", items::s(owner))
            .expression_attribute_values(":epoch", items::n(epoch))
            .build()
            .map_err(|e| LedgerError::Definite(e.to_string()))
    }

    async fn query_all(&self, pk: String) -> Result<Vec<Item>, LedgerError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk")
            .expression_attribute_values(":pk", items::s(pk))
            .consistent_read(true)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            out.extend(
                page.map_err(|e| classify("query ledger", e))?
                    .items
                    .unwrap_or_default(),
            );
        }
        Ok(out)
    }

    async fn lease_now(&self) -> Result<Option<items::Lease>, LedgerError> {
        match self
            .get(items::slot_pk(&self.slot), items::LEASE_SK.into())
            .await?
        {
            None => Ok(None),
            Some(item) => items::Lease::from_item(&item)
                .map(Some)
                .map_err(|e| LedgerError::Definite(e.to_string())),
        }
    }
}

#[async_trait]
impl Ledger for DynamoLedger {
    async fn acquire_lease(&self, owner: &str, duration_ms: i64) -> Result<u64, LedgerError> {
        let reg = items::SlotRegistration {
            slot: self.slot.clone(),
            created_ms: now_ms(),
        }
        .to_item();
        let registered = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(reg))
            .condition_expression("attribute_not_exists(pk)")
            .send()
            .await;
        if let Err(e) = registered {
            if !e
                .as_service_error()
                .is_some_and(|s| s.is_conditional_check_failed_exception())
            {
                return Err(classify("register slot", e));
            }
        }
        let now = now_ms();
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::slot_pk(&self.slot),
                items::LEASE_SK.into(),
            )))
            .update_expression("SET #owner = :owner, expires_ms = :exp ADD epoch :one")
            .condition_expression(
                "attribute_not_exists(pk) OR expires_ms < :now OR #owner = :owner",
            )
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", items::s(owner))
            .expression_attribute_values(":exp", items::n(now + duration_ms))
            .expression_attribute_values(":now", items::n(now))
            .expression_attribute_values(":one", items::n(1))
            .return_values(ReturnValue::AllNew)
            .send()
            .await;
        match res {
            Ok(out) => {
                let attrs = out.attributes.unwrap_or_default();
                let lease = items::Lease::from_item(&attrs)
                    .map_err(|e| LedgerError::Definite(e.to_string()))?;
                Ok(lease.epoch)
            }
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                match self.lease_now().await? {
                    Some(l) => Err(LedgerError::Held {
                        owner: l.owner,
                        expires_ms: l.expires_ms,
                    }),
                    None => Err(LedgerError::Transient(
                        "lease vanished while acquiring".into(),
                    )),
                }
            }
            Err(e) => Err(classify("acquire lease", e)),
        }
    }

    async fn renew_lease(
        &self,
        owner: &str,
        epoch: u64,
        duration_ms: i64,
    ) -> Result<(), LedgerError> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::slot_pk(&self.slot),
                items::LEASE_SK.into(),
            )))
            .update_expression("SET expires_ms = :exp")
            .condition_expression("#owner = :owner AND epoch = :epoch")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", items::s(owner))
            .expression_attribute_values(":epoch", items::n(epoch))
            .expression_attribute_values(":exp", items::n(now_ms() + duration_ms))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Err(LedgerError::Fenced(format!("epoch {epoch} was taken over")))
            }
            Err(e) => Err(classify("renew lease", e)),
        }
    }

    async fn release_lease(&self, owner: &str, epoch: u64) -> Result<(), LedgerError> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::slot_pk(&self.slot),
                items::LEASE_SK.into(),
            )))
            .update_expression("SET expires_ms = :zero")
            .condition_expression("#owner = :owner AND epoch = :epoch")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", items::s(owner))
            .expression_attribute_values(":epoch", items::n(epoch))
            .expression_attribute_values(":zero", items::n(0))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
            {
                Ok(())
            }
            Err(e) => Err(classify("release lease", e)),
        }
    }

    async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        let Some(item) = self
            .get(items::slot_pk(&self.slot), items::CHECKPOINT_SK.into())
            .await?
        else {
            return Ok(None);
        };
        let checkpoint =
            Checkpoint::from_item(&item).map_err(|e| LedgerError::Definite(e.to_string()))?;
        // The last flush's pending markers are written after its commit: a crash in between
        // leaves them out. Writing them again is idempotent.
        if let Ok(id) = checkpoint.flush_id.parse::<FlushId>() {
            if let Some(flush) = self
                .get(items::slot_pk(&self.slot), items::flush_sk(&id))
                .await?
            {
                let record = FlushRecord::from_item(&flush)
                    .map_err(|e| LedgerError::Definite(e.to_string()))?;
                let hours: Vec<(TableName, Hour)> = record
                    .hours
                    .iter()
                    .filter_map(|h| {
                        let (hour, table) = h.split_once('#')?;
                        Some((table.parse().ok()?, hour.parse().ok()?))
                    })
                    .collect();
                self.mark_pending(&hours, id.seq).await?;
            }
        }
        Ok(Some(checkpoint))
    }

    async fn load_snapshot(&self) -> Result<Option<SnapshotState>, LedgerError> {
        match self
            .get(items::slot_pk(&self.slot), items::SNAPSHOT_SK.into())
            .await?
        {
            None => Ok(None),
            Some(item) => SnapshotState::from_item(&item)
                .map(Some)
                .map_err(|e| LedgerError::Definite(e.to_string())),
        }
    }

    async fn save_snapshot(
        &self,
        state: &SnapshotState,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError> {
        let lease_check = self.lease_condition(owner, epoch)?;
        let item = state.to_item(&self.slot);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()
            .map_err(|e| LedgerError::Definite(e.to_string()))?;
        let res = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(lease_check)
                    .build(),
            )
            .transact_items(TransactWriteItem::builder().put(put).build())
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e)
                if e.as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception()) =>
            {
                match self.lease_now().await? {
                    Some(l) if l.owner == owner && l.epoch == epoch => Err(LedgerError::Transient(
                        "snapshot state write cancelled".into(),
                    )),
                    _ => Err(LedgerError::Fenced(
                        "lease lost while recording the snapshot state".into(),
                    )),
                }
            }
            Err(e) => Err(classify("record snapshot state", e)),
        }
    }

    async fn retire_snapshot(&self, state: &SnapshotState) -> Result<u64, LedgerError> {
        let mut retired = 0;
        let markers = self.query_all(items::pending_pk(&self.slot)).await?;
        for marker in markers {
            let m = PendingHour::from_item(&marker)
                .map_err(|e| LedgerError::Definite(e.to_string()))?;
            let batches = self
                .query_all(items::batch_pk(&self.slot, &m.table, m.hour))
                .await?;
            for item in batches {
                let batch = BatchItem::from_item(&item)
                    .map_err(|e| LedgerError::Definite(e.to_string()))?;
                if state.holds(batch.first, batch.last) {
                    self.client
                        .delete_item()
                        .table_name(&self.table)
                        .set_key(Some(items::key(batch.pk(&self.slot), batch.sk())))
                        .send()
                        .await
                        .map_err(|e| classify("retire snapshot batch", e))?;
                    retired += 1;
                }
            }
        }
        Ok(retired)
    }

    async fn record_flush(
        &self,
        req: &FlushRequest,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError> {
        self.put_schemas(&req.schemas).await?;
        self.put_batches(&req.batches).await?;
        let hours = req.hours();
        let pk = items::slot_pk(&self.slot);

        let lease_check = self.lease_condition(owner, epoch)?;
        let now = now_ms();
        let record = FlushRecord {
            id: req.id,
            hours: hours
                .iter()
                .map(|(t, h)| items::pending_sk(*h, t))
                .collect(),
            created_ms: now,
            lsn: req.checkpoint.lsn,
            // A heartbeat's record validates no batch: it only needs to outlive a lost reply's
            // retry (issue 15, item 13). Records with batches expire once the compactor is done.
            expires_at: hours
                .is_empty()
                .then_some(now / 1000 + EMPTY_FLUSH_TTL_SECONDS),
        };
        let flush_item = record.to_item(&self.slot);
        let flush_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(flush_item))
            .condition_expression("attribute_not_exists(pk)")
            .build()
            .map_err(|e| LedgerError::Definite(e.to_string()))?;
        let cp_item = req.checkpoint.to_item(&self.slot, epoch, now);
        let cp_put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(cp_item))
            .condition_expression("attribute_not_exists(pk) OR flush_seq < :seq")
            .expression_attribute_values(":seq", items::n(req.id.seq))
            .build()
            .map_err(|e| LedgerError::Definite(e.to_string()))?;
        let res = self
            .client
            .transact_write_items()
            .transact_items(
                TransactWriteItem::builder()
                    .condition_check(lease_check)
                    .build(),
            )
            .transact_items(TransactWriteItem::builder().put(flush_put).build())
            .transact_items(TransactWriteItem::builder().put(cp_put).build())
            .send()
            .await;
        if let Err(e) = res {
            let cancelled = e
                .as_service_error()
                .is_some_and(|s| s.is_transaction_canceled_exception());
            if !cancelled {
                return Err(classify("record flush", e));
            }
            // Cancelled: either an earlier attempt of this flush committed (reply lost), or the
            // lease moved on, or a write conflicted (transient).
            let mine = self
                .get(pk.clone(), items::flush_sk(&req.id))
                .await?
                .is_some();
            if !mine {
                match self.lease_now().await? {
                    Some(l) if l.owner == owner && l.epoch == epoch => {
                        return Err(LedgerError::Transient(format!(
                            "record flush cancelled: {}",
                            cdc_contract::aws::error_text(&e)
                        )))
                    }
                    Some(l) => {
                        return Err(LedgerError::Fenced(format!(
                            "slot now leased by {} at epoch {}",
                            l.owner, l.epoch
                        )))
                    }
                    None => return Err(LedgerError::Fenced("lease item is gone".into())),
                }
            }
            tracing::info!(flush = %req.id, "flush found already recorded (an earlier reply was lost)");
        }
        self.mark_pending(&hours, req.id.seq).await
    }
}

/// LOCAL TEST MODE's ledger: a JSON file holding the checkpoint, so restarts resume.
pub struct LocalLedger {
    path: std::path::PathBuf,
}

impl LocalLedger {
    /// A ledger stored at `path`.
    pub fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Self { path: path.into() }
    }
}

#[async_trait]
impl Ledger for LocalLedger {
    async fn acquire_lease(&self, _owner: &str, _duration_ms: i64) -> Result<u64, LedgerError> {
        Ok(1)
    }

    async fn renew_lease(
        &self,
        _owner: &str,
        _epoch: u64,
        _duration_ms: i64,
    ) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn release_lease(&self, _owner: &str, _epoch: u64) -> Result<(), LedgerError> {
        Ok(())
    }

    async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                LedgerError::Definite(format!("local ledger {}: {e}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LedgerError::Definite(format!(
                "local ledger {}: {e}",
                self.path.display()
            ))),
        }
    }

    async fn load_snapshot(&self) -> Result<Option<SnapshotState>, LedgerError> {
        let path = self.path.with_extension("snapshot.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| LedgerError::Definite(format!("{}: {e}", path.display())))?;
                Ok(Some(SnapshotState {
                    complete: v["complete"].as_bool().unwrap_or(false),
                    consistent_lsn: Lsn(v["consistent_lsn"].as_u64().unwrap_or(0)),
                    started_ms: v["started_ms"].as_i64().unwrap_or(0),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(LedgerError::Definite(format!("{}: {e}", path.display()))),
        }
    }

    async fn save_snapshot(
        &self,
        state: &SnapshotState,
        _owner: &str,
        _epoch: u64,
    ) -> Result<(), LedgerError> {
        let path = self.path.with_extension("snapshot.json");
        let text = serde_json::json!({
            "complete": state.complete,
            "consistent_lsn": state.consistent_lsn.0,
            "started_ms": state.started_ms,
        })
        .to_string();
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| LedgerError::Definite(format!("{}: {e}", path.display())))
    }

    async fn retire_snapshot(&self, _state: &SnapshotState) -> Result<u64, LedgerError> {
        // Standard output cannot take lines back: a restarted local snapshot prints them again.
        Ok(0)
    }

    async fn record_flush(
        &self,
        req: &FlushRequest,
        _owner: &str,
        _epoch: u64,
    ) -> Result<(), LedgerError> {
        let text = serde_json::to_vec_pretty(&req.checkpoint)
            .map_err(|e| LedgerError::Definite(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        let write = async {
            tokio::fs::write(&tmp, &text).await?;
            tokio::fs::rename(&tmp, &self.path).await
        };
        write.await.map_err(|e| {
            LedgerError::Definite(format!("local ledger {}: {e}", self.path.display()))
        })
    }
}
