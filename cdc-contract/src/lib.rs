//! What the capture and the compactor must agree on.
//!
//! Positions ([`Lsn`], [`Position`]), names ([`TableName`], [`Hour`]), the S3 key layout
//! ([`layout`]), the change event ([`event`]), table schemas ([`schema`]), the DynamoDB ledger's
//! item layouts ([`ledger`]), the SQS notification ([`notify`]) and the metric names ([`metrics`]).
//! Each type formats and parses itself here and nowhere else.

pub mod aws;
pub mod dynamo;
pub mod event;
pub mod flags;
pub mod hour;
pub mod layout;
pub mod ledger;
pub mod lsn;
pub mod metrics;
pub mod notify;
pub mod retry;
pub mod schema;
pub mod table;

pub use hour::Hour;
pub use lsn::{Lsn, Position};
pub use table::TableName;

/// A value that could not be parsed from its text form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {what}: {input:?}")]
pub struct ParseError {
    /// What was being parsed ("LSN", "position", "table name", ...).
    pub what: &'static str,
    /// The text that was refused.
    pub input: String,
}

impl ParseError {
    pub(crate) fn new(what: &'static str, input: &str) -> Self {
        Self {
            what,
            input: input.to_owned(),
        }
    }
}
