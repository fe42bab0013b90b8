//! Metric names, read from `metrics.json`, the one file infra/ reads too.

use std::sync::OnceLock;

use serde::Deserialize;

/// The metric catalogue shipped with the code (`cdc-contract/metrics.json`).
pub const METRICS_JSON: &str = include_str!("../metrics.json");

/// The catalogue: a namespace, the pipeline-level dimension and every metric.
#[derive(Debug, Deserialize)]
pub struct Catalogue {
    /// CloudWatch namespace.
    pub namespace: String,
    /// The pipeline-level dimension name (its value is the slot name).
    pub dimension: String,
    /// The opt-in per-table dimension name.
    pub table_dimension: String,
    /// Every metric the code emits.
    pub metrics: Vec<MetricDef>,
}

/// One metric.
#[derive(Debug, Deserialize)]
pub struct MetricDef {
    /// CloudWatch metric name.
    pub name: String,
    /// CloudWatch unit.
    pub unit: String,
    /// `capture` or `compactor`.
    pub emitter: String,
    /// What it measures.
    pub description: String,
}

/// The parsed catalogue.
pub fn catalogue() -> &'static Catalogue {
    static CATALOGUE: OnceLock<Catalogue> = OnceLock::new();
    CATALOGUE.get_or_init(|| {
        // The file is part of the source tree and checked by a unit test.
        serde_json::from_str(METRICS_JSON)
            .unwrap_or_else(|e| panic!("metrics.json is invalid: {e}"))
    })
}

macro_rules! metric_names {
    ($($(#[$doc:meta])* $ident:ident = $name:literal;)*) => {
        $($(#[$doc])* pub const $ident: &str = $name;)*
        /// Every name defined as a constant here (checked against `metrics.json`).
        pub const ALL: &[&str] = &[$($name),*];
    };
}

metric_names! {
    /// Server WAL position minus the confirmed position.
    REPLICATION_LAG_BYTES = "ReplicationLagBytes";
    /// Seconds behind the last recorded commit.
    REPLICATION_LAG_SECONDS = "ReplicationLagSeconds";
    /// The slot's `safe_wal_size`.
    SLOT_SAFE_WAL_BYTES = "SlotSafeWalBytes";
    /// 1 when the slot's WAL is lost or unreserved.
    SLOT_WAL_LOST = "SlotWalLost";
    /// Changes recorded by one flush.
    FLUSH_ROWS = "FlushRows";
    /// Gzipped bytes uploaded by one flush.
    FLUSH_BYTES = "FlushBytes";
    /// Duration of one flush.
    FLUSH_LATENCY = "FlushLatency";
    /// Failed and retried flush attempts.
    FLUSH_RETRIES = "FlushRetries";
    /// Commit to ledger record.
    COMMIT_TO_LEDGER_LATENCY = "CommitToLedgerLatency";
    /// Duration of one table-hour compaction.
    COMPACTION_DURATION = "CompactionDuration";
    /// Rows written by one table-hour compaction.
    COMPACTION_ROWS = "CompactionRows";
    /// Tables still to backfill as of the last recorded flush.
    BACKFILL_TABLES_REMAINING = "BackfillTablesRemaining";
    /// Rows recorded so far by the backfills under way.
    BACKFILL_ROWS = "BackfillRows";
    /// Bytes written by one table-hour compaction.
    COMPACTION_BYTES = "CompactionBytes";
    /// Lines sent to the dead-letter prefix.
    DEAD_LETTER_RECORDS = "DeadLetterRecords";
    /// Closed hours still pending after a run.
    PENDING_HOURS = "PendingHours";
    /// Age of the oldest closed hour still pending after a run (seconds past its end).
    OLDEST_PENDING_HOUR_AGE = "OldestPendingHourAge";
    /// Glue Data Catalog table updates that failed after their retries.
    CATALOG_UPDATE_FAILURES = "CatalogUpdateFailures";
}

/// One CloudWatch Embedded Metric Format line with the slot and table dimensions (the opt-in
/// per-table metrics: each distinct slot and table is a metric CloudWatch bills).
pub fn emf_table_line(
    slot: &str,
    table: &str,
    timestamp_ms: i64,
    values: &[(&str, f64)],
) -> String {
    let cat = catalogue();
    emf(
        &[(&cat.dimension, slot), (&cat.table_dimension, table)],
        timestamp_ms,
        values,
    )
}

/// One CloudWatch Embedded Metric Format line with the slot dimension.
pub fn emf_line(slot: &str, timestamp_ms: i64, values: &[(&str, f64)]) -> String {
    emf(&[(&catalogue().dimension, slot)], timestamp_ms, values)
}

/// One EMF line whose one dimension set is `dimensions` (name, value).
fn emf(dimensions: &[(&str, &str)], timestamp_ms: i64, values: &[(&str, f64)]) -> String {
    let cat = catalogue();
    let defs: Vec<serde_json::Value> = values
        .iter()
        .map(|(name, _)| {
            let unit = cat
                .metrics
                .iter()
                .find(|m| m.name == *name)
                .map(|m| m.unit.as_str())
                .unwrap_or("None");
            serde_json::json!({ "Name": name, "Unit": unit })
        })
        .collect();
    let names: Vec<&str> = dimensions.iter().map(|(name, _)| *name).collect();
    let mut root = serde_json::Map::new();
    root.insert(
        "_aws".into(),
        serde_json::json!({
            "Timestamp": timestamp_ms,
            "CloudWatchMetrics": [{
                "Namespace": cat.namespace,
                "Dimensions": [names],
                "Metrics": defs,
            }]
        }),
    );
    for (name, value) in dimensions {
        root.insert((*name).to_owned(), serde_json::Value::from(*value));
    }
    for (name, value) in values {
        root.insert((*name).to_owned(), serde_json::json!(value));
    }
    serde_json::Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_and_catalogue_name_the_same_metrics() {
        let mut in_file: Vec<&str> = catalogue()
            .metrics
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        let mut consts = ALL.to_vec();
        in_file.sort();
        consts.sort();
        assert_eq!(in_file, consts);
    }

    #[test]
    fn table_lines_carry_both_dimensions() {
        let line = emf_table_line("slot_a", "public.users", 1, &[(FLUSH_ROWS, 3.0)]);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["Table"], "public.users");
        assert_eq!(v["Slot"], "slot_a");
        assert_eq!(v["FlushRows"], 3.0);
        assert_eq!(
            v["_aws"]["CloudWatchMetrics"][0]["Dimensions"],
            serde_json::json!([["Slot", "Table"]])
        );
    }

    #[test]
    fn emf_lines_carry_namespace_dimension_and_units() {
        let line = emf_line(
            "slot_a",
            1_700_000_000_000,
            &[(FLUSH_ROWS, 12.0), (FLUSH_BYTES, 345.0)],
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let cw = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(cw["Namespace"], "PgCdc");
        assert_eq!(cw["Dimensions"][0][0], "Slot");
        assert_eq!(cw["Metrics"][1]["Unit"], "Bytes");
        assert_eq!(v["Slot"], "slot_a");
        assert_eq!(v["FlushRows"], 12.0);
    }
}
