//! The replication connection: PostgreSQL's streaming replication sub-protocol over
//! postgres-protocol's message codecs (startup with `replication=database`, SCRAM/MD5/cleartext
//! authentication, TLS by `sslmode`, simple queries, then CopyBoth with XLogData, keepalives and
//! standby status updates).
//!
//! Upstream tokio-postgres does not speak this sub-protocol; this module owns just what the
//! capture needs, so that the capture alone decides what gets confirmed.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{
    ChannelBinding, ScramSha256, SCRAM_SHA_256, SCRAM_SHA_256_PLUS,
};
use postgres_protocol::message::{backend::Message, frontend};
use secrecy::{ExposeSecret, SecretString};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use cdc_contract::Lsn;

use crate::tls::SslMode;

/// Seconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// What can go wrong on the replication connection.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// The network failed or the server went away: reconnect and resume.
    #[error("replication connection i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with an error.
    #[error("server error {code}: {message}")]
    Server {
        /// SQLSTATE.
        code: String,
        /// The server's message.
        message: String,
    },
    /// TLS is required (`sslmode`) but the server does not offer it.
    #[error("the server does not support TLS but PGSSLMODE requires it")]
    TlsRefused,
    /// The server's certificate or the TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// The server asked for an authentication method the capture does not speak.
    #[error("unsupported authentication method: {0}")]
    UnsupportedAuth(&'static str),
    /// The server asked for a password and none is configured.
    #[error("the server asks for a password: set POSTGRES_PASSWORD")]
    PasswordMissing,
    /// The server sent something the protocol does not allow here.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server asked for a password that is not sent unencrypted.
    #[error(transparent)]
    UnencryptedPassword(#[from] crate::tls::UnencryptedPassword),
}

impl ReplicationError {
    /// True when reconnecting later may succeed (network, server restart, slot still held by a
    /// previous session); false when a person must change something.
    pub fn is_transient(&self) -> bool {
        match self {
            ReplicationError::Io(_) => true,
            ReplicationError::Server { code, .. } => {
                // 55006 object_in_use: the slot is still active for a session that just died.
                // 57P01-57P03: admin shutdown, crash shutdown, cannot connect now. 08: connection.
                // 53: insufficient resources (too many connections, wal senders).
                code == "55006"
                    || code.starts_with("57P")
                    || code.starts_with("08")
                    || code.starts_with("53")
            }
            _ => false,
        }
    }

    /// The SQLSTATE of a server error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Where and how to connect.
#[derive(Clone)]
pub struct ConnectParams {
    /// Server host name or address.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password, when the server asks for one.
    pub password: Option<SecretString>,
    /// Database.
    pub database: String,
    /// `sslmode`.
    pub ssl_mode: SslMode,
    /// The TLS configuration for `ssl_mode` (None for `disable`).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How long connecting and authenticating may take.
    pub connect_timeout: Duration,
    /// Send a cleartext or MD5 password over a connection that is not encrypted
    /// (`CDC_ALLOW_UNENCRYPTED_PASSWORD`).
    pub allow_unencrypted_password: bool,
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A connection in replication mode, before streaming starts.
pub struct ReplicationConnection {
    io: Box<dyn Io>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// TLS: the server certificate's `tls-server-end-point` binding (None: not computable).
    tls: Option<Option<Vec<u8>>>,
    /// SCRAM was bound to the TLS channel (`SCRAM-SHA-256-PLUS`).
    channel_bound: bool,
}

/// One row of a simple query's result, as text.
pub type TextRow = Vec<Option<String>>;

/// Session settings pinned at start-up: pgoutput's text output depends on them. pgoutput
/// converts its text to the client encoding, so UTF8 makes a LATIN1 (or any other) database
/// stream UTF-8, as the snapshot's SQL connection reads it (issue 15, item 7).
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("client_encoding", "UTF8"),
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO"),
    ("IntervalStyle", "iso_8601"),
    ("extra_float_digits", "3"),
];

impl ReplicationConnection {
    /// Connects, negotiates TLS and authenticates.
    pub async fn connect(params: &ConnectParams) -> Result<Self, ReplicationError> {
        tokio::time::timeout(params.connect_timeout, Self::connect_inner(params))
            .await
            .map_err(|_| {
                ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {}:{} timed out", params.host, params.port),
                ))
            })?
    }

    async fn connect_inner(params: &ConnectParams) -> Result<Self, ReplicationError> {
        let mut tcp =
            crate::catalog::connect_tcp(&params.host, params.port, params.connect_timeout).await?;
        let mut end_point = None;
        let io: Box<dyn Io> = match &params.tls {
            None => Box::new(tcp),
            Some(config) => {
                let mut buf = BytesMut::new();
                frontend::ssl_request(&mut buf);
                tcp.write_all(&buf).await?;
                let answer = tcp.read_u8().await?;
                match answer {
                    b'S' => {
                        let name = rustls::pki_types::ServerName::try_from(params.host.clone())
                            .map_err(|e| {
                                ReplicationError::Tls(std::io::Error::other(e.to_string()))
                            })?;
                        let tls = tokio_rustls::TlsConnector::from(config.clone())
                            .connect(name, tcp)
                            .await
                            .map_err(ReplicationError::Tls)?;
                        end_point = Some(
                            tls.get_ref()
                                .1
                                .peer_certificates()
                                .and_then(|certs| certs.first())
                                .and_then(|cert| crate::tls::server_end_point(cert)),
                        );
                        Box::new(tls)
                    }
                    b'N' if params.ssl_mode.requires_tls() => {
                        return Err(ReplicationError::TlsRefused)
                    }
                    b'N' => Box::new(tcp),
                    other => {
                        return Err(ReplicationError::Protocol(format!(
                            "unexpected SSLRequest answer {other}"
                        )))
                    }
                }
            }
        };
        let mut conn = ReplicationConnection {
            io,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::new(),
            tls: end_point,
            channel_bound: false,
        };
        conn.startup(params).await?;
        Ok(conn)
    }

    async fn startup(&mut self, params: &ConnectParams) -> Result<(), ReplicationError> {
        let mut startup: Vec<(&str, &str)> = vec![
            ("user", &params.user),
            ("database", &params.database),
            ("replication", "database"),
            ("application_name", "pg-cdc-s3-capture"),
        ];
        startup.extend(SESSION_SETTINGS);
        frontend::startup_message(startup, &mut self.wbuf)?;
        self.flush().await?;
        let password = || {
            params
                .password
                .as_ref()
                .map(|p| p.expose_secret().as_bytes().to_vec())
                .ok_or(ReplicationError::PasswordMissing)
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.read_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    self.password_allowed(params, 3)?;
                    frontend::password_message(&password()?, &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    self.password_allowed(params, 5)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        &password()?,
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut offers_scram = false;
                    let mut offers_plus = false;
                    let mut mechanisms = body.mechanisms();
                    while let Some(m) = mechanisms.next()? {
                        offers_scram |= m == SCRAM_SHA_256;
                        offers_plus |= m == SCRAM_SHA_256_PLUS;
                    }
                    // Over TLS, bound to the server's certificate when the server offers it
                    // (a man in the middle cannot relay the exchange); when it does not, the
                    // client says it could have ("y"), so a downgrade is detected.
                    let (mechanism, binding) = match (&self.tls, offers_plus) {
                        (Some(Some(end_point)), true) => (
                            SCRAM_SHA_256_PLUS,
                            ChannelBinding::tls_server_end_point(end_point.clone()),
                        ),
                        (Some(Some(_)), false) if offers_scram => {
                            (SCRAM_SHA_256, ChannelBinding::unrequested())
                        }
                        _ if offers_scram => (SCRAM_SHA_256, ChannelBinding::unsupported()),
                        _ => {
                            return Err(ReplicationError::UnsupportedAuth(
                                "SASL without SCRAM-SHA-256",
                            ))
                        }
                    };
                    self.channel_bound = mechanism == SCRAM_SHA_256_PLUS;
                    let s = ScramSha256::new(&password()?, binding);
                    frontend::sasl_initial_response(mechanism, s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                    scram = Some(s);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let s = scram.as_mut().ok_or_else(|| {
                        ReplicationError::Protocol("SASL continue before SASL start".into())
                    })?;
                    s.update(body.data())?;
                    frontend::sasl_response(s.message(), &mut self.wbuf)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let mut s = scram.take().ok_or_else(|| {
                        ReplicationError::Protocol("SASL final before SASL start".into())
                    })?;
                    s.finish(body.data())?;
                }
                Message::AuthenticationGss
                | Message::AuthenticationSspi
                | Message::AuthenticationKerberosV5 => {
                    return Err(ReplicationError::UnsupportedAuth("GSS/SSPI/Kerberos"));
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                Message::ErrorResponse(body) => return Err(server_error(&body)),
                _ => {
                    return Err(ReplicationError::Protocol(
                        "unexpected message during start-up".into(),
                    ))
                }
            }
        }
    }

    /// A cleartext (code 3) or MD5 (5) password goes only over TLS, or when allowed.
    fn password_allowed(&self, params: &ConnectParams, code: u32) -> Result<(), ReplicationError> {
        match crate::tls::unsafe_password(code) {
            Some(refused) if self.tls.is_none() && !params.allow_unencrypted_password => {
                Err(refused.into())
            }
            _ => Ok(()),
        }
    }

    /// True when the connection is encrypted (TLS).
    pub fn encrypted(&self) -> bool {
        self.tls.is_some()
    }

    /// True when SCRAM was bound to the TLS channel (`SCRAM-SHA-256-PLUS`).
    pub fn channel_bound(&self) -> bool {
        self.channel_bound
    }

    async fn flush(&mut self) -> Result<(), ReplicationError> {
        self.io.write_all(&self.wbuf).await?;
        self.io.flush().await?;
        self.wbuf.clear();
        Ok(())
    }

    /// Reads one whole frame (tag and body) into `rbuf` and splits it off.
    async fn read_frame(&mut self) -> Result<(u8, Bytes), ReplicationError> {
        loop {
            if self.rbuf.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.rbuf[1], self.rbuf[2], self.rbuf[3], self.rbuf[4]])
                        as usize;
                if len < 4 {
                    return Err(ReplicationError::Protocol(format!(
                        "invalid message length {len}"
                    )));
                }
                if self.rbuf.len() > len {
                    let mut frame = self.rbuf.split_to(len + 1).freeze();
                    let tag = frame[0];
                    frame.advance(5);
                    return Ok((tag, frame));
                }
                self.rbuf.reserve(len + 1 - self.rbuf.len());
            }
            if self.io.read_buf(&mut self.rbuf).await? == 0 {
                return Err(ReplicationError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "server closed the replication connection",
                )));
            }
        }
    }

    async fn read_message(&mut self) -> Result<Message, ReplicationError> {
        let (tag, body) = self.read_frame().await?;
        parse_frame(tag, &body)
    }

    /// Runs a replication command or SQL statement with the simple query protocol and returns
    /// its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<TextRow>, ReplicationError> {
        frontend::query(sql, &mut self.wbuf)?;
        self.flush().await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_message().await? {
                Message::DataRow(body) => {
                    let buf = body.buffer();
                    let mut ranges = body.ranges();
                    let mut row = Vec::new();
                    while let Some(range) = ranges.next()? {
                        row.push(range.map(|r| String::from_utf8_lossy(&buf[r]).into_owned()));
                    }
                    rows.push(row);
                }
                Message::ErrorResponse(body) => error = Some(server_error(&body)),
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                _ => {}
            }
        }
    }

    /// `IDENTIFY_SYSTEM`: the server's current WAL flush position.
    pub async fn identify_system(&mut self) -> Result<Lsn, ReplicationError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let pos = rows
            .first()
            .and_then(|r| r.get(2))
            .and_then(|v| v.as_deref())
            .ok_or_else(|| {
                ReplicationError::Protocol("IDENTIFY_SYSTEM returned no xlogpos".into())
            })?;
        pos.parse()
            .map_err(|_| ReplicationError::Protocol(format!("bad xlogpos {pos}")))
    }

    /// Starts streaming `slot` from `start` with pgoutput protocol version 1, the publication and
    /// logical messages on.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        publication: &str,
    ) -> Result<ReplicationStream, ReplicationError> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} (\"proto_version\" '1', \"publication_names\" {}, \"messages\" 'true')",
            quote_ident(slot),
            quote_literal(&quote_ident(publication)),
        );
        frontend::query(&sql, &mut self.wbuf)?;
        self.flush().await?;
        loop {
            let (tag, body) = self.read_frame().await?;
            match tag {
                b'W' => return Ok(ReplicationStream { conn: self }),
                b'E' => {
                    return Err(match parse_frame(tag, &body)? {
                        Message::ErrorResponse(e) => server_error(&e),
                        _ => ReplicationError::Protocol("malformed error response".into()),
                    });
                }
                b'N' | b'S' => {}
                other => {
                    return Err(ReplicationError::Protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
    }
}

/// What the server streams.
#[derive(Debug)]
pub enum ReplicationMessage {
    /// A pgoutput message.
    XLogData {
        /// WAL position of the message's data.
        wal_start: Lsn,
        /// The server's current end of WAL.
        wal_end: Lsn,
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive.
    Keepalive {
        /// The server's current end of WAL (everything before it has been sent).
        wal_end: Lsn,
        /// The server wants a status update now.
        reply_requested: bool,
    },
}

/// A connection in CopyBoth mode, streaming.
pub struct ReplicationStream {
    conn: ReplicationConnection,
}

impl ReplicationStream {
    /// The next message. Cancel-safe: bytes read so far stay buffered.
    pub async fn next(&mut self) -> Result<ReplicationMessage, ReplicationError> {
        loop {
            let (tag, mut body) = self.conn.read_frame().await?;
            match tag {
                b'd' => {
                    if body.is_empty() {
                        return Err(ReplicationError::Protocol("empty CopyData".into()));
                    }
                    match body.get_u8() {
                        b'w' if body.len() >= 24 => {
                            let wal_start = Lsn(body.get_u64());
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            return Ok(ReplicationMessage::XLogData {
                                wal_start,
                                wal_end,
                                data: body,
                            });
                        }
                        b'k' if body.len() >= 17 => {
                            let wal_end = Lsn(body.get_u64());
                            let _send_time = body.get_i64();
                            let reply_requested = body.get_u8() == 1;
                            return Ok(ReplicationMessage::Keepalive {
                                wal_end,
                                reply_requested,
                            });
                        }
                        other => {
                            return Err(ReplicationError::Protocol(format!(
                                "unknown or short replication message {:?}",
                                other as char
                            )))
                        }
                    }
                }
                b'E' => {
                    return Err(match parse_frame(tag, &body)? {
                        Message::ErrorResponse(e) => server_error(&e),
                        _ => ReplicationError::Protocol("malformed error response".into()),
                    });
                }
                b'c' => {
                    return Err(ReplicationError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "server ended the replication stream",
                    )))
                }
                _ => {}
            }
        }
    }

    /// Sends a standby status update: `written` received, `flushed` durably recorded (the slot's
    /// confirmed position moves to `flushed`).
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply: bool,
    ) -> Result<(), ReplicationError> {
        let now_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0)
            - PG_EPOCH_OFFSET_MICROS;
        let mut msg = BytesMut::with_capacity(34);
        msg.put_u8(b'r');
        msg.put_u64(written.0);
        msg.put_u64(flushed.0);
        msg.put_u64(flushed.0);
        msg.put_i64(now_us);
        msg.put_u8(u8::from(reply));
        frontend::CopyData::new(msg.freeze())?.write(&mut self.conn.wbuf);
        self.conn.flush().await
    }
}

