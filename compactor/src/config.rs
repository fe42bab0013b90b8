//! Configuration: one `clap` struct whose every flag has an environment variable (flags win),
//! validated once at start-up into [`Settings`]; errors name the setting.

use std::time::Duration;

use clap::Args;

use cdc_contract::layout::{Format, JsonlCompression};

pub use crate::avro::AvroCodec;

/// Parquet compression codecs offered by `PARQUET_COMPRESSION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Snappy (default: fast, read everywhere).
    Snappy,
    /// Zstandard (level 3).
    Zstd,
    /// Gzip (level 6).
    Gzip,
    /// LZ4 (raw, the codec current readers expect).
    Lz4,
    /// No compression.
    None,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "snappy" => Ok(Compression::Snappy),
            "zstd" => Ok(Compression::Zstd),
            "gzip" => Ok(Compression::Gzip),
            "lz4" => Ok(Compression::Lz4),
            "none" | "uncompressed" => Ok(Compression::None),
            other => Err(format!(
                "{other:?} is not one of snappy, zstd, gzip, lz4, none"
            )),
        }
    }
}

impl Compression {
    /// The codec as the Parquet writer takes it.
    pub fn codec(self) -> parquet::basic::Compression {
        use parquet::basic::{Compression as C, GzipLevel, ZstdLevel};
        match self {
            Compression::Snappy => C::SNAPPY,
            Compression::Zstd => C::ZSTD(ZstdLevel::default()),
            Compression::Gzip => C::GZIP(GzipLevel::default()),
            Compression::Lz4 => C::LZ4_RAW,
            Compression::None => C::UNCOMPRESSED,
        }
    }
}

pub use cdc_contract::flags::LogFormat;
use cdc_contract::flags::SharedFlags;

/// The compactor's flags as given (flags or environment).
#[derive(Debug, Clone, Args)]
pub struct Flags {
    /// What the capture shares.
    #[command(flatten)]
    pub shared: SharedFlags,
    /// Final formats, comma-separated: jsonl, parquet, avro.
    #[arg(
        long = "output-formats",
        env = "OUTPUT_FORMATS",
        default_value = "jsonl,parquet"
    )]
    pub output_formats: String,
    /// Compact only this slot's hours (default: every slot in the ledger).
    #[arg(long = "slot-name", env = "CDC_SLOT_NAME")]
    pub slot_name: Option<String>,
    /// Final files roll into a new part at this size (bytes).
    #[arg(
        long = "part-max-bytes",
        env = "PART_MAX_BYTES",
        default_value = "134217728"
    )]
    pub part_max_bytes: String,
    /// A Parquet row group is written once its encoded size reaches this (bytes).
    #[arg(
        long = "parquet-row-group-bytes",
        env = "PARQUET_ROW_GROUP_BYTES",
        default_value = "33554432"
    )]
    pub row_group_bytes: String,
    /// Parquet compression: snappy, zstd, gzip, lz4 or none.
    #[arg(
        long = "parquet-compression",
        env = "PARQUET_COMPRESSION",
        default_value = "snappy"
    )]
    pub parquet_compression: String,
    /// gzip level of final JSONL parts (1 fastest to 9 smallest).
    #[arg(
        long = "jsonl-gzip-level",
        env = "JSONL_GZIP_LEVEL",
        default_value = "3"
    )]
    pub jsonl_gzip_level: String,
    /// Compression of final JSONL parts: gzip (`.jsonl.gz`) or zstd (`.jsonl.zst`, level 3).
    #[arg(
        long = "jsonl-compression",
        env = "JSONL_COMPRESSION",
        default_value = "gzip"
    )]
    pub jsonl_compression: String,
    /// Block compression of Avro parts: deflate, snappy or zstd.
    #[arg(long = "avro-codec", env = "AVRO_CODEC", default_value = "deflate")]
    pub avro_codec: String,
    /// SQS queue told about each dead-lettered staging batch (optional).
    #[arg(long = "dead-letter-queue-url", env = "DEAD_LETTER_QUEUE_URL")]
    pub dead_letter_queue_url: Option<String>,
    /// How long a compactor's claim on an hour holds without renewal (seconds).
    #[arg(
        long = "hour-claim-seconds",
        env = "HOUR_CLAIM_SECONDS",
        default_value = "120"
    )]
    pub hour_claim_seconds: String,
    /// How long an attempt whose claim lapsed may still complete an upload (seconds): the
    /// attempt that cleans up after it lists the hour again once this has passed, so a late
    /// upload never stays as a stray file. At least the Lambda's timeout; 0 turns rechecks off.
    #[arg(
        long = "straggler-window-seconds",
        env = "STRAGGLER_WINDOW_SECONDS",
        default_value = "900"
    )]
    pub straggler_window_seconds: String,
    /// Under Lambda: stop writing this long before the invocation's deadline (seconds). The
    /// part being written ends at the next batch and is recorded; the next run goes on after it.
    /// Leave enough for a part's last batch, its close and upload at the function's CPU share.
    #[arg(
        long = "deadline-margin-seconds",
        env = "DEADLINE_MARGIN_SECONDS",
        default_value = "60"
    )]
    pub deadline_margin_seconds: String,
    /// Table-hours compacted at once.
    #[arg(
        long = "compact-concurrency",
        env = "COMPACT_CONCURRENCY",
        default_value = "2"
    )]
    pub concurrency: String,
    /// Glue Data Catalog database in which to keep one table per captured table (over its
    /// Parquet files, with partition projection); unset, no catalog calls are made.
    #[arg(long = "glue-database", env = "GLUE_DATABASE")]
    pub glue_database: Option<String>,
    /// Compact hours that are still open every this many minutes (extra parts, like late
    /// batches), so changes are queryable before their hour closes; 0 compacts closed hours only.
    #[arg(
        long = "open-hour-compact-minutes",
        env = "OPEN_HOUR_COMPACT_MINUTES",
        default_value = "0"
    )]
    pub open_hour_compact_minutes: String,
}

