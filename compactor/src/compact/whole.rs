//! A staged batch read whole: gunzipped into memory, its lines parsed in chunks on several
//! threads, the chunks appended to the part in their order.
//!
//! The result is the one reading the batch line by line gives (`process_batch` in parts.rs):
//! the same changes in the same order, the same duplicates skipped, the same dead letters with
//! the same line numbers. Only where a part rolls can differ: the part-size check runs before
//! each chunk (about [`CHUNK_BYTES`] of staged text) instead of before each line.
//!
//! When every line of the batch goes into one part as it was staged, the JSONL file gets the
//! staged gzip member itself instead of compressing the lines again.
//!
//! A batch larger than [`WHOLE_MAX_BYTES`] once gunzipped, or one that does not gunzip, is left
//! to the line-by-line reading (which also finds where an unreadable object breaks off).
//!
//! A batch's chunks can be parsed before its turn ([`Parsing::start`], while the batch before
//! it appends): against a lower floor than the last change before it, which the re-reading
//! rule of [`process_chunks`] makes right, and against the part schema of the batch before,
//! which is only used if the batch goes into a part of that same schema.

use std::io::Read;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use arrow::record_batch::RecordBatch;

use cdc_contract::Position;

use super::parts::BatchWork;
use crate::dead_letter::DeadLetter;
use crate::envelope::{ColumnLookup, Envelope, RowValues};
use crate::parquet_schema::PartSchema;
use crate::part::{PartError, PartWriter, RowBuilders};

/// A staged batch larger than this once gunzipped is read line by line.
pub(super) const WHOLE_MAX_BYTES: usize = 32 << 20;
/// Staged text per chunk (a chunk ends at the first line end after this).
pub(super) const CHUNK_BYTES: usize = 1 << 20;
/// Parsing threads at most.
const MAX_THREADS: usize = 4;
/// Parsed chunks each thread may hold ahead of the one being appended.
const AHEAD: usize = 2;

/// Texts of batches already read, kept for the next batches of the hour. A fresh text of
/// several MiB is mapped on its own and each of its pages faulted in and zeroed by the kernel
/// (measured: about 5% of the CPU of compacting a 5,000,000-row hour); a kept one is written
/// over. It keeps at most [`POOL_TEXTS`], never more than were in use at once.
#[derive(Clone, Default)]
pub(super) struct TextPool(Arc<Mutex<Vec<Vec<u8>>>>);

/// Texts a pool keeps: as many as the reading holds at once (see `write_parts`).
const POOL_TEXTS: usize = 5;
/// Bytes a text's buffer is made ready to be written at a time.
const GROW_STEP: usize = 1 << 20;

impl TextPool {
    /// A kept buffer (its length: bytes already written, which may be written over), or a new
    /// empty one.
    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .ok()
            .and_then(|mut kept| kept.pop())
            .unwrap_or_default()
    }

    fn give(&self, buffer: Vec<u8>) {
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < POOL_TEXTS {
                kept.push(buffer);
            }
        }
    }
}

/// A batch's gunzipped text, given back to its pool when dropped.
pub(super) struct Text {
    buffer: Vec<u8>,
    len: usize,
    pool: Option<TextPool>,
}

#[cfg(test)]
impl From<Vec<u8>> for Text {
    fn from(buffer: Vec<u8>) -> Self {
        Text {
            len: buffer.len(),
            buffer,
            pool: None,
        }
    }
}

impl std::ops::Deref for Text {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer[..self.len]
    }
}

impl Drop for Text {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.buffer));
        }
    }
}

