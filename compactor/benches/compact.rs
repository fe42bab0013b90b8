//! Compaction benchmark (not a test): stages N rows of ~500-byte change events into one hour in
//! the AWS emulator exactly as the capture does, compacts them, and prints rows/s, MB/s, CPU time
//! and peak RSS, beside two references on the same rows: arrow's `ArrowWriter` encoding the same
//! typed rows from memory, and DuckDB turning the same staged files into one Parquet file.
//!
//! Workloads (`--workload`): `readme` (the default: 1,000,000 rows of ten columns, about 640
//! bytes a change, transactions of 10, batches of 10,000) and `mixed` (300,000 rows of bigint,
//! text, numeric(12,2), a 60-character text, timestamptz and a small jsonb, transactions of
//! 1,000, batches of 25,000, as the capture stages a bulk load). `--rows N` changes the size.
//!
//! Where the compaction reads and writes (`--store`): `disk` (the default) reads the staged
//! objects from, and writes the part files to, local disk, as DuckDB does, with the ledger,
//! manifests and tags in the emulator: the two engines compared on the same footing. `emulator`
//! does everything through the S3 emulator, whose own CPU (on the same cores) then counts.
//!
//! `cargo bench -p compactor --bench compact -- [--workload readme|mixed] [--rows N]
//! [--batch-rows N] [--store disk|emulator] [--part-max-bytes N] [--jsonl-gzip-level N]
//! [--formats jsonl,parquet,avro] [--no-duckdb] [--stage-only]`; `scripts/bench-compactor.sh` starts the emulator and runs it.
//!
//! `--parse-only DIR` times the reading of the staged files under `DIR/_staging` (as
//! `--stage-only` leaves them) on one thread, without the emulator: each line's envelope read,
//! then its typed row built, as a parsing thread does. Its figures (ns per line, MB/s of staged
//! JSON) compare two builds on the same files.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context};
use arrow::array::{
    ArrayRef, BooleanBuilder, Decimal128Builder, Float64Builder, Int64Builder, StringBuilder,
    TimestampMicrosecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use serde_json::json;

use async_trait::async_trait;
use bytes::Bytes;
use cdc_contract::schema::TableSchema;
use cdc_contract::{Hour, TableName};
use compactor::config::Settings;
use compactor::store::{ObjectStore, S3Store, StoreError};
use compactor::{Compactor, SweepRequest};
use pipeline_tests::aws::AwsFixture;
use pipeline_tests::staging::{column, now_ms, Change, ColumnExt, Stager};

#[derive(Clone, Copy, PartialEq)]
enum Workload {
    Readme,
    Mixed,
}

struct Args {
    workload: Workload,
    /// Read and write on local disk (else through the emulator).
    disk: bool,
    /// Changes per transaction.
    tx_rows: u64,
    rows: u64,
    batch_rows: usize,
    part_max_bytes: u64,
    gzip_level: u32,
    /// The final formats (`OUTPUT_FORMATS`), when not the default.
    formats: Option<String>,
    duckdb: bool,
    /// Internal: compact what `BENCH_BUCKET`/`BENCH_TABLE` hold and print the figures as JSON,
    /// so peak RSS is the compaction's alone.
    compact_child: bool,
    /// Stage only, print the bucket and ledger table (for profiling `--compact-child`).
    stage_only: bool,
    /// Time the parsing of the staged files under this directory, and nothing else.
    parse_only: Option<PathBuf>,
    /// Run the compaction under a CPU quota of this many CPUs (a cgroup; as Lambda gives a
    /// function 1 vCPU per 1,769 MB of memory).
    cpu_share: Option<f64>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        workload: Workload::Readme,
        disk: true,
        tx_rows: 10,
        rows: 1_000_000,
        batch_rows: 10_000,
        part_max_bytes: 128 * 1024 * 1024,
        gzip_level: Settings::new(String::new(), String::new()).jsonl_gzip_level,
        formats: None,
        duckdb: true,
        compact_child: false,
        stage_only: false,
        parse_only: None,
        cpu_share: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    // The workload first: it sets the defaults the other options change.
    if let Some(i) = argv.iter().position(|a| a == "--workload") {
        match argv.get(i + 1).map(String::as_str) {
            Some("readme") => {}
            Some("mixed") => {
                a.workload = Workload::Mixed;
                a.rows = 300_000;
                a.batch_rows = 25_000;
                a.tx_rows = 1_000;
            }
            other => bail!("--workload readme|mixed, not {other:?}"),
        }
    }
    let mut it = argv.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--workload" => {
                it.next();
            }
            "--store" => match it.next().as_deref() {
                Some("disk") => a.disk = true,
                Some("emulator") => a.disk = false,
                other => bail!("--store disk|emulator, not {other:?}"),
            },
            "--rows" => a.rows = it.next().context("--rows N")?.parse()?,
            "--batch-rows" => a.batch_rows = it.next().context("--batch-rows N")?.parse()?,
            "--part-max-bytes" => {
                a.part_max_bytes = it.next().context("--part-max-bytes N")?.parse()?
            }
            "--jsonl-gzip-level" => {
                a.gzip_level = it.next().context("--jsonl-gzip-level N")?.parse()?
            }
            "--formats" => {
                let formats = it.next().context("--formats jsonl,parquet,avro")?;
                compactor::config::parse_formats(&formats)?;
                a.formats = Some(formats);
            }
            "--no-duckdb" => a.duckdb = false,
            "--compact-child" => a.compact_child = true,
            "--stage-only" => a.stage_only = true,
            "--parse-only" => a.parse_only = Some(it.next().context("--parse-only DIR")?.into()),
            "--cpu-share" => a.cpu_share = Some(it.next().context("--cpu-share F")?.parse()?),
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn schema(workload: Workload) -> TableSchema {
    if workload == Workload::Mixed {
        return TableSchema {
            table: TableName::new("public", "events"),
            columns: vec![
                column("id", "bigint", 20).key(),
                column("name", "text", 25),
                column("amount", "numeric(12,2)", 1700).numeric(12, 2),
                column("filler", "text", 25),
                column("at", "timestamp with time zone", 1184),
                column("doc", "jsonb", 3802),
            ],
        };
    }
    TableSchema {
        table: TableName::new("public", "orders"),
        columns: vec![
            column("id", "bigint", 20).key(),
            column("account", "text", 25),
            column("email", "text", 25),
            column("amount", "numeric(12,2)", 1700).numeric(12, 2),
            column("currency", "character(3)", 1042),
            column("status", "text", 25),
            column("created_at", "timestamp with time zone", 1184),
            column("score", "double precision", 701),
            column("active", "boolean", 16),
            column("note", "text", 25),
        ],
    }
}

const STATUSES: [&str; 4] = ["pending", "paid", "shipped", "cancelled"];

fn row(workload: Workload, i: u64) -> serde_json::Value {
    if workload == Workload::Mixed {
        return json!({
            "id": i,
            "name": format!("name-{}", i % 10_007),
            "amount": format!("{}.{:02}", (i * 7919) % 1_000_000, i % 100),
            "filler": format!("{:060}", i.wrapping_mul(0x9E37_79B9) % 1_000_000_007),
            "at": format!("2025-01-08T10:{:02}:{:02}.{:06}Z", (i / 60) % 60, i % 60, i % 1_000_000),
            "doc": format!(r#"{{"k": {}, "tag": "t{}", "ok": {}}}"#, i, i % 13, i.is_multiple_of(2)),
        });
    }
    json!({
        "id": i,
        "account": format!("acct-{:06}", i % 50_000),
        "email": format!("c{}@example.com", i % 97_531),
        "amount": format!("{}.{:02}", (i * 7919) % 100_000, i % 100),
        "currency": if i.is_multiple_of(3) { "EUR" } else { "USD" },
        "status": STATUSES[(i % 4) as usize],
        "created_at": format!("2025-01-08T10:{:02}:{:02}.{:06}Z", (i / 60) % 60, i % 60, i % 1_000_000),
        "score": (i % 1000) as f64 / 7.0,
        "active": !i.is_multiple_of(5),
        "note": format!("{:x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24),
    })
}

/// User plus system CPU seconds of this process.
fn cpu_seconds() -> f64 {
    cpu_seconds_of("self").unwrap_or(0.0)
}

/// User plus system CPU seconds of the emulator, when `MOTO_PID` names its process
/// (`scripts/moto.sh` exports it).
fn emulator_cpu_seconds() -> Option<f64> {
    cpu_seconds_of(&std::env::var("MOTO_PID").ok()?)
}

/// User plus system CPU seconds of process `pid` ("self": this one).
fn cpu_seconds_of(pid: &str) -> Option<f64> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
}

/// The reference: the same typed rows encoded by `ArrowWriter` straight from memory.
fn arrow_reference(rows: u64) -> anyhow::Result<(f64, u64)> {
    let tz: Arc<str> = Arc::from("UTC");
    let fields = vec![
        Field::new("_op", DataType::Utf8, false),
        Field::new("_lsn", DataType::Int64, false),
        Field::new("_seq", DataType::Int64, false),
        Field::new("_tx_id", DataType::Int64, true),
        Field::new(
            "_commit_ts",
            DataType::Timestamp(TimeUnit::Microsecond, Some(tz.clone())),
            false,
        ),
        Field::new("id", DataType::Int64, true),
        Field::new("account", DataType::Utf8, true),
        Field::new("email", DataType::Utf8, true),
        Field::new("amount", DataType::Decimal128(12, 2), true),
        Field::new("currency", DataType::Utf8, true),
        Field::new("status", DataType::Utf8, true),
        Field::new(
            "created_at",
            DataType::Timestamp(TimeUnit::Microsecond, Some(tz.clone())),
            true,
        ),
        Field::new("score", DataType::Float64, true),
        Field::new("active", DataType::Boolean, true),
        Field::new("note", DataType::Utf8, true),
    ];
    let schema = Arc::new(Schema::new(fields));
    let props = WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .set_max_row_group_size(1 << 22)
        .build();
    let started = Instant::now();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema.clone(), Some(props))?;
    let mut written = 0u64;
    let mut i = 0u64;
    while i < rows {
        let n = (rows - i).min(8192);
        let mut op = StringBuilder::new();
        let mut lsn = Int64Builder::new();
        let mut seq = Int64Builder::new();
        let mut tx = Int64Builder::new();
        let mut ts = TimestampMicrosecondBuilder::new().with_timezone(tz.clone());
        let mut id = Int64Builder::new();
        let mut account = StringBuilder::new();
        let mut email = StringBuilder::new();
        let mut amount = Decimal128Builder::new().with_precision_and_scale(12, 2)?;
        let mut currency = StringBuilder::new();
        let mut status = StringBuilder::new();
        let mut created = TimestampMicrosecondBuilder::new().with_timezone(tz.clone());
        let mut score = Float64Builder::new();
        let mut active = BooleanBuilder::new();
        let mut note = StringBuilder::new();
        for r in i..i + n {
            op.append_value("c");
            lsn.append_value((0x1000_0000 + r * 0x40) as i64);
            seq.append_value((r % 10 + 1) as i64);
            tx.append_value((r / 10) as i64);
            ts.append_value(1_736_330_400_000_000 + r as i64);
            id.append_value(r as i64);
            account.append_value(format!("acct-{:06}", r % 50_000));
            email.append_value(format!("c{}@example.com", r % 97_531));
            amount.append_value(((r * 7919) % 100_000 * 100 + r % 100) as i128);
            currency.append_value(if r.is_multiple_of(3) { "EUR" } else { "USD" });
            status.append_value(STATUSES[(r % 4) as usize]);
            created.append_value(1_736_330_400_000_000 + r as i64);
            score.append_value((r % 1000) as f64 / 7.0);
            active.append_value(!r.is_multiple_of(5));
            note.append_value(format!("{:x}", r.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24));
        }
        let arrays: Vec<ArrayRef> = vec![
            Arc::new(op.finish()),
            Arc::new(lsn.finish()),
            Arc::new(seq.finish()),
            Arc::new(tx.finish()),
            Arc::new(ts.finish()),
            Arc::new(id.finish()),
            Arc::new(account.finish()),
            Arc::new(email.finish()),
            Arc::new(amount.finish()),
            Arc::new(currency.finish()),
            Arc::new(status.finish()),
            Arc::new(created.finish()),
            Arc::new(score.finish()),
            Arc::new(active.finish()),
            Arc::new(note.finish()),
        ];
        writer.write(&RecordBatch::try_new(schema.clone(), arrays)?)?;
        if writer.in_progress_size() > 32 << 20 {
            writer.flush()?;
        }
        written += std::mem::take(writer.inner_mut()).len() as u64;
        i += n;
    }
    written += writer.into_inner()?.len() as u64;
    Ok((started.elapsed().as_secs_f64(), written))
}

const DUCKDB: &str = r#"
import sys, time, duckdb
src, out, columns = sys.argv[1], sys.argv[2], sys.argv[3]
con = duckdb.connect()
t = time.time()
con.sql(f"""COPY (
  SELECT op AS _op, source.commit_lsn::BIGINT AS _lsn, "transaction".total_order::BIGINT AS _seq,
         source.txId::BIGINT AS _tx_id, make_timestamptz(source.ts_us) AS _commit_ts,
         {columns}
  FROM read_json('{src}/**/*.jsonl.gz', format='newline_delimited', compression='gzip')
) TO '{out}' (FORMAT parquet, COMPRESSION snappy)""")
print(time.time() - t)
"#;

/// The table columns DuckDB selects from each workload's staged events.
fn duckdb_columns(workload: Workload) -> &'static str {
    match workload {
        Workload::Readme => {
            "after.id::BIGINT AS id, after.account AS account, after.email AS email,
             after.amount::DECIMAL(12,2) AS amount, after.currency AS currency, after.status AS status,
             after.created_at::TIMESTAMPTZ AS created_at, after.score::DOUBLE AS score,
             after.active::BOOLEAN AS active, after.note AS note"
        }
        Workload::Mixed => {
            "after.id::BIGINT AS id, after.name AS name, after.amount::DECIMAL(12,2) AS amount,
             after.filler AS filler, after.at::TIMESTAMPTZ AS at, after.doc AS doc"
        }
    }
}

