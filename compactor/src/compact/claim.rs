//! Step 2 of an hour: the claim. Taking it, renewing it while parts are written, and, after an
//! attempt whose claim lapsed, deleting the final files no recorded part names; then releasing
//! it, or giving it up after a failure.

use std::collections::HashSet;

use cdc_contract::ledger::{HourRecord, PartItem};
use cdc_contract::{Hour, TableName};

use super::finish::EarlyConsumption;
use super::{new_attempt_id, Deps, HourError, HourJob, HourReport, HourState};
use crate::ledger::Claim;
use crate::manifest::attempt_of;
use crate::now_ms;
use crate::retry::retry;

/// The state of a claimed hour.
pub(super) struct Claimed<'a> {
    pub(super) deps: Deps<'a>,
    pub(super) slot: &'a str,
    pub(super) table: TableName,
    pub(super) hour: Hour,
    pub(super) record: HourRecord,
    pub(super) parts: Vec<PartItem>,
    pub(super) attempt: String,
    pub(super) last_renew_ms: i64,
    pub(super) report: HourReport,
    /// Flushes consumed beside the writing, as recorded parts pass them.
    pub(super) early: Option<EarlyConsumption>,
}

/// What the hour record says is left to clean up after earlier attempts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cleanup {
    /// A claim was taken and never released: an attempt died.
    unreleased: bool,
    /// A cleanup after a lapsed attempt is to be checked again, and that time has come.
    recheck_due: bool,
}

impl Cleanup {
    /// What `record` leaves to clean up at `now`.
    pub(super) fn of(record: &HourRecord, now: i64) -> Self {
        Cleanup {
            unreleased: record.version > 0 && record.claim_until_ms != 0,
            // A cleanup after a lapsed attempt is checked again once that attempt can no
            // longer complete an upload (issue 15, item 11).
            recheck_due: record.recheck_after_ms != 0 && now >= record.recheck_after_ms,
        }
    }

    /// True when the hour's files are to be listed for files no part names.
    pub(super) fn is_due(self) -> bool {
        self.unreleased || self.recheck_due
    }
}

/// Claims the hour of `job`, read as `record` at `now`; `None` when it is busy (a live claim
/// holds it, or it changed since it was read).
pub(super) async fn claim<'a>(
    deps: Deps<'a>,
    slot: &'a str,
    job: &HourJob,
    record: &HourRecord,
    now: i64,
) -> Result<Option<Claimed<'a>>, HourError> {
    if record.claim_until_ms >= now {
        tracing::info!(slot = %slot, table = %job.table, hour = %job.hour, attempt = %record.claim_attempt, "hour is being compacted by another attempt");
        return Ok(None);
    }
    let attempt = new_attempt_id();
    let claimed = HourRecord {
        version: record.version + 1,
        claim_attempt: attempt.clone(),
        claim_until_ms: now + deps.claim_ms,
        updated_ms: now,
        ..record.clone()
    };
    let claim = retry("claim hour", || {
        deps.ledger.claim_hour(slot, record.version, &claimed, now)
    })
    .await?;
    let Claim::Claimed(claimed) = claim else {
        return Ok(None);
    };
    let parts = retry("get parts", || {
        deps.ledger.parts(slot, &job.table, job.hour)
    })
    .await?;
    Ok(Some(Claimed {
        deps,
        slot,
        table: job.table.clone(),
        hour: job.hour,
        record: claimed,
        parts,
        attempt,
        last_renew_ms: now,
        report: HourReport::new(slot, job, HourState::Done),
        early: None,
    }))
}

impl Claimed<'_> {
    /// After a lapsed claim: deletes the files no recorded part names, rewrites the manifests
    /// and sets when to look again.
    pub(super) async fn clean_up(&mut self, cleanup: Cleanup) -> Result<(), HourError> {
        self.remove_unrecorded_files().await?;
        self.write_manifests().await?;
        // After a lapsed attempt, list again once it can no longer upload; a recheck that found
        // the hour clean ends it.
        let window = self.deps.straggler_window_ms;
        self.record.recheck_after_ms = if cleanup.unreleased && window > 0 {
            now_ms() + window
        } else {
            0
        };
        Ok(())
    }

    /// Deletes final files that no recorded part names (never this attempt's): files of
    /// attempts that recorded nothing, and the last, unrecorded parts of attempts that died
    /// after recording others.
    async fn remove_unrecorded_files(&mut self) -> Result<(), HourError> {
        let recorded: HashSet<&str> = self
            .parts
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.key.as_str()))
            .collect();
        let mut stale = Vec::new();
        for format in self.deps.formats {
            let prefix = format!(
                "{}/",
                self.deps
                    .layout
                    .hour_prefix(&self.table, *format, self.hour)
            );
            let keys = retry("list hour prefix", || self.deps.store.list(&prefix)).await?;
            stale.extend(keys.into_iter().filter(|k| {
                attempt_of(k).is_some_and(|a| a != self.attempt) && !recorded.contains(k.as_str())
            }));
        }
        if !stale.is_empty() {
            tracing::info!(
                slot = %self.slot, table = %self.table, hour = %self.hour,
                files = stale.len(), "removing files of an attempt that recorded nothing"
            );
            retry("delete stale files", || self.deps.store.delete(&stale)).await?;
            self.report.stale_files_removed += stale.len();
        }
        Ok(())
    }

    /// Keeps the claim alive during long parts.
    pub(super) async fn renew_if_due(&mut self) -> Result<(), HourError> {
        let now = now_ms();
        let ttl = self.deps.claim_ms;
        if now - self.last_renew_ms < ttl / 3 {
            return Ok(());
        }
        let until = now + ttl;
        let ours = retry("renew claim", || {
            self.deps.ledger.renew_claim(self.slot, &self.record, until)
        })
        .await?;
        if !ours {
            return Err(HourError::ClaimLost);
        }
        self.record.claim_until_ms = until;
        self.last_renew_ms = now;
        Ok(())
    }

    /// Ends the claim once steps 2 and 3 ran: releases it when they succeeded, handing back the
    /// record and the report; after a failure gives it up and returns the error.
    pub(super) async fn end(
        self,
        result: Result<(), HourError>,
    ) -> Result<(HourRecord, HourReport), HourError> {
        match result {
            Ok(()) => {
                retry("release hour", || {
                    self.deps.ledger.release_hour(self.slot, &self.record)
                })
                .await?;
                Ok((self.record, self.report))
            }
            Err(e) => {
                // Leave the claim lapsed but not released: the next run then removes any file
                // this attempt left unrecorded.
                if !matches!(e, HourError::ClaimLost) {
                    if let Err(error) = self
                        .deps
                        .ledger
                        .renew_claim(self.slot, &self.record, 1)
                        .await
                    {
                        tracing::warn!(error = %error, "could not give the hour's claim up; it lapses by itself");
                    }
                }
                Err(e)
            }
        }
    }
}
