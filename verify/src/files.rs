//! The final files and the ledger, checked against each other.

use std::collections::{BTreeSet, HashSet};
use std::io::Read;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use cdc_contract::event::ChangeEvent;
use cdc_contract::layout::{Format, Layout};
use cdc_contract::ledger::{BatchItem, HourRecord, PartItem};
use cdc_contract::{Hour, Lsn, Position, TableName};
use compactor::ledger::{DynamoLedger, Ledger};
use compactor::plan::SlotRun;
use compactor::store::ObjectStore;

use crate::report::{FindingKind, Report};
use crate::VerifyError;

/// Where to read.
pub struct Sources<'a> {
    /// The bucket.
    pub store: &'a dyn ObjectStore,
    /// The ledger.
    pub ledger: &'a DynamoLedger,
    /// The key layout (`S3_BASE_PATH`).
    pub layout: &'a Layout,
}

/// What to read.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Also read the recorded batches not compacted yet, from staging.
    pub include_staging: bool,
}

/// A checked table: the report so far, every change read (in position order) and the key
/// columns of its latest schema version.
pub struct Checked {
    /// The report.
    pub report: Report,
    /// Every change read, final and (with `include_staging`) staged, in position order.
    pub events: Vec<ChangeEvent>,
    /// The key columns of the latest schema version seen (empty when none could be read).
    pub key_columns: Vec<String>,
    /// True when every part had a JSONL file to read events from.
    pub complete_events: bool,
}

/// zstd's frame magic number, as the first bytes of a file.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Decompresses (gzip, or zstd: `JSONL_COMPRESSION`, told apart by their magic bytes) and
/// parses JSONL; the error names the first bad line.
pub fn parse_jsonl(bytes: &[u8]) -> Result<Vec<ChangeEvent>, String> {
    let mut text = String::new();
    if bytes.starts_with(&ZSTD_MAGIC) {
        zstd::stream::read::Decoder::new(bytes)
            .and_then(|mut d| d.read_to_string(&mut text))
            .map_err(|e| format!("not zstd-compressed UTF-8 text: {e}"))?;
    } else {
        flate2::read::MultiGzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| format!("not gzipped UTF-8 text: {e}"))?;
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str::<ChangeEvent>(l)
                .map_err(|e| format!("line {} is not a change event: {e}", i + 1))
        })
        .collect()
}

/// The (`_lsn`, `_seq`) of every row of a final Parquet file.
pub fn parquet_positions(bytes: Bytes) -> Result<Vec<Position>, String> {
    let builder = ParquetRecordBatchReaderBuilder::try_new(bytes).map_err(|e| e.to_string())?;
    let descr = builder.parquet_schema();
    let index = |name: &str| {
        descr
            .columns()
            .iter()
            .position(|c| c.path().string() == name)
            .ok_or_else(|| format!("no {name} column"))
    };
    let (lsn_i, seq_i) = (index("_lsn")?, index("_seq")?);
    let mask = ProjectionMask::leaves(descr, [lsn_i, seq_i]);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let lsn = batch
            .column_by_name("_lsn")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or("_lsn is not Int64")?;
        let seq = batch
            .column_by_name("_seq")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or("_seq is not Int64")?;
        for (l, s) in lsn.iter().zip(seq.iter()) {
            let (Some(l), Some(s)) = (l, s) else {
                return Err("null _lsn or _seq".into());
            };
            out.push(Position::new(Lsn(l as u64), s as u32));
        }
    }
    Ok(out)
}

/// The (`_lsn`, `_seq`) of every row of a final Avro file.
pub fn avro_positions(bytes: Bytes) -> Result<Vec<Position>, String> {
    let reader = arrow_avro::reader::ReaderBuilder::new()
        .build(std::io::Cursor::new(bytes))
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| e.to_string())?;
        let lsn = batch
            .column_by_name("_lsn")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or("_lsn is missing or not a long")?;
        let seq = batch
            .column_by_name("_seq")
            .and_then(|c| c.as_primitive_opt::<Int64Type>())
            .ok_or("_seq is missing or not a long")?;
        for (l, s) in lsn.iter().zip(seq.iter()) {
            let (Some(l), Some(s)) = (l, s) else {
                return Err("null _lsn or _seq".into());
            };
            out.push(Position::new(Lsn(l as u64), s as u32));
        }
    }
    Ok(out)
}

