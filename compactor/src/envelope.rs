//! Reading a staged line: the parts of the change event the compactor needs, borrowed from the
//! line. Row images are split into their members as the line is read (one pass over the line;
//! each value stays raw JSON until it is converted for its column).

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use cdc_contract::event::Op;
use cdc_contract::{Lsn, Position};

mod scan;

/// A change event as the compactor reads it, its row images as `I`.
#[derive(Debug, PartialEq, Deserialize)]
pub struct Event<'a, I> {
    /// The row before the change.
    #[serde(default = "none")]
    pub before: Option<I>,
    /// The row after the change.
    #[serde(default = "none")]
    pub after: Option<I>,
    /// The source block.
    pub source: EnvelopeSource,
    /// The operation.
    pub op: Op,
    /// The transaction block.
    pub transaction: EnvelopeTransaction,
    /// Columns the capture gave as PostgreSQL text.
    #[serde(borrow, default)]
    pub raw_columns: Vec<Cow<'a, str>>,
}

fn none<I>() -> Option<I> {
    None
}

/// A change event with its row images split into their members as the line is read.
pub type Envelope<'a> = Event<'a, Image<'a>>;

/// The `source` fields the compactor uses.
#[derive(Debug, PartialEq, Deserialize)]
pub struct EnvelopeSource {
    /// Commit time (ms).
    pub ts_ms: i64,
    /// Commit time (µs), when present.
    #[serde(default)]
    pub ts_us: Option<i64>,
    /// Transaction id.
    #[serde(rename = "txId", default)]
    pub tx_id: Option<i64>,
    /// Commit LSN.
    pub commit_lsn: u64,
}

/// The `transaction` fields the compactor uses.
#[derive(Debug, PartialEq, Deserialize)]
pub struct EnvelopeTransaction {
    /// Ordinal within the transaction.
    pub total_order: u32,
}

impl<'a> Event<'a, Image<'a>> {
    /// Reads a staged line, its row images split in the same pass. A line whose images are
    /// well-formed JSON but do not decode (a lone surrogate in a member name, a number out of
    /// range) is read all the same, those images [`Image::Unreadable`]: only the image is at
    /// fault, and it is refused only if its row is written, as an image that is not an object.
    pub fn parse(line: &'a str) -> Result<Self, serde_json::Error> {
        if let Some(env) = scan::parse(line) {
            return Ok(env);
        }
        if let Ok(env) = serde_json::from_str(line) {
            return Ok(env);
        }
        // The images as raw JSON, which the syntax check alone accepts.
        let raw: Event<'a, &'a RawValue> = serde_json::from_str(line)?;
        let image = |v: Option<&'a RawValue>| {
            v.map(|v| {
                serde_json::from_str::<Image<'a>>(v.get())
                    .unwrap_or_else(|e| Image::Unreadable(e.to_string()))
            })
        };
        Ok(Envelope {
            before: image(raw.before),
            after: image(raw.after),
            source: raw.source,
            op: raw.op,
            transaction: raw.transaction,
            raw_columns: raw.raw_columns,
        })
    }

    /// The change's (commit LSN, ordinal).
    pub fn position(&self) -> Position {
        Position::new(Lsn(self.source.commit_lsn), self.transaction.total_order)
    }

    /// Commit time in microseconds.
    pub fn commit_us(&self) -> i64 {
        self.source
            .ts_us
            .unwrap_or_else(|| self.source.ts_ms.saturating_mul(1000))
    }

    /// The row image whose values fill the table columns: `after`, or `before` for deletes.
    pub fn image(&self) -> Option<&Image<'a>> {
        match self.op {
            Op::Delete => self.before.as_ref(),
            _ => self.after.as_ref().or(self.before.as_ref()),
        }
    }
}

/// A column name, borrowed from the line when it has no escapes.
struct Name<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// Column positions by event column name.
///
/// A row image lists its members in the table's column order (pgoutput sends a row's columns
/// in that order, and the capture writes them so): [`ColumnLookup::position`] first tries the
/// column after the previous member's, and hashes the name only when that is not it.
/// foldhash: where a name is hashed, the standard library's DoS-resistant SipHash costs a few
/// percent of the parse; the names come from the ledger's schema, not from input an attacker
/// picks.
#[derive(Debug, Default, Clone)]
pub struct ColumnLookup {
    /// Column names by position (none where no name has that position).
    names: Vec<Option<String>>,
    positions: HashMap<String, usize, foldhash::fast::RandomState>,
}

impl ColumnLookup {
    /// The position of column `name`, `guess` tried first.
    pub fn position(&self, name: &str, guess: usize) -> Option<usize> {
        match self.names.get(guess) {
            Some(Some(n)) if n == name => Some(guess),
            _ => self.positions.get(name).copied(),
        }
    }
}