/// `data` gunzipped into a buffer of `pool`, when it is gzip, gunzips without error and is at
/// most `limit` bytes.
pub(super) fn gunzip_whole(data: &[u8], limit: usize, pool: &TextPool) -> Option<Text> {
    if !data.starts_with(&[0x1f, 0x8b]) {
        return None;
    }
    let mut buffer = pool.take();
    let mut reader = flate2::read::MultiGzDecoder::new(data);
    // The size the gzip trailer gives (of the last member, which is the whole text when the
    // object is one member, as the capture writes it): room for it and the read that finds the
    // end is made at once. A size over the limit is not trusted.
    let told = data
        .last_chunk::<4>()
        .map(|t| u32::from_le_bytes(*t) as usize)
        .filter(|&n| n <= limit);
    let mut len = 0;
    let read = loop {
        if len == buffer.len() {
            if len > limit {
                break None;
            }
            // Without a size to go by (or past it: several members), staged JSON lines
            // gunzip to about six times their size, and growing doubles. Only what is written
            // to is zeroed (a step at a time): untouched room costs no memory.
            if buffer.len() == buffer.capacity() {
                match told {
                    Some(n) if n >= len => buffer.reserve_exact(n + 1 - len),
                    _ => {
                        buffer.reserve(len.max(data.len() * 6).max(GROW_STEP).min(limit + 1 - len))
                    }
                }
            }
            let end = (len + GROW_STEP).min(buffer.capacity()).min(limit + 1);
            buffer.resize(end, 0);
        }
        match reader.read(&mut buffer[len..]) {
            Ok(0) => break Some(len),
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break None,
        }
    };
    match read {
        Some(len) if len <= limit => Some(Text {
            buffer,
            len,
            pool: Some(pool.clone()),
        }),
        _ => {
            pool.give(buffer);
            None
        }
    }
}

/// The chunks of `text`: about `size` bytes each, ending after a line end (or at the end).
fn chunks(text: &[u8], size: usize) -> Vec<Range<usize>> {
    let mut out = Vec::with_capacity(text.len() / size + 1);
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        if end < text.len() {
            end = memchr::memchr(b'\n', &text[end..]).map_or(text.len(), |i| end + i + 1);
        }
        out.push(start..end);
        start = end;
    }
    out
}

/// A line that could not be read, by its number within its chunk (1-based).
struct BadLine {
    line: u64,
    reason: String,
    raw: Vec<u8>,
}

/// One chunk, parsed.
struct Parsed {
    /// Typed rows, when the part wants them.
    batch: Option<RecordBatch>,
    /// The accepted lines, as ranges of the batch's text (without the line end).
    lines: Vec<Range<usize>>,
    /// Position and commit time (ms) of the first and last accepted change.
    first: Option<(Position, i64)>,
    last: Option<(Position, i64)>,
    bad: Vec<BadLine>,
    duplicates: u64,
    /// Lines in the chunk, blank ones included.
    line_count: u64,
    /// Every line was accepted as staged (none skipped, none blank, no `\r` removed).
    whole: bool,
    /// The earliest position above the watermark and the floor, of any line.
    min_above_floor: Option<Position>,
}

/// What a chunk is parsed against.
#[derive(Clone)]
pub(super) struct Context {
    schema: Arc<PartSchema>,
    lookup: Arc<ColumnLookup>,
    wants_rows: bool,
    watermark: Option<Position>,
}

impl Context {
    /// Parsing for `writer`'s part, skipping changes at or below `watermark`.
    pub(super) fn of(writer: &PartWriter, watermark: Option<Position>) -> Self {
        Context {
            schema: writer.schema().clone(),
            lookup: writer.lookup().clone(),
            wants_rows: writer.wants_rows(),
            watermark,
        }
    }

    /// Whether chunks parsed against `self` are what parsing against `other` gives.
    fn same_as(&self, other: &Context) -> bool {
        Arc::ptr_eq(&self.schema, &other.schema)
            && self.wants_rows == other.wants_rows
            && self.watermark == other.watermark
    }
}

type ParsedChunk = Result<Parsed, PartError>;

/// A batch's chunks being parsed on their own threads, taken in order with [`Parsing::next`].
/// Dropping it stops the threads after the chunk each is parsing.
pub(super) struct Parsing {
    cx: Context,
    text: Arc<Text>,
    ranges: Arc<Vec<Range<usize>>>,
    floor: Option<Position>,
    results: Vec<mpsc::Receiver<ParsedChunk>>,
    taken: usize,
}

