//! The capture: streams PostgreSQL logical replication (pgoutput) into gzipped JSONL
//! micro-batches on S3, records them in the DynamoDB ledger, notifies the compactor, and only then
//! confirms the position to PostgreSQL.

pub mod encode;
pub mod pgoutput;
pub mod replication;
pub mod tls;
