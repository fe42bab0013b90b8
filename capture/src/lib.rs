//! The capture: streams PostgreSQL logical replication (pgoutput) into gzipped JSONL
//! micro-batches on S3, records them in the DynamoDB ledger, notifies the compactor, and only then
//! confirms the position to PostgreSQL.

pub mod assemble;
pub mod backfill;
#[cfg(test)]
mod backfill_model;
pub mod batch;
pub mod catalog;
pub mod checks;
pub mod config;
pub mod connect;
pub mod encode;
pub mod flush;
pub mod health;
pub mod lease;
pub mod ledger;
pub mod notify;
pub mod pgoutput;
pub mod pipeline;
pub mod replication;
pub use cdc_contract::retry;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(test)]
mod sim_tests;
pub mod sink;
pub mod slot;
pub mod source;
pub mod stream;
pub mod tls;