/// Parses one frame with postgres-protocol's backend codec.
fn parse_frame(tag: u8, body: &[u8]) -> Result<Message, ReplicationError> {
    if tag == b'W' {
        return Err(ReplicationError::Protocol(
            "unexpected CopyBothResponse".into(),
        ));
    }
    let mut frame = BytesMut::with_capacity(body.len() + 5);
    frame.put_u8(tag);
    frame.put_u32(body.len() as u32 + 4);
    frame.put_slice(body);
    Message::parse(&mut frame)?
        .ok_or_else(|| ReplicationError::Protocol("truncated message".into()))
}

fn server_error(body: &postgres_protocol::message::backend::ErrorResponseBody) -> ReplicationError {
    let mut code = String::new();
    let mut message = String::new();
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    ReplicationError::Server { code, message }
}

/// Quotes an SQL identifier.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_and_literals_are_quoted() {
        assert_eq!(quote_ident("my\"slot"), "\"my\"\"slot\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn slot_in_use_and_network_errors_are_transient() {
        let busy = ReplicationError::Server {
            code: "55006".into(),
            message: "replication slot \"s\" is active for PID 1".into(),
        };
        assert!(busy.is_transient());
        let missing = ReplicationError::Server {
            code: "42704".into(),
            message: "replication slot \"s\" does not exist".into(),
        };
        assert!(!missing.is_transient());
        assert!(!ReplicationError::TlsRefused.is_transient());
    }
}