/// Reads one table's final files, ledger records and (optionally) staged batches, and checks
/// them against each other.
pub async fn check_table(
    src: &Sources<'_>,
    slot: &str,
    table: &TableName,
    opts: &Options,
) -> Result<Checked, VerifyError> {
    let mut report = Report::new(slot, &table.to_string());
    let checkpoint = src
        .ledger
        .checkpoint(slot)
        .await?
        .ok_or_else(|| VerifyError::UnknownSlot(slot.to_owned()))?;
    let run = SlotRun::new(slot, checkpoint).with_snapshot(src.ledger.snapshot(slot).await?);
    let records = src.ledger.hour_records(slot, table).await?;
    let mut hours: BTreeSet<Hour> = records.iter().map(|r| r.hour).collect();
    for p in src.ledger.pending_hours(slot, None).await? {
        if p.table == *table {
            hours.insert(p.hour);
        }
    }
    let mut checked = Checked {
        report: Report::default(),
        events: Vec::new(),
        key_columns: Vec::new(),
        complete_events: true,
    };
    let mut seen: HashSet<Position> = HashSet::new();
    let mut latest_schema: Option<(Position, String)> = None;
    for hour in hours {
        report.hours += 1;
        tracing::debug!(%table, %hour, "checking hour");
        let record = records.iter().find(|r| r.hour == hour);
        let hour_check = HourCheck {
            src,
            run: &run,
            slot,
            table,
            hour,
            record,
        };
        hour_check
            .check(
                opts,
                &mut report,
                &mut checked,
                &mut seen,
                &mut latest_schema,
            )
            .await?;
    }
    checked
        .events
        .sort_by_key(|e| (e.source.commit_lsn, e.transaction.total_order));
    if let Some((_, schema_id)) = latest_schema {
        match src.ledger.schema(slot, table, &schema_id).await? {
            Some(schema) => {
                checked.key_columns = schema
                    .columns
                    .iter()
                    .filter(|c| c.key)
                    .map(|c| c.name.clone())
                    .collect();
            }
            None => report.note(format!(
                "schema version {schema_id} is not in the ledger; rows are not compared"
            )),
        }
    }
    checked.report = report;
    Ok(checked)
}

struct HourCheck<'a> {
    src: &'a Sources<'a>,
    run: &'a SlotRun,
    slot: &'a str,
    table: &'a TableName,
    hour: Hour,
    record: Option<&'a HourRecord>,
}

