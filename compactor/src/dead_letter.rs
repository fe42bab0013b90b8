//! Dead letters: staged lines the compactor cannot read, kept under the dead-letter prefix with
//! the reason beside the record, and a notice to the dead-letter queue when one is configured.

use async_trait::async_trait;
use serde::Serialize;

/// One line (or, for an unreadable object, the whole object) that could not be compacted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// Why it could not be read.
    pub reason: String,
    /// The staging object it came from.
    pub staging_key: String,
    /// Its 1-based line number (0 for the whole object).
    pub line: u64,
    /// The line as staged (lossy UTF-8), or null for a whole object copied beside the record.
    pub raw: Option<String>,
}

/// Where dead-letter notices go.
#[async_trait]
pub trait DeadLetterNotifier: Send + Sync {
    /// Sends one notice (JSON); an error is logged, the records are on S3 either way.
    async fn notify(&self, body: String) -> Result<(), String>;
}

/// Notices to an SQS queue (its URL from configuration).
pub struct SqsNotifier {
    client: aws_sdk_sqs::Client,
    queue_url: String,
}

impl SqsNotifier {
    /// A notifier for `queue_url`.
    pub fn new(client: aws_sdk_sqs::Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl DeadLetterNotifier for SqsNotifier {
    async fn notify(&self, body: String) -> Result<(), String> {
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| cdc_contract::aws::error_text(&e))?;
        Ok(())
    }
}

/// The dead-letter object name of a line of a staging object: the staging file's stem and the
/// line number, so a retry rewrites the same key.
pub fn record_name(staging_key: &str, line: u64) -> String {
    let file = staging_key.rsplit('/').next().unwrap_or(staging_key);
    let stem = file.strip_suffix(".jsonl.gz").unwrap_or(file);
    format!("{stem}-{line:08}.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_names_follow_the_staging_key_and_line() {
        assert_eq!(
            record_name("b/_staging/public.t/2025/01/08/10/A-B.jsonl.gz", 7),
            "A-B-00000007.json"
        );
    }
}
