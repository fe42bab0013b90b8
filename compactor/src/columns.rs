//! Arrow column builders for a part's table columns, fed with converted [`Scalar`]s.

use std::sync::Arc;

use arrow::array::NullBufferBuilder;
use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder,
    Float64Builder, Int16Builder, Int32Builder, Int64Builder, ListArray, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::FieldRef;
use arrow::error::ArrowError;

use crate::convert::Scalar;
use crate::parquet_schema::{list_item, utc, ColumnType};

/// A builder for one column of one type.
pub enum ColumnBuilder {
    /// int2.
    Int16(Int16Builder),
    /// int4.
    Int32(Int32Builder),
    /// int8.
    Int64(Int64Builder),
    /// float4.
    Float32(Float32Builder),
    /// float8.
    Float64(Float64Builder),
    /// numeric(p,s).
    Decimal(Decimal128Builder),
    /// bool.
    Boolean(BooleanBuilder),
    /// Text and JSON.
    Utf8(StringBuilder),
    /// bytea.
    Binary(BinaryBuilder),
    /// date.
    Date32(Date32Builder),
    /// time.
    Time64(Time64MicrosecondBuilder),
    /// timestamp, with or without zone.
    Timestamp(TimestampMicrosecondBuilder),
    /// An array column.
    List {
        /// The item field.
        field: FieldRef,
        /// Offsets into the child, starting at 0.
        offsets: Vec<i32>,
        /// Validity.
        nulls: NullBufferBuilder,
        /// The elements.
        child: Box<ColumnBuilder>,
    },
}

