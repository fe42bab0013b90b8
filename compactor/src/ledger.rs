//! The compactor's side of the ledger (item layouts in `cdc_contract::ledger`): finding slots,
//! pending hours and batches by key, and recording an hour's parts under a versioned claim.
//! [`DynamoLedger`] is the DynamoDB implementation; tests wrap the trait to inject faults.

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{AttributeValue, Put, TransactWriteItem};
use aws_sdk_dynamodb::Client;

use cdc_contract::ledger::{
    self as items, BatchItem, Checkpoint, FlushId, HourRecord, Item, PartItem, PendingHour,
    SchemaItem, SnapshotState,
};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, TableName};

/// What a ledger operation can fail with.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    /// Throttling, timeouts, 5xx, lost connections: retrying may succeed.
    #[error("ledger unavailable: {0}")]
    Transient(String),
    /// Missing table, access denied, malformed item: a person must act.
    #[error("ledger error: {0}")]
    Definite(String),
}

impl LedgerError {
    /// True when retrying may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, LedgerError::Transient(_))
    }
}

impl From<items::ItemError> for LedgerError {
    fn from(e: items::ItemError) -> Self {
        LedgerError::Definite(e.to_string())
    }
}

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
    /// True when the flush record exists (its batches count).
    async fn flush_recorded(&self, slot: &str, id: &FlushId) -> Result<bool, LedgerError>;
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
    /// Gives the claim up (claim time 0) if this attempt still holds it at `record.version`.
    async fn release_hour(&self, slot: &str, record: &HourRecord) -> Result<(), LedgerError>;
    /// Marks a consumed batch compacted, with a TTL.
    async fn mark_compacted(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), LedgerError>;
    /// Deletes a batch item (orphans only).
    async fn delete_batch(&self, slot: &str, batch: &BatchItem) -> Result<(), LedgerError>;
    /// Notes on a batch's flush record that its table-hour is compacted; once every table-hour
    /// the record names is, the record expires at `expires_at` (it validates nothing any more:
    /// a compacted batch stays valid without it). Idempotent; an absent record is fine.
    async fn flush_hour_done(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), LedgerError>;
    /// Deletes a pending marker if no flush touched it since it was read; false otherwise.
    async fn clear_pending(&self, slot: &str, marker: &PendingHour) -> Result<bool, LedgerError>;
}

