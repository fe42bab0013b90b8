//! Metrics as CloudWatch Embedded Metric Format lines on standard output (names from
//! `cdc_contract::metrics`).

use std::io::Write;

use cdc_contract::metrics::emf_line;

/// Writes one EMF line for `slot` with `values`.
pub fn emit(slot: &str, values: &[(&str, f64)]) {
    let line = emf_line(slot, crate::now_ms(), values);
    let mut out = std::io::stdout().lock();
    // Metrics are best effort: a closed stdout must not fail a compaction.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
