//! The compactor: rolls the capture's staging micro-batches of each table and UTC hour into
//! final, hour-partitioned JSONL.gz and Parquet parts, exactly once, driven by the ledger.
//!
//! [`Compactor::sweep`] compacts every closed pending hour of every slot the ledger holds (or
//! the one `CDC_SLOT_NAME` names); [`Compactor::handle`] answers a Lambda event (SQS
//! notifications, the scheduled sweep, direct invokes) with it. Compacting one hour is
//! [`compact`]; what the compactor needs from S3 and DynamoDB are the [`store::ObjectStore`] and
//! [`ledger::Ledger`] seams, implemented over the AWS SDK.

pub mod allocator;
pub mod avro;
pub mod background_gzip;
pub mod background_zstd;
pub mod catalog;
pub mod columns;
pub mod compact;
pub mod config;
pub mod convert;
pub mod dead_letter;
pub mod dictionary;
pub mod envelope;
pub mod handler;
pub mod ledger;
pub mod manifest;
pub mod metrics;
pub mod parquet_schema;
pub mod part;
pub mod plan;
pub mod retry;
pub mod store;
pub mod upload;
pub mod views;

use std::sync::Arc;

use futures::StreamExt;
use serde::Serialize;

use cdc_contract::layout::Layout;
use cdc_contract::metrics as names;
use cdc_contract::{Hour, Position, TableName};

pub use compact::{HourError, HourJob, HourReport, HourState};
pub use config::Settings;

use crate::compact::SchemaCache;
use crate::dead_letter::DeadLetterNotifier;
use crate::ledger::{Ledger, LedgerError};
use crate::plan::SlotRun;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How long consumed batch items live on after compaction (their TTL), in seconds.
pub const BATCH_TTL_SECONDS: i64 = 7 * 24 * 3600;

/// The compactor: configuration, the S3 and ledger seams, and caches shared by its runs.
pub struct Compactor {
    pub(crate) config: Settings,
    pub(crate) layout: Layout,
    pub(crate) store: Arc<dyn store::ObjectStore>,
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) notifier: Option<Arc<dyn DeadLetterNotifier>>,
    pub(crate) batch_ttl_seconds: i64,
    pub(crate) schemas: SchemaCache,
    pub(crate) catalog: Option<catalog::CatalogKeeper>,
}

/// What a sweep is asked to do.
#[derive(Debug, Clone, Default)]
pub struct SweepRequest {
    /// Compact open hours too.
    pub include_open: bool,
    /// Also compact this table-hour, closed or not (a direct `compact` invoke).
    pub only: Option<(TableName, Hour)>,
    /// Limit the sweep to this slot (on top of `CDC_SLOT_NAME`).
    pub slot: Option<String>,
    /// Stop by this time (see [`HourJob::stop_at`]): hours not begun by then stay pending.
    pub stop_at: Option<std::time::Instant>,
}

/// A slot the sweep could not serve, or an hour that failed.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// The slot.
    pub slot: String,
    /// `schema.table`, when an hour failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// The hour, when an hour failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hour: Option<String>,
    /// The error.
    pub error: String,
    /// True when a later run may succeed without anyone acting.
    pub transient: bool,
}

/// What a sweep did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// Slots served.
    pub slots: Vec<String>,
    /// Hours looked at, with what was done.
    pub hours: Vec<HourReport>,
    /// Closed hours still pending after the run (failed, busy or waiting).
    pub pending_closed_hours: usize,
    /// Seconds since the end of the oldest of them (0 when none).
    pub oldest_pending_age_seconds: u64,
    /// Catalog tables created or updated.
    pub catalog_updates: usize,
    /// Catalog updates that failed (compaction went on; the next compaction tries again).
    pub catalog_failures: usize,
    /// Failures.
    pub failures: Vec<Failure>,
}

impl SweepReport {
    /// Changes written by the sweep.
    pub fn rows(&self) -> u64 {
        self.hours.iter().map(|h| h.rows).sum()
    }
}