impl Parsing {
    /// Starts parsing `text` in chunks of about `chunk_bytes` against `cx`, with `floor` at
    /// most the last change written before the batch.
    pub(super) fn start(
        cx: Context,
        text: Arc<Text>,
        floor: Option<Position>,
        chunk_bytes: usize,
    ) -> Self {
        let ranges = Arc::new(chunks(&text, chunk_bytes));
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .clamp(1, MAX_THREADS)
            .min(ranges.len().max(1));
        let mut results = Vec::with_capacity(threads);
        for k in 0..threads {
            let (tx, rx) = mpsc::sync_channel::<ParsedChunk>(AHEAD);
            let (cx, text, ranges) = (cx.clone(), text.clone(), ranges.clone());
            let spawned = std::thread::Builder::new()
                .name("cdc-parse".into())
                .spawn(move || {
                    for range in ranges.iter().skip(k).step_by(threads) {
                        let parsed = parse_chunk(&cx, &text, range.clone(), floor);
                        let failed = parsed.is_err();
                        if tx.send(parsed).is_err() || failed {
                            return;
                        }
                    }
                });
            // A thread that could not start leaves its receiver without a sender: taking its
            // chunks reports it.
            if let Err(error) = spawned {
                tracing::warn!(error = %error, "could not start a parsing thread");
            }
            results.push(rx);
        }
        Parsing {
            cx,
            text,
            ranges,
            floor,
            results,
            taken: 0,
        }
    }

    /// Whether this parsing can serve `text` against `cx` with the last change before it at
    /// `last`.
    fn serves(&self, cx: &Context, text: &Arc<Text>, last: Option<Position>) -> bool {
        self.taken == 0
            && Arc::ptr_eq(&self.text, text)
            && self.cx.same_as(cx)
            && self.floor <= last
    }

    /// The next chunk's range, and the chunk parsed.
    fn next(&mut self) -> Option<(Range<usize>, ParsedChunk)> {
        let range = self.ranges.get(self.taken)?.clone();
        let rx = &self.results[self.taken % self.results.len()];
        self.taken += 1;
        let parsed = rx
            .recv()
            .map_err(|_| PartError::from(std::io::Error::other("a parsing thread stopped")))
            .and_then(|p| p);
        Some((range, parsed))
    }
}

/// Parses the lines of `text[range]`: changes at or below the watermark are skipped, and
/// changes at or below `floor` (the last change before the chunk) counted as duplicates.
fn parse_chunk(
    cx: &Context,
    text: &[u8],
    range: Range<usize>,
    floor: Option<Position>,
) -> Result<Parsed, PartError> {
    let mut builders = if cx.wants_rows {
        Some(RowBuilders::new(&cx.schema)?)
    } else {
        None
    };
    let mut out = Parsed {
        batch: None,
        lines: Vec::with_capacity(range.len() / 256 + 1),
        first: None,
        last: None,
        bad: Vec::new(),
        duplicates: 0,
        line_count: 0,
        whole: true,
        min_above_floor: None,
    };
    let mut last = floor;
    let mut row = RowValues {
        values: Vec::with_capacity(cx.schema.columns.len()),
        unknown: Vec::new(),
    };
    let mut start = range.start;
    while start < range.end {
        let end = memchr::memchr(b'\n', &text[start..range.end]).map_or(range.end, |i| start + i);
        let this = start..end;
        start = end + 1;
        out.line_count += 1;
        let mut stop = this.end;
        while stop > this.start && text[stop - 1] == b'\r' {
            stop -= 1;
            out.whole = false;
        }
        let this = this.start..stop;
        let bytes = &text[this.clone()];
        if bytes.iter().all(u8::is_ascii_whitespace) {
            out.whole = false;
            continue;
        }
        let number = out.line_count;
        let line = match std::str::from_utf8(bytes) {
            Ok(l) => l,
            Err(e) => {
                out.whole = false;
                out.bad.push(BadLine {
                    line: number,
                    reason: format!("not UTF-8: {e}"),
                    raw: bytes.to_vec(),
                });
                continue;
            }
        };
        let env = match Envelope::parse(line) {
            Ok(env) => env,
            Err(e) => {
                out.whole = false;
                out.bad.push(BadLine {
                    line: number,
                    reason: format!("not a change event: {e}"),
                    raw: bytes.to_vec(),
                });
                continue;
            }
        };
        let pos = env.position();
        if cx.watermark.is_some_and(|w| pos <= w) {
            out.whole = false;
            continue;
        }
        if floor.is_none_or(|f| pos > f) {
            out.min_above_floor = Some(out.min_above_floor.map_or(pos, |m| m.min(pos)));
        }
        if last.is_some_and(|l| pos <= l) {
            out.whole = false;
            out.duplicates += 1;
            continue;
        }
        let commit_us = env.commit_us();
        if let Some(b) = builders.as_mut() {
            if let Err(e) = b.push_with(&cx.lookup, &mut row, &env, (pos, commit_us)) {
                out.whole = false;
                out.bad.push(BadLine {
                    line: number,
                    reason: e.to_string(),
                    raw: bytes.to_vec(),
                });
                continue;
            }
        }
        let at = (pos, commit_us.div_euclid(1000));
        out.first.get_or_insert(at);
        out.last = Some(at);
        out.lines.push(this);
        last = Some(pos);
    }
    if let Some(b) = builders.as_mut() {
        out.batch = b.finish()?;
    }
    Ok(out)
}

