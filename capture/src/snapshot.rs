//! The initial snapshot: every captured table read in key order inside the slot's exported
//! snapshot, as op "r" events keyed just below the slot's consistent point, one ordinal per
//! table; recorded complete once its last flush is recorded.

use std::sync::Arc;

use cdc_contract::ledger::SnapshotState;
use cdc_contract::{Hour, Lsn, Position, TableName};

use crate::assemble::Want;
use crate::config::Settings;
use crate::encode::{TableEncoder, TxContext};
use crate::lease::Lease;
use crate::ledger::Ledger;
use crate::pgoutput;
use crate::pipeline::{now_ms, CaptureError};
use crate::replication::{quote_ident, ConnectParams};
use crate::slot::{retry_ledger, ExportedSnapshot};
use crate::source::Upstream;
use crate::stream::Streamer;

/// Reads the snapshot the slot exported and records it, complete (true). On shutdown it stops
/// between fetches (false): the state stays incomplete, and the next start takes it again.
#[allow(clippy::too_many_arguments)]
pub async fn take(
    settings: &Settings,
    streamer: &mut Streamer<'_>,
    upstream: &mut dyn Upstream,
    params: &ConnectParams,
    exported: ExportedSnapshot,
    ledger: &dyn Ledger,
    lease: &Lease,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Result<bool, CaptureError> {
    let started_ms = now_ms();
    let consistent = exported.consistent_lsn;
    let mut state = SnapshotState {
        complete: false,
        consistent_lsn: consistent,
        started_ms,
    };
    retry_ledger("recording the snapshot state", || {
        ledger.save_snapshot(&state, &lease.owner, lease.epoch)
    })
    .await?;
    let reader = crate::catalog::connect(params).await?;
    reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::replication::quote_literal(&exported.name)
        ))
        .await?;
    let tables = published_tables(&reader, settings).await?;
    tracing::info!(tables = tables.len(), consistent = %consistent, "initial snapshot started");
    streamer.health().snapshot_progress(Some(now_ms()));
    // Rows are keyed one below the consistent point, so no streamed change shares a key
    // (issue 15, item 5).
    let rows_lsn = state.rows_lsn();
    let ctx = TxContext {
        xid: None,
        commit_lsn: rows_lsn,
        commit_us: started_ms * 1000,
        prev_commit_end: Lsn::ZERO,
        snapshot: true,
    };
    let hour = Hour::from_millis(started_ms);
    let mut total = 0u64;
    for published in &tables {
        let table = &published.table;
        let (mut rel, order_by) = relation_of(&reader, table).await?;
        // The publication's column list and row filter hold for the snapshot exactly as for the
        // stream: an excluded column or a filtered-out row never reaches S3.
        if let Some(columns) = &published.columns {
            rel.columns.retain(|c| columns.contains(&c.name));
        }
        let schema = upstream.table_schema(&rel, false).await?;
        let encoder = Arc::new(TableEncoder::new(
            schema,
            &settings.slot,
            &settings.database,
        ));
        let columns: Vec<String> = rel.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let filter = published
            .row_filter
            .as_ref()
            .map(|f| format!(" WHERE {f}"))
            .unwrap_or_default();
        reader
            .batch_execute(&format!(
                "DECLARE cdc_snapshot NO SCROLL CURSOR FOR SELECT {} FROM {}.{}{filter}{}",
                if columns.is_empty() {
                    "NULL".to_owned()
                } else {
                    columns.join(", ")
                },
                quote_ident(&table.schema),
                quote_ident(&table.name),
                order_by
            ))
            .await?;
        let mut ordinal = 0u32;
        loop {
            if shutdown.is_cancelled() {
                tracing::info!(table = %table, rows = ordinal, "stopped on request during the initial snapshot; the next start takes it again");
                streamer.health().snapshot_progress(None);
                streamer.wait_inflight().await?;
                return Ok(false);
            }
            let messages = reader.simple_query("FETCH 5000 FROM cdc_snapshot").await?;
            streamer.health().snapshot_progress(Some(now_ms()));
            let mut fetched = 0;
            for message in messages {
                let tokio_postgres::SimpleQueryMessage::Row(row) = message else {
                    continue;
                };
                fetched += 1;
                ordinal += 1;
                let values: Vec<pgoutput::Value> = (0..rel.columns.len())
                    .map(|i| match row.get(i) {
                        Some(text) => {
                            pgoutput::Value::Text(bytes::Bytes::copy_from_slice(text.as_bytes()))
                        }
                        None => pgoutput::Value::Null,
                    })
                    .collect();
                let pos = Position::new(rows_lsn, ordinal);
                if let Some(want) = streamer.asm.snapshot_row(
                    rel.oid, &encoder, &ctx, hour, pos, consistent, &values, started_ms,
                ) {
                    streamer.flush(want, false).await?;
                }
            }
            if fetched == 0 {
                break;
            }
        }
        reader.batch_execute("CLOSE cdc_snapshot").await?;
        total += u64::from(ordinal);
        tracing::info!(table = %table, rows = ordinal, "table snapshot read");
    }
    reader.batch_execute("COMMIT").await?;
    drop(exported);
    streamer
        .flush(
            Want::SnapshotDone {
                consistent,
                started_ms,
            },
            true,
        )
        .await?;
    streamer.wait_inflight().await?;
    state.complete = true;
    retry_ledger("recording the snapshot complete", || {
        ledger.save_snapshot(&state, &lease.owner, lease.epoch)
    })
    .await?;
    streamer.asm.snapshot_done(consistent, started_ms);
    streamer.health().snapshot_progress(None);
    tracing::info!(rows = total, "initial snapshot complete");
    Ok(true)
}

