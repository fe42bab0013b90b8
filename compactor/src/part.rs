//! One part being written: the same changes as a gzipped JSONL file (lines copied as staged)
//! and a Parquet file (flat, typed rows). Synchronous and CPU-bound; the caller drains the
//! encoded bytes as they come ([`PartWriter::take_output`]) and uploads them.
//!
//! Memory is bounded by the Arrow batch being built, the Parquet row group in progress
//! (`PARQUET_ROW_GROUP_BYTES`) and the bytes not yet drained.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, MapBuilder, MapFieldNames, NullBufferBuilder, StringBuilder,
    StructArray, TimestampMicrosecondBuilder,
};
use arrow::datatypes::{Fields, SchemaRef};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;

use cdc_contract::event::{Op, UNAVAILABLE_VALUE};
use cdc_contract::layout::{Format, JsonlCompression};
use cdc_contract::Position;

use crate::avro::{AvroCodec, AvroError, AvroPart};
use crate::background_gzip::BackgroundGzip;
use crate::background_zstd::BackgroundZstd;
use crate::columns::ColumnBuilder;
use crate::config::Compression;
use crate::convert::{convert, text_form, Scalar};
use crate::dictionary;
use crate::envelope::{split_row, ColumnLookup, Envelope, RowValues};
use crate::parquet_schema::{utc, PartSchema};