/// Copies the staged objects to `dir` (same keys).
async fn download_staging(aws: &AwsFixture, dir: &Path) -> anyhow::Result<()> {
    let keys = aws.list_keys("_staging/").await?;
    for key in &keys {
        let path = dir.join(key);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p)?;
        }
        std::fs::write(&path, aws.get_bytes(key).await?)?;
    }
    Ok(())
}

/// DuckDB turning the staged files under `dir` into one Parquet file: seconds.
fn duckdb_reference(dir: &Path, workload: Workload) -> anyhow::Result<f64> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(DUCKDB)
        .arg(dir.join("_staging"))
        .arg(dir.join("duck.parquet"))
        .arg(duckdb_columns(workload))
        .output()?;
    if !out.status.success() {
        bail!("duckdb: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or("").trim();
    last.parse()
        .with_context(|| format!("duckdb printed {text:?}"))
}

/// S3 with the staged objects read from, and the part files written to, local disk under a
/// directory (what DuckDB reads and writes); everything else (manifests, listing, tags) goes
/// to the emulator.
struct DiskStore {
    s3: S3Store,
    dir: PathBuf,
    /// Multipart uploads in progress: the last part written, by upload id.
    uploads: Mutex<HashMap<String, i32>>,
}

impl DiskStore {
    /// The file an upload's parts are appended to.
    fn upload_path(&self, id: &str) -> PathBuf {
        self.dir.join(".uploads").join(format!("{:x}", fxhash(id)))
    }

    fn local(&self, key: &str) -> Option<PathBuf> {
        let part = [".parquet", ".jsonl.gz", ".jsonl.zst", ".avro"]
            .iter()
            .any(|e| key.ends_with(e));
        (part || key.starts_with("_staging/")).then(|| self.dir.join(key))
    }

    fn write(path: &Path, parts: &[Bytes]) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Definite(format!("local disk: {e}"));
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io)?;
        }
        let mut f = std::fs::File::create(path).map_err(io)?;
        for b in parts {
            std::io::Write::write_all(&mut f, b).map_err(io)?;
        }
        Ok(())
    }
}

