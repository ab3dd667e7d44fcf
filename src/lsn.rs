//! PostgreSQL WAL positions (LSNs): parsed from and printed as PostgreSQL's `X/Y` hex text.
//!
//! An LSN is the read-your-writes yardstick: a write committed on the primary at LSN `L` is
//! visible on any replica whose replay position has reached `L`. lagprobe hands them out as
//! consistency tokens, so parsing must reject anything malformed rather than guess.

use std::{fmt, str::FromStr};

/// A byte position in the write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// Why a string is not an LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a PostgreSQL LSN (expected hex \"X/Y\", e.g. \"0/16B3748\")")]
pub struct LsnParseError {
    input: String,
}

impl Lsn {
    /// Bytes from `earlier` to `self`, 0 when `earlier` is already past `self`.
    pub fn bytes_after(self, earlier: Lsn) -> u64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let error = || LsnParseError {
            input: text.to_owned(),
        };
        let (high, low) = text.split_once('/').ok_or_else(error)?;
        let half = |part: &str| {
            if part.is_empty() || part.len() > 8 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error());
            }
            u32::from_str_radix(part, 16).map_err(|_| error())
        };
        Ok(Lsn((u64::from(half(high)?) << 32) | u64::from(half(low)?)))
    }
}

/// LSNs travel as PostgreSQL's text form everywhere (JSON included).
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_postgres_text() {
        for text in ["0/0", "0/16B3748", "1/0", "FFFFFFFF/FFFFFFFF", "A/B"] {
            assert_eq!(text.parse::<Lsn>().unwrap().to_string(), text);
        }
        assert_eq!("1/10".parse::<Lsn>().unwrap(), Lsn((1 << 32) + 16));
        assert_eq!("0/16b3748".parse::<Lsn>().unwrap().to_string(), "0/16B3748");
    }

    #[test]
    fn rejects_malformed_text() {
        for text in [
            "",
            "/",
            "0/",
            "/1",
            "12",
            "0/1/2",
            "g/1",
            "0/123456789",
            " 0/1",
            "-1/0",
            "+1/0",
        ] {
            assert!(text.parse::<Lsn>().is_err(), "{text:?} parsed");
        }
    }

    #[test]
    fn gap_saturates_at_zero() {
        assert_eq!(Lsn(100).bytes_after(Lsn(40)), 60);
        assert_eq!(Lsn(40).bytes_after(Lsn(100)), 0);
    }
}
