//! Step 2 of an hour: the claim. Renewing it while parts are written, and, after an attempt
//! whose claim lapsed, deleting the final files no recorded part names.

use super::*;

impl Claimed<'_> {
    /// Deletes final files that no recorded part names (never this attempt's): files of
    /// attempts that recorded nothing, and the last, unrecorded parts of attempts that died
    /// after recording others.
    pub(super) async fn remove_unrecorded_files(&mut self) -> Result<(), HourError> {
        let recorded: HashSet<&str> = self
            .parts
            .iter()
            .flat_map(|p| p.files.iter().map(|f| f.key.as_str()))
            .collect();
        let mut stale = Vec::new();
        for format in &self.c.config.formats {
            let prefix = format!(
                "{}/",
                self.c.layout.hour_prefix(&self.table, *format, self.hour)
            );
            let keys = retry("list hour prefix", || self.c.store.list(&prefix)).await?;
            stale.extend(keys.into_iter().filter(|k| {
                attempt_of(k).is_some_and(|a| a != self.attempt) && !recorded.contains(k.as_str())
            }));
        }
        if !stale.is_empty() {
            tracing::info!(
                slot = %self.slot.slot, table = %self.table, hour = %self.hour,
                files = stale.len(), "removing files of an attempt that recorded nothing"
            );
            retry("delete stale files", || self.c.store.delete(&stale)).await?;
            self.report.stale_files_removed += stale.len();
        }
        Ok(())
    }

    /// Keeps the claim alive during long parts.
    pub(super) async fn renew_if_due(&mut self) -> Result<(), HourError> {
        let now = now_ms();
        let ttl = self.c.config.hour_claim.as_millis() as i64;
        if now - self.last_renew_ms < ttl / 3 {
            return Ok(());
        }
        let until = now + ttl;
        let ours = retry("renew claim", || {
            self.c
                .ledger
                .renew_claim(&self.slot.slot, &self.record, until)
        })
        .await?;
        if !ours {
            return Err(HourError::ClaimLost);
        }
        self.record.claim_until_ms = until;
        self.last_renew_ms = now;
        Ok(())
    }
}
