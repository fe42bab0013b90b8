//! A fault-injecting HTTP proxy in front of the AWS emulator: for a share of requests it answers
//! 503 or a throttling error without forwarding, drops the connection without forwarding, or
//! forwards and then drops the connection (the reply is lost after the call took effect), or
//! forwards and holds the reply longer than the client waits.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward as is.
    None,
    /// Answer 503 Service Unavailable without forwarding.
    Unavailable,
    /// Answer a throttling error without forwarding (400 for DynamoDB's JSON protocol, 503
    /// SlowDown otherwise).
    Throttle,
    /// Forward, then close the connection without sending the reply.
    LoseReply,
    /// Close the connection without forwarding (a dropped connection).
    Drop,
    /// Answer S3 calls 404 NoSuchBucket (a bucket deleted under the pipeline); DynamoDB and SQS
    /// calls pass.
    NoSuchBucket,
    /// Forward, then hold the reply for [`SLOW_REPLY`], beyond the clients' attempt timeout in
    /// the tests that use it, before sending it.
    Slow,
}

/// How long a [`Fault::Slow`] reply is held.
pub const SLOW_REPLY: Duration = Duration::from_secs(4);

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct FaultStats {
    /// Requests seen.
    pub requests: AtomicU64,
    /// Faults injected.
    pub faults: AtomicU64,
    /// A fault applied to every request, over the cycle ([`FaultProxy::force`]).
    forced: std::sync::Mutex<Option<Fault>>,
    /// Requests seen by operation ([`operation`]).
    operations: std::sync::Mutex<BTreeMap<String, u64>>,
}

