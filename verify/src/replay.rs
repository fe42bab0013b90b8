//! Replaying change events per key into a table's state.

use std::collections::HashMap;

use serde_json::Value;

use cdc_contract::event::{ChangeEvent, Op, Row, UNAVAILABLE_VALUE};

/// Rows by key: the JSON text of the key columns' values. A key maps to more than one row only
/// in tables whose key is the whole row (REPLICA IDENTITY FULL) holding equal rows.
pub type State = HashMap<String, Vec<Row>>;

/// The key of `row`: its key columns' values (every column when `key_columns` is empty).
pub fn key_of(row: &Row, key_columns: &[String]) -> String {
    let values: Vec<&Value> = if key_columns.is_empty() {
        row.values().collect()
    } else {
        key_columns
            .iter()
            .map(|c| row.get(c).unwrap_or(&Value::Null))
            .collect()
    };
    serde_json::to_string(&values).unwrap_or_default()
}

/// The outcome of a replay.
#[derive(Debug, Default)]
pub struct Replay {
    /// The rows.
    pub state: State,
    /// Updates and deletes of a key no earlier event created (normal when the slot started
    /// without a snapshot of existing rows; a loss otherwise).
    pub unknown_keys: u64,
}

fn take(state: &mut State, key: &str) -> Option<Row> {
    let rows = state.get_mut(key)?;
    let row = rows.pop();
    if rows.is_empty() {
        state.remove(key);
    }
    row
}

/// Replays `events` (in position order) per key.
pub fn replay(events: &[ChangeEvent], key_columns: &[String]) -> Replay {
    let mut out = Replay::default();
    for e in events {
        match e.op {
            // A snapshot read states the key's whole row: it replaces what an earlier snapshot
            // of the same key said (a recreated slot's new snapshot). Without key columns
            // (REPLICA IDENTITY FULL) equal rows are distinct rows, so reads add.
            Op::Read if !key_columns.is_empty() => {
                if let Some(after) = &e.after {
                    out.state
                        .insert(key_of(after, key_columns), vec![after.clone()]);
                }
            }
            Op::Create | Op::Read => {
                if let Some(after) = &e.after {
                    out.state
                        .entry(key_of(after, key_columns))
                        .or_default()
                        .push(after.clone());
                }
            }
            Op::Update => {
                let Some(after) = &e.after else { continue };
                let old_key = key_of(e.before.as_ref().unwrap_or(after), key_columns);
                let old = take(&mut out.state, &old_key);
                if old.is_none() {
                    out.unknown_keys += 1;
                }
                let mut row = after.clone();
                // An unchanged TOASTed value keeps the previous value.
                for (column, value) in row.iter_mut() {
                    if value.as_str() == Some(UNAVAILABLE_VALUE) {
                        if let Some(previous) = old.as_ref().and_then(|o| o.get(column)) {
                            *value = previous.clone();
                        }
                    }
                }
                out.state
                    .entry(key_of(&row, key_columns))
                    .or_default()
                    .push(row);
            }
            Op::Delete => {
                if let Some(before) = &e.before {
                    if take(&mut out.state, &key_of(before, key_columns)).is_none() {
                        out.unknown_keys += 1;
                    }
                }
            }
            Op::Truncate => out.state.clear(),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ev(op: &str, before: Value, after: Value, lsn: u64) -> ChangeEvent {
        serde_json::from_value(json!({
            "before": before, "after": after, "op": op, "ts_ms": 0,
            "source": {"version": "1", "connector": "postgresql", "name": "s", "ts_ms": 0,
                       "ts_us": 0, "snapshot": "false", "db": "d", "sequence": "[]",
                       "schema": "public", "table": "t", "txId": 1, "lsn": lsn,
                       "commit_lsn": lsn},
            "transaction": {"id": "1", "total_order": 1, "data_collection_order": 1}
        }))
        .unwrap()
    }

    #[test]
    fn inserts_updates_key_changes_deletes_and_toast_replay_to_the_last_state() {
        let keys = vec!["id".to_owned()];
        let events = vec![
            ev("r", Value::Null, json!({"id": 1, "v": "a", "big": "x"}), 1),
            ev("c", Value::Null, json!({"id": 2, "v": "b", "big": "y"}), 2),
            ev(
                "u",
                Value::Null,
                json!({"id": 1, "v": "a2", "big": UNAVAILABLE_VALUE}),
                3,
            ),
            ev(
                "u",
                json!({"id": 2}),
                json!({"id": 3, "v": "b", "big": "y"}),
                4,
            ),
            ev("d", json!({"id": 9}), Value::Null, 5),
        ];
        let r = replay(&events, &keys);
        assert_eq!(r.state.len(), 2);
        assert_eq!(r.state["[1]"][0]["big"], "x");
        assert_eq!(r.state["[1]"][0]["v"], "a2");
        assert!(r.state.contains_key("[3]") && !r.state.contains_key("[2]"));
        assert_eq!(r.unknown_keys, 1);
        let t = replay(
            &[events, vec![ev("t", Value::Null, Value::Null, 6)]].concat(),
            &keys,
        );
        assert!(t.state.is_empty());
    }

    /// A recreated slot's new snapshot reads keys an earlier snapshot or insert already made:
    /// the read states the row, it does not add one.
    #[test]
    fn a_second_snapshot_of_a_key_replaces_its_row() {
        let keys = vec!["id".to_owned()];
        let events = vec![
            ev("r", Value::Null, json!({"id": 1, "v": "a"}), 1),
            ev("c", Value::Null, json!({"id": 2, "v": "b"}), 2),
            ev("r", Value::Null, json!({"id": 1, "v": "a2"}), 9),
            ev("r", Value::Null, json!({"id": 2, "v": "b"}), 9),
        ];
        let r = replay(&events, &keys);
        assert_eq!(r.state.len(), 2);
        assert_eq!(
            r.state["[1]"],
            vec![json!({"id": 1, "v": "a2"}).as_object().cloned().unwrap()]
        );
        assert_eq!(r.state["[2]"].len(), 1);
    }

    #[test]
    fn a_table_keyed_by_the_whole_row_keeps_equal_rows_apart() {
        let events = vec![
            ev("c", Value::Null, json!({"a": 1}), 1),
            ev("c", Value::Null, json!({"a": 1}), 2),
            ev("d", json!({"a": 1}), Value::Null, 3),
        ];
        let r = replay(&events, &[]);
        assert_eq!(r.state["[1]"].len(), 1);
    }
}
