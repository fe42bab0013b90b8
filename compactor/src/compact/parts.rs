//! Step 3 of an hour: the batches to do streamed into parts; each part's files uploaded,
//! recorded with the hour record in one conditional transaction, then the manifests rewritten.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use cdc_contract::layout::Format;
use cdc_contract::ledger::{BatchItem, HourRecord, PartFile, PartItem};
use cdc_contract::{Position, TableName};

use super::claim::Claimed;
use super::whole;
use super::HourError;
use crate::dead_letter::{record_name, DeadLetter};
use crate::envelope::Envelope;
use crate::ledger::{Ledger, Recorded};
use crate::manifest::Manifest;
use crate::now_ms;
use crate::parquet_schema::PartSchema;
use crate::part::{FinishedPart, Limits, PartError, PartStats, PartWriter};
use crate::retry::retry;
use crate::store::{ObjectStore, StoreError};
use crate::upload::FileUpload;

/// A staging object handed to the CPU work: its batch item and what the download gave.
type Download = (BatchItem, Result<Option<Staged>, StoreError>);

/// Staging objects downloaded at once, ahead of the one being read.
const DOWNLOADS_AHEAD: usize = 4;
/// Batches whose chunks are parsed ahead of the one being read into the part. One is not
/// enough on two cores: once the next batch is parsed, the parsing threads stop while the part
/// writer still encodes, and a core idles (measured on the 5,000,000-row hour, docs/TESTING.md).
const PARSE_AHEAD: usize = 2;

/// The output of one batch's CPU work.
pub(super) struct BatchWork {
    pub(super) writer: PartWriter,
    pub(super) finished: Vec<FinishedPart>,
    pub(super) dead: Vec<DeadLetter>,
    /// The staging object is unreadable from some line on: copy it whole beside the record.
    pub(super) copy_object: bool,
    pub(super) last: Option<Position>,
    pub(super) duplicates: u64,
}

/// A downloaded staging object, and its text when it was gunzipped whole (see
/// [`whole::gunzip_whole`]).
pub(super) struct Staged {
    data: Bytes,
    text: Option<Arc<whole::Text>>,
}

impl Staged {
    /// `data`, gunzipped whole into a buffer of `pool` when it can be.
    fn new(data: Bytes, pool: &whole::TextPool) -> Self {
        let text = whole::gunzip_whole(&data, whole::WHOLE_MAX_BYTES, pool).map(Arc::new);
        Staged { data, text }
    }
}

/// Reads one staged batch into the part writer, rolling parts as they fill: whole and in
/// parallel when it was gunzipped whole (with `parsing`, its chunks parsed ahead, if they
/// fit), else line by line.
fn process_batch(
    writer: PartWriter,
    table: &str,
    staging_key: &str,
    staged: &Staged,
    watermark: Option<Position>,
    last: Option<Position>,
    parsing: Option<whole::Parsing>,
) -> Result<BatchWork, PartError> {
    let data = &staged.data;
    match &staged.text {
        Some(text) => whole::process_whole(
            writer,
            table,
            staging_key,
            data,
            text,
            watermark,
            last,
            parsing,
        ),
        None => process_lines(writer, table, staging_key, data, watermark, last),
    }
}

