//! The SQS notification the capture sends after recording a flush.
//!
//! It only speeds compaction up: a compactor that receives any notification compacts every closed
//! hour the ledger holds as pending, not only the ones named here.

use serde::{Deserialize, Serialize};

use crate::{Hour, TableName};

/// One notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The slot (pipeline) that recorded the flush.
    pub slot: String,
    /// The flush that was recorded.
    pub flush_id: String,
    /// Commit time of the last recorded transaction (ms since the epoch).
    pub commit_ms: i64,
    /// When the capture was last caught up (ms since the epoch), if ever.
    #[serde(default)]
    pub caught_up_ms: Option<i64>,
    /// The table-hours the flush added batches to.
    #[serde(default)]
    pub hours: Vec<TableHour>,
}

/// A table and an hour.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableHour {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
}