/// A table the snapshot reads, with what the publication publishes of it.
struct Published {
    table: TableName,
    /// The published columns (PostgreSQL 15+ column lists); None: every column.
    columns: Option<Vec<String>>,
    /// The publication's row filter (PostgreSQL 15+), as SQL.
    row_filter: Option<String>,
}

/// The captured tables (`CDC_TABLES`, or every table of the publication) with the publication's
/// column list and row filter of each. A table of `CDC_TABLES` outside the publication is read
/// whole (its changes are never streamed).
async fn published_tables(
    reader: &tokio_postgres::Client,
    settings: &Settings,
) -> Result<Vec<Published>, CaptureError> {
    let version: i32 = reader
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    let sql = if version >= 150_000 {
        "SELECT schemaname::text, tablename::text, attnames::text[], rowfilter::text \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    } else {
        "SELECT schemaname::text, tablename::text, NULL::text[], NULL::text \
         FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1, 2"
    };
    let published: Vec<Published> = reader
        .query(sql, &[&settings.flags.publication])
        .await?
        .iter()
        .map(|r| Published {
            table: TableName::new(r.get::<_, String>(0), r.get::<_, String>(1)),
            columns: r.get(2),
            row_filter: r.get(3),
        })
        .collect();
    if settings.tables.is_empty() {
        return Ok(published);
    }
    Ok(settings
        .tables
        .iter()
        .map(|table| {
            published
                .iter()
                .find(|p| &p.table == table)
                .map(|p| Published {
                    table: table.clone(),
                    columns: p.columns.clone(),
                    row_filter: p.row_filter.clone(),
                })
                .unwrap_or(Published {
                    table: table.clone(),
                    columns: None,
                    row_filter: None,
                })
        })
        .collect())
}

/// A table's columns as pgoutput would describe them (replica identity columns as the key), and
/// the ORDER BY that reads it in key order.
async fn relation_of(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<(pgoutput::Relation, String), CaptureError> {
    let rows = client
        .query(
            "SELECT c.oid, c.relreplident::text, a.attname::text, a.atttypid, a.atttypmod, \
                    CASE c.relreplident \
                      WHEN 'f' THEN true \
                      WHEN 'i' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident AND a.attnum = ANY(i.indkey)) \
                      WHEN 'd' THEN EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
                      ELSE false END, \
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary AND a.attnum = ANY(i.indkey)) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             WHERE n.nspname = $1 AND c.relname = $2 ORDER BY a.attnum",
            &[&table.schema, &table.name],
        )
        .await?;
    let first = rows
        .first()
        .ok_or_else(|| CaptureError::Setup(format!("snapshot: table {table} not found")))?;
    let oid: u32 = first.get(0);
    let identity: String = first.get(1);
    let mut columns = Vec::with_capacity(rows.len());
    let mut pk = Vec::new();
    for r in &rows {
        let name: String = r.get(2);
        if r.get::<_, bool>(6) {
            pk.push(quote_ident(&name));
        }
        columns.push(pgoutput::RelationColumn {
            key: r.get(5),
            name,
            type_oid: r.get(3),
            typmod: r.get(4),
        });
    }
    let order_by = if pk.is_empty() {
        String::new()
    } else {
        format!(" ORDER BY {}", pk.join(", "))
    };
    Ok((
        pgoutput::Relation {
            oid,
            namespace: table.schema.clone(),
            name: table.name.clone(),
            replica_identity: identity.bytes().next().unwrap_or(b'd'),
            columns,
        },
        order_by,
    ))
}
