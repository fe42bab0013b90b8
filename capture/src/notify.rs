//! Telling the compactor a flush was recorded. SQS only speeds compaction up: a failed send is
//! logged and the compactor's sweep finds the hours anyway.

use async_trait::async_trait;

use cdc_contract::notify::{Notification, SQS_MAX_BODY_BYTES};

/// Sends notifications.
#[async_trait]
pub trait Notifier: Send + Sync {
    /// Sends one notification; an error is for logging only.
    async fn notify(&self, note: &Notification) -> Result<(), String>;
}

/// Notifications to an SQS queue.
pub struct SqsNotifier {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsNotifier {
    /// A notifier for the queue at `queue_url` (taken from configuration, never built by hand).
    pub fn new(client: aws_sdk_sqs::Client, queue_url: String) -> Self {
        Self { client, queue_url }
    }
}

#[async_trait]
impl Notifier for SqsNotifier {
    /// Sends the notification in as many messages as SQS's size limit needs (a flush of many
    /// table-hours); every message is tried, and the first error is given.
    async fn notify(&self, note: &Notification) -> Result<(), String> {
        let bodies = note.bodies(SQS_MAX_BODY_BYTES).map_err(|e| e.to_string())?;
        let mut first_error = None;
        for body in bodies {
            let sent = self
                .client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(body)
                .send()
                .await;
            if let Err(e) = sent {
                first_error.get_or_insert_with(|| {
                    cdc_contract::aws::AwsError::sqs("send notification", e).to_string()
                });
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// No queue configured (or LOCAL TEST MODE).
pub struct NoNotifier;

#[async_trait]
impl Notifier for NoNotifier {
    async fn notify(&self, _note: &Notification) -> Result<(), String> {
        Ok(())
    }
}
