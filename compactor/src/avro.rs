//! One part as an Avro object container file, written from the same Arrow record batches the
//! Parquet writer takes (DESIGN.md, "Avro final files").
//!
//! The Avro schema is derived here from the part's Arrow schema rather than left to
//! `arrow-avro`, for three reasons: uuid columns (Utf8 in Arrow) carry Avro's `uuid` logical
//! type, column names Avro does not allow are renamed (the PostgreSQL name is kept in the
//! field's `cdc.column` attribute), and the file's metadata also names the table and schema
//! version (`cdc.table`, `cdc.schema_id`), as the Parquet files' key-value metadata do. The
//! encoder of `arrow-avro` writes the blocks; the header is written here so it can carry that
//! metadata (same schema JSON the encoder follows, same sync marker).
//!
//! One Avro block is written per record batch, so the bytes can be drained and uploaded as
//! they come, as for the other formats.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, StructArray};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use arrow::record_batch::RecordBatch;
use arrow_avro::compression::CompressionCodec;
use arrow_avro::schema::SCHEMA_METADATA_KEY;
use arrow_avro::writer::{AvroWriter, WriterBuilder};
use serde_json::{json, Map, Value};

/// Block compression of Avro parts (`AVRO_CODEC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AvroCodec {
    /// Deflate (the default: the one codec the Avro specification requires every reader to
    /// support, so Hive, Athena, Spark, Java and Python readers all read it without extras).
    Deflate,
    /// Snappy (faster; readers need a snappy library).
    Snappy,
    /// Zstandard (smaller and fast; readers need Avro 1.9+ or a zstd library).
    Zstd,
}

impl std::str::FromStr for AvroCodec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "deflate" => Ok(AvroCodec::Deflate),
            "snappy" => Ok(AvroCodec::Snappy),
            "zstd" | "zstandard" => Ok(AvroCodec::Zstd),
            other => Err(format!("{other:?} is not one of deflate, snappy, zstd")),
        }
    }
}

impl AvroCodec {
    fn codec(self) -> CompressionCodec {
        match self {
            AvroCodec::Deflate => CompressionCodec::Deflate,
            AvroCodec::Snappy => CompressionCodec::Snappy,
            AvroCodec::Zstd => CompressionCodec::ZStandard,
        }
    }

    /// The codec's name in the file header (`avro.codec`).
    pub fn header_name(self) -> &'static str {
        match self {
            AvroCodec::Deflate => "deflate",
            AvroCodec::Snappy => "snappy",
            AvroCodec::Zstd => "zstandard",
        }
    }
}

