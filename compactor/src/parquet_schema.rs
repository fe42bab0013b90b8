//! The Parquet schema of a part: metadata columns, then the table's columns typed from the
//! PostgreSQL types the capture recorded (DESIGN.md, "Parquet final files").

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use cdc_contract::schema::{ColumnSchema, TableSchema};

/// Metadata column: the operation (`c`, `u`, `d`, `r`, `t`).
pub const OP: &str = "_op";
/// Metadata column: the transaction's commit LSN.
pub const LSN: &str = "_lsn";
/// Metadata column: the change's ordinal within its transaction.
pub const SEQ: &str = "_seq";
/// Metadata column: the transaction id.
pub const TX_ID: &str = "_tx_id";
/// Metadata column: the commit time.
pub const COMMIT_TS: &str = "_commit_ts";
/// Metadata column: text forms of values the typed column cannot hold.
pub const RAW: &str = "_raw";
/// Metadata column: the key an update moved the row away from (a struct of the key columns,
/// typed like them), null unless the update changed the key. Present when the table has key
/// columns.
pub const KEY_BEFORE: &str = "_key_before";

/// The metadata columns, in order.
pub const METADATA: [&str; 7] = [OP, LSN, SEQ, TX_ID, COMMIT_TS, RAW, KEY_BEFORE];

/// PostgreSQL's uuid type.
const UUID_OID: u32 = 2950;

/// The widest decimal Decimal128 holds.
const MAX_DECIMAL_PRECISION: u8 = 38;

/// `UTC`, the zone of every zoned timestamp column.
pub fn utc() -> Arc<str> {
    Arc::from("UTC")
}

/// What a column's values become.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    /// int2.
    Int16,
    /// int4.
    Int32,
    /// int8, oid, xid.
    Int64,
    /// float4.
    Float32,
    /// float8.
    Float64,
    /// numeric(p,s) with p <= 38 and 0 <= s <= p.
    Decimal {
        /// Precision.
        precision: u8,
        /// Scale.
        scale: i8,
    },
    /// bool.
    Boolean,
    /// Text, varchar, char, enums, uuid, interval, json, jsonb, unconstrained numeric, and every
    /// type without a better mapping.
    Utf8,
    /// json/jsonb: the JSON text.
    Json,
    /// bytea (base64 in the event).
    Binary,
    /// date.
    Date32,
    /// time without zone.
    Time64,
    /// timestamp without zone.
    Timestamp,
    /// timestamp with zone, UTC.
    TimestampTz,
    /// An array of the element type (one dimension).
    List(Box<ColumnType>),
}

/// `(precision, scale)` of a numeric typmod, when it has one.
pub fn numeric_typmod(typmod: i32) -> Option<(i32, i32)> {
    if typmod < 4 {
        return None;
    }
    let t = typmod - 4;
    let precision = (t >> 16) & 0xffff;
    // PostgreSQL 15+ stores the scale as an 11-bit signed number (negative scales).
    let scale = ((t & 0x7ff) ^ 1024) - 1024;
    Some((precision, scale))
}

impl ColumnType {
    /// The mapping for a resolved type: `base_oid` (domains resolved, enums as text) and, for
    /// arrays, the resolved element type; `typmod` applies to the (element) type.
    pub fn for_pg(base_oid: u32, element_oid: Option<u32>, typmod: i32) -> ColumnType {
        if let Some(elem) = element_oid {
            return ColumnType::List(Box::new(ColumnType::for_pg(elem, None, typmod)));
        }
        match base_oid {
            21 => ColumnType::Int16,
            23 => ColumnType::Int32,
            20 | 26 | 28 => ColumnType::Int64,
            700 => ColumnType::Float32,
            701 => ColumnType::Float64,
            1700 => match numeric_typmod(typmod) {
                Some((p, s))
                    if (1..=MAX_DECIMAL_PRECISION as i32).contains(&p) && (0..=p).contains(&s) =>
                {
                    ColumnType::Decimal {
                        precision: p as u8,
                        scale: s as i8,
                    }
                }
                _ => ColumnType::Utf8,
            },
            16 => ColumnType::Boolean,
            114 | 3802 => ColumnType::Json,
            17 => ColumnType::Binary,
            1082 => ColumnType::Date32,
            1083 => ColumnType::Time64,
            1114 => ColumnType::Timestamp,
            1184 => ColumnType::TimestampTz,
            _ => ColumnType::Utf8,
        }
    }

    /// The mapping of a recorded column.
    pub fn for_column(c: &ColumnSchema) -> ColumnType {
        ColumnType::for_pg(c.base_oid, c.element_oid, c.typmod)
    }