/// Writes the JSONL of `lines` (ranges of `text`, without their line ends) to the part: each run
/// of lines that follow each other in `text`, each ended by `\n`, in one write.
fn write_lines(
    writer: &mut PartWriter,
    text: &[u8],
    lines: &[Range<usize>],
) -> Result<(), PartError> {
    let mut run: Option<Range<usize>> = None;
    for l in lines {
        let ends_in_newline = text.get(l.end) == Some(&b'\n');
        match run.as_mut() {
            Some(r) if r.end == l.start && ends_in_newline => r.end = l.end + 1,
            _ => {
                if let Some(r) = run.take() {
                    writer.write_jsonl(&text[r])?;
                }
                if ends_in_newline {
                    run = Some(l.start..l.end + 1);
                } else {
                    writer.write_jsonl(&text[l.clone()])?;
                    writer.write_jsonl(b"\n")?;
                }
            }
        }
    }
    if let Some(r) = run {
        writer.write_jsonl(&text[r])?;
    }
    Ok(())
}

/// Reads a whole batch: `data` as staged (gzip), `text` gunzipped. `last` is the last change
/// written before it; `parsing` its chunks parsed ahead, used if they fit.
#[allow(clippy::too_many_arguments)]
pub(super) fn process_whole(
    writer: PartWriter,
    table: &str,
    staging_key: &str,
    data: &[u8],
    text: &Arc<Text>,
    watermark: Option<Position>,
    last: Option<Position>,
    parsing: Option<Parsing>,
) -> Result<BatchWork, PartError> {
    let batch = Batch {
        table,
        staging_key,
        data,
        text,
    };
    process_chunks(writer, &batch, watermark, last, CHUNK_BYTES, parsing)
}

/// A staged batch: the table's name, its staging key, the object as staged and gunzipped.
#[derive(Clone, Copy)]
struct Batch<'a> {
    table: &'a str,
    staging_key: &'a str,
    data: &'a [u8],
    text: &'a Arc<Text>,
}

