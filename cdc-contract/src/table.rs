//! Qualified table names.

use std::fmt;
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

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

impl FromStr for TableName {
    type Err = ParseError;

    /// Parses `schema.table`; the schema is the part before the first dot.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        match s.split_once('.') {
            Some((schema, name)) if !schema.is_empty() && !name.is_empty() && !s.contains('/') => {
                Ok(TableName::new(schema, name))
            }
            _ => Err(ParseError::new("table name (expected schema.table)", s)),
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
}
