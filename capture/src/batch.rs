//! Batching: encoded events buffered per table, UTC hour and schema version, until a flush takes
//! them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

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

/// Buffered segments.
#[derive(Default)]
pub struct Batcher {
    open: HashMap<(u32, Hour), usize>,
    segments: Vec<Segment>,
    bytes: usize,
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
                self.segments.push(Segment {
                    encoder: encoder.clone(),
                    hour,
                    data: Vec::with_capacity(16 * 1024),
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
        let before = seg.data.len();
        write(&mut seg.data);
        self.bytes += seg.data.len() - before;
        seg.last = pos;
        seg.rows += 1;
        seg.last_commit_ms = commit_ms;
        self.rows += 1;
        self.oldest.get_or_insert_with(Instant::now);
    }

    /// Buffered bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
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
        self.rows = 0;
        self.oldest = None;
        std::mem::take(&mut self.segments)
    }
}