/// [`process_whole`] with chunks of about `chunk_bytes`.
fn process_chunks(
    mut writer: PartWriter,
    batch: &Batch<'_>,
    watermark: Option<Position>,
    mut last: Option<Position>,
    chunk_bytes: usize,
    parsing: Option<Parsing>,
) -> Result<BatchWork, PartError> {
    let Batch {
        table,
        staging_key,
        data,
        text,
    } = *batch;
    let cx = Context::of(&writer, watermark);
    let mut parsing = match parsing {
        Some(p) if p.serves(&cx, text, last) => p,
        stale => {
            // Its threads stop now rather than when the batch is done.
            drop(stale);
            Parsing::start(cx.clone(), text.clone(), last, chunk_bytes)
        }
    };

    let mut finished = Vec::new();
    let mut dead = Vec::new();
    let mut duplicates = 0;
    let mut line_base = 0u64;
    // The staged member goes into the JSONL file as it is while every line so far is accepted
    // as staged into this part; until then its lines wait here.
    let mut copy = writer.jsonl_takes_gzip_members() && text.ends_with(b"\n");
    let mut waiting: Vec<Range<usize>> = Vec::new();
    let mut waiting_bytes = 0u64;
    let ratio = data.len() as f64 / text.len().max(1) as f64;

    while let Some((range, parsed)) = parsing.next() {
        // A chunk its thread could not parse (an error, a thread that stopped or never
        // started) is parsed here against the real last change: that gives the error, if it
        // is the chunk's own, as line-by-line reading would.
        let mut parsed = match parsed {
            Ok(p) => p,
            Err(error) => {
                tracing::debug!(error = %error, "parsing a chunk again on the writing thread");
                parse_chunk(&cx, text, range.clone(), last)?
            }
        };
        // Parsed against a floor at most the last change before the chunk. A line of this
        // chunk above the floor but not after the changes before it is a duplicate the chunk
        // could not see: read the chunk again against the real last change (what reading
        // line by line does).
        if let (Some(l), Some(m)) = (last, parsed.min_above_floor) {
            if m <= l {
                parsed = parse_chunk(&cx, text, range, last)?;
            }
        }
        copy &= parsed.whole;
        for b in parsed.bad.drain(..) {
            dead.push(DeadLetter {
                reason: b.reason,
                staging_key: staging_key.to_owned(),
                line: line_base + b.line,
                raw: Some(String::from_utf8_lossy(&b.raw).into_owned()),
            });
        }
        line_base += parsed.line_count;
        duplicates += parsed.duplicates;
        let (Some(first), Some(end)) = (parsed.first, parsed.last) else {
            continue;
        };
        let waiting_estimate = (waiting_bytes as f64 * ratio) as u64;
        if writer.is_full_with(waiting_estimate) {
            write_lines(&mut writer, text, &waiting)?;
            waiting.clear();
            waiting_bytes = 0;
            copy = false;
            let next = writer.next(table)?;
            finished.push(std::mem::replace(&mut writer, next).finish()?);
        }
        writer.append_rows(parsed.batch.as_ref(), parsed.lines.len() as u64, first, end)?;
        if copy {
            waiting_bytes += parsed.lines.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
            waiting.extend(parsed.lines);
        } else {
            write_lines(&mut writer, text, &waiting)?;
            waiting.clear();
            waiting_bytes = 0;
            write_lines(&mut writer, text, &parsed.lines)?;
        }
        last = Some(end.0);
    }
    if copy && !waiting.is_empty() {
        writer.write_jsonl_member(data)?;
    } else {
        write_lines(&mut writer, text, &waiting)?;
    }
    Ok(BatchWork {
        writer,
        finished,
        dead,
        copy_object: false,
        last,
        duplicates,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use arrow::compute::concat_batches;
    use bytes::Bytes;
    use cdc_contract::layout::Format;
    use cdc_contract::schema::{ColumnSchema, TableSchema};
    use cdc_contract::{Lsn, TableName};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use proptest::prelude::*;

    use crate::compact::parts::process_lines;
    use crate::config::Compression;
    use crate::part::{FinishedPart, Limits};

    fn schema() -> Arc<PartSchema> {
        schema_with_price(1700)
    }

    /// The test schema with the price column of type `price_oid`.
    fn schema_with_price(price_oid: u32) -> Arc<PartSchema> {
        let col = |name: &str, oid: u32, typmod: i32| ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: oid,
            typmod,
            key: name == "id",
            base_oid: oid,
            element_oid: None,
        };
        Arc::new(PartSchema::new(&TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![
                col("id", 23, -1),
                col("price", price_oid, ((10 << 16) | 2) + 4),
                col("note", 25, -1),
            ],
        }))
    }

    /// What a staged line is, in a generated batch.
    #[derive(Debug, Clone)]
    enum Kind {
        /// A change `step` positions after the previous one (0: the same position again,
        /// negative: an earlier one).
        Change {
            step: i8,
            note_len: u8,
            crlf: bool,
        },
        Blank,
        NotJson,
        /// A change whose row image is not an object.
        NotAnObject,
    }

    fn kind() -> impl Strategy<Value = Kind> {
        prop_oneof![
            20 => (-2i8..4, 0u8..200, proptest::bool::weighted(0.05))
                .prop_map(|(step, note_len, crlf)| Kind::Change { step, note_len, crlf }),
            1 => Just(Kind::Blank),
            1 => Just(Kind::NotJson),
            1 => Just(Kind::NotAnObject),
        ]
    }

    fn change(lsn: u64, ord: u32, after: &str) -> String {
        format!(
            r#"{{"before":null,"after":{after},"source":{{"version":"x","connector":"postgresql","name":"s","ts_ms":1000,"ts_us":1000123,"snapshot":"false","db":"d","sequence":"[]","schema":"public","table":"t","txId":5,"lsn":{lsn},"commit_lsn":{lsn}}},"op":"c","ts_ms":1,"transaction":{{"id":"5:{lsn}","total_order":{ord},"data_collection_order":{ord}}}}}"#
        )
    }

    /// The staged text of `kinds`, positions starting after (100, 0).
    fn staged(kinds: &[Kind]) -> Vec<u8> {
        let mut text = String::new();
        let mut at: i64 = 200;
        for (i, k) in kinds.iter().enumerate() {
            match k {
                Kind::Change {
                    step,
                    note_len,
                    crlf,
                } => {
                    at = (at + i64::from(*step)).max(1);
                    let (lsn, ord) = (at as u64 / 4 * 100, (at % 4) as u32);
                    let after = format!(
                        r#"{{"id":{i},"price":"{i}.25","note":"{}"}}"#,
                        "n".repeat(usize::from(*note_len))
                    );
                    text += &change(lsn, ord, &after);
                    text += if *crlf { "\r\n" } else { "\n" };
                }
                Kind::Blank => text += "  \n",
                Kind::NotJson => text += "{\"before\":\n",
                Kind::NotAnObject => {
                    text += &change(at as u64 / 4 * 100, (at % 4) as u32, "[1]");
                    text += "\n";
                }
            }
        }
        text.into_bytes()
    }

    fn gzip(text: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text).unwrap();
        gz.finish().unwrap()
    }

    fn writer(formats: &[Format], part_max_bytes: u64) -> PartWriter {
        writer_of(schema(), formats, part_max_bytes)
    }

    fn writer_of(schema: Arc<PartSchema>, formats: &[Format], part_max_bytes: u64) -> PartWriter {
        let limits = Limits {
            part_max_bytes,
            row_group_bytes: 1 << 20,
            compression: Compression::Snappy,
            gzip_level: 1,
            jsonl_compression: cdc_contract::layout::JsonlCompression::Gzip,
            avro_codec: crate::avro::AvroCodec::Deflate,
        };
        PartWriter::new(0, "sid".into(), schema, formats, limits, "public.t").unwrap()
    }

    /// All the parts' JSONL text, rows, and the part count.
    fn contents(work: BatchWork) -> (Vec<u8>, Option<RecordBatch>, usize, Vec<Vec<u8>>) {
        let mut parts: Vec<FinishedPart> = work.finished;
        if work.writer.rows() > 0 {
            parts.push(work.writer.finish().unwrap());
        }
        let mut jsonl = Vec::new();
        let mut files = Vec::new();
        let mut batches = Vec::new();
        for p in &parts {
            for (format, bytes, total) in &p.tails {
                assert_eq!(*total as usize, bytes.len());
                match format {
                    Format::Jsonl => {
                        files.push(bytes.clone());
                        flate2::read::MultiGzDecoder::new(&bytes[..])
                            .read_to_end(&mut jsonl)
                            .unwrap();
                    }
                    // Avro blocks follow the batches written; the rows are Parquet's.
                    Format::Avro => {}
                    Format::Parquet => {
                        let reader =
                            ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes.clone()))
                                .unwrap()
                                .build()
                                .unwrap();
                        batches.extend(reader.map(|b| b.unwrap()));
                    }
                }
            }
        }
        let rows = batches
            .first()
            .map(|b| concat_batches(&b.schema(), &batches).unwrap());
        (jsonl, rows, parts.len(), files)
    }

    fn position(at: i64) -> Position {
        Position::new(Lsn(at as u64 / 4 * 100), (at % 4) as u32)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Reading a batch whole, in chunks on several threads, gives what reading it line by
        /// line gives: the same JSONL, rows, dead letters, duplicates and last position; the
        /// same parts when no part fills up.
        #[test]
        fn chunks_read_like_lines(
            kinds in proptest::collection::vec(kind(), 1..400),
            chunk_bytes in 1usize..20_000,
            watermark in proptest::option::of(150i64..260),
            floor in proptest::option::of(150i64..260),
            small_parts in proptest::bool::weighted(0.3),
            typed in 0u8..5,
            ahead in 0u8..5,
            ahead_floor in proptest::option::of(100i64..260),
        ) {
            let text = Arc::new(Text::from(staged(&kinds)));
            let data = gzip(&text);
            let formats: &[Format] = match typed {
                0 => &[Format::Jsonl],
                1 => &[Format::Jsonl, Format::Parquet, Format::Avro],
                _ => &[Format::Jsonl, Format::Parquet],
            };
            let part_max = if small_parts { 8_000 } else { 1 << 30 };
            let watermark = watermark.map(position);
            let last = floor.map(position).max(watermark);
            let lines = process_lines(writer(formats, part_max), "public.t", "k", &data, watermark, last).unwrap();
            let batch = Batch { table: "public.t", staging_key: "k", data: &data, text: &text };
            let w = writer(formats, part_max);
            // Parsed ahead (as while the batch before appends) against a floor below the last
            // change, or against another part's schema or a floor above the last change (both
            // not to be used), or not at all.
            let parsing = match ahead {
                0 => None,
                1 => {
                    // Prices as integers: rows read with it differ from the part's.
                    let other = writer_of(schema_with_price(23), formats, part_max);
                    Some(Parsing::start(Context::of(&other, watermark), text.clone(), None, chunk_bytes))
                }
                2 | 3 => {
                    let floor = ahead_floor.map(position).max(watermark).min(last);
                    Some(Parsing::start(Context::of(&w, watermark), text.clone(), floor, chunk_bytes))
                }
                // Above every change: used, it would drop them all as duplicates.
                _ => {
                    let floor = Some(Position::new(Lsn(1 << 40), 0));
                    Some(Parsing::start(Context::of(&w, watermark), text.clone(), floor, chunk_bytes))
                }
            };
            let chunked = process_chunks(w, &batch, watermark, last, chunk_bytes, parsing).unwrap();
            prop_assert_eq!(&chunked.dead, &lines.dead);
            prop_assert_eq!(chunked.duplicates, lines.duplicates);
            prop_assert_eq!(chunked.last, lines.last);
            prop_assert!(!chunked.copy_object);
            let (a_text, a_rows, a_parts, _) = contents(chunked);
            let (b_text, b_rows, b_parts, _) = contents(lines);
            prop_assert_eq!(String::from_utf8_lossy(&a_text), String::from_utf8_lossy(&b_text));
            prop_assert_eq!(a_rows, b_rows);
            if !small_parts {
                prop_assert_eq!(a_parts, b_parts);
            }
        }
    }

    #[test]
    fn a_batch_going_whole_into_a_part_keeps_its_gzip_member() {
        let kinds: Vec<Kind> = (0..500)
            .map(|i| Kind::Change {
                step: 1,
                note_len: (i % 50) as u8,
                crlf: false,
            })
            .collect();
        let text = Arc::new(Text::from(staged(&kinds)));
        let data = gzip(&text);
        let batch = Batch {
            table: "public.t",
            staging_key: "k",
            data: &data,
            text: &text,
        };
        // Twice: the second batch's member follows the first one's.
        let first = process_chunks(
            writer(&[Format::Jsonl, Format::Parquet], 1 << 30),
            &batch,
            None,
            None,
            3_000,
            None,
        )
        .unwrap();
        let again = process_chunks(first.writer, &batch, None, first.last, 3_000, None);
        // Every change of the second reading is a duplicate of the first's.
        let again = again.unwrap();
        assert_eq!(again.duplicates, 500);
        let (jsonl, rows, parts, files) = contents(again);
        assert_eq!(parts, 1);
        assert_eq!(files, vec![data.clone()], "the staged member, as it is");
        assert_eq!(jsonl[..], text[..]);
        assert_eq!(rows.unwrap().num_rows(), 500);
    }

    #[test]
    fn chunks_whose_parsing_threads_stopped_are_parsed_on_the_writing_thread() {
        let kinds: Vec<Kind> = (0..400)
            .map(|i| Kind::Change {
                step: if i % 37 == 0 { -1 } else { 1 },
                note_len: (i % 90) as u8,
                crlf: false,
            })
            .collect();
        let text = Arc::new(Text::from(staged(&kinds)));
        let data = gzip(&text);
        let formats = &[Format::Jsonl, Format::Parquet];
        let w = writer(formats, 1 << 30);
        // Threads that died before sending anything: their channels are closed.
        let results = (0..2)
            .map(|_| mpsc::sync_channel::<ParsedChunk>(AHEAD).1)
            .collect();
        let dead_threads = Parsing {
            cx: Context::of(&w, None),
            text: text.clone(),
            ranges: Arc::new(chunks(&text, 3_000)),
            floor: None,
            results,
            taken: 0,
        };
        let batch = Batch {
            table: "public.t",
            staging_key: "k",
            data: &data,
            text: &text,
        };
        let chunked = process_chunks(w, &batch, None, None, 3_000, Some(dead_threads)).unwrap();
        let lines =
            process_lines(writer(formats, 1 << 30), "public.t", "k", &data, None, None).unwrap();
        assert!(lines.duplicates > 0);
        assert_eq!(chunked.duplicates, lines.duplicates);
        assert_eq!(chunked.last, lines.last);
        let (a_text, a_rows, _, _) = contents(chunked);
        let (b_text, b_rows, _, _) = contents(lines);
        assert_eq!(a_text, b_text);
        assert_eq!(a_rows, b_rows);
    }

    #[test]
    fn chunks_end_at_line_ends_and_cover_the_text() {
        let text = b"aaaa\nbb\ncccccc\nd\n\neeee";
        for size in 1..text.len() + 2 {
            let c = chunks(text, size);
            assert_eq!(c.first().map(|r| r.start), Some(0));
            assert_eq!(c.last().map(|r| r.end), Some(text.len()));
            for pair in c.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert_eq!(text[pair[0].end - 1], b'\n');
            }
        }
        assert!(chunks(b"", 4).is_empty());
    }

    #[test]
    fn only_small_readable_gzip_is_gunzipped_whole() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[b'x'; 1000]).unwrap();
        let data = gz.finish().unwrap();
        let pool = TextPool::default();
        assert_eq!(
            gunzip_whole(&data, 1000, &pool).map(|t| t.len()),
            Some(1000)
        );
        assert!(gunzip_whole(&data, 999, &pool).is_none());
        assert!(gunzip_whole(b"plain text\n", 1000, &pool).is_none());
        assert!(gunzip_whole(&data[..data.len() - 9], 1000, &pool).is_none());
    }

    #[test]
    fn a_batch_is_gunzipped_into_a_buffer_of_its_own_size() {
        // Text that gzip shrinks far more than six times: a guess from the staged size is short,
        // and growing by doubling would hold up to twice the text.
        let text: Vec<u8> = (0..400_000u32)
            .flat_map(|i| format!("{{\"n\":{}}}\n", i % 64).into_bytes())
            .collect();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&text).unwrap();
        let data = gz.finish().unwrap();
        assert!(data.len() * 6 < text.len());
        let read = gunzip_whole(&data, 1 << 30, &TextPool::default()).unwrap();
        assert_eq!(read[..], text[..]);
        assert!(
            read.buffer.capacity() <= text.len() + 1,
            "{} bytes held for a text of {}",
            read.buffer.capacity(),
            text.len()
        );
        // A trailer that claims more than the limit is not trusted with the buffer's size.
        let mut lying = data.clone();
        let n = lying.len();
        lying[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(gunzip_whole(&lying, text.len() + 10, &TextPool::default()).is_none());
        let mut short = data;
        short[n - 4..].copy_from_slice(&10u32.to_le_bytes());
        assert!(gunzip_whole(&short, 1 << 30, &TextPool::default()).is_none());
    }

    #[test]
    fn a_text_given_back_is_written_over_and_holds_only_the_new_batch() {
        let gzip = |members: &[&[u8]]| {
            let mut out = Vec::new();
            for m in members {
                let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                gz.write_all(m).unwrap();
                out.extend(gz.finish().unwrap());
            }
            out
        };
        let big: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {i}\n").into_bytes())
            .collect();
        let pool = TextPool::default();
        // Several members, and more text than a first guess from the staged size holds.
        let first = gunzip_whole(&gzip(&[&big[..5], &big[5..]]), 1 << 30, &pool).unwrap();
        assert_eq!(first[..], big[..]);
        let at = first.as_ptr();
        drop(first);
        let small = b"a\nbb\n";
        let second = gunzip_whole(&gzip(&[small]), 1 << 30, &pool).unwrap();
        assert_eq!(second.as_ptr(), at, "the buffer given back is used again");
        assert_eq!(second[..], small[..]);
        // One too big to read whole gives its buffer back too; the pool keeps a few at most.
        drop(second);
        assert!(gunzip_whole(&gzip(&[&big]), 10, &pool).is_none());
        assert_eq!(
            gunzip_whole(&gzip(&[small]), 10, &pool).unwrap().as_ptr(),
            at
        );
        let texts: Vec<Text> = (0..POOL_TEXTS + 2)
            .map(|_| gunzip_whole(&gzip(&[small]), 10, &pool).unwrap())
            .collect();
        drop(texts);
        assert_eq!(pool.0.lock().unwrap().len(), POOL_TEXTS);
    }
}
