//! Compacting one table-hour, part by part.
//!
//! 1. Sort the hour's batch items out (valid, orphan, undecided) and read the hour record.
//!    Batches whose last change is at or below the record's `compacted_through` watermark are
//!    consumed; later ones (late batches too) are to do.
//! 2. Claim the hour: store the record with its version bumped and this attempt's id, on
//!    condition that nobody changed it since it was read and no live claim holds it. A claim that
//!    lapsed without a clean release means a previous attempt died: list the hour's prefixes and
//!    delete every part file no recorded part names (safe now: the dead attempt can no longer
//!    record, its version is gone).
//! 3. Stream the batches to do, one at a time (download ahead, gunzip and parse line by line,
//!    skipping changes at or below the watermark), into parts; each finished part's files are
//!    uploaded, then recorded with the record's new state in one conditional transaction, then
//!    the manifests are rewritten. A lost claim stops the attempt, which deletes its own files.
//! 4. Tag the consumed batches' staging objects, mark their items compacted (with a TTL), delete
//!    orphan items, and clear the pending marker unless a flush touched it meanwhile.

use std::collections::HashSet;
use std::io::BufRead;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;

use cdc_contract::layout::Format;
use cdc_contract::ledger::{BatchItem, HourRecord, PartFile, PartItem, PendingHour};
use cdc_contract::metrics as names;
use cdc_contract::{Hour, Position, TableName};

use crate::dead_letter::{record_name, DeadLetter};
use crate::envelope::Envelope;
use crate::ledger::{Claim, LedgerError, Recorded};
use crate::manifest::{attempt_of, Manifest};
use crate::parquet_schema::PartSchema;
use crate::part::{FinishedPart, Limits, PartError, PartStats, PartWriter};
use crate::plan::{HourBatches, SlotRun};
use crate::retry::retry;
use crate::store::StoreError;
use crate::upload::FileUpload;
use crate::{now_ms, Compactor};

/// Why compacting an hour stopped.
#[derive(Debug, thiserror::Error)]
pub enum HourError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// S3 failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Another attempt took the hour over; this one stopped and removed its own files.
    #[error("another compaction took the hour over")]
    ClaimLost,
    /// Something a retry cannot fix: a staging object or schema version the ledger names is
    /// missing, or a part could not be encoded.
    #[error("{0}")]
    Definite(String),
}

impl HourError {
    /// True when a later run may succeed without anyone acting.
    pub fn is_transient(&self) -> bool {
        match self {
            HourError::Ledger(e) => e.is_transient(),
            HourError::Store(e) => e.is_transient(),
            HourError::ClaimLost => true,
            HourError::Definite(_) => false,
        }
    }
}

impl From<PartError> for HourError {
    fn from(e: PartError) -> Self {
        HourError::Definite(format!("writing a part: {e}"))
    }
}

/// One table-hour to compact.
#[derive(Debug, Clone)]
pub struct HourJob {
    /// The table.
    pub table: TableName,
    /// The hour.
    pub hour: Hour,
    /// Its pending marker, if it has one (cleared once everything is compacted).
    pub marker: Option<PendingHour>,
}

/// How an hour was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HourState {
    /// Every recorded batch is compacted; the marker is cleared (or was not there).
    Done,
    /// A batch may still be committing, or a flush touched the hour meanwhile: a later run
    /// finishes it.
    Pending,
    /// Another compaction holds the hour.
    Busy,
}

/// What one table-hour compaction did.
#[derive(Debug, Clone, Serialize)]
pub struct HourReport {
    /// The slot.
    pub slot: String,
    /// `schema.table`.
    pub table: String,
    /// The hour.
    pub hour: String,
    /// How the hour was left.
    pub state: HourState,
    /// Parts written.
    pub parts: u32,
    /// Changes written.
    pub rows: u64,
    /// Bytes written, every format.
    pub bytes: u64,
    /// Lines sent to the dead-letter prefix.
    pub dead_letters: u64,
    /// Batches newly marked compacted.
    pub consumed_batches: usize,
    /// Orphan batch items removed.
    pub orphans_removed: usize,
    /// Files of dead attempts removed.
    pub stale_files_removed: usize,
}

