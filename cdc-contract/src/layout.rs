//! Where things live on S3. Every key the pipeline writes is built here.

use crate::{Hour, Position, TableName};

/// The final formats, each with its own table location.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Format {
    /// Compressed JSON lines of change events (gzip or zstd: [`JsonlCompression`]).
    Jsonl,
    /// Flat, typed Parquet.
    Parquet,
    /// Flat, typed Avro object container files (the Parquet rows' columns).
    Avro,
}

/// Every final format.
pub const FORMATS: [Format; 3] = [Format::Jsonl, Format::Parquet, Format::Avro];

/// Compression of final JSONL parts (`JSONL_COMPRESSION`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum JsonlCompression {
    /// gzip, `.jsonl.gz` (the default).
    #[default]
    Gzip,
    /// Zstandard, `.jsonl.zst`.
    Zstd,
}

impl JsonlCompression {
    /// The file extension of JSONL parts so compressed, without the leading dot.
    pub fn extension(self) -> &'static str {
        match self {
            JsonlCompression::Gzip => "jsonl.gz",
            JsonlCompression::Zstd => "jsonl.zst",
        }
    }
}

impl std::str::FromStr for JsonlCompression {
    type Err = crate::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "gzip" => Ok(JsonlCompression::Gzip),
            "zstd" => Ok(JsonlCompression::Zstd),
            other => Err(crate::ParseError::new(
                "JSONL compression (gzip or zstd)",
                other,
            )),
        }
    }
}

impl Format {
    /// The format's folder name.
    pub fn dir(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
            Format::Avro => "avro",
        }
    }

    /// The file extension, without the leading dot (JSONL: gzipped, the default; a layout
    /// knows the configured one, [`Layout::extension`]).
    pub fn extension(self) -> &'static str {
        match self {
            Format::Jsonl => JsonlCompression::Gzip.extension(),
            Format::Parquet => "parquet",
            Format::Avro => "avro",
        }
    }

    /// Every extension files of this format may have (JSONL: each compression).
    pub fn extensions(self) -> &'static [&'static str] {
        match self {
            Format::Jsonl => &["jsonl.gz", "jsonl.zst"],
            Format::Parquet => &["parquet"],
            Format::Avro => &["avro"],
        }
    }
}

impl std::str::FromStr for Format {
    type Err = crate::ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "jsonl" => Ok(Format::Jsonl),
            "parquet" => Ok(Format::Parquet),
            "avro" => Ok(Format::Avro),
            other => Err(crate::ParseError::new(
                "output format (jsonl, parquet or avro)",
                other,
            )),
        }
    }
}

/// The S3 layout under one base path (`S3_BASE_PATH`, may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    base: String,
    jsonl: JsonlCompression,
}

impl Layout {
    /// A layout under `base`; leading and trailing slashes are ignored.
    pub fn new(base: &str) -> Self {
        Self {
            base: base.trim_matches('/').to_owned(),
            jsonl: JsonlCompression::Gzip,
        }
    }

    /// The same layout, naming JSONL parts for `compression` (default gzip).
    pub fn with_jsonl_compression(mut self, compression: JsonlCompression) -> Self {
        self.jsonl = compression;
        self
    }

