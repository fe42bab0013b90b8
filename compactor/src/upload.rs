//! Uploading one final file as its bytes come: kept in memory until 8 MiB, then a multipart
//! upload of 8 MiB parts; a file that stays small is one PUT.

use bytes::Bytes;

use crate::retry::retry;
use crate::store::{ObjectStore, StoreError};

/// Size of a multipart upload part (S3 wants at least 5 MiB for every part but the last).
pub const CHUNK_BYTES: usize = 8 * 1024 * 1024;

struct Multipart {
    id: String,
    parts: Vec<(i32, String)>,
}

/// One file being uploaded.
pub struct FileUpload {
    key: String,
    content_type: &'static str,
    multipart: Option<Multipart>,
    buffer: Vec<u8>,
}

impl FileUpload {
    /// A file at `key`.
    pub fn new(key: String, content_type: &'static str) -> Self {
        FileUpload {
            key,
            content_type,
            multipart: None,
            buffer: Vec::new(),
        }
    }

    /// The file's key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Appends bytes, uploading full chunks.
    pub async fn write(
        &mut self,
        store: &dyn ObjectStore,
        bytes: Vec<u8>,
    ) -> Result<(), StoreError> {
        if self.buffer.is_empty() {
            self.buffer = bytes;
        } else {
            self.buffer.extend_from_slice(&bytes);
        }
        while self.buffer.len() >= CHUNK_BYTES {
            let rest = self.buffer.split_off(CHUNK_BYTES);
            let chunk = std::mem::replace(&mut self.buffer, rest);
            self.send_part(store, chunk).await?;
        }
        Ok(())
    }

    async fn send_part(
        &mut self,
        store: &dyn ObjectStore,
        chunk: Vec<u8>,
    ) -> Result<(), StoreError> {
        if self.multipart.is_none() {
            let id = retry("start upload", || {
                store.create_multipart(&self.key, self.content_type)
            })
            .await?;
            self.multipart = Some(Multipart {
                id,
                parts: Vec::new(),
            });
        }
        let Some(mp) = self.multipart.as_mut() else {
            return Err(StoreError::Definite("multipart upload missing".into()));
        };
        let number = mp.parts.len() as i32 + 1;
        let body = Bytes::from(chunk);
        let etag = retry("upload part", || {
            store.upload_part(&self.key, &mp.id, number, body.clone())
        })
        .await?;
        mp.parts.push((number, etag));
        Ok(())
    }

    /// Appends the last bytes and completes the file.
    pub async fn finish(
        mut self,
        store: &dyn ObjectStore,
        tail: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write(store, tail).await?;
        match self.multipart.take() {
            None => {
                let body = Bytes::from(std::mem::take(&mut self.buffer));
                retry("put file", || {
                    store.put(&self.key, body.clone(), self.content_type)
                })
                .await
            }
            Some(mp) => {
                let mut mp = mp;
                if !self.buffer.is_empty() {
                    let number = mp.parts.len() as i32 + 1;
                    let body = Bytes::from(std::mem::take(&mut self.buffer));
                    let etag = retry("upload part", || {
                        store.upload_part(&self.key, &mp.id, number, body.clone())
                    })
                    .await?;
                    mp.parts.push((number, etag));
                }
                retry("complete upload", || {
                    store.complete_multipart(&self.key, &mp.id, &mp.parts)
                })
                .await
            }
        }
    }

    /// Abandons the file (best effort: an incomplete upload is also expired by the bucket's
    /// lifecycle rule).
    pub async fn abort(self, store: &dyn ObjectStore) {
        if let Some(mp) = self.multipart {
            if let Err(error) = store.abort_multipart(&self.key, &mp.id).await {
                tracing::warn!(error = %error, key = %self.key, "could not abort an upload");
            }
        }
    }
}