/// A running proxy.
pub struct FaultProxy {
    /// `http://127.0.0.1:{port}`.
    pub endpoint: String,
    /// What it did.
    pub stats: Arc<FaultStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`) injecting, on every `every`-th request,
    /// the faults of `cycle` in turn.
    pub async fn start(upstream: &str, every: u64, cycle: Vec<Fault>) -> anyhow::Result<Self> {
        let upstream = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let endpoint = format!("http://{}", listener.local_addr()?);
        let stats = Arc::new(FaultStats::default());
        let cycle = Arc::new(cycle);
        let s = stats.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let stats = s.clone();
                let cycle = cycle.clone();
                tokio::spawn(async move {
                    let _ = serve(client, &upstream, every, &cycle, &stats).await;
                });
            }
        });
        Ok(Self {
            endpoint,
            stats,
            task,
        })
    }

    /// Applies `fault` to every request from now on (None: back to the cycle).
    pub fn force(&self, fault: Option<Fault>) {
        if let Ok(mut f) = self.stats.forced.lock() {
            *f = fault;
        }
    }

    /// Faults injected so far.
    pub fn faults(&self) -> u64 {
        self.stats.faults.load(Ordering::Relaxed)
    }

    /// Requests seen so far by operation: `dynamodb:UpdateItem`, `s3:PUT?tagging`, `s3:GET`...
    pub fn operations(&self) -> BTreeMap<String, u64> {
        self.stats
            .operations
            .lock()
            .map(|o| o.clone())
            .unwrap_or_default()
    }
}

/// The operation a request head names: `dynamodb:` or `sqs:` and the target's operation for
/// the JSON protocols, the `Action` of a query protocol, else `s3:` and the method with the
/// sub-resource the query names (`?tagging`, `?uploads`...), if any.
fn operation(head: &str) -> String {
    let target = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("x-amz-target")
            .then(|| value.trim())
    });
    if let Some((service, op)) = target.and_then(|t| t.split_once('.')) {
        let service = if service.starts_with("DynamoDB") {
            "dynamodb"
        } else if service == "AmazonSQS" {
            "sqs"
        } else {
            service
        };
        return format!("{service}:{op}");
    }
    let mut words = head.split_whitespace();
    let method = words.next().unwrap_or("");
    let query = words
        .next()
        .and_then(|path| path.split_once('?'))
        .map(|(_, q)| q)
        .unwrap_or("");
    if let Some(action) = query.split('&').find_map(|kv| kv.strip_prefix("Action=")) {
        return action.to_owned();
    }
    match query
        .split('&')
        .find(|kv| !kv.contains('=') && !kv.is_empty())
    {
        Some(sub) => format!("s3:{method}?{sub}"),
        None => format!("s3:{method}"),
    }
}

async fn read_request(
    reader: &mut BufReader<TcpStream>,
) -> anyhow::Result<Option<(String, Vec<u8>)>> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await? == 0 {
            return Ok(None);
        }
        let end = line == "\r\n";
        head.push_str(&line);
        if end {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        body.resize(len, 0);
        reader.read_exact(&mut body).await?;
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).await?;
            body.extend_from_slice(size_line.as_bytes());
            let size =
                usize::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16)?;
            if size == 0 {
                // Trailers until an empty line.
                loop {
                    let mut t = String::new();
                    reader.read_line(&mut t).await?;
                    body.extend_from_slice(t.as_bytes());
                    if t == "\r\n" || t.is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await?;
            body.extend_from_slice(&chunk);
        }
    }
    Ok(Some((head, body)))
}

async fn serve(
    client: TcpStream,
    upstream: &str,
    every: u64,
    cycle: &[Fault],
    stats: &FaultStats,
) -> anyhow::Result<()> {
    let mut reader = BufReader::new(client);
    while let Some((head, body)) = read_request(&mut reader).await? {
        let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut ops) = stats.operations.lock() {
            *ops.entry(operation(&head)).or_default() += 1;
        }
        let forced = stats.forced.lock().ok().and_then(|f| *f);
        let fault = if let Some(f) = forced {
            f
        } else if every > 0 && n.is_multiple_of(every) && !cycle.is_empty() {
            cycle[((n / every) as usize) % cycle.len()]
        } else {
            Fault::None
        };
        let lower = head.to_ascii_lowercase();
        let dynamo = lower.contains("x-amz-target: dynamodb");
        let s3 = !lower.contains("x-amz-target:") && !lower.contains("action=");
        let fault = if fault == Fault::NoSuchBucket && !s3 {
            Fault::None
        } else {
            fault
        };
        if fault != Fault::None {
            stats.faults.fetch_add(1, Ordering::Relaxed);
        }
        match fault {
            Fault::Unavailable => {
                let body = "service unavailable (injected)";
                let resp = format!(
                    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                reader.get_mut().write_all(resp.as_bytes()).await?;
                continue;
            }
            Fault::Throttle => {
                let resp = if dynamo {
                    let body = r#"{"__type":"com.amazonaws.dynamodb.v20120810#ThrottlingException","message":"injected"}"#;
                    format!(
                        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    let body = "<Error><Code>SlowDown</Code><Message>injected</Message></Error>";
                    format!(
                        "HTTP/1.1 503 Slow Down\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                };
                reader.get_mut().write_all(resp.as_bytes()).await?;
                continue;
            }
            Fault::NoSuchBucket => {
                // A HEAD answer carries no body.
                let body = if head.starts_with("HEAD ") {
                    ""
                } else {
                    "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist (injected)</Message></Error>"
                };
                let resp = format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/xml\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                reader.get_mut().write_all(resp.as_bytes()).await?;
                continue;
            }
            Fault::Drop => return Ok(()),
            Fault::None | Fault::LoseReply | Fault::Slow => {}
        }
        let response = forward(upstream, &head, &body).await?;
        if fault == Fault::LoseReply {
            // The call took effect upstream; the client never hears of it.
            return Ok(());
        }
        if fault == Fault::Slow {
            tokio::time::sleep(SLOW_REPLY).await;
        }
        reader.get_mut().write_all(&response).await?;
    }
    Ok(())
}

async fn forward(upstream: &str, head: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut conn =
        tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(upstream)).await??;
    let mut rewritten = String::new();
    for line in head.split_inclusive("\r\n") {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            rewritten.push_str("connection: close\r\n");
        }
        rewritten.push_str(line);
    }
    conn.write_all(rewritten.as_bytes()).await?;
    conn.write_all(body).await?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).await?;
    Ok(response)
}