/// Why a part could not be written (a bug or resource problem, not bad input).
#[derive(Debug, thiserror::Error)]
pub enum PartError {
    /// Arrow refused a batch.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// The Parquet writer failed.
    #[error("parquet: {0}")]
    Parquet(#[from] ParquetError),
    /// Compression failed.
    #[error("jsonl compression: {0}")]
    Io(#[from] std::io::Error),
    /// The Avro writer failed.
    #[error(transparent)]
    Avro(#[from] AvroError),
}

/// A row image that is not a JSON object: the line goes to the dead-letter prefix.
#[derive(Debug, thiserror::Error)]
#[error("row image is not a JSON object: {0}")]
pub struct BadRow(String);

/// Size limits of a part.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Roll to a new part at this size (either format).
    pub part_max_bytes: u64,
    /// Write a Parquet row group once its encoded size reaches this.
    pub row_group_bytes: u64,
    /// Parquet compression.
    pub compression: Compression,
    /// gzip level of JSONL parts.
    pub gzip_level: u32,
    /// Compression of JSONL parts.
    pub jsonl_compression: JsonlCompression,
    /// Block compression of Avro parts.
    pub avro_codec: AvroCodec,
}

impl Limits {
    /// Staged bytes gathered into one Arrow batch before it is encoded.
    fn batch_bytes(&self) -> usize {
        (self.part_max_bytes / 8).clamp(2048, 4 * 1024 * 1024) as usize
    }
}

const BATCH_ROWS: usize = 8192;

/// Statistics of a finished part.
#[derive(Debug, Clone)]
pub struct PartStats {
    /// The part number.
    pub part: u32,
    /// Schema version of its rows.
    pub schema_id: String,
    /// Changes.
    pub rows: u64,
    /// First change.
    pub first: Position,
    /// Last change.
    pub last: Position,
    /// Commit time of the first change (ms).
    pub first_commit_ms: i64,
    /// Commit time of the last change (ms).
    pub last_commit_ms: i64,
}

/// A finished part: its statistics and, per format, the bytes not drained yet and the total size.
pub struct FinishedPart {
    /// Statistics.
    pub stats: PartStats,
    /// Per format: remaining bytes and the file's total size.
    pub tails: Vec<(Format, Vec<u8>, u64)>,
}

struct ParquetPart {
    /// Made when the first rows come, which choose the columns without a dictionary
    /// ([`crate::dictionary`]).
    writer: Option<ArrowWriter<Vec<u8>>>,
    props: WriterPropertiesBuilder,
    arrow: SchemaRef,
    drained: u64,
    estimate: u64,
}

impl ParquetPart {
    /// The writer, made now if it was not, with `first` (the part's first rows, if any)
    /// choosing which columns go without a dictionary.
    fn writer(
        &mut self,
        first: Option<&RecordBatch>,
    ) -> Result<&mut ArrowWriter<Vec<u8>>, PartError> {
        let writer = match self.writer.take() {
            Some(w) => w,
            None => {
                let mut props = self.props.clone();
                for name in first
                    .map(dictionary::without_dictionary)
                    .unwrap_or_default()
                {
                    props = props.set_column_dictionary_enabled(ColumnPath::new(vec![name]), false);
                }
                ArrowWriter::try_new(Vec::new(), self.arrow.clone(), Some(props.build()))?
            }
        };
        Ok(self.writer.insert(writer))
    }

    /// Encoded bytes not taken yet.
    fn ready_len(&self) -> usize {
        self.writer.as_ref().map_or(0, |w| w.inner().len())
    }

    /// Takes the encoded bytes produced so far.
    fn take(&mut self) -> Vec<u8> {
        let out = self
            .writer
            .as_mut()
            .map(|w| std::mem::take(w.inner_mut()))
            .unwrap_or_default();
        self.drained += out.len() as u64;
        out
    }
}

/// The Arrow columns of rows being gathered for the typed formats: the metadata columns,
/// `_key_before` and the table's columns. [`RowBuilders::finish`] gives them as one batch.
/// Rows can be gathered apart from the part (on another thread) and handed over as a batch.
pub struct RowBuilders {
    schema: Arc<PartSchema>,
    op: StringBuilder,
    lsn: Int64Builder,
    seq: Int64Builder,
    tx_id: Int64Builder,
    commit_ts: TimestampMicrosecondBuilder,
    raw: MapBuilder<StringBuilder, StringBuilder>,
    key_before: Option<KeyBefore>,
    columns: Vec<ColumnBuilder>,
    rows: usize,
}

impl RowBuilders {
    /// Empty builders for rows of `schema`.
    pub fn new(schema: &Arc<PartSchema>) -> Result<Self, ArrowError> {
        Ok(RowBuilders {
            schema: schema.clone(),
            op: StringBuilder::new(),
            lsn: Int64Builder::new(),
            seq: Int64Builder::new(),
            tx_id: Int64Builder::new(),
            commit_ts: TimestampMicrosecondBuilder::new().with_timezone(utc()),
            raw: raw_builder(),
            key_before: schema
                .key_before
                .as_ref()
                .map(|f| KeyBefore::new(f, schema))
                .transpose()?,
            columns: schema
                .columns
                .iter()
                .map(|c| ColumnBuilder::new(&c.ty))
                .collect::<Result<_, _>>()?,
            rows: 0,
        })
    }

    /// Appends one change's row. Fails (appending nothing) when a row image is not an object.
    pub fn push(
        &mut self,
        lookup: &ColumnLookup,
        env: &Envelope<'_>,
        at: (Position, i64),
    ) -> Result<(), BadRow> {
        let mut row = RowValues {
            values: Vec::with_capacity(self.schema.columns.len()),
            unknown: Vec::new(),
        };
        self.push_with(lookup, &mut row, env, at)
    }

    /// [`RowBuilders::push`] splitting the row image into `row`, a buffer kept between rows.
    pub fn push_with<'a>(
        &mut self,
        lookup: &ColumnLookup,
        row: &mut RowValues<'a>,
        env: &Envelope<'a>,
        at: (Position, i64),
    ) -> Result<(), BadRow> {
        push_row(self, lookup, row, env, at)?;
        self.rows += 1;
        Ok(())
    }

    /// The rows gathered so far as one batch (none when no row is gathered); the builders are
    /// empty again.
    pub fn finish(&mut self) -> Result<Option<RecordBatch>, ArrowError> {
        if self.rows == 0 {
            return Ok(None);
        }
        self.rows = 0;
        let mut arrays: Vec<ArrayRef> = vec![
            Arc::new(self.op.finish()),
            Arc::new(self.lsn.finish()),
            Arc::new(self.seq.finish()),
            Arc::new(self.tx_id.finish()),
            Arc::new(self.commit_ts.finish()),
            Arc::new(self.raw.finish()),
        ];
        if let Some(k) = self.key_before.as_mut() {
            arrays.push(k.finish()?);
        }
        for c in &mut self.columns {
            arrays.push(c.finish()?);
        }
        RecordBatch::try_new(self.schema.arrow.clone(), arrays).map(Some)
    }
}

/// The `_key_before` struct column being built.
struct KeyBefore {
    fields: Fields,
    children: Vec<ColumnBuilder>,
    nulls: NullBufferBuilder,
}

impl KeyBefore {
    fn new(fields: &Fields, schema: &PartSchema) -> Result<Self, ArrowError> {
        Ok(KeyBefore {
            fields: fields.clone(),
            children: schema
                .key_columns
                .iter()
                .map(|&i| ColumnBuilder::new(&schema.columns[i].ty))
                .collect::<Result<_, _>>()?,
            nulls: NullBufferBuilder::new(0),
        })
    }

    fn append_null(&mut self) {
        for c in &mut self.children {
            c.append_null();
        }
        self.nulls.append_null();
    }

    fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        let arrays = self
            .children
            .iter_mut()
            .map(ColumnBuilder::finish)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(StructArray::try_new(
            self.fields.clone(),
            arrays,
            self.nulls.finish(),
        )?))
    }
}

