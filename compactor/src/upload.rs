//! Uploading one final file as its bytes come: kept in memory until 8 MiB, then a multipart
//! upload of 8 MiB parts; a file that stays small is one PUT.
//!
//! What is held is at most one chunk being gathered: whole chunks of an output handed over are
//! sent as slices of it, not copied (a Parquet row group comes as one output of tens of MiB).

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
        let mut rest = Bytes::from(bytes);
        if !self.buffer.is_empty() {
            let take = (CHUNK_BYTES - self.buffer.len()).min(rest.len());
            self.buffer.extend_from_slice(&rest.split_to(take));
            if self.buffer.len() < CHUNK_BYTES {
                return Ok(());
            }
            let chunk = std::mem::take(&mut self.buffer);
            self.send_part(store, Bytes::from(chunk)).await?;
        }
        while rest.len() >= CHUNK_BYTES {
            let chunk = rest.split_to(CHUNK_BYTES);
            self.send_part(store, chunk).await?;
        }
        if !rest.is_empty() {
            // Copied, so that the output's allocation is freed now; the chunk gathered here is
            // made whole by the next outputs.
            self.buffer = Vec::with_capacity(CHUNK_BYTES);
            self.buffer.extend_from_slice(&rest);
        }
        Ok(())
    }

    /// Uploads `body` as the next part, starting the multipart upload first if it was not.
    async fn send_part(&mut self, store: &dyn ObjectStore, body: Bytes) -> Result<(), StoreError> {
        let mp = match self.multipart.take() {
            Some(mp) => mp,
            None => Multipart {
                id: retry("start upload", || {
                    store.create_multipart(&self.key, self.content_type)
                })
                .await?,
                parts: Vec::new(),
            },
        };
        let mp = self.multipart.insert(mp);
        upload_part(store, &self.key, mp, body).await
    }

    /// Appends the last bytes and completes the file.
    pub async fn finish(
        mut self,
        store: &dyn ObjectStore,
        tail: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.write(store, tail).await?;
        let body = Bytes::from(std::mem::take(&mut self.buffer));
        let Some(mut mp) = self.multipart.take() else {
            return retry("put file", || {
                store.put(&self.key, body.clone(), self.content_type)
            })
            .await;
        };
        if !body.is_empty() {
            upload_part(store, &self.key, &mut mp, body).await?;
        }
        retry("complete upload", || {
            store.complete_multipart(&self.key, &mp.id, &mp.parts)
        })
        .await
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

/// Uploads `body` as the next part of `mp`, the multipart upload of `key`.
async fn upload_part(
    store: &dyn ObjectStore,
    key: &str,
    mp: &mut Multipart,
    body: Bytes,
) -> Result<(), StoreError> {
    let number = mp.parts.len() as i32 + 1;
    let etag = retry("upload part", || {
        store.upload_part(key, &mp.id, number, body.clone())
    })
    .await?;
    mp.parts.push((number, etag));
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Mutex;

    use async_trait::async_trait;

    use super::*;

    /// What a file's upload sent, in order.
    #[derive(Debug, PartialEq)]
    enum Sent {
        Put(usize),
        Start,
        Part(i32, usize),
        Complete(usize),
    }

    /// A store that keeps what it is sent (the bodies as given, without copying them).
    #[derive(Default)]
    struct Recording {
        sent: Mutex<Vec<Sent>>,
        bodies: Mutex<Vec<Bytes>>,
    }

    impl Recording {
        fn sent(&self) -> Vec<Sent> {
            std::mem::take(&mut *self.sent.lock().expect("lock"))
        }

        fn bodies(&self) -> Vec<Bytes> {
            self.bodies.lock().expect("lock").clone()
        }

        fn note(&self, sent: Sent, body: Option<Bytes>) {
            self.sent.lock().expect("lock").push(sent);
            self.bodies.lock().expect("lock").extend(body);
        }
    }

    #[async_trait]
    impl ObjectStore for Recording {
        async fn get(&self, _key: &str) -> Result<Option<Bytes>, StoreError> {
            Ok(None)
        }
        async fn put(&self, _key: &str, body: Bytes, _ct: &str) -> Result<(), StoreError> {
            self.note(Sent::Put(body.len()), Some(body));
            Ok(())
        }
        async fn create_multipart(&self, _key: &str, _ct: &str) -> Result<String, StoreError> {
            self.note(Sent::Start, None);
            Ok("upload".into())
        }
        async fn upload_part(
            &self,
            _key: &str,
            _id: &str,
            number: i32,
            body: Bytes,
        ) -> Result<String, StoreError> {
            self.note(Sent::Part(number, body.len()), Some(body));
            Ok(format!("etag-{number}"))
        }
        async fn complete_multipart(
            &self,
            _key: &str,
            _id: &str,
            parts: &[(i32, String)],
        ) -> Result<(), StoreError> {
            self.note(Sent::Complete(parts.len()), None);
            Ok(())
        }
        async fn abort_multipart(&self, _key: &str, _id: &str) -> Result<(), StoreError> {
            Ok(())
        }
        async fn list(&self, _prefix: &str) -> Result<Vec<String>, StoreError> {
            Ok(Vec::new())
        }
        async fn delete(&self, _keys: &[String]) -> Result<(), StoreError> {
            Ok(())
        }
        async fn tag(&self, _key: &str, _tags: &[(&str, &str)]) -> Result<(), StoreError> {
            Ok(())
        }
    }

    /// `len` bytes that differ from one position to the next.
    fn output(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn within(body: &Bytes, allocation: &Range<usize>) -> bool {
        let start = body.as_ptr() as usize;
        allocation.contains(&start) && start + body.len() <= allocation.end
    }

    #[tokio::test]
    async fn an_output_of_several_chunks_is_sent_from_its_own_bytes_without_copies() {
        let store = Recording::default();
        let mut file = FileUpload::new("k".into(), "application/octet-stream");
        let big = output(2 * CHUNK_BYTES + CHUNK_BYTES / 2, 7);
        let expected = big.clone();
        let allocation = big.as_ptr() as usize..big.as_ptr() as usize + big.len();
        file.write(&store, big).await.expect("write");
        assert_eq!(
            store.sent(),
            [
                Sent::Start,
                Sent::Part(1, CHUNK_BYTES),
                Sent::Part(2, CHUNK_BYTES)
            ]
        );
        // Each chunk is a slice of the output handed over: no copy of it is held (an output of
        // a Parquet row group is tens of MiB; copies of its rest would be held at once).
        for body in store.bodies() {
            assert!(within(&body, &allocation), "a chunk was copied");
        }
        file.finish(&store, Vec::new()).await.expect("finish");
        assert_eq!(
            store.sent(),
            [Sent::Part(3, CHUNK_BYTES / 2), Sent::Complete(3)]
        );
        assert_eq!(store.bodies().concat(), expected);
    }

    #[tokio::test]
    async fn small_outputs_are_gathered_into_whole_chunks_in_order() {
        let store = Recording::default();
        let mut file = FileUpload::new("k".into(), "application/octet-stream");
        let mut expected = Vec::new();
        for seed in 0..7u8 {
            let piece = output(3 << 20, seed);
            expected.extend_from_slice(&piece);
            file.write(&store, piece).await.expect("write");
        }
        // 21 MiB: two whole chunks sent, 5 MiB held.
        assert_eq!(
            store.sent(),
            [
                Sent::Start,
                Sent::Part(1, CHUNK_BYTES),
                Sent::Part(2, CHUNK_BYTES)
            ]
        );
        let tail = output(CHUNK_BYTES + 5, 99);
        expected.extend_from_slice(&tail);
        file.finish(&store, tail).await.expect("finish");
        assert_eq!(
            store.sent(),
            [
                Sent::Part(3, CHUNK_BYTES),
                Sent::Part(4, (5 << 20) + 5),
                Sent::Complete(4)
            ]
        );
        assert_eq!(store.bodies().concat(), expected);
    }

    #[tokio::test]
    async fn a_file_that_stays_under_a_chunk_is_one_put() {
        let store = Recording::default();
        let mut file = FileUpload::new("k".into(), "application/octet-stream");
        file.write(&store, output(1000, 1)).await.expect("write");
        file.write(&store, Vec::new()).await.expect("write");
        assert_eq!(store.sent(), []);
        file.finish(&store, output(24, 2)).await.expect("finish");
        assert_eq!(store.sent(), [Sent::Put(1024)]);
        let mut expected = output(1000, 1);
        expected.extend(output(24, 2));
        assert_eq!(store.bodies().concat(), expected);
    }
}
