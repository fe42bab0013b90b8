//! Value conversion: one event value (its JSON text, as the capture wrote it; forms documented
//! in `cdc_contract::event`) to the typed value of its Parquet column. A value the column cannot
//! hold is refused, and the caller writes null there and the value's text into `_raw`.

use std::borrow::Cow;

use base64::Engine;
use chrono::NaiveDate;
use serde_json::value::RawValue;

use crate::parquet_schema::ColumnType;

/// A converted value, ready for its column's builder.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar<'a> {
    /// SQL NULL.
    Null,
    /// Any integer column (range already checked).
    Int(i64),
    /// Any float column.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Text (also JSON text).
    Text(Cow<'a, str>),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A decimal's unscaled value.
    Decimal(i128),
    /// Days since 1970-01-01.
    Days(i32),
    /// Microseconds (since midnight for times, since the epoch for timestamps).
    Micros(i64),
    /// A list of element values.
    List(Vec<Scalar<'a>>),
}

/// Why a value was refused (kept short: it is never logged with the value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// The text form of a JSON value for `_raw`: a string's content, else the JSON text.
pub fn text_form(raw: &str) -> Cow<'_, str> {
    if raw.starts_with('"') {
        json_str(raw).unwrap_or(Cow::Borrowed(raw))
    } else {
        Cow::Borrowed(raw)
    }
}

/// The content of a JSON string literal, borrowed when it has no escapes.
pub fn json_str(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// An ASCII byte that is not white space: no character that `str::trim` removes begins or
/// ends with it.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii() && !byte.is_ascii_whitespace() && byte != 0x0b
}

/// Converts the JSON text of one value to `ty`.
pub fn convert<'a>(ty: &ColumnType, raw: &'a str) -> Result<Scalar<'a>, Refused> {
    // A value read from a staged line has no whitespace around it: `trim` (which decodes
    // characters to find Unicode white space) only where an end byte may be white space.
    let raw = match raw.as_bytes() {
        [first, .., last] if is_plain(*first) && is_plain(*last) => raw,
        _ => raw.trim(),
    };
    if raw == "null" {
        return Ok(Scalar::Null);
    }
    match ty {
        ColumnType::Int16 => int(raw, i16::MIN as i64, i16::MAX as i64),
        ColumnType::Int32 => int(raw, i32::MIN as i64, i32::MAX as i64),
        ColumnType::Int64 => int(raw, i64::MIN, i64::MAX),
        ColumnType::Float32 | ColumnType::Float64 => float(raw).map(Scalar::Float),
        ColumnType::Decimal { precision, scale } => {
            let text = if raw.starts_with('"') {
                json_str(raw).ok_or(Refused)?
            } else {
                Cow::Borrowed(raw)
            };
            parse_decimal(&text, *precision, *scale).map(Scalar::Decimal)
        }
        ColumnType::Boolean => match raw {
            "true" => Ok(Scalar::Bool(true)),
            "false" => Ok(Scalar::Bool(false)),
            _ => Err(Refused),
        },
        ColumnType::Utf8 => Ok(Scalar::Text(text_form(raw))),
        ColumnType::Json => Ok(Scalar::Text(Cow::Borrowed(raw))),
        ColumnType::Binary => {
            let text = string(raw)?;
            base64::engine::general_purpose::STANDARD
                .decode(text.as_bytes())
                .map(Scalar::Bytes)
                .map_err(|_| Refused)
        }
        ColumnType::Date32 => parse_date(&string(raw)?).map(Scalar::Days),
        ColumnType::Time64 => parse_time(&string(raw)?).map(Scalar::Micros),
        ColumnType::Timestamp => parse_timestamp(&string(raw)?, false).map(Scalar::Micros),
        ColumnType::TimestampTz => parse_timestamp(&string(raw)?, true).map(Scalar::Micros),
        ColumnType::List(elem) => {
            if !raw.starts_with('[') {
                return Err(Refused);
            }
            let items: Vec<&'a RawValue> = serde_json::from_str(raw).map_err(|_| Refused)?;
            items
                .into_iter()
                .map(|item| {
                    let text = item.get();
                    // One dimension only: a nested array does not fit a list of scalars.
                    if text.starts_with('[') && !matches!(**elem, ColumnType::Json) {
                        return Err(Refused);
                    }
                    convert(elem, text)
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Scalar::List)
        }
    }
}

