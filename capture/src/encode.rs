//! Event encoding: pgoutput rows to the Debezium-style JSON envelope of DESIGN.md, written
//! straight into a byte buffer (no intermediate JSON tree on the hot path).

use base64::Engine;

use cdc_contract::event::{Op, CONNECTOR, UNAVAILABLE_VALUE};
use cdc_contract::schema::TableSchema;
use cdc_contract::{Lsn, TableName};

use crate::pgoutput::Value;

/// How a column's text form becomes JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `t`/`f` to true/false.
    Bool,
    /// Integers: the text is a JSON number.
    Integer,
    /// float4/float8: numbers, with NaN and infinities as strings.
    Float,
    /// numeric: exact string.
    Numeric,
    /// timestamptz: ISO-8601 UTC with microseconds and `Z`.
    TimestampTz,
    /// timestamp: ISO-8601 with microseconds, no zone.
    Timestamp,
    /// date: `YYYY-MM-DD`.
    Date,
    /// json: nested JSON, whitespace removed so a line stays a line.
    Json,
    /// jsonb: nested JSON as PostgreSQL prints it.
    Jsonb,
    /// bytea: base64.
    Bytea,
    /// An array of the element kind, with the element type's delimiter (`pg_type.typdelim`).
    Array(Box<Kind>, u8),
    /// Everything else: the text form as a JSON string.
    Text,
}

impl Kind {
    /// The kind for a resolved type (`base_oid`, and for arrays the resolved element type).
    pub fn for_type(base_oid: u32, element_oid: Option<u32>) -> Kind {
        if let Some(elem) = element_oid {
            return Kind::Array(Box::new(Kind::for_type(elem, None)), array_delimiter(elem));
        }
        match base_oid {
            16 => Kind::Bool,
            20 | 21 | 23 | 26 | 28 => Kind::Integer,
            700 | 701 => Kind::Float,
            1700 => Kind::Numeric,
            1184 => Kind::TimestampTz,
            1114 => Kind::Timestamp,
            1082 => Kind::Date,
            114 => Kind::Json,
            3802 => Kind::Jsonb,
            17 => Kind::Bytea,
            _ => Kind::Text,
        }
    }
}

/// `box`: the one built-in type whose array delimiter (`pg_type.typdelim`) is not a comma.
const BOX_OID: u32 = 603;

/// The delimiter between elements of arrays of `element_oid` (resolved to its base type; a
/// domain has its base type's delimiter). Every built-in type but `box` uses a comma.
fn array_delimiter(element_oid: u32) -> u8 {
    if element_oid == BOX_OID {
        b';'
    } else {
        b','
    }
}

