//! `cdc-verify`: checks tables end to end after an incident. Exit status 0 when every table
//! verifies, 1 when anything was found, 2 when a table could not be verified at all.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use capture::catalog::Catalog;
use cdc_contract::flags::{LogFormat, SharedFlags};
use cdc_contract::layout::Layout;
use cdc_contract::TableName;
use cdc_verify::db::DbFlags;
use cdc_verify::files::{check_table, Options, Sources};
use cdc_verify::{replay, rows, Report};
use compactor::ledger::DynamoLedger;
use compactor::store::{ObjectStore, S3Store};

/// Checks that a table's final files hold every recorded change exactly once, in order, and
/// (with --compare-rows) that replaying them gives the table's current rows.
#[derive(Parser)]
#[command(name = "cdc-verify", version, about)]
struct Cli {
    /// Tables to check (`schema.table`, comma-separated or repeated).
    #[arg(
        long = "table",
        env = "CDC_TABLES",
        value_delimiter = ',',
        required = true
    )]
    tables: Vec<String>,
    /// The replication slot whose ledger records to read.
    #[arg(long = "slot-name", env = "CDC_SLOT_NAME")]
    slot: String,
    /// The bucket, base path and ledger table, as the capture and the compactor take them.
    #[command(flatten)]
    shared: SharedFlags,
    /// Also read recorded batches not compacted yet, from staging.
    #[arg(long)]
    include_staging: bool,
    /// Replay the events per key and compare with the table's current rows (stop writes first,
    /// and let the capture catch up and the compactor run, or pass --include-staging).
    #[arg(long)]
    compare_rows: bool,
    /// Database (for --compare-rows).
    #[arg(long, env = "POSTGRES_DATABASE", default_value = "postgres")]
    database: String,
    /// The database's host, port, role and TLS (for --compare-rows).
    #[command(flatten)]
    db: DbFlags,
    /// `text` (a short report) or `json` (one object per table, one per line).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

async fn catalog(cli: &Cli) -> anyhow::Result<Catalog> {
    let client = cli.db.connect(&cli.database).await?;
    Ok(Catalog::new(client))
}

async fn verify(
    cli: &Cli,
    sources: &Sources<'_>,
    catalog: Option<&mut Catalog>,
    table: &TableName,
) -> anyhow::Result<Report> {
    let opts = Options {
        include_staging: cli.include_staging,
    };
    let checked = check_table(sources, &cli.slot, table, &opts).await?;
    let mut report = checked.report;
    if let Some(catalog) = catalog {
        if !checked.complete_events {
            report.note("some parts have no JSONL file (OUTPUT_FORMATS): rows are not compared");
        } else {
            let replayed = replay::replay(&checked.events, &checked.key_columns);
            if replayed.unknown_keys > 0 {
                report.note(format!(
                    "{} update(s) or delete(s) address rows no earlier change created (expected after --snapshot never)",
                    replayed.unknown_keys
                ));
            }
            let actual = rows::table_rows(catalog, table, &checked.key_columns).await?;
            rows::compare(&replayed.state, &actual, &mut report);
        }
    }
    Ok(report)
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let tables: Vec<TableName> = cli
        .tables
        .iter()
        .map(|t| {
            t.trim()
                .parse()
                .with_context(|| format!("--table {t:?}: expected schema.table"))
        })
        .collect::<anyhow::Result<_>>()?;
    let shared = cli
        .shared
        .validate(Duration::from_secs(30), LogFormat::Text)
        .context("settings")?;
    let bucket = shared
        .bucket
        .as_deref()
        .context("S3_BUCKET_NAME (--s3-bucket): required")?;
    let ledger_table = shared
        .ledger_table
        .as_deref()
        .context("LEDGER_TABLE (--ledger-table): required")?;
    let sdk = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(shared.aws_timeouts())
        .load()
        .await;
    // Emulators (moto, LocalStack) serve buckets by path, not by virtual host.
    let s3 = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(sdk.endpoint_url().is_some())
            .build(),
    );
    let store = S3Store::new(s3, bucket);
    store
        .check()
        .await
        .with_context(|| format!("S3_BUCKET_NAME: bucket {bucket}"))?;
    let ledger = DynamoLedger::new(aws_sdk_dynamodb::Client::new(&sdk), ledger_table);
    ledger
        .check()
        .await
        .with_context(|| format!("LEDGER_TABLE: table {ledger_table}"))?;
    let layout = Layout::new(shared.base_path.trim());
    let sources = Sources {
        store: &store,
        ledger: &ledger,
        layout: &layout,
    };
    let mut catalog = if cli.compare_rows {
        Some(catalog(&cli).await?)
    } else {
        None
    };
    let mut all_ok = true;
    for table in &tables {
        tracing::info!(%table, slot = %cli.slot, "verifying");
        let report = verify(&cli, &sources, catalog.as_mut(), table)
            .await
            .with_context(|| format!("verifying {table}"))?;
        all_ok &= report.ok();
        if cli.output == "json" {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.text());
        }
    }
    Ok(all_ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "verification could not run");
            ExitCode::from(2)
        }
    }
}
