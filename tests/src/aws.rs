//! The AWS emulator and per-test AWS resources, reached only through the real AWS SDK for Rust.
//!
//! `AWS_ENDPOINT_URL` names the emulator (the test script starts moto's server and sets it; a
//! user may point it at LocalStack). When it is unset, each [`AwsFixture`] starts its own moto
//! server from the repository's `.venv` on a free port and stops it on drop.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};

use cdc_contract::ledger;

/// A moto server this process started.
struct MotoServer {
    child: Child,
    endpoint: String,
    /// Its request log: a file, because a pipe nobody reads fills up and blocks the server.
    log: std::path::PathBuf,
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}

fn start_moto() -> anyhow::Result<MotoServer> {
    let exe = repo_root().join(".venv/bin/moto_server");
    if !exe.is_file() {
        bail!(
            "AWS_ENDPOINT_URL is unset and {} is missing: run ./scripts/test.sh (it installs moto) \
             or set AWS_ENDPOINT_URL to a running emulator",
            exe.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let log = std::env::temp_dir().join(format!("cdc-test-moto-{port}.log"));
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = Command::new(&exe)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let mut server = MotoServer {
        child,
        endpoint: format!("http://127.0.0.1:{port}"),
        log,
    };
    for _ in 0..150 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            let err = std::fs::read_to_string(&server.log).unwrap_or_default();
            bail!("moto server exited at start ({status}): {err}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("moto server did not listen on port {port} within 15 s")
}

/// AWS SDK configuration for the emulator at `endpoint`: fixed test credentials, `us-east-1`.
pub async fn sdk_config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .load()
        .await
}

/// Per-test AWS resources: a bucket, a ledger table and a queue with unique names.
pub struct AwsFixture {
    _moto: Option<MotoServer>,
    /// The emulator's endpoint.
    pub endpoint: String,
    /// Shared SDK configuration.
    pub config: aws_config::SdkConfig,
    /// S3 client (path-style).
    pub s3: aws_sdk_s3::Client,
    /// DynamoDB client.
    pub dynamodb: aws_sdk_dynamodb::Client,
    /// SQS client.
    pub sqs: aws_sdk_sqs::Client,
    /// The test's bucket.
    pub bucket: String,
    /// The test's ledger table.
    pub table: String,
    /// The test's notification queue URL (from the API).
    pub queue_url: String,
}

impl AwsFixture {
    /// Creates the test's bucket, ledger table and queue.
    pub async fn new() -> anyhow::Result<Self> {
        let (moto, endpoint) = match std::env::var("AWS_ENDPOINT_URL") {
            Ok(url) if !url.is_empty() => (None, url),
            _ => {
                let server = start_moto()?;
                let endpoint = server.endpoint.clone();
                (Some(server), endpoint)
            }
        };
        let config = sdk_config(&endpoint).await;
        let s3 = aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&config)
                .force_path_style(true)
                .build(),
        );
        let dynamodb = aws_sdk_dynamodb::Client::new(&config);
        let sqs = aws_sdk_sqs::Client::new(&config);
        let bucket = crate::unique_name("cdc-test-");
        let table = crate::unique_name("ledger-");
        let queue = crate::unique_name("notify-");
        s3.create_bucket()
            .bucket(&bucket)
            .send()
            .await
            .with_context(|| format!("creating bucket {bucket} at {endpoint}"))?;
        create_ledger_table(&dynamodb, &table).await?;
        let queue_url = sqs
            .create_queue()
            .queue_name(&queue)
            .send()
            .await
            .context("creating queue")?
            .queue_url
            .context("create_queue returned no URL")?;
        Ok(Self {
            _moto: moto,
            endpoint,
            config,
            s3,
            dynamodb,
            sqs,
            bucket,
            table,
            queue_url,
        })
    }

    /// Environment variables that point a capture or compactor at this fixture.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint.clone()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("S3_BUCKET_NAME".into(), self.bucket.clone()),
            ("LEDGER_TABLE".into(), self.table.clone()),
            ("NOTIFY_QUEUE_URL".into(), self.queue_url.clone()),
        ]
    }

    /// Every key under `prefix`, in key order.
    pub async fn list_keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        let mut pages = self
            .s3
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.context("listing objects")?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(str::to_owned)),
            );
        }
        keys.sort();
        Ok(keys)
    }

    /// Writes an object (over any there).
    pub async fn put_bytes(&self, key: &str, body: Vec<u8>) -> anyhow::Result<()> {
        self.s3
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body.into())
            .send()
            .await
            .with_context(|| format!("putting {key}"))?;
        Ok(())
    }

    /// An object's bytes.
    pub async fn get_bytes(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        let out = self
            .s3
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .with_context(|| format!("getting {key}"))?;
        Ok(out.body.collect().await?.into_bytes().to_vec())
    }

    /// A compressed JSON-lines object (gzip, or zstd for `.zst` keys), parsed.
    pub async fn read_jsonl_gz(&self, key: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let bytes = self.get_bytes(key).await?;
        let mut text = String::new();
        if key.ends_with(".zst") {
            zstd::stream::read::Decoder::new(&bytes[..])
                .and_then(|mut d| d.read_to_string(&mut text))
                .with_context(|| format!("decompressing {key}"))?;
        } else {
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_string(&mut text)
                .with_context(|| format!("gunzipping {key}"))?;
        }
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing a line of {key}")))
            .collect()
    }

    /// The ledger table through the helper the deployables use.
    pub fn ledger_table(&self) -> cdc_contract::dynamo::Table {
        cdc_contract::dynamo::Table::new(self.dynamodb.clone(), &self.table)
    }

    /// Every ledger item under a partition key, in sort-key order.
    pub async fn query_ledger(&self, pk: &str) -> anyhow::Result<Vec<ledger::Item>> {
        self.ledger_table()
            .query(pk.to_owned(), None)
            .await
            .context("querying the ledger")
    }

    /// One ledger item.
    pub async fn get_ledger_item(
        &self,
        pk: &str,
        sk: &str,
    ) -> anyhow::Result<Option<ledger::Item>> {
        self.ledger_table()
            .get(pk.to_owned(), sk.to_owned())
            .await
            .context("getting a ledger item")
    }

    /// Writes a ledger item whole (over any with its key).
    pub async fn put_ledger_item(&self, item: ledger::Item) -> anyhow::Result<()> {
        self.ledger_table()
            .put_all("put a ledger item", vec![item])
            .await
            .context("putting a ledger item")
    }

    /// Deletes a ledger item (an absent one too).
    pub async fn delete_ledger_item(&self, pk: &str, sk: &str) -> anyhow::Result<()> {
        self.ledger_table()
            .delete(
                "delete a ledger item",
                ledger::key(pk.to_owned(), sk.to_owned()),
                None,
            )
            .await
            .context("deleting a ledger item")?;
        Ok(())
    }

    /// Receives (and deletes) every message currently in the notification queue.
    pub async fn drain_queue(&self) -> anyhow::Result<Vec<String>> {
        let mut bodies = Vec::new();
        loop {
            let out = self
                .sqs
                .receive_message()
                .queue_url(&self.queue_url)
                .max_number_of_messages(10)
                .wait_time_seconds(0)
                .send()
                .await
                .context("receiving messages")?;
            let msgs = out.messages();
            if msgs.is_empty() {
                return Ok(bodies);
            }
            for m in msgs {
                bodies.extend(m.body().map(str::to_owned));
                if let Some(h) = m.receipt_handle() {
                    self.sqs
                        .delete_message()
                        .queue_url(&self.queue_url)
                        .receipt_handle(h)
                        .send()
                        .await
                        .context("deleting a message")?;
                }
            }
        }
    }
}

/// Creates a ledger table as infra/ does: string `pk` and `sk`, on-demand.
pub async fn create_ledger_table(
    dynamodb: &aws_sdk_dynamodb::Client,
    table: &str,
) -> anyhow::Result<()> {
    let attr = |name: &str| {
        AttributeDefinition::builder()
            .attribute_name(name)
            .attribute_type(ScalarAttributeType::S)
            .build()
    };
    let key = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    dynamodb
        .create_table()
        .table_name(table)
        .attribute_definitions(attr(ledger::PK)?)
        .attribute_definitions(attr(ledger::SK)?)
        .key_schema(key(ledger::PK, KeyType::Hash)?)
        .key_schema(key(ledger::SK, KeyType::Range)?)
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .with_context(|| format!("creating ledger table {table}"))?;
    Ok(())
}
