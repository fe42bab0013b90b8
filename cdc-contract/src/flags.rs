//! The settings both binaries share, as one clap struct each flattens, parsed and validated here
//! once: where the data and the ledger live, when an hour closes, how long an AWS request attempt
//! may take, how logs look. `CLOSE_GRACE_SECONDS` and `AWS_ATTEMPT_TIMEOUT_MS` cannot drift
//! between the capture and the compactor. In both crates, "flags" are what was given and
//! "settings" what was validated.

use std::time::Duration;

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (CloudWatch Logs Insights).
    Json,
    /// Human-readable lines.
    Text,
}

/// The shared flags as given (flags or environment; flags win).
#[derive(Debug, Clone, clap::Args)]
pub struct SharedFlags {
    /// Bucket holding the staging batches and the final files.
    #[arg(long = "s3-bucket", env = "S3_BUCKET_NAME")]
    pub s3_bucket: Option<String>,
    /// Prefix of every key the pipeline writes (may be empty).
    #[arg(long = "s3-base-path", env = "S3_BASE_PATH", default_value = "")]
    pub s3_base_path: String,
    /// The DynamoDB ledger table.
    #[arg(long = "ledger-table", env = "LEDGER_TABLE")]
    pub ledger_table: Option<String>,
    /// Grace period after an hour's end before the hour closes (s): the capture notifies when
    /// its checkpoint passes it, the compactor closes the hour. One setting for both.
    #[arg(
        long = "close-grace-seconds",
        env = "CLOSE_GRACE_SECONDS",
        default_value = "300"
    )]
    pub close_grace_seconds: String,
    /// Time limit of one AWS request attempt (ms); a slower answer counts as a failed attempt and
    /// is retried. Default: 10000 for the capture, 30000 for the compactor (part uploads).
    #[arg(long = "aws-attempt-timeout-ms", env = "AWS_ATTEMPT_TIMEOUT_MS")]
    pub aws_attempt_timeout_ms: Option<String>,
    /// Log format: json or text (default: text; the compactor under Lambda: json).
    #[arg(long = "log-format", env = "LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// The shared settings, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedSettings {
    /// The bucket, if given (each binary says when it is required).
    pub bucket: Option<String>,
    /// The base path.
    pub base_path: String,
    /// The ledger table, if given.
    pub ledger_table: Option<String>,
    /// The close grace period.
    pub close_grace: Duration,
    /// The time limit of one AWS request attempt.
    pub aws_attempt_timeout: Duration,
    /// The log format.
    pub log_format: LogFormat,
}

/// A shared setting that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{setting}: {problem}")]
pub struct FlagError {
    /// The environment variable (and flag) at fault.
    pub setting: &'static str,
    /// Why.
    pub problem: String,
}

fn bad(setting: &'static str, problem: impl Into<String>) -> FlagError {
    FlagError {
        setting,
        problem: problem.into(),
    }
}

fn number(setting: &'static str, text: &str) -> Result<u64, FlagError> {
    text.trim()
        .parse()
        .map_err(|_| bad(setting, format!("{text:?} is not a whole number")))
}

fn nonblank(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

impl SharedFlags {
    /// The log format asked for, or `default` (also when the value is bad: validation says so).
    pub fn log_format_or(&self, default: LogFormat) -> LogFormat {
        parse_log_format(self.log_format.as_deref()).unwrap_or(default)
    }

    /// Validates the shared flags; `attempt_default` and `log_default` are the binary's own.
    pub fn validate(
        &self,
        attempt_default: Duration,
        log_default: LogFormat,
    ) -> Result<SharedSettings, FlagError> {
        let close_grace =
            Duration::from_secs(number("CLOSE_GRACE_SECONDS", &self.close_grace_seconds)?);
        let aws_attempt_timeout = match self.aws_attempt_timeout_ms.as_deref() {
            None => attempt_default,
            Some(text) => Duration::from_millis(number("AWS_ATTEMPT_TIMEOUT_MS", text)?),
        };
        if aws_attempt_timeout < Duration::from_millis(100) {
            return Err(bad("AWS_ATTEMPT_TIMEOUT_MS", "must be at least 100"));
        }
        let log_format = match self.log_format.as_deref().map(str::trim) {
            None | Some("") => log_default,
            Some(f) => parse_log_format(Some(f))
                .ok_or_else(|| bad("LOG_FORMAT", format!("{f:?} is not json or text")))?,
        };
        Ok(SharedSettings {
            bucket: nonblank(&self.s3_bucket),
            base_path: self.s3_base_path.clone(),
            ledger_table: nonblank(&self.ledger_table),
            close_grace,
            aws_attempt_timeout,
            log_format,
        })
    }
}

impl SharedSettings {
    /// The AWS SDK's timeouts: 3 s to connect, `AWS_ATTEMPT_TIMEOUT_MS` per request attempt (a
    /// stalled connection otherwise holds a call as long as the server keeps it open).
    pub fn aws_timeouts(&self) -> aws_smithy_types::timeout::TimeoutConfig {
        aws_timeouts(self.aws_attempt_timeout)
    }
}

/// The AWS SDK's timeouts every binary uses: 3 s to connect, `attempt` per request attempt.
pub fn aws_timeouts(attempt: Duration) -> aws_smithy_types::timeout::TimeoutConfig {
    aws_smithy_types::timeout::TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(3))
        .operation_attempt_timeout(attempt)
        .build()
}

fn parse_log_format(text: Option<&str>) -> Option<LogFormat> {
    match text.map(|t| t.trim().to_ascii_lowercase()).as_deref() {
        Some("json") => Some(LogFormat::Json),
        Some("text") => Some(LogFormat::Text),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        shared: SharedFlags,
    }

    fn flags(args: &[&str]) -> SharedFlags {
        let mut all = vec!["x"];
        all.extend_from_slice(args);
        match Cli::try_parse_from(all) {
            Ok(cli) => cli.shared,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_are_the_binarys_own_and_errors_name_the_setting() {
        let s = flags(&[]).validate(Duration::from_secs(10), LogFormat::Text);
        assert_eq!(
            s.as_ref()
                .map(|s| (s.close_grace, s.aws_attempt_timeout, s.log_format)),
            Ok((
                Duration::from_secs(300),
                Duration::from_secs(10),
                LogFormat::Text
            ))
        );
        let err = |args: &[&str]| {
            flags(args)
                .validate(Duration::from_secs(10), LogFormat::Text)
                .map_err(|e| e.setting)
        };
        assert_eq!(
            err(&["--close-grace-seconds=-1"]).err(),
            Some("CLOSE_GRACE_SECONDS")
        );
        assert_eq!(
            err(&["--aws-attempt-timeout-ms", "5"]).err(),
            Some("AWS_ATTEMPT_TIMEOUT_MS")
        );
        assert_eq!(
            err(&["--aws-attempt-timeout-ms", "soon"]).err(),
            Some("AWS_ATTEMPT_TIMEOUT_MS")
        );
        assert_eq!(err(&["--log-format", "xml"]).err(), Some("LOG_FORMAT"));
        let s = flags(&[
            "--log-format",
            "JSON",
            "--s3-bucket",
            " ",
            "--ledger-table",
            "t",
        ])
        .validate(Duration::from_secs(10), LogFormat::Text);
        assert_eq!(s.as_ref().map(|s| s.log_format), Ok(LogFormat::Json));
        assert_eq!(
            s.as_ref().map(|s| s.bucket.clone()),
            Ok(None),
            "a blank bucket is none"
        );
        assert_eq!(s.map(|s| s.ledger_table), Ok(Some("t".to_owned())));
    }
}