/// Why an Avro part could not be written.
#[derive(Debug, thiserror::Error)]
pub enum AvroError {
    /// The encoder refused a schema or batch.
    #[error("avro: {0}")]
    Arrow(#[from] ArrowError),
    /// An Arrow type the Avro schema has no mapping for (a bug: part schemas never hold one).
    #[error("avro: column {column} has type {ty}, which has no Avro mapping")]
    Unsupported {
        /// The column.
        column: String,
        /// Its Arrow type.
        ty: String,
    },
    /// The schema could not be serialised.
    #[error("avro schema: {0}")]
    Json(#[from] serde_json::Error),
}

/// Metadata key naming the table in an Avro part's header.
pub const TABLE_KEY: &str = "cdc.table";
/// Metadata key naming the schema version in an Avro part's header.
pub const SCHEMA_ID_KEY: &str = "cdc.schema_id";
/// Field attribute holding a column's PostgreSQL name when Avro needed another.
pub const COLUMN_ATTRIBUTE: &str = "cdc.column";

/// The writer's output: bytes shared with [`AvroPart`], which drains them.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Sink {
    fn with<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        let mut guard = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.with(|v| v.extend_from_slice(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// An Avro object container file being written.
pub struct AvroPart {
    writer: AvroWriter<Sink>,
    sink: Sink,
    /// The Arrow schema batches are re-labelled with (Avro-valid names).
    schema: SchemaRef,
    drained: u64,
}

impl AvroPart {
    /// Starts a file for batches of `arrow_schema`. Top-level Utf8 columns (and list items and
    /// `_key_before` fields) named in `uuid_columns` (Arrow field names) get the `uuid` logical
    /// type.
    pub fn new(
        arrow_schema: SchemaRef,
        uuid_columns: &[String],
        table: &str,
        schema_id: &str,
        codec: AvroCodec,
    ) -> Result<Self, AvroError> {
        let uuid: HashSet<&str> = uuid_columns.iter().map(String::as_str).collect();
        let (avro_json, schema) = avro_schema(&arrow_schema, &uuid, table)?;
        let mut metadata = HashMap::new();
        metadata.insert(SCHEMA_METADATA_KEY.to_owned(), avro_json.clone());
        let writer_schema = Schema::new_with_metadata(schema.fields().clone(), metadata);
        let sink = Sink::default();
        let writer = WriterBuilder::new(writer_schema)
            .with_compression(Some(codec.codec()))
            .build::<_, arrow_avro::writer::format::AvroOcfFormat>(sink.clone())?;
        let sync = *writer
            .sync_marker()
            .ok_or_else(|| ArrowError::SchemaError("no sync marker".into()))?;
        // The encoder wrote its own header; ours carries the same schema and codec, the
        // table and schema version, and the encoder's sync marker.
        let mut header = Vec::with_capacity(avro_json.len() + 256);
        header.extend_from_slice(b"Obj\x01");
        let entries: [(&str, &[u8]); 4] = [
            (SCHEMA_METADATA_KEY, avro_json.as_bytes()),
            ("avro.codec", codec.header_name().as_bytes()),
            (TABLE_KEY, table.as_bytes()),
            (SCHEMA_ID_KEY, schema_id.as_bytes()),
        ];
        write_long(&mut header, entries.len() as i64);
        for (k, v) in entries {
            write_bytes(&mut header, k.as_bytes());
            write_bytes(&mut header, v);
        }
        write_long(&mut header, 0);
        header.extend_from_slice(&sync);
        sink.with(|v| *v = header);
        Ok(AvroPart {
            writer,
            sink,
            schema,
            drained: 0,
        })
    }

    /// Encodes `batch` as one block.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), AvroError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let columns = batch
            .columns()
            .iter()
            .zip(self.schema.fields())
            .map(|(array, field)| relabel(array, field.data_type()))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = RecordBatch::try_new(self.schema.clone(), columns)?;
        self.writer.write(&batch)?;
        Ok(())
    }

    /// Takes the bytes encoded so far.
    pub fn take(&mut self) -> Vec<u8> {
        let out = self.sink.with(std::mem::take);
        self.drained += out.len() as u64;
        out
    }

    /// Bytes encoded and not taken yet.
    pub fn ready_len(&self) -> usize {
        self.sink.with(|v| v.len())
    }

    /// The file's size so far (every block written is complete).
    pub fn estimated_len(&self) -> u64 {
        self.drained + self.ready_len() as u64
    }

    /// Ends the file: the bytes not taken yet and the file's total size.
    pub fn finish(mut self) -> Result<(Vec<u8>, u64), AvroError> {
        self.writer.finish()?;
        let tail = self.sink.with(std::mem::take);
        let total = self.drained + tail.len() as u64;
        Ok((tail, total))
    }
}

/// `array` as the writer takes it: struct fields renamed, int2 widened to int4.
fn relabel(array: &ArrayRef, to: &DataType) -> Result<ArrayRef, ArrowError> {
    if array.data_type() == to {
        return Ok(array.clone());
    }
    match (array.as_any().downcast_ref::<StructArray>(), to) {
        (Some(s), DataType::Struct(fields)) => {
            let children = s
                .columns()
                .iter()
                .zip(fields.iter())
                .map(|(c, f)| relabel(c, f.data_type()))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields.clone(),
                children,
                s.nulls().cloned(),
            )?))
        }
        // int2 (and int2[]) widen to Avro's int.
        _ => arrow::compute::cast(array, to),
    }
}

/// A valid Avro name for `name`: letters, digits and `_`, not starting with a digit.
fn avro_name(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if out.is_empty() || out.starts_with(|c: char| c.is_ascii_digit()) {
        out.insert(0, '_');
    }
    out
}

/// The Avro schema JSON of `arrow` and the Arrow schema with the Avro field names.
fn avro_schema(
    arrow: &Schema,
    uuid: &HashSet<&str>,
    table: &str,
) -> Result<(String, SchemaRef), AvroError> {
    let (fields, renamed) = record_fields(arrow.fields(), uuid)?;
    let record = json!({
        "type": "record",
        "name": avro_name(table),
        "namespace": "cdc",
        "fields": fields,
    });
    Ok((
        serde_json::to_string(&record)?,
        Arc::new(Schema::new(renamed)),
    ))
}

