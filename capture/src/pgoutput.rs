//! Decoding pgoutput (protocol version 1) messages.
//!
//! Column values stay slices of the received buffer (`Bytes`), so decoding copies nothing.

use bytes::{Buf, Bytes};

use cdc_contract::Lsn;

/// A message pgoutput sent that cannot be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct DecodeError(pub String);

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (not sent).
    Unchanged,
    /// The value's text form.
    Text(Bytes),
}

/// A relation's column as pgoutput describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity.
    pub key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub typmod: i32,
}

/// A Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's OID.
    pub oid: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// REPLICA IDENTITY: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in table order.
    pub columns: Vec<RelationColumn>,
}

/// The old row image of an update or delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// Replica identity columns only (`K`).
    Key(Vec<Value>),
    /// The whole old row (`O`, REPLICA IDENTITY FULL).
    Full(Vec<Value>),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PgOutput {
    /// A transaction starts.
    Begin {
        /// The LSN of its commit record.
        final_lsn: Lsn,
        /// Commit time, µs since 2000-01-01.
        commit_ts: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction ends.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The end of the commit record.
        end_lsn: Lsn,
        /// Commit time, µs since 2000-01-01.
        commit_ts: i64,
    },
    /// Replication origin of the transaction.
    Origin {
        /// Origin name.
        name: String,
    },
    /// A relation's description (sent before its first change and after schema changes).
    Relation(Relation),
    /// A type's name (sent for user types before a relation that uses them).
    Type {
        /// Type OID.
        oid: u32,
        /// Schema.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// An inserted row.
    Insert {
        /// Relation OID.
        rel: u32,
        /// The new row.
        new: Vec<Value>,
    },
    /// An updated row.
    Update {
        /// Relation OID.
        rel: u32,
        /// The old row or key, when the replica identity provides it.
        old: Option<OldTuple>,
        /// The new row.
        new: Vec<Value>,
    },
    /// A deleted row.
    Delete {
        /// Relation OID.
        rel: u32,
        /// The old row or key.
        old: Option<OldTuple>,
    },
    /// Truncated relations.
    Truncate {
        /// Relation OIDs.
        rels: Vec<u32>,
        /// Bit 1: CASCADE, bit 2: RESTART IDENTITY.
        options: u8,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    Message {
        /// Transactional messages arrive inside their transaction.
        transactional: bool,
        /// The message's LSN.
        lsn: Lsn,
        /// Prefix.
        prefix: String,
        /// Content.
        content: Bytes,
    },
}

struct Reader {
    buf: Bytes,
}

impl Reader {
    fn need(&self, n: usize, what: &str) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            return Err(DecodeError(format!("truncated {what}")));
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1, "byte")?;
        Ok(self.buf.get_u8())
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        self.need(2, "int16")?;
        Ok(self.buf.get_i16())
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4, "int32")?;
        Ok(self.buf.get_u32())
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4, "int32")?;
        Ok(self.buf.get_i32())
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        self.need(8, "int64")?;
        Ok(self.buf.get_u64())
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        self.need(8, "int64")?;
        Ok(self.buf.get_i64())
    }

    fn cstr(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.advance(end + 1);
        Ok(s)
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        self.need(n, "value")?;
        Ok(self.buf.split_to(n))
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16()?;
        let mut values = Vec::with_capacity(n.max(0) as usize);
        for _ in 0..n {
            values.push(match self.u8()? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' => {
                    let len = self.u32()? as usize;
                    Value::Text(self.bytes(len)?)
                }
                other => {
                    return Err(DecodeError(format!(
                        "unknown tuple value kind {:?}",
                        other as char
                    )))
                }
            });
        }
        Ok(values)
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: Bytes) -> Result<PgOutput, DecodeError> {
    let mut r = Reader { buf: data };
    let tag = r.u8()?;
    let msg = match tag {
        b'B' => PgOutput::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_ts: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            PgOutput::Commit {
                commit_lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_ts: r.i64()?,
            }
        }
        b'O' => {
            let _lsn = r.u64()?;
            PgOutput::Origin { name: r.cstr()? }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()?;
            let mut columns = Vec::with_capacity(n.max(0) as usize);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    typmod: r.i32()?,
                });
            }
            PgOutput::Relation(Relation {
                oid,
                // pgoutput sends an empty namespace for pg_catalog.
                namespace: if namespace.is_empty() {
                    "pg_catalog".into()
                } else {
                    namespace
                },
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => PgOutput::Type {
            oid: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let rel = r.u32()?;
            match r.u8()? {
                b'N' => PgOutput::Insert {
                    rel,
                    new: r.tuple()?,
                },
                other => {
                    return Err(DecodeError(format!(
                        "insert without new tuple ({:?})",
                        other as char
                    )))
                }
            }
        }
        b'U' => {
            let rel = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                let tuple = r.tuple()?;
                old = Some(if kind == b'K' {
                    OldTuple::Key(tuple)
                } else {
                    OldTuple::Full(tuple)
                });
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(DecodeError(format!(
                    "update without new tuple ({:?})",
                    kind as char
                )));
            }
            PgOutput::Update {
                rel,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let rel = r.u32()?;
            let kind = r.u8()?;
            let tuple = r.tuple()?;
            let old = match kind {
                b'K' => OldTuple::Key(tuple),
                b'O' => OldTuple::Full(tuple),
                other => {
                    return Err(DecodeError(format!(
                        "delete with tuple kind {:?}",
                        other as char
                    )))
                }
            };
            PgOutput::Delete {
                rel,
                old: Some(old),
            }
        }
        b'T' => {
            let n = r.u32()?;
            let options = r.u8()?;
            let mut rels = Vec::with_capacity(n.min(1 << 16) as usize);
            for _ in 0..n {
                rels.push(r.u32()?);
            }
            PgOutput::Truncate { rels, options }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            PgOutput::Message {
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        other => {
            return Err(DecodeError(format!(
                "unknown message type {:?}",
                other as char
            )))
        }
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    fn tuple(out: &mut Vec<u8>, values: &[Option<&str>]) {
        out.put_i16(values.len() as i16);
        for v in values {
            match v {
                None => out.put_u8(b'n'),
                Some("\u{0}u") => out.put_u8(b'u'),
                Some(t) => {
                    out.put_u8(b't');
                    out.put_u32(t.len() as u32);
                    out.put_slice(t.as_bytes());
                }
            }
        }
    }

    #[test]
    fn decodes_begin_relation_update_and_commit() {
        let mut b = vec![b'B'];
        b.put_u64(0x100);
        b.put_i64(5);
        b.put_u32(77);
        assert_eq!(
            decode(b.into()).unwrap(),
            PgOutput::Begin {
                final_lsn: Lsn(0x100),
                commit_ts: 5,
                xid: 77
            }
        );

        let mut r = vec![b'R'];
        r.put_u32(16384);
        r.put_slice(b"public\0users\0");
        r.put_u8(b'd');
        r.put_i16(2);
        r.put_u8(1);
        r.put_slice(b"id\0");
        r.put_u32(23);
        r.put_i32(-1);
        r.put_u8(0);
        r.put_slice(b"name\0");
        r.put_u32(25);
        r.put_i32(-1);
        let PgOutput::Relation(rel) = decode(r.into()).unwrap() else {
            panic!()
        };
        assert_eq!(rel.columns.len(), 2);
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.namespace, "public");

        let mut u = vec![b'U'];
        u.put_u32(16384);
        u.put_u8(b'K');
        tuple(&mut u, &[Some("1"), None]);
        u.put_u8(b'N');
        tuple(&mut u, &[Some("2"), Some("\u{0}u")]);
        assert_eq!(
            decode(u.into()).unwrap(),
            PgOutput::Update {
                rel: 16384,
                old: Some(OldTuple::Key(vec![
                    Value::Text(Bytes::from_static(b"1")),
                    Value::Null
                ])),
                new: vec![Value::Text(Bytes::from_static(b"2")), Value::Unchanged],
            }
        );

        let mut c = vec![b'C', 0];
        c.put_u64(0x100);
        c.put_u64(0x130);
        c.put_i64(5);
        assert_eq!(
            decode(c.into()).unwrap(),
            PgOutput::Commit {
                commit_lsn: Lsn(0x100),
                end_lsn: Lsn(0x130),
                commit_ts: 5
            }
        );
    }

    #[test]
    fn truncated_and_unknown_messages_are_errors_not_panics() {
        for bad in [
            &b"B\x00\x01"[..],
            b"Z",
            b"",
            b"I\x00\x00\x40\x00N\x00\x01t\x00\x00\x00\x09ab",
            b"R\x00\x00\x00\x01pub",
        ] {
            assert!(decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }
}
