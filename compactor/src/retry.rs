//! Retrying transient failures, in one place: a few attempts with growing, jittered waits.

use std::future::Future;
use std::time::Duration;

use crate::ledger::LedgerError;
use crate::store::StoreError;

/// Errors that say whether retrying may succeed.
pub trait Transient: std::fmt::Display {
    /// True when retrying may succeed.
    fn is_transient(&self) -> bool;
}

impl Transient for StoreError {
    fn is_transient(&self) -> bool {
        StoreError::is_transient(self)
    }
}

impl Transient for LedgerError {
    fn is_transient(&self) -> bool {
        LedgerError::is_transient(self)
    }
}

/// Attempts before a transient error is given up on.
const ATTEMPTS: u32 = 5;

fn backoff(attempt: u32) -> Duration {
    if cfg!(test) {
        return Duration::from_millis(1);
    }
    let ms = 100u64 << (2 * attempt.min(4));
    let jitter = uuid::Uuid::new_v4().as_u128() as u64 % (ms / 2 + 1);
    Duration::from_millis(ms / 2 + jitter)
}

/// Runs `op` until it succeeds, fails definitely, or failed transiently [`ATTEMPTS`] times.
pub async fn retry<T, E, F, Fut>(what: &str, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt + 1 < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, what, "transient failure; retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn transient_errors_are_retried_and_definite_ones_are_not() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, StoreError> = retry("x", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            if n < 2 {
                Err(StoreError::Transient("busy".into()))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r, Ok(2));
        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, StoreError> = retry("x", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Definite("no".into()))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        calls.store(0, Ordering::SeqCst);
        let r: Result<u32, StoreError> = retry("x", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(StoreError::Transient("down".into()))
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), ATTEMPTS);
    }
}
