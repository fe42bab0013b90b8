//! A staged line read in one strict pass, without serde: the form the capture writes, in any
//! field order, with any fields the compactor does not use.
//!
//! It gives an envelope only where serde_json gives the same one, and `None` wherever it is not
//! sure: an escape in a string whose text is needed (a field name, a member name, `op`, a raw
//! column), a field given twice, an image that is neither null nor an object, an integer that
//! is not plain or does not fit, nesting deeper than [`MAX_DEPTH`], or anything that is not JSON.
//! The line is then read by serde_json, which gives the envelope or the error it always gave.
//! Values it only passes over (row image values, fields the compactor ignores) are checked as
//! serde_json checks them when it skips a value: the JSON grammar, escapes included.
//!
//! Most of a staged line is the envelope, not the row: reading it this way costs much less than
//! serde's general path (docs/COMPACTOR.md, "Memory and speed").

use std::borrow::Cow;

use cdc_contract::event::Op;

use super::{Envelope, EnvelopeSource, EnvelopeTransaction, Image, MEMBERS};

/// Nesting a value may have here; deeper lines are left to serde_json (whose limit is 128).
const MAX_DEPTH: usize = 64;

/// Reads `line` if it is plainly a change event; `None` leaves it to serde_json.
pub(super) fn parse(line: &str) -> Option<Envelope<'_>> {
    let mut s = Scan {
        text: line,
        bytes: line.as_bytes(),
        at: 0,
    };
    let env = s.envelope()?;
    s.ws();
    (s.at == s.bytes.len()).then_some(env)
}

