//! The test bed every integration test uses: throwaway PostgreSQL clusters ([`postgres`]), the
//! AWS emulator and per-test AWS resources ([`aws`]), and the workspace's binaries ([`bins`]).
//!
//! Tests run unchanged against LocalStack and the compose PostgreSQL: set `AWS_ENDPOINT_URL` to
//! the emulator and the cluster helpers still start their own throwaway servers (they need only
//! PostgreSQL's server binaries).

pub mod aws;
pub mod bins;
pub mod capture;
pub mod endpoint;
pub mod faultproxy;
pub mod pgproxy;
pub mod postgres;
pub mod staging;

/// A name unique to this test process and call, for databases, slots, buckets, tables, queues.
pub fn unique_name(prefix: &str) -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}{}", &id[..12])
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(
    what: &str,
    timeout: std::time::Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