fn string(raw: &str) -> Result<Cow<'_, str>, Refused> {
    json_str(raw).ok_or(Refused)
}

fn int(raw: &str, min: i64, max: i64) -> Result<Scalar<'static>, Refused> {
    let v: i64 = raw.parse().map_err(|_| Refused)?;
    if v < min || v > max {
        return Err(Refused);
    }
    Ok(Scalar::Int(v))
}

fn float(raw: &str) -> Result<f64, Refused> {
    match raw {
        "\"NaN\"" => Ok(f64::NAN),
        "\"Infinity\"" => Ok(f64::INFINITY),
        "\"-Infinity\"" => Ok(f64::NEG_INFINITY),
        _ if raw.starts_with('"') => Err(Refused),
        _ => raw.parse().map_err(|_| Refused),
    }
}

/// Parses an exact decimal text (`-123.45`) into its unscaled value at `scale`; refuses NaN,
/// infinities, exponents, more fractional digits than the scale (unless zeros) and values that
/// do not fit `precision`.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, Refused> {
    if scale < 0 || precision == 0 || precision > 38 {
        return Err(Refused);
    }
    let scale = scale as usize;
    let (negative, digits) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (int_part, frac_part) = match digits.split_once('.') {
        Some((i, f)) => (i, f),
        None => (digits, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(Refused);
    }
    let frac_part = if frac_part.len() > scale {
        let (keep, extra) = frac_part.split_at(scale);
        if !extra.bytes().all(|b| b == b'0') {
            return Err(Refused);
        }
        keep
    } else {
        frac_part
    };
    let int_part = int_part.trim_start_matches('0');
    if int_part.len() + scale > precision as usize {
        return Err(Refused);
    }
    let mut value: i128 = 0;
    for b in int_part.bytes().chain(frac_part.bytes()) {
        value = value * 10 + i128::from(b - b'0');
    }
    for _ in frac_part.len()..scale {
        value *= 10;
    }
    Ok(if negative { -value } else { value })
}

fn digits(s: &[u8]) -> Option<u32> {
    if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
        return None;
    }
    s.iter().try_fold(0u32, |acc, b| {
        acc.checked_mul(10)?.checked_add(u32::from(b - b'0'))
    })
}

const UNIX_EPOCH_DAYS_FROM_CE: i32 = 719_163;

/// `YYYY-MM-DD` to days since 1970-01-01; refuses `infinity`, BC dates and other forms.
pub fn parse_date(text: &str) -> Result<i32, Refused> {
    let b = text.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(Refused);
    }
    let y = digits(&b[0..4]).ok_or(Refused)?;
    let m = digits(&b[5..7]).ok_or(Refused)?;
    let d = digits(&b[8..10]).ok_or(Refused)?;
    let date = NaiveDate::from_ymd_opt(y as i32, m, d).ok_or(Refused)?;
    Ok(chrono::Datelike::num_days_from_ce(&date) - UNIX_EPOCH_DAYS_FROM_CE)
}

/// `HH:MM:SS[.ffffff]` to microseconds since midnight (`24:00:00` included, as PostgreSQL allows).
pub fn parse_time(text: &str) -> Result<i64, Refused> {
    let b = text.as_bytes();
    if b.len() < 8 || b[2] != b':' || b[5] != b':' {
        return Err(Refused);
    }
    let h = i64::from(digits(&b[0..2]).ok_or(Refused)?);
    let m = i64::from(digits(&b[3..5]).ok_or(Refused)?);
    let s = i64::from(digits(&b[6..8]).ok_or(Refused)?);
    let frac = match &b[8..] {
        [] => 0,
        [b'.', f @ ..] if !f.is_empty() && f.len() <= 6 => {
            i64::from(digits(f).ok_or(Refused)?) * 10i64.pow(6 - f.len() as u32)
        }
        _ => return Err(Refused),
    };
    if m > 59 || s > 59 || h > 24 || (h == 24 && (m, s, frac) != (0, 0, 0)) {
        return Err(Refused);
    }
    Ok(((h * 60 + m) * 60 + s) * 1_000_000 + frac)
}

