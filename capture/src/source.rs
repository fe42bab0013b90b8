//! The seams between the streamer and the database: the replication stream (next message,
//! confirm) and the SQL side it needs while streaming (schemas, the slot's state, heartbeats).
//! PostgreSQL implements them in [`crate::connect`]; the simulation test scripts them.

use async_trait::async_trait;

use cdc_contract::schema::TableSchema;
use cdc_contract::{Lsn, TableName};

use crate::pgoutput::{PgOutput, Relation};
use crate::pipeline::CaptureError;

/// What the replication stream delivers.
#[derive(Debug)]
pub enum Incoming {
    /// A decoded pgoutput message and the WAL position it was sent at.
    Message {
        /// The message.
        msg: PgOutput,
        /// Its WAL position (a change's own LSN).
        wal_start: Lsn,
    },
    /// The server's keepalive: while no transaction is open, every transaction committed before
    /// `wal_end` has been sent.
    Keepalive {
        /// The server's sent position.
        wal_end: Lsn,
        /// The server asks for a status reply.
        reply_requested: bool,
    },
}

/// One replication stream, from `START_REPLICATION` until it breaks.
#[async_trait]
pub trait ReplicationSource: Send {
    /// The next message.
    async fn next(&mut self) -> Result<Incoming, CaptureError>;
    /// Confirms everything below `lsn` recorded: the server may discard the WAL before it.
    async fn confirm(&mut self, lsn: Lsn) -> Result<(), CaptureError>;
}

/// The slot as the SQL side reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotStatus {
    /// The slot exists.
    Present {
        /// The server's current WAL position, read after the time the caller noted.
        current: Lsn,
        /// `pg_replication_slots.wal_status` (empty before PostgreSQL 13).
        wal_status: String,
        /// `safe_wal_size`, when limited.
        safe_wal: Option<i64>,
    },
    /// No such slot.
    Missing,
    /// The query failed for a reason other than a lost connection (logged).
    Unread,
}

/// The database behind a capture while it streams.
#[async_trait]
pub trait Upstream: Send {
    /// Opens the SQL connection again if it was lost.
    async fn reconnect_sql(&mut self) -> Result<(), CaptureError>;
    /// The slot's confirmed position (None: no slot, or never confirmed).
    async fn slot_confirmed(&mut self) -> Result<Option<Lsn>, CaptureError>;
    /// Starts streaming the slot from `from`: the server sends every transaction whose commit
    /// is at or after the later of `from` and the slot's confirmed position.
    async fn start(&mut self, from: Lsn) -> Result<Box<dyn ReplicationSource>, CaptureError>;
    /// Whether snapshots can be read from the server the stream last started on (a standby
    /// cannot write their watermarks).
    fn can_snapshot(&self) -> bool {
        true
    }
    /// The timeline of the server the stream last started on (None: not known).
    fn timeline(&self) -> Option<u32> {
        None
    }
    /// The schema of a Relation message's table; `refresh` after a schema change.
    async fn table_schema(
        &mut self,
        rel: &Relation,
        refresh: bool,
    ) -> Result<TableSchema, CaptureError>;
    /// Writes a logical message, so an idle database's slot still sees WAL and moves. Fails
    /// only when the connection is lost (other failures are logged).
    async fn emit_heartbeat(&mut self) -> Result<(), CaptureError>;
    /// The slot's state; fails only when the connection is lost.
    async fn slot_status(&mut self, slot: &str) -> Result<SlotStatus, CaptureError>;
    /// Writes a backfill chunk's high watermark (a non-transactional logical message with
    /// `content`) and returns its position.
    async fn emit_watermark(&mut self, content: &str) -> Result<Lsn, CaptureError> {
        let _ = content;
        Err(CaptureError::Setup(
            "this upstream takes no backfill".into(),
        ))
    }
    /// The captured tables the publication publishes now (None: not known here).
    async fn published(&mut self) -> Result<Option<Vec<TableName>>, CaptureError> {
        Ok(None)
    }
    /// True when `table` has a key the backfill can read it by (a primary key or a replica
    /// identity index), or is gone.
    async fn has_key(&mut self, table: &TableName) -> Result<bool, CaptureError> {
        let _ = table;
        Ok(true)
    }
    /// Where backfill chunks are read (None: nowhere).
    fn chunk_source(&self) -> Option<std::sync::Arc<dyn crate::backfill::ChunkSource>> {
        None
    }
}