/// Reads one staged batch line by line into the part writer, rolling parts as they fill.
pub(super) fn process_lines(
    mut writer: PartWriter,
    table: &str,
    staging_key: &str,
    data: &[u8],
    watermark: Option<Position>,
    mut last: Option<Position>,
) -> Result<BatchWork, PartError> {
    let mut finished = Vec::new();
    let mut dead = Vec::new();
    let mut copy_object = false;
    let mut duplicates = 0;
    let gz = data.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn BufRead> = if gz {
        Box::new(std::io::BufReader::with_capacity(
            256 * 1024,
            flate2::read::MultiGzDecoder::new(data),
        ))
    } else {
        Box::new(data)
    };
    let mut buf = Vec::with_capacity(4096);
    let mut number = 0u64;
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                dead.push(DeadLetter {
                    reason: format!("staging object unreadable after line {number}: {e}"),
                    staging_key: staging_key.to_owned(),
                    line: 0,
                    raw: None,
                });
                copy_object = true;
                break;
            }
        }
        number += 1;
        while matches!(buf.last(), Some(b'\n' | b'\r')) {
            buf.pop();
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let mut bad = |reason: String, raw: &[u8]| {
            dead.push(DeadLetter {
                reason,
                staging_key: staging_key.to_owned(),
                line: number,
                raw: Some(String::from_utf8_lossy(raw).into_owned()),
            })
        };
        let line = match std::str::from_utf8(&buf) {
            Ok(l) => l,
            Err(e) => {
                bad(format!("not UTF-8: {e}"), &buf);
                continue;
            }
        };
        let env = match Envelope::parse(line) {
            Ok(env) => env,
            Err(e) => {
                bad(format!("not a change event: {e}"), line.as_bytes());
                continue;
            }
        };
        let pos = env.position();
        if watermark.is_some_and(|w| pos <= w) {
            continue;
        }
        if last.is_some_and(|l| pos <= l) {
            duplicates += 1;
            continue;
        }
        if writer.is_full() {
            let next = writer.next(table)?;
            finished.push(std::mem::replace(&mut writer, next).finish()?);
        }
        if let Err(e) = writer.push(line, &env)? {
            bad(e.to_string(), line.as_bytes());
            continue;
        }
        last = Some(pos);
    }
    Ok(BatchWork {
        writer,
        finished,
        dead,
        copy_object,
        last,
        duplicates,
    })
}

/// The files of the part being uploaded, one per format.
pub(super) struct PartUploads {
    /// The part's number.
    part: u32,
    /// Its files' uploads.
    files: Vec<(Format, FileUpload)>,
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Parquet => "application/vnd.apache.parquet",
        Format::Avro => "application/avro",
    }
}

