//! A TCP proxy in front of PostgreSQL that can delay the server's replication stream: once armed,
//! the next connection that sends `START_REPLICATION` gets the server's CopyBothResponse at once
//! and every later byte only after a hold, as when the server first decodes a large transaction
//! (or the network stalls) right after a reconnect.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy.
pub struct PgProxy {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    armed: Arc<Mutex<Option<Duration>>>,
    held: Arc<Mutex<u32>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PgProxy {
    /// Starts a proxy to `127.0.0.1:{upstream_port}`.
    pub async fn start(upstream_port: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let armed: Arc<Mutex<Option<Duration>>> = Arc::new(Mutex::new(None));
        let held = Arc::new(Mutex::new(0u32));
        let (a, h) = (armed.clone(), held.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (armed, held) = (a.clone(), h.clone());
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)).await {
                        let _ = pipe(client, server, armed, held).await;
                    }
                });
            }
        });
        Ok(Self {
            port,
            armed,
            held,
            task,
        })
    }

    /// The next replication stream started through the proxy is held for `hold` after the
    /// server's CopyBothResponse.
    pub fn hold_next_stream(&self, hold: Duration) {
        if let Ok(mut a) = self.armed.lock() {
            *a = Some(hold);
        }
    }

    /// How many streams were held so far.
    pub fn streams_held(&self) -> u32 {
        self.held.lock().map(|h| *h).unwrap_or(0)
    }
}

/// Per connection: what the client side saw, for the server side to act on.
#[derive(Default)]
struct Shared {
    /// A START_REPLICATION was sent and a hold was armed for it.
    hold: Option<Duration>,
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    armed: Arc<Mutex<Option<Duration>>>,
    held: Arc<Mutex<u32>>,
) -> anyhow::Result<()> {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let shared = Arc::new(Mutex::new(Shared::default()));

    let s = shared.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut tail: Vec<u8> = Vec::new();
        loop {
            let n = client_rd.read(&mut buf).await?;
            if n == 0 {
                server_wr.shutdown().await.ok();
                return Ok::<_, anyhow::Error>(());
            }
            // Look for the command across read boundaries (keep the last bytes of the previous read).
            tail.extend_from_slice(&buf[..n]);
            if find(&tail, b"START_REPLICATION") {
                let hold = armed.lock().ok().and_then(|mut a| a.take());
                if let (Some(hold), Ok(mut sh)) = (hold, s.lock()) {
                    sh.hold = Some(hold);
                }
                tail.clear();
            } else if tail.len() > 32 {
                tail.drain(..tail.len() - 32);
            }
            server_wr.write_all(&buf[..n]).await?;
        }
    };

    let downstream = async move {
        // Frames the server's messages (type byte, 4-byte length) so the hold starts right after
        // the CopyBothResponse ('W').
        let mut pending: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut holding = false;
        loop {
            let n = server_rd.read(&mut buf).await?;
            if n == 0 {
                client_wr.shutdown().await.ok();
                return Ok::<_, anyhow::Error>(());
            }
            pending.extend_from_slice(&buf[..n]);
            let mut start = 0;
            while pending.len() - start >= 5 {
                // The startup phase's single-byte SSL answer never happens here (sslmode=disable).
                let len = u32::from_be_bytes([
                    pending[start + 1],
                    pending[start + 2],
                    pending[start + 3],
                    pending[start + 4],
                ]) as usize;
                let end = start + 1 + len;
                if pending.len() < end {
                    break;
                }
                let kind = pending[start];
                client_wr.write_all(&pending[start..end]).await?;
                start = end;
                if kind == b'W' && !holding {
                    let hold = shared.lock().ok().and_then(|mut sh| sh.hold.take());
                    if let Some(hold) = hold {
                        holding = true;
                        if let Ok(mut h) = held.lock() {
                            *h += 1;
                        }
                        client_wr.flush().await?;
                        tokio::time::sleep(hold).await;
                    }
                }
            }
            pending.drain(..start);
        }
    };

    let _ = tokio::join!(upstream, downstream);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
