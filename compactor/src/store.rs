//! The object store seam: what the compactor does with S3, and its implementation over the AWS
//! SDK. Tests wrap it to inject faults.

use async_trait::async_trait;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::types::{
    CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier, Tag, Tagging,
};
use bytes::Bytes;

/// Why an object operation failed: the shared AWS error (transient or definite).
pub type StoreError = cdc_contract::aws::AwsError;

/// What the compactor needs from S3.
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// Fails with a clear error when the bucket cannot be reached (a start-up check).
    async fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// An object's bytes, or `None` when there is no such key.
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError>;
    /// Writes an object in one request.
    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError>;
    /// Starts a multipart upload; returns its id.
    async fn create_multipart(&self, key: &str, content_type: &str) -> Result<String, StoreError>;
    /// Uploads part `number` (1-based) of a multipart upload; returns its ETag.
    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError>;
    /// Completes a multipart upload from its parts' numbers and ETags.
    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), StoreError>;
    /// Abandons a multipart upload.
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError>;
    /// Every key under `prefix` (used only under a compacted hour's prefix).
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError>;
    /// Deletes objects; a missing key is not an error.
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError>;
    /// Sets an object's tags (replacing any it had).
    async fn tag(&self, key: &str, tags: &[(&str, &str)]) -> Result<(), StoreError>;
}

/// S3 through the AWS SDK.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
}

impl S3Store {
    /// A store over `bucket`.
    pub fn new(client: aws_sdk_s3::Client, bucket: impl Into<String>) -> Self {
        Self {
            client,
            bucket: bucket.into(),
        }
    }
}

fn classify<E: ProvideErrorMetadata>(
    what: &str,
    err: SdkError<E, aws_smithy_runtime_api::http::Response>,
) -> StoreError {
    StoreError::s3(what, err)
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn check(&self) -> Result<(), StoreError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| classify(&format!("bucket {} (S3_BUCKET_NAME)", self.bucket), e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        let res = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await;
        let out = match res {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) if cdc_contract::aws::http_status(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(classify(&format!("get {key}"), e)),
        };
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Transient(format!("reading {key}: {e}")))?;
        Ok(Some(body.into_bytes()))
    }

    async fn put(&self, key: &str, body: Bytes, content_type: &str) -> Result<(), StoreError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .body(body.into())
            .send()
            .await
            .map_err(|e| classify(&format!("put {key}"), e))?;
        Ok(())
    }

    async fn create_multipart(&self, key: &str, content_type: &str) -> Result<String, StoreError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .send()
            .await
            .map_err(|e| classify(&format!("start upload of {key}"), e))?;
        out.upload_id
            .ok_or_else(|| StoreError::Transient(format!("start upload of {key}: no upload id")))
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(body.into())
            .send()
            .await
            .map_err(|e| classify(&format!("upload part {number} of {key}"), e))?;
        out.e_tag
            .ok_or_else(|| StoreError::Transient(format!("upload part {number} of {key}: no ETag")))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[(i32, String)],
    ) -> Result<(), StoreError> {
        let parts = parts
            .iter()
            .map(|(n, etag)| CompletedPart::builder().part_number(*n).e_tag(etag).build())
            .collect();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(&format!("complete upload of {key}"), e))?;
        Ok(())
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StoreError> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(&format!("abort upload of {key}"), e))?;
        Ok(())
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| classify(&format!("list {prefix}"), e))?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        Ok(keys)
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        for chunk in keys.chunks(1000) {
            let ids = chunk
                .iter()
                .map(|k| ObjectIdentifier::builder().key(k).build())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| StoreError::Definite(format!("delete request: {e}")))?;
            let delete = Delete::builder()
                .set_objects(Some(ids))
                .quiet(true)
                .build()
                .map_err(|e| StoreError::Definite(format!("delete request: {e}")))?;
            let out = self
                .client
                .delete_objects()
                .bucket(&self.bucket)
                .delete(delete)
                .send()
                .await
                .map_err(|e| classify("delete objects", e))?;
            if let Some(err) = out.errors().first() {
                return Err(StoreError::Transient(format!(
                    "delete {}: {}",
                    err.key().unwrap_or("?"),
                    err.message().unwrap_or("failed")
                )));
            }
        }
        Ok(())
    }

    async fn tag(&self, key: &str, tags: &[(&str, &str)]) -> Result<(), StoreError> {
        let tags = tags
            .iter()
            .map(|(k, v)| Tag::builder().key(*k).value(*v).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Definite(format!("tag request: {e}")))?;
        let tagging = Tagging::builder()
            .set_tag_set(Some(tags))
            .build()
            .map_err(|e| StoreError::Definite(format!("tag request: {e}")))?;
        let res = self
            .client
            .put_object_tagging()
            .bucket(&self.bucket)
            .key(key)
            .tagging(tagging)
            .send()
            .await;
        match res {
            Ok(_) => Ok(()),
            // Already expired or deleted: nothing left to tag.
            Err(e) if cdc_contract::aws::http_status(&e) == Some(404) => Ok(()),
            Err(e) => Err(classify(&format!("tag {key}"), e)),
        }
    }
}
