//! The capture's configuration: one clap struct, every flag with its environment variable
//! (flags win), validated once at start-up with errors that name the setting.

use std::time::Duration;

use clap::Parser;
use secrecy::SecretString;

use cdc_contract::TableName;

use crate::tls::SslMode;

/// How a new slot starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SnapshotMode {
    /// A slot the capture creates starts with a consistent snapshot of the captured tables.
    Initial,
    /// Stream only changes committed after the slot was created.
    Never,
    /// Take the initial snapshot (as `initial`), then exit without streaming. The slot stays,
    /// so a later run in `initial` streams on from the snapshot without a gap (drop the slot if
    /// none will: it holds WAL back).
    #[value(name = "initial_only", alias = "initial-only")]
    InitialOnly,
}

/// Streams PostgreSQL logical replication into gzipped JSONL micro-batches on S3, recorded in a
/// DynamoDB ledger.
#[derive(Debug, Clone, Parser)]
#[command(name = "capture", version, about)]
pub struct Flags {
    /// What the compactor shares (bucket, base path, ledger table, close grace, attempt timeout,
    /// log format).
    #[command(flatten)]
    pub shared: cdc_contract::flags::SharedFlags,
    /// PostgreSQL host.
    #[arg(long, env = "POSTGRES_HOST", default_value = "localhost")]
    pub host: String,
    /// PostgreSQL port.
    #[arg(long, env = "POSTGRES_PORT", default_value_t = 5432)]
    pub port: u16,
    /// Database to capture.
    #[arg(long, env = "POSTGRES_DATABASE")]
    pub database: Option<String>,
    /// Role with the REPLICATION attribute.
    #[arg(long, env = "POSTGRES_USER")]
    pub username: Option<String>,
    /// Password (never printed).
    #[arg(long, env = "POSTGRES_PASSWORD", hide_env_values = true)]
    pub password: Option<SecretString>,
    /// TLS mode, as libpq's sslmode.
    #[arg(
        long,
        env = "PGSSLMODE",
        value_name = "PGSSLMODE",
        value_enum,
        default_value = "prefer"
    )]
    pub sslmode: SslMode,
    /// Send a cleartext or MD5 password when the server asks for one over a connection that
    /// is not encrypted (refused by default: anyone on the path could read or replay it).
    #[arg(long, env = "CDC_ALLOW_UNENCRYPTED_PASSWORD", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_unencrypted_password: bool,
    /// Root certificate (PEM) for verify-ca and verify-full; default: the system's roots.
    #[arg(long, env = "PGSSLROOTCERT", value_name = "PGSSLROOTCERT")]
    pub sslrootcert: Option<String>,
    /// Logical replication slot (one capture per slot).
    #[arg(long, env = "CDC_SLOT_NAME")]
    pub slot_name: Option<String>,
    /// Publication to stream.
    #[arg(long, env = "CDC_PUBLICATION", default_value = "cdc_publication")]
    pub publication: String,
    /// Tables to capture, comma-separated `schema.table`; default: every table of the publication.
    #[arg(long, env = "CDC_TABLES", value_delimiter = ',')]
    pub tables: Vec<String>,
    /// SQS queue URL the compactor listens on (optional: the compactor's sweep finds everything).
    #[arg(long, env = "NOTIFY_QUEUE_URL")]
    pub notify_queue_url: Option<String>,
    /// Flush when this many bytes of events are buffered.
    #[arg(long, env = "FLUSH_MAX_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub flush_max_bytes: usize,
    /// Flush when the oldest buffered change is this old (ms).
    #[arg(long, env = "FLUSH_INTERVAL_MS", default_value_t = 10_000)]
    pub flush_interval_ms: u64,
    /// While idle, record (and confirm) the position this often (ms).
    #[arg(long, env = "HEARTBEAT_INTERVAL_MS", default_value_t = 30_000)]
    pub heartbeat_interval_ms: u64,
    /// Lease duration (ms); renewed every third of it.
    #[arg(long, env = "LEASE_DURATION_MS", default_value_t = 30_000)]
    pub lease_duration_ms: u64,
    /// Also emit the flush metrics (rows, bytes) per table, with a `Table` dimension. Each
    /// distinct slot and table is a metric CloudWatch bills monthly.
    #[arg(long, env = "METRICS_PER_TABLE", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_per_table: bool,
    /// How a new slot starts.
    #[arg(long, env = "CDC_SNAPSHOT", value_enum, default_value = "initial")]
    pub snapshot: SnapshotMode,
    /// Bytes of rows one backfill chunk reads (in one short transaction), about.
    #[arg(long, env = "CDC_SNAPSHOT_CHUNK_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub snapshot_chunk_bytes: usize,
    /// Backfill a table when it is first seen (added to the publication or to `CDC_TABLES`
    /// after the slot was created), so it gets its history, not only its later changes.
    #[arg(long, env = "CDC_BACKFILL_NEW_TABLES", default_value_t = true, action = clap::ArgAction::Set)]
    pub backfill_new_tables: bool,
    /// When the slot is gone (dropped) or invalidated (`wal_status = lost`) while the ledger
    /// holds a checkpoint: create it again and take a new snapshot, keeping everything the ledger
    /// recorded (its batches, flush records, epoch and flush numbers). Without it the capture
    /// stops and says so.
    #[arg(long, env = "CDC_RECREATE_SLOT", default_value_t = false, action = clap::ArgAction::Set)]
    pub recreate_slot: bool,
    /// Create the slot as a failover slot (PostgreSQL 17+), and make an existing one so: a
    /// physical standby with `sync_replication_slots = on` keeps a copy, and after it is promoted
    /// the capture goes on from it. Pair it with `synchronized_standby_slots` on the primary.
    #[arg(long, env = "CDC_SLOT_FAILOVER", default_value_t = false, action = clap::ArgAction::Set)]
    pub slot_failover: bool,
    /// Print events to standard output; nothing goes to AWS; the ledger is a local file.
    #[arg(long, env = "LOCAL_TEST_MODE")]
    pub local_test_mode: bool,
    /// The local ledger file of LOCAL TEST MODE.
    #[arg(long, env = "LOCAL_LEDGER_FILE", default_value = "capture-ledger.json")]
    pub local_ledger_file: String,
    /// Read the server's WAL position at start and exit 0 once everything committed before it is
    /// recorded and notified.
    #[arg(long)]
    pub exit_when_caught_up: bool,
    /// Port of the `/healthz` endpoint (0: none).
    #[arg(long, env = "HEALTH_PORT", default_value_t = 8080)]
    pub health_port: u16,
    /// `healthcheck`: probe a running capture's `/healthz` and exit 0 when healthy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Probe `http://127.0.0.1:{HEALTH_PORT}/healthz`; exit 0 when healthy (the ECS health check).
    Healthcheck,
    /// Ask the running capture of `CDC_SLOT_NAME` to read a table again (op "r" rows, in
    /// chunks, while it streams): writes a request to the ledger, which the capture picks up
    /// within its heartbeat interval.
    RequestSnapshot {
        /// The table, as schema.table; `*` for every captured table.
        #[arg(long)]
        table: String,
    },
}

