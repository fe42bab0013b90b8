//! The capture's side of the ledger: the lease, the checkpoint and recording flushes.
//!
//! [`DynamoLedger`] is the DynamoDB ledger (item layouts in `cdc_contract::ledger`);
//! [`LocalLedger`] is LOCAL TEST MODE's file, which keeps only the checkpoint.

use std::collections::HashSet;
use std::sync::Mutex;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use futures::{StreamExt, TryStreamExt};

use cdc_contract::aws::AwsError;
use cdc_contract::dynamo::{Expr, Outcome, Table, Tx, TxWrite};
use cdc_contract::ledger::SnapshotState;
use cdc_contract::ledger::{
    self as items, BatchItem, Checkpoint, FlushId, FlushRecord, PendingHour, SchemaItem,
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

impl From<AwsError> for LedgerError {
    fn from(e: AwsError) -> Self {
        match e {
            AwsError::Transient(t) => LedgerError::Transient(t),
            AwsError::Definite(t) => LedgerError::Definite(t),
        }
    }
}

impl From<items::ItemError> for LedgerError {
    fn from(e: items::ItemError) -> Self {
        LedgerError::Definite(e.to_string())
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
    /// Operators' backfill requests, as their sort keys
    /// ([`cdc_contract::ledger::backfill_request_sk`]).
    async fn backfill_requests(&self) -> Result<Vec<String>, LedgerError> {
        Ok(Vec::new())
    }
    /// Deletes a backfill request the checkpoint has recorded.
    async fn delete_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        let _ = sk;
        Ok(())
    }
    /// Writes a backfill request (the `request-snapshot` command).
    async fn put_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        let _ = sk;
        Err(LedgerError::Definite(
            "this ledger takes no backfill requests".into(),
        ))
    }
}

/// The DynamoDB ledger.
pub struct DynamoLedger {
    table: Table,
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

/// The condition every write under the lease carries: `owner` still holds it at `epoch`.
fn leased_to(owner: &str, epoch: u64) -> Expr {
    Expr::when("#owner = :owner AND epoch = :epoch")
        .name("#owner", "owner")
        .value(":owner", items::s(owner))
        .value(":epoch", items::n(epoch))
}

impl DynamoLedger {
    /// A ledger in `table` for `slot`.
    pub fn new(client: Client, table: String, slot: String) -> Self {
        Self {
            table: Table::new(client, table),
            slot,
            written_schemas: Mutex::new(HashSet::new()),
        }
    }

    /// Fails with a clear error when the table does not exist or cannot be reached.
    pub async fn check(&self) -> Result<(), LedgerError> {
        Ok(self.table.check().await?)
    }

