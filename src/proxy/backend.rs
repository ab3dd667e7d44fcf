//! One connection from the proxy to a PostgreSQL server, speaking as an ordinary client:
//! the startup packet, authentication with the configured URL's credentials (trust,
//! password, md5 or SCRAM-SHA-256, through postgres-protocol's client side), then raw
//! frames both ways.

use std::{fmt, net::SocketAddr, time::Duration};

use bytes::{Buf, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::{
    authentication::{
        md5_hash,
        sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256},
    },
    message::{backend::Message, frontend},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

use super::wire::{self, Frame, WireError};

/// Where and as whom to connect, from a `postgres://` URL. The password never reaches
/// logs: `Debug` leaves it out.
#[derive(Clone, PartialEq, Eq)]
pub struct BackendParams {
    pub host: String,
    pub port: u16,
    pub user: String,
    password: Option<String>,
    pub database: String,
}

impl fmt::Debug for BackendParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

impl BackendParams {
    /// Parses a `postgres://user:password@host:port/database?...` URL; `host`, `port`,
    /// `user`, `password` and `dbname` query parameters override the URL's parts, as in
    /// libpq. TLS to the backend is not supported, so `sslmode=require` and stricter are
    /// refused rather than silently ignored.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let parsed = url::Url::parse(url).map_err(|error| error.to_string())?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(format!("scheme {:?} is not postgres://", parsed.scheme()));
        }
        let decode = |text: &str| {
            percent_decode(text).ok_or_else(|| "the URL is not valid UTF-8".to_owned())
        };
        let mut params = BackendParams {
            host: parsed.host_str().unwrap_or("localhost").to_owned(),
            port: parsed.port().unwrap_or(5432),
            user: decode(parsed.username())?,
            password: parsed.password().map(decode).transpose()?,
            database: decode(parsed.path().trim_start_matches('/'))?,
        };
        for (name, value) in parsed.query_pairs() {
            match name.as_ref() {
                "host" => params.host = value.into_owned(),
                "port" => params.port = value.parse().map_err(|_| "invalid port".to_owned())?,
                "user" => params.user = value.into_owned(),
                "password" => params.password = Some(value.into_owned()),
                "dbname" => params.database = value.into_owned(),
                "sslmode" if !matches!(value.as_ref(), "disable" | "allow" | "prefer") => {
                    return Err(format!(
                        "sslmode={value}: the proxy connects to its backends without TLS"
                    ));
                }
                _ => {}
            }
        }
        if params.host.starts_with('/') {
            return Err("Unix-socket hosts are not supported; use a TCP address".into());
        }
        if params.user.is_empty() {
            params.user = "postgres".into();
        }
        if params.database.is_empty() {
            params.database = params.user.clone();
        }
        Ok(params)
    }
}

fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' && tail.len() >= 2 {
            let hex = std::str::from_utf8(&tail[..2]).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

/// Why a backend connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} refused the connection: {message}")]
    Refused { addr: String, message: String },
    #[error("{addr}: {message}")]
    Protocol { addr: String, message: String },
    #[error("connection to {addr} lost: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// A connected, authenticated backend.
