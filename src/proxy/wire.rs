//! The wire protocol at the proxy's edges: framing, the few client messages the proxy reads
//! into, and the messages it writes itself.
//!
//! Messages pass through as raw frames (type byte, length, body): the proxy forwards bytes
//! and looks inside only the messages that route a query (Query, Parse, Bind, Describe,
//! Close) and the backend's ReadyForQuery. Reading those few fields is done here with
//! bounds checks, because a client's bytes are untrusted and pgwire's decoders assume a
//! well-formed buffer (they index past a short message). Messages the proxy sends to
//! clients are encoded with pgwire.

use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::{
    Message,
    response::{ErrorResponse, ReadyForQuery, TransactionStatus},
};

/// Protocol codes in the first packet, in place of a version.
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;
/// Protocol 3.0: major 3 in the high 16 bits.
pub const PROTOCOL_3: i32 = 3 << 16;
/// The largest first packet PostgreSQL accepts (its MAX_STARTUP_PACKET_LENGTH).
pub const MAX_STARTUP_PACKET_BYTES: usize = 10_000;

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid message length {length} (at most {limit} bytes are accepted)")]
    Length { length: i64, limit: usize },
    #[error("malformed {what} message")]
    Malformed { what: &'static str },
}

/// One message as it came: the type byte and the whole frame (header included), ready to be
/// forwarded unchanged.
#[derive(Debug, Clone)]
pub struct Frame {
    pub tag: u8,
    pub bytes: Bytes,
}

impl Frame {
    /// The body, after the type byte and length.
    pub fn body(&self) -> &[u8] {
        &self.bytes[5..]
    }
}

/// The whole length (type byte included) of the tagged frame at the front of `bytes`, once
/// its header is there; the frame itself may still be arriving. Lengths below 4 or above
/// `max_bytes` are errors: the proxy never waits for (or allocates) a 2 GB message.
fn frame_length(bytes: &[u8], max_bytes: usize) -> Result<Option<usize>, WireError> {
    let [_, a, b, c, d, ..] = *bytes else {
        return Ok(None);
    };
    let length = i32::from_be_bytes([a, b, c, d]);
    usize::try_from(length)
        .ok()
        .filter(|length| (4..=max_bytes).contains(length))
        .map(|length| Some(1 + length))
        .ok_or(WireError::Length {
            length: i64::from(length),
            limit: max_bytes,
        })
}

/// The tag and whole length of the frame at `offset` of `buffer`, once it has all arrived;
/// room is made for one still arriving. Frames are read in place this way, so that a batch
/// of them is forwarded as the one slice it arrived as.
pub fn frame_at(
    buffer: &mut BytesMut,
    offset: usize,
    max_bytes: usize,
) -> Result<Option<(u8, usize)>, WireError> {
    let rest = buffer.get(offset..).unwrap_or_default();
    match frame_length(rest, max_bytes)? {
        Some(length) if rest.len() >= length => Ok(Some((rest[0], length))),
        Some(length) => {
            buffer.reserve(offset + length - buffer.len());
            Ok(None)
        }
        None => Ok(None),
    }
}

/// The frames of `bytes`, which holds complete frames back to back (as
/// [`frame_at`] found them), each whole.
pub fn frames(mut bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let length = frame_length(bytes, usize::MAX).ok()??;
        let (frame, rest) = bytes.split_at_checked(length)?;
        bytes = rest;
        Some(frame)
    })
}

/// Takes the next complete tagged frame off the front of `buffer`, if there is one, and
/// makes room for one still arriving.
pub fn split_frame(buffer: &mut BytesMut, max_bytes: usize) -> Result<Option<Frame>, WireError> {
    let Some((_, length)) = frame_at(buffer, 0, max_bytes)? else {
        return Ok(None);
    };
    let bytes = buffer.split_to(length).freeze();
    Ok(Some(Frame {
        tag: bytes[0],
        bytes,
    }))
}

/// The length of an untagged first packet (startup, SSL, cancel) from its 4 length bytes.
pub fn startup_length(header: [u8; 4]) -> Result<usize, WireError> {
    let length = i32::from_be_bytes(header);
    usize::try_from(length)
        .ok()
        .filter(|length| (8..=MAX_STARTUP_PACKET_BYTES).contains(length))
        .ok_or(WireError::Length {
            length: i64::from(length),
            limit: MAX_STARTUP_PACKET_BYTES,
        })
}

