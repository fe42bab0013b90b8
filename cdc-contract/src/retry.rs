//! The one retry helper of both binaries: a call retried while it fails transiently, with
//! jittered exponential backoff, forever or for a number of attempts.

use std::cell::RefCell;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// How long to keep retrying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Until the call succeeds or fails definitely (a flush: it either completes or stops the
    /// capture; it never confirms early).
    Forever,
    /// At most this many retries after the first attempt.
    Attempts(u32),
}

thread_local! {
    static JITTER: RefCell<rand::rngs::StdRng> = RefCell::new(rand::rngs::StdRng::from_os_rng());
}

/// Seeds this thread's backoff jitter, so a single-threaded run (the simulation) is reproducible.
pub fn seed_jitter(seed: u64) {
    JITTER.with(|rng| *rng.borrow_mut() = rand::rngs::StdRng::seed_from_u64(seed));
}

/// The wait before retry number `attempt` of an AWS call: 100–200 ms doubling to 5–10 s, jittered.
pub fn backoff(attempt: u32) -> Duration {
    let ms = 200u64.saturating_mul(1 << attempt.min(6)).min(10_000);
    let jitter = JITTER.with(|rng| rng.borrow_mut().random_range(0..=ms / 2));
    Duration::from_millis(ms / 2 + jitter)
}

/// Runs `call` until it succeeds, fails definitely (`transient` says no), or the policy's
/// attempts are spent; logs each retry as "{what} failed; retrying" (with `subject`, the key or
/// id it is about, when given). `retries` counts the retries, if given.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    subject: Option<&str>,
    policy: Policy,
    retries: Option<&AtomicU64>,
    transient: impl Fn(&E) -> bool,
    mut call: F,
) -> Result<T, E>
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 0u32;
    loop {
        match call().await {
            Err(e)
                if transient(&e)
                    && match policy {
                        Policy::Forever => true,
                        Policy::Attempts(n) => attempt < n,
                    } =>
            {
                let wait = backoff(attempt);
                tracing::warn!(error = %e, subject, attempt, retry_in_ms = wait.as_millis() as u64, "{what} failed; retrying");
                if let Some(count) = retries {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bounded_retry_gives_up_after_its_attempts() {
        let calls = std::cell::Cell::new(0);
        let count = AtomicU64::new(0);
        let out: Result<(), String> = retry(
            "x",
            None,
            Policy::Attempts(3),
            Some(&count),
            |_| true,
            || {
                calls.set(calls.get() + 1);
                async { Err("down".to_owned()) }
            },
        )
        .await;
        assert!(out.is_err());
        assert_eq!(calls.get(), 4, "the first attempt and three retries");
        assert_eq!(count.load(Ordering::Relaxed), 3);
        let calls = std::cell::Cell::new(0);
        let out: Result<(), String> = retry(
            "x",
            None,
            Policy::Forever,
            None,
            |e: &String| e != "definite",
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    Err(if n < 50 {
                        "down".to_owned()
                    } else {
                        "definite".to_owned()
                    })
                }
            },
        )
        .await;
        assert_eq!(out, Err("definite".to_owned()));
        assert_eq!(
            calls.get(),
            50,
            "forever retries transient errors until a definite one"
        );
    }

    #[test]
    fn seeded_jitter_repeats_and_stays_in_bounds() {
        seed_jitter(7);
        let a: Vec<Duration> = (0..10).map(backoff).collect();
        seed_jitter(7);
        let b: Vec<Duration> = (0..10).map(backoff).collect();
        assert_eq!(a, b);
        for (i, d) in a.iter().enumerate() {
            let ms = 200u64.saturating_mul(1 << (i as u32).min(6)).min(10_000);
            assert!(
                d.as_millis() as u64 >= ms / 2 && d.as_millis() as u64 <= ms,
                "{i}: {d:?}"
            );
        }
    }
}