    fn lease_key(&self) -> items::Item {
        items::key(items::slot_pk(&self.slot), items::LEASE_SK.into())
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
            self.table.put("put schema", item, None).await?;
            if let Ok(mut s) = self.written_schemas.lock() {
                s.insert(id);
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
                // Only ever moves forward: a repair must not lower a later flush's mark (a
                // failed condition is that case, and fine).
                let expr = Expr::when("attribute_not_exists(pk) OR flush_seq <= :seq")
                    .value(":seq", items::n(seq));
                async move {
                    self.table
                        .put("mark pending hour", item, Some(expr))
                        .await
                        .map(|_| ())
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

    async fn lease_now(&self) -> Result<Option<items::Lease>, LedgerError> {
        match self
            .table
            .get(items::slot_pk(&self.slot), items::LEASE_SK.into())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(items::Lease::from_item(&item)?)),
        }
    }

    /// Why a transaction under the lease was cancelled when it was not this task's own earlier
    /// write: the lease moved on (fenced) or a write conflicted (transient).
    async fn cancelled(&self, what: &str, owner: &str, epoch: u64, tx: &Tx) -> LedgerError {
        match self.lease_now().await {
            Err(e) => e,
            Ok(Some(l)) if l.owner == owner && l.epoch == epoch => {
                let reasons = match tx {
                    Tx::Cancelled(reasons) => reasons.join(", "),
                    Tx::Committed => String::new(),
                };
                LedgerError::Transient(format!("{what} cancelled ({reasons})"))
            }
            Ok(Some(l)) => LedgerError::Fenced(format!(
                "slot now leased by {} at epoch {}",
                l.owner, l.epoch
            )),
            Ok(None) => LedgerError::Fenced("lease item is gone".into()),
        }
    }
}

#[async_trait]
impl Ledger for DynamoLedger {
    async fn acquire_lease(&self, owner: &str, duration_ms: i64) -> Result<u64, LedgerError> {
        let registration = items::SlotRegistration {
            slot: self.slot.clone(),
            created_ms: now_ms(),
        }
        .to_item();
        // Already registered is fine.
        self.table
            .put(
                "register slot",
                registration,
                Some(Expr::when("attribute_not_exists(pk)")),
            )
            .await?;
        let now = now_ms();
        let expr = Expr::update("SET #owner = :owner, expires_ms = :exp ADD epoch :one")
            .and_when("attribute_not_exists(pk) OR expires_ms < :now OR #owner = :owner")
            .name("#owner", "owner")
            .value(":owner", items::s(owner))
            .value(":exp", items::n(now + duration_ms))
            .value(":now", items::n(now))
            .value(":one", items::n(1));
        match self
            .table
            .update("acquire lease", self.lease_key(), expr)
            .await?
        {
            Outcome::Written(item) => Ok(items::Lease::from_item(&item)?.epoch),
            Outcome::ConditionFailed => match self.lease_now().await? {
                Some(l) => Err(LedgerError::Held {
                    owner: l.owner,
                    expires_ms: l.expires_ms,
                }),
                None => Err(LedgerError::Transient(
                    "lease vanished while acquiring".into(),
                )),
            },
        }
    }

    async fn renew_lease(
        &self,
        owner: &str,
        epoch: u64,
        duration_ms: i64,
    ) -> Result<(), LedgerError> {
        let expr = leased_to(owner, epoch)
            .and_update("SET expires_ms = :exp")
            .value(":exp", items::n(now_ms() + duration_ms));
        match self
            .table
            .update_only("renew lease", self.lease_key(), expr)
            .await?
        {
            Outcome::Written(_) => Ok(()),
            Outcome::ConditionFailed => {
                Err(LedgerError::Fenced(format!("epoch {epoch} was taken over")))
            }
        }
    }

    async fn release_lease(&self, owner: &str, epoch: u64) -> Result<(), LedgerError> {
        let expr = leased_to(owner, epoch)
            .and_update("SET expires_ms = :zero")
            .value(":zero", items::n(0));
        // Taken over meanwhile: nothing left to give up.
        self.table
            .update_only("release lease", self.lease_key(), expr)
            .await?;
        Ok(())
    }

    async fn load_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        let Some(item) = self
            .table
            .get(items::slot_pk(&self.slot), items::CHECKPOINT_SK.into())
            .await?
        else {
            return Ok(None);
        };
        let checkpoint = Checkpoint::from_item(&item)?;
        // The last flush's pending markers are written after its commit: a crash in between
        // leaves them out. Writing them again is idempotent.
        if let Ok(id) = checkpoint.flush_id.parse::<FlushId>() {
            if let Some(flush) = self
                .table
                .get(items::slot_pk(&self.slot), items::flush_sk(&id))
                .await?
            {
                let record = FlushRecord::from_item(&flush)?;
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
            .table
            .get(items::slot_pk(&self.slot), items::SNAPSHOT_SK.into())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(SnapshotState::from_item(&item)?)),
        }
    }

    async fn save_snapshot(
        &self,
        state: &SnapshotState,
        owner: &str,
        epoch: u64,
    ) -> Result<(), LedgerError> {
        let writes = vec![
            TxWrite::Check {
                key: self.lease_key(),
                expr: leased_to(owner, epoch),
            },
            TxWrite::Put {
                item: state.to_item(&self.slot),
                expr: None,
            },
        ];
        match self
            .table
            .transact("record snapshot state", writes, None)
            .await?
        {
            Tx::Committed => Ok(()),
            cancelled => Err(self
                .cancelled("snapshot state write", owner, epoch, &cancelled)
                .await),
        }
    }