impl FromIterator<(String, usize)> for ColumnLookup {
    /// From (name, position) pairs (a name given twice keeps its last position).
    fn from_iter<I: IntoIterator<Item = (String, usize)>>(pairs: I) -> Self {
        let positions: HashMap<String, usize, foldhash::fast::RandomState> =
            pairs.into_iter().collect();
        let len = positions.values().map(|&i| i + 1).max().unwrap_or(0);
        let mut names = vec![None; len];
        for (name, &i) in &positions {
            names[i] = Some(name.clone());
        }
        ColumnLookup { names, positions }
    }
}

/// A row image split into values by column position; values of names the schema does not know
/// are kept aside.
pub struct RowValues<'a> {
    /// One slot per schema column: the value's JSON text.
    pub values: Vec<Option<&'a str>>,
    /// Columns not in the schema: name and the value's JSON text.
    pub unknown: Vec<(Cow<'a, str>, &'a str)>,
}

/// A row image, read in the same pass as the rest of the line: an object's members in order,
/// each value's JSON text borrowed from the line. An image that cannot be a row is kept as
/// such, and refused when its row is written (a change dropped as a duplicate never is).
#[derive(Debug, PartialEq)]
pub enum Image<'a> {
    /// An object's members: name and the value's JSON text.
    Members(Vec<(Cow<'a, str>, &'a str)>),
    /// Not an object, or a member that does not decode: why it cannot be a row.
    Unreadable(String),
}

/// Members an image has room for before its first growth.
const MEMBERS: usize = 16;

impl<'de: 'a, 'a> Deserialize<'de> for Image<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ImageVisitor(PhantomData))
    }
}

struct ImageVisitor<'a>(PhantomData<&'a ()>);

impl ImageVisitor<'_> {
    fn not_an_object(what: Unexpected<'_>) -> Image<'static> {
        Image::Unreadable(format!("invalid type: {what}, expected a row image object"))
    }
}

impl<'de: 'a, 'a> Visitor<'de> for ImageVisitor<'a> {
    type Value = Image<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a row image")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(MEMBERS);
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            let value: &'de RawValue = map.next_value()?;
            members.push((name, value.get()));
        }
        Ok(Image::Members(members))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Self::not_an_object(Unexpected::Seq))
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Bool(v)))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Signed(v)))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Unsigned(v)))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Float(v)))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Str(v)))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Self::not_an_object(Unexpected::Unit))
    }
}