/// A setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid setting {setting}: {reason}")]
pub struct ConfigError {
    /// The environment variable (and flag) at fault.
    pub setting: &'static str,
    /// Why.
    pub reason: String,
}

fn bad(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        reason: reason.into(),
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The bucket.
    pub bucket: String,
    /// The base path (`S3_BASE_PATH`).
    pub base_path: String,
    /// The ledger table.
    pub ledger_table: String,
    /// Final formats, in a fixed order, without repeats.
    pub formats: Vec<Format>,
    /// Only this slot, if set.
    pub slot: Option<String>,
    /// Close grace period.
    pub close_grace: Duration,
    /// Part roll size.
    pub part_max_bytes: u64,
    /// Row group flush size.
    pub row_group_bytes: u64,
    /// Parquet codec.
    pub compression: Compression,
    /// gzip level of JSONL parts.
    pub jsonl_gzip_level: u32,
    /// Compression of JSONL parts.
    pub jsonl_compression: JsonlCompression,
    /// Block compression of Avro parts.
    pub avro_codec: AvroCodec,
    /// Dead-letter notices.
    pub dead_letter_queue_url: Option<String>,
    /// Time limit of one AWS request attempt.
    pub aws_attempt_timeout: Duration,
    /// Claim duration.
    pub hour_claim: Duration,
    /// How long a lapsed attempt may still complete an upload (zero: no recheck).
    pub straggler_window: Duration,
    /// Hours compacted at once.
    pub concurrency: usize,
    /// Under Lambda: how long before the invocation's deadline writing stops.
    pub deadline_margin: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// The Glue database the catalog tables are kept in, if any.
    pub glue_database: Option<String>,
    /// How often an open hour is compacted (None: only closed hours).
    pub open_hour_every: Option<Duration>,
}

impl Settings {
    /// A configuration with every default, for `bucket` and `ledger_table`.
    pub fn new(bucket: impl Into<String>, ledger_table: impl Into<String>) -> Self {
        Settings {
            bucket: bucket.into(),
            base_path: String::new(),
            ledger_table: ledger_table.into(),
            formats: vec![Format::Jsonl, Format::Parquet],
            slot: None,
            close_grace: Duration::from_secs(300),
            part_max_bytes: 128 * 1024 * 1024,
            row_group_bytes: 32 * 1024 * 1024,
            compression: Compression::Snappy,
            jsonl_gzip_level: 3,
            jsonl_compression: JsonlCompression::Gzip,
            avro_codec: AvroCodec::Deflate,
            dead_letter_queue_url: None,
            aws_attempt_timeout: Duration::from_secs(30),
            hour_claim: Duration::from_secs(120),
            straggler_window: Duration::from_secs(900),
            concurrency: 2,
            deadline_margin: Duration::from_secs(60),
            log_format: LogFormat::Text,
            glue_database: None,
            open_hour_every: None,
        }
    }
}

fn number<T: std::str::FromStr>(setting: &'static str, text: &str) -> Result<T, ConfigError> {
    text.trim()
        .parse()
        .map_err(|_| bad(setting, format!("{text:?} is not a whole number")))
}

