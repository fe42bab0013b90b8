//! Batching: encoded events buffered per table, UTC hour and schema version, until a flush takes
//! them.

use std::collections::HashMap;
use std::sync::Arc;
use tokio::time::Instant;

use cdc_contract::{Hour, Position};

use crate::encode::TableEncoder;

/// The events of one future micro-batch: one table, one hour, one schema version.
pub struct Segment {
    /// The encoder (table and schema) its events follow.
    pub encoder: Arc<TableEncoder>,
    /// The UTC hour of its commits.
    pub hour: Hour,
    /// JSON lines.
    pub data: Vec<u8>,
    /// First change.
    pub first: Position,
    /// Last change.
    pub last: Position,
    /// Number of changes.
    pub rows: u64,
    /// Commit time of the first change (ms).
    pub first_commit_ms: i64,
    /// Commit time of the last change (ms).
    pub last_commit_ms: i64,
}

/// A new segment's first allocation: small, since one transaction may touch thousands of
/// tables (10,000 segments of 16 KiB were 160 MiB that no limit counted).
const SEGMENT_INITIAL_CAPACITY: usize = 1024;

/// Memory a segment holds besides its data (the struct, its index entry).
const SEGMENT_OVERHEAD: usize = std::mem::size_of::<Segment>() + 64;

/// How much of the flush record's `hours` list the buffered table-hours may take: DynamoDB
/// items hold 400 KB, and the record names each table-hour it adds batches to.
pub const FLUSH_RECORD_HOURS_BUDGET: usize = 256 * 1024;

/// Buffered segments.
#[derive(Default)]
pub struct Batcher {
    open: HashMap<(u32, Hour), usize>,
    segments: Vec<Segment>,
    /// Memory held: allocated capacity plus per-segment overhead, not only the lines' bytes.
    bytes: usize,
    /// What the buffered table-hours add to a flush record's `hours` list.
    hours_bytes: usize,
    rows: u64,
    oldest: Option<Instant>,
}

impl Batcher {
    /// Appends one event for relation `rel` at `pos`; `write` appends its line.
    pub fn push(
        &mut self,
        rel: u32,
        encoder: &Arc<TableEncoder>,
        hour: Hour,
        pos: Position,
        commit_ms: i64,
        write: impl FnOnce(&mut Vec<u8>),
    ) {
        let index = match self.open.get(&(rel, hour)) {
            Some(&i) if Arc::ptr_eq(&self.segments[i].encoder, encoder) => i,
            _ => {
                // New table-hour, or the table's schema changed: a new segment.
                self.bytes += SEGMENT_OVERHEAD + SEGMENT_INITIAL_CAPACITY;
                // `{hour}#{schema.table}` plus the list entry's own overhead.
                self.hours_bytes += encoder.table.to_string().len() + 20;
                self.segments.push(Segment {
                    encoder: encoder.clone(),
                    hour,
                    data: Vec::with_capacity(SEGMENT_INITIAL_CAPACITY),
                    first: pos,
                    last: pos,
                    rows: 0,
                    first_commit_ms: commit_ms,
                    last_commit_ms: commit_ms,
                });
                let i = self.segments.len() - 1;
                self.open.insert((rel, hour), i);
                i
            }
        };
        let seg = &mut self.segments[index];
        let before = seg.data.capacity();
        write(&mut seg.data);
        self.bytes += seg.data.capacity().saturating_sub(before);
        seg.last = pos;
        seg.rows += 1;
        seg.last_commit_ms = commit_ms;
        self.rows += 1;
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Memory the buffered segments hold (allocated, with per-segment overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when a flush is due for size: `max_bytes` of memory held, or as many table-hours as
    /// one flush record can name (issue 15, item 6).
    pub fn full(&self, max_bytes: usize) -> bool {
        self.bytes >= max_bytes || self.hours_bytes >= FLUSH_RECORD_HOURS_BUDGET
    }

    /// Buffered changes.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// True when nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// When the oldest buffered change arrived.
    pub fn oldest(&self) -> Option<Instant> {
        self.oldest
    }

    /// Takes every segment, leaving the batcher empty.
    pub fn take(&mut self) -> Vec<Segment> {
        self.open.clear();
        self.bytes = 0;
        self.hours_bytes = 0;
        self.rows = 0;
        self.oldest = None;
        std::mem::take(&mut self.segments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc_contract::schema::{ColumnSchema, TableSchema};
    use cdc_contract::{Lsn, TableName};

    fn encoder(name: &str) -> Arc<TableEncoder> {
        let schema = TableSchema {
            table: TableName::new("public", name),
            columns: vec![ColumnSchema {
                name: "id".into(),
                type_name: "integer".into(),
                type_oid: 23,
                typmod: -1,
                key: true,
                base_oid: 23,
                element_oid: None,
            }],
        };
        Arc::new(TableEncoder::new(schema, "s", "d"))
    }

    /// Issue 15, item 6: what one transaction over thousands of tables buffers is counted as
    /// the memory it holds, and a flush is due before its record outgrows a DynamoDB item.
    #[test]
    fn many_tables_count_their_memory_and_fill_a_flush_record_before_400_kb() {
        let hour = Hour::from_millis(1_767_000_000_000);
        let mut batcher = Batcher::default();
        let mut tables = 0;
        let name = "t".repeat(50);
        while !batcher.full(usize::MAX) {
            let enc = encoder(&format!("{name}{tables}"));
            let pos = Position::new(Lsn(100), tables + 1);
            batcher.push(tables, &enc, hour, pos, 0, |out| {
                out.extend_from_slice(b"{}\n")
            });
            tables += 1;
        }
        // Each table-hour costs its allocation, not its 3 bytes of data.
        assert!(batcher.bytes() >= tables as usize * SEGMENT_INITIAL_CAPACITY);
        // The record's hours list (`{hour}#{schema.table}` each) stays well under 400 KB.
        let segments = batcher.take();
        let listed: usize = segments
            .iter()
            .map(|s| format!("{}#{}", s.hour, s.encoder.table).len() + 3)
            .sum();
        assert!(listed < 300 * 1024, "{listed}");
        assert!(segments.len() > 3000, "{}", segments.len());
        assert!(batcher.is_empty() && !batcher.full(1));
    }

    #[test]
    fn bytes_follow_the_allocation_as_a_segment_grows() {
        let hour = Hour::from_millis(1_767_000_000_000);
        let mut batcher = Batcher::default();
        let enc = encoder("t");
        for i in 0..1000u32 {
            batcher.push(1, &enc, hour, Position::new(Lsn(100), i + 1), 0, |out| {
                out.extend_from_slice(&[b'x'; 99]);
                out.push(b'\n');
            });
        }
        let held = batcher.bytes();
        assert!(held >= 100_000, "{held}");
        assert!(
            held <= 2 * 100_000 + SEGMENT_OVERHEAD + SEGMENT_INITIAL_CAPACITY,
            "{held}"
        );
        assert!(batcher.full(held) && !batcher.full(held + 1));
    }
}
