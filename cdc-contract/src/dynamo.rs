//! The ledger table as both deployables and `cdc-verify` use it: consistent reads, paged
//! queries, conditional writes and transactions, with conditional failures answered as outcomes
//! ([`Outcome::ConditionFailed`], [`Tx::Cancelled`]) and every other failure classified once
//! ([`AwsError::dynamodb`]).

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, KeysAndAttributes, Put, PutRequest, ReturnValue,
    TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;

use crate::aws::AwsError;
use crate::ledger::{key, s, Item};

/// Items DynamoDB takes in one batch write.
pub const BATCH_WRITE_MAX: usize = 25;

/// Keys DynamoDB takes in one batch read.
const BATCH_GET_MAX: usize = 100;

/// The expression parts of a conditional write: the update (for [`Table::update`]), the
/// condition, and the names and values they use.
#[derive(Debug, Clone, Default)]
pub struct Expr {
    update: Option<String>,
    condition: Option<String>,
    names: HashMap<String, String>,
    values: HashMap<String, AttributeValue>,
}

impl Expr {
    /// A write on condition `condition`.
    pub fn when(condition: &str) -> Self {
        Self {
            condition: Some(condition.to_owned()),
            ..Self::default()
        }
    }

    /// An update `update`, unconditional until [`Expr::and_when`].
    pub fn update(update: &str) -> Self {
        Self {
            update: Some(update.to_owned()),
            ..Self::default()
        }
    }

    /// Adds the condition.
    pub fn and_when(mut self, condition: &str) -> Self {
        self.condition = Some(condition.to_owned());
        self
    }

    /// Adds the update (to a condition made with [`Expr::when`]).
    pub fn and_update(mut self, update: &str) -> Self {
        self.update = Some(update.to_owned());
        self
    }

    /// Binds the attribute-name placeholder `placeholder` (`#x`).
    pub fn name(mut self, placeholder: &str, attribute: &str) -> Self {
        self.names
            .insert(placeholder.to_owned(), attribute.to_owned());
        self
    }

    /// Binds the value placeholder `placeholder` (`:x`).
    pub fn value(mut self, placeholder: &str, value: AttributeValue) -> Self {
        self.values.insert(placeholder.to_owned(), value);
        self
    }

    fn names(&self) -> Option<HashMap<String, String>> {
        (!self.names.is_empty()).then(|| self.names.clone())
    }

    fn values(&self) -> Option<HashMap<String, AttributeValue>> {
        (!self.values.is_empty()).then(|| self.values.clone())
    }
}

/// How a conditional write ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome<T = ()> {
    /// Written; for an update, the item as it is now.
    Written(T),
    /// The condition did not hold: nothing was written.
    ConditionFailed,
}

impl<T> Outcome<T> {
    /// True when the write happened.
    pub fn written(&self) -> bool {
        matches!(self, Outcome::Written(_))
    }
}

/// One write of a transaction.
#[derive(Debug, Clone)]
pub enum TxWrite {
    /// Nothing is written unless the item at `key` meets the condition.
    Check {
        /// The item's key.
        key: Item,
        /// The condition (and its names and values).
        expr: Expr,
    },
    /// Puts `item`, on the condition if one is given.
    Put {
        /// The whole item.
        item: Item,
        /// Its condition, if any.
        expr: Option<Expr>,
    },
}

/// How a transaction ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tx {
    /// Every write happened.
    Committed,
    /// Nothing happened; DynamoDB's reason per write (`None`, `ConditionalCheckFailed`,
    /// `TransactionConflict`, ...), empty when the service gave none.
    Cancelled(Vec<String>),
}

impl Tx {
    /// True when the transaction was cancelled because a condition did not hold (or the service
    /// gave no reasons, which only conditions cause in practice).
    pub fn by_condition(&self) -> bool {
        match self {
            Tx::Committed => false,
            Tx::Cancelled(reasons) => {
                reasons.is_empty() || reasons.iter().any(|r| r == "ConditionalCheckFailed")
            }
        }
    }
}

/// The ledger table.
#[derive(Debug, Clone)]
pub struct Table {
    client: Client,
    name: String,
}

fn is_condition_failure<E: ProvideErrorMetadata, R>(err: &SdkError<E, R>) -> bool {
    err.code() == Some("ConditionalCheckFailedException")
}

/// A conditional write's reply: written (its output mapped by `written`), refused by its
/// condition, or failed.
fn outcome<O, T, E: ProvideErrorMetadata, R>(
    what: &str,
    res: Result<O, SdkError<E, R>>,
    written: impl FnOnce(O) -> T,
) -> Result<Outcome<T>, AwsError> {
    match res {
        Ok(out) => Ok(Outcome::Written(written(out))),
        Err(e) if is_condition_failure(&e) => Ok(Outcome::ConditionFailed),
        Err(e) => Err(AwsError::dynamodb(what, e)),
    }
}