/// A bounds-checked reader over a message body.
pub struct Reader<'a> {
    rest: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub fn new(body: &'a [u8], what: &'static str) -> Self {
        Reader { rest: body, what }
    }

    fn malformed(&self) -> WireError {
        WireError::Malformed { what: self.what }
    }

    pub fn u8(&mut self) -> Result<u8, WireError> {
        let (&first, rest) = self.rest.split_first().ok_or_else(|| self.malformed())?;
        self.rest = rest;
        Ok(first)
    }

    pub fn i32(&mut self) -> Result<i32, WireError> {
        if self.rest.len() < 4 {
            return Err(self.malformed());
        }
        let (head, rest) = self.rest.split_at(4);
        self.rest = rest;
        Ok(i32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }

    /// A NUL-terminated string; invalid UTF-8 is malformed (PostgreSQL would refuse it too).
    pub fn cstr(&mut self) -> Result<&'a str, WireError> {
        // The empty string (the unnamed statement and portal, in nearly every Bind and
        // Execute) is common enough to skip memchr's and from_utf8's setup for.
        if let Some((&0, rest)) = self.rest.split_first() {
            self.rest = rest;
            return Ok("");
        }
        let end = memchr::memchr(0, self.rest).ok_or_else(|| self.malformed())?;
        let text = std::str::from_utf8(&self.rest[..end]).map_err(|_| self.malformed())?;
        self.rest = &self.rest[end + 1..];
        Ok(text)
    }

    pub fn i16(&mut self) -> Result<i16, WireError> {
        if self.rest.len() < 2 {
            return Err(self.malformed());
        }
        let (head, rest) = self.rest.split_at(2);
        self.rest = rest;
        Ok(i16::from_be_bytes([head[0], head[1]]))
    }

    /// An Int32 length then that many bytes (a Bind parameter); -1 is NULL.
    pub fn value(&mut self) -> Result<Option<&'a [u8]>, WireError> {
        if self.rest.get(..4) == Some(&[0xff; 4]) {
            self.rest = &self.rest[4..];
            return Ok(None);
        }
        self.sized_bytes().map(Some)
    }

    /// An Int32 length then that many bytes (SASLInitialResponse's data); -1 is none.
    pub fn sized_bytes(&mut self) -> Result<&'a [u8], WireError> {
        let length = self.i32()?;
        if length == -1 {
            return Ok(&[]);
        }
        let length = usize::try_from(length).map_err(|_| self.malformed())?;
        if self.rest.len() < length {
            return Err(self.malformed());
        }
        let (bytes, rest) = self.rest.split_at(length);
        self.rest = rest;
        Ok(bytes)
    }
}

/// The startup packet's parameters (`user`, `database`, `application_name`, ...).
pub fn startup_parameters(body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut reader = Reader::new(body, "startup");
    let mut parameters = Vec::new();
    loop {
        let name = reader.cstr()?;
        if name.is_empty() {
            return Ok(parameters);
        }
        parameters.push((name.to_owned(), reader.cstr()?.to_owned()));
    }
}

/// What the proxy reads of the client messages that route a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage<'a> {
    Query {
        sql: &'a str,
    },
    Parse {
        statement: &'a str,
        sql: &'a str,
    },
    Bind {
        portal: &'a str,
        statement: &'a str,
    },
    Execute {
        portal: &'a str,
    },
    /// Describe or Close of a prepared statement (`S`) or portal (`P`).
    Describe {
        kind: u8,
        name: &'a str,
    },
    Close {
        kind: u8,
        name: &'a str,
    },
    /// Sync, Flush, Terminate, copy data, ...: forwarded without a look inside.
    Other,
}

/// Reads the routing fields of a whole client frame (type byte and length included).
pub fn client_message(frame: &[u8]) -> Result<ClientMessage<'_>, WireError> {
    let (Some(&tag), Some(body)) = (frame.first(), frame.get(5..)) else {
        return Err(WireError::Malformed { what: "message" });
    };
    Ok(match tag {
        b'Q' => ClientMessage::Query {
            sql: Reader::new(body, "Query").cstr()?,
        },
        b'P' => {
            let mut reader = Reader::new(body, "Parse");
            ClientMessage::Parse {
                statement: reader.cstr()?,
                sql: reader.cstr()?,
            }
        }
        b'B' => {
            let mut reader = Reader::new(body, "Bind");
            ClientMessage::Bind {
                portal: reader.cstr()?,
                statement: reader.cstr()?,
            }
        }
        b'E' => ClientMessage::Execute {
            portal: Reader::new(body, "Execute").cstr()?,
        },
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let mut reader = Reader::new(body, what);
            let kind = reader.u8()?;
            let name = reader.cstr()?;
            if !matches!(kind, b'S' | b'P') {
                return Err(WireError::Malformed { what });
            }
            if tag == b'D' {
                ClientMessage::Describe { kind, name }
            } else {
                ClientMessage::Close { kind, name }
            }
        }
        _ => ClientMessage::Other,
    })
}

/// A Bind's parameter values, read only for the rare statement that needs them (a
/// set_config with parameters), never on the hot path. Read here with the bounds-checked
/// [`Reader`]: pgwire's Bind decoder panics on a truncated body, and this is client input.
#[derive(Debug)]
pub struct BoundParameters<'a> {
    formats: Vec<i16>,
    values: Vec<Option<&'a [u8]>>,
}