impl Claimed<'_> {
    pub(super) fn part_key(&self, format: Format, part: u32) -> String {
        self.deps
            .layout
            .part_key(&self.table, format, self.hour, part, &self.attempt)
    }

    pub(super) fn new_uploads(&self, part: u32) -> PartUploads {
        let files = self
            .deps
            .formats
            .iter()
            .map(|f| {
                (
                    *f,
                    FileUpload::new(self.part_key(*f, part), content_type(*f)),
                )
            })
            .collect();
        PartUploads { part, files }
    }

    pub(super) async fn write_manifests(&self) -> Result<(), HourError> {
        for format in self.deps.formats {
            let manifest = Manifest::new(&self.table, self.hour, *format, &self.parts);
            let key = self
                .deps
                .layout
                .manifest_key(&self.table, *format, self.hour);
            let body = Bytes::from(manifest.to_json());
            retry("put manifest", || {
                self.deps.store.put(&key, body.clone(), "application/json")
            })
            .await?;
        }
        Ok(())
    }

    /// Uploads a finished part's files, records it, rewrites the manifests.
    pub(super) async fn complete_part(
        &mut self,
        done: FinishedPart,
        uploads: Option<Vec<(Format, FileUpload)>>,
    ) -> Result<(), HourError> {
        let stats: PartStats = done.stats;
        let mut uploads = match uploads {
            Some(u) => u,
            None => self.new_uploads(stats.part).files,
        };
        let mut files = Vec::new();
        for (format, tail, total) in done.tails {
            let Some(i) = uploads.iter().position(|(f, _)| *f == format) else {
                continue;
            };
            let (_, upload) = uploads.swap_remove(i);
            let key = upload.key().to_owned();
            upload.finish(&**self.deps.store, tail).await?;
            files.push(PartFile {
                format,
                key,
                bytes: total,
            });
        }
        files.sort_by_key(|f| f.format);
        let now = now_ms();
        let part = PartItem {
            table: self.table.clone(),
            hour: self.hour,
            part: stats.part,
            attempt: self.attempt.clone(),
            rows: stats.rows,
            first: stats.first,
            last: stats.last,
            first_commit_ms: stats.first_commit_ms,
            last_commit_ms: stats.last_commit_ms,
            schema_id: stats.schema_id.clone(),
            files: files.clone(),
            created_ms: now,
        };
        let bytes: u64 = files.iter().map(|f| f.bytes).sum();
        let next = HourRecord {
            next_part: stats.part + 1,
            rows: self.record.rows + stats.rows,
            bytes: self.record.bytes + bytes,
            ..self.next_record(stats.last, now)
        };
        let outcome = retry("record part", || {
            self.deps
                .ledger
                .record_part(self.slot, &part, self.record.version, &next)
        })
        .await?;
        match outcome {
            Recorded::Yes => {
                tracing::info!(
                    slot = %self.slot, table = %self.table, hour = %self.hour,
                    part = stats.part, rows = stats.rows, bytes, attempt = %self.attempt,
                    "part recorded"
                );
                self.adopt(next, now);
                self.parts.push(part);
                self.report.parts += 1;
                self.report.latest_part = Some((stats.schema_id.clone(), stats.last));
                self.report.rows += stats.rows;
                self.report.bytes += bytes;
                self.write_manifests().await
            }
            Recorded::Lost => {
                let keys: Vec<String> = files.into_iter().map(|f| f.key).collect();
                if let Err(error) = self.deps.store.delete(&keys).await {
                    tracing::warn!(error = %error, "could not delete the files of a lost part; the next run will");
                }
                Err(HourError::ClaimLost)
            }
        }
    }

    /// Streams the batches to do into recorded parts.
    pub(super) async fn write_parts(&mut self, todo: Vec<BatchItem>) -> Result<(), HourError> {
        let watermark = self.record.compacted_through;
        let limits = self.deps.limits;
        let table_text = self.table.to_string();

        // Downloads run ahead of the CPU work: up to DOWNLOADS_AHEAD at once, handed over in
        // order, each gunzipped (when it can be read whole) before it is handed over: at most
        // five batches' text are held, the one being read, the next PARSE_AHEAD (being
        // parsed), the one handed over and the one being gunzipped.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Download>(1);
        let store = self.deps.store.clone();
        let pool = whole::TextPool::default();
        let downloader = tokio::spawn(async move {
            use futures::StreamExt;
            let mut gets = futures::stream::iter(todo)
                .map(|batch| {
                    let store = store.clone();
                    async move {
                        let got = retry("get staging object", || store.get(&batch.key)).await;
                        (batch, got)
                    }
                })
                .buffered(DOWNLOADS_AHEAD);
            while let Some((batch, got)) = gets.next().await {
                let got = match got {
                    Ok(Some(data)) => {
                        let bytes = data.clone();
                        // Should the task fail, the batch is read line by line instead.
                        let pool = pool.clone();
                        let staged = tokio::task::spawn_blocking(move || Staged::new(bytes, &pool))
                            .await
                            .unwrap_or(Staged { data, text: None });
                        Ok(Some(staged))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                let failed = got.is_err();
                if tx.send((batch, got)).await.is_err() || failed {
                    break;
                }
            }
        });
        let result = self
            .write_parts_from(&mut rx, watermark, limits, &table_text)
            .await;
        drop(rx);
        // A run that stopped early does not wait for the next object's download (and its
        // retries).
        downloader.abort();
        let _ = downloader.await;
        result
    }

    /// Uploads the part's output not uploaded yet, closes its files and records it. A part
    /// without rows is dropped with its files: the next part takes its number, and must not
    /// write after what this one wrote (an Avro file's header is written when its part opens).
    pub(super) async fn close_part(
        &mut self,
        w: PartWriter,
        pending_output: Vec<(u32, Format, Vec<u8>)>,
        uploads: &mut Uploader,
    ) -> Result<(), HourError> {
        if w.rows() == 0 {
            return uploads.abandon(&**self.deps.store).await;
        }
        uploads.send(self, pending_output).await?;
        uploads.settle().await?;
        let done = tokio::task::spawn_blocking(move || w.finish())
            .await
            .map_err(|e| HourError::Definite(format!("part task: {e}")))??;
        let files = take_uploads(&mut uploads.files, done.stats.part);
        self.complete_part(done, files).await?;
        Ok(())
    }

    pub(super) async fn write_parts_from(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<Download>,
        watermark: Option<Position>,
        limits: Limits,
        table_text: &str,
    ) -> Result<(), HourError> {
        let mut writer: Option<PartWriter> = None;
        let mut uploads = Uploader::default();
        let mut pending_output: Vec<(u32, Format, Vec<u8>)> = Vec::new();
        let mut last: Option<Position> = watermark;
        // The last change of the batches read whole so far: each of their lines is written,
        // skipped as a duplicate or stored as a dead letter.
        let mut handled: Option<Position> = None;
        // The next batches, received while this one was read, and their chunks being parsed.
        let mut ahead: VecDeque<(Download, Option<whole::Parsing>)> = VecDeque::new();
        let result: Result<(), HourError> = async {
            loop {
                let ((batch, got), parsing) = match ahead.pop_front() {
                    Some(a) => a,
                    None => match rx.recv().await {
                        Some(d) => (d, None),
                        None => break,
                    },
                };
                let data = got?.ok_or_else(|| {
                    HourError::Definite(format!(
                        "staging object {} named by the ledger is missing",
                        batch.key
                    ))
                })?;
                let schema = self.deps.schemas.get(self.deps.ledger, self.slot, &self.table, &batch.schema_id).await?;

                // A new schema version starts a new part, unless its layout is the same.
                if let Some(w) = writer.as_ref() {
                    if w.schema_id() != batch.schema_id && w.schema().arrow != schema.arrow {
                        let narrowed = w.schema().narrowed_columns(&schema);
                        if narrowed.is_empty() {
                            tracing::info!(table = %self.table, hour = %self.hour, schema = %batch.schema_id, "schema changed; starting a new part");
                        } else {
                            tracing::warn!(table = %self.table, hour = %self.hour, schema = %batch.schema_id, columns = ?narrowed, "column types changed in a way readers cannot widen; the new schema gets its own part");
                        }
                        let w = writer.take().ok_or_else(|| HourError::Definite("no writer".into()))?;
                        self.close_part(w, std::mem::take(&mut pending_output), &mut uploads)
                            .await?;
                    }
                }
                let w = match writer.take() {
                    Some(w) => w,
                    None => PartWriter::new(
                        self.record.next_part,
                        batch.schema_id.clone(),
                        schema.clone(),
                        self.deps.formats,
                        limits,
                        table_text,
                    )?,
                };

                // CPU work on this batch while the previous batch's output is handed to its
                // upload task (which goes on meanwhile: `Uploader`) and the next batches (up to
                // PARSE_AHEAD), those with the same schema version, start parsing (against
                // this part's schema and the last change before this batch: the reading
                // checks both).
                let cx = whole::Context::of(&w, watermark);
                let before = last;
                let key = batch.key.clone();
                let table = table_text.to_owned();
                let task = tokio::task::spawn_blocking(move || {
                    process_batch(w, &table, &key, &data, watermark, last, parsing).map(|work| (work, data.data))
                });
                // (A block: the futures borrowing `self` and the uploads end with it.)
                let (work, uploaded) = {
                    let output = std::mem::take(&mut pending_output);
                    let this: &Claimed<'_> = self;
                    let schema_id = batch.schema_id.clone();
                    let upload = uploads.send(this, output);
                    let queue = &mut ahead;
                    let receive = async {
                        while queue.len() < PARSE_AHEAD {
                            let Some(next) = rx.recv().await else {
                                return;
                            };
                            let parsing = match &next {
                                (b, Ok(Some(Staged { text: Some(text), .. }))) if b.schema_id == schema_id => {
                                    Some(whole::Parsing::start(cx.clone(), text.clone(), before, whole::CHUNK_BYTES))
                                }
                                _ => None,
                            };
                            queue.push_back((next, parsing));
                        }
                    };
                    let this_batch = async { tokio::join!(task, upload) };
                    tokio::pin!(this_batch, receive);
                    // Receiving stops with this batch's work (a download received is queued in
                    // the same poll, never dropped).
                    let (work, uploaded) = tokio::select! {
                        done = &mut this_batch => done,
                        () = &mut receive => this_batch.await,
                    };
                    (work, uploaded)
                };
                let goes_on = uploaded.is_ok()
                    && matches!(work, Ok(Ok(_)))
                    && self.deps.stop_at.is_none_or(|t| std::time::Instant::now() < t);
                // With none received yet, the next batch is waited for, only when this one went
                // well and the run goes on: an error, or the invoking deadline, does not wait on
                // its download. A second one ahead is not waited for.
                if goes_on && ahead.is_empty() {
                    if let Some(next) = rx.recv().await {
                        ahead.push_back((next, None));
                    }
                }
                uploaded?;
                let (mut work, data) = work
                    .map_err(|e| HourError::Definite(format!("part task: {e}")))??;
                last = work.last.or(last);
                // Short of the change the batch item names last: the object ends early, or its
                // last lines are dead letters (an unreadable line's position is unknown, so the
                // two cannot be told apart). The changes not written are not skipped in silence
                // (the watermark passes them below): a record says which they are, and the object
                // is copied beside it.
                if last < Some(batch.last) {
                    if !work.dead.iter().any(|d| d.line == 0) {
                        let after = last.map_or_else(|| "the hour's start".to_owned(), |p| p.key());
                        let reason = if work.dead.is_empty() {
                            format!(
                                "staging object ends before the last change its batch item records ({})",
                                batch.last.key()
                            )
                        } else {
                            format!(
                                "changes after {after} up to {} are not written: the object's last lines are dead letters, or it ends early",
                                batch.last.key()
                            )
                        };
                        work.dead.push(DeadLetter {
                            reason,
                            staging_key: batch.key.clone(),
                            line: 0,
                            raw: None,
                        });
                    }
                    work.copy_object = true;
                }
                if work.duplicates > 0 {
                    tracing::warn!(table = %self.table, hour = %self.hour, key = %batch.key, changes = work.duplicates, "skipped changes already written by an earlier batch");
                }
                // Dead letters are stored before any part that passes their line is recorded.
                if !work.dead.is_empty() {
                    self.store_dead_letters(&batch, &work.dead, work.copy_object.then_some(&data)).await?;
                }
                if let Some(early) = self.early.as_mut() {
                    early.read(&batch);
                }
                handled = handled.max(Some(batch.last));
                if !work.finished.is_empty() {
                    uploads.settle().await?;
                }
                for done in std::mem::take(&mut work.finished) {
                    let files = take_uploads(&mut uploads.files, done.stats.part);
                    self.complete_part(done, files).await?;
                }
                let mut w = work.writer;
                for format in self.deps.formats {
                    let out = w.take_output(*format)?;
                    if !out.is_empty() {
                        pending_output.push((w.part(), *format, out));
                    }
                }
                writer = Some(w);
                self.renew_if_due().await?;
                if self.deps.stop_at.is_some_and(|t| std::time::Instant::now() >= t) {
                    tracing::info!(table = %self.table, hour = %self.hour, "stopping before the invocation's deadline: the part ends here and the next run goes on after it");
                    // The next batches' parsing stops.
                    ahead.clear();
                    break;
                }
            }
            if let Some(w) = writer.take() {
                self.close_part(w, std::mem::take(&mut pending_output), &mut uploads)
                    .await?;
            }
            self.pass_handled(handled).await
        }
        .await;
        if result.is_err() {
            // The files a failed upload task gives back are abandoned too.
            let _ = uploads.abandon(&**self.deps.store).await;
        }
        result
    }

    /// Raises the watermark to `handled` when the parts recorded stop short of it: the batches
    /// read whole end in lines that went to the dead-letter prefix (or their objects could not
    /// be read at all). Left below, those batches would stay to do and their hour pending, every
    /// sweep storing and announcing their dead letters again. A later batch's change at or
    /// below `handled` is skipped as any change at or below the watermark is: the batches
    /// through `handled` hold every change up to it, the unreadable ones in the dead-letter
    /// prefix.
    async fn pass_handled(&mut self, handled: Option<Position>) -> Result<(), HourError> {
        let Some(handled) = handled else {
            return Ok(());
        };
        if self.record.compacted_through >= Some(handled) {
            return Ok(());
        }
        let now = now_ms();
        let next = self.next_record(handled, now);
        let outcome = retry("raise watermark", || {
            self.deps
                .ledger
                .raise_watermark(self.slot, self.record.version, &next)
        })
        .await?;
        match outcome {
            Recorded::Yes => {
                tracing::warn!(
                    slot = %self.slot, table = %self.table, hour = %self.hour,
                    from = ?self.record.compacted_through.map(|p| p.key()), to = %handled.key(),
                    "watermark raised past batches whose last lines are dead letters"
                );
                self.adopt(next, now);
                Ok(())
            }
            Recorded::Lost => Err(HourError::ClaimLost),
        }
    }

    /// The hour record with the watermark at `through`, as this attempt writes it at `now`:
    /// the version bumped (the write is conditional on the current one) and the claim renewed.
    fn next_record(&self, through: Position, now: i64) -> HourRecord {
        HourRecord {
            version: self.record.version + 1,
            compacted_through: Some(through),
            claim_until_ms: now + self.deps.claim_ms,
            updated_ms: now,
            ..self.record.clone()
        }
    }

    /// `next`, written at `now`, is the hour's record: the claim counts as renewed then, and
    /// the flushes its watermark passes are offered to the early consumption.
    fn adopt(&mut self, next: HourRecord, now: i64) {
        self.record = next;
        self.last_renew_ms = now;
        if let Some(early) = self.early.as_mut() {
            early.offer(self.record.compacted_through);
        }
    }

    pub(super) async fn store_dead_letters(
        &mut self,
        batch: &BatchItem,
        dead: &[DeadLetter],
        object: Option<&Bytes>,
    ) -> Result<(), HourError> {
        let mut keys = Vec::with_capacity(dead.len());
        for d in dead {
            let key = self.deps.layout.dead_letter_key(
                &self.table,
                self.hour,
                &record_name(&batch.key, d.line),
            );
            let body = Bytes::from(serde_json::to_vec(d).unwrap_or_default());
            retry("put dead letter", || {
                self.deps.store.put(&key, body.clone(), "application/json")
            })
            .await?;
            keys.push(key);
        }
        if let Some(object) = object {
            let name = batch.key.rsplit('/').next().unwrap_or(&batch.key);
            let key = self
                .deps
                .layout
                .dead_letter_key(&self.table, self.hour, name);
            retry("copy unreadable staging object", || {
                self.deps
                    .store
                    .put(&key, object.clone(), "application/gzip")
            })
            .await?;
        }
        tracing::warn!(
            slot = %self.slot, table = %self.table, hour = %self.hour, key = %batch.key,
            lines = dead.len(), "unreadable staged lines sent to the dead-letter prefix"
        );
        self.report.dead_letters += dead.len() as u64;
        if let Some(notifier) = self.deps.notifier {
            let body = serde_json::json!({
                "slot": self.slot,
                "table": self.table.to_string(),
                "hour": self.hour.to_string(),
                "staging_key": batch.key,
                "records": dead.len(),
                "dead_letter_keys": keys.iter().take(20).collect::<Vec<_>>(),
                "reason": dead.first().map(|d| d.reason.clone()),
            })
            .to_string();
            if let Err(error) = notifier.notify(body).await {
                tracing::warn!(error = %error, "dead-letter notice failed; the records are on S3");
            }
        }
        Ok(())
    }
}

/// Outputs handed to upload tasks and not written yet, in bytes, beyond which handing over
/// more waits for them: about a Parquet row group and a few upload chunks.
const UPLOAD_AHEAD_BYTES: usize = 48 << 20;

/// What an upload task gives back: the part's files (to go on with, finish or abandon) and how
/// its writes went.
type Uploaded = (Option<PartUploads>, Result<(), HourError>);

/// An upload task, stopped if it is dropped (a run that was dropped stops uploading).
struct UploadTask(tokio::task::JoinHandle<Uploaded>);

impl Drop for UploadTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The uploads of the part being written. A batch's output is written by a task of its own,
/// after the outputs handed over before it (each task waits for the one before), so the next
/// batch is read meanwhile: a slow upload (an 8 MiB part sent to S3, a Parquet row group)
/// holds the reading back only once more than [`UPLOAD_AHEAD_BYTES`] wait (then until every
/// task has ended). A failed write fails the hour when the next batch's output is handed over.
/// Before the part's files are finished, taken or abandoned, [`Uploader::settle`] waits for
/// every task. (A task that panicked loses its files: their uploads are left to the bucket's
/// rule for incomplete uploads.)
#[derive(Default)]
pub(super) struct Uploader {
    /// The files, while no task holds them.
    files: Option<PartUploads>,
    /// The last task started: it holds the files until it ends.
    task: Option<UploadTask>,
    /// Bytes handed to tasks and not written yet.
    queued: Arc<std::sync::atomic::AtomicUsize>,
    /// A task's write failed: the next output handed over waits for the chain and fails.
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl Uploader {
    /// Waits until every output handed over is written (or a write failed); the files are
    /// back in `self.files`.
    async fn settle(&mut self) -> Result<(), HourError> {
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        let (files, result) = (&mut task.0)
            .await
            .unwrap_or_else(|e| (None, Err(HourError::Definite(format!("upload task: {e}")))));
        self.files = files;
        result
    }

    /// Waits for every task, then abandons the part's files (those a failed task gave back
    /// too); how the tasks went.
    async fn abandon(&mut self, store: &dyn ObjectStore) -> Result<(), HourError> {
        let settled = self.settle().await;
        if let Some(PartUploads { files, .. }) = self.files.take() {
            for (_, f) in files {
                f.abort(store).await;
            }
        }
        settled
    }

    /// Hands `output` (of the part being written) over to be uploaded after the outputs handed
    /// over before it.
    async fn send(
        &mut self,
        claimed: &Claimed<'_>,
        output: Vec<(u32, Format, Vec<u8>)>,
    ) -> Result<(), HourError> {
        use std::sync::atomic::Ordering;
        let Some(&(part, _, _)) = output.first() else {
            return Ok(());
        };
        if self.failed.load(Ordering::Acquire)
            || self.queued.load(Ordering::Acquire) > UPLOAD_AHEAD_BYTES
        {
            self.settle().await?;
        }
        if self.task.is_none() && self.files.is_none() {
            self.files = Some(claimed.new_uploads(part));
        }
        let before = self.task.take();
        let files = self.files.take();
        let store = claimed.deps.store.clone();
        let (queued, failed) = (self.queued.clone(), self.failed.clone());
        let bytes: usize = output.iter().map(|(_, _, b)| b.len()).sum();
        queued.fetch_add(bytes, Ordering::AcqRel);
        let task = tokio::spawn(async move {
            let (mut files, result) = match before {
                None => (files, Ok(())),
                Some(mut task) => (&mut task.0).await.unwrap_or_else(|e| {
                    (None, Err(HourError::Definite(format!("upload task: {e}"))))
                }),
            };
            let result = match result {
                Ok(()) => write_output(&*store, &mut files, output).await,
                failed => failed,
            };
            queued.fetch_sub(bytes, Ordering::AcqRel);
            if result.is_err() {
                failed.store(true, Ordering::Release);
            }
            (files, result)
        });
        self.task = Some(UploadTask(task));
        Ok(())
    }
}

/// Writes `output` to `files` (the uploads of the part it belongs to).
async fn write_output(
    store: &dyn ObjectStore,
    files: &mut Option<PartUploads>,
    output: Vec<(u32, Format, Vec<u8>)>,
) -> Result<(), HourError> {
    for (part, format, bytes) in output {
        let Some(uploads) = files.as_mut().filter(|u| u.part == part) else {
            return Err(HourError::Definite(format!(
                "output of part {part} arrived while another part was uploading"
            )));
        };
        if let Some((_, f)) = uploads.files.iter_mut().find(|(f, _)| *f == format) {
            f.write(store, bytes).await?;
        }
    }
    Ok(())
}

/// The uploads of `part`, if they were started.
fn take_uploads(uploads: &mut Option<PartUploads>, part: u32) -> Option<Vec<(Format, FileUpload)>> {
    match uploads {
        Some(u) if u.part == part => uploads.take().map(|u| u.files),
        _ => None,
    }
}

/// The Parquet layouts of schema versions by slot, table and schema id, kept for the
/// compactor's life.
#[derive(Default)]
pub(crate) struct SchemaCache(Mutex<HashMap<(String, TableName, String), Arc<PartSchema>>>);

impl SchemaCache {
    /// The Parquet layout of a schema version, read from `ledger` the first time.
    pub(crate) async fn get(
        &self,
        ledger: &dyn Ledger,
        slot: &str,
        table: &TableName,
        schema_id: &str,
    ) -> Result<Arc<PartSchema>, HourError> {
        let key = (slot.to_owned(), table.clone(), schema_id.to_owned());
        if let Some(s) = self.0.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(s);
        }
        let schema = retry("get schema", || ledger.schema(slot, table, schema_id))
            .await?
            .ok_or_else(|| {
                HourError::Definite(format!(
                    "schema version {schema_id} of {table} is missing from the ledger"
                ))
            })?;
        let part = Arc::new(PartSchema::new(&schema));
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, part.clone());
        }
        Ok(part)
    }
}
