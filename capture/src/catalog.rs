//! The ordinary SQL connection and what the capture asks the catalog: resolved column types
//! (domains to their base, enums to text, array elements) and display type names.

use std::collections::HashMap;

use secrecy::ExposeSecret;
use tokio_postgres::Client;

use cdc_contract::schema::{ColumnSchema, TableSchema};
use cdc_contract::{Lsn, TableName};

use crate::pgoutput::Relation;
use crate::replication::ConnectParams;

/// `text`'s OID: what enums are typed as.
const TEXT_OID: u32 = 25;

/// Why an ordinary SQL connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The server or the protocol refused (or the connection broke while starting).
    #[error("{0}")]
    Db(#[from] tokio_postgres::Error),
    /// The server could not be reached.
    #[error("connecting to {addr}: {source}")]
    Io {
        /// host:port.
        addr: String,
        /// What failed.
        source: std::io::Error,
    },
    /// The server asked for a password the capture does not send unencrypted.
    #[error(transparent)]
    Unencrypted(#[from] crate::tls::UnencryptedPassword),
}

impl ConnectError {
    /// The server's SQLSTATE, when it refused.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            ConnectError::Db(e) => e.code(),
            _ => None,
        }
    }
}

/// Opens an ordinary SQL connection with the same TLS and session settings as replication:
/// over TLS, SCRAM binds to the server's certificate (`SCRAM-SHA-256-PLUS`) when the server
/// offers it; unencrypted, a cleartext or MD5 password is not sent unless
/// `params.allow_unencrypted_password`.
pub async fn connect(params: &ConnectParams) -> Result<Client, ConnectError> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.database)
        .application_name("pg-cdc-s3-capture")
        .options(
            "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3",
        );
    if let Some(p) = &params.password {
        cfg.password(p.expose_secret());
    }
    let addr = format!("{}:{}", params.host, params.port);
    let io_error = |source| ConnectError::Io {
        addr: addr.clone(),
        source,
    };
    let timed_out = || {
        io_error(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connecting timed out",
        ))
    };
    if params.host.starts_with('/') {
        return Err(io_error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "unix-domain sockets are not supported: give the server's TCP host name or address",
        )));
    }
    let tcp = connect_tcp(&params.host, params.port, params.connect_timeout)
        .await
        .map_err(io_error)?;
    // TLS and authentication within the timeout too.
    let start = async {
        let guarded = |ssl_request| {
            let guard = crate::tls::PasswordGuard::new(tcp, ssl_request);
            if params.allow_unencrypted_password {
                guard.disarmed()
            } else {
                guard
            }
        };
        let client = match &params.tls {
            None => {
                cfg.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, conn) = cfg
                    .connect_raw(guarded(false), tokio_postgres::NoTls)
                    .await
                    .map_err(unencrypted)?;
                spawn_connection(conn);
                client
            }
            Some(tls) => {
                cfg.ssl_mode(if params.ssl_mode.requires_tls() {
                    tokio_postgres::config::SslMode::Require
                } else {
                    tokio_postgres::config::SslMode::Prefer
                });
                let connector = crate::tls::RustlsConnect::new(tls.clone(), &params.host);
                let (client, conn) = cfg
                    .connect_raw(guarded(true), connector)
                    .await
                    .map_err(unencrypted)?;
                spawn_connection(conn);
                client
            }
        };
        Ok::<_, ConnectError>(client)
    };
    tokio::time::timeout(params.connect_timeout, start)
        .await
        .map_err(|_| timed_out())?
}

/// A TCP connection to `host:port`: each address it resolves to tried in turn, each within
/// `timeout`; no delay, and keepalives that find a dead peer within about two minutes.
pub(crate) async fn connect_tcp(
    host: &str,
    port: u16,
    timeout: std::time::Duration,
) -> std::io::Result<tokio::net::TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => {
                tcp.set_nodelay(true)?;
                let keepalive = socket2::TcpKeepalive::new()
                    .with_time(std::time::Duration::from_secs(60))
                    .with_interval(std::time::Duration::from_secs(15))
                    .with_retries(4);
                socket2::SockRef::from(&tcp).set_tcp_keepalive(&keepalive)?;
                return Ok(tcp);
            }
            Ok(Err(e)) => last = Some(e),
            Err(_) => {
                last = Some(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connecting to {addr} timed out"),
                ))
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("failed to lookup address information: {host} has no address"),
        )
    }))
}