impl HourCheck<'_> {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, VerifyError> {
        Ok(self.src.store.get(key).await?)
    }

    async fn check(
        &self,
        opts: &Options,
        report: &mut Report,
        checked: &mut Checked,
        seen: &mut HashSet<Position>,
        latest_schema: &mut Option<(Position, String)>,
    ) -> Result<(), VerifyError> {
        let (slot, table, hour) = (self.slot, self.table, self.hour);
        let parts = self.src.ledger.parts(slot, table, hour).await?;
        let batches = self.run.hour_batches(self.src.ledger, table, hour).await?;
        if batches.undecided {
            report.note(format!(
                "{hour}: a flush is still being recorded; batches after it are not checked"
            ));
        }

        // The recorded parts and their files.
        let mut final_positions: Vec<Position> = Vec::new();
        let mut previous_last: Option<Position> = None;
        for part in &parts {
            report.parts += 1;
            let positions = self.check_part(part, report, checked).await?;
            if let (Some(prev), Some(first)) = (previous_last, positions.first()) {
                if *first <= prev {
                    report.find(
                        FindingKind::Order,
                        1,
                        format!(
                            "{hour} part {} starts at or before the previous part's end",
                            part.part
                        ),
                    );
                }
            }
            if let Some(last) = positions.last() {
                previous_last = Some(*last);
            }
            note_schema(latest_schema, part.last, &part.schema_id);
            for p in &positions {
                if !seen.insert(*p) {
                    report.find(
                        FindingKind::Duplicate,
                        1,
                        format!("{} in {hour} part {}", p.key(), part.part),
                    );
                }
            }
            report.final_changes += positions.len() as u64;
            final_positions.extend(positions);
        }
        self.check_manifests(&parts, report).await?;
        self.check_stray_files(&parts, report).await?;

        // Every consumed batch's changes, and nothing else, in the final files.
        final_positions.sort();
        let through = self.record.and_then(|r| r.compacted_through);
        let consumed: Vec<&BatchItem> = batches
            .valid
            .iter()
            .filter(|b| through.is_some_and(|w| b.last <= w))
            .collect();
        for pair in batches.valid.windows(2) {
            if pair[1].first <= pair[0].last {
                report.find(
                    FindingKind::Duplicate,
                    1,
                    format!(
                        "{hour}: recorded batches {} and {} overlap",
                        pair[0].key, pair[1].key
                    ),
                );
            }
        }
        if consumed.is_empty() && !parts.is_empty() {
            report.note(format!(
                "{hour}: the batch items of its parts have expired; parts are checked against their own records only"
            ));
        } else {
            let mut in_batches = 0u64;
            for b in &consumed {
                report.batches_checked += 1;
                note_schema(latest_schema, b.last, &b.schema_id);
                let lo = final_positions.partition_point(|p| *p < b.first);
                let hi = final_positions.partition_point(|p| *p <= b.last);
                let found = (hi - lo) as u64;
                in_batches += found;
                if found < b.rows {
                    report.find(
                        FindingKind::Missing,
                        b.rows - found,
                        format!(
                            "{hour}: batch {} records {} change(s), the final files hold {found} (see the dead-letter prefix too)",
                            b.key, b.rows
                        ),
                    );
                } else if found > b.rows {
                    report.find(
                        FindingKind::Duplicate,
                        found - b.rows,
                        format!(
                            "{hour}: batch {} records {} change(s), the final files hold {found}",
                            b.key, b.rows
                        ),
                    );
                }
            }
            let outside =
                final_positions.len() as u64 - in_batches.min(final_positions.len() as u64);
            if outside > 0 {
                report.find(
                    FindingKind::Unrecorded,
                    outside,
                    format!(
                        "{hour}: {outside} change(s) in the final files are in no consumed batch"
                    ),
                );
            }
        }

        // Batches not compacted yet.
        for b in batches
            .valid
            .iter()
            .filter(|b| through.is_none_or(|w| b.last > w))
        {
            note_schema(latest_schema, b.last, &b.schema_id);
            if !opts.include_staging {
                report.unchecked_batches += 1;
                report.unchecked_changes += b.rows;
                continue;
            }
            report.batches_checked += 1;
            let events = match self.get(&b.key).await? {
                None => {
                    report.find(
                        FindingKind::Missing,
                        b.rows,
                        format!("{hour}: recorded batch {} is not in the bucket", b.key),
                    );
                    continue;
                }
                Some(bytes) => match parse_jsonl(&bytes) {
                    Ok(events) => events,
                    Err(reason) => {
                        report.find(FindingKind::Part, 1, format!("{}: {reason}", b.key));
                        continue;
                    }
                },
            };
            if events.len() as u64 != b.rows {
                report.find(
                    FindingKind::Missing,
                    b.rows.abs_diff(events.len() as u64),
                    format!(
                        "{hour}: batch {} records {} change(s), its file holds {}",
                        b.key,
                        b.rows,
                        events.len()
                    ),
                );
            }
            for e in events {
                let p = e.position();
                if p < b.first || p > b.last {
                    report.find(
                        FindingKind::Unrecorded,
                        1,
                        format!(
                            "{} in {} is outside the batch's recorded range",
                            p.key(),
                            b.key
                        ),
                    );
                }
                if !seen.insert(p) {
                    report.find(
                        FindingKind::Duplicate,
                        1,
                        format!("{} in {}", p.key(), b.key),
                    );
                }
                report.staged_changes += 1;
                checked.events.push(e);
            }
        }
        Ok(())
    }

    /// Reads a part's files; returns the positions of its changes (from JSONL when it has one).
    async fn check_part(
        &self,
        part: &PartItem,
        report: &mut Report,
        checked: &mut Checked,
    ) -> Result<Vec<Position>, VerifyError> {
        let hour = self.hour;
        let mut jsonl: Option<Vec<Position>> = None;
        let mut parquet: Option<Vec<Position>> = None;
        let mut avro: Option<Vec<Position>> = None;
        for file in &part.files {
            let Some(bytes) = self.get(&file.key).await? else {
                report.find(
                    FindingKind::Missing,
                    part.rows,
                    format!(
                        "{hour} part {}: {} is not in the bucket",
                        part.part, file.key
                    ),
                );
                continue;
            };
            match file.format {
                Format::Jsonl => match parse_jsonl(&bytes) {
                    Ok(events) => {
                        for e in &events {
                            if Hour::from_millis(e.source.ts_ms) != hour {
                                report.find(
                                    FindingKind::Part,
                                    1,
                                    format!(
                                        "{} in {} was committed outside {hour}",
                                        e.position().key(),
                                        file.key
                                    ),
                                );
                            }
                        }
                        jsonl = Some(events.iter().map(ChangeEvent::position).collect());
                        checked.events.extend(events);
                    }
                    Err(reason) => {
                        report.find(FindingKind::Part, 1, format!("{}: {reason}", file.key))
                    }
                },
                Format::Parquet => match parquet_positions(bytes) {
                    Ok(p) => parquet = Some(p),
                    Err(reason) => {
                        report.find(FindingKind::Part, 1, format!("{}: {reason}", file.key))
                    }
                },
                Format::Avro => match avro_positions(bytes) {
                    Ok(p) => avro = Some(p),
                    Err(reason) => {
                        report.find(FindingKind::Part, 1, format!("{}: {reason}", file.key))
                    }
                },
            }
        }
        if jsonl.is_none() {
            checked.complete_events = false;
        }
        // Every typed file holds the changes of the first file read, in the same order.
        let reference = jsonl
            .as_ref()
            .map(|j| ("jsonl", j))
            .or(parquet.as_ref().map(|p| ("parquet", p)));
        if let Some((name, r)) = reference {
            for (other, positions) in [("parquet", &parquet), ("avro", &avro)] {
                let Some(p) = positions else { continue };
                if other != name && p != r {
                    report.find(
                        FindingKind::Formats,
                        1,
                        format!(
                            "{hour} part {}: {other} holds {} change(s), {name} {}, or in another order",
                            part.part,
                            p.len(),
                            r.len()
                        ),
                    );
                }
            }
        }
        let positions = jsonl.or(parquet).or(avro).unwrap_or_default();
        if positions.len() as u64 != part.rows {
            report.find(
                FindingKind::Part,
                1,
                format!(
                    "{hour} part {}: recorded with {} change(s), its file holds {}",
                    part.part,
                    part.rows,
                    positions.len()
                ),
            );
        }
        if positions.windows(2).any(|w| w[1] <= w[0]) {
            report.find(
                FindingKind::Order,
                1,
                format!("{hour} part {}: changes out of order", part.part),
            );
        }
        if let Some(p) = positions
            .iter()
            .find(|p| **p < part.first || **p > part.last)
        {
            report.find(
                FindingKind::Part,
                1,
                format!(
                    "{hour} part {}: {} is outside its recorded range {}..{}",
                    part.part,
                    p.key(),
                    part.first.key(),
                    part.last.key()
                ),
            );
        }
        Ok(positions)
    }

    /// Each format's manifest lists exactly the recorded parts.
    async fn check_manifests(
        &self,
        parts: &[PartItem],
        report: &mut Report,
    ) -> Result<(), VerifyError> {
        for format in cdc_contract::layout::FORMATS {
            let expected: Vec<(String, u64)> = parts
                .iter()
                .flat_map(|p| {
                    p.files
                        .iter()
                        .filter(|f| f.format == format)
                        .map(|f| (f.key.clone(), p.rows))
                })
                .collect();
            if expected.is_empty() {
                continue;
            }
            let key = self.src.layout.manifest_key(self.table, format, self.hour);
            let listed: Option<Vec<(String, u64)>> = self.get(&key).await?.and_then(|bytes| {
                let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
                v["parts"]
                    .as_array()?
                    .iter()
                    .map(|p| Some((p["key"].as_str()?.to_owned(), p["rows"].as_u64()?)))
                    .collect()
            });
            match listed {
                None => report.find(
                    FindingKind::Manifest,
                    1,
                    format!("{key} is missing or unreadable"),
                ),
                Some(listed) if listed != expected => report.find(
                    FindingKind::Manifest,
                    1,
                    format!(
                        "{key} lists {} part(s), the ledger records {}",
                        listed.len(),
                        expected.len()
                    ),
                ),
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Files under the hour's prefixes that no recorded part names: a failure once the hour is
    /// settled (no attempt holds it), else the work of the attempt in progress.
    async fn check_stray_files(
        &self,
        parts: &[PartItem],
        report: &mut Report,
    ) -> Result<(), VerifyError> {
        let Some(record) = self.record else {
            return Ok(());
        };
        let known: HashSet<&str> = parts
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.key.as_str()))
            .collect();
        let mut stray = Vec::new();
        for format in cdc_contract::layout::FORMATS {
            let prefix = format!(
                "{}/",
                self.src.layout.hour_prefix(self.table, format, self.hour)
            );
            for key in self.src.store.list(&prefix).await? {
                if !known.contains(key.as_str()) && !key.ends_with("/_manifest.json") {
                    stray.push(key);
                }
            }
        }
        if stray.is_empty() {
            return Ok(());
        }
        if record.claim_until_ms == 0 {
            report.find(
                FindingKind::StrayFile,
                stray.len() as u64,
                format!("{}: {}", self.hour, stray.join(", ")),
            );
        } else {
            report.note(format!(
                "{}: attempt {} holds the hour; {} file(s) not recorded yet are its work in progress or will be removed by the next run",
                self.hour,
                record.claim_attempt,
                stray.len()
            ));
        }
        Ok(())
    }
}

