//! `cdc-status`: prints, per slot, the lease holder, the checkpoint and its age, the replication
//! lag (with `--database`), the backfill's progress, the pending hours and the oldest, the last
//! compaction, and the dead letters; as text or JSON. Exit status 0 when the status was read,
//! 1 when it could not be.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use cdc_contract::flags::{LogFormat, SharedFlags};
use cdc_verify::db::DbFlags;
use cdc_verify::status::{self, Status};
use compactor::ledger::DynamoLedger;

/// An operator's view of each slot of the pipeline.
#[derive(Parser)]
#[command(name = "cdc-status", version, about)]
struct Cli {
    /// Slots to report (comma-separated or repeated); default: every slot in the ledger.
    #[arg(long = "slot-name", env = "CDC_SLOT_NAME", value_delimiter = ',')]
    slots: Vec<String>,
    /// The ledger table (required), the bucket and base path (for the dead-letter count).
    #[command(flatten)]
    shared: SharedFlags,
    /// The notification dead-letter queue's URL (the stack output NotifyDeadLetterQueueUrl).
    #[arg(long = "notify-dlq-url", env = "NOTIFY_DLQ_URL")]
    notify_dlq_url: Option<String>,
    /// Database of the slots (given: each slot's state and lag on the server are reported).
    #[arg(long, env = "POSTGRES_DATABASE")]
    database: Option<String>,
    /// The database's host, port, role and TLS.
    #[command(flatten)]
    db: DbFlags,
    /// `text` or `json` (one object).
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn read(cli: &Cli) -> anyhow::Result<Status> {
    let shared = cli
        .shared
        .validate(Duration::from_secs(10), LogFormat::Text)
        .context("settings")?;
    let ledger_table = shared
        .ledger_table
        .clone()
        .context("LEDGER_TABLE (--ledger-table) is required")?;
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(shared.aws_timeouts())
        .load()
        .await;
    let dynamodb = aws_sdk_dynamodb::Client::new(&config);
    let ledger = DynamoLedger::new(dynamodb.clone(), ledger_table.clone());
    let table = cdc_contract::dynamo::Table::new(dynamodb, ledger_table.clone());
    let now = now_ms();
    let mut slots = status::read_slots(&ledger, &table, &cli.slots, now)
        .await
        .with_context(|| format!("reading the ledger {ledger_table}"))?;
    if let Some(database) = &cli.database {
        let client = cli.db.connect(database).await?;
        for slot in &mut slots {
            slot.replication = Some(
                status::replication_status(&client, &slot.slot)
                    .await
                    .with_context(|| format!("reading slot {} on the server", slot.slot))?,
            );
        }
    }
    let dead_letter_objects = match &shared.bucket {
        None => None,
        Some(bucket) => {
            let path_style = config.endpoint_url().is_some();
            let s3 = aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&config)
                    .force_path_style(path_style)
                    .build(),
            );
            let prefix = cdc_contract::layout::Layout::new(&shared.base_path).dead_letter_prefix();
            Some(
                count_objects(&s3, bucket, &prefix)
                    .await
                    .with_context(|| format!("listing s3://{bucket}/{prefix}"))?,
            )
        }
    };
    let notify_dead_letters = match &cli.notify_dlq_url {
        None => None,
        Some(url) => {
            let sqs = aws_sdk_sqs::Client::new(&config);
            let attrs = sqs
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(
                    aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages,
                )
                .send()
                .await
                .with_context(|| format!("reading the attributes of {url}"))?;
            attrs
                .attributes()
                .and_then(|a| {
                    a.get(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
                })
                .and_then(|v| v.parse().ok())
        }
    };
    Ok(Status {
        read_ms: now,
        slots,
        dead_letter_objects,
        notify_dead_letters,
    })
}

/// Objects under `prefix`, counted up to 10,000.
async fn count_objects(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> anyhow::Result<u64> {
    let mut count = 0u64;
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await?;
        count += page.contents().len() as u64;
        token = page.next_continuation_token().map(str::to_owned);
        if token.is_none() || count >= 10_000 {
            return Ok(count);
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = cli.shared.log_format_or(LogFormat::Text);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    match read(&cli).await {
        Ok(status) => {
            let out = if cli.output == "json" {
                serde_json::to_string(&status).unwrap_or_default()
            } else {
                status::render_text(&status)
            };
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{}", out.trim_end());
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "cdc-status failed");
            ExitCode::FAILURE
        }
    }
}