/// A connection's error, or the guard's refusal inside it.
fn unencrypted(error: tokio_postgres::Error) -> ConnectError {
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        let refused = e
            .downcast_ref::<crate::tls::UnencryptedPassword>()
            .or_else(|| {
                e.downcast_ref::<std::io::Error>()
                    .and_then(|io| io.get_ref())
                    .and_then(|inner| inner.downcast_ref::<crate::tls::UnencryptedPassword>())
            });
        if let Some(refused) = refused {
            return ConnectError::Unencrypted(*refused);
        }
        source = e.source();
    }
    ConnectError::Db(error)
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            tracing::warn!(error = %error, "sql connection ended");
        }
    });
}

/// A type resolved to what its values are typed as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Resolved {
    base_oid: u32,
    element_oid: Option<u32>,
}

/// Resolves and caches type information.
pub struct Catalog {
    client: Client,
    types: HashMap<u32, Resolved>,
}

/// SQL for the end of the WAL the server has: written on a primary, replayed on a standby.
pub const WAL_END: &str =
    "(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)";

impl Catalog {
    /// A catalog over `client`.
    pub fn new(client: Client) -> Self {
        Self {
            client,
            types: HashMap::new(),
        }
    }

    /// The underlying connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server's current WAL write position (on a standby: the position replayed so far).
    pub async fn current_wal_lsn(&self) -> Result<Lsn, tokio_postgres::Error> {
        Ok(self.wal_position().await?.0)
    }

    /// The end of the WAL the server has, and whether it is a standby.
    pub async fn wal_position(&self) -> Result<(Lsn, bool), tokio_postgres::Error> {
        let row = self
            .client
            .query_one(&format!("SELECT {WAL_END}::text, pg_is_in_recovery()"), &[])
            .await?;
        let text: String = row.get(0);
        Ok((text.parse().unwrap_or(Lsn::ZERO), row.get(1)))
    }

    async fn resolve(&mut self, oid: u32, depth: u32) -> Result<Resolved, tokio_postgres::Error> {
        if let Some(r) = self.types.get(&oid) {
            return Ok(*r);
        }
        let row = self
            .client
            .query_opt(
                "SELECT typtype::text, typbasetype, typelem, typcategory::text FROM pg_type WHERE oid = $1",
                &[&oid],
            )
            .await?;
        let resolved = match row {
            None => Resolved {
                base_oid: oid,
                element_oid: None,
            },
            Some(row) => {
                let typtype: String = row.get(0);
                let basetype: u32 = row.get(1);
                let elem: u32 = row.get(2);
                let category: String = row.get(3);
                if depth > 16 {
                    Resolved {
                        base_oid: oid,
                        element_oid: None,
                    }
                } else if typtype == "d" {
                    Box::pin(self.resolve(basetype, depth + 1)).await?
                } else if typtype == "e" {
                    Resolved {
                        base_oid: TEXT_OID,
                        element_oid: None,
                    }
                } else if category == "A" && elem != 0 {
                    let element = Box::pin(self.resolve(elem, depth + 1)).await?;
                    Resolved {
                        base_oid: oid,
                        element_oid: Some(element.base_oid),
                    }
                } else {
                    Resolved {
                        base_oid: oid,
                        element_oid: None,
                    }
                }
            }
        };
        self.types.insert(oid, resolved);
        Ok(resolved)
    }

    /// The table schema for a Relation message. `forget_types` drops cached type resolutions
    /// first (after a schema change, a type may have changed).
    pub async fn table_schema(
        &mut self,
        rel: &Relation,
        forget_types: bool,
    ) -> Result<TableSchema, tokio_postgres::Error> {
        if forget_types {
            self.types.clear();
        }
        let oids: Vec<u32> = rel.columns.iter().map(|c| c.type_oid).collect();
        let mods: Vec<i32> = rel.columns.iter().map(|c| c.typmod).collect();
        let names: Vec<String> = self
            .client
            .query(
                "SELECT format_type(o, NULLIF(m, -1)) FROM unnest($1::oid[], $2::int4[]) WITH ORDINALITY AS u(o, m, i) ORDER BY i",
                &[&oids, &mods],
            )
            .await?
            .iter()
            .map(|r| r.get::<_, Option<String>>(0).unwrap_or_default())
            .collect();
        let mut columns = Vec::with_capacity(rel.columns.len());
        for (i, c) in rel.columns.iter().enumerate() {
            let resolved = self.resolve(c.type_oid, 0).await?;
            columns.push(ColumnSchema {
                name: c.name.clone(),
                type_name: names.get(i).cloned().unwrap_or_default(),
                type_oid: c.type_oid,
                typmod: c.typmod,
                key: c.key,
                base_oid: resolved.base_oid,
                element_oid: resolved.element_oid,
            });
        }
        Ok(TableSchema {
            table: TableName::new(rel.namespace.clone(), rel.name.clone()),
            columns,
        })
    }
}
