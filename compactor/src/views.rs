//! The current-state view of a table: one SQL template, written out for Athena (Trino) and for
//! DuckDB, over the table's Parquet changes.
//!
//! What the view does, in order:
//! 1. Keeps one row per change: a stray copy of a part (the short window docs/COMPACTOR.md
//!    describes) holds the same (`_lsn`, `_seq`) twice.
//! 2. Drops every change at or before the last truncate.
//! 3. Turns each update that moved its row to another key (`_key_before` not null) into a
//!    delete of the old key as well.
//! 4. Restores unchanged TOASTed values (null in the typed column, the placeholder in `_raw`)
//!    from the key's latest change that carried the value.
//! 5. Takes the latest change per key by (`_lsn`, `_seq`) and drops deleted keys.
//! 6. Text columns whose value the typed column could not hold get it back from `_raw`; `_raw`
//!    keeps the rest (numeric NaN, infinite timestamps: values a typed column cannot hold).
//!
//! Limits: a table without key columns, or whose key is every column (REPLICA IDENTITY FULL),
//! has no view (equal rows cannot be told apart); an unchanged TOASTed value no earlier change of
//! the key carried (after a key change, or before the capture's first change of the row) stays
//! unavailable: the placeholder in a text column, null in others; a key the typed column cannot
//! hold (numeric NaN) is null there, and such keys fall together; a key swapped between rows
//! inside one statement (deferrable keys) is not followed.

use std::fmt::Write as _;

use cdc_contract::event::UNAVAILABLE_VALUE;
use cdc_contract::TableName;

use crate::parquet_schema::{ColumnType, PartColumn, PartSchema, KEY_BEFORE, RAW};

/// Which SQL engine the view is written for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Amazon Athena (Trino): `CREATE OR REPLACE VIEW` over the catalog table.
    Athena,
    /// DuckDB: `CREATE OR REPLACE VIEW` over `read_parquet` with hive partitioning.
    DuckDb,
}

impl std::str::FromStr for Dialect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "athena" | "trino" => Ok(Dialect::Athena),
            "duckdb" => Ok(Dialect::DuckDb),
            other => Err(format!("unknown dialect {other:?} (athena or duckdb)")),
        }
    }
}

impl Dialect {
    /// The `_raw` entry of `column` (null when absent).
    fn raw_get(self, column: &str) -> String {
        let key = literal(column);
        match self {
            Dialect::Athena => format!("element_at({RAW}, {key})"),
            Dialect::DuckDb => format!("{RAW}[{key}]"),
        }
    }

    /// `_raw` without unchanged-TOAST placeholders.
    fn raw_without_placeholders(self) -> String {
        let p = literal(UNAVAILABLE_VALUE);
        match self {
            Dialect::Athena => format!("map_filter({RAW}, (k, v) -> v <> {p})"),
            Dialect::DuckDb => format!(
                "map_from_entries(list_filter(map_entries({RAW}), lambda e: e.value <> {p}))"
            ),
        }
    }
}

/// A double-quoted identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A single-quoted string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// True for types PostgreSQL can store out of line (TOAST): variable-length ones.
fn toastable(ty: &ColumnType) -> bool {
    matches!(
        ty,
        ColumnType::Utf8
            | ColumnType::Json
            | ColumnType::Binary
            | ColumnType::List(_)
            | ColumnType::Decimal { .. }
    )
}