impl<'a> BoundParameters<'a> {
    /// The parameters of a whole Bind frame (type byte and length included).
    pub fn of(frame: &'a [u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new(frame.get(5..).unwrap_or_default(), "Bind");
        reader.cstr()?;
        reader.cstr()?;
        let formats = (0..reader.i16()?)
            .map(|_| reader.i16())
            .collect::<Result<_, _>>()?;
        let values = (0..reader.i16()?)
            .map(|_| reader.value())
            .collect::<Result<_, _>>()?;
        Ok(BoundParameters { formats, values })
    }

    /// Parameter `index`'s bytes and whether they are in binary format; `None` for NULL.
    fn value(&self, index: usize) -> Option<(&'a [u8], bool)> {
        let format = match self.formats.as_slice() {
            [] => 0,
            [all] => *all,
            each => *each.get(index)?,
        };
        Some(((*self.values.get(index)?)?, format == 1))
    }

    /// A text parameter (text's binary format is its UTF-8 bytes too).
    pub fn text(&self, index: usize) -> Option<String> {
        let (bytes, _) = self.value(index)?;
        String::from_utf8(bytes.to_vec()).ok()
    }

    /// A boolean parameter: one byte in binary format, PostgreSQL's spellings in text.
    pub fn flag(&self, index: usize) -> Option<bool> {
        match self.value(index)? {
            ([byte], true) => Some(*byte != 0),
            (_, true) => None,
            (text, false) => boolean_text(std::str::from_utf8(text).ok()?),
        }
    }
}

/// PostgreSQL's spellings of a boolean in text; `None` for one this does not know.
pub fn boolean_text(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "t" | "true" | "y" | "yes" | "on" | "1" => Some(true),
        "f" | "false" | "n" | "no" | "off" | "0" => Some(false),
        _ => None,
    }
}

/// A transaction status byte from ReadyForQuery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxStatus {
    Idle,
    InTransaction,
    Failed,
}