/// A field read at most once.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The high bit of each byte of `word` equal to zero (exact for the lowest such byte).
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte after whitespace (not consumed).
    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.bytes.get(self.at).copied()
    }

    /// Consumes `byte`, after whitespace.
    fn eat(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// Consumes `word` exactly (no whitespace first). Inlined: with a constant `word` the
    /// comparison is a few loads (see [`Scan::either`]).
    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.at + word.len();
        (self.bytes.get(self.at..end)? == word).then(|| self.at = end)
    }

    /// The index of the first `"`, `\` or control character at or after `from`.
    fn special(&self, mut from: usize) -> Option<usize> {
        let b = self.bytes;
        while from + 8 <= b.len() {
            let mut word = [0u8; 8];
            word.copy_from_slice(&b[from..from + 8]);
            let w = u64::from_le_bytes(word);
            let hits = zero_bytes(w ^ (ONES * u64::from(b'"')))
                | zero_bytes(w ^ (ONES * u64::from(b'\\')))
                | (w.wrapping_sub(ONES * 0x20) & !w & HIGHS);
            if hits != 0 {
                return Some(from + (hits.trailing_zeros() / 8) as usize);
            }
            from += 8;
        }
        (from..b.len()).find(|&i| matches!(b[i], b'"' | b'\\' | 0..=0x1f))
    }

    /// A string without escapes, from its opening quote: its text.
    fn plain_string(&mut self) -> Option<&'a str> {
        if self.peek()? != b'"' {
            return None;
        }
        let start = self.at + 1;
        let end = self.special(start)?;
        if self.bytes[end] != b'"' {
            return None;
        }
        self.at = end + 1;
        Some(&self.text[start..end])
    }

    /// Passes over a string from its opening quote, escapes checked as serde_json checks them.
    fn skip_string(&mut self) -> Option<()> {
        let mut at = self.at + 1;
        loop {
            at = self.special(at)?;
            match self.bytes[at] {
                b'"' => {
                    self.at = at + 1;
                    return Some(());
                }
                b'\\' => match *self.bytes.get(at + 1)? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => at += 2,
                    b'u' => {
                        let hex = self.bytes.get(at + 2..at + 6)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        at += 6;
                    }
                    _ => return None,
                },
                _ => return None,
            }
        }
    }

    /// A field or member name and its colon.
    fn key(&mut self) -> Option<&'a str> {
        let key = self.plain_string()?;
        self.eat(b':')?;
        Some(key)
    }

    /// After a member: true at the object's end (consumed), false after a comma.
    fn object_end(&mut self) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                Some(false)
            }
            b'}' => {
                self.at += 1;
                Some(true)
            }
            _ => None,
        }
    }

    /// Reads an object's members, each by `member`, given its name, at its value.
    fn object(&mut self, mut member: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let name = self.key()?;
            member(self, name)?;
            if self.object_end()? {
                return Some(());
            }
        }
    }

    /// Passes over any JSON value; its text.
    fn value(&mut self, depth: usize) -> Option<&'a str> {
        let first = self.peek()?;
        let start = self.at;
        match first {
            b'"' => self.skip_string()?,
            b'{' | b'[' => {
                if depth >= MAX_DEPTH {
                    return None;
                }
                self.at += 1;
                let close = if first == b'{' { b'}' } else { b']' };
                if self.peek()? == close {
                    self.at += 1;
                } else {
                    loop {
                        if first == b'{' {
                            if self.peek()? != b'"' {
                                return None;
                            }
                            self.skip_string()?;
                            self.eat(b':')?;
                        }
                        self.value(depth + 1)?;
                        match self.peek()? {
                            b',' => self.at += 1,
                            b if b == close => {
                                self.at += 1;
                                break;
                            }
                            _ => return None,
                        }
                    }
                }
            }
            b't' => self.literal(b"true")?,
            b'f' => self.literal(b"false")?,
            b'n' => self.literal(b"null")?,
            b'-' | b'0'..=b'9' => self.number()?,
            _ => return None,
        }
        Some(&self.text[start..self.at])
    }

    fn digits(&mut self) -> usize {
        let start = self.at;
        while let Some(b'0'..=b'9') = self.bytes.get(self.at) {
            self.at += 1;
        }
        self.at - start
    }

    /// Passes over a number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let lead = *self.bytes.get(self.at)?;
        let n = self.digits();
        if n == 0 || (lead == b'0' && n > 1) {
            return None;
        }
        if self.bytes.get(self.at) == Some(&b'.') {
            self.at += 1;
            if self.digits() == 0 {
                return None;
            }
        }
        if let Some(b'e' | b'E') = self.bytes.get(self.at) {
            self.at += 1;
            if let Some(b'+' | b'-') = self.bytes.get(self.at) {
                self.at += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// A plain non-negative integer (no sign, fraction or exponent) that fits in a u64, after
    /// whitespace.
    fn unsigned(&mut self) -> Option<u64> {
        self.ws();
        self.digits_value()
    }

    /// [`Scan::unsigned`] right here (no whitespace first).
    fn digits_value(&mut self) -> Option<u64> {
        if *self.bytes.get(self.at)? == b'0' {
            self.at += 1;
            return match self.bytes.get(self.at) {
                Some(b'0'..=b'9' | b'.' | b'e' | b'E') => None,
                _ => Some(0),
            };
        }
        let start = self.at;
        let mut value: u64 = 0;
        while let Some(&d @ b'0'..=b'9') = self.bytes.get(self.at) {
            value = value.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            self.at += 1;
        }
        if self.at == start {
            return None;
        }
        match self.bytes.get(self.at) {
            Some(b'.' | b'e' | b'E') => None,
            _ => Some(value),
        }
    }

    /// An integer that fits in an i64 (a negative one plainly written).
    fn signed(&mut self) -> Option<i64> {
        if self.peek()? == b'-' {
            self.at += 1;
            if self.bytes.get(self.at) == Some(&b'0') {
                return None;
            }
            return i64::try_from(self.digits_value()?).ok().map(|v| -v);
        }
        i64::try_from(self.unsigned()?).ok()
    }

    /// An optional integer: null or an i64.
    fn optional(&mut self) -> Option<Option<i64>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        self.signed().map(Some)
    }

    /// A row image: null, or an object whose member names have no escapes.
    fn image(&mut self) -> Option<Option<Image<'a>>> {
        if self.peek()? == b'n' {
            self.literal(b"null")?;
            return Some(None);
        }
        let mut members = Vec::with_capacity(MEMBERS);
        self.object(|s, name| {
            members.push((Cow::Borrowed(name), s.value(2)?));
            Some(())
        })?;
        Some(Some(Image::Members(members)))
    }

    /// Reads with `in_order` (an object in the form the capture writes it: its fields in the
    /// capture's order, without whitespace between them), else from the same place with
    /// `any_order` (any form). For the form it reads, `in_order` must give what `any_order`
    /// gives: its field names are compared as whole literals instead of being scanned and
    /// matched one by one (most of what reading a line costs, when most fields are skipped).
    fn either<T>(
        &mut self,
        in_order: impl FnOnce(&mut Self) -> Option<T>,
        any_order: impl FnOnce(&mut Self) -> Option<T>,
    ) -> Option<T> {
        let start = self.at;
        if let Some(v) = in_order(self) {
            return Some(v);
        }
        self.at = start;
        any_order(self)
    }

    fn source(&mut self) -> Option<EnvelopeSource> {
        self.either(Self::source_in_order, Self::source_any_order)
    }

    /// The source object as the capture writes it (`TableEncoder::write_event`).
    fn source_in_order(&mut self) -> Option<EnvelopeSource> {
        self.ws();
        self.literal(b"{\"version\":")?;
        self.value(2)?;
        self.literal(b",\"connector\":")?;
        self.value(2)?;
        self.literal(b",\"name\":")?;
        self.value(2)?;
        self.literal(b",\"ts_ms\":")?;
        let ts_ms = self.signed()?;
        self.literal(b",\"ts_us\":")?;
        let ts_us = self.optional()?;
        self.literal(b",\"snapshot\":")?;
        self.value(2)?;
        self.literal(b",\"db\":")?;
        self.value(2)?;
        self.literal(b",\"sequence\":")?;
        self.value(2)?;
        self.literal(b",\"schema\":")?;
        self.value(2)?;
        self.literal(b",\"table\":")?;
        self.value(2)?;
        self.literal(b",\"txId\":")?;
        let tx_id = self.optional()?;
        self.literal(b",\"lsn\":")?;
        self.value(2)?;
        self.literal(b",\"commit_lsn\":")?;
        let commit_lsn = self.unsigned()?;
        self.literal(b"}")?;
        Some(EnvelopeSource {
            ts_ms,
            ts_us,
            tx_id,
            commit_lsn,
        })
    }

    fn source_any_order(&mut self) -> Option<EnvelopeSource> {
        let (mut ts_ms, mut ts_us, mut tx_id, mut commit_lsn) = (None, None, None, None);
        self.object(|s, name| match name {
            "ts_ms" => once(&mut ts_ms, s.signed()?),
            "ts_us" => once(&mut ts_us, s.optional()?),
            "txId" => once(&mut tx_id, s.optional()?),
            "commit_lsn" => once(&mut commit_lsn, s.unsigned()?),
            _ => s.value(2).map(drop),
        })?;
        Some(EnvelopeSource {
            ts_ms: ts_ms?,
            ts_us: ts_us.flatten(),
            tx_id: tx_id.flatten(),
            commit_lsn: commit_lsn?,
        })
    }

    fn transaction(&mut self) -> Option<EnvelopeTransaction> {
        self.either(Self::transaction_in_order, Self::transaction_any_order)
    }

    /// The transaction object as the capture writes it.
    fn transaction_in_order(&mut self) -> Option<EnvelopeTransaction> {
        self.ws();
        self.literal(b"{\"id\":")?;
        self.value(2)?;
        self.literal(b",\"total_order\":")?;
        let total_order = u32::try_from(self.unsigned()?).ok()?;
        self.literal(b",\"data_collection_order\":")?;
        self.value(2)?;
        self.literal(b"}")?;
        Some(EnvelopeTransaction { total_order })
    }

    fn transaction_any_order(&mut self) -> Option<EnvelopeTransaction> {
        let mut total_order = None;
        self.object(|s, name| match name {
            "total_order" => once(&mut total_order, u32::try_from(s.unsigned()?).ok()?),
            _ => s.value(2).map(drop),
        })?;
        Some(EnvelopeTransaction {
            total_order: total_order?,
        })
    }

    fn op(&mut self) -> Option<Op> {
        Some(match self.plain_string()? {
            "c" => Op::Create,
            "u" => Op::Update,
            "d" => Op::Delete,
            "r" => Op::Read,
            "t" => Op::Truncate,
            _ => return None,
        })
    }

    fn raw_columns(&mut self) -> Option<Vec<Cow<'a, str>>> {
        self.eat(b'[')?;
        let mut names = Vec::new();
        if self.peek()? == b']' {
            self.at += 1;
            return Some(names);
        }
        loop {
            names.push(Cow::Borrowed(self.plain_string()?));
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(names);
                }
                _ => return None,
            }
        }
    }

    fn envelope(&mut self) -> Option<Envelope<'a>> {
        self.either(Self::envelope_in_order, Self::envelope_any_order)
    }

    /// The envelope as the capture writes it, `raw_columns` last when it is there.
    fn envelope_in_order(&mut self) -> Option<Envelope<'a>> {
        self.ws();
        self.literal(b"{\"before\":")?;
        let before = self.image()?;
        self.literal(b",\"after\":")?;
        let after = self.image()?;
        self.literal(b",\"source\":")?;
        let source = self.source()?;
        self.literal(b",\"op\":")?;
        let op = self.op()?;
        self.literal(b",\"ts_ms\":")?;
        self.value(1)?;
        self.literal(b",\"transaction\":")?;
        let transaction = self.transaction()?;
        let raw_columns = match self.literal(b",\"raw_columns\":") {
            Some(()) => self.raw_columns()?,
            None => Vec::new(),
        };
        self.literal(b"}")?;
        Some(Envelope {
            before,
            after,
            source,
            op,
            transaction,
            raw_columns,
        })
    }

    fn envelope_any_order(&mut self) -> Option<Envelope<'a>> {
        let (mut before, mut after, mut source, mut op) = (None, None, None, None);
        let (mut transaction, mut raw_columns) = (None, None);
        self.object(|s, name| match name {
            "before" => once(&mut before, s.image()?),
            "after" => once(&mut after, s.image()?),
            "source" => once(&mut source, s.source()?),
            "op" => once(&mut op, s.op()?),
            "transaction" => once(&mut transaction, s.transaction()?),
            "raw_columns" => once(&mut raw_columns, s.raw_columns()?),
            _ => s.value(1).map(drop),
        })?;
        Some(Envelope {
            before: before.flatten(),
            after: after.flatten(),
            source: source?,
            op: op?,
            transaction: transaction?,
            raw_columns: raw_columns.unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use bytes::Bytes;
    use capture::encode::{Image as Row, TableEncoder, TxContext};
    use capture::pgoutput::Value;
    use cdc_contract::schema::TableSchema;
    use cdc_contract::{Lsn, TableName};
    use pipeline_tests::staging::{column, ColumnExt};
    use proptest::prelude::*;

    /// What serde_json reads of `line`, when it reads it.
    fn serde(line: &str) -> Option<Envelope<'_>> {
        serde_json::from_str(line).ok()
    }

    /// `line` read in one pass is what serde_json reads, whenever it is read in one pass.
    fn agrees(line: &str) -> Result<(), TestCaseError> {
        if let Some(fast) = parse(line) {
            prop_assert_eq!(Some(fast), serde(line), "{}", line);
        }
        Ok(())
    }

    fn text(t: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(t.as_bytes()))
    }

    #[test]
    fn the_captures_own_lines_are_read_in_one_pass_as_serde_json_reads_them() {
        let schema = TableSchema {
            table: TableName::new("public", "orders"),
            columns: vec![
                column("id", "bigint", 20).key(),
                column("note", "text", 25),
                column("amount", "numeric", 1700),
                column("doc", "jsonb", 3802),
                column("at", "timestamp with time zone", 1184),
                column("flag", "boolean", 16),
                column("score", "double precision", 701),
                column("blob", "bytea", 17),
                column("tags", "text[]", 1009).array_of(25),
                column("é name", "text", 25),
            ],
        };
        let enc = TableEncoder::new(schema, "pipe \"1\"", "app");
        let row = |id: &str, note: &str| {
            vec![
                text(id),
                text(note),
                text("12.50"),
                text("{\"a\": [1, {\"b\": null}], \"c\": \"x\\\"y\"}"),
                text("2025-01-08 10:30:00.123456+00"),
                text("t"),
                text("-1.5e-7"),
                text("\\x00ff"),
                text("{a,\"b c\",NULL}"),
                Value::Null,
            ]
        };
        let plain = row("1", "plain");
        let odd = row(
            "2",
            "quote \" backslash \\ newline \n tab \t bell \u{7} é ✓",
        );
        let mut unchanged = row("3", "x");
        unchanged[1] = Value::Unchanged;
        let mut refused = row("4", "x");
        refused[4] = text("infinity");
        let tx = |xid| TxContext {
            xid,
            commit_lsn: Lsn(0x1_0000_0000),
            commit_us: 1_736_332_200_123_456,
            prev_commit_end: Lsn(7),
            snapshot: false,
        };
        let mut out = Vec::new();
        for (op, before, after, xid) in [
            (Op::Create, None, Some(&plain), Some(7)),
            (Op::Create, None, Some(&odd), None),
            (
                Op::Update,
                Some(Row::KeyOnly(&plain)),
                Some(&odd),
                Some(u32::MAX),
            ),
            (Op::Update, Some(Row::Full(&odd)), Some(&unchanged), Some(8)),
            (Op::Create, None, Some(&refused), Some(9)),
            (Op::Delete, Some(Row::KeyOnly(&odd)), None, Some(10)),
            (Op::Read, None, Some(&plain), None),
        ] {
            let after = after.map(Vec::as_slice);
            enc.write_event(&mut out, op, before, after, &tx(xid), Lsn(42), 3, 1, 99);
        }
        let lines = String::from_utf8(out).unwrap();
        let mut read = 0;
        for line in lines.lines() {
            // In the form that is read by whole field names in order.
            let mut s = Scan {
                text: line,
                bytes: line.as_bytes(),
                at: 0,
            };
            assert!(s.envelope_in_order().is_some(), "not in order: {line}");
            let fast = parse(line).unwrap_or_else(|| panic!("not read in one pass: {line}"));
            assert_eq!(Some(fast), serde(line), "{line}");
            read += 1;
        }
        assert_eq!(read, 7);
        // The refused value is named, as serde reads it.
        let last_but_two = lines.lines().nth(4).unwrap();
        assert_eq!(parse(last_but_two).unwrap().raw_columns, vec!["at"]);
    }

    #[test]
    fn lines_serde_json_reads_otherwise_or_refuses_are_left_to_it() {
        let good = r#"{"before":null,"after":{"id":1},"source":{"ts_ms":1,"commit_lsn":2},"op":"c","transaction":{"total_order":3}}"#;
        assert!(parse(good).is_some());
        for (from, to) in [
            // A field twice: serde_json refuses it.
            (r#""op":"c""#, r#""op":"c","op":"u""#),
            // An escape in a name or in `op`: serde_json decodes it.
            (r#""op":"c""#, r#""o\u0070":"c""#),
            (r#""op":"c""#, r#""op":"\u0063""#),
            (r#"{"id":1}"#, r#"{"i\"d":1}"#),
            // Integers that are not plain or do not fit.
            (r#""total_order":3"#, r#""total_order":4294967296"#),
            (r#""total_order":3"#, r#""total_order":3.0"#),
            (r#""total_order":3"#, r#""total_order":03"#),
            (r#""ts_ms":1"#, r#""ts_ms":-0"#),
            (r#""ts_ms":1"#, r#""ts_ms":- 1"#),
            (r#""ts_ms":1"#, r#""ts_ms":1e3"#),
            (r#""commit_lsn":2"#, r#""commit_lsn":-2"#),
            (r#""commit_lsn":2"#, r#""commit_lsn":18446744073709551616"#),
            // An image that is not an object, a value that is not JSON.
            (r#""before":null"#, r#""before":[1]"#),
            (r#""before":null"#, r#""before":"x""#),
            (r#"{"id":1}"#, r#"{"id":01}"#),
            (r#"{"id":1}"#, r#"{"id":1.}"#),
            (r#"{"id":1}"#, r#"{"id":"\x"}"#),
            (r#"{"id":1}"#, r#"{"id":"\u12g4"}"#),
            (r#"{"id":1}"#, "{\"id\":\"a\u{1}b\"}"),
            (r#"{"id":1}"#, r#"{"id":[1,]}"#),
            (r#"{"id":1}"#, r#"{"id":tru}"#),
            // A required field missing.
            (r#""op":"c","#, ""),
        ] {
            let line = good.replacen(from, to, 1);
            assert_ne!(line, good);
            assert!(parse(&line).is_none(), "{line}");
        }
        // Values serde_json passes over are passed over here too, as it checks them.
        for (from, to) in [
            (
                r#"{"id":1}"#,
                r#"{"id":"\ud800","n":-0.5E+3,"j":{"a":[true,false,null,{}]}}"#,
            ),
            (r#""ts_ms":1"#, r#""ts_ms":1,"x":{"y":["\"",1e400]}"#),
            (r#""op":"c""#, " \"op\" : \"c\" "),
            (r#""op":"c""#, r#""op":"c","raw_columns":[]"#),
        ] {
            let line = good.replacen(from, to, 1);
            assert!(parse(&line).is_some(), "{line}");
            assert_eq!(parse(&line), serde(&line));
        }
        // Nesting beyond the limit is left to serde_json.
        let deep = format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        let line = good.replacen(r#"{"id":1}"#, &format!(r#"{{"id":{deep}}}"#), 1);
        assert!(parse(&line).is_none());
        assert!(serde(&line).is_some());
    }

    #[test]
    fn the_largest_integers_are_read_and_those_beyond_are_left_to_serde_json() {
        let line = |ts: &str, lsn: &str, order: &str| {
            format!(
                r#"{{"source":{{"ts_ms":{ts},"commit_lsn":{lsn}}},"op":"c","transaction":{{"total_order":{order}}}}}"#
            )
        };
        let max = line(
            &i64::MAX.to_string(),
            &u64::MAX.to_string(),
            &u32::MAX.to_string(),
        );
        let env = parse(&max).expect("the largest values are read");
        assert_eq!(
            (
                env.source.ts_ms,
                env.source.commit_lsn,
                env.transaction.total_order
            ),
            (i64::MAX, u64::MAX, u32::MAX)
        );
        assert_eq!(Some(env), serde(&max));
        let negative = line("-9223372036854775807", "0", "0");
        assert_eq!(parse(&negative).map(|e| e.source.ts_ms), Some(-i64::MAX));
        // i64::MIN, which serde_json reads, is left to it.
        let min = line(&i64::MIN.to_string(), "0", "0");
        assert!(parse(&min).is_none());
        assert_eq!(serde(&min).map(|e| e.source.ts_ms), Some(i64::MIN));
        for beyond in [
            line("9223372036854775808", "0", "0"),
            line("0", "18446744073709551616", "0"),
            line("0", "0", "4294967296"),
        ] {
            assert!(parse(&beyond).is_none(), "{beyond}");
            assert!(serde(&beyond).is_none(), "{beyond}");
        }
    }

    /// Tokens lines are built from: some JSON, some not, some only serde_json reads.
    const VALUES: &[&str] = &[
        "null",
        "true",
        "false",
        "0",
        "-0",
        "7",
        "-7",
        "1.5",
        "-1.25E+3",
        "1e400",
        "01",
        "1.",
        ".5",
        "-",
        "1e",
        "+1",
        "tru",
        "18446744073709551616",
        "4294967296",
        "9223372036854775808",
        "-9223372036854775808",
        "\"x\"",
        "\"\"",
        "\"a\\\"b\"",
        "\"\\u00e9\"",
        "\"\\ud800\"",
        "\"é✓\"",
        "\"\\x\"",
        "\"\\u12g4\"",
        "\"a\u{1}b\"",
        "[]",
        "[1,{\"a\":[null]}]",
        "[1,]",
        "{}",
        "{\"k\": \"v\", \"n\": [1, 2]}",
        "{\"a\"}",
        "{,}",
        "\"c\"",
        "\"u\"",
        "\"d\"",
        "\"q\"",
        "[\"a\",\"b\"]",
        "[\"a\\u0062\"]",
    ];
    const KEYS: &[&str] = &[
        "before",
        "after",
        "source",
        "op",
        "transaction",
        "raw_columns",
        "ts_ms",
        "ts_us",
        "txId",
        "commit_lsn",
        "total_order",
        "id",
        "x",
        "o\\u0070",
        "é",
    ];
    const SPACES: &[&str] = &["", "", "", " ", "\n", "\t", "\r", "\u{b}"];

    /// A JSON-like object of `depth` levels, from `pick`'s choices.
    fn object(pick: &mut impl FnMut(usize) -> usize, depth: usize) -> String {
        let mut out = String::from("{");
        let members = pick(5);
        for m in 0..members {
            if m > 0 {
                out.push(',');
            }
            out.push_str(SPACES[pick(SPACES.len())]);
            out.push_str(&format!("\"{}\"", KEYS[pick(KEYS.len())]));
            out.push_str(SPACES[pick(SPACES.len())]);
            out.push(':');
            out.push_str(SPACES[pick(SPACES.len())]);
            if depth > 0 && pick(3) == 0 {
                out.push_str(&object(pick, depth - 1));
            } else {
                out.push_str(VALUES[pick(VALUES.len())]);
            }
        }
        out.push_str(SPACES[pick(SPACES.len())]);
        out.push('}');
        out
    }

    proptest! {
        /// The word-at-a-time search finds what a byte-by-byte one finds, from every byte of
        /// texts mixing the bytes it looks for with multi-byte characters and DEL.
        #[test]
        fn the_word_search_finds_the_first_quote_backslash_or_control_byte(
            text in "[a\"\\\\\u{0}\u{1f} \u{7f}\u{a0}é✓\n]{0,40}",
        ) {
            let scan = Scan { text: &text, bytes: text.as_bytes(), at: 0 };
            let b = text.as_bytes();
            for from in 0..=b.len() {
                let naive = (from..b.len()).find(|&i| matches!(b[i], b'"' | b'\\' | 0..=0x1f));
                prop_assert_eq!(scan.special(from), naive, "{:?} from {}", text, from);
            }
        }
    }

    /// Choices taken one after the other from `choices`, each below the bound it is asked with.
    fn picker(choices: &[u16]) -> impl FnMut(usize) -> usize + '_ {
        let mut next = 0;
        move |n: usize| {
            next += 1;
            usize::from(choices[next % choices.len()]) % n
        }
    }

    /// `line` with `edits` made: (where, what): 0 and 1 remove the character there, others
    /// insert one of a few that matter to JSON.
    fn edited(line: &str, edits: &[(u16, usize)]) -> String {
        const INSERTS: &[char] = &[
            '"', '\\', ',', '}', '{', ']', '0', '-', ' ', '\u{1}', 'e', '.', ':', 'n',
        ];
        let mut line: Vec<char> = line.chars().collect();
        for &(at, what) in edits {
            let at = usize::from(at) % (line.len() + 1);
            match what {
                0 | 1 if at < line.len() => {
                    line.remove(at);
                }
                0 | 1 => {}
                _ => line.insert(at, INSERTS[what % INSERTS.len()]),
            }
        }
        line.into_iter().collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        #[test]
        fn what_one_pass_reads_serde_json_reads_the_same(
            choices in prop::collection::vec(any::<u16>(), 64..256),
            edits in prop::collection::vec((any::<u16>(), 0usize..12), 0..3),
        ) {
            let mut pick = picker(&choices);
            // A well-formed event, its fields in any order, with random extra members.
            let mut members = vec![
                format!("\"before\":{}", if pick(2) == 0 { "null".to_string() } else { object(&mut pick, 1) }),
                format!("\"after\":{}", object(&mut pick, 2)),
                format!("\"source\":{{\"ts_ms\":{},\"ts_us\":{},\"txId\":{},\"commit_lsn\":{}{}}}",
                    pick(5000), if pick(3) == 0 { "null".to_string() } else { pick(9).to_string() },
                    pick(9), pick(1 << 15), if pick(2) == 0 { ",\"v\":\"[\\\"1\\\"]\"" } else { "" }),
                format!("\"op\":\"{}\"", ["c", "u", "d", "r", "t"][pick(5)]),
                format!("\"transaction\":{{\"id\":\"1:2\",\"total_order\":{}}}", pick(100)),
            ];
            if pick(3) == 0 {
                members.push("\"raw_columns\":[\"a\"]".into());
            }
            for _ in 0..pick(3) {
                let extra = object(&mut pick, 1);
                members.push(extra[1..extra.len() - 1].to_string());
            }
            for i in (1..members.len()).rev() {
                members.swap(i, pick(i + 1));
            }
            members.retain(|m| !m.is_empty());
            // Then a few random edits.
            let line = edited(&format!("{{{}}}", members.join(",")), &edits);
            agrees(&line)?;
        }

        /// The same for lines in the form the capture writes (the form read by whole field
        /// names in order), whole and with a few random edits: whatever the reading in order
        /// accepts, or leaves to the reading in any order, serde_json reads the same.
        #[test]
        fn lines_in_the_captures_order_are_read_as_serde_json_reads_them(
            choices in prop::collection::vec(any::<u16>(), 64..256),
            edits in prop::collection::vec((any::<u16>(), 0usize..14), 0..3),
        ) {
            let mut pick = picker(&choices);
            let optional = |v: usize, null: bool| if null { "null".to_string() } else { v.to_string() };
            let line = format!(
                "{{\"before\":{},\"after\":{},\"source\":{{\"version\":\"0.1.0\",\"connector\":\"postgresql\",\"name\":\"s\",\"ts_ms\":{},\"ts_us\":{},\"snapshot\":\"false\",\"db\":\"app\",\"sequence\":\"[\\\"1\\\",\\\"2\\\"]\",\"schema\":\"public\",\"table\":\"t\",\"txId\":{},\"lsn\":{},\"commit_lsn\":{}}},\"op\":\"{}\",\"ts_ms\":{},\"transaction\":{{\"id\":\"7:512\",\"total_order\":{},\"data_collection_order\":{}}}{}}}",
                if pick(2) == 0 { "null".to_string() } else { object(&mut pick, 1) },
                object(&mut pick, 2),
                pick(5000),
                optional(pick(9), pick(3) == 0),
                optional(pick(9), pick(3) == 0),
                pick(1 << 15),
                pick(1 << 15),
                ["c", "u", "d", "r", "t"][pick(5)],
                pick(99),
                pick(100),
                pick(100),
                if pick(3) == 0 { ",\"raw_columns\":[\"a\"]" } else { "" },
            );
            let mut s = Scan { text: &line, bytes: line.as_bytes(), at: 0 };
            // Unedited, it is read in order whenever it is read in one pass at all (an image
            // with an escaped member name is left to serde_json either way), and as serde_json
            // reads it.
            let in_order = s.envelope_in_order();
            prop_assert_eq!(in_order.is_some(), parse(&line).is_some(), "{}", line);
            if in_order.is_some() {
                prop_assert_eq!(in_order, serde(&line), "{}", line);
            }
            let line = edited(&line, &edits);
            agrees(&line)?;
        }
    }
}