#[async_trait]
impl ObjectStore for DiskStore {
    async fn get(&self, key: &str) -> Result<Option<Bytes>, StoreError> {
        match self.local(key) {
            Some(path) => match std::fs::read(&path) {
                Ok(b) => Ok(Some(Bytes::from(b))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StoreError::Definite(format!("local disk: {e}"))),
            },
            None => self.s3.get(key).await,
        }
    }
    async fn put(&self, key: &str, body: Bytes, ct: &str) -> Result<(), StoreError> {
        match self.local(key) {
            Some(path) => Self::write(&path, &[body]),
            None => self.s3.put(key, body, ct).await,
        }
    }
    async fn create_multipart(&self, key: &str, _ct: &str) -> Result<String, StoreError> {
        let id = format!("{key}#{}", compactor::now_ms());
        if let Ok(mut u) = self.uploads.lock() {
            u.insert(id.clone(), 0);
        }
        Ok(id)
    }
    async fn upload_part(
        &self,
        _key: &str,
        id: &str,
        n: i32,
        body: Bytes,
    ) -> Result<String, StoreError> {
        // Parts go to disk at once, as S3 would hold them, not to this process's memory: each
        // appended to the upload's one file, which completing renames (written once, as
        // DuckDB writes its file).
        let io = |e: std::io::Error| StoreError::Definite(format!("local disk: {e}"));
        let expected = self
            .uploads
            .lock()
            .ok()
            .and_then(|u| u.get(id).copied())
            .map(|last| last + 1);
        if expected != Some(n) {
            return Err(StoreError::Definite(format!(
                "the bench's disk store takes an upload's parts once each, in order: part {n}, expected {expected:?}"
            )));
        }
        let path = self.upload_path(id);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        std::io::Write::write_all(&mut f, &body).map_err(io)?;
        if let Some(last) = self
            .uploads
            .lock()
            .ok()
            .as_mut()
            .and_then(|u| u.get_mut(id))
        {
            *last = n;
        }
        Ok(format!("etag-{n}"))
    }
    async fn complete_multipart(
        &self,
        key: &str,
        id: &str,
        _parts: &[(i32, String)],
    ) -> Result<(), StoreError> {
        if let Ok(mut u) = self.uploads.lock() {
            u.remove(id);
        }
        let io = |e: std::io::Error| StoreError::Definite(format!("local disk: {e}"));
        let path = self.dir.join(key);
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).map_err(io)?;
        }
        std::fs::rename(self.upload_path(id), &path).map_err(io)
    }
    async fn abort_multipart(&self, _key: &str, id: &str) -> Result<(), StoreError> {
        if let Ok(mut u) = self.uploads.lock() {
            u.remove(id);
        }
        let _ = std::fs::remove_file(self.upload_path(id));
        Ok(())
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        self.s3.list(prefix).await
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StoreError> {
        self.s3.delete(keys).await
    }
    async fn tag(&self, key: &str, tags: &[(&str, &str)]) -> Result<(), StoreError> {
        self.s3.tag(key, tags).await
    }
}