pub use cdc_contract::flags::LogFormat;

/// A setting that is missing or wrong.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {problem}")]
pub struct ConfigError {
    /// The setting, as flag and environment variable.
    pub setting: &'static str,
    /// What is wrong.
    pub problem: String,
}

fn bad(setting: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        problem: problem.into(),
    }
}

/// The validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The flags as given.
    pub flags: Flags,
    /// The shared settings, validated.
    pub shared: cdc_contract::flags::SharedSettings,
    /// Database name.
    pub database: String,
    /// Role.
    pub username: String,
    /// Slot.
    pub slot: String,
    /// Captured tables (empty: all of the publication).
    pub tables: Vec<TableName>,
    /// Where batches and the ledger go.
    pub target: Target,
}

/// Where the capture writes.
#[derive(Debug, Clone)]
pub enum Target {
    /// LOCAL TEST MODE: standard output and a local ledger file.
    Local {
        /// The ledger file.
        ledger_file: String,
    },
    /// S3, DynamoDB and (optionally) SQS.
    Aws {
        /// Bucket.
        bucket: String,
        /// Ledger table.
        ledger_table: String,
        /// Notification queue URL.
        queue_url: Option<String>,
    },
}

fn valid_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Flags {
    /// Validates the configuration.
    pub fn validate(self) -> Result<Settings, ConfigError> {
        let shared = self
            .shared
            .validate(Duration::from_secs(10), LogFormat::Text)
            .map_err(|e| bad(e.setting, e.problem))?;
        let database = self
            .database
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("--database / POSTGRES_DATABASE", "is required"))?;
        let username = self
            .username
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| bad("--username / POSTGRES_USER", "is required"))?;
        let slot = self
            .slot_name
            .clone()
            .ok_or_else(|| bad("--slot-name / CDC_SLOT_NAME", "is required"))?;
        if !valid_identifier(&slot) {
            return Err(bad(
                "--slot-name / CDC_SLOT_NAME",
                format!("{slot:?} is not a valid slot name (lower-case letters, digits and _, at most 63)"),
            ));
        }
        if self.publication.is_empty() {
            return Err(bad("CDC_PUBLICATION", "must not be empty"));
        }
        let tables = self
            .tables
            .iter()
            .filter(|t| !t.trim().is_empty())
            .map(|t| {
                t.parse::<TableName>()
                    .map_err(|e| bad("CDC_TABLES", e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Each buffered table-hour holds at least 1 KiB: below this, a flush per change.
        if self.flush_max_bytes < 65_536 {
            return Err(bad("FLUSH_MAX_BYTES", "must be at least 65536"));
        }
        if !(4096..=256 * 1024 * 1024).contains(&self.snapshot_chunk_bytes) {
            return Err(bad(
                "CDC_SNAPSHOT_CHUNK_BYTES",
                "must be between 4096 and 268435456",
            ));
        }
        if self.flush_interval_ms == 0 {
            return Err(bad("FLUSH_INTERVAL_MS", "must be positive"));
        }
        if self.lease_duration_ms < 3_000 {
            return Err(bad("LEASE_DURATION_MS", "must be at least 3000"));
        }
        if self.heartbeat_interval_ms < 100 {
            return Err(bad("HEARTBEAT_INTERVAL_MS", "must be at least 100"));
        }
        if let Some(path) = &self.sslrootcert {
            if !std::path::Path::new(path).is_file() {
                return Err(bad(
                    "PGSSLROOTCERT",
                    format!("{path} is not a readable file"),
                ));
            }
        }
        let target = if self.local_test_mode {
            Target::Local {
                ledger_file: self.local_ledger_file.clone(),
            }
        } else {
            let bucket = shared.bucket.clone().ok_or_else(|| {
                bad(
                    "--s3-bucket / S3_BUCKET_NAME",
                    "is required (or ask for --local-test-mode)",
                )
            })?;
            let ledger_table = shared
                .ledger_table
                .clone()
                .ok_or_else(|| bad("LEDGER_TABLE", "is required (or ask for --local-test-mode)"))?;
            Target::Aws {
                bucket,
                ledger_table,
                queue_url: self.notify_queue_url.clone().filter(|s| !s.is_empty()),
            }
        };
        Ok(Settings {
            database,
            username,
            slot,
            tables,
            target,
            flags: self,
            shared,
        })
    }
}

impl Settings {
    /// The flush interval.
    pub fn flush_interval(&self) -> Duration {
        Duration::from_millis(self.flags.flush_interval_ms)
    }

    /// The heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.flags.heartbeat_interval_ms)
    }

    /// The AWS SDK's timeouts: connecting, and each request attempt.
    pub fn aws_timeouts(&self) -> aws_config::timeout::TimeoutConfig {
        self.shared.aws_timeouts()
    }

    /// The lease duration.
    pub fn lease_duration(&self) -> Duration {
        Duration::from_millis(self.flags.lease_duration_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Flags {
        let mut all = vec!["capture"];
        all.extend_from_slice(args);
        Flags::try_parse_from(all).unwrap()
    }

    const BASE: [&str; 6] = ["--database", "app", "--username", "u", "--slot-name", "s1"];

    #[test]
    fn a_missing_bucket_is_an_error_unless_local_test_mode() {
        let err = parse(&BASE).validate().unwrap_err();
        assert!(err.setting.contains("S3_BUCKET_NAME"), "{err}");
        let mut local = BASE.to_vec();
        local.push("--local-test-mode");
        assert!(matches!(
            parse(&local).validate().unwrap().target,
            Target::Local { .. }
        ));
    }

    #[test]
    fn bad_settings_name_the_setting() {
        let mut args = BASE.to_vec();
        args.extend([
            "--s3-bucket",
            "b",
            "--ledger-table",
            "l",
            "--tables",
            "public.users,nodot",
        ]);
        assert_eq!(parse(&args).validate().unwrap_err().setting, "CDC_TABLES");
        let err = parse(&[
            "--database",
            "app",
            "--username",
            "u",
            "--slot-name",
            "Bad-Slot",
        ])
        .validate()
        .unwrap_err();
        assert!(err.setting.contains("CDC_SLOT_NAME"));
        let err = parse(&["--username", "u"]).validate().unwrap_err();
        assert!(err.setting.contains("POSTGRES_DATABASE"));
    }

    #[test]
    fn the_password_is_never_printed() {
        let mut args = BASE.to_vec();
        args.extend(["--password", "hunter2"]);
        let cfg = parse(&args);
        assert!(!format!("{cfg:?}").contains("hunter2"));
    }
}