    /// The extension of this layout's final files of `format`, without the leading dot.
    pub fn extension(&self, format: Format) -> &'static str {
        match format {
            Format::Jsonl => self.jsonl.extension(),
            other => other.extension(),
        }
    }

    fn join(&self, rest: std::fmt::Arguments<'_>) -> String {
        if self.base.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{}", self.base, rest)
        }
    }

    /// `{base}/_staging/{schema}.{table}/{YYYY}/{MM}/{DD}/{HH}/{first}-{last}.jsonl.gz`
    pub fn staging_key(
        &self,
        table: &TableName,
        hour: Hour,
        first: Position,
        last: Position,
    ) -> String {
        self.join(format_args!(
            "_staging/{table}/{}/{}-{}.jsonl.gz",
            hour.staging_path(),
            first.key(),
            last.key()
        ))
    }

    /// `{base}/{schema}.{table}/{format}`: a table location for one format.
    pub fn table_prefix(&self, table: &TableName, format: Format) -> String {
        self.join(format_args!("{table}/{}", format.dir()))
    }

    /// `{base}/{schema}.{table}/{format}/year=YYYY/month=MM/day=DD/hour=HH`
    pub fn hour_prefix(&self, table: &TableName, format: Format, hour: Hour) -> String {
        self.join(format_args!(
            "{table}/{}/{}",
            format.dir(),
            hour.partition_path()
        ))
    }

    /// A final part: `{hour prefix}/{table}-{YYYY}-{MM}-{DD}-{HH}-{NNN}-{attempt}.{ext}`.
    pub fn part_key(
        &self,
        table: &TableName,
        format: Format,
        hour: Hour,
        part: u32,
        attempt: &str,
    ) -> String {
        format!(
            "{}/{}-{}-{:03}-{}.{}",
            self.hour_prefix(table, format, hour),
            table.key_name(),
            hour.file_stem(),
            part,
            attempt,
            self.extension(format)
        )
    }

    /// `{hour prefix}/_manifest.json`
    pub fn manifest_key(&self, table: &TableName, format: Format, hour: Hour) -> String {
        format!("{}/_manifest.json", self.hour_prefix(table, format, hour))
    }

    /// `{base}/_dead_letter/`: every dead letter is under it.
    pub fn dead_letter_prefix(&self) -> String {
        self.join(format_args!("_dead_letter/"))
    }

    /// `{base}/_dead_letter/{schema}.{table}/{YYYY}/{MM}/{DD}/{HH}/{name}`
    pub fn dead_letter_key(&self, table: &TableName, hour: Hour, name: &str) -> String {
        self.join(format_args!(
            "_dead_letter/{table}/{}/{name}",
            hour.staging_path()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;

    #[test]
    fn keys_follow_the_documented_layout() {
        let l = Layout::new("/cdc/prod/");
        let t = TableName::new("public", "users");
        let h: Hour = "2025-01-08T10".parse().unwrap();
        let a = Position::new(Lsn(0x16B3748), 1);
        let b = Position::new(Lsn(0x16B3790), 3);
        assert_eq!(
            l.staging_key(&t, h, a, b),
            "cdc/prod/_staging/public.users/2025/01/08/10/00000000016B3748.00000001-00000000016B3790.00000003.jsonl.gz"
        );
        assert_eq!(
            l.part_key(&t, Format::Parquet, h, 7, "a1b2c3"),
            "cdc/prod/public.users/parquet/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-007-a1b2c3.parquet"
        );
        assert_eq!(
            l.part_key(&t, Format::Jsonl, h, 7, "a1b2c3"),
            "cdc/prod/public.users/jsonl/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-007-a1b2c3.jsonl.gz"
        );
        assert_eq!(
            l.clone()
                .with_jsonl_compression(JsonlCompression::Zstd)
                .part_key(&t, Format::Jsonl, h, 7, "a1b2c3"),
            "cdc/prod/public.users/jsonl/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-007-a1b2c3.jsonl.zst"
        );
        assert_eq!(
            l.part_key(&t, Format::Avro, h, 0, "a1b2c3"),
            "cdc/prod/public.users/avro/year=2025/month=01/day=08/hour=10/users-2025-01-08-10-000-a1b2c3.avro"
        );
        assert_eq!(
            Layout::new("").manifest_key(&t, Format::Jsonl, h),
            "public.users/jsonl/year=2025/month=01/day=08/hour=10/_manifest.json"
        );
        assert_eq!(
            Layout::new("x").dead_letter_key(&t, h, "k.json"),
            "x/_dead_letter/public.users/2025/01/08/10/k.json"
        );
    }
}
