//! Connecting to PostgreSQL: the connection settings, the first connection (waited for while
//! the database is unreachable or refuses the login), and PostgreSQL's implementation of the
//! streamer's seams ([`PgUpstream`], [`PgSource`]).

use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use cdc_contract::schema::TableSchema;
use cdc_contract::Lsn;

use crate::catalog::Catalog;
use crate::config::Settings;
use crate::pgoutput::{self, Relation};
use crate::pipeline::CaptureError;
use crate::replication::{
    ConnectParams, ReplicationConnection, ReplicationMessage, ReplicationStream,
};
use crate::source::{Incoming, ReplicationSource, SlotStatus, Upstream};

/// The connection settings of both connections.
pub fn connect_params(settings: &Settings) -> Result<ConnectParams, CaptureError> {
    let cfg = &settings.flags;
    let tls = crate::tls::client_config(cfg.sslmode, cfg.sslrootcert.as_deref())
        .map_err(|e| CaptureError::Setup(e.to_string()))?;
    Ok(ConnectParams {
        host: cfg.host.clone(),
        port: cfg.port,
        user: settings.username.clone(),
        password: cfg.password.clone(),
        database: settings.database.clone(),
        ssl_mode: cfg.sslmode,
        tls,
        connect_timeout: Duration::from_secs(30),
        allow_unencrypted_password: cfg.allow_unencrypted_password,
    })
}

/// Why a first connection failed, and what fixes it, when waiting may help: the database is
/// unreachable or refuses the login (a first deployment before its password secret or security
/// group is set up). None for anything else (a missing database, bad TLS settings): definite.
fn waiting_reason(error: &crate::catalog::ConnectError, settings: &Settings) -> Option<String> {
    use crate::catalog::ConnectError;
    let cfg = &settings.flags;
    let unreachable = match error {
        ConnectError::Unencrypted(_) => return None,
        ConnectError::Io { source, .. } => io_unreachable(source),
        ConnectError::Db(e) => unreachable(e),
    };
    match error.code().map(|c| c.code()) {
        Some("28P01") | Some("28000") => Some(format!(
            "the database refused the login of {:?}: set the password in POSTGRES_PASSWORD (the \
             deployment's secret) and allow the user in pg_hba.conf",
            settings.username
        )),
        Some("57P03") | Some("53300") => Some(
            "the database cannot take a connection now (starting up, or too many connections)"
                .into(),
        ),
        Some(_) => None,
        None if !unreachable => None,
        None => Some(format!(
            "cannot reach {}:{}: check POSTGRES_HOST, POSTGRES_PORT and the network path (the \
             database's security group must admit the capture)",
            cfg.host, cfg.port
        )),
    }
}

/// True when a connection failed on the network path (refused, reset, timed out, no route, a
/// name that does not resolve yet), not on TLS or a protocol error.
fn unreachable(error: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io_unreachable(io);
        }
        source = e.source();
    }
    false
}

fn io_unreachable(io: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        io.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | NotConnected
            | AddrNotAvailable
            | HostUnreachable
            | NetworkUnreachable
    ) || io.to_string().contains("lookup address")
}