    /// The Arrow type.
    pub fn data_type(&self) -> DataType {
        match self {
            ColumnType::Int16 => DataType::Int16,
            ColumnType::Int32 => DataType::Int32,
            ColumnType::Int64 => DataType::Int64,
            ColumnType::Float32 => DataType::Float32,
            ColumnType::Float64 => DataType::Float64,
            ColumnType::Decimal { precision, scale } => DataType::Decimal128(*precision, *scale),
            ColumnType::Boolean => DataType::Boolean,
            ColumnType::Utf8 | ColumnType::Json => DataType::Utf8,
            ColumnType::Binary => DataType::Binary,
            ColumnType::Date32 => DataType::Date32,
            ColumnType::Time64 => DataType::Time64(TimeUnit::Microsecond),
            ColumnType::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
            ColumnType::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some(utc())),
            ColumnType::List(elem) => DataType::List(list_item(elem)),
        }
    }

    /// True when a file of this type can be read as `to` by a reader that widens types
    /// (int16 to int32 to int64, float32 to float64, a decimal to a wider one, anything to text).
    pub fn widens_to(&self, to: &ColumnType) -> bool {
        use ColumnType::*;
        match (self, to) {
            (a, b) if a == b => true,
            (Int16, Int32 | Int64) | (Int32, Int64) | (Float32, Float64) => true,
            (
                Decimal {
                    precision: p1,
                    scale: s1,
                },
                Decimal {
                    precision: p2,
                    scale: s2,
                },
            ) => s2 >= s1 && (p2 - *s2 as u8) >= (p1 - *s1 as u8),
            (Json, Utf8) | (Utf8, Json) => true,
            (List(a), List(b)) => a.widens_to(b),
            _ => false,
        }
    }
}

/// The item field of a list column.
pub fn list_item(elem: &ColumnType) -> Arc<Field> {
    Arc::new(Field::new("element", elem.data_type(), true))
}

/// The `_raw` column's type: a map from column name to text.
pub fn raw_type() -> DataType {
    let entries = Field::new(
        "key_value",
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ])),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

/// A table column in a part: its name in the events and in the file, and its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartColumn {
    /// Name in the events' row images.
    pub name: String,
    /// Name in the Parquet file (differs only when it collides with a metadata column).
    pub file_name: String,
    /// Its type.
    pub ty: ColumnType,
    /// True for a key (replica identity) column.
    pub key: bool,
    /// True for a uuid column (or array of uuid): text in Parquet, Avro's `uuid` logical type.
    pub uuid: bool,
}

/// The layout of a part's rows for one schema version.
#[derive(Debug, Clone)]
pub struct PartSchema {
    /// Table columns, in table order.
    pub columns: Vec<PartColumn>,
    /// Positions (in `columns`) of the key columns, in table order.
    pub key_columns: Vec<usize>,
    /// The fields of the `_key_before` struct (the key columns), when the table has a key.
    pub key_before: Option<Fields>,
    /// The Arrow schema: metadata columns, then table columns.
    pub arrow: SchemaRef,
}

impl PartSchema {
    /// The part schema of a table schema version.
    pub fn new(schema: &TableSchema) -> Self {
        let mut columns: Vec<PartColumn> = Vec::with_capacity(schema.columns.len());
        for c in &schema.columns {
            let mut file_name = c.name.clone();
            // A table column named like a metadata column keeps its data under `{name}_`.
            while METADATA.contains(&file_name.as_str())
                || columns.iter().any(|p| p.file_name == file_name)
            {
                file_name.push('_');
            }
            columns.push(PartColumn {
                name: c.name.clone(),
                file_name,
                ty: ColumnType::for_column(c),
                key: c.key,
                uuid: c.element_oid.unwrap_or(c.base_oid) == UUID_OID,
            });
        }
        let key_columns: Vec<usize> = (0..columns.len()).filter(|&i| columns[i].key).collect();
        let key_before = (!key_columns.is_empty()).then(|| {
            Fields::from(
                key_columns
                    .iter()
                    .map(|&i| Field::new(&columns[i].file_name, columns[i].ty.data_type(), true))
                    .collect::<Vec<_>>(),
            )
        });
        let mut fields = vec![
            Field::new(OP, DataType::Utf8, false),
            Field::new(LSN, DataType::Int64, false),
            Field::new(SEQ, DataType::Int64, false),
            Field::new(TX_ID, DataType::Int64, true),
            Field::new(
                COMMIT_TS,
                DataType::Timestamp(TimeUnit::Microsecond, Some(utc())),
                false,
            ),
            Field::new(RAW, raw_type(), true),
        ];
        if let Some(k) = &key_before {
            fields.push(Field::new(KEY_BEFORE, DataType::Struct(k.clone()), true));
        }
        fields.extend(
            columns
                .iter()
                .map(|c| Field::new(&c.file_name, c.ty.data_type(), true)),
        );
        PartSchema {
            columns,
            key_columns,
            key_before,
            arrow: Arc::new(Schema::new(fields)),
        }
    }