/// Parses `jsonl,parquet,avro` into formats in a fixed order.
pub fn parse_formats(text: &str) -> Result<Vec<Format>, ConfigError> {
    let mut formats = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let f: Format = part.parse().map_err(|e: cdc_contract::ParseError| {
            bad(
                "OUTPUT_FORMATS",
                format!("{:?} is not jsonl, parquet or avro", e.input),
            )
        })?;
        if !formats.contains(&f) {
            formats.push(f);
        }
    }
    if formats.is_empty() {
        return Err(bad(
            "OUTPUT_FORMATS",
            "names no format (jsonl, parquet, avro)",
        ));
    }
    formats.sort();
    Ok(formats)
}

impl Flags {
    /// Validates every setting, naming the first one that is wrong.
    pub fn validate(&self, under_lambda: bool) -> Result<Settings, ConfigError> {
        let shared = self
            .shared
            .validate(
                Duration::from_secs(30),
                if under_lambda {
                    LogFormat::Json
                } else {
                    LogFormat::Text
                },
            )
            .map_err(|e| bad(e.setting, e.problem))?;
        let bucket = shared
            .bucket
            .clone()
            .ok_or_else(|| bad("S3_BUCKET_NAME", "is required"))?;
        let ledger_table = shared
            .ledger_table
            .clone()
            .ok_or_else(|| bad("LEDGER_TABLE", "is required"))?;
        let formats = parse_formats(&self.output_formats)?;
        let slot = self
            .slot_name
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        if let Some(s) = &slot {
            if s.contains('#') {
                return Err(bad("CDC_SLOT_NAME", format!("{s:?} contains '#'")));
            }
        }
        let part_max_bytes: u64 = number("PART_MAX_BYTES", &self.part_max_bytes)?;
        if part_max_bytes < 4096 {
            return Err(bad("PART_MAX_BYTES", "must be at least 4096"));
        }
        let row_group_bytes: u64 = number("PARQUET_ROW_GROUP_BYTES", &self.row_group_bytes)?;
        if row_group_bytes < 4096 {
            return Err(bad("PARQUET_ROW_GROUP_BYTES", "must be at least 4096"));
        }
        let compression = self
            .parquet_compression
            .parse()
            .map_err(|e| bad("PARQUET_COMPRESSION", e))?;
        let jsonl_gzip_level: u32 = number("JSONL_GZIP_LEVEL", &self.jsonl_gzip_level)?;
        if !(1..=9).contains(&jsonl_gzip_level) {
            return Err(bad("JSONL_GZIP_LEVEL", "must be between 1 and 9"));
        }
        let jsonl_compression =
            self.jsonl_compression
                .parse()
                .map_err(|e: cdc_contract::ParseError| {
                    bad(
                        "JSONL_COMPRESSION",
                        format!("{:?} is not gzip or zstd", e.input),
                    )
                })?;
        let avro_codec = self.avro_codec.parse().map_err(|e| bad("AVRO_CODEC", e))?;
        let dead_letter_queue_url = self
            .dead_letter_queue_url
            .as_deref()
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned);
        if let Some(u) = &dead_letter_queue_url {
            if !(u.starts_with("https://") || u.starts_with("http://")) {
                return Err(bad("DEAD_LETTER_QUEUE_URL", format!("{u:?} is not a URL")));
            }
        }
        let claim: u64 = number("HOUR_CLAIM_SECONDS", &self.hour_claim_seconds)?;
        if claim == 0 {
            return Err(bad("HOUR_CLAIM_SECONDS", "must be at least 1"));
        }
        let straggler: u64 = number("STRAGGLER_WINDOW_SECONDS", &self.straggler_window_seconds)?;
        let concurrency: usize = number("COMPACT_CONCURRENCY", &self.concurrency)?;
        if concurrency == 0 || concurrency > 64 {
            return Err(bad("COMPACT_CONCURRENCY", "must be between 1 and 64"));
        }
        let margin: u64 = number("DEADLINE_MARGIN_SECONDS", &self.deadline_margin_seconds)?;
        let glue_database = match self.glue_database.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(db)
                if db.len() <= 255
                    && db
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') =>
            {
                Some(db.to_owned())
            }
            Some(db) => {
                return Err(bad(
                    "GLUE_DATABASE",
                    format!("{db:?} is not a Glue database name (lowercase letters, digits, _)"),
                ))
            }
        };
        let open_minutes: u64 =
            number("OPEN_HOUR_COMPACT_MINUTES", &self.open_hour_compact_minutes)?;
        if open_minutes > 60 {
            return Err(bad(
                "OPEN_HOUR_COMPACT_MINUTES",
                "must be between 0 (off) and 60",
            ));
        }
        Ok(Settings {
            bucket,
            base_path: shared.base_path.trim().to_owned(),
            ledger_table,
            formats,
            slot,
            close_grace: shared.close_grace,
            part_max_bytes,
            row_group_bytes,
            compression,
            jsonl_gzip_level,
            jsonl_compression,
            avro_codec,
            dead_letter_queue_url,
            aws_attempt_timeout: shared.aws_attempt_timeout,
            hour_claim: Duration::from_secs(claim),
            straggler_window: Duration::from_secs(straggler),
            concurrency,
            deadline_margin: Duration::from_secs(margin),
            log_format: shared.log_format,
            glue_database,
            open_hour_every: (open_minutes > 0).then(|| Duration::from_secs(open_minutes * 60)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        flags: Flags,
    }

    fn settings(args: &[&str]) -> Flags {
        let mut all = vec!["compactor"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().flags
    }

    #[test]
    fn defaults_validate_once_bucket_and_table_are_given() {
        let c = settings(&["--s3-bucket", "b", "--ledger-table", "t"])
            .validate(false)
            .unwrap();
        assert_eq!(c.formats, vec![Format::Jsonl, Format::Parquet]);
        assert_eq!(c.part_max_bytes, 128 * 1024 * 1024);
        assert_eq!(c.compression, Compression::Snappy);
        assert_eq!(c.jsonl_compression, JsonlCompression::Gzip);
        assert_eq!(c.avro_codec, AvroCodec::Deflate);
        assert_eq!(c.close_grace, Duration::from_secs(300));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.slot, None);
    }

    #[test]
    fn errors_name_the_setting() {
        let err = |args: &[&str]| settings(args).validate(false).unwrap_err().setting;
        assert_eq!(err(&["--ledger-table", "t"]), "S3_BUCKET_NAME");
        assert_eq!(err(&["--s3-bucket", "b"]), "LEDGER_TABLE");
        let base = ["--s3-bucket", "b", "--ledger-table", "t"];
        let with = |extra: &[&str]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            err(&v)
        };
        assert_eq!(with(&["--output-formats", "csv"]), "OUTPUT_FORMATS");
        assert_eq!(with(&["--output-formats", " , "]), "OUTPUT_FORMATS");
        assert_eq!(
            with(&["--parquet-compression", "brotli"]),
            "PARQUET_COMPRESSION"
        );
        assert_eq!(with(&["--part-max-bytes", "12MB"]), "PART_MAX_BYTES");
        assert_eq!(with(&["--jsonl-gzip-level", "0"]), "JSONL_GZIP_LEVEL");
        assert_eq!(
            with(&["--jsonl-compression", "brotli"]),
            "JSONL_COMPRESSION"
        );
        assert_eq!(with(&["--avro-codec", "bzip2"]), "AVRO_CODEC");
        assert_eq!(with(&["--glue-database", "My-DB"]), "GLUE_DATABASE");
        assert_eq!(
            with(&["--open-hour-compact-minutes", "61"]),
            "OPEN_HOUR_COMPACT_MINUTES"
        );
        assert_eq!(
            with(&["--open-hour-compact-minutes", "5m"]),
            "OPEN_HOUR_COMPACT_MINUTES"
        );
        assert_eq!(
            with(&["--aws-attempt-timeout-ms", "5"]),
            "AWS_ATTEMPT_TIMEOUT_MS"
        );
        assert_eq!(with(&["--close-grace-seconds=-1"]), "CLOSE_GRACE_SECONDS");
        assert_eq!(with(&["--log-format", "xml"]), "LOG_FORMAT");
        assert_eq!(
            with(&["--dead-letter-queue-url", "queue"]),
            "DEAD_LETTER_QUEUE_URL"
        );
    }

    #[test]
    fn formats_parse_in_a_fixed_order_without_repeats() {
        assert_eq!(
            parse_formats("parquet, jsonl,parquet").unwrap(),
            vec![Format::Jsonl, Format::Parquet]
        );
        assert_eq!(parse_formats("parquet").unwrap(), vec![Format::Parquet]);
        assert_eq!(
            parse_formats("avro,jsonl,parquet").unwrap(),
            vec![Format::Jsonl, Format::Parquet, Format::Avro]
        );
    }

    #[test]
    fn jsonl_compression_and_avro_codec_parse() {
        let c = settings(&[
            "--s3-bucket",
            "b",
            "--ledger-table",
            "t",
            "--jsonl-compression",
            "ZSTD",
            "--avro-codec",
            "snappy",
            "--output-formats",
            "avro",
        ])
        .validate(false)
        .unwrap();
        assert_eq!(c.jsonl_compression, JsonlCompression::Zstd);
        assert_eq!(c.avro_codec, AvroCodec::Snappy);
        assert_eq!(c.formats, vec![Format::Avro]);
        assert_eq!("zstd".parse::<AvroCodec>(), Ok(AvroCodec::Zstd));
        assert_eq!("deflate".parse::<AvroCodec>(), Ok(AvroCodec::Deflate));
    }
}