/// `YYYY-MM-DDTHH:MM:SS.ffffff` (with `Z` when `zoned`) to microseconds since the epoch;
/// refuses `infinity` and other forms.
pub fn parse_timestamp(text: &str, zoned: bool) -> Result<i64, Refused> {
    let text = if zoned {
        text.strip_suffix('Z')
            .or_else(|| text.strip_suffix("+00:00"))
            .ok_or(Refused)?
    } else {
        text
    };
    if text.len() < 19 || text.as_bytes()[10] != b'T' {
        return Err(Refused);
    }
    let days = i64::from(parse_date(&text[..10])?);
    let time = parse_time(&text[11..])?;
    Ok(days * 86_400_000_000 + time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, NaiveDateTime, Timelike};
    use proptest::prelude::*;

    fn ok(ty: ColumnType, raw: &str) -> Scalar<'_> {
        convert(&ty, raw).unwrap_or_else(|_| panic!("{raw} refused as {ty:?}"))
    }

    fn refused(ty: ColumnType, raw: &str) -> bool {
        convert(&ty, raw).is_err()
    }

    #[test]
    fn a_plain_byte_never_begins_or_ends_white_space() {
        for byte in 0..=u8::MAX {
            let plain = byte.is_ascii() && !char::from(byte).is_whitespace();
            assert_eq!(is_plain(byte), plain, "byte {byte:#04x}");
        }
        // Values with white space around them are still read (the trim is only skipped when
        // neither end can be white space).
        assert_eq!(ok(ColumnType::Int64, " 42\u{b}"), Scalar::Int(42));
        assert_eq!(ok(ColumnType::Int64, "\u{a0}7\u{3000}"), Scalar::Int(7));
        assert_eq!(ok(ColumnType::Boolean, "true"), Scalar::Bool(true));
        assert_eq!(ok(ColumnType::Int64, "5"), Scalar::Int(5));
    }

    #[test]
    fn integers_and_floats_convert_with_range_checks() {
        assert_eq!(ok(ColumnType::Int16, "-32768"), Scalar::Int(-32768));
        assert!(refused(ColumnType::Int16, "32768"));
        assert_eq!(
            ok(ColumnType::Int64, "9223372036854775807"),
            Scalar::Int(i64::MAX)
        );
        assert!(refused(ColumnType::Int32, "\"12\""));
        assert!(refused(ColumnType::Int32, "1.5"));
        assert_eq!(ok(ColumnType::Float64, "1.5e+20"), Scalar::Float(1.5e20));
        assert!(matches!(ok(ColumnType::Float64, "\"NaN\""), Scalar::Float(f) if f.is_nan()));
        assert_eq!(
            ok(ColumnType::Float32, "\"-Infinity\""),
            Scalar::Float(f64::NEG_INFINITY)
        );
        assert_eq!(ok(ColumnType::Int32, "null"), Scalar::Null);
    }

    #[test]
    fn decimals_are_exact_and_nan_is_refused() {
        let d = |p, s| ColumnType::Decimal {
            precision: p,
            scale: s,
        };
        assert_eq!(ok(d(10, 2), "\"1234.50\""), Scalar::Decimal(123450));
        assert_eq!(ok(d(10, 2), "\"-0.05\""), Scalar::Decimal(-5));
        assert_eq!(ok(d(10, 2), "\"7\""), Scalar::Decimal(700));
        assert_eq!(
            ok(d(38, 0), "\"99999999999999999999999999999999999999\""),
            Scalar::Decimal(99_999_999_999_999_999_999_999_999_999_999_999_999)
        );
        assert!(refused(d(10, 2), "\"NaN\""));
        assert!(refused(d(10, 2), "\"Infinity\""));
        assert!(refused(d(4, 2), "\"123.45\""));
        assert!(refused(d(10, 2), "\"1.234\""));
        assert!(refused(d(10, 2), "\"1e5\""));
        assert_eq!(ok(d(10, 2), "\"1.2300\""), Scalar::Decimal(123));
    }

    #[test]
    fn times_dates_and_timestamps_convert_and_infinity_is_refused() {
        assert_eq!(ok(ColumnType::Date32, "\"1970-01-02\""), Scalar::Days(1));
        assert_eq!(ok(ColumnType::Date32, "\"1969-12-31\""), Scalar::Days(-1));
        assert!(refused(ColumnType::Date32, "\"infinity\""));
        assert!(refused(ColumnType::Date32, "\"0044-03-15 BC\""));
        assert_eq!(
            ok(ColumnType::Time64, "\"10:30:00.5\""),
            Scalar::Micros((10 * 3600 + 30 * 60) * 1_000_000 + 500_000)
        );
        assert_eq!(
            ok(ColumnType::Time64, "\"24:00:00\""),
            Scalar::Micros(86_400_000_000)
        );
        assert!(refused(ColumnType::Time64, "\"10:30:00+02\""));
        assert_eq!(
            ok(ColumnType::TimestampTz, "\"2025-01-08T10:30:00.123456Z\""),
            Scalar::Micros(1_736_332_200_123_456)
        );
        assert_eq!(
            ok(ColumnType::Timestamp, "\"2025-01-08T10:30:00.000000\""),
            Scalar::Micros(1_736_332_200_000_000)
        );
        assert!(refused(ColumnType::TimestampTz, "\"infinity\""));
        assert!(refused(ColumnType::TimestampTz, "\"2025-01-08T10:30:00\""));
    }

    #[test]
    fn text_json_bytes_and_lists_convert() {
        assert_eq!(
            ok(ColumnType::Utf8, "\"a\\\"b\""),
            Scalar::Text(Cow::Owned("a\"b".into()))
        );
        assert_eq!(
            ok(ColumnType::Json, "{\"a\": [1, 2]}"),
            Scalar::Text(Cow::Borrowed("{\"a\": [1, 2]}"))
        );
        assert_eq!(
            ok(ColumnType::Binary, "\"SGVsbG8=\""),
            Scalar::Bytes(b"Hello".to_vec())
        );
        assert!(refused(ColumnType::Binary, "\"not base64!\""));
        let ints = ColumnType::List(Box::new(ColumnType::Int32));
        assert_eq!(
            ok(ints.clone(), "[1,null,3]"),
            Scalar::List(vec![Scalar::Int(1), Scalar::Null, Scalar::Int(3)])
        );
        assert_eq!(ok(ints.clone(), "[]"), Scalar::List(vec![]));
        assert!(refused(ints.clone(), "[[1,2],[3,4]]"));
        assert!(refused(ints, "\"[0:1]={1,2}\""));
        assert_eq!(text_form("\"x\\ny\""), "x\ny");
        assert_eq!(text_form("[1,2]"), "[1,2]");
    }

    proptest! {
        #[test]
        fn decimals_round_trip_through_their_text(unscaled in -(10i128.pow(18))..10i128.pow(18), scale in 0i8..10) {
            let precision = 28u8;
            let div = 10i128.pow(scale as u32);
            let sign = if unscaled < 0 { "-" } else { "" };
            let abs = unscaled.abs();
            let text = if scale == 0 {
                format!("{sign}{abs}")
            } else {
                format!("{sign}{}.{:0width$}", abs / div, abs % div, width = scale as usize)
            };
            prop_assert_eq!(parse_decimal(&text, precision, scale), Ok(unscaled));
        }

        #[test]
        fn timestamps_agree_with_chrono(secs in -2_000_000_000i64..4_000_000_000i64, micros in 0u32..1_000_000) {
            let dt = DateTime::from_timestamp(secs, micros * 1000).unwrap().naive_utc();
            let text = dt.format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
            let expected = dt.and_utc().timestamp_micros();
            prop_assert_eq!(parse_timestamp(&text, false), Ok(expected));
            prop_assert_eq!(parse_timestamp(&format!("{text}Z"), true), Ok(expected));
            let time = dt.time();
            let back = NaiveDateTime::new(dt.date(), time);
            prop_assert_eq!(back.hour(), dt.hour());
        }

        #[test]
        fn arbitrary_text_never_panics(s in ".{0,40}") {
            let raw = serde_json::to_string(&s).unwrap();
            for ty in [ColumnType::Int32, ColumnType::Float64, ColumnType::Date32, ColumnType::Time64,
                       ColumnType::TimestampTz, ColumnType::Binary,
                       ColumnType::Decimal { precision: 10, scale: 2 },
                       ColumnType::List(Box::new(ColumnType::Int64))] {
                let _ = convert(&ty, &raw);
                let _ = convert(&ty, &s);
            }
        }
    }
}
