//! Qualified table names.

use std::borrow::Cow;
use std::fmt::{self, Write};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// A schema-qualified table name, written `schema.table`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// The PostgreSQL schema (namespace).
    pub schema: String,
    /// The table's name within its schema.
    pub name: String,
}

impl TableName {
    /// A table name from its parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
            name: name.into(),
        }
    }
}

impl TableName {
    /// The table's name as it appears in S3 keys and file names: [`escape`]d, dots kept.
    pub fn key_name(&self) -> String {
        escape(&self.name, false).into_owned()
    }
}

/// Escapes an identifier for S3 keys and ledger keys: `%`, `/`, control characters, whitespace
/// at either end (which a reader trims: a quoted `"orders "`) and (in a schema, where a dot would
/// end it) `.` become `%XX` of their UTF-8 bytes. Every other character, and so every ordinary
/// identifier, stays as it is. [`unescape`] reverses it.
fn escape(part: &str, escape_dot: bool) -> Cow<'_, str> {
    let special = |c: char| matches!(c, '%' | '/') || c.is_control() || (escape_dot && c == '.');
    // Byte offsets: whitespace before `lead` or from `trail` on is at an end.
    let lead = part.len() - part.trim_start().len();
    let trail = part.trim_end().len().max(lead);
    if lead == 0 && trail == part.len() && !part.contains(special) {
        return Cow::Borrowed(part);
    }
    let mut out = String::with_capacity(part.len() + 8);
    for (i, c) in part.char_indices() {
        if special(c) || i < lead || i >= trail {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Reverses [`escape`]: `%XX` sequences become their bytes; anything else is kept.
fn unescape(part: &str) -> Option<String> {
    if !part.contains('%') {
        return Some(part.to_owned());
    }
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part.get(i + 1..i + 3)?;
            if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `schema.table`, each part [`escape`]d so that any PostgreSQL identifiers (a table named
/// `a/b`, a schema with a dot) give one S3 key segment and parse back to the same names.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}",
            escape(&self.schema, true),
            escape(&self.name, false)
        )
    }
}

impl FromStr for TableName {
    type Err = ParseError;

    /// Parses `schema.table` as [`fmt::Display`] writes it; the schema is the part before the
    /// first dot.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || ParseError::new("table name (expected schema.table)", s);
        match s.split_once('.') {
            Some((schema, name)) if !schema.is_empty() && !name.is_empty() && !s.contains('/') => {
                Ok(TableName::new(
                    unescape(schema).ok_or_else(bad)?,
                    unescape(name).ok_or_else(bad)?,
                ))
            }
            _ => Err(bad()),
        }
    }
}

impl Serialize for TableName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TableName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_parse_schema_dot_table() {
        let t: TableName = "public.users".parse().unwrap();
        assert_eq!(t, TableName::new("public", "users"));
        assert_eq!(t.to_string(), "public.users");
        assert!("users".parse::<TableName>().is_err());
        assert!(".users".parse::<TableName>().is_err());
        assert!("public.".parse::<TableName>().is_err());
        assert!("a/b.c".parse::<TableName>().is_err());
    }

    /// Issue 15, item 8: any identifiers give one key segment that parses back to them, and
    /// ordinary ones are unchanged.
    #[test]
    fn odd_identifiers_escape_to_one_key_segment_and_back() {
        for (schema, name, text) in [
            ("public", "a/b", "public.a%2Fb"),
            ("we.ird", "x%y", "we%2Eird.x%25y"),
            ("public", "tab\tle", "public.tab%09le"),
            ("Ünï", "名前.v2", "Ünï.名前.v2"),
            ("public", "users", "public.users"),
            // Whitespace that a reader would trim (a quoted `"public"."orders "`) is escaped
            // at the ends of a part, where trimming would take it; inside a name it stays.
            ("public", "orders ", "public.orders%20"),
            (" s", "t", "%20s.t"),
            ("s ", " t", "s%20.%20t"),
            ("public", "my table", "public.my table"),
            ("public", "nb\u{a0}", "public.nb%C2%A0"),
            ("public", "  ", "public.%20%20"),
        ] {
            let t = TableName::new(schema, name);
            assert_eq!(t.to_string(), text);
            assert!(!t.to_string().contains('/'));
            assert_eq!(text.parse::<TableName>().unwrap(), t, "{text:?}");
        }
        assert_eq!(TableName::new("s", "a/b").key_name(), "a%2Fb");
        assert_eq!(TableName::new("s", "t ").key_name(), "t%20");
        // Text around a name, as in a list typed by hand, is still trimmed.
        assert_eq!(
            " public.users ".parse::<TableName>().unwrap(),
            TableName::new("public", "users")
        );
        assert!("public.a%2".parse::<TableName>().is_err());
        assert!("public.a%ZZ".parse::<TableName>().is_err());
        assert!("public.a%+1".parse::<TableName>().is_err());
    }
}
