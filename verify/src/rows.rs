//! The table's current rows, encoded exactly as the capture encodes values, compared with the
//! replayed final events.

use std::collections::BTreeSet;

use serde_json::Value;
use tokio_postgres::SimpleQueryMessage;

use capture::catalog::Catalog;
use capture::encode::{write_value, Kind};
use capture::pgoutput::{Relation, RelationColumn};
use cdc_contract::event::{Row, UNAVAILABLE_VALUE};
use cdc_contract::TableName;

use crate::replay::{key_of, State};
use crate::report::{FindingKind, Report};
use crate::VerifyError;

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Reads every row of `table` through `catalog`'s connection (which pins the capture's session
/// settings, so values print as the capture saw them).
pub async fn table_rows(
    catalog: &mut Catalog,
    table: &TableName,
    key_columns: &[String],
) -> Result<State, VerifyError> {
    let qualified = format!("{}.{}", quote(&table.schema), quote(&table.name));
    let columns = catalog
        .client()
        .query(
            "SELECT a.attname::text, a.atttypid, a.atttypmod FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&qualified],
        )
        .await?;
    if columns.is_empty() {
        return Err(VerifyError::NoSuchTable(table.to_string()));
    }
    let relation = Relation {
        oid: 0,
        namespace: table.schema.clone(),
        name: table.name.clone(),
        replica_identity: b'd',
        columns: columns
            .iter()
            .map(|r| RelationColumn {
                key: false,
                name: r.get(0),
                type_oid: r.get(1),
                typmod: r.get(2),
            })
            .collect(),
    };
    let schema = catalog.table_schema(&relation, false).await?;
    let kinds: Vec<(String, Kind)> = schema
        .columns
        .iter()
        .map(|c| (c.name.clone(), Kind::for_type(c.base_oid, c.element_oid)))
        .collect();
    let select = kinds
        .iter()
        .map(|(name, _)| quote(name))
        .collect::<Vec<_>>()
        .join(", ");
    let messages = catalog
        .client()
        .simple_query(&format!("SELECT {select} FROM {qualified}"))
        .await?;
    let mut state = State::new();
    let mut buf = Vec::new();
    for message in messages {
        let SimpleQueryMessage::Row(row) = message else {
            continue;
        };
        let mut out = Row::new();
        for (i, (name, kind)) in kinds.iter().enumerate() {
            let value = match row.get(i) {
                None => Value::Null,
                Some(text) => {
                    buf.clear();
                    write_value(&mut buf, kind, text.as_bytes());
                    serde_json::from_slice(&buf).unwrap_or_else(|_| Value::String(text.to_owned()))
                }
            };
            out.insert(name.clone(), value);
        }
        state
            .entry(key_of(&out, key_columns))
            .or_default()
            .push(out);
    }
    Ok(state)
}

/// The columns of `replayed` that differ from `actual`, skipping columns the events never
/// carried (added later without a change since) and unavailable TOAST placeholders.
fn differing(replayed: &Row, actual: &Row) -> Vec<String> {
    replayed
        .iter()
        .filter(|(_, v)| v.as_str() != Some(UNAVAILABLE_VALUE))
        .filter(|(c, v)| actual.get(*c).is_some_and(|a| a != *v))
        .map(|(c, _)| c.clone())
        .collect()
}

fn same(replayed: &Row, actual: &Row) -> bool {
    differing(replayed, actual).is_empty()
}

/// Compares the replayed state with the table's rows; findings carry keys and column names,
/// never other values.
pub fn compare(replayed: &State, actual: &State, report: &mut Report) {
    report.replayed_rows = Some(replayed.values().map(|v| v.len() as u64).sum());
    report.table_rows = Some(actual.values().map(|v| v.len() as u64).sum());
    let keys: BTreeSet<&String> = replayed.keys().chain(actual.keys()).collect();
    for key in keys {
        let r = replayed.get(key).map(Vec::as_slice).unwrap_or_default();
        let a = actual.get(key).map(Vec::as_slice).unwrap_or_default();
        if r.len() == 1 && a.len() == 1 {
            let cols = differing(&r[0], &a[0]);
            if !cols.is_empty() {
                report.find(
                    FindingKind::Rows,
                    1,
                    format!("key {key}: {} differ", cols.join(", ")),
                );
            }
            continue;
        }
        // Match rows one to one (several rows per key only without a key).
        let mut unmatched: Vec<&Row> = a.iter().collect();
        let mut extra = 0u64;
        for row in r {
            match unmatched.iter().position(|x| same(row, x)) {
                Some(i) => {
                    unmatched.swap_remove(i);
                }
                None => extra += 1,
            }
        }
        if extra > 0 {
            report.find(
                FindingKind::Rows,
                extra,
                format!("key {key}: in the final files, not in the table"),
            );
        }
        if !unmatched.is_empty() {
            report.find(
                FindingKind::Rows,
                unmatched.len() as u64,
                format!("key {key}: in the table, not in the final files"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state(rows: Value) -> State {
        let mut s = State::new();
        for r in rows.as_array().unwrap() {
            let row: Row = r.as_object().unwrap().clone();
            s.entry(key_of(&row, &["id".to_owned()]))
                .or_default()
                .push(row);
        }
        s
    }

    #[test]
    fn missing_extra_and_changed_rows_are_found_and_added_columns_are_not() {
        let replayed =
            state(json!([{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 4, "v": "d"}]));
        let actual = state(json!([
            {"id": 1, "v": "a", "added_later": 5},
            {"id": 2, "v": "B"},
            {"id": 3, "v": "c"}
        ]));
        let mut report = Report::new("s", "public.t");
        compare(&replayed, &actual, &mut report);
        assert_eq!(report.count(FindingKind::Rows), 3);
        let examples = report.findings[&FindingKind::Rows].examples.join("\n");
        assert!(examples.contains("key [2]: v differ"), "{examples}");
        assert!(examples.contains("key [3]: in the table"), "{examples}");
        assert!(
            examples.contains("key [4]: in the final files"),
            "{examples}"
        );
        let mut clean = Report::new("s", "public.t");
        compare(&actual, &actual, &mut clean);
        assert!(clean.ok());
    }
}