/// Splits a row image into `out`, whose `values` must hold one slot per column; an image that
/// is not an object gives why.
pub fn split_row<'a>(
    image: &Image<'a>,
    lookup: &ColumnLookup,
    out: &mut RowValues<'a>,
) -> Result<(), String> {
    let members = match image {
        Image::Members(m) => m,
        Image::Unreadable(why) => return Err(why.clone()),
    };
    let mut guess = 0;
    for (name, value) in members {
        match lookup.position(name, guess) {
            Some(i) => {
                out.values[i] = Some(*value);
                guess = i + 1;
            }
            None => out.unknown.push((name.clone(), *value)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = r#"{"before":null,"after":{"id":1,"n\"q":"x","v":[1,2]},"source":{"version":"0.1.0","connector":"postgresql","name":"s","ts_ms":1736332200123,"ts_us":1736332200123456,"snapshot":"false","db":"app","sequence":"[\"1\",\"2\"]","schema":"public","table":"t","txId":7,"lsn":496,"commit_lsn":512},"op":"c","ts_ms":99,"transaction":{"id":"7:512","total_order":3,"data_collection_order":1},"raw_columns":["v"]}"#;

    #[test]
    fn envelopes_borrow_their_row_images() {
        let env: Envelope<'_> = serde_json::from_str(LINE).unwrap();
        assert_eq!(env.position(), Position::new(Lsn(512), 3));
        assert_eq!(env.commit_us(), 1_736_332_200_123_456);
        assert_eq!(env.source.tx_id, Some(7));
        assert!(env.before.is_none());
        assert_eq!(env.raw_columns, vec!["v"]);
        let lookup: ColumnLookup = [("id".to_string(), 0), ("v".to_string(), 1)]
            .into_iter()
            .collect();
        let mut row = RowValues {
            values: vec![None; 3],
            unknown: Vec::new(),
        };
        split_row(env.image().unwrap(), &lookup, &mut row).unwrap();
        assert_eq!(row.values[0], Some("1"));
        assert_eq!(row.values[1], Some("[1,2]"));
        assert!(row.values[2].is_none());
        assert_eq!(row.unknown.len(), 1);
        assert_eq!(row.unknown[0].0, "n\"q");
    }

    #[test]
    fn an_image_that_does_not_decode_leaves_the_line_readable_and_only_its_row_refused() {
        let lone = LINE.replace(r#""before":null"#, r#""before":{"\ud800":1}"#);
        let env = Envelope::parse(&lone).unwrap();
        assert_eq!(env.position(), Position::new(Lsn(512), 3));
        assert!(matches!(env.before, Some(Image::Unreadable(_))));
        // An insert's row is its `after`, which reads.
        let lookup: ColumnLookup = [("id".to_string(), 0)].into_iter().collect();
        let mut row = RowValues {
            values: vec![None; 1],
            unknown: Vec::new(),
        };
        split_row(env.image().unwrap(), &lookup, &mut row).unwrap();
        assert_eq!(row.values[0], Some("1"));

        let huge = LINE.replace(
            r#""after":{"id":1,"n\"q":"x","v":[1,2]}"#,
            r#""after":1e400"#,
        );
        let env = Envelope::parse(&huge).unwrap();
        let why = split_row(env.image().unwrap(), &lookup, &mut row).unwrap_err();
        assert!(why.contains("out of range"), "{why}");

        // A line that is not well-formed JSON stays unreadable, with the error it always had.
        let cut = &LINE[..LINE.len() - 1];
        let err = Envelope::parse(cut).unwrap_err().to_string();
        let before: Result<Event<'_, &RawValue>, _> = serde_json::from_str(cut);
        assert_eq!(err, before.err().unwrap().to_string());
        assert!(Envelope::parse(r#"{"op":"c"}"#).is_err());
    }

    #[test]
    fn deletes_read_the_before_image_and_bad_lines_are_refused() {
        let del = LINE
            .replace(r#""before":null"#, r#""before":{"id":9}"#)
            .replace(r#""op":"c""#, r#""op":"d""#);
        let env: Envelope<'_> = serde_json::from_str(&del).unwrap();
        match env.image().unwrap() {
            Image::Members(m) => {
                assert_eq!(m.len(), 1);
                assert_eq!((m[0].0.as_ref(), m[0].1), ("id", "9"));
            }
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_str::<Envelope<'_>>("{\"op\":\"c\"}").is_err());
        assert!(serde_json::from_str::<Envelope<'_>>(&LINE.replace("\"c\"", "\"x\"")).is_err());
        for (image, why) in [
            (
                "[1,[2]]",
                "invalid type: sequence, expected a row image object",
            ),
            (
                "7",
                "invalid type: integer `7`, expected a row image object",
            ),
            (
                "\"x\"",
                "invalid type: string \"x\", expected a row image object",
            ),
        ] {
            let line = LINE.replace(
                r#""after":{"id":1,"n\"q":"x","v":[1,2]}"#,
                &format!(r#""after":{image}"#),
            );
            let env: Envelope<'_> = serde_json::from_str(&line).unwrap();
            let mut row = RowValues {
                values: vec![],
                unknown: vec![],
            };
            let err = split_row(env.image().unwrap(), &ColumnLookup::default(), &mut row);
            assert_eq!(err, Err(why.to_string()), "{image}");
        }
    }

    proptest::proptest! {
        /// Whatever order an image lists its members in (the table's, another, some missing,
        /// names the schema does not know among them), each value lands in its column's slot
        /// and the unknown ones are kept aside in order.
        #[test]
        fn members_land_in_their_columns_in_any_order(
            columns in proptest::collection::hash_set("[a-e]{1,3}", 1..8),
            picks in proptest::collection::vec((0usize..12, proptest::bool::ANY), 0..14),
        ) {
            let names: Vec<String> = columns.into_iter().collect();
            let lookup: ColumnLookup = names.iter().cloned().enumerate().map(|(i, n)| (n, i)).collect();
            let mut members: Vec<(Cow<'_, str>, &str)> = Vec::new();
            let unknown_names: Vec<String> = (0..12).map(|i| format!("x{i}")).collect();
            for (i, known) in &picks {
                let name = if *known { names[i % names.len()].clone() } else { unknown_names[*i].clone() };
                if members.iter().any(|(n, _)| *n == name) {
                    continue;
                }
                members.push((Cow::Owned(name), "1"));
            }
            let mut expected: Vec<Option<&str>> = vec![None; names.len()];
            let mut expected_unknown = Vec::new();
            for (name, value) in &members {
                match names.iter().position(|n| n == name) {
                    Some(i) => expected[i] = Some(*value),
                    None => expected_unknown.push(name.to_string()),
                }
            }
            let mut row = RowValues { values: vec![None; names.len()], unknown: Vec::new() };
            split_row(&Image::Members(members.clone()), &lookup, &mut row).unwrap();
            proptest::prop_assert_eq!(&row.values, &expected);
            let unknown: Vec<String> = row.unknown.iter().map(|(n, _)| n.to_string()).collect();
            proptest::prop_assert_eq!(unknown, expected_unknown);
            for (name, _) in &members {
                proptest::prop_assert_eq!(
                    lookup.position(name, 0),
                    names.iter().position(|n| n == name)
                );
            }
        }
    }
}
