//! `cdc-verify`: after an incident (and after every fault test), checks one table end to end.
//!
//! - [`files`]: reads the ledger's hour records, recorded parts and batch items, and the final
//!   files they name; checks that no (commit LSN, ordinal) occurs twice, that every recorded batch's
//!   changes are in the final files (and nothing else is), that parts are in order, that Parquet
//!   holds the same changes as JSONL, that manifests list the recorded parts, and that no stray
//!   file lingers in a settled hour. Optionally it reads the uncompacted batches from staging too.
//! - [`replay`]: replays the events per key in (commit LSN, ordinal) order.
//! - [`rows`]: reads the table's current rows, encoded exactly as the capture encodes values, to
//!   compare with the replay.
//! - [`status`]: `cdc-status`, an operator's view of each slot.
//! - [`db`]: the database flags both binaries take.

pub mod db;
pub mod files;
pub mod replay;
pub mod report;
pub mod rows;
pub mod status;

pub use report::{FindingKind, Report};

/// Why a table could not be verified at all (as opposed to a finding: something verified wrong).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The ledger or S3 could not be read.
    #[error(transparent)]
    Aws(#[from] cdc_contract::aws::AwsError),
    /// The ledger knows no such slot.
    #[error("slot {0:?} has no checkpoint in the ledger: check CDC_SLOT_NAME and LEDGER_TABLE")]
    UnknownSlot(String),
    /// The database could not be read.
    #[error("database: {0}")]
    Sql(#[from] tokio_postgres::Error),
    /// The table is not in the database.
    #[error("table {0} is not in the database")]
    NoSuchTable(String),
}
