//! The compactor's side of the ledger (item layouts in `cdc_contract::ledger`): finding slots,
//! pending hours and batches by key, and recording an hour's parts under a versioned claim.
//! [`DynamoLedger`] is the DynamoDB implementation; tests wrap the trait to inject faults.

use std::collections::{BTreeSet, HashMap, HashSet};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

use cdc_contract::dynamo::{Expr, Outcome, Table, Tx, TxWrite};
use cdc_contract::ledger::{
    self as items, BatchItem, Checkpoint, FlushId, HourRecord, PartItem, PendingHour, SchemaItem,
    SnapshotState,
};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, TableName};

/// What a ledger operation can fail with: the shared AWS error (transient or definite).
pub type LedgerError = cdc_contract::aws::AwsError;

/// The outcome of claiming an hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This attempt holds the hour; the record as stored now.
    Claimed(HourRecord),
    /// Another attempt holds it, or changed it since it was read.
    Busy,
}

/// The outcome of recording a part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The part and the hour's new state are recorded.
    Yes,
    /// The hour moved on (claimed by another attempt): this attempt must stop.
    Lost,
}

/// The compactor's ledger operations.
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Every slot in the registry.
    async fn slots(&self) -> Result<Vec<String>, LedgerError>;
    /// A slot's checkpoint, if it has one.
    async fn checkpoint(&self, slot: &str) -> Result<Option<Checkpoint>, LedgerError>;
    /// The state of the slot's initial snapshot, if it took one.
    async fn snapshot(&self, slot: &str) -> Result<Option<SnapshotState>, LedgerError>;
    /// A slot's pending table-hours, only those before `before` when given.
    async fn pending_hours(
        &self,
        slot: &str,
        before: Option<Hour>,
    ) -> Result<Vec<PendingHour>, LedgerError>;
    /// Every batch item of a table-hour, valid or not, in position order.
    async fn batches(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<BatchItem>, LedgerError>;
    /// The flush record, if it exists (its batches count), as read now.
    async fn flush_recorded(
        &self,
        slot: &str,
        id: &FlushId,
    ) -> Result<Option<FlushSeen>, LedgerError>;
    /// Those of `ids` whose flush record exists, as read now. One request per id unless the
    /// ledger can read many at once.
    async fn flushes_recorded(
        &self,
        slot: &str,
        ids: &[FlushId],
    ) -> Result<HashMap<FlushId, FlushSeen>, LedgerError> {
        let mut recorded = HashMap::new();
        for id in ids {
            if let Some(seen) = self.flush_recorded(slot, id).await? {
                recorded.insert(*id, seen);
            }
        }
        Ok(recorded)
    }
    /// A schema version.
    async fn schema(
        &self,
        slot: &str,
        table: &TableName,
        schema_id: &str,
    ) -> Result<Option<TableSchema>, LedgerError>;
    /// The hour's record, if it was ever claimed.
    async fn hour_record(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Option<HourRecord>, LedgerError>;
    /// Every hour record of a table, in hour order.
    async fn hour_records(
        &self,
        slot: &str,
        table: &TableName,
    ) -> Result<Vec<HourRecord>, LedgerError>;
    /// The hour's recorded parts, in part order.
    async fn parts(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<PartItem>, LedgerError>;
    /// Stores `claimed` (the read record with its version bumped and this attempt's claim) if
    /// the stored record is still at `seen_version` (0: absent) and its claim has lapsed.
    async fn claim_hour(
        &self,
        slot: &str,
        seen_version: u64,
        claimed: &HourRecord,
        now_ms: i64,
    ) -> Result<Claim, LedgerError>;
    /// Extends this attempt's claim; false when the hour moved on.
    async fn renew_claim(
        &self,
        slot: &str,
        record: &HourRecord,
        until_ms: i64,
    ) -> Result<bool, LedgerError>;
    /// Records `part` and the hour's new state `next` in one transaction, conditional on the
    /// stored record being at `expected_version` and claimed by `next.claim_attempt`.
    async fn record_part(
        &self,
        slot: &str,
        part: &PartItem,
        expected_version: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError>;
    /// Stores the hour's new state `next` (a watermark raised past batches read whole whose last
    /// lines were not written: dead-lettered), conditional on the stored record being at
    /// `expected_version` and claimed by `next.claim_attempt`.
    async fn raise_watermark(
        &self,
        slot: &str,
        expected_version: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError>;
    /// Gives the claim up (claim time 0) if this attempt still holds it at `record.version`.
    async fn release_hour(&self, slot: &str, record: &HourRecord) -> Result<(), LedgerError>;
    /// Marks consumed batches compacted, with a TTL: each item written whole again, with
    /// `compacted` and `expires_at`, [`cdc_contract::dynamo::BATCH_WRITE_MAX`] to a request.
    async fn mark_compacted(
        &self,
        slot: &str,
        batches: &[&BatchItem],
        expires_at: i64,
    ) -> Result<(), LedgerError>;
    /// Deletes a batch item (orphans only).
    async fn delete_batch(&self, slot: &str, batch: &BatchItem) -> Result<(), LedgerError>;
    /// Notes on a batch's flush record that its table-hour is compacted; once every table-hour
    /// the record names is, the record expires at `expires_at` (it validates nothing any more:
    /// a compacted batch stays valid without it). `last`: the record was read with every other
    /// table-hour it names done ([`FlushSeen::last_undone`]), so it expires in the same request
    /// (done hours only grow). Idempotent; an absent record is fine.
    async fn flush_hour_done(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
        last: bool,
    ) -> Result<(), LedgerError>;
    /// Deletes a pending marker if no flush touched it since it was read; false otherwise.
    async fn clear_pending(&self, slot: &str, marker: &PendingHour) -> Result<bool, LedgerError>;
}

/// A flush record as a run read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushSeen {
    /// The table-hours it names (`{hour}#{schema.table}`) not noted done when it was read;
    /// None when the record names none it can read.
    pub undone: Option<BTreeSet<String>>,
}

impl FlushSeen {
    /// Reads what a flush record says of its table-hours.
    pub fn from_item(item: &items::Item) -> Self {
        let done: HashSet<&str> = match item.get("done_hours") {
            Some(AttributeValue::Ss(done)) => done.iter().map(String::as_str).collect(),
            _ => HashSet::new(),
        };
        let undone = match item.get("hours") {
            Some(AttributeValue::L(hours)) => hours
                .iter()
                .map(|h| h.as_s().ok().cloned())
                .collect::<Option<Vec<String>>>()
                .map(|hours| {
                    hours
                        .into_iter()
                        .filter(|h| !done.contains(h.as_str()))
                        .collect()
                }),
            _ => None,
        };
        FlushSeen { undone }
    }

    /// True when `table_hour` (`{hour}#{schema.table}`) was the only table-hour of the flush
    /// not done when read: noting it done makes the record expire.
    pub fn last_undone(&self, table_hour: &str) -> bool {
        self.undone
            .as_ref()
            .is_some_and(|undone| undone.iter().all(|h| h == table_hour))
    }
}

/// The DynamoDB ledger.
pub struct DynamoLedger {
    table: Table,
}

impl DynamoLedger {
    /// A ledger in `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            table: Table::new(client, table),
        }
    }

    /// Fails with a clear error when the table does not exist or cannot be reached.
    pub async fn check(&self) -> Result<(), LedgerError> {
        self.table.check().await
    }

    async fn part_is(&self, slot: &str, part: &PartItem) -> Result<bool, LedgerError> {
        let item = self
            .table
            .get(
                items::part_pk(slot, &part.table, part.hour),
                items::part_sk(part.part),
            )
            .await?;
        Ok(item
            .as_ref()
            .and_then(|i| i.get("attempt"))
            .and_then(|a| a.as_s().ok())
            .is_some_and(|a| *a == part.attempt))
    }

    /// The hour record's key.
    fn hour_key(slot: &str, record: &HourRecord) -> items::Item {
        items::key(
            items::hour_pk(slot, &record.table),
            items::hour_sk(record.hour),
        )
    }
}

/// The condition of every write by the attempt holding an hour: the record is still at the
/// version it read and names it as the claimant.
fn held_by(version: u64, attempt: &str) -> Expr {
    Expr::when("version = :v AND claim_attempt = :me")
        .value(":v", items::n(version))
        .value(":me", items::s(attempt))
}

#[async_trait]
impl Ledger for DynamoLedger {
    async fn slots(&self) -> Result<Vec<String>, LedgerError> {
        let items = self.table.query(items::SLOTS_PK.to_owned(), None).await?;
        items
            .iter()
            .map(|i| {
                items::SlotRegistration::from_item(i)
                    .map(|r| r.slot)
                    .map_err(Into::into)
            })
            .collect()
    }

    async fn snapshot(&self, slot: &str) -> Result<Option<SnapshotState>, LedgerError> {
        match self
            .table
            .get(items::slot_pk(slot), items::SNAPSHOT_SK.to_owned())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(SnapshotState::from_item(&item)?)),
        }
    }

    async fn checkpoint(&self, slot: &str) -> Result<Option<Checkpoint>, LedgerError> {
        match self
            .table
            .get(items::slot_pk(slot), items::CHECKPOINT_SK.to_owned())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(Checkpoint::from_item(&item)?)),
        }
    }

    async fn pending_hours(
        &self,
        slot: &str,
        before: Option<Hour>,
    ) -> Result<Vec<PendingHour>, LedgerError> {
        let items = self
            .table
            .query(items::pending_pk(slot), before.map(|h| h.to_string()))
            .await?;
        // An unreadable marker (a table name an older capture could not key) stops only its own
        // table-hour, loudly; the slot's other hours go on.
        Ok(items
            .iter()
            .filter_map(|i| match PendingHour::from_item(i) {
                Ok(p) => Some(p),
                Err(error) => {
                    tracing::error!(slot, error = %error, "unreadable pending marker skipped: its table-hour is not compacted");
                    None
                }
            })
            .collect())
    }

    async fn batches(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<BatchItem>, LedgerError> {
        let items = self
            .table
            .query(items::batch_pk(slot, table, hour), None)
            .await?;
        items
            .iter()
            .map(|i| BatchItem::from_item(i).map_err(Into::into))
            .collect()
    }

    async fn flush_recorded(
        &self,
        slot: &str,
        id: &FlushId,
    ) -> Result<Option<FlushSeen>, LedgerError> {
        Ok(self
            .table
            .get(items::slot_pk(slot), items::flush_sk(id))
            .await?
            .as_ref()
            .map(FlushSeen::from_item))
    }

    async fn flushes_recorded(
        &self,
        slot: &str,
        ids: &[FlushId],
    ) -> Result<HashMap<FlushId, FlushSeen>, LedgerError> {
        let by_sk: HashMap<String, FlushId> =
            ids.iter().map(|id| (items::flush_sk(id), *id)).collect();
        let keys = by_sk
            .keys()
            .map(|sk| (items::slot_pk(slot), sk.clone()))
            .collect();
        let found = self.table.get_all("get flush records", keys).await?;
        Ok(found
            .iter()
            .filter_map(|item| match item.get(items::SK) {
                Some(AttributeValue::S(sk)) => {
                    by_sk.get(sk).map(|id| (*id, FlushSeen::from_item(item)))
                }
                _ => None,
            })
            .collect())
    }

    async fn schema(
        &self,
        slot: &str,
        table: &TableName,
        schema_id: &str,
    ) -> Result<Option<TableSchema>, LedgerError> {
        match self
            .table
            .get(items::schema_pk(slot, table), schema_id.to_owned())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(SchemaItem::from_item(&item)?.schema)),
        }
    }

    async fn hour_records(
        &self,
        slot: &str,
        table: &TableName,
    ) -> Result<Vec<HourRecord>, LedgerError> {
        let items = self.table.query(items::hour_pk(slot, table), None).await?;
        let mut records = items
            .iter()
            .map(HourRecord::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|r| r.hour);
        Ok(records)
    }

    async fn hour_record(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Option<HourRecord>, LedgerError> {
        match self
            .table
            .get(items::hour_pk(slot, table), items::hour_sk(hour))
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(HourRecord::from_item(&item)?)),
        }
    }

    async fn parts(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Vec<PartItem>, LedgerError> {
        let items = self
            .table
            .query(items::part_pk(slot, table, hour), None)
            .await?;
        let mut parts = items
            .iter()
            .map(PartItem::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        parts.sort_by_key(|p| p.part);
        Ok(parts)
    }

    async fn claim_hour(
        &self,
        slot: &str,
        seen_version: u64,
        claimed: &HourRecord,
        now_ms: i64,
    ) -> Result<Claim, LedgerError> {
        let condition = if seen_version == 0 {
            Expr::when("attribute_not_exists(pk)")
        } else {
            Expr::when("version = :v AND claim_until_ms < :now")
                .value(":v", items::n(seen_version))
                .value(":now", items::n(now_ms))
        };
        match self
            .table
            .put("claim hour", claimed.to_item(slot), Some(condition))
            .await
        {
            Ok(Outcome::Written(())) => Ok(Claim::Claimed(claimed.clone())),
            // Our own claim whose reply was lost, or whose reply the SDK lost and retried (the
            // retry then fails the condition), is recognised by its attempt id.
            res => {
                let stored = self.hour_record(slot, &claimed.table, claimed.hour).await?;
                if stored.as_ref() == Some(claimed) {
                    return Ok(Claim::Claimed(claimed.clone()));
                }
                match res {
                    Err(e) => Err(e),
                    Ok(_) => Ok(Claim::Busy),
                }
            }
        }
    }

    async fn renew_claim(
        &self,
        slot: &str,
        record: &HourRecord,
        until_ms: i64,
    ) -> Result<bool, LedgerError> {
        let expr = held_by(record.version, &record.claim_attempt)
            .and_update("SET claim_until_ms = :until")
            .value(":until", items::n(until_ms));
        let outcome = self
            .table
            .update_only("renew claim", Self::hour_key(slot, record), expr)
            .await?;
        Ok(outcome.written())
    }

    async fn record_part(
        &self,
        slot: &str,
        part: &PartItem,
        expected_version: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError> {
        let writes = vec![
            TxWrite::Put {
                item: part.to_item(slot),
                expr: Some(Expr::when("attribute_not_exists(pk)")),
            },
            TxWrite::Put {
                item: next.to_item(slot),
                expr: Some(held_by(expected_version, &next.claim_attempt)),
            },
        ];
        let token = format!("{}-{:03}-{}", part.attempt, part.part, expected_version);
        let res = self
            .table
            .transact("record part", writes, Some(token))
            .await;
        if matches!(res, Ok(Tx::Committed)) {
            return Ok(Recorded::Yes);
        }
        // Recognise our own earlier write whose reply was lost.
        if self.part_is(slot, part).await? {
            return Ok(Recorded::Yes);
        }
        match res? {
            Tx::Committed => Ok(Recorded::Yes),
            cancelled if cancelled.by_condition() => Ok(Recorded::Lost),
            Tx::Cancelled(reasons) => Err(LedgerError::Transient(format!(
                "DynamoDB record part: transaction cancelled ({})",
                reasons.join(", ")
            ))),
        }
    }

    async fn raise_watermark(
        &self,
        slot: &str,
        expected_version: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError> {
        let condition = held_by(expected_version, &next.claim_attempt);
        let res = self
            .table
            .put("raise watermark", next.to_item(slot), Some(condition))
            .await;
        if matches!(res, Ok(Outcome::Written(()))) {
            return Ok(Recorded::Yes);
        }
        // Our own earlier write whose reply was lost (a retry of it then fails its condition).
        let stored = self.hour_record(slot, &next.table, next.hour).await?;
        if stored.as_ref() == Some(next) {
            return Ok(Recorded::Yes);
        }
        match res? {
            Outcome::Written(()) => Ok(Recorded::Yes),
            Outcome::ConditionFailed => Ok(Recorded::Lost),
        }
    }

    async fn release_hour(&self, slot: &str, record: &HourRecord) -> Result<(), LedgerError> {
        let expr = held_by(record.version, &record.claim_attempt)
            .and_update(
                "SET claim_until_ms = :zero, updated_ms = :now, recheck_after_ms = :recheck",
            )
            .value(":zero", items::n(0))
            .value(":recheck", items::n(record.recheck_after_ms))
            .value(":now", items::n(crate::now_ms()));
        // A condition that no longer holds: the hour moved on, nothing to give up.
        self.table
            .update_only("release hour", Self::hour_key(slot, record), expr)
            .await?;
        Ok(())
    }

    async fn mark_compacted(
        &self,
        slot: &str,
        batches: &[&BatchItem],
        expires_at: i64,
    ) -> Result<(), LedgerError> {
        // Puts, not conditional updates: a batch write takes no condition, and in the emulator
        // 25 puts in one request cost a tenth of 25 updates. Writing an item whole changes only
        // the two attributes, since its other writers write the same content or leave it alone:
        // the capture puts it (the sort key names the flush) before its flush record commits,
        // and again only when retrying a flush whose reply was lost (the same content, not
        // compacted: a mark it overwrites is made again by a later run, as the retry marks the
        // hour pending again); it deletes one only when retiring an old incomplete snapshot,
        // whose batches are undecided and never consumed; the compactor deletes one only as an
        // orphan (its flush never recorded: never read as valid), and DynamoDB on the expiry
        // set here. Two runs that both read an item as not compacted write the same content.
        let marked = batches
            .iter()
            .map(|batch| {
                let mut item = batch.to_item(slot);
                item.insert("compacted".to_owned(), AttributeValue::Bool(true));
                item.insert(items::TTL_ATTRIBUTE.to_owned(), items::n(expires_at));
                item
            })
            .collect();
        self.table.put_all("mark batches compacted", marked).await?;
        Ok(())
    }

    async fn flush_hour_done(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
        last: bool,
    ) -> Result<(), LedgerError> {
        let key = items::key(items::slot_pk(slot), items::flush_sk(&batch.flush_id));
        let hour = AttributeValue::Ss(vec![items::pending_sk(batch.hour, &batch.table)]);
        if last {
            // The other table-hours were done when the record was read, and done hours only
            // grow: this one completes them. An expiry set before (a retry) is kept.
            let expr = Expr::update("ADD done_hours :h SET #ttl = if_not_exists(#ttl, :exp)")
                .and_when("attribute_exists(pk)")
                .name("#ttl", items::TTL_ATTRIBUTE)
                .value(":h", hour)
                .value(":exp", items::n(expires_at));
            // A condition failure: the record is gone, nothing to note.
            self.table
                .update_only("note last flush hour compacted", key, expr)
                .await?;
            return Ok(());
        }
        // A string set: adding the same table-hour again (a retried compaction) changes nothing.
        let expr = Expr::update("ADD done_hours :h")
            .and_when("attribute_exists(pk)")
            .value(":h", hour);
        let record = match self
            .table
            .update("note flush hour compacted", key.clone(), expr)
            .await?
        {
            Outcome::Written(record) => record,
            Outcome::ConditionFailed => return Ok(()),
        };
        let done: std::collections::HashSet<&String> = match record.get("done_hours") {
            Some(AttributeValue::Ss(s)) => s.iter().collect(),
            _ => return Ok(()),
        };
        let all_done = match record.get("hours") {
            Some(AttributeValue::L(hours)) => hours
                .iter()
                .all(|h| h.as_s().is_ok_and(|h| done.contains(h))),
            _ => false,
        };
        if !all_done || record.contains_key(items::TTL_ATTRIBUTE) {
            return Ok(());
        }
        let expr = Expr::update("SET #ttl = :exp")
            .and_when("attribute_exists(pk)")
            .name("#ttl", items::TTL_ATTRIBUTE)
            .value(":exp", items::n(expires_at));
        self.table
            .update_only("expire flush record", key, expr)
            .await?;
        Ok(())
    }

    async fn delete_batch(&self, slot: &str, batch: &BatchItem) -> Result<(), LedgerError> {
        self.table
            .delete(
                "delete batch item",
                items::key(batch.pk(slot), batch.sk()),
                None,
            )
            .await?;
        Ok(())
    }

    async fn clear_pending(&self, slot: &str, marker: &PendingHour) -> Result<bool, LedgerError> {
        let expr = Expr::when("flush_seq = :seen").value(":seen", items::n(marker.flush_seq));
        let (pk, sk) = (
            items::pending_pk(slot),
            items::pending_sk(marker.hour, &marker.table),
        );
        let outcome = self
            .table
            .delete(
                "clear pending hour",
                items::key(pk.clone(), sk.clone()),
                Some(expr),
            )
            .await?;
        if outcome.written() {
            return Ok(true);
        }
        // A retry of our own delete whose reply was lost fails its condition: the marker is gone
        // and nothing is pending. One a flush wrote since is there again.
        Ok(self.table.get(pk, sk).await?.is_none())
    }
}