/// Writes `s` as a JSON string.
pub fn write_json_str(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let esc: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => {
                out.extend_from_slice(&s[start..i]);
                out.extend_from_slice(format!("\\u{b:04x}").as_bytes());
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Writes a text value as JSON string, replacing invalid UTF-8.
fn write_text(out: &mut Vec<u8>, text: &[u8]) {
    match std::str::from_utf8(text) {
        Ok(_) => write_json_str(out, text),
        Err(_) => write_json_str(out, String::from_utf8_lossy(text).as_bytes()),
    }
}

/// Writes one value; returns false when it could not be converted and was written as its text.
pub fn write_value(out: &mut Vec<u8>, kind: &Kind, text: &[u8]) -> bool {
    match kind {
        Kind::Bool => match text {
            b"t" => out.extend_from_slice(b"true"),
            b"f" => out.extend_from_slice(b"false"),
            _ => return raw(out, text),
        },
        Kind::Integer => {
            if text.is_empty()
                || !text
                    .iter()
                    .enumerate()
                    .all(|(i, b)| b.is_ascii_digit() || (i == 0 && *b == b'-'))
            {
                return raw(out, text);
            }
            out.extend_from_slice(text);
        }
        Kind::Float => match text {
            b"NaN" | b"Infinity" | b"-Infinity" => write_json_str(out, text),
            _ if is_json_number(text) => out.extend_from_slice(text),
            _ => return raw(out, text),
        },
        Kind::Numeric => write_text(out, text),
        Kind::TimestampTz => return write_timestamp(out, text, true),
        Kind::Timestamp => return write_timestamp(out, text, false),
        Kind::Date => {
            if text.len() == 10 && text[4] == b'-' && text[7] == b'-' {
                write_json_str(out, text);
            } else {
                return raw(out, text);
            }
        }
        Kind::Json => {
            if !write_minified_json(out, text) {
                return raw(out, text);
            }
        }
        Kind::Jsonb => {
            if text.contains(&b'\n') {
                if !write_minified_json(out, text) {
                    return raw(out, text);
                }
            } else {
                out.extend_from_slice(text);
            }
        }
        Kind::Bytea => match text.strip_prefix(b"\\x").and_then(decode_hex) {
            Some(bytes) => {
                out.push(b'"');
                let mut b64 = String::new();
                base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut b64);
                out.extend_from_slice(b64.as_bytes());
                out.push(b'"');
            }
            None => return raw(out, text),
        },
        Kind::Array(elem, delim) => {
            let mark = out.len();
            let mut p = ArrayParser {
                s: text,
                i: 0,
                delim: *delim,
            };
            if !p.write(out, elem) || p.i != text.len() {
                out.truncate(mark);
                return raw(out, text);
            }
        }
        Kind::Text => write_text(out, text),
    }
    true
}

fn raw(out: &mut Vec<u8>, text: &[u8]) -> bool {
    write_text(out, text);
    false
}

fn is_json_number(t: &[u8]) -> bool {
    !t.is_empty()
        && t.iter()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
        && (t[0].is_ascii_digit() || (t[0] == b'-' && t.len() > 1 && t[1].is_ascii_digit()))
}

fn decode_hex(h: &[u8]) -> Option<Vec<u8>> {
    if !h.len().is_multiple_of(2) {
        return None;
    }
    let nib = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    h.chunks_exact(2)
        .map(|p| Some(nib(p[0])? << 4 | nib(p[1])?))
        .collect()
}

/// `2025-01-08 10:30:00.5+00` to `2025-01-08T10:30:00.500000Z` (or without zone). Infinite and
/// BC or five-digit-year values are not representable in ISO-8601 here: written as text.
fn write_timestamp(out: &mut Vec<u8>, text: &[u8], zoned: bool) -> bool {
    let parsed = (|| {
        let s = std::str::from_utf8(text).ok()?;
        if s.ends_with(" BC") {
            return None;
        }
        let (date, rest) = s.split_once(' ')?;
        if date.len() != 10 || rest.len() < 8 {
            return None;
        }
        let (clock, tail) = rest.split_at(8);
        let (frac, offset) = match tail.strip_prefix('.') {
            Some(t) => {
                let end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
                (&t[..end], &t[end..])
            }
            None => ("", tail),
        };
        if zoned && !matches!(offset, "+00" | "+00:00" | "-00") || !zoned && !offset.is_empty() {
            return None;
        }
        if frac.len() > 6 {
            return None;
        }
        Some((date, clock, frac))
    })();
    let Some((date, clock, frac)) = parsed else {
        return raw(out, text);
    };
    out.push(b'"');
    out.extend_from_slice(date.as_bytes());
    out.push(b'T');
    out.extend_from_slice(clock.as_bytes());
    out.push(b'.');
    out.extend_from_slice(frac.as_bytes());
    out.extend(std::iter::repeat_n(b'0', 6 - frac.len()));
    if zoned {
        out.push(b'Z');
    }
    out.push(b'"');
    true
}

/// Copies JSON text without insignificant whitespace; false when it is not balanced JSON text.
fn write_minified_json(out: &mut Vec<u8>, text: &[u8]) -> bool {
    if serde_json::from_slice::<serde::de::IgnoredAny>(text).is_err() {
        return false;
    }
    let mut in_str = false;
    let mut escaped = false;
    for &b in text {
        if in_str {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else if !matches!(b, b' ' | b'\n' | b'\r' | b'\t') {
            out.push(b);
            in_str = b == b'"';
        }
    }
    true
}

/// Parses PostgreSQL's array text (`{1,2,NULL,"a b"}`, nested for more dimensions).
struct ArrayParser<'a> {
    s: &'a [u8],
    i: usize,
    /// The element delimiter (`,` for all but `box`, whose text holds commas).
    delim: u8,
}

impl ArrayParser<'_> {
    fn write(&mut self, out: &mut Vec<u8>, elem: &Kind) -> bool {
        if self.s.get(self.i) != Some(&b'{') {
            return false;
        }
        self.i += 1;
        out.push(b'[');
        if self.s.get(self.i) == Some(&b'}') {
            self.i += 1;
            out.push(b']');
            return true;
        }
        let mut first = true;
        loop {
            if !first {
                out.push(b',');
            }
            first = false;
            match self.s.get(self.i) {
                Some(b'{') => {
                    if !self.write(out, elem) {
                        return false;
                    }
                }
                Some(b'"') => {
                    self.i += 1;
                    let mut value = Vec::new();
                    loop {
                        match self.s.get(self.i) {
                            Some(b'\\') => {
                                let Some(&c) = self.s.get(self.i + 1) else {
                                    return false;
                                };
                                value.push(c);
                                self.i += 2;
                            }
                            Some(b'"') => {
                                self.i += 1;
                                break;
                            }
                            Some(&c) => {
                                value.push(c);
                                self.i += 1;
                            }
                            None => return false,
                        }
                    }
                    if !write_value(out, elem, &value) {
                        return false;
                    }
                }
                Some(_) => {
                    let start = self.i;
                    while let Some(&c) = self.s.get(self.i) {
                        if c == self.delim || c == b'}' {
                            break;
                        }
                        self.i += 1;
                    }
                    let token = &self.s[start..self.i];
                    if token == b"NULL" {
                        out.extend_from_slice(b"null");
                    } else if !write_value(out, elem, token) {
                        return false;
                    }
                }
                None => return false,
            }
            match self.s.get(self.i) {
                Some(&c) if c == self.delim => self.i += 1,
                Some(b'}') => {
                    self.i += 1;
                    out.push(b']');
                    return true;
                }
                _ => return false,
            }
        }
    }
}

