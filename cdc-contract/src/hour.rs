//! UTC hours: the partition of staging batches and final files.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use serde::{Deserialize, Serialize};

use crate::ParseError;

/// One UTC hour, written `2025-01-08T10`. Text order is time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hour {
    /// Hours since the Unix epoch.
    since_epoch: i64,
}

const MS_PER_HOUR: i64 = 3_600_000;

impl Hour {
    /// The hour holding a time given in milliseconds since the Unix epoch.
    pub fn from_millis(ms: i64) -> Self {
        Self {
            since_epoch: ms.div_euclid(MS_PER_HOUR),
        }
    }

    /// The hour holding a time given in microseconds since the Unix epoch.
    pub fn from_micros(us: i64) -> Self {
        Self::from_millis(us.div_euclid(1000))
    }

    /// Milliseconds since the epoch at the hour's start.
    pub fn start_millis(self) -> i64 {
        self.since_epoch * MS_PER_HOUR
    }

    /// Milliseconds since the epoch at the hour's end (the next hour's start).
    pub fn end_millis(self) -> i64 {
        (self.since_epoch + 1) * MS_PER_HOUR
    }

    /// The following hour.
    pub fn next(self) -> Self {
        Self {
            since_epoch: self.since_epoch + 1,
        }
    }

    fn datetime(self) -> DateTime<Utc> {
        DateTime::from_timestamp_millis(self.start_millis()).unwrap_or_default()
    }

    /// `YYYY/MM/DD/HH`, the staging layout's hour path.
    pub fn staging_path(self) -> String {
        let d = self.datetime();
        format!(
            "{:04}/{:02}/{:02}/{:02}",
            d.year(),
            d.month(),
            d.day(),
            d.hour()
        )
    }

    /// `year=YYYY/month=MM/day=DD/hour=HH`, the final files' Hive partition path.
    pub fn partition_path(self) -> String {
        let d = self.datetime();
        format!(
            "year={:04}/month={:02}/day={:02}/hour={:02}",
            d.year(),
            d.month(),
            d.day(),
            d.hour()
        )
    }

    /// `YYYY-MM-DD-HH`, as in final file names.
    pub fn file_stem(self) -> String {
        let d = self.datetime();
        format!(
            "{:04}-{:02}-{:02}-{:02}",
            d.year(),
            d.month(),
            d.day(),
            d.hour()
        )
    }
}

impl fmt::Display for Hour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.datetime();
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}",
            d.year(),
            d.month(),
            d.day(),
            d.hour()
        )
    }
}

impl FromStr for Hour {
    type Err = ParseError;

    /// Parses `YYYY-MM-DDTHH`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::new("hour (expected YYYY-MM-DDTHH)", s);
        let (date, hour) = s.split_once('T').ok_or_else(err)?;
        let date = NaiveDate::parse_from_str(date, "%Y-%m-%d").map_err(|_| err())?;
        if hour.len() != 2 {
            return Err(err());
        }
        let hour: u32 = hour.parse().map_err(|_| err())?;
        let at = date.and_hms_opt(hour, 0, 0).ok_or_else(err)?;
        Ok(Hour::from_millis(at.and_utc().timestamp_millis()))
    }
}

impl Serialize for Hour {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Hour {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_format_in_every_layout() {
        let h: Hour = "2025-01-08T10".parse().unwrap();
        assert_eq!(h.to_string(), "2025-01-08T10");
        assert_eq!(h.staging_path(), "2025/01/08/10");
        assert_eq!(h.partition_path(), "year=2025/month=01/day=08/hour=10");
        assert_eq!(h.file_stem(), "2025-01-08-10");
        assert_eq!(h.next().to_string(), "2025-01-08T11");
        assert_eq!(Hour::from_millis(h.end_millis() - 1), h);
        assert_eq!(Hour::from_millis(h.end_millis()), h.next());
    }

    #[test]
    fn bad_hours_are_refused() {
        for bad in [
            "2025-01-08",
            "2025-01-08T1",
            "2025-13-08T10",
            "2025-01-08T24",
            "x",
        ] {
            assert!(bad.parse::<Hour>().is_err(), "{bad}");
        }
    }

    #[test]
    fn times_before_the_epoch_round_down() {
        assert_eq!(Hour::from_millis(-1).to_string(), "1969-12-31T23");
    }
}