/// A stable hash of an upload id, for its parts' file names.
fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A cgroup whose processes get `share` CPUs at most (cgroup v2 `cpu.max`, else v1's CFS
/// quota), removed when dropped.
struct CpuQuota(std::path::PathBuf);

impl CpuQuota {
    fn new(share: f64) -> anyhow::Result<Self> {
        let period = 100_000u64;
        let quota = ((share * period as f64) as u64).max(1_000);
        let name = format!("cdc-bench-{}", std::process::id());
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").is_file();
        let dir = if v2 {
            Path::new("/sys/fs/cgroup").join(&name)
        } else {
            Path::new("/sys/fs/cgroup/cpu").join(&name)
        };
        std::fs::create_dir(&dir).with_context(|| {
            format!(
                "creating the cgroup {} (--cpu-share needs root and the cpu controller)",
                dir.display()
            )
        })?;
        let set = if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota} {period}"))
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period.to_string())
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), quota.to_string()))
        };
        let cgroup = CpuQuota(dir);
        set.context("setting the CPU quota")?;
        Ok(cgroup)
    }
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

async fn compact_child(args: &Args) -> anyhow::Result<()> {
    if let Ok(cgroup) = std::env::var("BENCH_CGROUP") {
        std::fs::write(
            Path::new(&cgroup).join("cgroup.procs"),
            std::process::id().to_string(),
        )
        .with_context(|| format!("joining the cgroup {cgroup}"))?;
    }
    // RUST_LOG=compactor=debug (say) shows the compaction's steps with their times.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let endpoint = std::env::var("AWS_ENDPOINT_URL")?;
    let sdk = pipeline_tests::aws::sdk_config(&endpoint).await;
    let mut config = Settings::new(
        std::env::var("BENCH_BUCKET")?,
        std::env::var("BENCH_TABLE")?,
    );
    config.part_max_bytes = args.part_max_bytes;
    config.jsonl_gzip_level = args.gzip_level;
    if let Some(formats) = &args.formats {
        config.formats = compactor::config::parse_formats(formats)?;
    }
    let c = match std::env::var("BENCH_DISK_DIR") {
        Ok(dir) => {
            let s3 = aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&sdk)
                    .force_path_style(true)
                    .build(),
            );
            let store = DiskStore {
                s3: S3Store::new(s3, config.bucket.clone()),
                dir: PathBuf::from(dir),
                uploads: Mutex::default(),
            };
            let ledger = compactor::ledger::DynamoLedger::new(
                aws_sdk_dynamodb::Client::new(&sdk),
                config.ledger_table.clone(),
            );
            Compactor::new(config, Arc::new(store), Arc::new(ledger), None)
        }
        Err(_) => Compactor::from_sdk(config, &sdk),
    };
    let cpu0 = cpu_seconds();
    let emulator0 = emulator_cpu_seconds();
    let started = Instant::now();
    let report = c.sweep(&SweepRequest::default()).await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    let emulator = emulator0
        .zip(emulator_cpu_seconds())
        .map(|(before, after)| after - before);
    if !report.failures.is_empty() || report.rows() != args.rows {
        bail!(
            "compaction wrote {} rows: {:?}",
            report.rows(),
            report.failures
        );
    }
    let figures = json!({
        "wall_s": wall,
        "cpu_s": cpu,
        "emulator_cpu_s": emulator,
        "peak_rss_kib": pipeline_tests::capture::peak_rss_kib(std::process::id()).unwrap_or(0),
        "bytes": report.hours.iter().map(|h| h.bytes).sum::<u64>(),
        "parts": report.hours.iter().map(|h| h.parts).sum::<u32>(),
        // The hour's steps (the bench compacts one).
        "planned_s": report.hours.iter().map(|h| h.planned_ms).max().unwrap_or(0) as f64 / 1e3,
        "written_s": report.hours.iter().map(|h| h.written_ms).max().unwrap_or(0) as f64 / 1e3,
        "done_s": report.hours.iter().map(|h| h.done_ms).max().unwrap_or(0) as f64 / 1e3,
    });
    println!("{figures}");
    Ok(())
}

