//! The database flags `cdc-verify` and `cdc-status` share, and their connection.

use std::time::Duration;

use anyhow::Context;
use secrecy::SecretString;

use capture::replication::ConnectParams;
use capture::tls::SslMode;

/// Where the database is and how to log in (the capture's variables).
#[derive(Debug, Clone, clap::Args)]
pub struct DbFlags {
    /// PostgreSQL host.
    #[arg(long, env = "POSTGRES_HOST", default_value = "localhost")]
    pub host: String,
    /// PostgreSQL port.
    #[arg(long, env = "POSTGRES_PORT", default_value_t = 5432)]
    pub port: u16,
    /// Role.
    #[arg(long, env = "POSTGRES_USER", default_value = "postgres")]
    pub username: String,
    /// Password.
    #[arg(long, env = "POSTGRES_PASSWORD", hide_env_values = true)]
    pub password: Option<SecretString>,
    /// libpq's sslmode.
    #[arg(long, env = "PGSSLMODE", value_enum, default_value = "prefer")]
    pub sslmode: SslMode,
    /// PEM root certificates for verify-ca / verify-full.
    #[arg(long, env = "PGSSLROOTCERT")]
    pub sslrootcert: Option<String>,
    /// Send a cleartext or MD5 password over a connection that is not encrypted.
    #[arg(long, env = "CDC_ALLOW_UNENCRYPTED_PASSWORD", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_unencrypted_password: bool,
}

impl DbFlags {
    /// A SQL connection to `database`.
    pub async fn connect(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        let tls = capture::tls::client_config(self.sslmode, self.sslrootcert.as_deref())
            .context("TLS configuration")?;
        let params = ConnectParams {
            host: self.host.clone(),
            port: self.port,
            user: self.username.clone(),
            password: self.password.clone(),
            database: database.to_owned(),
            ssl_mode: self.sslmode,
            tls,
            connect_timeout: Duration::from_secs(30),
            allow_unencrypted_password: self.allow_unencrypted_password,
        };
        capture::catalog::connect(&params)
            .await
            .with_context(|| format!("connecting to {}:{}/{database}", self.host, self.port))
    }
}
