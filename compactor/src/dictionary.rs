//! Which columns of a Parquet part are written without a dictionary.
//!
//! Parquet's writer dictionary-encodes every column and falls back to plain encoding only once
//! a column chunk's dictionary outgrows its page limit (1 MiB): a column of (nearly) distinct
//! values, such as a key, a sequence or a timestamp, pays for hashing every value into a
//! dictionary that saves nothing, up to 131,072 values of each row group for a 64-bit column.
//! That hashing was about a tenth of the compaction's CPU on a 5,000,000-row hour.
//!
//! The part's first batch of rows decides, column by column: a column whose values repeat
//! there less than half as often as values drawn from [`USEFUL_DISTINCT`] distinct ones would
//! (the birthday bound) is written without a dictionary for the whole part. A column with
//! fewer distinct values than that keeps its dictionary when they come in no particular order
//! (at 1,024 values drawn from 50,000 it repeats about ten times, against about four expected
//! of 131,072) or when the first batch holds more rows than it has distinct values. A column
//! whose values come in order, cycling over more of them than the first batch holds, looks
//! distinct there and loses a dictionary that would have paid: a larger file, never other
//! values. Too small a batch ([`MIN_SAMPLE`] values) decides nothing, and nested columns and
//! booleans are left as they are. The first batch is a chunk of about 1 MiB of staged text when
//! a batch is read whole, up to 8,192 rows when it is read line by line, so the same rows can
//! be encoded differently on the two paths.

use std::collections::HashSet;