fn classify<E: ProvideErrorMetadata, R>(what: &str, err: SdkError<E, R>) -> LedgerError {
    let message = format!("{what}: {}", cdc_contract::aws::error_text(&err));
    match &err {
        SdkError::ServiceError(_) => match err.code().unwrap_or("") {
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

fn conditional_failed<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.code() == Some("ConditionalCheckFailedException")
}

/// The DynamoDB ledger.
pub struct DynamoLedger {
    client: Client,
    table: String,
}

impl DynamoLedger {
    /// A ledger in `table`.
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
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

    async fn query(&self, pk: String, before: Option<String>) -> Result<Vec<Item>, LedgerError> {
        let mut request = self
            .client
            .query()
            .table_name(&self.table)
            .consistent_read(true)
            .expression_attribute_values(":pk", items::s(pk));
        request = match before {
            Some(sk) => request
                .key_condition_expression("pk = :pk AND sk < :sk")
                .expression_attribute_values(":sk", items::s(sk)),
            None => request.key_condition_expression("pk = :pk"),
        };
        let mut pages = request.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            out.extend(
                page.map_err(|e| classify("query", e))?
                    .items()
                    .iter()
                    .cloned(),
            );
        }
        Ok(out)
    }

    /// Every hour record of a table (one query; used by `cdc-verify`), in hour order.
    pub async fn hour_records(
        &self,
        slot: &str,
        table: &TableName,
    ) -> Result<Vec<HourRecord>, LedgerError> {
        let items = self.query(items::hour_pk(slot, table), None).await?;
        let mut records = items
            .iter()
            .map(HourRecord::from_item)
            .collect::<Result<Vec<_>, _>>()?;
        records.sort_by_key(|r| r.hour);
        Ok(records)
    }

    async fn part_is(&self, slot: &str, part: &PartItem) -> Result<bool, LedgerError> {
        let item = self
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
}

fn built<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, LedgerError> {
    r.map_err(|e| LedgerError::Definite(format!("request: {e}")))
}

#[async_trait]
impl Ledger for DynamoLedger {
    async fn slots(&self) -> Result<Vec<String>, LedgerError> {
        let items = self.query(items::SLOTS_PK.to_owned(), None).await?;
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
            .get(items::slot_pk(slot), items::SNAPSHOT_SK.to_owned())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(SnapshotState::from_item(&item)?)),
        }
    }

    async fn checkpoint(&self, slot: &str) -> Result<Option<Checkpoint>, LedgerError> {
        match self
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
        let items = self.query(items::batch_pk(slot, table, hour), None).await?;
        items
            .iter()
            .map(|i| BatchItem::from_item(i).map_err(Into::into))
            .collect()
    }

    async fn flush_recorded(&self, slot: &str, id: &FlushId) -> Result<bool, LedgerError> {
        Ok(self
            .get(items::slot_pk(slot), items::flush_sk(id))
            .await?
            .is_some())
    }

    async fn schema(
        &self,
        slot: &str,
        table: &TableName,
        schema_id: &str,
    ) -> Result<Option<TableSchema>, LedgerError> {
        match self
            .get(items::schema_pk(slot, table), schema_id.to_owned())
            .await?
        {
            None => Ok(None),
            Some(item) => Ok(Some(SchemaItem::from_item(&item)?.schema)),
        }
    }

    async fn hour_record(
        &self,
        slot: &str,
        table: &TableName,
        hour: Hour,
    ) -> Result<Option<HourRecord>, LedgerError> {
        match self
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
        let items = self.query(items::part_pk(slot, table, hour), None).await?;
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
        let mut request = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(claimed.to_item(slot)));
        request = if seen_version == 0 {
            request.condition_expression("attribute_not_exists(pk)")
        } else {
            request
                .condition_expression("version = :v AND claim_until_ms < :now")
                .expression_attribute_values(":v", items::n(seen_version))
                .expression_attribute_values(":now", items::n(now_ms))
        };
        match request.send().await {
            Ok(_) => Ok(Claim::Claimed(claimed.clone())),
            Err(e) if conditional_failed(&e) => Ok(Claim::Busy),
            Err(e) => {
                // A lost reply: the claim may have been stored.
                let stored = self.hour_record(slot, &claimed.table, claimed.hour).await?;
                if stored.as_ref() == Some(claimed) {
                    Ok(Claim::Claimed(claimed.clone()))
                } else {
                    Err(classify("claim hour", e))
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
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::hour_pk(slot, &record.table),
                items::hour_sk(record.hour),
            )))
            .update_expression("SET claim_until_ms = :until")
            .condition_expression("version = :v AND claim_attempt = :me")
            .expression_attribute_values(":until", items::n(until_ms))
            .expression_attribute_values(":v", items::n(record.version))
            .expression_attribute_values(":me", items::s(record.claim_attempt.clone()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(classify("renew claim", e)),
        }
    }

    async fn record_part(
        &self,
        slot: &str,
        part: &PartItem,
        expected_version: u64,
        next: &HourRecord,
    ) -> Result<Recorded, LedgerError> {
        let part_put = built(
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(part.to_item(slot)))
                .condition_expression("attribute_not_exists(pk)")
                .build(),
        )?;
        let hour_put = built(
            Put::builder()
                .table_name(&self.table)
                .set_item(Some(next.to_item(slot)))
                .condition_expression("version = :v AND claim_attempt = :me")
                .expression_attribute_values(":v", items::n(expected_version))
                .expression_attribute_values(":me", items::s(next.claim_attempt.clone()))
                .build(),
        )?;
        let res = self
            .client
            .transact_write_items()
            .transact_items(TransactWriteItem::builder().put(part_put).build())
            .transact_items(TransactWriteItem::builder().put(hour_put).build())
            .client_request_token(format!(
                "{}-{:03}-{}",
                part.attempt, part.part, expected_version
            ))
            .send()
            .await;
        match res {
            Ok(_) => Ok(Recorded::Yes),
            Err(e) => {
                // Recognise our own earlier write whose reply was lost.
                if self.part_is(slot, part).await? {
                    return Ok(Recorded::Yes);
                }
                let cancelled = e
                    .as_service_error()
                    .is_some_and(|s| s.is_transaction_canceled_exception());
                if cancelled {
                    let reasons = e
                        .as_service_error()
                        .and_then(|s| match s {
                            aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError::TransactionCanceledException(c) => Some(
                                c.cancellation_reasons()
                                    .iter()
                                    .map(|r| r.code().unwrap_or("None").to_owned())
                                    .collect::<Vec<_>>(),
                            ),
                            _ => None,
                        })
                        .unwrap_or_default();
                    if reasons.iter().any(|r| r == "ConditionalCheckFailed") || reasons.is_empty() {
                        return Ok(Recorded::Lost);
                    }
                }
                Err(classify("record part", e))
            }
        }
    }

    async fn release_hour(&self, slot: &str, record: &HourRecord) -> Result<(), LedgerError> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::hour_pk(slot, &record.table),
                items::hour_sk(record.hour),
            )))
            .update_expression(
                "SET claim_until_ms = :zero, updated_ms = :now, recheck_after_ms = :recheck",
            )
            .condition_expression("version = :v AND claim_attempt = :me")
            .expression_attribute_values(":zero", items::n(0))
            .expression_attribute_values(":recheck", items::n(record.recheck_after_ms))
            .expression_attribute_values(":now", items::n(crate::now_ms()))
            .expression_attribute_values(":v", items::n(record.version))
            .expression_attribute_values(":me", items::s(record.claim_attempt.clone()))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if conditional_failed(&e) => Ok(()),
            Err(e) => Err(classify("release hour", e)),
        }
    }

    async fn mark_compacted(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), LedgerError> {
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(items::key(batch.pk(slot), batch.sk())))
            .update_expression("SET compacted = :t, #ttl = :exp")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#ttl", items::TTL_ATTRIBUTE)
            .expression_attribute_values(":t", AttributeValue::Bool(true))
            .expression_attribute_values(":exp", items::n(expires_at))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Already expired: nothing to mark.
            Err(e) if conditional_failed(&e) => Ok(()),
            Err(e) => Err(classify("mark batch compacted", e)),
        }
    }

    async fn flush_hour_done(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), LedgerError> {
        let key = items::key(items::slot_pk(slot), items::flush_sk(&batch.flush_id));
        // A string set: adding the same table-hour again (a retried compaction) changes nothing.
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression("ADD done_hours :h")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(
                ":h",
                AttributeValue::Ss(vec![items::pending_sk(batch.hour, &batch.table)]),
            )
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .send()
            .await;
        let record = match res {
            Ok(out) => out.attributes.unwrap_or_default(),
            Err(e) if conditional_failed(&e) => return Ok(()),
            Err(e) => return Err(classify("note flush hour compacted", e)),
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
        let res = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET #ttl = :exp")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_names("#ttl", items::TTL_ATTRIBUTE)
            .expression_attribute_values(":exp", items::n(expires_at))
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            Err(e) if conditional_failed(&e) => Ok(()),
            Err(e) => Err(classify("expire flush record", e)),
        }
    }

    async fn delete_batch(&self, slot: &str, batch: &BatchItem) -> Result<(), LedgerError> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(items::key(batch.pk(slot), batch.sk())))
            .send()
            .await
            .map_err(|e| classify("delete batch item", e))?;
        Ok(())
    }

    async fn clear_pending(&self, slot: &str, marker: &PendingHour) -> Result<bool, LedgerError> {
        let res = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(items::key(
                items::pending_pk(slot),
                items::pending_sk(marker.hour, &marker.table),
            )))
            .condition_expression("flush_seq = :seen")
            .expression_attribute_values(":seen", items::n(marker.flush_seq))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if conditional_failed(&e) => Ok(false),
            Err(e) => Err(classify("clear pending hour", e)),
        }
    }
}