/// Avro fields of a record, and the Arrow fields renamed to match.
fn record_fields(
    fields: &Fields,
    uuid: &HashSet<&str>,
) -> Result<(Vec<Value>, Vec<Field>), AvroError> {
    let mut used: HashSet<String> = HashSet::new();
    let mut avro = Vec::with_capacity(fields.len());
    let mut renamed = Vec::with_capacity(fields.len());
    for f in fields {
        let mut name = avro_name(f.name());
        while !used.insert(name.clone()) {
            name.push('_');
        }
        let is_uuid = uuid.contains(f.name().as_str());
        let (ty, arrow_ty) = avro_type(f.name(), f.data_type(), is_uuid, uuid)?;
        let mut field = Map::new();
        field.insert("name".into(), json!(name));
        if f.is_nullable() {
            field.insert("type".into(), json!(["null", ty]));
            field.insert("default".into(), Value::Null);
        } else {
            field.insert("type".into(), ty);
        }
        if name != *f.name() {
            field.insert(COLUMN_ATTRIBUTE.into(), json!(f.name()));
        }
        avro.push(Value::Object(field));
        renamed.push(Field::new(name, arrow_ty, f.is_nullable()));
    }
    Ok((avro, renamed))
}

/// The Avro type of a column of Arrow type `ty`, and its Arrow type with Avro field names.
fn avro_type(
    column: &str,
    ty: &DataType,
    is_uuid: bool,
    uuid: &HashSet<&str>,
) -> Result<(Value, DataType), AvroError> {
    let avro = match ty {
        DataType::Utf8 if is_uuid => json!({"type": "string", "logicalType": "uuid"}),
        DataType::Utf8 => json!("string"),
        DataType::Boolean => json!("boolean"),
        // The encoder takes Int32 only: int2 values are widened on the way (lossless).
        DataType::Int16 => return Ok((json!("int"), DataType::Int32)),
        DataType::Int32 => json!("int"),
        DataType::Int64 => json!("long"),
        DataType::Float32 => json!("float"),
        DataType::Float64 => json!("double"),
        DataType::Binary => json!("bytes"),
        DataType::Decimal128(p, s) => {
            json!({"type": "bytes", "logicalType": "decimal", "precision": p, "scale": s})
        }
        DataType::Date32 => json!({"type": "int", "logicalType": "date"}),
        DataType::Time64(TimeUnit::Microsecond) => {
            json!({"type": "long", "logicalType": "time-micros"})
        }
        DataType::Timestamp(TimeUnit::Microsecond, Some(_)) => {
            json!({"type": "long", "logicalType": "timestamp-micros"})
        }
        DataType::Timestamp(TimeUnit::Microsecond, None) => {
            json!({"type": "long", "logicalType": "local-timestamp-micros"})
        }
        DataType::List(item) => {
            let (items, item_ty) = avro_type(column, item.data_type(), is_uuid, uuid)?;
            let items = if item.is_nullable() {
                json!(["null", items])
            } else {
                items
            };
            let arrow_item = Field::new(item.name(), item_ty, item.is_nullable());
            return Ok((
                json!({"type": "array", "items": items}),
                DataType::List(Arc::new(arrow_item)),
            ));
        }
        DataType::Map(entries, _) => {
            let value = match entries.data_type() {
                DataType::Struct(f) if f.len() == 2 => &f[1],
                _ => return Err(unsupported(column, ty)),
            };
            let (values, _) = avro_type(column, value.data_type(), false, uuid)?;
            let values = if value.is_nullable() {
                json!(["null", values])
            } else {
                values
            };
            json!({"type": "map", "values": values})
        }
        DataType::Struct(fields) => {
            let (avro_fields, renamed) = record_fields(fields, uuid)?;
            let record = json!({
                "type": "record",
                "name": avro_name(column),
                "fields": avro_fields,
            });
            return Ok((record, DataType::Struct(Fields::from(renamed))));
        }
        _ => return Err(unsupported(column, ty)),
    };
    Ok((avro, ty.clone()))
}

fn unsupported(column: &str, ty: &DataType) -> AvroError {
    AvroError::Unsupported {
        column: column.to_owned(),
        ty: ty.to_string(),
    }
}