    /// File names of the uuid columns (Avro gives them the `uuid` logical type).
    pub fn uuid_columns(&self) -> Vec<String> {
        self.columns
            .iter()
            .filter(|c| c.uuid)
            .map(|c| c.file_name.clone())
            .collect()
    }

    /// Columns of `self` whose type `next` changes in a way readers cannot widen.
    pub fn narrowed_columns(&self, next: &PartSchema) -> Vec<String> {
        next.columns
            .iter()
            .filter_map(|n| {
                let old = self.columns.iter().find(|c| c.name == n.name)?;
                (!old.ty.widens_to(&n.ty)).then(|| n.name.clone())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cdc_contract::TableName;

    fn numeric(p: i32, s: i32) -> i32 {
        ((p << 16) | (s & 0x7ff)) + 4
    }

    #[test]
    fn postgres_types_map_as_the_design_says() {
        let t = |oid, typmod| ColumnType::for_pg(oid, None, typmod).data_type();
        assert_eq!(t(21, -1), DataType::Int16);
        assert_eq!(t(23, -1), DataType::Int32);
        assert_eq!(t(20, -1), DataType::Int64);
        assert_eq!(t(700, -1), DataType::Float32);
        assert_eq!(t(701, -1), DataType::Float64);
        assert_eq!(t(1700, numeric(10, 2)), DataType::Decimal128(10, 2));
        assert_eq!(t(1700, numeric(38, 0)), DataType::Decimal128(38, 0));
        assert_eq!(t(1700, numeric(39, 2)), DataType::Utf8);
        assert_eq!(t(1700, numeric(5, -2)), DataType::Utf8);
        assert_eq!(t(1700, -1), DataType::Utf8);
        assert_eq!(t(16, -1), DataType::Boolean);
        for text_like in [
            25, 1043, 1042, 18, 19, 2950, 1186, 114, 3802, 1266, 790, 869,
        ] {
            assert_eq!(t(text_like, -1), DataType::Utf8, "oid {text_like}");
        }
        assert_eq!(t(17, -1), DataType::Binary);
        assert_eq!(t(1082, -1), DataType::Date32);
        assert_eq!(t(1083, -1), DataType::Time64(TimeUnit::Microsecond));
        assert_eq!(
            t(1114, -1),
            DataType::Timestamp(TimeUnit::Microsecond, None)
        );
        assert_eq!(
            t(1184, -1),
            DataType::Timestamp(TimeUnit::Microsecond, Some(utc()))
        );
        assert_eq!(
            ColumnType::for_pg(1007, Some(23), -1).data_type(),
            DataType::List(list_item(&ColumnType::Int32))
        );
        assert_eq!(
            ColumnType::for_pg(1231, Some(1700), numeric(12, 3)).data_type(),
            DataType::List(list_item(&ColumnType::Decimal {
                precision: 12,
                scale: 3
            }))
        );
    }

    #[test]
    fn numeric_typmods_decode_precision_and_scale() {
        assert_eq!(numeric_typmod(numeric(10, 2)), Some((10, 2)));
        assert_eq!(numeric_typmod(numeric(1000, 0)), Some((1000, 0)));
        assert_eq!(numeric_typmod(numeric(5, -3)), Some((5, -3)));
        assert_eq!(numeric_typmod(-1), None);
    }

    #[test]
    fn metadata_columns_come_first_and_collisions_are_renamed() {
        let col = |name: &str, oid| ColumnSchema {
            name: name.into(),
            type_name: String::new(),
            type_oid: oid,
            typmod: -1,
            key: false,
            base_oid: oid,
            element_oid: None,
        };
        let schema = TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![col("id", 23), col("_op", 25)],
        };
        let ps = PartSchema::new(&schema);
        let names: Vec<&str> = ps
            .arrow
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            names,
            [
                "_op",
                "_lsn",
                "_seq",
                "_tx_id",
                "_commit_ts",
                "_raw",
                "id",
                "_op_"
            ]
        );
        assert_eq!(ps.columns[1].name, "_op");
    }

    #[test]
    fn widening_is_recognised_and_narrowing_named() {
        use ColumnType::*;
        assert!(Int32.widens_to(&Int64));
        assert!(!Int64.widens_to(&Int32));
        assert!(Decimal {
            precision: 10,
            scale: 2
        }
        .widens_to(&Decimal {
            precision: 12,
            scale: 3
        }));
        assert!(!Int32.widens_to(&Utf8));
        let col = |oid| ColumnSchema {
            name: "v".into(),
            type_name: String::new(),
            type_oid: oid,
            typmod: -1,
            key: false,
            base_oid: oid,
            element_oid: None,
        };
        let s = |oid| {
            PartSchema::new(&TableSchema {
                table: TableName::new("public", "t"),
                columns: vec![col(oid)],
            })
        };
        assert!(s(23).narrowed_columns(&s(20)).is_empty());
        assert_eq!(s(20).narrowed_columns(&s(25)), vec!["v".to_string()]);
    }
}