/// The JSONL file, compressed on a background thread.
enum JsonlPart {
    Gzip(BackgroundGzip),
    Zstd(BackgroundZstd),
}

impl JsonlPart {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            JsonlPart::Gzip(z) => z.write(bytes),
            JsonlPart::Zstd(z) => z.write(bytes),
        }
    }

    fn estimated_len(&self) -> u64 {
        match self {
            JsonlPart::Gzip(z) => z.estimated_len(),
            JsonlPart::Zstd(z) => z.estimated_len(),
        }
    }

    fn ready_len(&self) -> usize {
        match self {
            JsonlPart::Gzip(z) => z.ready_len(),
            JsonlPart::Zstd(z) => z.ready_len(),
        }
    }

    fn take(&mut self) -> std::io::Result<Vec<u8>> {
        match self {
            JsonlPart::Gzip(z) => z.take(),
            JsonlPart::Zstd(z) => z.take(),
        }
    }

    fn finish(self) -> std::io::Result<(Vec<u8>, u64)> {
        match self {
            JsonlPart::Gzip(z) => z.finish(),
            JsonlPart::Zstd(z) => z.finish(),
        }
    }
}

/// zstd level of JSONL parts (zstd's default: about gzip -6's ratio at several times its speed).
const ZSTD_LEVEL: i32 = 3;

/// The part being written.
pub struct PartWriter {
    part: u32,
    schema_id: String,
    schema: Arc<PartSchema>,
    lookup: Arc<ColumnLookup>,
    limits: Limits,
    jsonl: Option<JsonlPart>,
    /// The rows of the typed formats not encoded yet (when there is a typed format).
    builders: Option<RowBuilders>,
    parquet: Option<ParquetPart>,
    avro: Option<AvroPart>,
    rows: u64,
    first: Option<(Position, i64)>,
    last: Option<(Position, i64)>,
    pending_rows: usize,
    pending_bytes: usize,
}

fn raw_builder() -> MapBuilder<StringBuilder, StringBuilder> {
    MapBuilder::new(
        Some(MapFieldNames {
            entry: "key_value".into(),
            key: "key".into(),
            value: "value".into(),
        }),
        StringBuilder::new(),
        StringBuilder::new(),
    )
}

/// The column lookup (event column name to position) of a part schema.
pub fn column_lookup(schema: &PartSchema) -> ColumnLookup {
    schema
        .columns
        .iter()
        .enumerate()
        .map(|(i, c)| (c.name.clone(), i))
        .collect()
}

impl PartWriter {
    /// Starts part number `part` for rows of schema version `schema_id`, in `formats`.
    pub fn new(
        part: u32,
        schema_id: String,
        schema: Arc<PartSchema>,
        formats: &[Format],
        limits: Limits,
        table: &str,
    ) -> Result<Self, PartError> {
        let jsonl = if formats.contains(&Format::Jsonl) {
            Some(match limits.jsonl_compression {
                JsonlCompression::Gzip => JsonlPart::Gzip(BackgroundGzip::new(limits.gzip_level)?),
                JsonlCompression::Zstd => JsonlPart::Zstd(BackgroundZstd::new(ZSTD_LEVEL)?),
            })
        } else {
            None
        };
        let parquet = if formats.contains(&Format::Parquet) {
            let props = WriterProperties::builder()
                .set_compression(limits.compression.codec())
                .set_max_row_group_size(1 << 22)
                .set_statistics_enabled(EnabledStatistics::Chunk)
                .set_key_value_metadata(Some(vec![
                    KeyValue::new("cdc.table".to_owned(), table.to_owned()),
                    KeyValue::new("cdc.schema_id".to_owned(), schema_id.clone()),
                ]));
            Some(ParquetPart {
                writer: None,
                props,
                arrow: schema.arrow.clone(),
                drained: 0,
                estimate: 0,
            })
        } else {
            None
        };
        let avro = if formats.contains(&Format::Avro) {
            Some(AvroPart::new(
                schema.arrow.clone(),
                &schema.uuid_columns(),
                table,
                &schema_id,
                limits.avro_codec,
            )?)
        } else {
            None
        };
        // The builders exist when a typed format (Parquet, Avro) is an output.
        let builders = if parquet.is_some() || avro.is_some() {
            Some(RowBuilders::new(&schema)?)
        } else {
            None
        };
        Ok(PartWriter {
            part,
            schema_id,
            builders,
            lookup: Arc::new(column_lookup(&schema)),
            schema,
            limits,
            jsonl,
            parquet,
            avro,
            rows: 0,
            first: None,
            last: None,
            pending_rows: 0,
            pending_bytes: 0,
        })
    }