pub struct Backend {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buffer: BytesMut,
    max_message_bytes: usize,
    pub addr: SocketAddr,
    /// The server's BackendKeyData (pid, secret), for forwarding cancels.
    pub key: (i32, i32),
    /// The ParameterStatus values the server reported at startup.
    pub parameters: Vec<(String, String)>,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Backend {
    /// Connects, sends the startup packet with `startup` parameters (the client's own,
    /// such as application_name), authenticates, and waits for ReadyForQuery.
    pub async fn connect(
        params: &BackendParams,
        startup: &[(String, String)],
        timeout: Duration,
        max_message_bytes: usize,
    ) -> Result<Backend, BackendError> {
        let addr = format!("{}:{}", params.host, params.port);
        let handshake = async {
            let stream =
                TcpStream::connect(&addr)
                    .await
                    .map_err(|source| BackendError::Connect {
                        addr: addr.clone(),
                        source,
                    })?;
            let _ = stream.set_nodelay(true);
            let peer = stream.peer_addr().map_err(|source| BackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
            let (read, write) = stream.into_split();
            let mut backend = Backend {
                read,
                write,
                buffer: BytesMut::with_capacity(8192),
                max_message_bytes,
                addr: peer,
                key: (0, 0),
                parameters: Vec::new(),
            };
            backend.startup(params, startup).await?;
            Ok(backend)
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .unwrap_or(Err(BackendError::Timeout { addr, timeout }))
    }

    fn protocol_error(&self, message: impl Into<String>) -> BackendError {
        BackendError::Protocol {
            addr: self.addr.to_string(),
            message: message.into(),
        }
    }

    fn io_error(&self, source: std::io::Error) -> BackendError {
        BackendError::Io {
            addr: self.addr.to_string(),
            source,
        }
    }

    async fn startup(
        &mut self,
        params: &BackendParams,
        startup: &[(String, String)],
    ) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        let mut pairs = vec![
            ("user", params.user.as_str()),
            ("database", params.database.as_str()),
        ];
        pairs.extend(
            startup
                .iter()
                .map(|(name, value)| (name.as_str(), value.as_str())),
        );
        frontend::startup_message(pairs, &mut out).map_err(|error| self.io_error(error))?;
        self.send(&out).await?;
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    let password = self.password(params)?;
                    self.send_with(|out| frontend::password_message(password.as_bytes(), out))
                        .await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let password = self.password(params)?;
                    let hash = md5_hash(params.user.as_bytes(), password.as_bytes(), body.salt());
                    self.send_with(|out| frontend::password_message(hash.as_bytes(), out))
                        .await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut offered = false;
                    while let Some(mechanism) = mechanisms.next().map_err(|e| self.io_error(e))? {
                        offered |= mechanism == SCRAM_SHA_256;
                    }
                    if !offered {
                        return Err(self.protocol_error("the server offers no SCRAM-SHA-256"));
                    }
                    let password = self.password(params)?;
                    let client =
                        ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    let first = client.message().to_vec();
                    scram = Some(client);
                    self.send_with(|out| {
                        frontend::sasl_initial_response(SCRAM_SHA_256, &first, out)
                    })
                    .await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol_error("unexpected SASL"))?;
                    client
                        .update(body.data())
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                    let reply = client.message().to_vec();
                    self.send_with(|out| frontend::sasl_response(&reply, out))
                        .await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol_error("unexpected SASL"))?;
                    client
                        .finish(body.data())
                        .map_err(|e| self.protocol_error(e.to_string()))?;
                }
                Message::ParameterStatus(body) => {
                    let name = body.name().map_err(|e| self.io_error(e))?.to_owned();
                    let value = body.value().map_err(|e| self.io_error(e))?.to_owned();
                    self.parameters.push((name, value));
                }
                Message::BackendKeyData(body) => self.key = (body.process_id(), body.secret_key()),
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => {
                    return Err(BackendError::Refused {
                        addr: self.addr.to_string(),
                        message: error_text(body.fields()),
                    });
                }
                Message::NoticeResponse(_) => {}
                _ => return Err(self.protocol_error("unsupported authentication request")),
            }
        }
    }

    fn password<'p>(&self, params: &'p BackendParams) -> Result<&'p str, BackendError> {
        params.password.as_deref().ok_or_else(|| {
            self.protocol_error("the server asks for a password the URL does not give")
        })
    }

    async fn send_with(
        &mut self,
        encode: impl FnOnce(&mut BytesMut) -> std::io::Result<()>,
    ) -> Result<(), BackendError> {
        let mut out = BytesMut::new();
        encode(&mut out).map_err(|error| self.io_error(error))?;
        self.send(&out).await
    }

    /// Runs one statement of the proxy's own (simple protocol) and returns the first
    /// column of its first row as text; `None` for no row, NULL, or an error (which the
    /// server reports and the connection survives).
    pub async fn query_text(&mut self, statement: &str) -> Result<Option<String>, BackendError> {
        self.send_with(|out| {
            frontend::query(statement, out)?;
            Ok(())
        })
        .await?;
        let mut text = None;
        loop {
            match self.next_message().await? {
                Message::DataRow(row) if text.is_none() => {
                    let first = row.ranges().next().map_err(|e| self.io_error(e))?;
                    let value = first.flatten().and_then(|range| row.buffer().get(range));
                    text = value.map(|bytes| String::from_utf8_lossy(bytes).into_owned());
                }
                Message::ReadyForQuery(_) => return Ok(text),
                _ => {}
            }
        }
    }

    /// One startup-phase message, parsed by postgres-protocol.
    async fn next_message(&mut self) -> Result<Message, BackendError> {
        loop {
            if let Some(message) = Message::parse(&mut self.buffer).map_err(|e| self.io_error(e))? {
                return Ok(message);
            }
            self.fill().await?;
        }
    }

    async fn fill(&mut self) -> Result<(), BackendError> {
        match self.read.read_buf(&mut self.buffer).await {
            Ok(0) => Err(self.io_error(std::io::ErrorKind::UnexpectedEof.into())),
            Ok(_) => Ok(()),
            Err(error) => Err(self.io_error(error)),
        }
    }

    /// Writes bytes to the server.
    pub async fn send(&mut self, bytes: &[u8]) -> Result<(), BackendError> {
        let written = self.write.write_all(bytes).await;
        written.map_err(|error| self.io_error(error))
    }

    /// The next complete frame already received, without waiting.
    pub fn buffered_frame(&mut self) -> Result<Option<Frame>, BackendError> {
        wire::split_frame(&mut self.buffer, self.max_message_bytes)
            .map_err(|error: WireError| self.protocol_error(error.to_string()))
    }

    /// What the server sent that is not yet consumed, for relaying frames in place.
    pub fn received(&self) -> &[u8] {
        &self.buffer
    }

    /// The tag and whole length of the frame at `offset` of [`Backend::received`], once it
    /// has all arrived (room is made for one still arriving).
    pub fn frame_at(&mut self, offset: usize) -> Result<Option<(u8, usize)>, BackendError> {
        wire::frame_at(&mut self.buffer, offset, self.max_message_bytes)
            .map_err(|error: WireError| self.protocol_error(error.to_string()))
    }

    /// Drops the first `bytes` of [`Backend::received`] (relayed or swallowed).
    pub fn consume(&mut self, bytes: usize) {
        self.buffer.advance(bytes);
    }

    /// Reads more bytes from the server; cancel-safe (for `select!`). EOF is an error: a
    /// server closes only when it is going away.
    pub async fn receive(&mut self) -> Result<(), BackendError> {
        self.fill().await
    }

    /// The next frame, waiting for it.
    pub async fn next_frame(&mut self) -> Result<Frame, BackendError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            self.receive().await?;
        }
    }
}