/// The view's SQL: `CREATE OR REPLACE VIEW {view} AS ...` over `source` (a table name for
/// Athena, a `read_parquet(...)` call for DuckDB). None when the table has no key columns.
pub fn current_state_sql(
    table: &TableName,
    schema: &PartSchema,
    dialect: Dialect,
    view: &str,
    source: &str,
) -> Option<String> {
    // Without a key, or with every column in it (REPLICA IDENTITY FULL), equal rows cannot be
    // told apart: the latest change per key is not the table.
    if schema.key_columns.is_empty() || schema.key_columns.len() == schema.columns.len() {
        return None;
    }
    let keys: Vec<&str> = schema
        .key_columns
        .iter()
        .map(|&i| schema.columns[i].file_name.as_str())
        .collect();
    let key_list = keys.iter().map(|k| ident(k)).collect::<Vec<_>>().join(", ");
    let others: Vec<&crate::parquet_schema::PartColumn> =
        schema.columns.iter().filter(|c| !c.key).collect();
    let placeholder = literal(UNAVAILABLE_VALUE);
    // `_raw` is keyed by the column's name in the events, the typed column by its file name.
    let is_placeholder = |c: &PartColumn| {
        format!(
            "({} IS NULL AND {} = {placeholder})",
            ident(&c.file_name),
            dialect.raw_get(&c.name)
        )
    };

    let mut sql = String::new();
    let _ = writeln!(
        sql,
        "-- The current state of {table}: the latest change per key by (_lsn, _seq), deleted keys \
         removed.\n-- Written by the compactor from the table's latest schema version; see \
         docs/querying.md."
    );
    let _ = writeln!(sql, "CREATE OR REPLACE VIEW {view} AS");
    // 1. One row per change.
    let _ = writeln!(sql, "WITH changes AS (");
    let _ = writeln!(sql, "  SELECT * FROM (");
    let _ = writeln!(
        sql,
        "    SELECT c.*, row_number() OVER (PARTITION BY _lsn, _seq ORDER BY _lsn) AS _copy \
         FROM {source} c"
    );
    let _ = writeln!(sql, "  ) WHERE _copy = 1");
    let _ = writeln!(sql, "),");
    // 2. The last truncate.
    let _ = writeln!(
        sql,
        "last_truncate AS (\n  SELECT max(_lsn) AS t_lsn FROM changes WHERE _op = 't'\n),"
    );
    let _ = writeln!(
        sql,
        "truncate_at AS (\n  SELECT t_lsn, (SELECT max(_seq) FROM changes, last_truncate \
         WHERE _op = 't' AND _lsn = t_lsn) AS t_seq FROM last_truncate\n),"
    );
    let _ = writeln!(sql, "live AS (");
    let _ = writeln!(
        sql,
        "  SELECT changes.* FROM changes CROSS JOIN truncate_at\n  WHERE _op IN ('c', 'u', 'r', \
         'd') AND (t_lsn IS NULL OR _lsn > t_lsn OR (_lsn = t_lsn AND _seq > t_seq))"
    );
    let _ = writeln!(sql, "),");
    // 3. Key changes also delete the old key.
    let cols_of = |prefix: &str| -> Vec<String> {
        others
            .iter()
            .map(|c| format!("{prefix}{}", ident(&c.file_name)))
            .collect()
    };
    let _ = writeln!(sql, "keyed AS (");
    let _ = writeln!(
        sql,
        "  SELECT {key_list}, _lsn, _seq, _op, _commit_ts, {RAW}{}{} FROM live",
        if others.is_empty() { "" } else { ", " },
        cols_of("").join(", ")
    );
    let _ = writeln!(sql, "  UNION ALL");
    let old_keys = keys
        .iter()
        .map(|k| format!("{KEY_BEFORE}.{} AS {}", ident(k), ident(k)))
        .collect::<Vec<_>>()
        .join(", ");
    let nulls = others
        .iter()
        .map(|c| format!("NULL AS {}", ident(&c.file_name)))
        .collect::<Vec<_>>();
    let _ = writeln!(
        sql,
        "  SELECT {old_keys}, _lsn, _seq, 'd' AS _op, _commit_ts, NULL AS {RAW}{}{} FROM live \
         WHERE _op = 'u' AND {KEY_BEFORE} IS NOT NULL",
        if nulls.is_empty() { "" } else { ", " },
        nulls.join(", ")
    );
    let _ = writeln!(sql, "),");
    // 4. TOAST groups: each change that carries a value starts a group its placeholders join.
    let order = "ORDER BY _lsn, _seq";
    let toasted: Vec<&PartColumn> = others
        .iter()
        .copied()
        .filter(|c| toastable(&c.ty))
        .collect();
    let _ = writeln!(sql, "grouped AS (");
    let mut grouped = vec!["keyed.*".to_owned()];
    for (i, c) in toasted.iter().enumerate() {
        grouped.push(format!(
            "sum(CASE WHEN {} THEN 0 ELSE 1 END) OVER (PARTITION BY {key_list} {order} ROWS \
             UNBOUNDED PRECEDING) AS _g{i}",
            is_placeholder(c)
        ));
    }
    let _ = writeln!(sql, "  SELECT {} FROM keyed", grouped.join(",\n    "));
    let _ = writeln!(sql, "),");
    let _ = writeln!(sql, "filled AS (");
    let mut filled = vec![
        key_list.clone(),
        "_lsn".into(),
        "_seq".into(),
        "_op".into(),
        "_commit_ts".into(),
        RAW.into(),
    ];
    for c in &others {
        let name = ident(&c.file_name);
        match toasted.iter().position(|t| t.file_name == c.file_name) {
            Some(i) => {
                filled.push(format!(
                    "first_value({name}) OVER (PARTITION BY {key_list}, _g{i} {order}) AS {name}"
                ));
                filled.push(format!(
                    "first_value({}) OVER (PARTITION BY {key_list}, _g{i} {order}) AS {}",
                    dialect.raw_get(&c.name),
                    ident(&format!("_raw_{i}"))
                ));
            }
            None => filled.push(name),
        }
    }
    let _ = writeln!(sql, "  SELECT {} FROM grouped", filled.join(",\n    "));
    let _ = writeln!(sql, "),");
    // 5. The latest change per key.
    let _ = writeln!(sql, "ranked AS (");
    let _ = writeln!(
        sql,
        "  SELECT filled.*, row_number() OVER (PARTITION BY {key_list} ORDER BY _lsn DESC, _seq \
         DESC) AS _rn FROM filled"
    );
    let _ = writeln!(sql, ")");
    // 6. The row: text restored from `_raw` (an unchanged TOAST value no change carried stays the
    // placeholder, as in the JSONL), the rest of `_raw` kept.
    let mut out: Vec<String> = Vec::new();
    for c in &schema.columns {
        let name = ident(&c.file_name);
        let text = matches!(c.ty, ColumnType::Utf8 | ColumnType::Json);
        let raw = match toasted.iter().position(|t| t.file_name == c.file_name) {
            Some(i) => ident(&format!("_raw_{i}")),
            None => dialect.raw_get(&c.name),
        };
        if text && !c.key {
            out.push(format!("coalesce({name}, {raw}) AS {name}"));
        } else {
            out.push(name);
        }
    }
    out.push("_lsn".into());
    out.push("_seq".into());
    out.push("_commit_ts".into());
    out.push(format!("{} AS {RAW}", dialect.raw_without_placeholders()));
    let _ = writeln!(
        sql,
        "SELECT {}\nFROM ranked WHERE _rn = 1 AND _op <> 'd'",
        out.join(",\n  ")
    );
    Some(sql)
}