/// The first SQL connection. While the database is unreachable or refuses the login, retries
/// with backoff (up to 30 s), logging the reason and the fix; `/healthz` stays healthy meanwhile.
/// None when shutdown was asked for.
pub async fn connect_at_start(
    settings: &Settings,
    params: &ConnectParams,
    health: &crate::health::Health,
    shutdown: &CancellationToken,
    lease_lost: &CancellationToken,
) -> Result<Option<tokio_postgres::Client>, CaptureError> {
    let mut attempt = 0u32;
    loop {
        match crate::catalog::connect(params).await {
            Ok(client) => {
                if attempt > 0 {
                    tracing::info!("connected to the database");
                }
                health.set_waiting_for_database(None);
                return Ok(Some(client));
            }
            Err(e) => {
                let Some(reason) = waiting_reason(&e, settings) else {
                    return Err(match e {
                        crate::catalog::ConnectError::Db(e) => e.into(),
                        other => CaptureError::Setup(other.to_string()),
                    });
                };
                let wait = Duration::from_millis((1000u64 << attempt.min(5)).min(30_000));
                // A server error displays as "db error"; its message says what was refused.
                let detail = match &e {
                    crate::catalog::ConnectError::Db(db) => match db.as_db_error() {
                        Some(db) => format!("{}: {}", db.code().code(), db.message()),
                        None => db.to_string(),
                    },
                    other => other.to_string(),
                };
                tracing::error!(error = %detail, reason = %reason, retry_in_ms = wait.as_millis() as u64, "waiting for the database");
                health.set_waiting_for_database(Some(reason));
                attempt += 1;
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = lease_lost.cancelled() => return Err(CaptureError::LeaseLost("renewal failed".into())),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}

/// The slot's `confirmed_flush_lsn` (None: no such slot, or never confirmed).
pub async fn slot_confirmed(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<Lsn>, tokio_postgres::Error> {
    let row = client
        .query_opt(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(row
        .and_then(|r| r.get::<_, Option<String>>(0))
        .and_then(|t| t.parse().ok()))
}

/// PostgreSQL behind the streamer: the SQL connection (reopened when lost) and replication
/// streams on the slot.
pub struct PgUpstream<'a> {
    settings: &'a Settings,
    params: ConnectParams,
    /// The SQL side.
    pub catalog: Catalog,
    chunks: std::sync::Arc<crate::backfill::PgChunkSource>,
    /// The timeline of the server the stream last started on.
    timeline: Option<u32>,
    /// That server is a standby.
    in_recovery: bool,
}

impl<'a> PgUpstream<'a> {
    /// An upstream over an open SQL connection.
    pub fn new(
        settings: &'a Settings,
        params: ConnectParams,
        client: tokio_postgres::Client,
    ) -> Self {
        PgUpstream {
            settings,
            chunks: std::sync::Arc::new(crate::backfill::PgChunkSource::new(
                params.clone(),
                settings.flags.publication.clone(),
            )),
            params,
            catalog: Catalog::new(client),
            timeline: None,
            in_recovery: false,
        }
    }

    /// Starts from the timeline the ledger's checkpoint is on, so a promotion while no capture
    /// ran is noticed too.
    pub fn with_timeline(mut self, timeline: Option<u32>) -> Self {
        self.timeline = timeline;
        self
    }

    /// The connection settings.
    pub fn params(&self) -> &ConnectParams {
        &self.params
    }
}

impl PgUpstream<'_> {
    /// Notices a promotion between two connections: the server's timeline changed. Going on is
    /// exact only when everything recorded is on the history the new timeline shares with the
    /// old one (the promoted standby had received it); past the point where the old timeline
    /// ended, the recorded changes are not in this database, and the positions after that point
    /// name other transactions here.
    async fn follow_timeline(
        &mut self,
        conn: &mut ReplicationConnection,
        recorded: Lsn,
    ) -> Result<(), CaptureError> {
        let rows = conn.simple_query("IDENTIFY_SYSTEM").await?;
        let timeline = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .and_then(|t| t.parse::<u32>().ok())
            .ok_or_else(|| {
                CaptureError::Replication(crate::replication::ReplicationError::Protocol(
                    "IDENTIFY_SYSTEM returned no timeline".into(),
                ))
            })?;
        let Some(old) = self.timeline.filter(|old| *old != timeline) else {
            self.timeline = Some(timeline);
            return Ok(());
        };
        if timeline < old {
            // No promotion lowers a timeline: pg_upgrade starts the new cluster on timeline 1
            // at the old WAL position (and 17's carries the slots over). The WAL-end check
            // above has passed; the slot's own checks stand.
            tracing::warn!(from = old, to = timeline, recorded = %recorded, "the server's timeline went down (a major version upgrade starts timeline 1 again); going on from the checkpoint");
            self.timeline = Some(timeline);
            return Ok(());
        }
        let rows = conn
            .simple_query(&format!("TIMELINE_HISTORY {timeline}"))
            .await
            .map_err(|e| {
                CaptureError::Setup(format!(
                    "the server's timeline changed from {old} to {timeline} and its history cannot be read \
                     ({e}), so whether the checkpoint {recorded} is on it cannot be told"
                ))
            })?;
        let history = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .unwrap_or_default();
        match timeline_end(&history, old) {
            Some(end) if recorded <= end => {
                tracing::warn!(from = old, to = timeline, old_timeline_end = %end, recorded = %recorded, "the server was promoted (a failover): everything recorded is on its history; going on");
                self.timeline = Some(timeline);
                Ok(())
            }
            Some(end) => Err(CaptureError::Setup(format!(
                "a failover lost changes the capture had recorded: the server was promoted onto timeline \
                 {timeline}, which left timeline {old} at {end}, but the ledger's checkpoint is {recorded}. \
                 Streaming on would skip the new primary's transactions up to {recorded}. Start over under a \
                 new CDC_SLOT_NAME (a new slot and snapshot; what the ledger recorded stays), and drop slot {:?}. \
                 Set synchronized_standby_slots on the primary so the capture never gets ahead of the standby",
                self.settings.slot
            ))),
            None => Err(CaptureError::Setup(format!(
                "the server's timeline changed from {old} to {timeline}, and its history does not contain \
                 timeline {old}: it is not the server the capture streamed from"
            ))),
        }
    }

    /// Refuses to stream from a server whose WAL ends before the ledger's checkpoint: it lost
    /// transactions the capture recorded (a failover to a standby that had not received them, a
    /// restore) or is another server. Streaming on would skip its new transactions up to the
    /// checkpoint, since their positions are below it. Checked at every (re)connection, so a
    /// failover while streaming is caught too.
    async fn refuse_wal_behind(&mut self, recorded: Lsn) -> Result<(), CaptureError> {
        let (end, in_recovery) = self.catalog.wal_position().await?;
        self.in_recovery = in_recovery;
        if in_recovery && end < recorded {
            // A standby that just restarted accepts connections once consistent, which may be
            // before where it had replayed to: wait for it.
            return Err(CaptureError::Disconnected(format!(
                "the standby has replayed up to {end}, not yet to the ledger's checkpoint {recorded}; waiting"
            )));
        }
        if recorded > Lsn::ZERO && end < recorded {
            return Err(CaptureError::Setup(format!(
                "the server's WAL ends at {end}, before the ledger's checkpoint {recorded}: the server lost \
                 transactions the capture had recorded (a failover to a standby that had not received them, or a \
                 restore from a backup), or it is not the server the slot {:?} was read from. Streaming on would \
                 skip its new transactions up to {recorded}. Start over under a new CDC_SLOT_NAME (a new slot and \
                 snapshot; what the ledger recorded stays), and drop this slot",
                self.settings.slot
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Upstream for PgUpstream<'_> {
    async fn reconnect_sql(&mut self) -> Result<(), CaptureError> {
        if self.catalog.client().is_closed() {
            let client = crate::catalog::connect(&self.params)
                .await
                .map_err(|e| CaptureError::Disconnected(format!("sql connection: {e}")))?;
            self.catalog = Catalog::new(client);
        }
        Ok(())
    }

    async fn slot_confirmed(&mut self) -> Result<Option<Lsn>, CaptureError> {
        Ok(slot_confirmed(self.catalog.client(), &self.settings.slot).await?)
    }

    fn timeline(&self) -> Option<u32> {
        self.timeline
    }

    fn can_snapshot(&self) -> bool {
        !self.in_recovery
    }

    async fn start(&mut self, from: Lsn) -> Result<Box<dyn ReplicationSource>, CaptureError> {
        self.refuse_wal_behind(from).await?;
        let mut conn = ReplicationConnection::connect(&self.params).await?;
        if self.in_recovery {
            // What a capture of a standby records is on the standby's own WAL, whichever
            // timeline it follows (and a walsender there goes on through a promotion without a
            // reconnect): positions are not tied to a timeline.
            self.timeline = None;
        } else {
            self.follow_timeline(&mut conn, from).await?;
        }
        tracing::info!(
            tls = conn.encrypted(),
            channel_binding = conn.channel_bound(),
            "replication connection authenticated"
        );
        let stream = conn
            .start_replication(&self.settings.slot, from, &self.settings.flags.publication)
            .await?;
        Ok(Box::new(PgSource { stream }))
    }

    async fn table_schema(
        &mut self,
        rel: &Relation,
        refresh: bool,
    ) -> Result<TableSchema, CaptureError> {
        Ok(self.catalog.table_schema(rel, refresh).await?)
    }

    async fn emit_heartbeat(&mut self) -> Result<(), CaptureError> {
        if let Err(error) = self
            .catalog
            .client()
            .execute(
                // A standby cannot write WAL: there the walsender's keepalives move the slot.
                "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_logical_emit_message(false, 'pg-cdc-s3', 'heartbeat') END",
                &[],
            )
            .await
        {
            lost_or_warn(
                error,
                "heartbeat message failed (grant EXECUTE on pg_logical_emit_message)",
            )?;
        }
        Ok(())
    }

    async fn emit_watermark(&mut self, content: &str) -> Result<Lsn, CaptureError> {
        // The walsender sends only flushed WAL, and neither a message alone nor a commit that
        // wrote nothing before its commit record is flushed at once (the WAL writer would, up to
        // `wal_writer_delay` later). Here the message is written inside a transaction with an
        // xid, and a synchronous commit flushes it: the watermark reaches the stream now.
        let sql = format!(
            "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); \
             SELECT pg_logical_emit_message(false, {}, {})::text; COMMIT",
            crate::replication::quote_literal(crate::backfill::WATERMARK_PREFIX),
            crate::replication::quote_literal(content)
        );
        let client = self.catalog.client();
        let messages = match client.simple_query(&sql).await {
            Ok(m) => m,
            Err(e) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(e.into());
            }
        };
        let lsn = messages
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                _ => None,
            })
            .next_back()
            .ok_or_else(|| {
                CaptureError::Setup("pg_logical_emit_message returned nothing".into())
            })?;
        lsn.parse()
            .map_err(|e| CaptureError::Setup(format!("pg_logical_emit_message: {e}")))
    }

    async fn published(&mut self) -> Result<Option<Vec<cdc_contract::TableName>>, CaptureError> {
        let tables = crate::backfill::published_tables(
            self.catalog.client(),
            &self.settings.flags.publication,
            &self.settings.tables,
        )
        .await?;
        Ok(Some(tables.into_iter().map(|p| p.table).collect()))
    }

    async fn has_key(&mut self, table: &cdc_contract::TableName) -> Result<bool, CaptureError> {
        Ok(
            match crate::backfill::relation_of(self.catalog.client(), table, None).await? {
                Some((_, key)) => !key.is_empty(),
                None => true,
            },
        )
    }

    fn chunk_source(&self) -> Option<std::sync::Arc<dyn crate::backfill::ChunkSource>> {
        Some(self.chunks.clone())
    }

    async fn slot_status(&mut self, slot: &str) -> Result<SlotStatus, CaptureError> {
        let row = match self
            .catalog
            .client()
            .query_opt(
                &format!(
                    "SELECT {}::text, coalesce(wal_status, ''), safe_wal_size \
                     FROM pg_replication_slots WHERE slot_name = $1",
                    crate::catalog::WAL_END
                ),
                &[&slot],
            )
            .await
        {
            Ok(row) => row,
            Err(error) => {
                lost_or_warn(error, "reading slot health failed")?;
                return Ok(SlotStatus::Unread);
            }
        };
        Ok(match row {
            None => SlotStatus::Missing,
            Some(row) => SlotStatus::Present {
                current: row.get::<_, String>(0).parse().unwrap_or(Lsn::ZERO),
                wal_status: row.get(1),
                safe_wal: row.get(2),
            },
        })
    }
}

/// Where `timeline` ended, from a timeline history file (`parent<TAB>switchpoint<TAB>reason`
/// per line).
fn timeline_end(history: &str, timeline: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next()?.parse().ok()?;
        let end: Lsn = fields.next()?.parse().ok()?;
        (tli == timeline).then_some(end)
    })
}

/// A lost connection is an error (reconnect); anything else is logged and passed over.
fn lost_or_warn(error: tokio_postgres::Error, what: &str) -> Result<(), CaptureError> {
    if error.is_closed() {
        return Err(CaptureError::Sql(error));
    }
    tracing::warn!(error = %error, "{what}");
    Ok(())
}

/// A PostgreSQL replication stream.
pub struct PgSource {
    stream: ReplicationStream,
}

#[async_trait]
impl ReplicationSource for PgSource {
    async fn next(&mut self) -> Result<Incoming, CaptureError> {
        Ok(match self.stream.next().await? {
            ReplicationMessage::XLogData {
                data, wal_start, ..
            } => Incoming::Message {
                msg: pgoutput::decode(data)?,
                wal_start,
            },
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
            } => Incoming::Keepalive {
                wal_end,
                reply_requested,
            },
        })
    }

    async fn confirm(&mut self, lsn: Lsn) -> Result<(), CaptureError> {
        Ok(self.stream.send_status(lsn, lsn, false).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::timeline_end;

    #[test]
    fn a_timeline_ends_where_its_history_line_says() {
        let history = "1\t0/3000158\tno recovery target specified\n\n\
                       2\t0/5A0001C8\tno recovery target specified\n";
        assert_eq!(timeline_end(history, 1), Some("0/3000158".parse().unwrap()));
        assert_eq!(
            timeline_end(history, 2),
            Some("0/5A0001C8".parse().unwrap())
        );
        assert_eq!(timeline_end(history, 3), None);
        assert_eq!(timeline_end("", 1), None);
    }
}
