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

/// A small xorshift generator for randomized schedules: reproducible from the seed it logs.
pub struct Rng(u64);

impl Rng {
    /// Seeded with `seed` (a zero seed is made odd: xorshift never leaves 0).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// Seeded from `FAULT_TEST_SEED` when set (to replay a logged seed), else from the clock;
    /// the seed goes to stderr.
    pub fn from_time() -> Self {
        let seed = std::env::var("FAULT_TEST_SEED")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0x9E37_79B9)
            })
            | 1;
        eprintln!("random seed {seed} (FAULT_TEST_SEED={seed} replays it)");
        Rng(seed)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
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
