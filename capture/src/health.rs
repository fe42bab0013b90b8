//! `/healthz` for the ECS health check, and the `capture healthcheck` probe that calls it (the
//! runtime image has no curl).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What `/healthz` reports.
#[derive(Debug, Default)]
pub struct Health {
    streaming: AtomicBool,
    lease: AtomicBool,
    last_recorded_ms: AtomicI64,
    /// At start-up, while the database is unreachable or refuses the login: why. The task is
    /// then healthy (alive, retrying; a new task would fare no better), so a first deployment
    /// completes before the database is set up, and the CaptureDown alarm says what is wrong.
    waiting_for_database: std::sync::Mutex<Option<String>>,
}

impl Health {
    /// A shared, initially unhealthy state.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The replication stream is up (true) or broken (false).
    pub fn set_streaming(&self, up: bool) {
        self.streaming.store(up, Ordering::Relaxed);
    }

    /// The lease is held (true) or lost (false).
    pub fn set_lease(&self, held: bool) {
        self.lease.store(held, Ordering::Relaxed);
    }

    /// A flush or heartbeat was recorded now.
    pub fn recorded(&self, at_ms: i64) {
        self.last_recorded_ms.store(at_ms, Ordering::Relaxed);
    }

    /// Start-up is waiting for the database (`Some(reason)`), or no longer (`None`).
    pub fn set_waiting_for_database(&self, reason: Option<String>) {
        if let Ok(mut w) = self.waiting_for_database.lock() {
            *w = reason;
        }
    }

    fn waiting(&self) -> Option<String> {
        self.waiting_for_database
            .lock()
            .ok()
            .and_then(|w| w.clone())
    }

    /// True when streaming under the lease (snapshot chunks are read while streaming), or
    /// waiting at start-up for the database.
    pub fn healthy(&self) -> bool {
        let lease = self.lease.load(Ordering::Relaxed);
        (lease && self.streaming.load(Ordering::Relaxed)) || self.waiting().is_some()
    }

    fn body(&self) -> String {
        serde_json::json!({
            "healthy": self.healthy(),
            "streaming": self.streaming.load(Ordering::Relaxed),
            "lease": self.lease.load(Ordering::Relaxed),
            "last_recorded_ms": self.last_recorded_ms.load(Ordering::Relaxed),
            "waiting_for_database": self.waiting(),
        })
        .to_string()
    }
}

/// Serves `GET /healthz` on `listener` until `stop`: 200 when healthy, 503 otherwise.
pub async fn serve(listener: TcpListener, health: Arc<Health>, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            c = listener.accept() => c,
        };
        let Ok((mut stream, _)) = conn else { continue };
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if request.starts_with("GET /healthz") {
                if health.healthy() {
                    ("200 OK", health.body())
                } else {
                    ("503 Service Unavailable", health.body())
                }
            } else {
                ("404 Not Found", "{}".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// `capture healthcheck`: true when `GET http://127.0.0.1:{port}/healthz` answers 200.
pub async fn probe(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Ok(true))
    )
}