    /// The next part, same schema and formats.
    pub fn next(&self, table: &str) -> Result<Self, PartError> {
        let mut formats = Vec::new();
        if self.jsonl.is_some() {
            formats.push(Format::Jsonl);
        }
        if self.parquet.is_some() {
            formats.push(Format::Parquet);
        }
        if self.avro.is_some() {
            formats.push(Format::Avro);
        }
        PartWriter::new(
            self.part + 1,
            self.schema_id.clone(),
            self.schema.clone(),
            &formats,
            self.limits,
            table,
        )
    }

    /// The part number.
    pub fn part(&self) -> u32 {
        self.part
    }

    /// The schema version its rows follow.
    pub fn schema_id(&self) -> &str {
        &self.schema_id
    }

    /// The part schema.
    pub fn schema(&self) -> &Arc<PartSchema> {
        &self.schema
    }

    /// Changes written so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Estimated size of the larger file so far.
    pub fn estimated_bytes(&self) -> u64 {
        let jsonl = self.jsonl.as_ref().map(|j| j.estimated_len()).unwrap_or(0);
        let parquet = self.parquet.as_ref().map(|p| p.estimate).unwrap_or(0);
        let avro = self.avro.as_ref().map(|a| a.estimated_len()).unwrap_or(0);
        jsonl.max(parquet).max(avro)
    }

    /// True once the part has reached its size limit.
    pub fn is_full(&self) -> bool {
        self.is_full_with(0)
    }

    /// Appends one change: `line` as staged, `env` its parsed envelope. Fails (writing nothing)
    /// when the row image is not an object.
    pub fn push(
        &mut self,
        line: &str,
        env: &Envelope<'_>,
    ) -> Result<Result<(), BadRow>, PartError> {
        let pos = env.position();
        let commit_us = env.commit_us();
        if let Some(b) = self.builders.as_mut() {
            // The row is split before anything is appended: a bad image leaves every builder
            // untouched.
            if let Err(bad) = b.push(&self.lookup, env, (pos, commit_us)) {
                return Ok(Err(bad));
            }
        }
        if let Some(j) = self.jsonl.as_mut() {
            j.write(line.as_bytes())?;
            j.write(b"\n")?;
        }
        let commit_ms = commit_us.div_euclid(1000);
        self.rows += 1;
        if self.first.is_none() {
            self.first = Some((pos, commit_ms));
        }
        self.last = Some((pos, commit_ms));
        self.pending_rows += 1;
        self.pending_bytes += line.len();
        if self.pending_rows >= BATCH_ROWS || self.pending_bytes >= self.limits.batch_bytes() {
            self.flush_batch()?;
        }
        Ok(Ok(()))
    }

    /// Encodes the rows gathered so far into the typed writers, writing a row group when full.
    fn flush_batch(&mut self) -> Result<(), PartError> {
        self.pending_rows = 0;
        self.pending_bytes = 0;
        let Some(b) = self.builders.as_mut() else {
            return Ok(());
        };
        if let Some(batch) = b.finish()? {
            self.write_typed(&batch)?;
        }
        Ok(())
    }

    /// Writes a batch of rows (in this part's Arrow schema) to the typed writers: Parquet
    /// (a row group when full) and Avro (one block).
    fn write_typed(&mut self, batch: &RecordBatch) -> Result<(), PartError> {
        if let Some(a) = self.avro.as_mut() {
            a.write(batch)?;
        }
        if let Some(p) = self.parquet.as_mut() {
            let writer = p.writer(Some(batch))?;
            writer.write(batch)?;
            if writer.in_progress_size() as u64 >= self.limits.row_group_bytes {
                writer.flush()?;
            }
            p.estimate = writer.bytes_written() as u64 + writer.in_progress_size() as u64;
        }
        Ok(())
    }

    /// True when the typed formats need rows as Arrow batches.
    pub fn wants_rows(&self) -> bool {
        self.builders.is_some()
    }

    /// The column lookup of the part's schema (event column name to position).
    pub fn lookup(&self) -> &Arc<ColumnLookup> {
        &self.lookup
    }

    /// True when JSONL is an output and it is gzip, so whole gzip members can be appended.
    pub fn jsonl_takes_gzip_members(&self) -> bool {
        matches!(self.jsonl, Some(JsonlPart::Gzip(_)))
    }

    /// Appends changes gathered apart from the part: `batch` their typed rows (given when
    /// [`PartWriter::wants_rows`]), `rows` their number, `first` and `last` their positions
    /// and commit times (ms). Their JSONL goes through [`PartWriter::write_jsonl`] or
    /// [`PartWriter::write_jsonl_member`].
    pub fn append_rows(
        &mut self,
        batch: Option<&RecordBatch>,
        rows: u64,
        first: (Position, i64),
        last: (Position, i64),
    ) -> Result<(), PartError> {
        if rows == 0 {
            return Ok(());
        }
        // Rows pushed one by one before these go first.
        if self.pending_rows > 0 {
            self.flush_batch()?;
        }
        if let Some(batch) = batch {
            self.write_typed(batch)?;
        }
        self.rows += rows;
        if self.first.is_none() {
            self.first = Some(first);
        }
        self.last = Some(last);
        Ok(())
    }