/// One column's encoding.
#[derive(Debug, Clone)]
struct ColumnEncoder {
    /// `"name":`, escaped once.
    key: Vec<u8>,
    name: String,
    kind: Kind,
    is_key: bool,
}

/// A table's encoder for one schema version.
#[derive(Debug, Clone)]
pub struct TableEncoder {
    /// The table.
    pub table: TableName,
    /// The schema this encoder follows.
    pub schema: TableSchema,
    /// The schema's version id.
    pub schema_id: String,
    columns: Vec<ColumnEncoder>,
    /// `"version":..,"connector":..,"name":..,` pre-rendered.
    source_head: Vec<u8>,
    /// `"db":..,` pre-rendered.
    source_db: Vec<u8>,
    /// `"schema":..,"table":..,` pre-rendered.
    source_table: Vec<u8>,
}

/// The transaction a change belongs to.
#[derive(Debug, Clone, Copy)]
pub struct TxContext {
    /// Transaction id.
    pub xid: Option<u32>,
    /// Its commit LSN.
    pub commit_lsn: Lsn,
    /// Commit time, µs since the Unix epoch.
    pub commit_us: i64,
    /// End of the previous commit (Debezium's `sequence` first element).
    pub prev_commit_end: Lsn,
    /// True for snapshot reads.
    pub snapshot: bool,
}

