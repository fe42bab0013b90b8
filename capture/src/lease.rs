//! The slot's lease: one capture writes per slot. Taken before anything is read, renewed every
//! third of its duration, given up on a clean stop; a refused renewal stops the run.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::ledger::{Ledger, LedgerError};
use crate::pipeline::CaptureError;
use crate::retry::{retry, Policy};

/// A held lease and its renewal.
pub struct Lease {
    /// This task's owner id.
    pub owner: String,
    /// The lease's epoch: every write under it is conditioned on it.
    pub epoch: u64,
    /// Cancelled when a renewal is refused (or fails for longer than the lease lasts).
    pub lost: CancellationToken,
    duration: Duration,
    renewal: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Waits while another live task holds the lease, then takes it. None when shutdown was
    /// asked for first.
    pub async fn acquire(
        ledger: Arc<dyn Ledger>,
        slot: &str,
        duration: Duration,
        health: &Health,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, CaptureError> {
        let owner = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
        let lease_ms = duration.as_millis() as i64;
        let epoch = loop {
            match ledger.acquire_lease(&owner, lease_ms).await {
                Ok(epoch) => break epoch,
                Err(LedgerError::Held {
                    owner: holder,
                    expires_ms,
                }) => {
                    let wait = (expires_ms - chrono::Utc::now().timestamp_millis())
                        .clamp(500, lease_ms / 3);
                    tracing::warn!(slot, holder = %holder, retry_in_ms = wait, "slot is leased by another capture; waiting for it to stop or expire");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "taking the lease failed; retrying");
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled() => return Ok(None),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
                Err(e) => return Err(e.into()),
            }
        };
        tracing::info!(slot, owner = %owner, epoch, "lease taken");
        health.set_lease(true);
        let lost = CancellationToken::new();
        let renewal = tokio::spawn(renew(
            ledger,
            owner.clone(),
            epoch,
            duration,
            lost.clone(),
            shutdown.child_token(),
        ));
        Ok(Some(Lease {
            owner,
            epoch,
            lost,
            duration,
            renewal,
        }))
    }

    /// Proves this task still holds the lease right before it drops or creates the slot: a task
    /// whose lease lapsed during slow start-up steps (retries) must not touch a successor's slot.
    pub async fn fence(&self, ledger: &dyn Ledger) -> Result<(), CaptureError> {
        let lease_ms = self.duration.as_millis() as i64;
        match retry(
            "renewing the lease",
            None,
            Policy::Attempts(40),
            None,
            LedgerError::is_transient,
            || ledger.renew_lease(&self.owner, self.epoch, lease_ms),
        )
        .await
        {
            Ok(()) => Ok(()),
            Err(e @ LedgerError::Transient(_)) => Err(e.into()),
            Err(e) => Err(CaptureError::LeaseLost(e.to_string())),
        }
    }

    /// Stops renewing; gives the lease up unless the run ended because it was lost.
    pub async fn end(
        self,
        ledger: &dyn Ledger,
        health: &Health,
        result: &Result<crate::pipeline::Stopped, CaptureError>,
    ) {
        self.renewal.abort();
        health.set_streaming(false);
        health.set_lease(false);
        if !matches!(result, Err(CaptureError::LeaseLost(_))) {
            if let Err(error) = ledger.release_lease(&self.owner, self.epoch).await {
                tracing::warn!(error = %error, "releasing the lease failed; a successor waits for its expiry");
            }
        }
    }
}

async fn renew(
    ledger: Arc<dyn Ledger>,
    owner: String,
    epoch: u64,
    duration: Duration,
    lost: CancellationToken,
    stop: CancellationToken,
) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(duration / 3) => {}
        }
        match ledger
            .renew_lease(&owner, epoch, duration.as_millis() as i64)
            .await
        {
            Ok(()) => last_ok = Instant::now(),
            Err(e) if e.is_transient() && last_ok.elapsed() < duration => {
                tracing::warn!(error = %e, "lease renewal failed; retrying");
            }
            Err(e) => {
                tracing::error!(error = %e, epoch, "lease lost");
                lost.cancel();
                return;
            }
        }
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "capture".into())
}