/// The output of one batch's CPU work.
struct BatchWork {
    writer: PartWriter,
    finished: Vec<FinishedPart>,
    dead: Vec<DeadLetter>,
    /// The staging object is unreadable from some line on: copy it whole beside the record.
    copy_object: bool,
    last: Option<Position>,
    duplicates: u64,
}

/// Reads one staged batch line by line into the part writer, rolling parts as they fill.
fn process_batch(
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
        let env: Envelope<'_> = match serde_json::from_str(line) {
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

/// The state of a claimed hour.
struct Claimed<'a> {
    c: &'a Compactor,
    slot: &'a SlotRun,
    table: TableName,
    hour: Hour,
    record: HourRecord,
    parts: Vec<PartItem>,
    attempt: String,
    last_renew_ms: i64,
    report: HourReport,
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Parquet => "application/vnd.apache.parquet",
    }
}

impl Claimed<'_> {
    fn part_key(&self, format: Format, part: u32) -> String {
        self.c
            .layout
            .part_key(&self.table, format, self.hour, part, &self.attempt)
    }

    fn new_uploads(&self, part: u32) -> (u32, Vec<(Format, FileUpload)>) {
        let files = self
            .c
            .config
            .formats
            .iter()
            .map(|f| {
                (
                    *f,
                    FileUpload::new(self.part_key(*f, part), content_type(*f)),
                )
            })
            .collect();
        (part, files)
    }

    /// Deletes final files that no recorded part names (never this attempt's): files of
    /// attempts that recorded nothing, and the last, unrecorded parts of attempts that died
    /// after recording others.
    async fn remove_unrecorded_files(&mut self) -> Result<(), HourError> {
        let recorded: HashSet<&str> = self
            .parts
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.key.as_str()))
            .collect();
        let mut stale = Vec::new();
        for format in &self.c.config.formats {
            let prefix = format!(
                "{}/",
                self.c.layout.hour_prefix(&self.table, *format, self.hour)
            );
            let keys = retry("list hour prefix", || self.c.store.list(&prefix)).await?;
            stale.extend(keys.into_iter().filter(|k| {
                attempt_of(k).is_some_and(|a| a != self.attempt) && !recorded.contains(k.as_str())
            }));
        }
        if !stale.is_empty() {
            tracing::info!(
                slot = %self.slot.slot, table = %self.table, hour = %self.hour,
                files = stale.len(), "removing files of an attempt that recorded nothing"
            );
            retry("delete stale files", || self.c.store.delete(&stale)).await?;
            self.report.stale_files_removed += stale.len();
        }
        Ok(())
    }

    async fn write_manifests(&self) -> Result<(), HourError> {
        for format in &self.c.config.formats {
            let manifest = Manifest::new(&self.table, self.hour, *format, &self.parts);
            let key = self.c.layout.manifest_key(&self.table, *format, self.hour);
            let body = Bytes::from(manifest.to_json());
            retry("put manifest", || {
                self.c.store.put(&key, body.clone(), "application/json")
            })
            .await?;
        }
        Ok(())
    }

    /// Keeps the claim alive during long parts.
    async fn renew_if_due(&mut self) -> Result<(), HourError> {
        let now = now_ms();
        let ttl = self.c.config.hour_claim.as_millis() as i64;
        if now - self.last_renew_ms < ttl / 3 {
            return Ok(());
        }
        let until = now + ttl;
        let ours = retry("renew claim", || {
            self.c
                .ledger
                .renew_claim(&self.slot.slot, &self.record, until)
        })
        .await?;
        if !ours {
            return Err(HourError::ClaimLost);
        }
        self.record.claim_until_ms = until;
        self.last_renew_ms = now;
        Ok(())
    }

    /// Uploads a finished part's files, records it, rewrites the manifests.
    async fn complete_part(
        &mut self,
        done: FinishedPart,
        uploads: Option<Vec<(Format, FileUpload)>>,
    ) -> Result<(), HourError> {
        let stats: PartStats = done.stats;
        let mut uploads = match uploads {
            Some(u) => u,
            None => self.new_uploads(stats.part).1,
        };
        let mut files = Vec::new();
        for (format, tail, total) in done.tails {
            let Some(i) = uploads.iter().position(|(f, _)| *f == format) else {
                continue;
            };
            let (_, upload) = uploads.swap_remove(i);
            let key = upload.key().to_owned();
            upload.finish(&*self.c.store, tail).await?;
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
            version: self.record.version + 1,
            compacted_through: Some(stats.last),
            next_part: stats.part + 1,
            rows: self.record.rows + stats.rows,
            bytes: self.record.bytes + bytes,
            claim_until_ms: now + self.c.config.hour_claim.as_millis() as i64,
            updated_ms: now,
            ..self.record.clone()
        };
        let outcome = retry("record part", || {
            self.c
                .ledger
                .record_part(&self.slot.slot, &part, self.record.version, &next)
        })
        .await?;
        match outcome {
            Recorded::Yes => {
                tracing::info!(
                    slot = %self.slot.slot, table = %self.table, hour = %self.hour,
                    part = stats.part, rows = stats.rows, bytes, attempt = %self.attempt,
                    "part recorded"
                );
                self.record = next;
                self.last_renew_ms = now;
                self.parts.push(part);
                self.report.parts += 1;
                self.report.rows += stats.rows;
                self.report.bytes += bytes;
                self.write_manifests().await
            }
            Recorded::Lost => {
                let keys: Vec<String> = files.into_iter().map(|f| f.key).collect();
                if let Err(error) = self.c.store.delete(&keys).await {
                    tracing::warn!(error = %error, "could not delete the files of a lost part; the next run will");
                }
                Err(HourError::ClaimLost)
            }
        }
    }

    /// Streams the batches to do into recorded parts.
    async fn write_parts(&mut self, todo: Vec<BatchItem>) -> Result<(), HourError> {
        let watermark = self.record.compacted_through;
        let limits = Limits {
            part_max_bytes: self.c.config.part_max_bytes,
            row_group_bytes: self.c.config.row_group_bytes,
            compression: self.c.config.compression,
            gzip_level: self.c.config.jsonl_gzip_level,
        };
        let table_text = self.table.to_string();

        // Downloads run ahead of the CPU work, two batches at most.
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<(BatchItem, Result<Option<Bytes>, StoreError>)>(1);
        let store = self.c.store.clone();
        let downloader = tokio::spawn(async move {
            for batch in todo {
                let got = retry("get staging object", || store.get(&batch.key)).await;
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
        let _ = downloader.await;
        result
    }

    /// Uploads the part's output not uploaded yet, closes its files and records it (a part
    /// without rows is dropped).
    async fn close_part(
        &mut self,
        w: PartWriter,
        pending_output: Vec<(u32, Format, Vec<u8>)>,
        uploads: &mut Option<(u32, Vec<(Format, FileUpload)>)>,
    ) -> Result<(), HourError> {
        for (part, format, bytes) in pending_output {
            upload_to(uploads, part, format, bytes, self).await?;
        }
        if w.rows() > 0 {
            let done = tokio::task::spawn_blocking(move || w.finish())
                .await
                .map_err(|e| HourError::Definite(format!("part task: {e}")))??;
            let files = take_uploads(uploads, done.stats.part);
            self.complete_part(done, files).await?;
        }
        Ok(())
    }

    async fn write_parts_from(
        &mut self,
        rx: &mut tokio::sync::mpsc::Receiver<(BatchItem, Result<Option<Bytes>, StoreError>)>,
        watermark: Option<Position>,
        limits: Limits,
        table_text: &str,
    ) -> Result<(), HourError> {
        let mut writer: Option<PartWriter> = None;
        let mut uploads: Option<(u32, Vec<(Format, FileUpload)>)> = None;
        let mut pending_output: Vec<(u32, Format, Vec<u8>)> = Vec::new();
        let mut last: Option<Position> = watermark;
        let result: Result<(), HourError> = async {
            while let Some((batch, got)) = rx.recv().await {
                let data = got?.ok_or_else(|| {
                    HourError::Definite(format!(
                        "staging object {} named by the ledger is missing",
                        batch.key
                    ))
                })?;
                let schema = self.c.part_schema(&self.slot.slot, &self.table, &batch.schema_id).await?;

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
                        &self.c.config.formats,
                        limits,
                        table_text,
                    )?,
                };

                // CPU work on this batch while the previous batch's output uploads.
                let key = batch.key.clone();
                let table = table_text.to_owned();
                let task = tokio::task::spawn_blocking(move || {
                    process_batch(w, &table, &key, &data, watermark, last).map(|work| (work, data))
                });
                let output = std::mem::take(&mut pending_output);
                let this: &Claimed<'_> = self;
                let upload = async {
                    for (part, format, bytes) in output {
                        upload_to(&mut uploads, part, format, bytes, this).await?;
                    }
                    Ok::<(), HourError>(())
                };
                let (work, uploaded) = tokio::join!(task, upload);
                uploaded?;
                let (mut work, data) = work
                    .map_err(|e| HourError::Definite(format!("part task: {e}")))??;
                last = work.last.or(last);
                if work.duplicates > 0 {
                    tracing::warn!(table = %self.table, hour = %self.hour, key = %batch.key, changes = work.duplicates, "skipped changes already written by an earlier batch");
                }
                // Dead letters are stored before any part that passes their line is recorded.
                if !work.dead.is_empty() {
                    self.store_dead_letters(&batch, &work.dead, work.copy_object.then_some(&data)).await?;
                }
                for done in std::mem::take(&mut work.finished) {
                    let files = take_uploads(&mut uploads, done.stats.part);
                    self.complete_part(done, files).await?;
                }
                let mut w = work.writer;
                for format in &self.c.config.formats {
                    let out = w.take_output(*format)?;
                    if !out.is_empty() {
                        pending_output.push((w.part(), *format, out));
                    }
                }
                writer = Some(w);
                self.renew_if_due().await?;
            }
            if let Some(w) = writer.take() {
                self.close_part(w, std::mem::take(&mut pending_output), &mut uploads)
                    .await?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            if let Some((_, files)) = uploads.take() {
                for (_, f) in files {
                    f.abort(&*self.c.store).await;
                }
            }
        }
        result
    }

    async fn store_dead_letters(
        &mut self,
        batch: &BatchItem,
        dead: &[DeadLetter],
        object: Option<&Bytes>,
    ) -> Result<(), HourError> {
        let mut keys = Vec::with_capacity(dead.len());
        for d in dead {
            let key = self.c.layout.dead_letter_key(
                &self.table,
                self.hour,
                &record_name(&batch.key, d.line),
            );
            let body = Bytes::from(serde_json::to_vec(d).unwrap_or_default());
            retry("put dead letter", || {
                self.c.store.put(&key, body.clone(), "application/json")
            })
            .await?;
            keys.push(key);
        }
        if let Some(object) = object {
            let name = batch.key.rsplit('/').next().unwrap_or(&batch.key);
            let key = self.c.layout.dead_letter_key(&self.table, self.hour, name);
            retry("copy unreadable staging object", || {
                self.c.store.put(&key, object.clone(), "application/gzip")
            })
            .await?;
        }
        tracing::warn!(
            slot = %self.slot.slot, table = %self.table, hour = %self.hour, key = %batch.key,
            lines = dead.len(), "unreadable staged lines sent to the dead-letter prefix"
        );
        self.report.dead_letters += dead.len() as u64;
        if let Some(notifier) = &self.c.notifier {
            let body = serde_json::json!({
                "slot": self.slot.slot,
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

/// Appends bytes to the uploads of `part` (the writer's current part: earlier parts are
/// complete by the time its output is uploaded).
async fn upload_to(
    uploads: &mut Option<(u32, Vec<(Format, FileUpload)>)>,
    part: u32,
    format: Format,
    bytes: Vec<u8>,
    claimed: &Claimed<'_>,
) -> Result<(), HourError> {
    if uploads.as_ref().is_some_and(|(p, _)| *p != part) {
        return Err(HourError::Definite(format!(
            "output of part {part} arrived while another part was uploading"
        )));
    }
    let entry = uploads.get_or_insert_with(|| claimed.new_uploads(part));
    if let Some((_, f)) = entry.1.iter_mut().find(|(f, _)| *f == format) {
        f.write(&*claimed.c.store, bytes).await?;
    }
    Ok(())
}

/// The uploads of `part`, if they were started.
fn take_uploads(
    uploads: &mut Option<(u32, Vec<(Format, FileUpload)>)>,
    part: u32,
) -> Option<Vec<(Format, FileUpload)>> {
    match uploads {
        Some((p, _)) if *p == part => uploads.take().map(|(_, f)| f),
        _ => None,
    }
}

impl Compactor {
    /// The Parquet layout of a schema version (cached for the compactor's life).
    pub(crate) async fn part_schema(
        &self,
        slot: &str,
        table: &TableName,
        schema_id: &str,
    ) -> Result<Arc<PartSchema>, HourError> {
        let key = (slot.to_owned(), table.clone(), schema_id.to_owned());
        if let Some(s) = self.schemas.lock().ok().and_then(|m| m.get(&key).cloned()) {
            return Ok(s);
        }
        let schema = retry("get schema", || self.ledger.schema(slot, table, schema_id))
            .await?
            .ok_or_else(|| {
                HourError::Definite(format!(
                    "schema version {schema_id} of {table} is missing from the ledger"
                ))
            })?;
        let part = Arc::new(PartSchema::new(&schema));
        if let Ok(mut m) = self.schemas.lock() {
            m.insert(key, part.clone());
        }
        Ok(part)
    }

    /// Tags a consumed batch's staging object for expiry, then marks its item compacted.
    async fn consume(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), HourError> {
        retry("tag staging object", || {
            self.store.tag(&batch.key, &[("compacted", "true")])
        })
        .await?;
        retry("mark batch compacted", || {
            self.ledger.mark_compacted(slot, batch, expires_at)
        })
        .await?;
        // After the item says compacted: the flush record may expire once all its hours are.
        retry("note flush hour compacted", || {
            self.ledger.flush_hour_done(slot, batch, expires_at)
        })
        .await?;
        Ok(())
    }

    /// Compacts one table-hour of `slot`.
    pub async fn compact_hour(
        &self,
        slot: &SlotRun,
        job: &HourJob,
    ) -> Result<HourReport, HourError> {
        let started = Instant::now();
        let ledger = &*self.ledger;
        let HourBatches {
            valid,
            orphans,
            undecided,
        } = slot.hour_batches(ledger, &job.table, job.hour).await?;
        let record = retry("get hour record", || {
            ledger.hour_record(&slot.slot, &job.table, job.hour)
        })
        .await?
        .unwrap_or_else(|| HourRecord::new(job.table.clone(), job.hour));
        let mut report = HourReport {
            slot: slot.slot.clone(),
            table: job.table.to_string(),
            hour: job.hour.to_string(),
            state: HourState::Done,
            parts: 0,
            rows: 0,
            bytes: 0,
            dead_letters: 0,
            consumed_batches: 0,
            orphans_removed: 0,
            stale_files_removed: 0,
        };
        let watermark = record.compacted_through;
        let todo: Vec<BatchItem> = valid
            .iter()
            .filter(|b| watermark.is_none_or(|w| b.last > w))
            .cloned()
            .collect();
        let now = now_ms();
        let unreleased = record.version > 0 && record.claim_until_ms != 0;
        // A cleanup after a lapsed attempt is checked again once that attempt can no longer
        // complete an upload (issue 15, item 11).
        let recheck_due = record.recheck_after_ms != 0 && now >= record.recheck_after_ms;
        let mut record = record;
        if !todo.is_empty() || unreleased || recheck_due {
            if record.claim_until_ms >= now {
                tracing::info!(slot = %slot.slot, table = %job.table, hour = %job.hour, attempt = %record.claim_attempt, "hour is being compacted by another attempt");
                report.state = HourState::Busy;
                return Ok(report);
            }
            let attempt = new_attempt_id();
            let claimed = HourRecord {
                version: record.version + 1,
                claim_attempt: attempt.clone(),
                claim_until_ms: now + self.config.hour_claim.as_millis() as i64,
                updated_ms: now,
                ..record.clone()
            };
            let claim = retry("claim hour", || {
                ledger.claim_hour(&slot.slot, record.version, &claimed, now)
            })
            .await?;
            let Claim::Claimed(claimed) = claim else {
                report.state = HourState::Busy;
                return Ok(report);
            };
            let parts = retry("get parts", || {
                ledger.parts(&slot.slot, &job.table, job.hour)
            })
            .await?;
            let mut run = Claimed {
                c: self,
                slot,
                table: job.table.clone(),
                hour: job.hour,
                record: claimed,
                parts,
                attempt,
                last_renew_ms: now,
                report,
            };
            let straggler_window = self.config.straggler_window.as_millis() as i64;
            let result = async {
                if unreleased || recheck_due {
                    run.remove_unrecorded_files().await?;
                    run.write_manifests().await?;
                    // After a lapsed attempt, list again once it can no longer upload; a
                    // recheck that found the hour clean ends it.
                    run.record.recheck_after_ms = if unreleased && straggler_window > 0 {
                        now_ms() + straggler_window
                    } else {
                        0
                    };
                }
                if !todo.is_empty() {
                    run.write_parts(todo).await?;
                }
                Ok::<(), HourError>(())
            }
            .await;
            match result {
                Ok(()) => {
                    retry("release hour", || {
                        ledger.release_hour(&slot.slot, &run.record)
                    })
                    .await?;
                }
                Err(e) => {
                    // Leave the claim lapsed but not released: the next run then removes any
                    // file this attempt left unrecorded.
                    if !matches!(e, HourError::ClaimLost) {
                        if let Err(error) = ledger.renew_claim(&slot.slot, &run.record, 1).await {
                            tracing::warn!(error = %error, "could not give the hour's claim up; it lapses by itself");
                        }
                    }
                    return Err(e);
                }
            }
            record = run.record;
            report = run.report;
        }

        // Consumed batches: tag their staging objects for expiry, then mark their items.
        let through = record.compacted_through;
        let consumed: Vec<&BatchItem> = valid
            .iter()
            .filter(|b| !b.compacted && through.is_some_and(|w| b.last <= w))
            .collect();
        let expires_at = now_ms() / 1000 + self.batch_ttl_seconds;
        // Futures collected first: a stream holding the closure would make the compaction's
        // future lose `Send` (the closure's borrow is not general enough).
        let pending: Vec<_> = consumed
            .iter()
            .map(|b| self.consume(&slot.slot, b, expires_at))
            .collect();
        let results = futures::stream::iter(pending)
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await;
        for r in results {
            r?;
        }
        report.consumed_batches = consumed.len();
        for orphan in &orphans {
            retry("delete orphan batch item", || {
                ledger.delete_batch(&slot.slot, orphan)
            })
            .await?;
        }
        report.orphans_removed = orphans.len();
        if !orphans.is_empty() {
            tracing::info!(slot = %slot.slot, table = %job.table, hour = %job.hour, items = orphans.len(), "removed orphan batch items (their flush never committed)");
        }

        let all_consumed = valid.iter().all(|b| through.is_some_and(|w| b.last <= w));
        // A recheck still to come keeps the pending marker, so a sweep returns to the hour.
        let recheck_waiting = record.recheck_after_ms != 0;
        report.state = if undecided || !all_consumed || recheck_waiting {
            HourState::Pending
        } else {
            match &job.marker {
                Some(marker) => {
                    if retry("clear pending hour", || {
                        ledger.clear_pending(&slot.slot, marker)
                    })
                    .await?
                    {
                        HourState::Done
                    } else {
                        HourState::Pending
                    }
                }
                None => HourState::Done,
            }
        };
        if report.parts > 0 || report.dead_letters > 0 {
            let mut values = vec![
                (
                    names::COMPACTION_DURATION,
                    started.elapsed().as_secs_f64() * 1000.0,
                ),
                (names::COMPACTION_ROWS, report.rows as f64),
                (names::COMPACTION_BYTES, report.bytes as f64),
            ];
            if report.dead_letters > 0 {
                values.push((names::DEAD_LETTER_RECORDS, report.dead_letters as f64));
            }
            crate::metrics::emit(&slot.slot, &values);
        }
        tracing::info!(
            slot = %slot.slot, table = %job.table, hour = %job.hour, state = ?report.state,
            parts = report.parts, rows = report.rows, bytes = report.bytes,
            consumed = report.consumed_batches, ms = started.elapsed().as_millis() as u64,
            "hour compacted"
        );
        Ok(report)
    }
}

/// A short id unique to one compaction attempt (8 hex digits; never contains `-`).
pub fn new_attempt_id() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    id[..8].to_owned()
}
