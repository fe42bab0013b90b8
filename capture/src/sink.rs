//! Where micro-batches go: gzipped JSONL objects on S3, or standard output in LOCAL TEST MODE.

use std::io::Write;

use async_trait::async_trait;
use bytes::Bytes;
use flate2::write::GzEncoder;

/// Why a batch could not be stored: the shared AWS error (transient or definite).
pub type SinkError = cdc_contract::aws::AwsError;

/// Stores one micro-batch (uncompressed JSON lines) under its key; returns the stored size.
#[async_trait]
pub trait BatchSink: Send + Sync {
    /// Stores `jsonl` at `key`. Rewriting the same key with the same content is harmless.
    async fn put_batch(&self, key: &str, jsonl: Bytes) -> Result<u64, SinkError>;
}

/// Gzips JSON lines (fast level: the batch is read once, by the compactor).
pub fn gzip(jsonl: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = GzEncoder::new(
        Vec::with_capacity(jsonl.len() / 6 + 64),
        flate2::Compression::fast(),
    );
    enc.write_all(jsonl)?;
    enc.finish()
}

/// Micro-batches on S3.
pub struct S3Sink {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Sink {
    /// A sink into `bucket`.
    pub fn new(client: aws_sdk_s3::Client, bucket: String) -> Self {
        Self { client, bucket }
    }

    /// Fails with a clear error when the bucket does not exist or cannot be reached.
    pub async fn check(&self) -> Result<(), SinkError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| SinkError::s3(&format!("bucket {}", self.bucket), e))?;
        Ok(())
    }
}

#[async_trait]
impl BatchSink for S3Sink {
    async fn put_batch(&self, key: &str, jsonl: Bytes) -> Result<u64, SinkError> {
        let gz = tokio::task::spawn_blocking(move || gzip(&jsonl))
            .await
            .map_err(|e| SinkError::Definite(format!("compression task: {e}")))?
            .map_err(|e| SinkError::Definite(format!("compression: {e}")))?;
        let size = gz.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type("application/x-ndjson")
            .content_encoding("gzip")
            .body(gz.into())
            .send()
            .await
            .map_err(|e| SinkError::s3(&format!("put {key}"), e))?;
        Ok(size)
    }
}

/// LOCAL TEST MODE: each event as one JSON line on standard output.
pub struct StdoutSink;

#[async_trait]
impl BatchSink for StdoutSink {
    async fn put_batch(&self, _key: &str, jsonl: Bytes) -> Result<u64, SinkError> {
        let mut out = std::io::stdout().lock();
        out.write_all(&jsonl)
            .and_then(|_| out.flush())
            .map_err(|e| SinkError::Definite(format!("standard output: {e}")))?;
        Ok(jsonl.len() as u64)
    }
}
