//! The Lambda handler: which trigger an event is, and the answer.
//!
//! - SQS (event source mapping): `{"Records":[{"messageId", "body", ...}]}`, each body a
//!   `cdc_contract::notify::Notification`. Any notification triggers a full sweep; the answer is
//!   the partial batch failure response naming the messages whose body did not parse or that
//!   name a table-hour whose compaction failed (every message when the sweep could not run).
//! - The EventBridge schedule: constant input `{"action":"sweep"}` (an unmodified scheduled
//!   event is a sweep too).
//! - Direct invokes: `{"action":"sweep","include_open":true}`,
//!   `{"action":"compact","table":"public.users","hour":"2025-01-08T10"}` (optional `"slot"`).
//!
//! Events are parsed with `serde_json` here rather than through `aws_lambda_events`: the
//! compactor reads two fields of the SQS record, and a bad message must be reported by id, not
//! fail the whole batch's deserialisation.

use serde::Serialize;
use serde_json::Value;

use cdc_contract::notify::Notification;
use cdc_contract::{Hour, TableName};

use crate::{Compactor, SweepReport, SweepRequest};

/// One SQS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqsMessage {
    /// Its message id (the partial batch failure response names it).
    pub id: String,
    /// Its body.
    pub body: Option<String>,
}

/// What an event asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// SQS notifications.
    Sqs(Vec<SqsMessage>),
    /// A sweep.
    Sweep {
        /// Compact open hours too.
        include_open: bool,
    },
    /// One table-hour (closed or not), then the usual sweep.
    Compact {
        /// The table.
        table: TableName,
        /// The hour.
        hour: Hour,
        /// Only this slot's.
        slot: Option<String>,
    },
}

/// An event the compactor does not understand.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("bad event: {0}")]
pub struct BadEvent(pub String);

/// Why a handler call failed as a whole (Lambda reports it as an error).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The event is not one the compactor understands; retrying it cannot help.
    #[error(transparent)]
    BadEvent(#[from] BadEvent),
    /// The sweep could not run (the ledger is unreachable).
    #[error("sweep failed: {0}")]
    Sweep(#[from] crate::ledger::LedgerError),
    /// The sweep ran, but hours (or slots) failed: the invocation fails so the platform sees it
    /// (the Lambda's Errors metric and alarm); the report went to the log.
    #[error("{count} hour(s) or slot(s) failed, first: {first}")]
    HoursFailed {
        /// How many.
        count: usize,
        /// The first failure, as `slot table hour: error`.
        first: String,
        /// True when every failure may go away by itself.
        transient: bool,
    },
}

impl HandlerError {
    /// True when a retry may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            HandlerError::BadEvent(_) => false,
            HandlerError::Sweep(e) => e.is_transient(),
            HandlerError::HoursFailed { transient, .. } => *transient,
        }
    }
}