/// The view's source for DuckDB: every Parquet part under `root` (the table's `parquet`
/// prefix, local or `s3://`), columns merged by name. Without hive partitioning: the view needs
/// no partition column, and a table column named `year`, `month`, `day` or `hour` keeps its own
/// values.
pub fn duckdb_source(root: &str) -> String {
    format!(
        "read_parquet({}, hive_partitioning = false, union_by_name = true)",
        literal(&format!(
            "{}/year=*/month=*/day=*/hour=*/*.parquet",
            root.trim_end_matches('/')
        ))
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc_contract::schema::{ColumnSchema, TableSchema};

    fn schema(key: bool) -> PartSchema {
        let col = |name: &str, oid: u32, k: bool| ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: oid,
            typmod: -1,
            key: k,
            base_oid: oid,
            element_oid: None,
        };
        PartSchema::new(&TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![
                col("id", 23, key),
                col("body", 25, false),
                col("n", 20, false),
            ],
        })
    }

    #[test]
    fn a_whole_row_key_has_no_view_and_raw_values_are_found_by_event_name() {
        let t = TableName::new("public", "t");
        let col = |name: &str, key: bool| ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: 25,
            typmod: -1,
            key,
            base_oid: 25,
            element_oid: None,
        };
        let full = PartSchema::new(&TableSchema {
            table: t.clone(),
            columns: vec![col("a", true), col("b", true)],
        });
        assert!(current_state_sql(&t, &full, Dialect::DuckDb, "v", "s").is_none());
        let renamed = PartSchema::new(&TableSchema {
            table: t.clone(),
            columns: vec![col("id", true), col("_op", false)],
        });
        let sql = current_state_sql(&t, &renamed, Dialect::DuckDb, "v", "s").unwrap();
        assert!(
            sql.contains(r#"("_op_" IS NULL AND _raw['_op'] = "#),
            "{sql}"
        );
        assert!(!sql.contains("_raw['_op_']"), "{sql}");
    }

    #[test]
    fn a_keyless_table_has_no_view_and_the_dialects_differ_only_in_their_functions() {
        let t = TableName::new("public", "t");
        assert!(current_state_sql(&t, &schema(false), Dialect::DuckDb, "v", "s").is_none());
        let athena = current_state_sql(&t, &schema(true), Dialect::Athena, "v", "s").unwrap();
        let duck = current_state_sql(&t, &schema(true), Dialect::DuckDb, "v", "s").unwrap();
        assert!(athena.contains("element_at(_raw, 'body')"));
        assert!(duck.contains("_raw['body']"));
        // Only the text column is TOAST-filled; the bigint is not.
        assert!(duck.contains("AS _g0") && !duck.contains("AS _g1"));
        let strip = |s: &str| {
            s.replace("element_at(_raw, 'body')", "R")
                .replace("_raw['body']", "R")
                .replace("element_at(_raw, 'n')", "N")
                .replace("_raw['n']", "N")
                .replace("element_at(_raw, 'id')", "I")
                .replace("_raw['id']", "I")
        };
        let (a, d) = (strip(&athena), strip(&duck));
        let differing: Vec<(&str, &str)> =
            a.lines().zip(d.lines()).filter(|(x, y)| x != y).collect();
        assert_eq!(differing.len(), 1, "{differing:?}");
    }
}
