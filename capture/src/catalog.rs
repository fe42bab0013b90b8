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

/// Opens an ordinary SQL connection with the same TLS and session settings as replication.
pub async fn connect(params: &ConnectParams) -> Result<Client, tokio_postgres::Error> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&params.host)
        .port(params.port)
        .user(&params.user)
        .dbname(&params.database)
        .application_name("pg-cdc-s3-capture")
        .connect_timeout(params.connect_timeout)
        .options(
            "-c TimeZone=UTC -c DateStyle=ISO -c IntervalStyle=iso_8601 -c extra_float_digits=3",
        );
    if let Some(p) = &params.password {
        cfg.password(p.expose_secret());
    }
    match &params.tls {
        None => {
            let (client, conn) = cfg.connect(tokio_postgres::NoTls).await?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::warn!(error = %error, "sql connection ended");
                }
            });
            Ok(client)
        }
        Some(tls) => {
            cfg.ssl_mode(if params.ssl_mode.requires_tls() {
                tokio_postgres::config::SslMode::Require
            } else {
                tokio_postgres::config::SslMode::Prefer
            });
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
            let (client, conn) = cfg.connect(connector).await?;
            tokio::spawn(async move {
                if let Err(error) = conn.await {
                    tracing::warn!(error = %error, "sql connection ended");
                }
            });
            Ok(client)
        }
    }
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

    /// The server's current WAL write position.
    pub async fn current_wal_lsn(&self) -> Result<Lsn, tokio_postgres::Error> {
        let row = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        let text: String = row.get(0);
        Ok(text.parse().unwrap_or(Lsn::ZERO))
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