fn note_schema(latest: &mut Option<(Position, String)>, at: Position, schema_id: &str) {
    if latest.as_ref().is_none_or(|(p, _)| at > *p) {
        *latest = Some((at, schema_id.to_owned()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_bad_line_is_named_and_a_good_file_parses() {
        let line = r#"{"before":null,"after":{"id":1},"source":{"version":"1","connector":"postgresql","name":"s","ts_ms":1,"ts_us":1000,"snapshot":"false","db":"d","sequence":"[]","schema":"public","table":"t","txId":5,"lsn":16,"commit_lsn":32},"op":"c","ts_ms":2,"transaction":{"id":"5:32","total_order":1,"data_collection_order":1}}"#;
        let gz = |text: &str| {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(text.as_bytes()).unwrap();
            e.finish().unwrap()
        };
        let events = parse_jsonl(&gz(&format!("{line}\n"))).unwrap();
        assert_eq!(events[0].position(), Position::new(Lsn(32), 1));
        let err = parse_jsonl(&gz(&format!("{line}\nnot json\n"))).unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        assert!(parse_jsonl(b"plain").is_err());
        // zstd-compressed parts (JSONL_COMPRESSION=zstd) read the same.
        let zst = zstd::stream::encode_all(format!("{line}\n{line}\n").as_bytes(), 3).unwrap();
        let events = parse_jsonl(&zst).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].position(), Position::new(Lsn(32), 1));
        let err = parse_jsonl(&zst[..zst.len() - 3]).unwrap_err();
        assert!(err.contains("zstd"), "{err}");
    }
}

#[cfg(test)]
mod avro_tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use compactor::avro::{AvroCodec, AvroPart};

    #[test]
    fn avro_positions_are_read_in_file_order() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("_op", DataType::Utf8, false),
            Field::new("_lsn", DataType::Int64, false),
            Field::new("_seq", DataType::Int64, false),
        ]));
        let mut part =
            AvroPart::new(schema.clone(), &[], "public.t", "s", AvroCodec::Zstd).unwrap();
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec!["c", "u", "d"])),
                Arc::new(Int64Array::from(vec![32, 32, 48])),
                Arc::new(Int64Array::from(vec![1, 2, 1])),
            ],
        )
        .unwrap();
        part.write(&batch).unwrap();
        let mut bytes = part.take();
        bytes.extend(part.finish().unwrap().0);
        assert_eq!(
            avro_positions(Bytes::from(bytes.clone())).unwrap(),
            [
                Position::new(Lsn(32), 1),
                Position::new(Lsn(32), 2),
                Position::new(Lsn(48), 1)
            ]
        );
        assert!(avro_positions(Bytes::from(bytes[..bytes.len() / 2].to_vec())).is_err());
        assert!(avro_positions(Bytes::from_static(b"PAR1")).is_err());
    }
}