/// Reads the trigger of an event.
pub fn parse_trigger(event: &Value) -> Result<Trigger, BadEvent> {
    let obj = event
        .as_object()
        .ok_or_else(|| BadEvent("the event is not a JSON object".into()))?;
    if let Some(records) = obj.get("Records") {
        let records = records
            .as_array()
            .ok_or_else(|| BadEvent("Records is not an array".into()))?;
        let messages = records
            .iter()
            .map(|r| {
                let id = r
                    .get("messageId")
                    .and_then(Value::as_str)
                    .ok_or_else(|| BadEvent("an SQS record has no messageId".into()))?;
                Ok(SqsMessage {
                    id: id.to_owned(),
                    body: r.get("body").and_then(Value::as_str).map(str::to_owned),
                })
            })
            .collect::<Result<Vec<_>, BadEvent>>()?;
        return Ok(Trigger::Sqs(messages));
    }
    match obj.get("action").and_then(Value::as_str) {
        Some("sweep") => Ok(Trigger::Sweep {
            include_open: match obj.get("include_open") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(BadEvent("include_open is not true or false".into())),
            },
        }),
        Some("compact") => {
            let table = obj
                .get("table")
                .and_then(Value::as_str)
                .ok_or_else(|| BadEvent("compact needs \"table\": \"schema.table\"".into()))?
                .parse()
                .map_err(|e: cdc_contract::ParseError| BadEvent(e.to_string()))?;
            let hour = obj
                .get("hour")
                .and_then(Value::as_str)
                .ok_or_else(|| BadEvent("compact needs \"hour\": \"YYYY-MM-DDTHH\"".into()))?
                .parse()
                .map_err(|e: cdc_contract::ParseError| BadEvent(e.to_string()))?;
            let slot = match obj.get("slot") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(_) => return Err(BadEvent("slot is not a string".into())),
            };
            Ok(Trigger::Compact { table, hour, slot })
        }
        Some(other) => Err(BadEvent(format!(
            "unknown action {other:?} (expected sweep or compact)"
        ))),
        None if obj.get("source").and_then(Value::as_str) == Some("aws.events")
            || obj.get("detail-type").and_then(Value::as_str) == Some("Scheduled Event") =>
        {
            Ok(Trigger::Sweep {
                include_open: false,
            })
        }
        None => Err(BadEvent(
            "expected SQS Records or an \"action\" (sweep, compact)".into(),
        )),
    }
}

/// The partial batch failure response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchResponse {
    /// Failed messages.
    #[serde(rename = "batchItemFailures")]
    pub failures: Vec<ItemFailure>,
}

/// One failed message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ItemFailure {
    /// Its message id.
    #[serde(rename = "itemIdentifier")]
    pub id: String,
}

fn report_json(report: &SweepReport) -> Value {
    serde_json::to_value(report).unwrap_or(Value::Null)
}

/// The report as the answer, or an error when anything failed.
fn answer(report: &SweepReport) -> Result<Value, HandlerError> {
    let Some(first) = report.failures.first() else {
        return Ok(report_json(report));
    };
    tracing::error!(report = %report_json(report), "sweep finished with failures");
    Err(HandlerError::HoursFailed {
        count: report.failures.len(),
        first: format!(
            "{} {} {}: {}",
            first.slot,
            first.table.as_deref().unwrap_or("-"),
            first.hour.as_deref().unwrap_or("-"),
            first.error
        ),
        transient: report.failures.iter().all(|f| f.transient),
    })
}

/// True when `note` names an hour that failed in `report` (or its slot failed as a whole).
fn names_a_failure(note: &Notification, report: &SweepReport) -> bool {
    report.failures.iter().any(|f| {
        f.slot == note.slot
            && match (&f.table, &f.hour) {
                (Some(table), Some(hour)) => note
                    .hours
                    .iter()
                    .any(|h| h.table.to_string() == *table && h.hour.to_string() == *hour),
                _ => true,
            }
    })
}

impl Compactor {
    /// Answers one Lambda event.
    pub async fn handle(&self, event: Value) -> Result<Value, HandlerError> {
        self.handle_until(event, None).await
    }

