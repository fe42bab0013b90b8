//! A captured table's schema as the capture saw it, so the compactor can type Parquet without
//! reaching the database.

use serde::{Deserialize, Serialize};

use crate::TableName;

/// One column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColumnSchema {
    /// Column name.
    pub name: String,
    /// The column's type name as `format_type` prints it (`numeric(10,2)`, `text[]`, `mood`).
    pub type_name: String,
    /// The column's type OID.
    pub type_oid: u32,
    /// The type modifier (-1 when none).
    pub typmod: i32,
    /// Part of the replica identity (the key).
    pub key: bool,
    /// The built-in type the values are typed as: domains resolved to their base type, enums to
    /// `text` (25); for arrays, the array type of the resolved element.
    pub base_oid: u32,
    /// For arrays, the resolved element type OID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub element_oid: Option<u32>,
}

/// A table's schema at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSchema {
    /// The table.
    pub table: TableName,
    /// Columns in table order.
    pub columns: Vec<ColumnSchema>,
}

impl TableSchema {
    /// The schema's version id: 16 hex digits of a stable hash of its columns. The same columns
    /// always give the same id, so writing a schema again is idempotent.
    pub fn version_id(&self) -> String {
        // FNV-1a over the canonical JSON of the columns: stable across builds and platforms.
        let text = serde_json::to_string(&self.columns).unwrap_or_default();
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in text.as_bytes() {
            hash ^= u64::from(*byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, oid: u32) -> ColumnSchema {
        ColumnSchema {
            name: name.into(),
            type_name: "integer".into(),
            type_oid: oid,
            typmod: -1,
            key: false,
            base_oid: oid,
            element_oid: None,
        }
    }

    #[test]
    fn version_id_depends_only_on_columns() {
        let a = TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![col("id", 23)],
        };
        let same = a.clone();
        let mut added = a.clone();
        added.columns.push(col("x", 25));
        assert_eq!(a.version_id(), same.version_id());
        assert_ne!(a.version_id(), added.version_id());
        assert_eq!(a.version_id().len(), 16);
    }
}
