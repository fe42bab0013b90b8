//! The compactor binary: under Lambda it serves the runtime; from a shell, `compactor invoke
//! --event FILE` answers one event and `compactor sweep [--include-open]` compacts what is there.

use std::io::Read;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use lambda_runtime::{service_fn, LambdaEvent};
use serde_json::Value;
use tracing::Instrument;

use compactor::config::{Flags, LogFormat, Settings};
use compactor::views::{self, Dialect};
use compactor::{Compactor, SweepRequest};

/// Rolls staging micro-batches into hour-partitioned final JSONL.gz and Parquet files.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    flags: Flags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one handler call on an event (SQS, sweep or compact JSON) and prints the answer
    /// as the last line of standard output.
    Invoke {
        /// The event file, or `-` for standard input.
        #[arg(long)]
        event: String,
    },
    /// Compacts every closed pending hour (and open ones with --include-open).
    Sweep {
        /// Compact open hours too.
        #[arg(long)]
        include_open: bool,
    },
    /// Prints the SQL of a table's current-state view (latest change per key, deletes removed)
    /// from the schema version of its last compacted part.
    View {
        /// The table, `schema.table`.
        #[arg(long)]
        table: String,
        /// `athena` (Trino) or `duckdb`.
        #[arg(long, default_value = "duckdb")]
        dialect: String,
        /// DuckDB: the table's Parquet prefix to read (a local directory or an `s3://` URL);
        /// by default the bucket's.
        #[arg(long)]
        root: Option<String>,
        /// The view's name (default `{schema}__{table}_current`, in the Glue database for
        /// Athena).
        #[arg(long)]
        name: Option<String>,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

async fn compactor(config: Settings) -> anyhow::Result<Compactor> {
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(cdc_contract::flags::aws_timeouts(
            config.aws_attempt_timeout,
        ))
        .load()
        .await;
    let c = Compactor::from_sdk(config, &sdk);
    c.check().await.context("start-up check")?;
    Ok(c)
}

fn read_event(path: &str) -> anyhow::Result<Value> {
    let text = if path == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the event from standard input")?;
        s
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading the event file {path}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("the event in {path} is not JSON"))
}

fn main() -> anyhow::Result<()> {
    // Before the runtime's threads start (see the module).
    let tuned = compactor::allocator::tune();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(tuned))
}

async fn run(allocator_tuned: bool) -> anyhow::Result<()> {
    let cli = Cli::parse();
    let under_lambda = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let config = cli
        .flags
        .validate(under_lambda && cli.command.is_none())
        .context("configuration")?;
    init_logs(config.log_format);
    if !allocator_tuned {
        tracing::warn!("the allocator refused its settings; peak memory may grow with the hour");
    }

    match cli.command {
        Some(Command::Invoke { event }) => {
            let event = read_event(&event)?;
            let c = compactor(config).await?;
            let answer = c.handle(event).await.context("handler call failed")?;
            println!("{answer}");
            Ok(())
        }
        Some(Command::Sweep { include_open }) => {
            let c = compactor(config).await?;
            let report = c
                .sweep(&SweepRequest {
                    include_open,
                    ..Default::default()
                })
                .await
                .context("sweep failed")?;
            println!("{}", serde_json::to_string(&report)?);
            if !report.failures.is_empty() {
                bail!("{} hour(s) or slot(s) failed", report.failures.len());
            }
            Ok(())
        }
        Some(Command::View {
            table,
            dialect,
            root,
            name,
        }) => {
            let table: cdc_contract::TableName = table.parse().context("--table")?;
            let dialect: Dialect = dialect.parse().map_err(anyhow::Error::msg)?;
            let c = compactor(config).await?;
            let Some((schema_id, schema)) = c
                .latest_schema(&table)
                .await
                .context("reading the table's schema versions from the ledger")?
            else {
                bail!("{table} has no compacted part yet: nothing to build a view from");
            };
            let catalog_name = compactor::catalog::table_name(&table);
            let config = c.config();
            let (view, source) = match dialect {
                Dialect::Athena => {
                    let db = config
                        .glue_database
                        .as_deref()
                        .context("the Athena view reads the catalog table: set GLUE_DATABASE")?;
                    let view = name.unwrap_or_else(|| format!("{catalog_name}_current"));
                    (
                        format!("{}.{}", views::ident(db), views::ident(&view)),
                        format!("{}.{}", views::ident(db), views::ident(&catalog_name)),
                    )
                }
                Dialect::DuckDb => {
                    let root = root.unwrap_or_else(|| {
                        format!(
                            "s3://{}/{}",
                            config.bucket,
                            c.layout()
                                .table_prefix(&table, cdc_contract::layout::Format::Parquet)
                        )
                    });
                    let view = name.unwrap_or_else(|| format!("{catalog_name}_current"));
                    (views::ident(&view), views::duckdb_source(&root))
                }
            };
            let sql = views::current_state_sql(&table, &schema, dialect, &view, &source)
                .with_context(|| {
                    format!("{table} has no key columns (schema version {schema_id}): no view")
                })?;
            println!("{sql}");
            Ok(())
        }
        None if under_lambda => {
            let margin = config.deadline_margin;
            let c = Arc::new(compactor(config).await?);
            lambda_runtime::run(service_fn(move |event: LambdaEvent<Value>| {
                let c = c.clone();
                async move {
                    let request_id = event.context.request_id.clone();
                    let span = tracing::info_span!("invocation", request_id = %request_id);
                    let stop_at = stop_at(event.context.deadline, margin);
                    c.handle_until(event.payload, stop_at)
                        .instrument(span)
                        .await
                        .map_err(|e| {
                            tracing::error!(error = %e, transient = e.is_transient(), "invocation failed");
                            lambda_runtime::Error::from(e.to_string())
                        })
                }
            }))
            .await
            .map_err(|e| anyhow::anyhow!("lambda runtime: {e}"))
        }
        None => bail!(
            "no command: run `compactor invoke --event FILE` or `compactor sweep`, or start it \
             under a Lambda runtime (AWS_LAMBDA_RUNTIME_API)"
        ),
    }
}

/// When an invocation stops writing: `margin` before its deadline (ms since the epoch), but
/// never more than a quarter of the time it has (a short timeout still gets work done), as an
/// instant of this process's clock. None without a usable deadline (absent, or not in the future:
/// some local emulators send a duration there).
fn stop_at(deadline_ms: u64, margin: std::time::Duration) -> Option<std::time::Instant> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    if deadline_ms <= now_ms {
        tracing::debug!(
            deadline_ms,
            "no usable invocation deadline: writing is not cut short"
        );
        return None;
    }
    let left = std::time::Duration::from_millis(deadline_ms - now_ms);
    Some(std::time::Instant::now() + left.saturating_sub(margin.min(left / 4)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    fn in_s(s: u64) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            + s * 1000
    }

    #[test]
    fn writing_stops_the_margin_before_the_deadline_or_a_quarter_of_the_time_left() {
        let margin = Duration::from_secs(60);
        let near = |deadline: u64, expected_s: u64| {
            let at = stop_at(deadline, margin).expect("a deadline");
            let ahead = at.saturating_duration_since(Instant::now()).as_secs_f64();
            assert!(
                (ahead - expected_s as f64).abs() < 2.0,
                "{ahead} vs {expected_s}"
            );
        };
        near(in_s(300), 240);
        near(in_s(100), 75);
        // A deadline that is not in the future (an emulator's duration) is not used.
        assert!(stop_at(600_000, margin).is_none());
        assert!(stop_at(0, margin).is_none());
    }
}
