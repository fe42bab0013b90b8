//! Step 4 of an hour: the consumed batches' staging objects tagged for expiry, their items
//! marked compacted.

use super::*;

impl Compactor {
    /// Tags a consumed batch's staging object for expiry, then marks its item compacted.
    pub(super) async fn consume(
        &self,
        slot: &str,
        batch: &BatchItem,
        expires_at: i64,
    ) -> Result<(), HourError> {
        retry("tag staging object", || {
            self.store.tag(&batch.key, &[("compacted", "true")])
        })
        .await?;
        retry("mark batch compacted", || {
            self.ledger.mark_compacted(slot, batch, expires_at)
        })
        .await?;
        // After the item says compacted: the flush record may expire once all its hours are.
        retry("note flush hour compacted", || {
            self.ledger.flush_hour_done(slot, batch, expires_at)
        })
        .await?;
        Ok(())
    }
}