use arrow::array::{Array, AsArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;

/// Non-null values a column needs in the first batch to be judged.
pub const MIN_SAMPLE: usize = 1024;

/// The number of distinct values past which a dictionary cannot pay within a row group: a
/// 64-bit column's dictionary reaches the writer's 1 MiB page limit there.
pub const USEFUL_DISTINCT: f64 = 131_072.0;

/// The top-level columns of `batch` to write without a dictionary.
pub fn without_dictionary(batch: &RecordBatch) -> Vec<String> {
    batch
        .schema()
        .fields()
        .iter()
        .zip(batch.columns())
        .filter(|(_, array)| {
            values_and_distinct(array.as_ref())
                .is_some_and(|(values, distinct)| rarely_repeats(values, distinct))
        })
        .map(|(field, _)| field.name().clone())
        .collect()
}

/// True when `values` values with `distinct` distinct ones repeat less than half as often as
/// values drawn uniformly from [`USEFUL_DISTINCT`] would.
fn rarely_repeats(values: usize, distinct: usize) -> bool {
    if values < MIN_SAMPLE {
        return false;
    }
    let m = values as f64;
    // Expected distinct values among m draws from D: D (1 - (1 - 1/D)^m).
    let expected_distinct = USEFUL_DISTINCT * (1.0 - (1.0 - 1.0 / USEFUL_DISTINCT).powf(m));
    let expected_repeats = m - expected_distinct;
    ((values - distinct) as f64) < expected_repeats / 2.0
}

/// The non-null values of `array` and how many of them are distinct, for the types a
/// dictionary can encode (not booleans, not nested types).
fn values_and_distinct(array: &dyn Array) -> Option<(usize, usize)> {
    fn count<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> (usize, usize) {
        let mut seen = HashSet::new();
        let mut n = 0;
        for v in values.flatten() {
            n += 1;
            seen.insert(v);
        }
        (n, seen.len())
    }
    Some(match array.data_type() {
        DataType::Utf8 => count(
            array
                .as_string::<i32>()
                .iter()
                .map(|v| v.map(str::as_bytes)),
        ),
        DataType::LargeUtf8 => count(
            array
                .as_string::<i64>()
                .iter()
                .map(|v| v.map(str::as_bytes)),
        ),
        DataType::Binary => count(array.as_binary::<i32>().iter()),
        DataType::LargeBinary => count(array.as_binary::<i64>().iter()),
        DataType::FixedSizeBinary(_) => count(array.as_fixed_size_binary().iter()),
        t if t.is_primitive() => {
            let width = t.primitive_width()?;
            let data = array.to_data();
            let bytes = data.buffers().first()?.as_slice();
            let offset = data.offset();
            count((0..array.len()).map(|i| {
                let start = (offset + i) * width;
                array
                    .is_valid(i)
                    .then(|| bytes.get(start..start + width))
                    .flatten()
            }))
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use arrow::array::{
        ArrayRef, BooleanArray, Decimal128Array, Int64Array, StringArray, TimestampMicrosecondArray,
    };

    fn batch(columns: Vec<(&str, ArrayRef)>) -> RecordBatch {
        RecordBatch::try_from_iter(columns).unwrap()
    }

    /// A deterministic stream of pseudo-random numbers below `n`.
    fn draws(n: u64, count: usize) -> Vec<i64> {
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        (0..count)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % n) as i64
            })
            .collect()
    }

    #[test]
    fn columns_of_distinct_values_go_without_and_repeating_ones_keep_theirs() {
        let rows = 2000;
        let b = batch(vec![
            (
                "key",
                Arc::new(Int64Array::from_iter_values(0..rows)) as ArrayRef,
            ),
            (
                "at",
                Arc::new(TimestampMicrosecondArray::from_iter_values(
                    (0..rows).map(|i| 1_700_000_000_000_000 + i * 7),
                )),
            ),
            (
                "note",
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| format!("{:x}", (i as u64).wrapping_mul(0x9E37_79B9))),
                )),
            ),
            (
                "status",
                Arc::new(StringArray::from_iter_values(
                    (0..rows).map(|i| ["paid", "new"][i as usize % 2]),
                )),
            ),
            (
                "amount",
                Arc::new(
                    Decimal128Array::from_iter_values((0..rows).map(|i| (i % 100) as i128))
                        .with_precision_and_scale(12, 2)
                        .unwrap(),
                ),
            ),
            // Drawn from 50,000 values: repeats, though rarely in 2,000 rows.
            (
                "account",
                Arc::new(Int64Array::from(draws(50_000, rows as usize))),
            ),
            // Drawn from ten million: as good as distinct.
            (
                "ref",
                Arc::new(Int64Array::from(draws(10_000_000, rows as usize))),
            ),
            (
                "flag",
                Arc::new(BooleanArray::from_iter((0..rows).map(|i| Some(i % 2 == 0)))),
            ),
        ]);
        assert_eq!(without_dictionary(&b), ["key", "at", "note", "ref"]);
    }

    #[test]
    fn nulls_do_not_count_and_too_few_values_decide_nothing() {
        let rows = 3000;
        // 1,500 distinct values and 1,500 nulls: judged on the values.
        let half = Int64Array::from_iter((0..rows).map(|i| (i % 2 == 0).then_some(i)));
        // 1,000 distinct values, the rest null: too few to judge.
        let third = Int64Array::from_iter((0..rows).map(|i| (i % 3 == 0).then_some(i)));
        let b = batch(vec![
            ("half", Arc::new(half) as ArrayRef),
            ("third", Arc::new(third)),
        ]);
        assert_eq!(without_dictionary(&b), ["half"]);
    }

    #[test]
    fn a_sliced_batch_is_read_from_its_offset() {
        // Distinct values, then one value over and over: the slice holds only the repeats.
        let values: Vec<i64> = (0..2000).chain(std::iter::repeat_n(7, 2000)).collect();
        let b = batch(vec![("v", Arc::new(Int64Array::from(values)) as ArrayRef)]);
        assert_eq!(without_dictionary(&b.slice(0, 2000)), ["v"]);
        assert!(without_dictionary(&b.slice(2000, 2000)).is_empty());
    }

    #[test]
    fn the_threshold_follows_the_birthday_bound() {
        // 1,024 draws from 131,072 values repeat about four times: half of that is the line.
        assert!(rarely_repeats(1024, 1024));
        assert!(rarely_repeats(1024, 1023));
        assert!(!rarely_repeats(1024, 1021));
        assert!(!rarely_repeats(1023, 1023));
        // Many draws: far more repeats expected.
        assert!(rarely_repeats(100_000, 99_000));
        assert!(!rarely_repeats(100_000, 80_000));
    }
}
