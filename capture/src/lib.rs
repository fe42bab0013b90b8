//! The capture: streams PostgreSQL logical replication (pgoutput) into gzipped JSONL
//! micro-batches on S3, records them in the DynamoDB ledger, notifies the compactor, and only then
//! confirms the position to PostgreSQL.

pub mod batch;
pub mod catalog;
pub mod checks;
pub mod config;
pub mod encode;
pub mod flush;
pub mod health;
pub mod ledger;
pub mod notify;
pub mod pgoutput;
pub mod pipeline;
pub mod replication;
pub mod sink;
pub mod tls;
