//! WAL positions and the order key of a change.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ParseError;

/// A PostgreSQL WAL position (log sequence number).
///
/// Displays as PostgreSQL does (`16/B374D848`); [`Lsn::key`] writes it as 16 zero-padded hex
/// digits so that text order is LSN order (S3 keys, DynamoDB sort keys).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The zero position.
    pub const ZERO: Lsn = Lsn(0);

    /// 16 zero-padded upper-case hex digits: text order is LSN order.
    pub fn key(self) -> String {
        format!("{:016X}", self.0)
    }

    /// Parses the 16-hex-digit key form written by [`Lsn::key`].
    pub fn from_key(s: &str) -> Result<Self, ParseError> {
        if s.len() != 16 {
            return Err(ParseError::new("LSN key", s));
        }
        u64::from_str_radix(s, 16)
            .map(Lsn)
            .map_err(|_| ParseError::new("LSN key", s))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;

    /// Parses PostgreSQL's `16/B374D848` form.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or_else(|| ParseError::new("LSN", s))?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| ParseError::new("LSN", s))?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| ParseError::new("LSN", s))?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// The order and dedup key of a change: its transaction's commit LSN and its 1-based ordinal
/// within that transaction.
///
/// Key form: 16 hex digits, a dot, 8 hex digits (`00000000016B3748.0000002A`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// The LSN of the transaction's commit record.
    pub commit_lsn: Lsn,
    /// 1-based position of the change within its transaction.
    pub ordinal: u32,
}

impl Position {
    /// A position.
    pub fn new(commit_lsn: Lsn, ordinal: u32) -> Self {
        Self {
            commit_lsn,
            ordinal,
        }
    }

    /// The key form: `{16 hex}.{8 hex}`.
    pub fn key(self) -> String {
        format!("{:016X}.{:08X}", self.commit_lsn.0, self.ordinal)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

impl FromStr for Position {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (lsn, ord) = s
            .split_once('.')
            .ok_or_else(|| ParseError::new("position", s))?;
        let commit_lsn = Lsn::from_key(lsn).map_err(|_| ParseError::new("position", s))?;
        if ord.len() != 8 {
            return Err(ParseError::new("position", s));
        }
        let ordinal = u32::from_str_radix(ord, 16).map_err(|_| ParseError::new("position", s))?;
        Ok(Position {
            commit_lsn,
            ordinal,
        })
    }
}

impl Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.key())
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_displays_and_parses_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("x/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn lsn_keys_sort_like_lsns() {
        let mut lsns = [
            Lsn(0x10),
            Lsn(0x1_0000_0000),
            Lsn(0x9),
            Lsn(u64::MAX),
            Lsn(0xA0),
        ];
        let mut keys: Vec<String> = lsns.iter().map(|l| l.key()).collect();
        lsns.sort();
        keys.sort();
        let back: Vec<Lsn> = keys.iter().map(|k| Lsn::from_key(k).unwrap()).collect();
        assert_eq!(back, lsns);
    }

    #[test]
    fn position_key_round_trips_and_sorts() {
        let a = Position::new(Lsn(0x16B3748), 0x2A);
        assert_eq!(a.key(), "00000000016B3748.0000002A");
        assert_eq!(a.key().parse::<Position>().unwrap(), a);
        let b = Position::new(Lsn(0x16B3748), 0x100);
        let c = Position::new(Lsn(0x16B3749), 1);
        assert!(a < b && b < c);
        assert!(a.key() < b.key() && b.key() < c.key());
        assert!("00000000016B3748-0000002A".parse::<Position>().is_err());
        assert!("00000000016B3748.2A".parse::<Position>().is_err());
    }
}
