//! What a verification found, and its short text form.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

/// How many examples of each kind of finding a report keeps.
pub const EXAMPLES: usize = 10;

/// A kind of finding. Any finding fails the verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A (commit LSN, ordinal) occurs twice, or two recorded batches overlap.
    Duplicate,
    /// A recorded batch has fewer changes in the final files than the ledger counts.
    Missing,
    /// A change in the final files that no recorded batch holds.
    Unrecorded,
    /// Changes out of (commit LSN, ordinal) order within or between parts.
    Order,
    /// A final file disagrees with its part's ledger record (rows, range, hour) or is unreadable.
    Part,
    /// The Parquet file of a part holds other changes than its JSONL file.
    Formats,
    /// A manifest disagrees with the ledger's recorded parts.
    Manifest,
    /// A file under a settled hour's prefix that no recorded part names.
    StrayFile,
    /// The replayed final events differ from the table's current rows.
    Rows,
}

impl FindingKind {
    fn label(self) -> &'static str {
        match self {
            FindingKind::Duplicate => "duplicated",
            FindingKind::Missing => "missing",
            FindingKind::Unrecorded => "not in any recorded batch",
            FindingKind::Order => "out of order",
            FindingKind::Part => "part disagrees with the ledger",
            FindingKind::Formats => "parquet differs from jsonl",
            FindingKind::Manifest => "manifest differs from the ledger",
            FindingKind::StrayFile => "stray final files",
            FindingKind::Rows => "rows differ from the table",
        }
    }
}

/// Findings of one kind: how many, and the first few.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Findings {
    /// How many.
    pub count: u64,
    /// The first [`EXAMPLES`].
    pub examples: Vec<String>,
}

/// The verification of one table.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The slot.
    pub slot: String,
    /// `schema.table`.
    pub table: String,
    /// Hours the ledger holds for the table (compacted or pending).
    pub hours: u64,
    /// Recorded parts read.
    pub parts: u64,
    /// Changes in the final files.
    pub final_changes: u64,
    /// Recorded batches whose changes were checked (against final files or staging).
    pub batches_checked: u64,
    /// Changes read from uncompacted staging batches (`--include-staging`).
    pub staged_changes: u64,
    /// Uncompacted batches not read (without `--include-staging`).
    pub unchecked_batches: u64,
    /// Their changes.
    pub unchecked_changes: u64,
    /// Distinct keys after replaying the events, when replayed.
    pub replayed_rows: Option<u64>,
    /// Rows in the table, when compared.
    pub table_rows: Option<u64>,
    /// Things worth knowing that are not failures.
    pub notes: Vec<String>,
    /// Failures by kind.
    pub findings: BTreeMap<FindingKind, Findings>,
}

impl Report {
    /// A report for `table` of `slot`.
    pub fn new(slot: &str, table: &str) -> Self {
        Report {
            slot: slot.to_owned(),
            table: table.to_owned(),
            ..Default::default()
        }
    }

    /// True when nothing was found.
    pub fn ok(&self) -> bool {
        self.findings.is_empty()
    }

    /// Adds `count` findings of `kind`, described by `detail`.
    pub fn find(&mut self, kind: FindingKind, count: u64, detail: impl Into<String>) {
        let f = self.findings.entry(kind).or_default();
        f.count += count;
        if f.examples.len() < EXAMPLES {
            f.examples.push(detail.into());
        }
    }

    /// Findings of `kind` so far.
    pub fn count(&self, kind: FindingKind) -> u64 {
        self.findings.get(&kind).map_or(0, |f| f.count)
    }

    /// Adds a note.
    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The short text form.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let verdict = if self.ok() { "OK" } else { "MISMATCH" };
        let _ = writeln!(out, "{} (slot {}): {verdict}", self.table, self.slot);
        let _ = writeln!(
            out,
            "  {} hour(s), {} part(s), {} change(s) in the final files, {} recorded batch(es) checked",
            self.hours, self.parts, self.final_changes, self.batches_checked
        );
        if self.staged_changes > 0 {
            let _ = writeln!(
                out,
                "  {} change(s) read from uncompacted staging batches",
                self.staged_changes
            );
        }
        if self.unchecked_batches > 0 {
            let _ = writeln!(
                out,
                "  {} uncompacted batch(es) ({} change(s)) not read: compact first or pass --include-staging",
                self.unchecked_batches, self.unchecked_changes
            );
        }
        if let (Some(replayed), Some(rows)) = (self.replayed_rows, self.table_rows) {
            let _ = writeln!(
                out,
                "  rows: {rows} in the table, {replayed} after replaying the events"
            );
        }
        for note in &self.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        for (kind, f) in &self.findings {
            let _ = writeln!(out, "  {}: {}", kind.label(), f.count);
            for e in &f.examples {
                let _ = writeln!(out, "    {e}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_fails_on_any_finding_and_keeps_a_few_examples() {
        let mut r = Report::new("s", "public.t");
        assert!(r.ok());
        r.note("just so you know");
        assert!(r.ok());
        for i in 0..25 {
            r.find(FindingKind::Duplicate, 2, format!("position {i}"));
        }
        assert!(!r.ok());
        assert_eq!(r.count(FindingKind::Duplicate), 50);
        assert_eq!(r.findings[&FindingKind::Duplicate].examples.len(), EXAMPLES);
        let text = r.text();
        assert!(text.contains("MISMATCH"), "{text}");
        assert!(text.contains("duplicated: 50"), "{text}");
    }
}