/// Avro's zig-zag variable-length long.
fn write_long(out: &mut Vec<u8>, n: i64) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn write_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    write_long(out, bytes.len() as i64);
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Compression;
    use crate::envelope::Envelope;
    use crate::parquet_schema::PartSchema;
    use crate::part::{Limits, PartWriter};
    use arrow::array::AsArray;
    use arrow::datatypes::{Date32Type, Decimal128Type, Int32Type, Int64Type};
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    use arrow_avro::reader::ReaderBuilder;
    use bytes::Bytes;
    use cdc_contract::layout::{Format, JsonlCompression};
    use cdc_contract::schema::{ColumnSchema, TableSchema};
    use cdc_contract::TableName;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn col(name: &str, oid: u32, typmod: i32, key: bool, element: Option<u32>) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: oid,
            typmod,
            key,
            base_oid: oid,
            element_oid: element,
        }
    }

    /// Every type the part schema produces, a uuid key and names Avro does not allow.
    fn schema() -> Arc<PartSchema> {
        Arc::new(PartSchema::new(&TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![
                col("id", 23, -1, true, None),
                col("u", 2950, -1, true, None),
                col("price", 1700, ((10 << 16) | 2) + 4, false, None),
                col("big", 1700, -1, false, None),
                col("at", 1184, -1, false, None),
                col("local at", 1114, -1, false, None),
                col("d", 1082, -1, false, None),
                col("t", 1083, -1, false, None),
                col("small", 21, -1, false, None),
                col("n8", 20, -1, false, None),
                col("f4", 700, -1, false, None),
                col("f8", 701, -1, false, None),
                col("ok", 16, -1, false, None),
                col("doc", 3802, -1, false, None),
                col("blob", 17, -1, false, None),
                col("1st", 25, -1, false, None),
                col("ints", 1007, -1, false, Some(23)),
                col("smalls", 1005, -1, false, Some(21)),
                col("uids", 2951, -1, false, Some(2950)),
            ],
        }))
    }

    fn line(op: &str, lsn: u64, before: &str, after: &str) -> String {
        format!(
            r#"{{"before":{before},"after":{after},"source":{{"version":"x","connector":"postgresql","name":"s","ts_ms":1000,"ts_us":1000123,"snapshot":"false","db":"d","sequence":"[]","schema":"public","table":"t","txId":5,"lsn":{lsn},"commit_lsn":{lsn}}},"op":"{op}","ts_ms":1,"transaction":{{"id":"5:{lsn}","total_order":1,"data_collection_order":1}}}}"#
        )
    }

    const U1: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
    const U2: &str = "123e4567-e89b-12d3-a456-426614174000";

    fn lines() -> Vec<String> {
        let full = format!(
            r#"{{"id":1,"u":"{U1}","price":"12.50","big":"123456789012345678901234567890.5","at":"2025-01-08T10:30:00.123456Z","local at":"2025-01-08T10:30:00.5","d":"2025-01-08","t":"10:30:00.25","small":-7,"n8":9007199254740993,"f4":1.5,"f8":-2.25,"ok":true,"doc":{{"a":[1,"x"]}},"blob":"AAEC","1st":"é ✓","ints":[1,null,3],"smalls":[2],"uids":["{U2}",null]}}"#
        );
        vec![
            line("c", 10, "null", &full),
            // NaN and an unchanged TOAST value go to `_raw`, an unknown column too.
            line(
                "u",
                11,
                "null",
                &format!(
                    r#"{{"id":1,"u":"{U1}","price":"NaN","1st":"__debezium_unavailable_value","extra":true}}"#
                ),
            ),
            // The key moves: `_key_before` names the old one, uuid included.
            line(
                "u",
                12,
                &format!(r#"{{"id":1,"u":"{U1}"}}"#),
                &format!(r#"{{"id":2,"u":"{U2}","price":null}}"#),
            ),
            line("d", 13, &format!(r#"{{"id":2,"u":"{U2}"}}"#), "null"),
        ]
    }

    fn write(codec: AvroCodec) -> (Vec<u8>, Vec<u8>) {
        let limits = Limits {
            part_max_bytes: 1 << 20,
            row_group_bytes: 1 << 20,
            compression: Compression::Snappy,
            gzip_level: 1,
            jsonl_compression: JsonlCompression::Gzip,
            avro_codec: codec,
        };
        let mut w = PartWriter::new(
            0,
            "sid-1".into(),
            schema(),
            &[Format::Parquet, Format::Avro],
            limits,
            "public.t",
        )
        .unwrap();
        let mut avro = Vec::new();
        for l in lines() {
            let env: Envelope<'_> = serde_json::from_str(&l).unwrap();
            w.push(&l, &env).unwrap().unwrap();
            avro.extend(w.take_output(Format::Avro).unwrap());
        }
        let done = w.finish().unwrap();
        let mut pq = Vec::new();
        for (f, tail, total) in done.tails {
            match f {
                Format::Parquet => pq = tail,
                Format::Avro => {
                    avro.extend(tail);
                    assert_eq!(total as usize, avro.len());
                }
                Format::Jsonl => unreachable!(),
            }
        }
        (pq, avro)
    }

    fn read_avro(bytes: &[u8]) -> (RecordBatch, HashMap<String, String>) {
        let reader = ReaderBuilder::new()
            .build(std::io::Cursor::new(bytes.to_vec()))
            .unwrap();
        let meta = reader
            .avro_header()
            .metadata()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        let schema = reader.schema();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        (
            arrow::compute::concat_batches(&schema, &batches).unwrap(),
            meta,
        )
    }

    fn read_parquet(bytes: &[u8]) -> RecordBatch {
        let reader = ParquetRecordBatchReaderBuilder::try_new(Bytes::from(bytes.to_vec()))
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
    }

    /// A value as text, uuids (fixed 16 bytes once read from Avro) in their usual form.
    fn text(array: &dyn Array, row: usize) -> String {
        if let Some(fixed) = array.as_fixed_size_binary_opt() {
            return if fixed.is_null(row) {
                String::new()
            } else {
                uuid::Uuid::from_slice(fixed.value(row))
                    .unwrap()
                    .to_string()
            };
        }
        if let Some(list) = array.as_list_opt::<i32>() {
            if list.is_null(row) {
                return String::new();
            }
            let items = list.value(row);
            return (0..items.len())
                .map(|i| text(items.as_ref(), i))
                .collect::<Vec<_>>()
                .join(",");
        }
        if let Some(s) = array.as_struct_opt() {
            if s.is_null(row) {
                return String::new();
            }
            return s
                .columns()
                .iter()
                .map(|c| text(c.as_ref(), row))
                .collect::<Vec<_>>()
                .join(",");
        }
        if let DataType::Timestamp(_, Some(_)) = array.data_type() {
            // The zone's spelling differs ("UTC", "+00:00"); the instant must not.
            let micros =
                arrow::compute::cast(&arrow::array::make_array(array.to_data()), &DataType::Int64)
                    .unwrap();
            return ArrayFormatter::try_new(micros.as_ref(), &FormatOptions::default())
                .unwrap()
                .value(row)
                .to_string();
        }
        ArrayFormatter::try_new(array, &FormatOptions::default())
            .unwrap()
            .value(row)
            .to_string()
    }

    #[test]
    fn avro_parts_hold_the_parquet_rows_with_avro_logical_types() {
        for codec in [AvroCodec::Deflate, AvroCodec::Snappy, AvroCodec::Zstd] {
            let (pq, avro) = write(codec);
            let p = read_parquet(&pq);
            let (a, meta) = read_avro(&avro);
            assert_eq!(meta["avro.codec"], codec.header_name());
            assert_eq!(meta[TABLE_KEY], "public.t");
            assert_eq!(meta[SCHEMA_ID_KEY], "sid-1");
            let json: Value = serde_json::from_str(&meta["avro.schema"]).unwrap();
            let field = |name: &str| {
                json["fields"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .find(|f| f["name"] == name)
                    .unwrap_or_else(|| panic!("no field {name}"))
                    .clone()
            };
            assert_eq!(field("u")["type"][1]["logicalType"], "uuid");
            assert_eq!(field("price")["type"][1]["logicalType"], "decimal");
            assert_eq!(field("price")["type"][1]["precision"], 10);
            assert_eq!(field("at")["type"][1]["logicalType"], "timestamp-micros");
            assert_eq!(
                field("local_at")["type"][1]["logicalType"],
                "local-timestamp-micros"
            );
            assert_eq!(field("local_at")[COLUMN_ATTRIBUTE], "local at");
            assert_eq!(field("_1st")[COLUMN_ATTRIBUTE], "1st");
            assert_eq!(field("d")["type"][1]["logicalType"], "date");
            assert_eq!(field("t")["type"][1]["logicalType"], "time-micros");
            assert_eq!(field("_op")["type"], "string");
            assert_eq!(
                field("_commit_ts")["type"]["logicalType"],
                "timestamp-micros"
            );
            assert_eq!(field("_raw")["type"][1]["type"], "map");
            assert_eq!(field("_key_before")["type"][1]["type"], "record");
            assert_eq!(field("uids")["type"][1]["items"][1]["logicalType"], "uuid");

            // Row for row, column for column, the same values as the Parquet file.
            assert_eq!(a.num_rows(), 4);
            assert_eq!(a.num_columns(), p.num_columns());
            for (i, f) in p.schema().fields().iter().enumerate() {
                let (pc, ac) = (p.column(i), a.column(i));
                assert_eq!(pc.null_count(), ac.null_count(), "{codec:?} {}", f.name());
                for row in 0..4 {
                    assert_eq!(
                        text(pc.as_ref(), row),
                        text(ac.as_ref(), row),
                        "{codec:?} column {} row {row}",
                        f.name()
                    );
                }
            }
            // A few values spelled out, so equal-but-wrong on both sides cannot pass.
            let price = a
                .column_by_name("price")
                .unwrap()
                .as_primitive::<Decimal128Type>();
            assert_eq!(price.value(0), 1250);
            assert!(price.is_null(1));
            assert_eq!(text(a.column_by_name("u").unwrap().as_ref(), 0), U1);
            let d = a.column_by_name("d").unwrap().as_primitive::<Date32Type>();
            assert_eq!(d.value(0), 20096);
            let small = a
                .column_by_name("small")
                .unwrap()
                .as_primitive::<Int32Type>();
            assert_eq!(small.value(0), -7);
            let n8 = a.column_by_name("n8").unwrap().as_primitive::<Int64Type>();
            assert_eq!(n8.value(0), 9007199254740993);
            let raw = a.column_by_name("_raw").unwrap().as_map();
            assert!(raw.is_null(0));
            let entries = raw.value(1);
            let keys = entries.column(0).as_string::<i32>();
            let values = entries.column(1).as_string::<i32>();
            let mut pairs: Vec<(&str, &str)> = (0..keys.len())
                .map(|i| (keys.value(i), values.value(i)))
                .collect();
            pairs.sort();
            assert_eq!(
                pairs,
                [
                    ("1st", "__debezium_unavailable_value"),
                    ("extra", "true"),
                    ("price", "NaN")
                ]
            );
            let moved = a.column_by_name("_key_before").unwrap().as_struct();
            assert!(moved.is_null(0) && moved.is_null(1) && moved.is_null(3));
            assert_eq!(moved.column(0).as_primitive::<Int32Type>().value(2), 1);
            assert_eq!(text(moved.column(1).as_ref(), 2), U1);
        }
    }

    #[test]
    fn codecs_compress_and_a_part_is_drained_as_it_grows() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("_lsn", DataType::Int64, false),
            Field::new("note", DataType::Utf8, true),
        ]));
        let mut sizes = Vec::new();
        for codec in [AvroCodec::Deflate, AvroCodec::Snappy, AvroCodec::Zstd] {
            let mut part = AvroPart::new(schema.clone(), &[], "t", "s", codec).unwrap();
            let mut out = part.take();
            assert_eq!(&out[..4], b"Obj\x01");
            let header = out.len();
            for n in 0..5i64 {
                let batch = RecordBatch::try_new(
                    schema.clone(),
                    vec![
                        Arc::new(arrow::array::Int64Array::from_iter_values(
                            n * 1000..(n + 1) * 1000,
                        )),
                        Arc::new(arrow::array::StringArray::from_iter(
                            (0..1000).map(|i| (i % 3 != 0).then(|| "repeated text".repeat(4))),
                        )),
                    ],
                )
                .unwrap();
                part.write(&batch).unwrap();
                assert!(part.estimated_len() > out.len() as u64);
                out.extend(part.take());
            }
            let (tail, total) = part.finish().unwrap();
            out.extend(tail);
            assert_eq!(total as usize, out.len());
            let (back, _) = read_avro(&out);
            assert_eq!(back.num_rows(), 5000);
            let lsn = back.column(0).as_primitive::<Int64Type>();
            assert!((0..5000).all(|i| lsn.value(i) == i as i64));
            assert_eq!(back.column(1).null_count(), 5 * 334);
            sizes.push(out.len() - header);
        }
        // 5000 rows of ~60 bytes: every codec compresses them well below 300 kB.
        assert!(sizes.iter().all(|s| *s < 40_000), "{sizes:?}");
    }
}