fn built<T, E: std::fmt::Display>(what: &str, r: Result<T, E>) -> Result<T, AwsError> {
    r.map_err(|e| AwsError::Definite(format!("DynamoDB {what}: request: {e}")))
}

impl Table {
    /// The table `name`.
    pub fn new(client: Client, name: impl Into<String>) -> Self {
        Self {
            client,
            name: name.into(),
        }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Fails with a clear error when the table does not exist or cannot be reached.
    pub async fn check(&self) -> Result<(), AwsError> {
        self.client
            .describe_table()
            .table_name(&self.name)
            .send()
            .await
            .map_err(|e| AwsError::dynamodb(&format!("ledger table {}", self.name), e))?;
        Ok(())
    }

    /// The item at (`pk`, `sk`), read consistently.
    pub async fn get(&self, pk: String, sk: String) -> Result<Option<Item>, AwsError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.name)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| AwsError::dynamodb("get item", e))?;
        Ok(out.item)
    }

    /// Every item under `pk` (only those whose sort key is below `below`, when given), read
    /// consistently, page by page, in sort-key order.
    pub async fn query(&self, pk: String, below: Option<String>) -> Result<Vec<Item>, AwsError> {
        let mut request = self
            .client
            .query()
            .table_name(&self.name)
            .consistent_read(true)
            .expression_attribute_values(":pk", s(pk));
        request = match below {
            Some(sk) => request
                .key_condition_expression("pk = :pk AND sk < :sk")
                .expression_attribute_values(":sk", s(sk)),
            None => request.key_condition_expression("pk = :pk"),
        };
        let mut pages = request.into_paginator().send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            out.extend(
                page.map_err(|e| AwsError::dynamodb("query", e))?
                    .items
                    .unwrap_or_default(),
            );
        }
        Ok(out)
    }

    /// Every item of partition `pk` whose sort key starts with `prefix`, in sort key order.
    pub async fn query_prefix(&self, pk: String, prefix: &str) -> Result<Vec<Item>, AwsError> {
        let mut pages = self
            .client
            .query()
            .table_name(&self.name)
            .consistent_read(true)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(pk))
            .expression_attribute_values(":prefix", s(prefix))
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            out.extend(
                page.map_err(|e| AwsError::dynamodb("query", e))?
                    .items
                    .unwrap_or_default(),
            );
        }
        Ok(out)
    }

    /// Puts `item`, on `expr`'s condition when given.
    pub async fn put(
        &self,
        what: &str,
        item: Item,
        expr: Option<Expr>,
    ) -> Result<Outcome, AwsError> {
        let expr = expr.unwrap_or_default();
        let res = self
            .client
            .put_item()
            .table_name(&self.name)
            .set_item(Some(item))
            .set_condition_expression(expr.condition.clone())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .send()
            .await;
        outcome(what, res, |_| ())
    }

    /// Updates the item at `key` by `expr` (on its condition, if any); returns the item as it is
    /// after the update.
    pub async fn update(
        &self,
        what: &str,
        key: Item,
        expr: Expr,
    ) -> Result<Outcome<Item>, AwsError> {
        let res = self
            .update_item(key, &expr, ReturnValue::AllNew)
            .send()
            .await;
        outcome(what, res, |out| out.attributes.unwrap_or_default())
    }

    /// [`Table::update`] without the item in the reply, for writes that only need to know
    /// whether they were made: a smaller reply for DynamoDB to send and the client to read.
    pub async fn update_only(
        &self,
        what: &str,
        key: Item,
        expr: Expr,
    ) -> Result<Outcome, AwsError> {
        let res = self.update_item(key, &expr, ReturnValue::None).send().await;
        outcome(what, res, |_| ())
    }

    fn update_item(
        &self,
        key: Item,
        expr: &Expr,
        returned: ReturnValue,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.name)
            .set_key(Some(key))
            .set_update_expression(expr.update.clone())
            .set_condition_expression(expr.condition.clone())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .return_values(returned)
    }

    /// Deletes the item at `key`, on `expr`'s condition when given. Deleting an absent item
    /// without a condition succeeds.
    pub async fn delete(
        &self,
        what: &str,
        key: Item,
        expr: Option<Expr>,
    ) -> Result<Outcome, AwsError> {
        let expr = expr.unwrap_or_default();
        let res = self
            .client
            .delete_item()
            .table_name(&self.name)
            .set_key(Some(key))
            .set_condition_expression(expr.condition.clone())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .send()
            .await;
        outcome(what, res, |_| ())
    }

    /// Writes `writes` all or nothing. `token` makes a retry within ten minutes idempotent.
    pub async fn transact(
        &self,
        what: &str,
        writes: Vec<TxWrite>,
        token: Option<String>,
    ) -> Result<Tx, AwsError> {
        let mut items = Vec::with_capacity(writes.len());
        for write in writes {
            let item = match write {
                TxWrite::Check { key, expr } => TransactWriteItem::builder()
                    .condition_check(built(
                        what,
                        ConditionCheck::builder()
                            .table_name(&self.name)
                            .set_key(Some(key))
                            .set_condition_expression(expr.condition.clone())
                            .set_expression_attribute_names(expr.names())
                            .set_expression_attribute_values(expr.values())
                            .build(),
                    )?)
                    .build(),
                TxWrite::Put { item, expr } => {
                    let expr = expr.unwrap_or_default();
                    let put = Put::builder()
                        .table_name(&self.name)
                        .set_item(Some(item))
                        .set_condition_expression(expr.condition.clone())
                        .set_expression_attribute_names(expr.names())
                        .set_expression_attribute_values(expr.values())
                        .build();
                    TransactWriteItem::builder().put(built(what, put)?).build()
                }
            };
            items.push(item);
        }
        let res = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .set_client_request_token(token)
            .send()
            .await;
        match res {
            Ok(_) => Ok(Tx::Committed),
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => {
                    Ok(Tx::Cancelled(
                        c.cancellation_reasons()
                            .iter()
                            .map(|r| r.code().unwrap_or("None").to_owned())
                            .collect(),
                    ))
                }
                _ => Err(AwsError::dynamodb(what, e)),
            },
        }
    }

    /// The items at `keys` (pairs of `pk` and `sk`) that exist, read consistently,
    /// [`BATCH_GET_MAX`] keys per request, asking again for what DynamoDB left unprocessed
    /// (with a short backoff, a few times). In no particular order.
    pub async fn get_all(
        &self,
        what: &str,
        keys: Vec<(String, String)>,
    ) -> Result<Vec<Item>, AwsError> {
        let mut found = Vec::with_capacity(keys.len());
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            let chunk: Vec<Item> = keys
                .by_ref()
                .take(BATCH_GET_MAX)
                .map(|(pk, sk)| key(pk, sk))
                .collect();
            let mut request = Some(built(
                what,
                KeysAndAttributes::builder()
                    .set_keys(Some(chunk))
                    .consistent_read(true)
                    .build(),
            )?);
            let mut attempt = 0u32;
            while let Some(keys_and_attributes) = request.take() {
                let out = self
                    .client
                    .batch_get_item()
                    .request_items(&self.name, keys_and_attributes)
                    .send()
                    .await
                    .map_err(|e| AwsError::dynamodb(what, e))?;
                if let Some(mut responses) = out.responses {
                    found.extend(responses.remove(&self.name).unwrap_or_default());
                }
                request = out
                    .unprocessed_keys
                    .and_then(|mut m| m.remove(&self.name))
                    .filter(|k| !k.keys.is_empty());
                attempt += 1;
                if request.is_some() {
                    if attempt > 8 {
                        return Err(AwsError::Transient(format!(
                            "DynamoDB {what}: keys left unprocessed"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
                }
            }
        }
        Ok(found)
    }

    /// Puts every item unconditionally, [`BATCH_WRITE_MAX`] per request, writing again what
    /// DynamoDB left unprocessed (with a short backoff, a few times).
    pub async fn put_all(&self, what: &str, items: Vec<Item>) -> Result<(), AwsError> {
        let mut items = items.into_iter().peekable();
        while items.peek().is_some() {
            let mut requests: Vec<WriteRequest> = Vec::with_capacity(BATCH_WRITE_MAX);
            for item in items.by_ref().take(BATCH_WRITE_MAX) {
                let put = built(what, PutRequest::builder().set_item(Some(item)).build())?;
                requests.push(WriteRequest::builder().put_request(put).build());
            }
            let mut attempt = 0u32;
            while !requests.is_empty() {
                let out = self
                    .client
                    .batch_write_item()
                    .request_items(&self.name, requests)
                    .send()
                    .await
                    .map_err(|e| AwsError::dynamodb(what, e))?;
                requests = out
                    .unprocessed_items
                    .and_then(|mut m| m.remove(&self.name))
                    .unwrap_or_default();
                attempt += 1;
                if !requests.is_empty() {
                    if attempt > 8 {
                        return Err(AwsError::Transient(format!(
                            "DynamoDB {what}: items left unprocessed"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(50 << attempt.min(5))).await;
                }
            }
        }
        Ok(())
    }
}