impl TxStatus {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// Encodes a pgwire message onto `out`. Encoding only fails on lengths the proxy never
/// produces (over pgwire's limits), so a failure is logged and the message dropped.
pub fn put<M: Message>(message: &M, out: &mut BytesMut) {
    if let Err(error) = message.encode(out) {
        tracing::error!(%error, "encoding a proxy message");
    }
}

/// An ErrorResponse with severity ERROR (or FATAL before a close), SQLSTATE and message.
pub fn error_response(fatal: bool, sqlstate: &str, message: &str, out: &mut BytesMut) {
    let severity = if fatal { "FATAL" } else { "ERROR" };
    put(
        &ErrorResponse::new(vec![
            (b'S', severity.to_owned()),
            (b'V', severity.to_owned()),
            (b'C', sqlstate.to_owned()),
            (b'M', message.to_owned()),
        ]),
        out,
    );
}

pub fn ready_for_query(status: TxStatus, out: &mut BytesMut) {
    let status = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InTransaction => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    put(&ReadyForQuery::new(status), out);
}

/// Reads a 32-bit big-endian integer at the front of an untagged packet body.
pub fn leading_i32(body: &[u8]) -> Option<i32> {
    let mut slice = body;
    (slice.len() >= 4).then(|| slice.get_i32())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn frame(tag: u8, body: &[u8]) -> BytesMut {
        let mut bytes = BytesMut::new();
        bytes.extend_from_slice(&[tag]);
        bytes.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        bytes.extend_from_slice(body);
        bytes
    }

    /// A Bind frame for the unnamed statement, encoded by pgwire.
    pub(in crate::proxy) fn bind_frame(formats: Vec<i16>, values: Vec<Option<&str>>) -> BytesMut {
        let values = values
            .into_iter()
            .map(|value| value.map(|text| Bytes::copy_from_slice(text.as_bytes())))
            .collect();
        let bind = pgwire::messages::extendedquery::Bind::new(None, None, formats, values, vec![]);
        let mut out = BytesMut::new();
        put(&bind, &mut out);
        out
    }

    #[test]
    fn bound_parameters_are_read_in_either_format() {
        let bound = bind_frame(vec![], vec![Some("a.b"), Some("on"), None]);
        let text = BoundParameters::of(&bound).unwrap();
        assert_eq!(text.text(0).as_deref(), Some("a.b"));
        assert_eq!(text.flag(1), Some(true));
        assert_eq!(text.text(2), None, "NULL");
        assert_eq!(text.text(3), None, "no such parameter");
        let bound = bind_frame(vec![1], vec![Some("x"), Some("\0"), Some("\0\0")]);
        let binary = BoundParameters::of(&bound).unwrap();
        assert_eq!(binary.text(0).as_deref(), Some("x"));
        assert_eq!(binary.flag(1), Some(false));
        assert_eq!(binary.flag(2), None, "two bytes are no binary boolean");
        let bound = bind_frame(vec![0, 1], vec![Some("f"), Some("\u{1}")]);
        let mixed = BoundParameters::of(&bound).unwrap();
        assert_eq!((mixed.flag(0), mixed.flag(1)), (Some(false), Some(true)));
        // Truncated where pgwire's decoder would panic: one format code promised, none sent.
        assert!(BoundParameters::of(&frame(b'B', b"\0\0\0\x01")).is_err());
        assert!(BoundParameters::of(&frame(b'B', b"\0\0\0\0\0\x01\0\0\0\x09ab")).is_err());
    }

    #[test]
    fn frames_split_when_complete_and_lengths_are_bounded() {
        let mut buffer = frame(b'Q', b"SELECT 1\0");
        buffer.extend_from_slice(&frame(b'S', b"")[..3]);
        let first = split_frame(&mut buffer, 1024).unwrap().unwrap();
        assert_eq!(first.tag, b'Q');
        assert_eq!(
            client_message(&first.bytes).unwrap(),
            ClientMessage::Query { sql: "SELECT 1" }
        );
        assert!(split_frame(&mut buffer, 1024).unwrap().is_none());
        let mut huge = BytesMut::from(&[b'Q', 0x80, 0, 0, 0][..]);
        assert!(matches!(
            split_frame(&mut huge, 1024),
            Err(WireError::Length { .. })
        ));
        let mut over = BytesMut::from(&[b'Q', 0, 0, 8, 0][..]);
        assert!(split_frame(&mut over, 1024).is_err());
        let mut under = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut under, 1024).is_err());
    }

    #[test]
    fn frames_are_found_in_place_at_an_offset_and_walked_back_to_back() {
        let mut buffer = frame(b'P', b"\0SELECT 1\0\0\0");
        let parse_length = buffer.len();
        buffer.extend_from_slice(&frame(b'S', b""));
        let execute = frame(b'E', b"\0\0\0\0\0");
        buffer.extend_from_slice(&execute[..4]);
        assert_eq!(
            frame_at(&mut buffer, 0, 1024).unwrap(),
            Some((b'P', parse_length))
        );
        assert_eq!(
            frame_at(&mut buffer, parse_length, 1024).unwrap(),
            Some((b'S', 5))
        );
        // A frame still arriving, and an offset past the end, are not there yet.
        assert_eq!(frame_at(&mut buffer, parse_length + 5, 1024).unwrap(), None);
        let past_the_end = buffer.len() + 1;
        assert_eq!(frame_at(&mut buffer, past_the_end, 1024).unwrap(), None);
        assert!(frame_at(&mut BytesMut::from(&[b'Q', 0, 0, 0, 3][..]), 0, 1024).is_err());
        // The complete frames, walked without splitting (the partial one is left out).
        let tags: Vec<u8> = frames(&buffer).map(|frame| frame[0]).collect();
        assert_eq!(tags, b"PS");
        assert_eq!(
            client_message(frames(&buffer).next().unwrap()).unwrap(),
            ClientMessage::Parse {
                statement: "",
                sql: "SELECT 1"
            }
        );
        assert!(client_message(b"Q\0\0").is_err());
        // Empty names (the unnamed portal and statement) and named ones.
        for (body, statement) in [(&b"\0P0_1\0"[..], "P0_1"), (b"\0\0", "")] {
            // No parameter formats, no parameters, no result formats.
            let bind = frame(b'B', &[body, &[0; 6]].concat());
            let expected = ClientMessage::Bind {
                portal: "",
                statement,
            };
            assert_eq!(client_message(&bind).unwrap(), expected);
        }
        assert!(client_message(&frame(b'E', b"")).is_err());
    }

    #[test]
    fn short_or_unterminated_bodies_are_malformed_not_panics() {
        for (tag, body) in [
            (b'Q', &b"no terminator"[..]),
            (b'P', b"name\0"),
            (b'B', b""),
            (b'D', b""),
            (b'C', b"X\0"),
            (b'D', b"S"),
        ] {
            let mut buffer = frame(tag, body);
            let frame = split_frame(&mut buffer, 1024).unwrap().unwrap();
            assert!(client_message(&frame.bytes).is_err(), "{}", tag as char);
        }
        assert!(startup_parameters(b"user\0postgres").is_err());
        assert_eq!(
            startup_parameters(b"user\0postgres\0\0").unwrap(),
            vec![("user".to_owned(), "postgres".to_owned())]
        );
        assert!(startup_length([0x7f, 0xff, 0xff, 0xff]).is_err());
        assert!(startup_length([0, 0, 0, 4]).is_err());
    }
}
