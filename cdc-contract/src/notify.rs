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

/// The message body size notifications keep within: SQS's limit before 2025, when it was raised
/// to 1 MiB (a queue's own `MaximumMessageSize` may still be lower).
pub const SQS_MAX_BODY_BYTES: usize = 256 * 1024;

impl Notification {
    /// The notification as JSON message bodies of at most `max_bytes` each: one body when it
    /// fits, else the same notification with its table-hours shared out in order (a table-hour
    /// too large for a body even alone gets a body of its own).
    pub fn bodies(&self, max_bytes: usize) -> Result<Vec<String>, serde_json::Error> {
        let whole = serde_json::to_string(self)?;
        if whole.len() <= max_bytes || self.hours.len() <= 1 {
            return Ok(vec![whole]);
        }
        let empty = Notification {
            hours: Vec::new(),
            ..self.clone()
        };
        let with = |hours: Vec<TableHour>| {
            serde_json::to_string(&Notification {
                hours,
                ..empty.clone()
            })
        };
        let base = serde_json::to_string(&empty)?.len();
        let mut bodies = Vec::new();
        let mut piece = Vec::new();
        let mut size = base;
        for hour in &self.hours {
            // The table-hour and the comma before it.
            let len = serde_json::to_string(hour)?.len() + 1;
            if !piece.is_empty() && size + len > max_bytes {
                bodies.push(with(std::mem::take(&mut piece))?);
                size = base;
            }
            piece.push(hour.clone());
            size += len;
        }
        bodies.push(with(piece)?);
        Ok(bodies)
    }
}

/// A table and an hour.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TableHour {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(hours: Vec<TableHour>) -> Notification {
        Notification {
            slot: "app".into(),
            flush_id: "000000000007-3".into(),
            commit_ms: 1_736_332_200_123,
            caught_up_ms: Some(1_736_332_200_000),
            hours,
        }
    }

    fn hours(n: usize) -> Vec<TableHour> {
        (0..n)
            .map(|i| TableHour {
                table: TableName::new("public", format!("a_table_with_a_rather_long_name_{i:05}")),
                hour: "2025-01-08T10".parse().expect("an hour"),
            })
            .collect()
    }

    #[test]
    fn a_notification_that_fits_is_one_body() {
        let n = note(hours(3));
        let bodies = n.bodies(SQS_MAX_BODY_BYTES).expect("bodies");
        assert_eq!(bodies, vec![serde_json::to_string(&n).expect("json")]);
    }

    #[test]
    fn a_notification_too_large_for_one_message_is_shared_out_in_order() {
        let n = note(hours(5000));
        assert!(serde_json::to_string(&n).expect("json").len() > SQS_MAX_BODY_BYTES);
        let bodies = n.bodies(SQS_MAX_BODY_BYTES).expect("bodies");
        assert!(bodies.len() > 1);
        let mut all = Vec::new();
        for body in &bodies {
            assert!(body.len() <= SQS_MAX_BODY_BYTES, "{} bytes", body.len());
            let piece: Notification = serde_json::from_str(body).expect("a notification");
            assert_eq!(
                note(Vec::new()),
                Notification {
                    hours: Vec::new(),
                    ..piece.clone()
                }
            );
            assert!(!piece.hours.is_empty());
            all.extend(piece.hours);
        }
        assert_eq!(all, n.hours);
        // A table-hour larger than the limit alone still goes, in a body of its own.
        let bodies = note(hours(3)).bodies(10).expect("bodies");
        assert_eq!(bodies.len(), 3);
    }
}