impl ColumnBuilder {
    /// A builder for `ty`.
    pub fn new(ty: &ColumnType) -> Result<Self, ArrowError> {
        Ok(match ty {
            ColumnType::Int16 => ColumnBuilder::Int16(Int16Builder::new()),
            ColumnType::Int32 => ColumnBuilder::Int32(Int32Builder::new()),
            ColumnType::Int64 => ColumnBuilder::Int64(Int64Builder::new()),
            ColumnType::Float32 => ColumnBuilder::Float32(Float32Builder::new()),
            ColumnType::Float64 => ColumnBuilder::Float64(Float64Builder::new()),
            ColumnType::Decimal { precision, scale } => ColumnBuilder::Decimal(
                Decimal128Builder::new().with_precision_and_scale(*precision, *scale)?,
            ),
            ColumnType::Boolean => ColumnBuilder::Boolean(BooleanBuilder::new()),
            ColumnType::Utf8 | ColumnType::Json => ColumnBuilder::Utf8(StringBuilder::new()),
            ColumnType::Binary => ColumnBuilder::Binary(BinaryBuilder::new()),
            ColumnType::Date32 => ColumnBuilder::Date32(Date32Builder::new()),
            ColumnType::Time64 => ColumnBuilder::Time64(Time64MicrosecondBuilder::new()),
            ColumnType::Timestamp => ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new()),
            ColumnType::TimestampTz => {
                ColumnBuilder::Timestamp(TimestampMicrosecondBuilder::new().with_timezone(utc()))
            }
            ColumnType::List(elem) => ColumnBuilder::List {
                field: list_item(elem),
                offsets: vec![0],
                nulls: NullBufferBuilder::new(0),
                child: Box::new(ColumnBuilder::new(elem)?),
            },
        })
    }

    /// Appends a null.
    pub fn append_null(&mut self) {
        match self {
            ColumnBuilder::Int16(b) => b.append_null(),
            ColumnBuilder::Int32(b) => b.append_null(),
            ColumnBuilder::Int64(b) => b.append_null(),
            ColumnBuilder::Float32(b) => b.append_null(),
            ColumnBuilder::Float64(b) => b.append_null(),
            ColumnBuilder::Decimal(b) => b.append_null(),
            ColumnBuilder::Boolean(b) => b.append_null(),
            ColumnBuilder::Utf8(b) => b.append_null(),
            ColumnBuilder::Binary(b) => b.append_null(),
            ColumnBuilder::Date32(b) => b.append_null(),
            ColumnBuilder::Time64(b) => b.append_null(),
            ColumnBuilder::Timestamp(b) => b.append_null(),
            ColumnBuilder::List { offsets, nulls, .. } => {
                let last = offsets.last().copied().unwrap_or(0);
                offsets.push(last);
                nulls.append_null();
            }
        }
    }

    /// Appends a value converted for this column's type (see [`crate::convert::convert`]); a
    /// value of another shape is appended as null (it cannot occur: conversion is by type).
    pub fn append(&mut self, v: &Scalar<'_>) {
        match (self, v) {
            (b, Scalar::Null) => b.append_null(),
            (ColumnBuilder::Int16(b), Scalar::Int(i)) => b.append_value(*i as i16),
            (ColumnBuilder::Int32(b), Scalar::Int(i)) => b.append_value(*i as i32),
            (ColumnBuilder::Int64(b), Scalar::Int(i)) => b.append_value(*i),
            (ColumnBuilder::Float32(b), Scalar::Float(f)) => b.append_value(*f as f32),
            (ColumnBuilder::Float64(b), Scalar::Float(f)) => b.append_value(*f),
            (ColumnBuilder::Decimal(b), Scalar::Decimal(d)) => b.append_value(*d),
            (ColumnBuilder::Boolean(b), Scalar::Bool(x)) => b.append_value(*x),
            (ColumnBuilder::Utf8(b), Scalar::Text(t)) => b.append_value(t),
            (ColumnBuilder::Binary(b), Scalar::Bytes(x)) => b.append_value(x),
            (ColumnBuilder::Date32(b), Scalar::Days(d)) => b.append_value(*d),
            (ColumnBuilder::Time64(b), Scalar::Micros(m)) => b.append_value(*m),
            (ColumnBuilder::Timestamp(b), Scalar::Micros(m)) => b.append_value(*m),
            (
                ColumnBuilder::List {
                    offsets,
                    nulls,
                    child,
                    ..
                },
                Scalar::List(items),
            ) => {
                for item in items {
                    child.append(item);
                }
                let last = offsets.last().copied().unwrap_or(0);
                offsets.push(last + items.len() as i32);
                nulls.append_non_null();
            }
            (b, _) => b.append_null(),
        }
    }

    /// The built array; the builder starts over empty.
    pub fn finish(&mut self) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            ColumnBuilder::Int16(b) => Arc::new(b.finish()),
            ColumnBuilder::Int32(b) => Arc::new(b.finish()),
            ColumnBuilder::Int64(b) => Arc::new(b.finish()),
            ColumnBuilder::Float32(b) => Arc::new(b.finish()),
            ColumnBuilder::Float64(b) => Arc::new(b.finish()),
            ColumnBuilder::Decimal(b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(b) => Arc::new(b.finish()),
            ColumnBuilder::Utf8(b) => Arc::new(b.finish()),
            ColumnBuilder::Binary(b) => Arc::new(b.finish()),
            ColumnBuilder::Date32(b) => Arc::new(b.finish()),
            ColumnBuilder::Time64(b) => Arc::new(b.finish()),
            ColumnBuilder::Timestamp(b) => Arc::new(b.finish()),
            ColumnBuilder::List {
                field,
                offsets,
                nulls,
                child,
            } => {
                let values = child.finish()?;
                let offsets = std::mem::replace(offsets, vec![0]);
                let offsets = OffsetBuffer::new(ScalarBuffer::from(offsets));
                Arc::new(ListArray::try_new(
                    field.clone(),
                    offsets,
                    values,
                    nulls.finish(),
                )?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::convert;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int32Type, TimestampMicrosecondType};

    #[test]
    fn builders_produce_arrays_of_the_mapped_types() {
        for ty in [
            ColumnType::Int16,
            ColumnType::Decimal {
                precision: 10,
                scale: 2,
            },
            ColumnType::TimestampTz,
            ColumnType::List(Box::new(ColumnType::Utf8)),
        ] {
            let mut b = ColumnBuilder::new(&ty).unwrap();
            b.append_null();
            assert_eq!(b.finish().unwrap().data_type(), &ty.data_type());
        }
    }

    #[test]
    fn values_and_nulls_land_in_order() {
        let ty = ColumnType::List(Box::new(ColumnType::Int32));
        let mut b = ColumnBuilder::new(&ty).unwrap();
        b.append(&convert(&ty, "[1,2]").unwrap());
        b.append_null();
        b.append(&convert(&ty, "[null]").unwrap());
        b.append(&convert(&ty, "[]").unwrap());
        let arr = b.finish().unwrap();
        let list = arr.as_list::<i32>();
        assert_eq!(list.len(), 4);
        assert!(list.is_null(1));
        assert_eq!(list.value(0).as_primitive::<Int32Type>().values(), &[1, 2]);
        assert!(list.value(2).is_null(0));
        assert_eq!(list.value(3).len(), 0);
        // The builder starts over.
        b.append_null();
        assert_eq!(b.finish().unwrap().len(), 1);

        let dec = ColumnType::Decimal {
            precision: 10,
            scale: 2,
        };
        let mut b = ColumnBuilder::new(&dec).unwrap();
        b.append(&convert(&dec, "\"12.30\"").unwrap());
        let arr = b.finish().unwrap();
        assert_eq!(arr.as_primitive::<Decimal128Type>().value(0), 1230);

        let mut b = ColumnBuilder::new(&ColumnType::TimestampTz).unwrap();
        b.append(&convert(&ColumnType::TimestampTz, "\"1970-01-01T00:00:01.000000Z\"").unwrap());
        let arr = b.finish().unwrap();
        assert_eq!(
            arr.as_primitive::<TimestampMicrosecondType>().value(0),
            1_000_000
        );
    }
}
