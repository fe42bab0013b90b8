//! The hour manifest (`{hour prefix}/_manifest.json`, one per format), rewritten from the
//! ledger's recorded parts after each part: the parts, rows and LSN range of the hour.

use serde::Serialize;

use cdc_contract::layout::Format;
use cdc_contract::ledger::PartItem;
use cdc_contract::{Hour, TableName};

/// One manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// `schema.table`.
    pub table: String,
    /// `YYYY-MM-DDTHH`.
    pub hour: String,
    /// `jsonl` or `parquet`.
    pub format: &'static str,
    /// Changes in every part.
    pub rows: u64,
    /// Bytes of every part.
    pub bytes: u64,
    /// First commit LSN (PostgreSQL form), if any part.
    pub first_lsn: Option<String>,
    /// Last commit LSN (PostgreSQL form).
    pub last_lsn: Option<String>,
    /// First (commit LSN, ordinal) key.
    pub first_position: Option<String>,
    /// Last (commit LSN, ordinal) key.
    pub last_position: Option<String>,
    /// The parts, in order.
    pub parts: Vec<ManifestPart>,
}

/// One part in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ManifestPart {
    /// Part number.
    pub part: u32,
    /// S3 key.
    pub key: String,
    /// Changes.
    pub rows: u64,
    /// Size.
    pub bytes: u64,
    /// First (commit LSN, ordinal) key.
    pub first_position: String,
    /// Last (commit LSN, ordinal) key.
    pub last_position: String,
    /// First commit LSN as a number (as Debezium writes LSNs).
    pub first_lsn: u64,
    /// Last commit LSN as a number.
    pub last_lsn: u64,
    /// Schema version of its rows.
    pub schema_id: String,
    /// The compaction attempt that wrote it.
    pub attempt: String,
}

impl Manifest {
    /// The manifest of `format` from the recorded `parts` (in part order).
    pub fn new(table: &TableName, hour: Hour, format: Format, parts: &[PartItem]) -> Self {
        let entries: Vec<ManifestPart> = parts
            .iter()
            .filter_map(|p| {
                let file = p.files.iter().find(|f| f.format == format)?;
                Some(ManifestPart {
                    part: p.part,
                    key: file.key.clone(),
                    rows: p.rows,
                    bytes: file.bytes,
                    first_position: p.first.key(),
                    last_position: p.last.key(),
                    first_lsn: p.first.commit_lsn.0,
                    last_lsn: p.last.commit_lsn.0,
                    schema_id: p.schema_id.clone(),
                    attempt: p.attempt.clone(),
                })
            })
            .collect();
        let first = parts.iter().map(|p| p.first).min();
        let last = parts.iter().map(|p| p.last).max();
        Manifest {
            table: table.to_string(),
            hour: hour.to_string(),
            format: format.dir(),
            rows: entries.iter().map(|p| p.rows).sum(),
            bytes: entries.iter().map(|p| p.bytes).sum(),
            first_lsn: first.map(|p| p.commit_lsn.to_string()),
            last_lsn: last.map(|p| p.commit_lsn.to_string()),
            first_position: first.map(|p| p.key()),
            last_position: last.map(|p| p.key()),
            parts: entries,
        }
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

/// The attempt id in a final file's name (`{table}-{YYYY}-{MM}-{DD}-{HH}-{NNN}-{attempt}.{ext}`),
/// or `None` for any other key (the manifest, foreign files).
pub fn attempt_of(key: &str) -> Option<&str> {
    let name = key.rsplit('/').next()?;
    let stem = cdc_contract::layout::FORMATS
        .iter()
        .flat_map(|f| f.extensions())
        .find_map(|ext| name.strip_suffix(&format!(".{ext}")))?;
    let (rest, attempt) = stem.rsplit_once('-')?;
    let (_, part) = rest.rsplit_once('-')?;
    (part.len() >= 3 && part.bytes().all(|b| b.is_ascii_digit()) && !attempt.is_empty())
        .then_some(attempt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc_contract::layout::Layout;
    use cdc_contract::ledger::PartFile;
    use cdc_contract::{Lsn, Position};

    #[test]
    fn attempt_ids_come_from_part_file_names_only() {
        let l = Layout::new("base");
        let t = TableName::new("public", "my-table");
        let h: Hour = "2025-01-08T10".parse().unwrap();
        let zstd = l
            .clone()
            .with_jsonl_compression(cdc_contract::layout::JsonlCompression::Zstd);
        for f in cdc_contract::layout::FORMATS {
            for layout in [&l, &zstd] {
                assert_eq!(
                    attempt_of(&layout.part_key(&t, f, h, 12, "ab12cd34")),
                    Some("ab12cd34")
                );
                assert_eq!(attempt_of(&layout.manifest_key(&t, f, h)), None);
            }
        }
        assert_eq!(attempt_of("x/notes.txt"), None);
    }

    #[test]
    fn manifests_list_parts_rows_and_the_lsn_range() {
        let t = TableName::new("public", "t");
        let h: Hour = "2025-01-08T10".parse().unwrap();
        let part = |n: u32, a: u64, b: u64| PartItem {
            table: t.clone(),
            hour: h,
            part: n,
            attempt: "a".into(),
            rows: 2,
            first: Position::new(Lsn(a), 1),
            last: Position::new(Lsn(b), 1),
            first_commit_ms: 0,
            last_commit_ms: 0,
            schema_id: "s".into(),
            files: vec![PartFile {
                format: Format::Parquet,
                key: format!("k{n}"),
                bytes: 10,
            }],
            created_ms: 0,
        };
        let m = Manifest::new(&t, h, Format::Parquet, &[part(0, 16, 32), part(1, 48, 64)]);
        assert_eq!(m.rows, 4);
        assert_eq!(m.bytes, 20);
        assert_eq!(m.first_lsn.as_deref(), Some("0/10"));
        assert_eq!(m.last_lsn.as_deref(), Some("0/40"));
        assert_eq!(m.parts[1].key, "k1");
        assert!(Manifest::new(&t, h, Format::Jsonl, &[part(0, 1, 2)])
            .parts
            .is_empty());
    }
}