/// The staged files under `dir/_staging`, gunzipped, in key order.
fn staged_texts(dir: &Path) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.join("_staging")];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.to_string_lossy().ends_with(".jsonl.gz") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
        .iter()
        .map(|f| {
            let mut text = Vec::new();
            let data = std::fs::read(f)?;
            std::io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(&data[..]),
                &mut text,
            )?;
            Ok(text)
        })
        .collect()
}

/// Times reading the staged lines under `dir` on this thread: the envelopes alone, then the
/// envelopes and their typed rows (in batches of about 1 MiB of text, as the parsing threads
/// build them). Best of three passes each.
fn parse_only(dir: &Path, workload: Workload) -> anyhow::Result<()> {
    use compactor::envelope::{Envelope, RowValues};
    use compactor::part::{column_lookup, RowBuilders};
    let texts = staged_texts(dir)?;
    let lines: Vec<&str> = texts
        .iter()
        .flat_map(|t| t.split(|&b| b == b'\n'))
        .filter(|l| !l.is_empty())
        .map(std::str::from_utf8)
        .collect::<Result<_, _>>()?;
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    if lines.is_empty() {
        bail!("no staged lines under {}", dir.display());
    }
    let schema = Arc::new(compactor::parquet_schema::PartSchema::new(&schema(
        workload,
    )));
    let lookup = column_lookup(&schema);
    let best = |pass: &dyn Fn() -> anyhow::Result<u64>| -> anyhow::Result<(f64, u64)> {
        let mut best = f64::MAX;
        let mut check = 0;
        for _ in 0..3 {
            let started = Instant::now();
            check = pass()?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok((best, check))
    };
    let (envelopes_s, positions) = best(&|| {
        let mut sum = 0u64;
        for l in &lines {
            let env = Envelope::parse(l)?;
            sum = sum.wrapping_add(env.position().ordinal.into());
        }
        Ok(sum)
    })?;
    let (rows_s, rows) = best(&|| {
        let mut builders = RowBuilders::new(&schema)?;
        let mut rows = 0u64;
        let mut text = 0usize;
        let mut row = RowValues {
            values: Vec::with_capacity(schema.columns.len()),
            unknown: Vec::new(),
        };
        for l in &lines {
            let env = Envelope::parse(l)?;
            builders
                .push_with(&lookup, &mut row, &env, (env.position(), env.commit_us()))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            text += l.len() + 1;
            if text >= 1 << 20 {
                rows += builders.finish()?.map_or(0, |b| b.num_rows() as u64);
                text = 0;
            }
        }
        rows += builders.finish()?.map_or(0, |b| b.num_rows() as u64);
        Ok(rows)
    })?;
    if rows != lines.len() as u64 {
        bail!("built {rows} rows of {} lines", lines.len());
    }
    let per_line = |s: f64| s * 1e9 / lines.len() as f64;
    println!(
        "parsing {} staged lines ({:.1} MB of JSON) on one thread (check {positions}):",
        lines.len(),
        bytes as f64 / 1e6
    );
    println!(
        "  envelopes:          {:.3} s, {:.0} ns a line, {:.0} MB/s",
        envelopes_s,
        per_line(envelopes_s),
        bytes as f64 / 1e6 / envelopes_s
    );
    println!(
        "  envelopes and rows: {:.3} s, {:.0} ns a line, {:.0} MB/s",
        rows_s,
        per_line(rows_s),
        bytes as f64 / 1e6 / rows_s
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = args()?;
    if args.compact_child {
        // As the compactor binary does, before the runtime's threads start.
        if !compactor::allocator::tune() {
            bail!("the allocator refused its settings");
        }
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    if args.compact_child {
        return compact_child(&args).await;
    }
    if let Some(dir) = &args.parse_only {
        return parse_only(dir, args.workload);
    }
    let aws = AwsFixture::new().await?;
    let mut stager = Stager::new(&aws, "bench").await?;
    stager.batch_rows = args.batch_rows;
    let schema = schema(args.workload);
    let hour: Hour = "2025-01-08T10".parse()?;

    // Stage: transactions of `tx_rows` changes, a flush every 5 batches; memory stays at a
    // flush.
    let started = Instant::now();
    let mut staged_bytes = 0u64;
    let mut i = 0u64;
    let per_flush = (args.batch_rows * 5) as u64;
    while i < args.rows {
        let end = (i + per_flush).min(args.rows);
        while i < end {
            let n = (end - i).min(args.tx_rows);
            let changes = (i..i + n)
                .map(|r| Change::insert(&schema, row(args.workload, r)))
                .collect();
            let commit_us =
                (hour.start_millis() + (i * 3_000_000 / args.rows.max(1)) as i64) * 1000;
            for l in stager.tx(commit_us, changes) {
                staged_bytes += l.len() as u64 + 1;
            }
            i += n;
        }
        stager.flush(Some(now_ms())).await?;
    }
    let stage_s = started.elapsed().as_secs_f64();
    eprintln!(
        "staged {} rows ({:.1} MB of JSON lines, {:.0} bytes/row) in {:.1} s",
        args.rows,
        staged_bytes as f64 / 1e6,
        staged_bytes as f64 / args.rows as f64,
        stage_s
    );

    if args.stage_only {
        let dir = std::env::temp_dir().join(format!("cdc-bench-{}", aws.bucket));
        download_staging(&aws, &dir).await?;
        println!(
            "BENCH_BUCKET={} BENCH_TABLE={} BENCH_DISK_DIR={}",
            aws.bucket,
            aws.table,
            dir.display()
        );
        return Ok(());
    }

    // The staged objects on local disk: DuckDB's input, and the compaction's with `--store disk`.
    let dir = tempfile::tempdir()?;
    download_staging(&aws, dir.path()).await?;

    // Compact in a child process, so its peak RSS is the compaction's alone (and a CPU quota
    // applies to it alone).
    let quota = args.cpu_share.map(CpuQuota::new).transpose()?;
    let mut child = std::process::Command::new(std::env::current_exe()?);
    if let Some(q) = &quota {
        child.env("BENCH_CGROUP", &q.0);
    }
    if args.disk {
        child.env("BENCH_DISK_DIR", dir.path());
    }
    let out = child
        .args(["--compact-child", "--rows", &args.rows.to_string()])
        .args(["--part-max-bytes", &args.part_max_bytes.to_string()])
        .args(["--jsonl-gzip-level", &args.gzip_level.to_string()])
        .args(args.formats.iter().flat_map(|f| ["--formats", f.as_str()]))
        .env("AWS_ENDPOINT_URL", &aws.endpoint)
        .env("BENCH_BUCKET", &aws.bucket)
        .env("BENCH_TABLE", &aws.table)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the compaction failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: serde_json::Value = serde_json::from_str(text.lines().last().unwrap_or(""))?;
    let num = |k: &str| figures[k].as_f64().unwrap_or(0.0);
    let (wall, cpu, peak) = (num("wall_s"), num("cpu_s"), num("peak_rss_kib"));
    let (out_bytes, parts) = (num("bytes"), num("parts"));

    let mb = staged_bytes as f64 / 1e6;
    let formats = args.formats.clone().unwrap_or_else(|| {
        let default = Settings::new(String::new(), String::new()).formats;
        format!("{default:?} (the default formats)")
    });
    println!(
        "compactor bench ({} workload): {} rows, {:.1} MB staged JSON, one table-hour{}",
        match args.workload {
            Workload::Readme => "readme",
            Workload::Mixed => "mixed",
        },
        args.rows,
        mb,
        args.cpu_share
            .map(|s| format!(", compaction limited to {s:.2} CPU"))
            .unwrap_or_default()
    );
    println!(
        "  compactor ({}): {:.2} s, {:.0} rows/s, {:.1} MB/s, \
         {:.2} CPU s ({:.0} rows per CPU second), {} parts, {:.1} MB written, peak RSS {:.0} MB",
        if args.disk {
            format!("staged files on local disk -> {formats} on local disk, ledger in the emulator")
        } else {
            format!("S3 emulator -> {formats} -> S3 emulator")
        },
        wall,
        args.rows as f64 / wall,
        mb / wall,
        cpu,
        args.rows as f64 / cpu.max(1e-9),
        parts,
        out_bytes / 1e6,
        peak / 1024.0,
    );
    let (planned, written, done) = (num("planned_s"), num("written_s"), num("done_s"));
    println!(
        "  the hour's steps: planned {planned:.2} s (its batch items and record read), parts written \
         {:.2} s, then {:.2} s consuming the last batches (tags, marks, flush notes); the emulator \
         alone serves the first and the last",
        written - planned,
        done - written,
    );
    if let Some(e) = figures["emulator_cpu_s"].as_f64() {
        // On these cores beside the compaction; on AWS this is the services' latency.
        println!(
            "  the emulator meanwhile (ledger, manifests, tags; on the same cores): {e:.2} CPU s"
        );
    }
    if args.workload == Workload::Readme {
        let (arrow_s, arrow_bytes) = arrow_reference(args.rows)?;
        println!(
            "  arrow ArrowWriter from memory (typed rows -> parquet, one thread): {:.2} s, {:.0} rows/s, {:.1} MB parquet",
            arrow_s,
            args.rows as f64 / arrow_s,
            arrow_bytes as f64 / 1e6
        );
    }
    if args.duckdb {
        let d = duckdb_reference(dir.path(), args.workload)?;
        println!(
            "  duckdb (staged jsonl.gz files on local disk -> one parquet file): {:.2} s, {:.0} rows/s, {:.1} MB/s",
            d,
            args.rows as f64 / d,
            mb / d
        );
        println!(
            "  ratio: the compactor at {:.2}x DuckDB's rows/s",
            d / wall.max(1e-9)
        );
    }
    Ok(())
}
