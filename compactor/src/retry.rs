//! Retrying transient failures: a few attempts with growing, jittered waits, through the
//! helper both binaries share.

use std::future::Future;

/// Errors that say whether retrying may succeed.
pub trait Transient: std::fmt::Display {
    /// True when retrying may succeed.
    fn is_transient(&self) -> bool;
}

impl Transient for cdc_contract::aws::AwsError {
    fn is_transient(&self) -> bool {
        cdc_contract::aws::AwsError::is_transient(self)
    }
}

/// Attempts before a transient error is given up on.
const ATTEMPTS: u32 = 5;

/// Runs `op` until it succeeds, fails definitely, or failed transiently [`ATTEMPTS`] times (the
/// shared helper, [`cdc_contract::retry`], with the compactor's policy: an invocation gives up
/// and the hour is retried by the next one).
pub async fn retry<T, E, F, Fut>(what: &str, op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    cdc_contract::retry::retry(
        what,
        None,
        cdc_contract::retry::Policy::Attempts(ATTEMPTS - 1),
        None,
        |e: &E| e.is_transient(),
        op,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
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