    /// Answers one Lambda event, stopping by `stop_at` (the invocation's deadline less the
    /// margin): parts end cleanly and what is left stays pending for the next run.
    pub async fn handle_until(
        &self,
        event: Value,
        stop_at: Option<std::time::Instant>,
    ) -> Result<Value, HandlerError> {
        match parse_trigger(&event)? {
            Trigger::Sqs(messages) => {
                let mut failures = Vec::new();
                let mut notes = Vec::new();
                for m in &messages {
                    let parsed = m.body.as_deref().map(serde_json::from_str::<Notification>);
                    match parsed {
                        Some(Ok(note)) => {
                            tracing::debug!(message = %m.id, slot = %note.slot, flush = %note.flush_id, "notification");
                            notes.push((m.id.clone(), note));
                        }
                        Some(Err(e)) => {
                            tracing::warn!(message = %m.id, error = %e, "notification does not parse");
                            failures.push(ItemFailure { id: m.id.clone() });
                        }
                        None => {
                            tracing::warn!(message = %m.id, "notification has no body");
                            failures.push(ItemFailure { id: m.id.clone() });
                        }
                    }
                }
                let request = SweepRequest {
                    stop_at,
                    ..Default::default()
                };
                match self.sweep(&request).await {
                    Ok(report) => {
                        // A message naming an hour that failed is reported failed: SQS delivers it
                        // again, and after the queue's receive limit it lands in the dead-letter
                        // queue, whose alarm fires.
                        for (id, note) in &notes {
                            if names_a_failure(note, &report) {
                                failures.push(ItemFailure { id: id.clone() });
                            }
                        }
                        tracing::info!(
                            messages = messages.len(),
                            bad = failures.len(),
                            rows = report.rows(),
                            pending = report.pending_closed_hours,
                            "sqs batch handled"
                        );
                    }
                    Err(e) => {
                        // The notifications are hints; redelivery retries the sweep sooner than
                        // the schedule would.
                        tracing::error!(error = %e, "sweep failed; every message is reported failed");
                        failures = messages
                            .iter()
                            .map(|m| ItemFailure { id: m.id.clone() })
                            .collect();
                    }
                }
                Ok(serde_json::to_value(BatchResponse { failures }).unwrap_or(Value::Null))
            }
            Trigger::Sweep { include_open } => {
                let report = self
                    .sweep(&SweepRequest {
                        include_open,
                        stop_at,
                        ..Default::default()
                    })
                    .await?;
                answer(&report)
            }
            Trigger::Compact { table, hour, slot } => {
                let report = self
                    .sweep(&SweepRequest {
                        include_open: false,
                        only: Some((table, hour)),
                        slot,
                        stop_at,
                    })
                    .await?;
                answer(&report)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn triggers_are_told_apart() {
        assert_eq!(
            parse_trigger(&json!({"action": "sweep"})).unwrap(),
            Trigger::Sweep {
                include_open: false
            }
        );
        assert_eq!(
            parse_trigger(&json!({"action": "sweep", "include_open": true})).unwrap(),
            Trigger::Sweep { include_open: true }
        );
        assert_eq!(
            parse_trigger(
                &json!({"source": "aws.events", "detail-type": "Scheduled Event", "detail": {}})
            )
            .unwrap(),
            Trigger::Sweep {
                include_open: false
            }
        );
        assert_eq!(
            parse_trigger(
                &json!({"action": "compact", "table": "public.users", "hour": "2025-01-08T10"})
            )
            .unwrap(),
            Trigger::Compact {
                table: TableName::new("public", "users"),
                hour: "2025-01-08T10".parse().unwrap(),
                slot: None
            }
        );
        let sqs = parse_trigger(&json!({"Records": [
            {"messageId": "a", "body": "{}", "eventSource": "aws:sqs"},
            {"messageId": "b"}
        ]}))
        .unwrap();
        assert_eq!(
            sqs,
            Trigger::Sqs(vec![
                SqsMessage {
                    id: "a".into(),
                    body: Some("{}".into())
                },
                SqsMessage {
                    id: "b".into(),
                    body: None
                }
            ])
        );
    }

    #[test]
    fn bad_events_say_what_is_wrong() {
        for bad in [
            json!([]),
            json!({"action": "dance"}),
            json!({"action": "compact", "table": "users", "hour": "2025-01-08T10"}),
            json!({"action": "compact", "table": "public.users", "hour": "2025-01-08"}),
            json!({"action": "sweep", "include_open": "yes"}),
            json!({"Records": [{"body": "x"}]}),
            json!({"hello": 1}),
        ] {
            assert!(parse_trigger(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_batch_response_has_the_lambda_shape() {
        let r = BatchResponse {
            failures: vec![ItemFailure { id: "m2".into() }],
        };
        assert_eq!(
            serde_json::to_value(r).unwrap(),
            json!({"batchItemFailures": [{"itemIdentifier": "m2"}]})
        );
    }
}