    /// Appends JSONL text (whole lines, each ending with a newline) to the JSONL file.
    pub fn write_jsonl(&mut self, text: &[u8]) -> Result<(), PartError> {
        if let Some(j) = self.jsonl.as_mut() {
            j.write(text)?;
        }
        Ok(())
    }

    /// Appends a complete gzip member (of whole lines) to the JSONL file as it is.
    pub fn write_jsonl_member(&mut self, member: &[u8]) -> Result<(), PartError> {
        match self.jsonl.as_mut() {
            Some(JsonlPart::Gzip(gz)) => gz.append_member(member)?,
            Some(JsonlPart::Zstd(_)) => {
                return Err(PartError::Io(std::io::Error::other(
                    "a gzip member cannot go into a zstd file",
                )))
            }
            None => {}
        }
        Ok(())
    }

    /// True once the part has reached its size limit, counting `jsonl_extra` more compressed
    /// bytes of JSONL to come.
    pub fn is_full_with(&self, jsonl_extra: u64) -> bool {
        let jsonl = self
            .jsonl
            .as_ref()
            .map(|j| j.estimated_len() + jsonl_extra)
            .unwrap_or(0);
        let parquet = self.parquet.as_ref().map(|p| p.estimate).unwrap_or(0);
        let avro = self.avro.as_ref().map(|a| a.estimated_len()).unwrap_or(0);
        self.rows > 0 && jsonl.max(parquet).max(avro) >= self.limits.part_max_bytes
    }

    /// Takes the encoded bytes of `format` produced so far.
    pub fn take_output(&mut self, format: Format) -> Result<Vec<u8>, PartError> {
        Ok(match format {
            Format::Jsonl => match self.jsonl.as_mut() {
                Some(j) => j.take()?,
                None => Vec::new(),
            },
            Format::Parquet => self
                .parquet
                .as_mut()
                .map(ParquetPart::take)
                .unwrap_or_default(),
            Format::Avro => self.avro.as_mut().map(AvroPart::take).unwrap_or_default(),
        })
    }

    /// Bytes of `format` produced and not taken yet.
    pub fn output_len(&self, format: Format) -> usize {
        match format {
            Format::Jsonl => self.jsonl.as_ref().map(|j| j.ready_len()),
            Format::Parquet => self.parquet.as_ref().map(ParquetPart::ready_len),
            Format::Avro => self.avro.as_ref().map(AvroPart::ready_len),
        }
        .unwrap_or(0)
    }

    /// Closes the files. Call only with at least one row.
    pub fn finish(mut self) -> Result<FinishedPart, PartError> {
        self.flush_batch()?;
        let mut tails = Vec::new();
        if let Some(j) = self.jsonl.take() {
            let (tail, total) = j.finish()?;
            tails.push((Format::Jsonl, tail, total));
        }
        if let Some(mut p) = self.parquet.take() {
            p.writer(None)?.finish()?;
            let tail = p.take();
            let total = p.drained;
            tails.push((Format::Parquet, tail, total));
        }
        if let Some(a) = self.avro.take() {
            let (tail, total) = a.finish()?;
            tails.push((Format::Avro, tail, total));
        }
        let (first, first_commit_ms) = self.first.unwrap_or_default();
        let (last, last_commit_ms) = self.last.unwrap_or_default();
        Ok(FinishedPart {
            stats: PartStats {
                part: self.part,
                schema_id: self.schema_id,
                rows: self.rows,
                first,
                last,
                first_commit_ms,
                last_commit_ms,
            },
            tails,
        })
    }
}

/// The key values an update moved its row away from: `before`'s key columns, when the update
/// has a `before` image whose key differs from `after`'s (a key change, or any change under
/// REPLICA IDENTITY FULL, whose key is the whole row). `after` is the update's row, already
/// split; only `before` is split here.
fn moved_key<'a>(
    schema: &PartSchema,
    lookup: &ColumnLookup,
    env: &Envelope<'a>,
    after: &[Option<&'a str>],
) -> Result<Option<Vec<Option<&'a str>>>, BadRow> {
    let (Op::Update, Some(before), Some(_)) = (env.op, env.before.as_ref(), env.after.as_ref())
    else {
        return Ok(None);
    };
    if schema.key_columns.is_empty() {
        return Ok(None);
    }
    let mut old = RowValues {
        values: vec![None; schema.columns.len()],
        unknown: Vec::new(),
    };
    split_row(before, lookup, &mut old).map_err(BadRow)?;
    let same = schema
        .key_columns
        .iter()
        .all(|&i| old.values[i] == after[i]);
    Ok((!same).then(|| schema.key_columns.iter().map(|&i| old.values[i]).collect()))
}