    async fn retire_snapshot(&self, state: &SnapshotState) -> Result<u64, LedgerError> {
        let mut retired = 0;
        let markers = self
            .table
            .query(items::pending_pk(&self.slot), None)
            .await?;
        for marker in markers {
            let m = PendingHour::from_item(&marker)?;
            let batches = self
                .table
                .query(items::batch_pk(&self.slot, &m.table, m.hour), None)
                .await?;
            for item in batches {
                let batch = BatchItem::from_item(&item)?;
                if state.holds(batch.first, batch.last) {
                    self.table
                        .delete(
                            "retire snapshot batch",
                            items::key(batch.pk(&self.slot), batch.sk()),
                            None,
                        )
                        .await?;
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
        self.table
            .put_all(
                "write batch items",
                req.batches.iter().map(|b| b.to_item(&self.slot)).collect(),
            )
            .await?;
        let hours = req.hours();
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
        let writes = vec![
            TxWrite::Check {
                key: self.lease_key(),
                expr: leased_to(owner, epoch),
            },
            TxWrite::Put {
                item: record.to_item(&self.slot),
                expr: Some(Expr::when("attribute_not_exists(pk)")),
            },
            TxWrite::Put {
                item: req.checkpoint.to_item(&self.slot, epoch, now),
                expr: Some(
                    Expr::when("attribute_not_exists(pk) OR flush_seq < :seq")
                        .value(":seq", items::n(req.id.seq)),
                ),
            },
        ];
        let tx = self.table.transact("record flush", writes, None).await?;
        if tx != Tx::Committed {
            // Cancelled: either an earlier attempt of this flush committed (reply lost), or the
            // lease moved on, or a write conflicted (transient).
            let mine = self
                .table
                .get(items::slot_pk(&self.slot), items::flush_sk(&req.id))
                .await?
                .is_some();
            if !mine {
                return Err(self.cancelled("record flush", owner, epoch, &tx).await);
            }
            tracing::info!(flush = %req.id, "flush found already recorded (an earlier reply was lost)");
        }
        self.mark_pending(&hours, req.id.seq).await
    }

    async fn backfill_requests(&self) -> Result<Vec<String>, LedgerError> {
        let items = self
            .table
            .query_prefix(items::slot_pk(&self.slot), items::BACKFILL_REQUEST_PREFIX)
            .await?;
        Ok(items
            .iter()
            .filter_map(|i| i.get(items::SK).and_then(|v| v.as_s().ok()).cloned())
            .collect())
    }

    async fn delete_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        self.table
            .delete(
                "delete backfill request",
                items::key(items::slot_pk(&self.slot), sk.to_owned()),
                None,
            )
            .await?;
        Ok(())
    }

    async fn put_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        let mut item = items::key(items::slot_pk(&self.slot), sk.to_owned());
        item.insert("requested_ms".to_owned(), items::n(now_ms()));
        self.table.put("write backfill request", item, None).await?;
        Ok(())
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

    async fn write_requests(&self, requests: &[String]) -> Result<(), LedgerError> {
        let path = self.path.with_extension("requests.json");
        let text =
            serde_json::to_vec(requests).map_err(|e| LedgerError::Definite(e.to_string()))?;
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| LedgerError::Definite(format!("{}: {e}", path.display())))
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

    async fn backfill_requests(&self) -> Result<Vec<String>, LedgerError> {
        let path = self.path.with_extension("requests.json");
        match tokio::fs::read(&path).await {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| LedgerError::Definite(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(LedgerError::Definite(format!("{}: {e}", path.display()))),
        }
    }

    async fn delete_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        let mut requests = self.backfill_requests().await?;
        requests.retain(|r| r != sk);
        self.write_requests(&requests).await
    }

    async fn put_backfill_request(&self, sk: &str) -> Result<(), LedgerError> {
        let mut requests = self.backfill_requests().await?;
        if !requests.iter().any(|r| r == sk) {
            requests.push(sk.to_owned());
        }
        self.write_requests(&requests).await
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