/// "ERROR: message (SQLSTATE code)" from an ErrorResponse's fields.
fn error_text(mut fields: postgres_protocol::message::backend::ErrorFields<'_>) -> String {
    let (mut message, mut code) = (String::new(), String::new());
    while let Ok(Some(field)) = fields.next() {
        match field.type_() {
            b'M' => message = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            b'C' => code = String::from_utf8_lossy(field.value_bytes()).into_owned(),
            _ => {}
        }
    }
    format!("{message} (SQLSTATE {code})")
}

/// Sends a CancelRequest for the backend `key` at `addr` on a fresh connection, as libpq
/// does; the server closes it without an answer.
pub async fn cancel(addr: SocketAddr, key: (i32, i32), timeout: Duration) -> std::io::Result<()> {
    let send = async {
        let mut stream = TcpStream::connect(addr).await?;
        let mut out = BytesMut::new();
        frontend::cancel_request(key.0, key.1, &mut out);
        stream.write_all(&out).await?;
        let mut sink = [0u8; 1];
        let _ = stream.read(&mut sink).await;
        Ok(())
    };
    tokio::time::timeout(timeout, send)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_credentials_and_hide_the_password() {
        let params =
            BackendParams::from_url("postgres://app:s%40cret@db:6543/shop?sslmode=disable")
                .unwrap();
        assert_eq!((params.host.as_str(), params.port), ("db", 6543));
        assert_eq!(params.user, "app");
        assert_eq!(params.password.as_deref(), Some("s@cret"));
        assert_eq!(params.database, "shop");
        assert!(!format!("{params:?}").contains("cret"));
        let defaults = BackendParams::from_url("postgres://h").unwrap();
        assert_eq!(
            (defaults.user.as_str(), defaults.database.as_str()),
            ("postgres", "postgres")
        );
        assert!(BackendParams::from_url("postgres://h/db?sslmode=require").is_err());
        assert!(BackendParams::from_url("mysql://h/db").is_err());
    }
}
