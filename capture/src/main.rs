//! `capture`: configuration, clients, signals; the work is in the library.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use capture::config::{Command, Flags, LogFormat, Settings, Target};
use capture::health::Health;
use capture::ledger::{DynamoLedger, LocalLedger};
use capture::notify::{NoNotifier, Notifier, SqsNotifier};
use capture::pipeline::{self, Deps, Stopped};
use capture::sink::{S3Sink, StdoutSink};

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,aws_config=warn,aws_smithy_runtime=warn")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

async fn deps(settings: &Settings) -> anyhow::Result<Deps> {
    match &settings.target {
        Target::Local { ledger_file } => Ok(Deps {
            ledger: Arc::new(LocalLedger::new(ledger_file)),
            sink: Arc::new(StdoutSink),
            notifier: Arc::new(NoNotifier),
            metrics: None,
            health: Health::new(),
        }),
        Target::Aws {
            bucket,
            ledger_table,
            queue_url,
        } => {
            let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
                .timeout_config(settings.aws_timeouts())
                .load()
                .await;
            // Emulators (moto, LocalStack) serve buckets by path, not by virtual host.
            let path_style = config.endpoint_url().is_some();
            let s3 = aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&config)
                    .force_path_style(path_style)
                    .build(),
            );
            let sink = S3Sink::new(s3, bucket.clone());
            sink.check()
                .await
                .with_context(|| format!("S3_BUCKET_NAME: cannot use bucket {bucket}"))?;
            let ledger = DynamoLedger::new(
                aws_sdk_dynamodb::Client::new(&config),
                ledger_table.clone(),
                settings.slot.clone(),
            );
            ledger
                .check()
                .await
                .with_context(|| format!("LEDGER_TABLE: cannot use table {ledger_table}"))?;
            let notifier: Arc<dyn Notifier> = match queue_url {
                Some(url) => Arc::new(SqsNotifier::new(
                    aws_sdk_sqs::Client::new(&config),
                    url.clone(),
                )),
                None => Arc::new(NoNotifier),
            };
            Ok(Deps {
                ledger: Arc::new(ledger),
                sink: Arc::new(sink),
                notifier,
                metrics: Some(Arc::new(|line: String| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                })),
                health: Health::new(),
            })
        }
    }
}

fn shutdown_on_signals(token: CancellationToken) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: recording buffered changes, then stopping"),
            _ = int.recv() => tracing::info!("SIGINT: recording buffered changes, then stopping"),
        }
        token.cancel();
    });
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let config = Flags::parse();
    if let Some(Command::Healthcheck) = config.command {
        return if capture::health::probe(config.health_port).await {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    init_tracing(config.shared.log_format_or(LogFormat::Text));
    let settings = match config.validate() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(setting = e.setting, "configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::RequestSnapshot { table }) = &settings.flags.command {
        return match request_snapshot(&settings, table).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "request-snapshot failed");
                ExitCode::FAILURE
            }
        };
    }
    match run(settings).await {
        Ok(stopped) => {
            tracing::info!(?stopped, peak_rss_kib = peak_rss_kib(), "capture stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "capture failed");
            ExitCode::FAILURE
        }
    }
}

/// Peak resident memory of this process (VmHWM), for the stop log line and benchmarks.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `capture request-snapshot --table T`: writes the request the running capture picks up.
async fn request_snapshot(settings: &Settings, table: &str) -> anyhow::Result<()> {
    use cdc_contract::ledger::BackfillRequest;
    let which = match table.trim() {
        "*" => BackfillRequest::All,
        name => BackfillRequest::Table(
            name.parse::<cdc_contract::TableName>()
                .context("--table: expected schema.table or *")?,
        ),
    };
    let deps = deps(settings).await?;
    let sk = cdc_contract::ledger::backfill_request_sk(&which, capture::slot::request_id());
    deps.ledger
        .put_backfill_request(&sk)
        .await
        .context("writing the backfill request to the ledger")?;
    tracing::info!(slot = %settings.slot, request = %sk, "backfill requested: the running capture reads it within its heartbeat interval");
    Ok(())
}

async fn run(settings: Settings) -> anyhow::Result<Stopped> {
    let deps = deps(&settings).await?;
    let token = CancellationToken::new();
    shutdown_on_signals(token.clone())?;
    if settings.flags.health_port != 0 {
        let port = settings.flags.health_port;
        let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("HEALTH_PORT: cannot listen on port {port}"))?;
        tokio::spawn(capture::health::serve(
            listener,
            deps.health.clone(),
            token.child_token(),
        ));
    }
    let stopped = pipeline::run(settings, deps, token)
        .await
        .context("capture")?;
    Ok(stopped)
}