impl Compactor {
    /// A compactor over the given seams.
    pub fn new(
        config: Settings,
        store: Arc<dyn store::ObjectStore>,
        ledger: Arc<dyn Ledger>,
        notifier: Option<Arc<dyn DeadLetterNotifier>>,
    ) -> Self {
        Compactor {
            layout: Layout::new(&config.base_path).with_jsonl_compression(config.jsonl_compression),
            config,
            store,
            ledger,
            notifier,
            batch_ttl_seconds: BATCH_TTL_SECONDS,
            schemas: SchemaCache::default(),
            catalog: None,
        }
    }

    /// The same compactor keeping catalog tables in `catalog`.
    pub fn with_catalog(mut self, catalog: Arc<dyn catalog::Catalog>) -> Self {
        self.catalog = Some(catalog::CatalogKeeper::new(catalog, &self.config.bucket));
        self
    }

    /// A compactor over the AWS SDK's clients for `sdk` (S3 path-style when an endpoint such as
    /// an emulator is configured).
    pub fn from_sdk(config: Settings, sdk: &aws_config::SdkConfig) -> Self {
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(sdk)
                .force_path_style(sdk.endpoint_url().is_some())
                .build(),
        );
        let dynamodb = aws_sdk_dynamodb::Client::new(sdk);
        let notifier: Option<Arc<dyn DeadLetterNotifier>> =
            config.dead_letter_queue_url.as_ref().map(|url| {
                Arc::new(dead_letter::SqsNotifier::new(
                    aws_sdk_sqs::Client::new(sdk),
                    url.clone(),
                )) as Arc<dyn DeadLetterNotifier>
            });
        let store = Arc::new(store::S3Store::new(s3, config.bucket.clone()));
        let ledger = Arc::new(ledger::DynamoLedger::new(
            dynamodb,
            config.ledger_table.clone(),
        ));
        let glue = config.glue_database.as_ref().map(|db| {
            Arc::new(catalog::GlueCatalog::new(
                aws_sdk_glue::Client::new(sdk),
                db,
            ))
        });
        let compactor = Compactor::new(config, store, ledger, notifier);
        match glue {
            Some(g) => compactor.with_catalog(g),
            None => compactor,
        }
    }

    /// Checks at start-up that the bucket can be reached.
    pub async fn check(&self) -> Result<(), store::StoreError> {
        retry::retry("check bucket", || self.store.check()).await
    }

    /// The configuration.
    pub fn config(&self) -> &Settings {
        &self.config
    }

    /// The S3 layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The schema version of `table`'s last compacted part (over the slots served), with its
    /// Parquet layout.
    pub async fn latest_schema(
        &self,
        table: &TableName,
    ) -> Result<Option<(String, Arc<parquet_schema::PartSchema>)>, HourError> {
        let slots = match &self.config.slot {
            Some(s) => vec![s.clone()],
            None => retry::retry("list slots", || self.ledger.slots()).await?,
        };
        let mut latest: Option<(Position, String, String)> = None;
        for slot in slots {
            let records = retry::retry("list hour records", || {
                self.ledger.hour_records(&slot, table)
            })
            .await?;
            let Some(record) = records.iter().rev().find(|r| r.next_part > 0) else {
                continue;
            };
            let parts = retry::retry("list parts", || {
                self.ledger.parts(&slot, table, record.hour)
            })
            .await?;
            if let Some(part) = parts.last() {
                if latest.as_ref().is_none_or(|(p, _, _)| part.last > *p) {
                    latest = Some((part.last, slot.clone(), part.schema_id.clone()));
                }
            }
        }
        let Some((_, slot, schema_id)) = latest else {
            return Ok(None);
        };
        let schema = self
            .schemas
            .get(&*self.ledger, &slot, table, &schema_id)
            .await?;
        Ok(Some((schema_id, schema)))
    }

    /// Compacts every closed pending hour of every slot served (and what `req` adds). Fails
    /// only when the slots cannot be listed; slot and hour failures are in the report.
    pub async fn sweep(&self, req: &SweepRequest) -> Result<SweepReport, LedgerError> {
        let slots = match (&self.config.slot, &req.slot) {
            (Some(only), Some(asked)) if only != asked => Vec::new(),
            (Some(only), _) => vec![only.clone()],
            (None, Some(asked)) => vec![asked.clone()],
            (None, None) => retry::retry("list slots", || self.ledger.slots()).await?,
        };
        let mut report = SweepReport {
            slots: slots.clone(),
            ..Default::default()
        };
        for slot in slots {
            if let Err(e) = self.sweep_slot(&slot, req, &mut report).await {
                tracing::error!(slot = %slot, error = %e, "could not read the slot's pending hours");
                report.failures.push(Failure {
                    slot: slot.clone(),
                    table: None,
                    hour: None,
                    error: e.to_string(),
                    transient: e.is_transient(),
                });
            }
        }
        Ok(report)
    }

    async fn sweep_slot(
        &self,
        slot: &str,
        req: &SweepRequest,
        report: &mut SweepReport,
    ) -> Result<(), LedgerError> {
        let Some(checkpoint) =
            retry::retry("get checkpoint", || self.ledger.checkpoint(slot)).await?
        else {
            tracing::info!(slot, "slot has no checkpoint yet; nothing to compact");
            return Ok(());
        };
        let first_open = plan::first_open_hour(&checkpoint, self.config.close_grace);
        let every_open = req.include_open || self.config.open_hour_every.is_some();
        let markers = retry::retry("list pending hours", || {
            self.ledger
                .pending_hours(slot, (!every_open).then_some(first_open))
        })
        .await?;
        let mut jobs: Vec<HourJob> = Vec::with_capacity(markers.len());
        for m in markers {
            if m.hour >= first_open && !req.include_open && !self.open_hour_due(slot, &m).await {
                continue;
            }
            jobs.push(HourJob {
                table: m.table.clone(),
                hour: m.hour,
                marker: Some(m),
                stop_at: req.stop_at,
            });
        }
        if let Some((table, hour)) = &req.only {
            if !jobs.iter().any(|j| j.table == *table && j.hour == *hour) {
                // The marker, if any, is read so the hour can be cleared once done.
                let marker = retry::retry("list pending hours", || {
                    self.ledger.pending_hours(slot, None)
                })
                .await?
                .into_iter()
                .find(|m| m.table == *table && m.hour == *hour);
                jobs.push(HourJob {
                    table: table.clone(),
                    hour: *hour,
                    marker,
                    stop_at: req.stop_at,
                });
            }
        }
        let snapshot = retry::retry("get snapshot state", || self.ledger.snapshot(slot)).await?;
        let run = SlotRun::new(slot, checkpoint).with_snapshot(snapshot);
        let run = &run;
        let results: Vec<(HourJob, Result<HourReport, HourError>)> =
            futures::stream::iter(jobs.into_iter().map(|job| async move {
                if job.stop_at.is_some_and(|t| std::time::Instant::now() >= t) {
                    // Too close to the deadline to take an hour on: the next run does it.
                    let report = HourReport::new(&run.slot, &job, HourState::Pending);
                    return (job, Ok(report));
                }
                let r = self.compact_hour(run, &job).await;
                (job, r)
            }))
            .buffer_unordered(self.config.concurrency)
            .collect()
            .await;
        let mut pending = 0usize;
        let mut oldest: Option<Hour> = None;
        for (job, result) in &results {
            let closed = job.hour < first_open;
            match result {
                Ok(hour) => {
                    if closed && hour.state != HourState::Done {
                        pending += 1;
                        oldest = Some(oldest.map_or(job.hour, |o| o.min(job.hour)));
                    }
                    report.hours.push(hour.clone());
                }
                Err(e) => {
                    if closed {
                        pending += 1;
                        oldest = Some(oldest.map_or(job.hour, |o| o.min(job.hour)));
                    }
                    tracing::error!(slot, table = %job.table, hour = %job.hour, error = %e, transient = e.is_transient(), "hour compaction failed");
                    report.failures.push(Failure {
                        slot: slot.to_owned(),
                        table: Some(job.table.to_string()),
                        hour: Some(job.hour.to_string()),
                        error: e.to_string(),
                        transient: e.is_transient(),
                    });
                }
            }
        }
        report.pending_closed_hours += pending;
        let age = oldest.map_or(0, |h| ((now_ms() - h.end_millis()).max(0) / 1000) as u64);
        report.oldest_pending_age_seconds = report.oldest_pending_age_seconds.max(age);
        metrics::emit(
            slot,
            &[
                (names::PENDING_HOURS, pending as f64),
                (names::OLDEST_PENDING_HOUR_AGE, age as f64),
            ],
        );
        // Past the invocation's stop time, the catalog waits for the next run (its tables are
        // brought up to date by the table's next compaction or the retry of failed updates).
        if req.stop_at.is_none_or(|t| std::time::Instant::now() < t) {
            self.update_catalog(slot, &results, report).await;
        }
        Ok(())
    }

    /// True when an open hour is due for compaction under `OPEN_HOUR_COMPACT_MINUTES`: that
    /// long has passed since the later of the hour's start and its last compaction.
    /// An hour record that cannot be read makes the hour not due (it is tried again by the next
    /// sweep), never the whole sweep fail.
    async fn open_hour_due(&self, slot: &str, marker: &cdc_contract::ledger::PendingHour) -> bool {
        let Some(every) = self.config.open_hour_every else {
            return false;
        };
        let record = match retry::retry("get hour record", || {
            self.ledger.hour_record(slot, &marker.table, marker.hour)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(slot, table = %marker.table, hour = %marker.hour, error = %e, "could not read an open hour's record; it waits for the next sweep");
                return false;
            }
        };
        let last = record.map_or(0, |r| r.updated_ms);
        let since = last.max(marker.hour.start_millis());
        // The last compaction ended a little after the sweep that ran it began, so a sweep on a
        // schedule whose period divides the interval would find the hour just short of due and
        // leave it for one more period: a fifth of the interval (at most a minute) early counts.
        let every_ms = every.as_millis() as i64;
        let slack = (every_ms / 5).min(60_000);
        now_ms() - since >= every_ms - slack
    }

    /// Brings the catalog tables of the tables these hours wrote Parquet parts for up to date.
    /// Failures are logged and counted, never returned: compaction does not wait on the catalog.
    async fn update_catalog(
        &self,
        slot: &str,
        results: &[(HourJob, Result<HourReport, HourError>)],
        report: &mut SweepReport,
    ) {
        let Some(keeper) = &self.catalog else {
            return;
        };
        if !self
            .config
            .formats
            .contains(&cdc_contract::layout::Format::Parquet)
        {
            return;
        }
        let mut failures = 0usize;
        for w in keeper.take_failed().await {
            match keeper.ensure(&w).await {
                Ok(_) => report.catalog_updates += 1,
                Err(error) => {
                    failures += 1;
                    tracing::warn!(slot, table = %w.table, error = %error, "catalog table update failed again");
                }
            }
        }
        for (job, result) in results {
            let Ok(HourReport {
                latest_part: Some((schema_id, position)),
                ..
            }) = result
            else {
                continue;
            };
            let written = match self
                .schemas
                .get(&*self.ledger, slot, &job.table, schema_id)
                .await
            {
                Ok(schema) => Ok(catalog::Written {
                    table: job.table.clone(),
                    prefix: self
                        .layout
                        .table_prefix(&job.table, cdc_contract::layout::Format::Parquet),
                    schema_id: schema_id.clone(),
                    schema,
                    position: *position,
                    hour: job.hour,
                }),
                Err(e) => Err(e.to_string()),
            };
            let outcome = match &written {
                Ok(w) => keeper.ensure(w).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.clone()),
            };
            match outcome {
                Ok(true) => report.catalog_updates += 1,
                Ok(false) => {}
                Err(error) => {
                    failures += 1;
                    tracing::warn!(slot, table = %job.table, error = %error, "catalog table update failed; the next compaction of the table tries again");
                }
            }
        }
        if failures > 0 {
            report.catalog_failures += failures;
            metrics::emit(slot, &[(names::CATALOG_UPDATE_FAILURES, failures as f64)]);
        }
    }
}