/// A row image to write.
pub enum Image<'a> {
    /// Every column.
    Full(&'a [Value]),
    /// Only the key columns (REPLICA IDENTITY DEFAULT/INDEX old key).
    KeyOnly(&'a [Value]),
}

impl TableEncoder {
    /// An encoder for `schema`, as pipeline `name` on database `db`.
    pub fn new(schema: TableSchema, pipeline: &str, db: &str) -> Self {
        let mut source_head = Vec::new();
        source_head.extend_from_slice(b"\"version\":");
        write_json_str(&mut source_head, env!("CARGO_PKG_VERSION").as_bytes());
        source_head.extend_from_slice(b",\"connector\":");
        write_json_str(&mut source_head, CONNECTOR.as_bytes());
        source_head.extend_from_slice(b",\"name\":");
        write_json_str(&mut source_head, pipeline.as_bytes());
        source_head.push(b',');
        let mut source_db = b"\"db\":".to_vec();
        write_json_str(&mut source_db, db.as_bytes());
        source_db.push(b',');
        let mut source_table = b"\"schema\":".to_vec();
        write_json_str(&mut source_table, schema.table.schema.as_bytes());
        source_table.extend_from_slice(b",\"table\":");
        write_json_str(&mut source_table, schema.table.name.as_bytes());
        source_table.push(b',');
        let columns = schema
            .columns
            .iter()
            .map(|c| {
                let mut key = Vec::new();
                write_json_str(&mut key, c.name.as_bytes());
                key.push(b':');
                ColumnEncoder {
                    key,
                    name: c.name.clone(),
                    kind: Kind::for_type(c.base_oid, c.element_oid),
                    is_key: c.key,
                }
            })
            .collect();
        TableEncoder {
            table: schema.table.clone(),
            schema_id: schema.version_id(),
            schema,
            columns,
            source_head,
            source_db,
            source_table,
        }
    }

    /// Writes one row image. `old` is the whole old row when the server sent it (REPLICA
    /// IDENTITY FULL): an unchanged TOAST value in the image is taken from it.
    fn write_row<'a>(
        &'a self,
        out: &mut Vec<u8>,
        image: Image<'_>,
        old: Option<&[Value]>,
        raw_cols: &mut Vec<&'a str>,
    ) {
        let (values, key_only) = match image {
            Image::Full(v) => (v, false),
            Image::KeyOnly(v) => (v, true),
        };
        out.push(b'{');
        let mut first = true;
        for (i, (col, value)) in self.columns.iter().zip(values).enumerate() {
            // Issue 15, item 9: under REPLICA IDENTITY FULL the old row carries the value.
            let value = match (value, old.and_then(|o| o.get(i))) {
                (Value::Unchanged, Some(known)) => known,
                _ => value,
            };
            if key_only && !col.is_key {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(&col.key);
            match value {
                Value::Null => out.extend_from_slice(b"null"),
                Value::Unchanged => write_json_str(out, UNAVAILABLE_VALUE.as_bytes()),
                Value::Text(t) => {
                    if !write_value(out, &col.kind, t) {
                        raw_cols.push(&col.name);
                    }
                }
            }
        }
        out.push(b'}');
    }

    /// Appends one event line (with its trailing newline) to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn write_event(
        &self,
        out: &mut Vec<u8>,
        op: Op,
        before: Option<Image<'_>>,
        after: Option<&[Value]>,
        tx: &TxContext,
        lsn: Lsn,
        ordinal: u32,
        table_ordinal: u32,
        now_ms: i64,
    ) {
        let mut raw_cols = Vec::new();
        out.extend_from_slice(b"{\"before\":");
        let old_full = match before {
            Some(Image::Full(v)) => Some(v),
            _ => None,
        };
        match before {
            Some(image) => self.write_row(out, image, None, &mut raw_cols),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"after\":");
        match after {
            Some(values) => self.write_row(out, Image::Full(values), old_full, &mut raw_cols),
            None => out.extend_from_slice(b"null"),
        }
        let mut num = itoa::Buffer::new();
        out.extend_from_slice(b",\"source\":{");
        out.extend_from_slice(&self.source_head);
        out.extend_from_slice(b"\"ts_ms\":");
        out.extend_from_slice(num.format(tx.commit_us.div_euclid(1000)).as_bytes());
        out.extend_from_slice(b",\"ts_us\":");
        out.extend_from_slice(num.format(tx.commit_us).as_bytes());
        out.extend_from_slice(if tx.snapshot {
            b",\"snapshot\":\"true\","
        } else {
            b",\"snapshot\":\"false\","
        });
        out.extend_from_slice(&self.source_db);
        out.extend_from_slice(b"\"sequence\":\"[\\\"");
        out.extend_from_slice(num.format(tx.prev_commit_end.0).as_bytes());
        out.extend_from_slice(b"\\\",\\\"");
        out.extend_from_slice(num.format(lsn.0).as_bytes());
        out.extend_from_slice(b"\\\"]\",");
        out.extend_from_slice(&self.source_table);
        out.extend_from_slice(b"\"txId\":");
        match tx.xid {
            Some(x) => out.extend_from_slice(num.format(x).as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"lsn\":");
        out.extend_from_slice(num.format(lsn.0).as_bytes());
        out.extend_from_slice(b",\"commit_lsn\":");
        out.extend_from_slice(num.format(tx.commit_lsn.0).as_bytes());
        out.extend_from_slice(b"},\"op\":\"");
        out.extend_from_slice(op.code().as_bytes());
        out.extend_from_slice(b"\",\"ts_ms\":");
        out.extend_from_slice(num.format(now_ms).as_bytes());
        out.extend_from_slice(b",\"transaction\":{\"id\":\"");
        if let Some(x) = tx.xid {
            out.extend_from_slice(num.format(x).as_bytes());
        }
        out.push(b':');
        out.extend_from_slice(num.format(tx.commit_lsn.0).as_bytes());
        out.extend_from_slice(b"\",\"total_order\":");
        out.extend_from_slice(num.format(ordinal).as_bytes());
        out.extend_from_slice(b",\"data_collection_order\":");
        out.extend_from_slice(num.format(table_ordinal).as_bytes());
        out.push(b'}');
        if !raw_cols.is_empty() {
            out.extend_from_slice(b",\"raw_columns\":[");
            for (i, c) in raw_cols.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(out, c.as_bytes());
            }
            out.push(b']');
        }
        out.extend_from_slice(b"}\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use cdc_contract::event::ChangeEvent;
    use cdc_contract::schema::ColumnSchema;

    fn json(kind: Kind, text: &str) -> (String, bool) {
        let mut out = Vec::new();
        let ok = write_value(&mut out, &kind, text.as_bytes());
        (String::from_utf8(out).unwrap(), ok)
    }

    #[test]
    fn scalar_values_follow_the_design_mapping() {
        assert_eq!(json(Kind::Bool, "t"), ("true".into(), true));
        assert_eq!(json(Kind::Integer, "-42"), ("-42".into(), true));
        assert_eq!(json(Kind::Float, "1.5e+20"), ("1.5e+20".into(), true));
        assert_eq!(json(Kind::Float, "NaN"), ("\"NaN\"".into(), true));
        assert_eq!(
            json(Kind::Float, "-Infinity"),
            ("\"-Infinity\"".into(), true)
        );
        assert_eq!(
            json(Kind::Numeric, "12345678901234567890.12"),
            ("\"12345678901234567890.12\"".into(), true)
        );
        assert_eq!(
            json(Kind::TimestampTz, "2025-01-08 10:30:00.123+00"),
            ("\"2025-01-08T10:30:00.123000Z\"".into(), true)
        );
        assert_eq!(
            json(Kind::Timestamp, "2025-01-08 10:30:00"),
            ("\"2025-01-08T10:30:00.000000\"".into(), true)
        );
        assert_eq!(
            json(Kind::TimestampTz, "infinity"),
            ("\"infinity\"".into(), false)
        );
        assert_eq!(
            json(Kind::Date, "0044-03-15 BC"),
            ("\"0044-03-15 BC\"".into(), false)
        );
        assert_eq!(
            json(Kind::Bytea, "\\x48656c6c6f"),
            ("\"SGVsbG8=\"".into(), true)
        );
        assert_eq!(
            json(Kind::Json, "{\"a\" :\n [1, \"x y\"]}"),
            ("{\"a\":[1,\"x y\"]}".into(), true)
        );
        assert_eq!(json(Kind::Jsonb, "{\"a\": 1}"), ("{\"a\": 1}".into(), true));
        assert_eq!(
            json(Kind::Text, "a\"b\\c\nd\u{1}"),
            ("\"a\\\"b\\\\c\\nd\\u0001\"".into(), true)
        );
    }

    #[test]
    fn arrays_become_json_arrays_of_element_values() {
        let int = Kind::Array(Box::new(Kind::Integer), b',');
        assert_eq!(json(int.clone(), "{1,2,NULL}"), ("[1,2,null]".into(), true));
        assert_eq!(
            json(int.clone(), "{{1,2},{3,4}}"),
            ("[[1,2],[3,4]]".into(), true)
        );
        assert_eq!(json(int.clone(), "{}"), ("[]".into(), true));
        let text = Kind::Array(Box::new(Kind::Text), b',');
        assert_eq!(
            json(text, "{\"a b\",\"q\\\"x\",NULL,\"NULL\"}"),
            ("[\"a b\",\"q\\\"x\",null,\"NULL\"]".into(), true)
        );
        let ts = Kind::Array(Box::new(Kind::TimestampTz), b',');
        assert_eq!(
            json(ts, "{\"2025-01-08 10:30:00+00\"}"),
            ("[\"2025-01-08T10:30:00.000000Z\"]".into(), true)
        );
        // A lower-bound decoration is not an array JSON can carry: text, flagged.
        assert_eq!(json(int, "[0:1]={1,2}"), ("\"[0:1]={1,2}\"".into(), false));
    }

    /// Issue 15, item 10: `box[]` separates elements with `;` (its `typdelim`), since a box's
    /// text holds commas.
    #[test]
    fn arrays_of_box_split_on_their_own_delimiter() {
        let boxes = Kind::for_type(1020, Some(BOX_OID));
        assert_eq!(
            json(boxes.clone(), "{(1,1),(0,0);(3,3),(2,2)}"),
            ("[\"(1,1),(0,0)\",\"(3,3),(2,2)\"]".into(), true)
        );
        assert_eq!(
            json(boxes, "{{(1,1),(0,0)};{NULL}}"),
            ("[[\"(1,1),(0,0)\"],[null]]".into(), true)
        );
        let points = Kind::for_type(1017, Some(600));
        assert_eq!(
            json(points, "{\"(1,2)\",\"(3,4)\"}"),
            ("[\"(1,2)\",\"(3,4)\"]".into(), true)
        );
    }

    #[test]
    fn events_parse_as_the_contract_envelope() {
        let schema = TableSchema {
            table: TableName::new("public", "t"),
            columns: vec![
                ColumnSchema {
                    name: "id".into(),
                    type_name: "integer".into(),
                    type_oid: 23,
                    typmod: -1,
                    key: true,
                    base_oid: 23,
                    element_oid: None,
                },
                ColumnSchema {
                    name: "at".into(),
                    type_name: "timestamp with time zone".into(),
                    type_oid: 1184,
                    typmod: -1,
                    key: false,
                    base_oid: 1184,
                    element_oid: None,
                },
            ],
        };
        let enc = TableEncoder::new(schema, "slot1", "app");
        let tx = TxContext {
            xid: Some(7),
            commit_lsn: Lsn(0x200),
            commit_us: 1_736_332_200_123_456,
            prev_commit_end: Lsn(0x100),
            snapshot: false,
        };
        let old = [Value::Text(Bytes::from_static(b"1")), Value::Null];
        let new = [
            Value::Text(Bytes::from_static(b"2")),
            Value::Text(Bytes::from_static(b"infinity")),
        ];
        let mut out = Vec::new();
        enc.write_event(
            &mut out,
            Op::Update,
            Some(Image::KeyOnly(&old)),
            Some(&new),
            &tx,
            Lsn(0x1F0),
            3,
            1,
            99,
        );
        assert_eq!(out.last(), Some(&b'\n'));
        let ev: ChangeEvent = serde_json::from_slice(&out).unwrap();
        assert_eq!(ev.op, Op::Update);
        assert_eq!(ev.before.as_ref().unwrap().len(), 1);
        assert_eq!(ev.after.as_ref().unwrap()["at"], "infinity");
        assert_eq!(ev.raw_columns, vec!["at".to_string()]);
        assert_eq!(ev.source.commit_lsn, 0x200);
        assert_eq!(ev.source.lsn, 0x1F0);
        assert_eq!(ev.source.ts_ms, 1_736_332_200_123);
        assert_eq!(ev.source.tx_id, Some(7));
        assert_eq!(ev.source.sequence, "[\"256\",\"496\"]");
        assert_eq!(ev.transaction.id, "7:512");
        assert_eq!(ev.transaction.total_order, 3);
        assert_eq!(ev.position().key(), "0000000000000200.00000003");
    }
}