fn push_row<'a>(
    p: &mut RowBuilders,
    lookup: &ColumnLookup,
    row: &mut RowValues<'a>,
    env: &Envelope<'a>,
    (pos, commit_us): (Position, i64),
) -> Result<(), BadRow> {
    // A borrow of the schema field alone, beside the builders it fills (no Arc clone per row).
    let schema: &PartSchema = &p.schema;
    row.values.clear();
    row.values.resize(schema.columns.len(), None);
    row.unknown.clear();
    if let Some(image) = env.image() {
        split_row(image, lookup, row).map_err(BadRow)?;
    }
    // Still before anything is appended: a bad `before` image leaves the builders untouched.
    let before_key = if p.key_before.is_some() {
        moved_key(schema, lookup, env, &row.values)?
    } else {
        None
    };
    p.op.append_value(env.op.code());
    p.lsn.append_value(pos.commit_lsn.0 as i64);
    p.seq.append_value(i64::from(pos.ordinal));
    p.tx_id.append_option(env.source.tx_id);
    p.commit_ts.append_value(commit_us);
    let mut raw_entries = 0usize;
    for (i, col) in schema.columns.iter().enumerate() {
        let builder = &mut p.columns[i];
        let Some(value) = row.values[i] else {
            builder.append_null();
            continue;
        };
        let text = value;
        let placeholder = text.len() == UNAVAILABLE_VALUE.len() + 2
            && text.starts_with('"')
            && &text[1..text.len() - 1] == UNAVAILABLE_VALUE;
        let flagged = env.raw_columns.iter().any(|c| *c == col.name);
        let converted = if placeholder || flagged {
            None
        } else {
            convert(&col.ty, text).ok()
        };
        match converted {
            Some(Scalar::Null) => builder.append_null(),
            Some(v) => builder.append(&v),
            None => {
                builder.append_null();
                p.raw.keys().append_value(&col.name);
                p.raw.values().append_value(text_form(text));
                raw_entries += 1;
            }
        }
    }
    // Values of columns the schema does not name are kept as text rather than dropped.
    for (name, value) in &row.unknown {
        p.raw.keys().append_value(name);
        p.raw.values().append_value(text_form(value));
        raw_entries += 1;
    }
    // Keys and values always have equal lengths here.
    let _ = p.raw.append(raw_entries > 0);
    if let Some(k) = p.key_before.as_mut() {
        match before_key {
            None => k.append_null(),
            Some(values) => {
                for ((builder, value), &i) in
                    k.children.iter_mut().zip(values).zip(&schema.key_columns)
                {
                    match value.and_then(|v| convert(&schema.columns[i].ty, v).ok()) {
                        Some(v) => builder.append(&v),
                        None => builder.append_null(),
                    }
                }
                k.nulls.append_non_null();
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int32Type, Int64Type};
    use bytes::Bytes;
    use cdc_contract::schema::{ColumnSchema, TableSchema};
    use cdc_contract::TableName;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn col(name: &str, oid: u32, typmod: i32) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: oid,
            typmod,
            key: name == "id",
            base_oid: oid,
            element_oid: None,
        }
    }

    fn schema() -> Arc<PartSchema> {
        Arc::new(PartSchema::new(&TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![
                col("id", 23, -1),
                col("price", 1700, ((10 << 16) | 2) + 4),
                col("note", 25, -1),
            ],
        }))
    }

    fn line(op: &str, lsn: u64, ord: u32, before: &str, after: &str, raw: &str) -> String {
        format!(
            r#"{{"before":{before},"after":{after},"source":{{"version":"x","connector":"postgresql","name":"s","ts_ms":1000,"ts_us":1000123,"snapshot":"false","db":"d","sequence":"[]","schema":"public","table":"t","txId":5,"lsn":{lsn},"commit_lsn":{lsn}}},"op":"{op}","ts_ms":1,"transaction":{{"id":"5:{lsn}","total_order":{ord},"data_collection_order":{ord}}}{raw}}}"#
        )
    }

    /// A Parquet file's rows as one batch.
    fn read_back(pq: &[u8]) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(pq.to_vec()))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    fn limits(part_max_bytes: u64) -> Limits {
        Limits {
            part_max_bytes,
            row_group_bytes: 1 << 20,
            compression: Compression::Snappy,
            gzip_level: 1,
            jsonl_compression: JsonlCompression::Gzip,
            avro_codec: AvroCodec::Deflate,
        }
    }

    #[test]
    fn a_part_holds_both_formats_with_typed_rows_and_raw_text() {
        let mut w = PartWriter::new(
            0,
            "sid".into(),
            schema(),
            &[Format::Jsonl, Format::Parquet],
            limits(1 << 20),
            "public.t",
        )
        .unwrap();
        let lines = [
            line(
                "c",
                10,
                1,
                "null",
                r#"{"id":1,"price":"12.50","note":"a"}"#,
                "",
            ),
            line(
                "u",
                11,
                1,
                "null",
                r#"{"id":1,"price":"NaN","note":"__debezium_unavailable_value"}"#,
                "",
            ),
            line("d", 12, 1, r#"{"id":1}"#, "null", ""),
            line(
                "c",
                13,
                2,
                "null",
                r#"{"id":2,"price":null,"note":"x","extra":true}"#,
                "",
            ),
        ];
        for l in &lines {
            let env: Envelope<'_> = serde_json::from_str(l).unwrap();
            w.push(l, &env).unwrap().unwrap();
        }
        let bad = line("c", 14, 1, "null", "[1]", "");
        let env: Envelope<'_> = serde_json::from_str(&bad).unwrap();
        assert!(w.push(&bad, &env).unwrap().is_err());
        assert_eq!(w.rows(), 4);
        let finished = w.finish().unwrap();
        assert_eq!(finished.stats.first.commit_lsn.0, 10);
        assert_eq!(finished.stats.last.ordinal, 2);
        assert_eq!(finished.stats.first_commit_ms, 1000);

        let (_, gz, total) = &finished.tails[0];
        assert_eq!(*total as usize, gz.len());
        let mut text = String::new();
        std::io::Read::read_to_string(&mut flate2::read::GzDecoder::new(&gz[..]), &mut text)
            .unwrap();
        assert_eq!(text, lines.join("\n") + "\n");

        let (_, pq, _) = &finished.tails[1];
        let b = read_back(pq);
        assert_eq!(b.num_rows(), 4);
        let ops = b.column_by_name("_op").unwrap().as_string::<i32>();
        assert_eq!(
            (0..4).map(|i| ops.value(i)).collect::<Vec<_>>(),
            ["c", "u", "d", "c"]
        );
        let lsn = b
            .column_by_name("_lsn")
            .unwrap()
            .as_primitive::<Int64Type>();
        assert_eq!(lsn.value(3), 13);
        let id = b.column_by_name("id").unwrap().as_primitive::<Int32Type>();
        assert_eq!(id.value(2), 1, "deletes take the before image");
        let price = b
            .column_by_name("price")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        assert_eq!(price.value(0), 1250);
        assert!(price.is_null(1) && price.is_null(3));
        let note = b.column_by_name("note").unwrap().as_string::<i32>();
        assert!(note.is_null(1));
        let raw = b.column_by_name("_raw").unwrap().as_map();
        assert!(raw.is_null(0));
        let entries = raw.value(1);
        let keys = entries.column(0).as_string::<i32>();
        let values = entries.column(1).as_string::<i32>();
        assert_eq!((keys.value(0), values.value(0)), ("price", "NaN"));
        assert_eq!(
            (keys.value(1), values.value(1)),
            ("note", UNAVAILABLE_VALUE)
        );
        let extra = raw.value(3);
        assert_eq!(extra.column(0).as_string::<i32>().value(0), "extra");
    }

    /// Column name to whether its first row group's chunk has a dictionary page.
    fn dictionary_pages(pq: &[u8]) -> std::collections::BTreeMap<String, bool> {
        let reader =
            parquet::file::serialized_reader::SerializedFileReader::new(Bytes::from(pq.to_vec()))
                .unwrap();
        let meta = parquet::file::reader::FileReader::metadata(&reader);
        meta.row_group(0)
            .columns()
            .iter()
            .map(|c| {
                (
                    c.column_path().string(),
                    c.dictionary_page_offset().is_some(),
                )
            })
            .collect()
    }

    /// The Parquet file of a part (Parquet alone) of inserts: (commit LSN, ordinal, row image).
    fn parquet_part(rows: impl Iterator<Item = (u64, u32, String)>) -> Vec<u8> {
        let mut w = PartWriter::new(
            0,
            "sid".into(),
            schema(),
            &[Format::Parquet],
            limits(64 << 20),
            "public.t",
        )
        .unwrap();
        for (lsn, ord, after) in rows {
            let l = line("c", lsn, ord, "null", &after, "");
            let env: Envelope<'_> = serde_json::from_str(&l).unwrap();
            w.push(&l, &env).unwrap().unwrap();
        }
        let mut finished = w.finish().unwrap();
        finished.tails.remove(0).1
    }

    #[test]
    fn columns_without_repeats_in_their_first_rows_are_written_without_a_dictionary() {
        let rows = 4000u64;
        // id: every value new; price: seven values; note: three.
        let pq = &parquet_part((0..rows).map(|i| {
            let after = format!(r#"{{"id":{i},"price":"{}.25","note":"n{}"}}"#, i % 7, i % 3);
            (100 + i / 10, (i % 10) as u32 + 1, after)
        }));
        let dict = dictionary_pages(pq);
        assert!(!dict["id"], "a column of distinct values: {dict:?}");
        assert!(dict["price"] && dict["note"], "repeated values: {dict:?}");
        assert!(dict["_op"] && dict["_lsn"], "repeated values: {dict:?}");
        // The rows read back the same, whatever the encoding.
        let b = read_back(pq);
        assert_eq!(b.num_rows() as u64, rows);
        let id = b.column_by_name("id").unwrap().as_primitive::<Int32Type>();
        let price = b
            .column_by_name("price")
            .unwrap()
            .as_primitive::<Decimal128Type>();
        let note = b.column_by_name("note").unwrap().as_string::<i32>();
        for i in 0..rows as usize {
            assert_eq!(id.value(i) as usize, i);
            assert_eq!(price.value(i), (i % 7) as i128 * 100 + 25);
            assert_eq!(note.value(i), format!("n{}", i % 3));
        }
    }

    #[test]
    fn a_part_of_few_rows_keeps_every_dictionary() {
        let pq = parquet_part((0..100u64).map(|i| {
            let after = format!(r#"{{"id":{i},"price":"1.00","note":"n"}}"#);
            (100 + i, 1, after)
        }));
        let dict = dictionary_pages(&pq);
        assert!(
            dict["id"] && dict["note"],
            "too few rows to judge: {dict:?}"
        );
    }

    #[test]
    fn an_update_that_moves_its_key_names_the_old_key() {
        let mut w = PartWriter::new(
            0,
            "sid".into(),
            schema(),
            &[Format::Parquet],
            limits(1 << 20),
            "t",
        )
        .unwrap();
        let lines = [
            // Key 1 becomes 7.
            line(
                "u",
                10,
                1,
                r#"{"id":1}"#,
                r#"{"id":7,"price":"1.00","note":"a"}"#,
                "",
            ),
            // No before image: the key stayed.
            line(
                "u",
                11,
                1,
                "null",
                r#"{"id":7,"price":"2.00","note":"a"}"#,
                "",
            ),
            // A full before image with the same key (REPLICA IDENTITY FULL-like): stayed.
            line(
                "u",
                12,
                1,
                r#"{"id":7,"price":"2.00","note":"a"}"#,
                r#"{"id":7,"price":"3.00","note":"a"}"#,
                "",
            ),
            line("d", 13, 1, r#"{"id":7}"#, "null", ""),
        ];
        for l in &lines {
            let env: Envelope<'_> = serde_json::from_str(l).unwrap();
            w.push(l, &env).unwrap().unwrap();
        }
        let finished = w.finish().unwrap();
        let (_, pq, _) = &finished.tails[0];
        let b = read_back(pq);
        let names: Vec<&str> = b
            .schema_ref()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(names[6], "_key_before");
        let moved = b.column_by_name("_key_before").unwrap().as_struct();
        assert!(moved.is_valid(0));
        assert_eq!(moved.column(0).as_primitive::<Int32Type>().value(0), 1);
        assert!(moved.is_null(1) && moved.is_null(2) && moved.is_null(3));
        let id = b.column_by_name("id").unwrap().as_primitive::<Int32Type>();
        assert_eq!(id.value(0), 7);
    }

    #[test]
    fn parts_report_when_full_and_roll_with_the_same_schema() {
        let mut w = PartWriter::new(
            3,
            "sid".into(),
            schema(),
            &[Format::Jsonl, Format::Parquet],
            limits(4096),
            "public.t",
        )
        .unwrap();
        let mut n = 0;
        while !w.is_full() {
            n += 1;
            let l = line(
                "c",
                n,
                1,
                "null",
                &format!(
                    r#"{{"id":{n},"price":"1.00","note":"{}"}}"#,
                    "x".repeat(n as usize % 97)
                ),
                "",
            );
            let env: Envelope<'_> = serde_json::from_str(&l).unwrap();
            w.push(&l, &env).unwrap().unwrap();
            assert!(n < 10_000, "never became full");
        }
        let next = w.next("public.t").unwrap();
        assert_eq!(next.part(), 4);
        let drained = w.take_output(Format::Jsonl).unwrap().len() as u64;
        let done = w.finish().unwrap();
        assert_eq!(done.stats.rows, n);
        assert!(done.tails[0].2 >= drained);
    }
}
