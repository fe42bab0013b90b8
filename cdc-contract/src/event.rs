//! The change event: a Debezium-compatible envelope, one JSON object per line.
//!
//! Value forms (the capture writes them, the compactor types Parquet from them): integers and
//! floats as numbers (`"NaN"`, `"Infinity"`, `"-Infinity"` as strings), numeric as exact strings
//! (`"NaN"` too), bool as true/false, timestamptz as `2025-01-08T10:30:00.123456Z` (always six
//! fractional digits), timestamp as `2025-01-08T10:30:00.123456`, `infinity`/`-infinity` text for
//! infinite timestamps and dates (listed in `raw_columns`), date `YYYY-MM-DD`, time and timetz as
//! PostgreSQL prints them (`10:30:00.5`, `10:30:00+02`), interval as an ISO-8601 duration
//! (`P1Y2M3DT4H5M6.5S`), uuid as a string, json/jsonb as nested JSON, bytea as base64, arrays as
//! JSON arrays of element values, enums and every other type as PostgreSQL's text form, NULL as
//! null, an unchanged TOASTed value as [`UNAVAILABLE_VALUE`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Lsn, Position};

/// The placeholder Debezium writes for an unchanged TOASTed value.
pub const UNAVAILABLE_VALUE: &str = "__debezium_unavailable_value";

/// Connector name in `source.connector`.
pub const CONNECTOR: &str = "postgresql";

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Insert.
    #[serde(rename = "c")]
    Create,
    /// Update.
    #[serde(rename = "u")]
    Update,
    /// Delete.
    #[serde(rename = "d")]
    Delete,
    /// Snapshot read.
    #[serde(rename = "r")]
    Read,
    /// Truncate.
    #[serde(rename = "t")]
    Truncate,
}

impl Op {
    /// The one-letter code.
    pub fn code(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Read => "r",
            Op::Truncate => "t",
        }
    }
}

/// A row image: column name to natural JSON value.
pub type Row = Map<String, Value>;

/// One change event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeEvent {
    /// The row before the change (updates and deletes, per REPLICA IDENTITY), else null.
    pub before: Option<Row>,
    /// The row after the change (inserts, updates, snapshot reads), else null.
    pub after: Option<Row>,
    /// Where the change came from.
    pub source: Source,
    /// What happened.
    pub op: Op,
    /// When the capture processed the change (ms since the epoch).
    pub ts_ms: i64,
    /// The transaction block.
    pub transaction: Transaction,
    /// Columns whose value could not be converted and is given as PostgreSQL's text form.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub raw_columns: Vec<String>,
}

impl ChangeEvent {
    /// The event's order and dedup key.
    pub fn position(&self) -> Position {
        Position::new(Lsn(self.source.commit_lsn), self.transaction.total_order)
    }
}

/// The `source` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// Version of the capture that wrote the event.
    pub version: String,
    /// Always `postgresql`.
    pub connector: String,
    /// Logical name of the pipeline (the slot name).
    pub name: String,
    /// Commit time of the transaction (ms since the epoch).
    pub ts_ms: i64,
    /// Commit time of the transaction (µs since the epoch), as Debezium 2.x writes it.
    pub ts_us: i64,
    /// `"true"` for snapshot reads, else `"false"`.
    pub snapshot: String,
    /// Database name.
    pub db: String,
    /// Debezium's sequence: a JSON array text of the last commit LSN and this change's LSN.
    pub sequence: String,
    /// PostgreSQL schema.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Transaction id.
    #[serde(rename = "txId")]
    pub tx_id: Option<i64>,
    /// The change's own WAL LSN.
    pub lsn: u64,
    /// The LSN of the transaction's commit.
    pub commit_lsn: u64,
}

/// The `transaction` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transaction {
    /// `{txId}:{commit LSN}`.
    pub id: String,
    /// 1-based ordinal of the change within its transaction.
    pub total_order: u32,
    /// 1-based ordinal of the change among the transaction's changes to this table.
    pub data_collection_order: u32,
}
