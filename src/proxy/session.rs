//! One client session: its startup, then one unit at a time (a simple Query, or an
//! extended-protocol batch up to Sync), each routed to one backend and relayed back until
//! ReadyForQuery.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Instant,
};

use bytes::{Buf, Bytes, BytesMut};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::oneshot,
};

use super::{
    Backends, CancelTarget, CommandError, ProxyError, Shared, Target,
    audit::{self, ReadNote, ReplicaRead, TokenAtRead, TokenFetch},
    backend::{self, Backend, BackendError},
    classify::{self, Classified, IsolationChange, ProxyCommand, Route, SessionSet},
    scram,
    statements::{Plan, StatementUse, Statements},
    watcher::ReplayWatcher,
    wire::{self, BoundParameters, ClientMessage, Frame, TxStatus},
};
mod local;

use crate::{
    db::session_sql,
    lsn::Lsn,
    settings::{ProxyStrategy, Strategy},
};

/// Extended-protocol messages buffered before a Sync or Flush at most; a longer batch is
/// routed as it stands and the rest streams to the same backend.
const BATCH_BUFFER_BYTES: usize = 1 << 20;

/// A session's reused buffers keep at most this capacity between units: one large message
/// (a big Bind, a long query text) must not hold its memory for the rest of the session.
const KEPT_BUFFER_BYTES: usize = 64 << 10;

/// Empties a reused buffer, dropping its allocation if one large unit grew it.
fn emptied(buffer: &mut BytesMut) {
    if buffer.capacity() > KEPT_BUFFER_BYTES {
        *buffer = BytesMut::new();
    } else {
        buffer.clear();
    }
}

/// The client's side of the session.
struct Client {
    read: OwnedReadHalf,
    write: OwnedWriteHalf,
    buffer: BytesMut,
    max_message_bytes: usize,
}

impl Client {
    /// Reads more bytes; EOF or a reset means the client is gone.
    async fn fill(&mut self) -> Result<(), ProxyError> {
        match self.read.read_buf(&mut self.buffer).await {
            Ok(0) | Err(_) => Err(ProxyError::ClientGone),
            Ok(_) => Ok(()),
        }
    }

    fn buffered_frame(&mut self) -> Result<Option<Frame>, ProxyError> {
        Ok(wire::split_frame(&mut self.buffer, self.max_message_bytes)?)
    }

    /// The tag and length of the complete frame at `offset` of the buffer, if it is there.
    fn frame_at(&mut self, offset: usize) -> Result<Option<(u8, usize)>, ProxyError> {
        Ok(wire::frame_at(
            &mut self.buffer,
            offset,
            self.max_message_bytes,
        )?)
    }

    async fn next_frame(&mut self) -> Result<Frame, ProxyError> {
        loop {
            if let Some(frame) = self.buffered_frame()? {
                return Ok(frame);
            }
            self.fill().await?;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), ProxyError> {
        self.write
            .write_all(bytes)
            .await
            .map_err(|_| ProxyError::ClientGone)
    }

    /// An untagged first packet (startup, SSLRequest, CancelRequest): its body after the
    /// length. A length out of range (garbage, an HTTP request) is a protocol error.
    async fn startup_packet(&mut self) -> Result<BytesMut, ProxyError> {
        while self.buffer.len() < 4 {
            self.fill().await?;
        }
        let header = [
            self.buffer[0],
            self.buffer[1],
            self.buffer[2],
            self.buffer[3],
        ];
        let length = wire::startup_length(header)?;
        while self.buffer.len() < length {
            self.fill().await?;
        }
        let mut packet = self.buffer.split_to(length);
        Ok(packet.split_off(4))
    }

    /// Tells the client why the session ends, if anyone is there to tell.
    async fn fatal(&mut self, error: &ProxyError) {
        let Some(sqlstate) = error.sqlstate() else {
            return;
        };
        let mut out = BytesMut::new();
        wire::error_response(true, sqlstate, &error.to_string(), &mut out);
        let _ = self.send(&out).await;
        let _ = self.write.shutdown().await;
    }
}

/// The replica connection and the settings version replayed on it.
struct ReplicaConnection {
    backend: Backend,
    sets_version: u64,
}

/// One unit of work for one backend.
#[derive(Default)]
struct Unit {
    /// The unit's messages as the client sent them, back to back: a batch is forwarded
    /// as one slice, not message by message.
    wire: BytesMut,
    /// Statement uses of an extended batch, for preparing statements on the backend.
    uses: Vec<StatementUse>,
    /// Whether the unit may write (the session's token moves after it).
    writes: bool,
    /// Whether the unit is a read the strategy placed.
    read: bool,
    /// The read's fingerprint, for the audit.
    fingerprint: Option<u64>,
    /// A batch ended by Flush (or too long to buffer): more messages follow to the same
    /// backend until a Sync.
    open: bool,
    sets: Vec<SessionSet>,
    deallocates_all: bool,
    deallocates: Vec<String>,
    closes: Vec<String>,
    /// Temporary relations it creates, and whether it drops them all (DISCARD).
    temp_creates: Vec<String>,
    discards_temp: bool,
    /// It reads one of the session's temporary relations, which only the primary has.
    reads_temp: bool,
    /// ReadyForQuery messages the unit will produce (one per Query or Sync).
    syncs: usize,
}

impl Unit {
    /// Empties the unit for the next one, keeping what its buffers allocated: a session
    /// runs a unit per query, and reusing them saves allocations on every one. (Every
    /// field is named, so that a new one cannot be forgotten here.)
    fn clear(&mut self) {
        let Unit {
            wire,
            uses,
            writes,
            read,
            fingerprint,
            open,
            sets,
            deallocates_all,
            deallocates,
            closes,
            temp_creates,
            discards_temp,
            reads_temp,
            syncs,
        } = self;
        emptied(wire);
        uses.clear();
        sets.clear();
        deallocates.clear();
        closes.clear();
        temp_creates.clear();
        (*writes, *read, *open, *deallocates_all) = (false, false, false, false);
        (*discards_temp, *reads_temp) = (false, false);
        *fingerprint = None;
        *syncs = 0;
    }

    /// Takes in what one of its statements does (`temporary`: the session's temporary
    /// relations).
    #[inline]
    fn absorb(&mut self, classified: &Classified, temporary: &[String]) {
        self.fingerprint = self.fingerprint.or(classified.fingerprint);
        self.writes |= classified.writes;
        self.deallocates_all |= classified.deallocates_all;
        self.discards_temp |= classified.discards_temp;
        // Most statements name no setting, statement or temporary relation: every query
        // comes through here, so the lists are looked at only when there is something.
        let lists = [
            classified.session_sets.is_empty(),
            classified.deallocates.is_empty(),
            classified.temp_creates.is_empty(),
        ];
        if lists != [true; 3] {
            self.sets.extend(classified.session_sets.iter().cloned());
            self.deallocates
                .extend(classified.deallocates.iter().cloned());
            self.temp_creates
                .extend(classified.temp_creates.iter().cloned());
        }
        self.reads_temp |= classified.reads_any_of(temporary);
    }

    /// Moves the first `bytes` of the client's buffer (whole frames) into the unit.
    fn take_from(&mut self, client: &mut Client, bytes: usize) {
        self.wire.extend_from_slice(&client.buffer[..bytes]);
        client.buffer.advance(bytes);
    }
}

/// How a relay ended.
#[derive(Debug, Default)]
struct Relayed {
    status: Option<TxStatus>,
    errored: bool,
    /// The last CommandComplete was a ROLLBACK.
    rolled_back: bool,
}

/// Why a relay stopped early.
enum RelayError {
    /// The backend failed; `replied` says whether the client already got part of an answer.
    Backend {
        error: BackendError,
        replied: bool,
    },
    Session(ProxyError),
}

impl From<ProxyError> for RelayError {
    fn from(error: ProxyError) -> Self {
        RelayError::Session(error)
    }
}

struct Session {
    shared: Arc<Shared>,
    backends: Arc<Backends>,
    client: Client,
    startup: Vec<(String, String)>,
    primary: Backend,
    replica: Option<ReplicaConnection>,
    replica_index: usize,
    /// The topology generation the session connected to (its replica's watcher is of it).
    generation: u64,
    replica_retry_at: Option<Instant>,
    status: TxStatus,
    /// Inside a transaction block: the backend running it.
    in_transaction: Option<Target>,
    statements: Statements,
    /// Settings to replay on the replica: the compacted list and its version.
    sets: Vec<SessionSet>,
    sets_version: u64,
    /// SETs inside a transaction block, kept until it commits.
    pending_sets: Vec<SessionSet>,
    cancel: CancelTarget,
    key: (i32, i32),
    busy: Option<Target>,
    strategy: ProxyStrategy,
    remote_apply_on_primary: bool,
    min_lsn: Option<Lsn>,
    last_commit_lsn: Option<Lsn>,
    last_write: Option<Instant>,
    token: Option<TokenFetch>,
    cache: classify::Cache,
    /// What routing the current read learnt, for the audit.
    read_note: ReadNote,
    /// The last unit, emptied, for the next one to reuse.
    spare: Unit,
    /// Where a unit of several messages is put together before it is sent (kept, for its
    /// allocation).
    outgoing: BytesMut,
    /// The watcher of this session's replica, and the topology generation it was looked
    /// up for.
    watcher: (u64, Option<Arc<ReplayWatcher>>),
    /// The backend the cancel registry points at now.
    cancel_points_at: Option<Target>,
    /// Temporary relations the session created on the primary: reads that name one go
    /// there.
    temp_relations: Vec<String>,
    /// Whether the session's own settings made its transactions serializable by default
    /// (`None`: they left the default alone), and whether they are by default (the role's,
    /// the database's or the startup options'; `None` until a replica connection tells).
    serializable_set: Option<bool>,
    serializable_by_default: Option<bool>,
}

/// Runs one client connection to its end; never panics the proxy and never outlives it
/// with work on the backends.
pub(super) async fn run(
    shared: Arc<Shared>,
    stream: TcpStream,
    peer: SocketAddr,
    mut stopping: oneshot::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let mut client = Client {
        read,
        write,
        buffer: BytesMut::with_capacity(8192),
        max_message_bytes: shared.settings.max_message_bytes,
    };
    let starting =
        tokio::time::timeout(shared.settings.startup_timeout, start(&shared, &mut client));
    let started = tokio::select! {
        started = starting => started
            .unwrap_or_else(|_| Err(ProxyError::Protocol("no startup packet in time".into()))),
        _ = &mut stopping => Err(ProxyError::ShuttingDown),
    };
    let mut session = match started {
        Ok(Some(parts)) => Session::new(Arc::clone(&shared), client, parts),
        Ok(None) => return,
        Err(error) => {
            log_end(peer, &error);
            client.fatal(&error).await;
            return;
        }
    };
    shared
        .stats
        .counters()
        .sessions
        .fetch_add(1, Ordering::Relaxed);
    let result = until_stopped(session.serve(), &mut stopping).await;
    let error = result.err().unwrap_or(ProxyError::ClientGone);
    log_end(peer, &error);
    session.finish(&error).await;
}

/// Runs `serving` until it ends or the proxy stops. The stop signal is polled (its waker
/// registered) on the first poll only: every later poll runs in the same task, whose waker
/// the signal already holds, so each of the session's wake-ups costs one atomic load here
/// instead of a poll through the runtime's cooperative budget.
async fn until_stopped(
    serving: impl Future<Output = Result<(), ProxyError>>,
    stopping: &mut oneshot::Receiver<()>,
) -> Result<(), ProxyError> {
    let mut serving = std::pin::pin!(serving);
    let mut registered = false;
    std::future::poll_fn(|cx| {
        let stopped = if registered {
            !matches!(
                stopping.try_recv(),
                Err(oneshot::error::TryRecvError::Empty)
            )
        } else {
            registered = true;
            std::pin::Pin::new(&mut *stopping).poll(cx).is_ready()
        };
        if stopped {
            return std::task::Poll::Ready(Err(ProxyError::ShuttingDown));
        }
        serving.as_mut().poll(cx)
    })
    .await
}

fn log_end(peer: SocketAddr, error: &ProxyError) {
    match error {
        ProxyError::ClientGone => tracing::debug!(%peer, "proxy session ended"),
        ProxyError::ShuttingDown => tracing::info!(%peer, "proxy session ended at shutdown"),
        ProxyError::PrimaryUnavailable(_) | ProxyError::ReplicaLost(_) => {
            tracing::warn!(%peer, %error, "proxy session ended")
        }
        _ => tracing::info!(%peer, %error, "proxy session refused"),
    }
}

/// What a successful startup hands the session.
struct Started {
    /// The topology the session connected to, for its replica connection later.
    backends: Arc<Backends>,
    generation: u64,
    startup: Vec<(String, String)>,
    primary: Backend,
    cancel: CancelTarget,
    key: (i32, i32),
}

/// SSL and GSS negotiation (both declined), cancel requests, the startup packet, client
/// authentication and the primary connection. `None`: the connection had no session
/// (a cancel request).
async fn start(shared: &Shared, client: &mut Client) -> Result<Option<Started>, ProxyError> {
    let body = loop {
        let body = client.startup_packet().await?;
        match wire::leading_i32(&body) {
            Some(wire::SSL_REQUEST_CODE | wire::GSSENC_REQUEST_CODE) => client.send(b"N").await?,
            Some(wire::CANCEL_REQUEST_CODE) => {
                forward_cancel(shared, &body).await;
                return Ok(None);
            }
            Some(version) if version >> 16 == 3 => break body,
            _ => return Err(ProxyError::Protocol("unsupported frontend protocol".into())),
        }
    };
    let version = wire::leading_i32(&body).unwrap_or(wire::PROTOCOL_3);
    let parameters = wire::startup_parameters(&body[4..])?;
    let (generation, backends) = shared.topology();
    let startup = check_startup(&backends, &parameters)?;
    authenticate(shared, client).await?;
    let primary = Backend::connect(
        &backends.primary,
        &startup,
        shared.settings.connect_timeout,
        shared.settings.max_message_bytes,
    )
    .await
    .map_err(|error| ProxyError::PrimaryUnavailable(error.to_string()))?;
    let cancel: CancelTarget = Arc::new(Mutex::new(None));
    let key = shared.cancels.register(Arc::clone(&cancel));
    let mut out = BytesMut::new();
    let unsupported: Vec<String> = parameters
        .iter()
        .filter(|(name, _)| name.starts_with("_pq_."))
        .map(|(name, _)| name.clone())
        .collect();
    if version != wire::PROTOCOL_3 || !unsupported.is_empty() {
        wire::put(&NegotiateProtocolVersion::new(0, unsupported), &mut out);
    }
    wire::put(&Authentication::Ok, &mut out);
    for (name, value) in &primary.parameters {
        wire::put(&ParameterStatus::new(name.clone(), value.clone()), &mut out);
    }
    wire::put(&BackendKeyData::new(key.0, SecretKey::I32(key.1)), &mut out);
    wire::ready_for_query(TxStatus::Idle, &mut out);
    if let Err(error) = client.send(&out).await {
        shared.cancels.unregister(key.0);
        return Err(error);
    }
    Ok(Some(Started {
        backends,
        generation,
        startup,
        primary,
        cancel,
        key,
    }))
}

/// The startup parameters to pass on to the backends. Replication connections are refused;
/// the client's user is replaced by the URL's, and a database other than the URL's is an
/// error rather than a silent switch.
fn check_startup(
    backends: &Backends,
    parameters: &[(String, String)],
) -> Result<Vec<(String, String)>, ProxyError> {
    let mut forwarded = Vec::new();
    for (name, value) in parameters {
        match name.as_str() {
            "replication" if !matches!(value.as_str(), "false" | "off" | "no" | "0") => {
                return Err(ProxyError::Unsupported(
                    "replication connections are not supported by the proxy".into(),
                ));
            }
            "database" if value != &backends.primary.database => {
                return Err(ProxyError::WrongDatabase(format!(
                    "database \"{value}\" is not served here: the proxy serves \"{}\"",
                    backends.primary.database
                )));
            }
            "user" | "database" | "replication" => {}
            _ if name.starts_with("_pq_.") => {}
            _ => forwarded.push((name.clone(), value.clone())),
        }
    }
    Ok(forwarded)
}

/// Trust without a password (only allowed on loopback); with one, SCRAM-SHA-256: the
/// client proves it knows the password without sending it.
async fn authenticate(shared: &Shared, client: &mut Client) -> Result<(), ProxyError> {
    let Some(verifier) = &shared.verifier else {
        return Ok(());
    };
    let mut out = BytesMut::new();
    wire::put(
        &Authentication::SASL(vec![scram::MECHANISM.to_owned()]),
        &mut out,
    );
    client.send(&out).await?;
    let frame = password_message(client).await?;
    let mut reader = wire::Reader::new(frame.body(), "SASLInitialResponse");
    if reader.cstr()? != scram::MECHANISM {
        return Err(ProxyError::Protocol(format!(
            "only {} is offered",
            scram::MECHANISM
        )));
    }
    let exchange = verifier
        .start(reader.sized_bytes()?)
        .map_err(scram_failed)?;
    out.clear();
    let server_first = Bytes::copy_from_slice(exchange.server_first());
    wire::put(&Authentication::SASLContinue(server_first), &mut out);
    client.send(&out).await?;
    let frame = password_message(client).await?;
    let server_final = exchange.finish(frame.body()).map_err(scram_failed)?;
    out.clear();
    wire::put(&Authentication::SASLFinal(server_final.into()), &mut out);
    client.send(&out).await
}

/// The client's next message, which must be a password message ('p').
async fn password_message(client: &mut Client) -> Result<Frame, ProxyError> {
    let frame = client.next_frame().await?;
    if frame.tag != b'p' {
        return Err(ProxyError::Protocol("expected a SASL response".into()));
    }
    Ok(frame)
}

fn scram_failed(error: scram::ScramError) -> ProxyError {
    match error {
        scram::ScramError::WrongPassword => ProxyError::AuthFailed,
        scram::ScramError::Malformed(_) => ProxyError::Protocol(error.to_string()),
    }
}

/// A CancelRequest on a new connection: forwarded to the backend running that session's
/// query, if the key matches one of ours. The client gets no answer either way.
async fn forward_cancel(shared: &Shared, body: &[u8]) {
    let mut reader = wire::Reader::new(body, "CancelRequest");
    let (Ok(_code), Ok(pid), Ok(secret)) = (reader.i32(), reader.i32(), reader.i32()) else {
        return;
    };
    let Some((addr, key)) = shared.cancels.lookup(pid, secret) else {
        tracing::debug!(pid, "cancel request for no running query");
        return;
    };
    if let Err(error) = backend::cancel(addr, key, shared.settings.connect_timeout).await {
        tracing::warn!(%addr, %error, "forwarding a cancel request");
    }
}

impl Session {
    fn new(shared: Arc<Shared>, client: Client, started: Started) -> Self {
        let replicas = started.backends.replicas.len().max(1);
        let replica_index = shared.next_replica.fetch_add(1, Ordering::Relaxed) % replicas;
        let strategy = shared.settings.strategy;
        Session {
            shared,
            backends: started.backends,
            generation: started.generation,
            client,
            startup: started.startup,
            primary: started.primary,
            replica: None,
            replica_index,
            replica_retry_at: None,
            status: TxStatus::Idle,
            in_transaction: None,
            statements: Statements::default(),
            sets: Vec::new(),
            sets_version: 0,
            pending_sets: Vec::new(),
            cancel: started.cancel,
            key: started.key,
            busy: None,
            strategy,
            remote_apply_on_primary: false,
            min_lsn: None,
            last_commit_lsn: None,
            last_write: None,
            token: None,
            cache: classify::Cache::default(),
            read_note: ReadNote::default(),
            spare: Unit::default(),
            outgoing: BytesMut::new(),
            watcher: (u64::MAX, None),
            cancel_points_at: None,
            temp_relations: Vec::new(),
            serializable_set: None,
            serializable_by_default: None,
        }
    }

    /// An empty unit, reusing the last one's allocations.
    fn unit(&mut self) -> Unit {
        std::mem::take(&mut self.spare)
    }

    /// The replica's watcher: looked up again only after the topology changed.
    fn watcher(&mut self) -> Option<Arc<ReplayWatcher>> {
        let generation = self.shared.generation();
        if self.watcher.0 != generation {
            let watcher = self.shared.watcher(self.generation, self.replica_index);
            self.watcher = (generation, watcher);
        }
        self.watcher.1.clone()
    }

    /// Ends the session: a query still running for a client that left is cancelled, then
    /// both backend connections close (dropped with the session).
    async fn finish(mut self, error: &ProxyError) {
        self.shared.cancels.unregister(self.key.0);
        if let Some(target) = self.busy {
            let backend = match target {
                Target::Primary => Some(&self.primary),
                Target::Replica => self.replica.as_ref().map(|replica| &replica.backend),
            };
            // Awaited, not spawned: at shutdown the process may exit right after.
            if let Some(backend) = backend {
                let timeout = self.shared.settings.connect_timeout;
                if let Err(error) = backend::cancel(backend.addr, backend.key, timeout).await {
                    tracing::warn!(addr = %backend.addr, %error, "cancelling a left query");
                }
            }
        }
        self.client.fatal(error).await;
        let mut terminate = BytesMut::new();
        postgres_protocol::message::frontend::terminate(&mut terminate);
        let _ = self.primary.send(&terminate).await;
        if let Some(replica) = self.replica.as_mut() {
            let _ = replica.backend.send(&terminate).await;
        }
    }

    async fn serve(&mut self) -> Result<(), ProxyError> {
        self.sync_remote_apply().await?;
        loop {
            let (tag, length) = self.client_frame_at(0).await?;
            match tag {
                b'Q' => self.simple_query(length).await?,
                b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S' => self.extended().await?,
                // A fastpath function call may do anything.
                b'F' => {
                    let mut unit = self.unit();
                    unit.take_from(&mut self.client, length);
                    (unit.writes, unit.syncs) = (true, 1);
                    self.run_unit(Target::Primary, unit).await?;
                }
                b'X' => return Err(ProxyError::ClientGone),
                // PostgreSQL ignores copy messages outside COPY (after a failed COPY).
                b'd' | b'c' | b'f' => self.client.buffer.advance(length),
                other => {
                    return Err(ProxyError::Protocol(format!(
                        "unexpected message type {:?}",
                        char::from(other)
                    )));
                }
            }
        }
    }

    /// Waits until the client's buffer holds a complete frame at `offset` (the frames
    /// before it stay there, read in place): its tag and length. Meanwhile, the primary's
    /// asynchronous messages (LISTEN notifications, parameter changes, a shutdown's FATAL)
    /// reach the client, and a replica connection that drops is forgotten.
    async fn client_frame_at(&mut self, offset: usize) -> Result<(u8, usize), ProxyError> {
        enum Event {
            Client,
            Primary(Result<(), BackendError>),
            Replica(Result<(), BackendError>),
        }
        loop {
            if let Some(found) = self.client.frame_at(offset)? {
                return Ok(found);
            }
            let replica = async {
                match self.replica.as_mut() {
                    Some(replica) => replica.backend.receive().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                biased;
                filled = self.client.fill() => { filled?; Event::Client }
                received = self.primary.receive() => Event::Primary(received),
                received = replica => Event::Replica(received),
            };
            match event {
                Event::Client => {}
                Event::Primary(received) => {
                    received.map_err(|error| ProxyError::PrimaryUnavailable(error.to_string()))?;
                    let mut out = BytesMut::new();
                    while let Some(frame) = self.primary.buffered_frame().map_err(primary_lost)? {
                        out.extend_from_slice(&frame.bytes);
                    }
                    self.client.send(&out).await?;
                }
                Event::Replica(received) => {
                    // An idle replica only has notices to say: drop them all.
                    let frames = match self.replica.as_mut() {
                        Some(replica) if received.is_ok() => loop {
                            match replica.backend.buffered_frame() {
                                Ok(Some(_)) => continue,
                                Ok(None) => break Ok(()),
                                Err(error) => break Err(error),
                            }
                        },
                        _ => Ok(()),
                    };
                    if let Err(error) = received.and(frames) {
                        tracing::info!(%error, "replica connection closed; reads go to the primary");
                        self.replica = None;
                    }
                }
            }
        }
    }

    /// The Query message of `length` bytes at the front of the client's buffer.
    async fn simple_query(&mut self, length: usize) -> Result<(), ProxyError> {
        let frame = &self.client.buffer[..length];
        let ClientMessage::Query { sql } = wire::client_message(frame)? else {
            return Err(ProxyError::Protocol("malformed Query message".into()));
        };
        let classified = classify_sql(&mut self.cache, &self.shared, sql);
        if let Some(command) = &classified.command {
            self.client.buffer.advance(length);
            return self.proxy_command(command).await;
        }
        let mut unit = self.unit();
        unit.take_from(&mut self.client, length);
        unit.absorb(&classified, &self.temp_relations);
        unit.read = classified.route == Route::Read;
        unit.syncs = 1;
        let target = self.route(&unit).await;
        self.run_unit(target, unit).await
    }

    /// Reads an extended-protocol batch (at the front of the client's buffer) up to its
    /// Sync (or Flush), noting the statements it prepares and uses, then runs it on one
    /// backend. The messages are read in place and taken off the buffer as one slice.
    async fn extended(&mut self) -> Result<(), ProxyError> {
        let mut unit = self.unit();
        // The batch's bytes so far, at the front of the client's buffer.
        let mut end = 0;
        let mut executes = false;
        let mut may_write = false;
        let mut mix = local::Mix::default();
        loop {
            // Waiting (a future and its poll) only when the frame has not all arrived.
            let (tag, length) = match self.client.frame_at(end)? {
                Some(found) => found,
                None => self.client_frame_at(end).await?,
            };
            if !matches!(tag, b'P' | b'B' | b'D' | b'E' | b'C' | b'H' | b'S') {
                return Err(ProxyError::Protocol(format!(
                    "message type {:?} inside an extended-protocol batch",
                    char::from(tag)
                )));
            }
            let frame = &self.client.buffer[end..end + length];
            end += length;
            match wire::client_message(frame)? {
                ClientMessage::Parse { statement, sql } => {
                    let classified = classify_sql(&mut self.cache, &self.shared, sql);
                    mix.note(classified.command.is_some());
                    let (name, version) = self.statements.define(statement, frame, classified);
                    unit.uses.push(StatementUse::Parse { name, version });
                }
                ClientMessage::Bind { statement, .. } => {
                    executes = true;
                    let name = match self.statements.get(statement) {
                        Some((name, defined)) => {
                            let classified = &defined.classified;
                            mix.note(classified.command.is_some());
                            may_write |= classified.route == Route::Primary;
                            unit.absorb(classified, &self.temp_relations);
                            if !classified.bound_set_configs.is_empty() {
                                let bound = BoundParameters::of(frame)?;
                                unit.sets.extend(
                                    classified
                                        .bound_set_configs
                                        .iter()
                                        .filter_map(|call| call.session_set(Some(&bound))),
                                );
                            }
                            Arc::clone(name)
                        }
                        None => {
                            mix.note(false);
                            may_write = true;
                            unit.writes = true;
                            Arc::from(statement)
                        }
                    };
                    unit.uses.push(StatementUse::Use { name });
                }
                ClientMessage::Describe { kind: b'S', name } => unit.uses.push(StatementUse::Use {
                    name: self.statements.name(name),
                }),
                ClientMessage::Close { kind: b'S', name } => {
                    unit.uses.push(StatementUse::Close {
                        name: self.statements.name(name),
                    });
                    unit.closes.push(name.to_owned());
                }
                _ => {}
            }
            match tag {
                b'S' => break,
                b'H' => {
                    unit.open = true;
                    break;
                }
                _ if end > BATCH_BUFFER_BYTES => {
                    unit.open = true;
                    break;
                }
                _ => {}
            }
        }
        unit.take_from(&mut self.client, end);
        if mix.commands {
            let answered = self.answer_locally(&unit.wire, mix.others).await;
            self.recycle(unit);
            return answered;
        }
        unit.syncs = usize::from(!unit.open);
        // Preparing alone needs no freshness: the primary (statements follow to the replica
        // when they are executed there).
        unit.read = executes && !may_write;
        let target = self.route(&unit).await;
        self.run_unit(target, unit).await
    }

    /// Where a unit runs: the transaction's backend inside one, the primary for anything
    /// that is not a read, and where the strategy says for reads.
    async fn route(&mut self, unit: &Unit) -> Target {
        if let Some(target) = self.in_transaction {
            return target;
        }
        if !unit.read || unit.reads_temp || self.serializable() {
            return Target::Primary;
        }
        self.route_read().await
    }

    /// The strategy's decision for a read outside a transaction. Only the position-based
    /// strategies read the clock or look up the watcher.
    async fn route_read(&mut self) -> Target {
        self.read_note = ReadNote::default();
        match self.strategy {
            ProxyStrategy::Probe(Strategy::Primary) => Target::Primary,
            ProxyStrategy::Probe(Strategy::Replica | Strategy::RemoteApply) => Target::Replica,
            ProxyStrategy::Probe(Strategy::PinWindow) => {
                let pin_window = self.shared.defaults.pin_window;
                let pinned = self
                    .last_write
                    .is_some_and(|wrote| wrote.elapsed() < pin_window);
                if pinned {
                    Target::Primary
                } else {
                    Target::Replica
                }
            }
            ProxyStrategy::Probe(Strategy::LsnRoute) => self.route_by_replay().await,
            ProxyStrategy::Probe(Strategy::LsnWait) => {
                let started = Instant::now();
                let Some(token) = self.token().await else {
                    return Target::Replica;
                };
                self.wait_or_fall_back(token, started).await
            }
            ProxyStrategy::Global => self.wait_for_primary_position(Instant::now()).await,
        }
    }

    /// lsn-route: the replica if its watcher has seen the token replayed (after one fresh
    /// look at most, never a wait), else the primary.
    async fn route_by_replay(&mut self) -> Target {
        let Some(token) = self.token().await else {
            return Target::Replica;
        };
        // A replica added by a failover has no watcher: nothing can vouch for it.
        let Some(watcher) = self.watcher() else {
            return Target::Primary;
        };
        if watcher.latest().is_some_and(|replayed| replayed >= token) {
            return Target::Replica;
        }
        let shared = &self.shared;
        let look_timeout = shared
            .defaults
            .lsn_wait_timeout
            .min(shared.settings.connect_timeout);
        let fresh = watcher.fresh(look_timeout).await;
        if fresh.is_some_and(|replayed| replayed >= token) {
            Target::Replica
        } else {
            Target::Primary
        }
    }

    /// global: waits until the replica has replayed the primary's position as of the
    /// read's start (and the session's own token).
    async fn wait_for_primary_position(&mut self, started: Instant) -> Target {
        let shared = Arc::clone(&self.shared);
        if self.watcher().is_none() {
            return Target::Primary;
        }
        let wait_timeout = shared.defaults.lsn_wait_timeout;
        let Some(position) = shared.primary_position.after(started, wait_timeout).await else {
            self.fell_back();
            return Target::Primary;
        };
        let token = self
            .token()
            .await
            .map_or(position, |token| token.max(position));
        self.wait_or_fall_back(token, started).await
    }

    /// Waits (from `started`, up to lsn-wait's timeout) until the replica's watcher has
    /// seen `token` replayed; the primary if it does not in time, or nothing watches it.
    async fn wait_or_fall_back(&mut self, token: Lsn, started: Instant) -> Target {
        let Some(watcher) = self.watcher() else {
            return Target::Primary;
        };
        let counters = self.shared.stats.counters();
        if watcher.latest().is_some_and(|replayed| replayed >= token) {
            return Target::Replica;
        }
        counters.waits.fetch_add(1, Ordering::Relaxed);
        let remaining = self
            .shared
            .defaults
            .lsn_wait_timeout
            .saturating_sub(started.elapsed());
        let waiting = Instant::now();
        let replayed = watcher.wait_for(token, remaining).await;
        self.read_note.waited = Some(waiting.elapsed());
        if replayed {
            Target::Replica
        } else {
            counters.fallbacks.fetch_add(1, Ordering::Relaxed);
            self.read_note.fallback = true;
            Target::Primary
        }
    }

    /// The session's consistency token: its last write's position (once fetched), or the
    /// position `SET lagprobe.min_lsn` gave, whichever is later.
    async fn token(&mut self) -> Option<Lsn> {
        if let Some(mut fetch) = self.token.take()
            && let Some(lsn) = audit::fetched(&mut fetch).await
        {
            self.last_commit_lsn = self.last_commit_lsn.max(Some(lsn));
        }
        self.last_commit_lsn.max(self.min_lsn)
    }

    /// Runs a unit on `wanted`, on the primary when the replica cannot be had (a fallback);
    /// a replica that fails before answering a read outside a transaction gets the read
    /// sent to the primary instead.
    async fn run_unit(&mut self, wanted: Target, unit: Unit) -> Result<(), ProxyError> {
        let ran = self.run_unit_on(wanted, &unit).await;
        self.recycle(unit);
        ran
    }

    fn recycle(&mut self, mut unit: Unit) {
        unit.clear();
        self.spare = unit;
    }

    async fn run_unit_on(&mut self, wanted: Target, unit: &Unit) -> Result<(), ProxyError> {
        let mut target = wanted;
        if target == Target::Replica && !self.replica_ready().await {
            if self.in_transaction == Some(Target::Replica) {
                return Err(ProxyError::ReplicaLost(
                    "the replica running this transaction is gone".into(),
                ));
            }
            self.fell_back();
            target = Target::Primary;
        }
        // A session's first replica connection may only now have told that its
        // transactions are serializable by default.
        if target == Target::Replica && self.in_transaction.is_none() && self.serializable() {
            target = Target::Primary;
        }
        if target == Target::Primary && self.in_transaction.is_none() {
            self.sync_remote_apply().await?;
        }
        let audited = unit.read && self.in_transaction.is_none();
        loop {
            let plan = self.statements.plan(&unit.uses, target);
            let judged = audited && target == Target::Replica && self.has_token();
            let before = judged.then(|| {
                let watcher = self.watcher();
                let seen_before = watcher.as_ref().and_then(|watcher| watcher.seen());
                (watcher, Instant::now(), seen_before)
            });
            match self.forward(target, unit, &plan).await {
                Ok(relayed) => {
                    if audited {
                        let read = before.map(|(watcher, sent, seen_before)| ReplicaRead {
                            watcher,
                            sent,
                            answered: Instant::now(),
                            seen_before,
                        });
                        self.audit(unit.fingerprint, target == Target::Replica, read);
                    }
                    self.after(target, unit, relayed);
                    return Ok(());
                }
                Err(RelayError::Session(error)) => return Err(error),
                Err(RelayError::Backend { error, replied }) => {
                    if target == Target::Primary {
                        return Err(ProxyError::PrimaryUnavailable(error.to_string()));
                    }
                    self.replica_failed(&error);
                    if replied || self.in_transaction.is_some() {
                        return Err(ProxyError::ReplicaLost(error.to_string()));
                    }
                    self.fell_back();
                    target = Target::Primary;
                }
            }
        }
    }

    /// Whether the session's transactions are serializable by default, which a standby
    /// cannot run: its reads go to the primary.
    fn serializable(&self) -> bool {
        self.serializable_set
            .or(self.serializable_by_default)
            .unwrap_or(false)
    }

    /// A read the strategy sent to a replica goes to the primary instead.
    fn fell_back(&mut self) {
        let counters = self.shared.stats.counters();
        counters.fallbacks.fetch_add(1, Ordering::Relaxed);
        self.read_note.fallback = true;
    }

    /// Whether the session has a token (known, or being fetched) a read could be judged by.
    fn has_token(&self) -> bool {
        self.token.is_some() || self.last_commit_lsn.max(self.min_lsn).is_some()
    }

    /// Hands a finished read to the audit with the session's token as it stands.
    fn audit(&mut self, fingerprint: Option<u64>, on_replica: bool, read: Option<ReplicaRead>) {
        let note = ReadNote {
            fingerprint,
            ..self.read_note
        };
        let token = TokenAtRead {
            known: self.last_commit_lsn.max(self.min_lsn),
            pending: self.token.clone(),
        };
        audit::record(&self.shared, note, on_replica, read, token);
    }

    fn replica_failed(&mut self, error: &BackendError) {
        tracing::warn!(%error, "replica unavailable; reads go to the primary");
        self.replica = None;
        self.replica_retry_at = Some(Instant::now() + self.shared.settings.replica_retry);
    }

    /// Sends a unit (with the statements it needs prepared first) and relays the answer.
    async fn forward(
        &mut self,
        target: Target,
        unit: &Unit,
        plan: &Plan,
    ) -> Result<Relayed, RelayError> {
        let mut joined = std::mem::take(&mut self.outgoing);
        emptied(&mut joined);
        let out: &[u8] = if plan.prefix.is_empty() {
            &unit.wire
        } else {
            joined.extend_from_slice(&plan.prefix);
            joined.extend_from_slice(&unit.wire);
            &joined
        };
        let sent = self.send_unit(target, out).await;
        self.outgoing = joined;
        sent?;
        let backend = match target {
            Target::Primary => &mut self.primary,
            Target::Replica => match self.replica.as_mut() {
                Some(replica) => &mut replica.backend,
                None => unreachable_replica()?,
            },
        };
        let relayed = relay(
            &mut self.client,
            backend,
            plan.injected,
            unit.syncs,
            unit.open,
        )
        .await?;
        self.busy = None;
        Ok(relayed)
    }

    /// Sends a unit's bytes to `target`, pointing the session's cancel key at it first.
    async fn send_unit(&mut self, target: Target, out: &[u8]) -> Result<(), RelayError> {
        let backend = match target {
            Target::Primary => &mut self.primary,
            Target::Replica => match self.replica.as_mut() {
                Some(replica) => &mut replica.backend,
                None => unreachable_replica()?,
            },
        };
        // The registry changes only when the session moves to the other backend (or a
        // new replica connection), not on every query.
        if self.cancel_points_at != Some(target) {
            *self.cancel.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((backend.addr, backend.key));
            self.cancel_points_at = Some(target);
        }
        self.busy = Some(target);
        backend
            .send(out)
            .await
            .map_err(|error| RelayError::Backend {
                error,
                replied: false,
            })
    }

    /// What a finished unit changes: the transaction state, prepared statements, settings
    /// to replay, and the session's token after a write.
    fn after(&mut self, target: Target, unit: &Unit, relayed: Relayed) {
        let counters = self.shared.stats.counters();
        if unit.read && self.in_transaction.is_none() {
            let counter = match target {
                Target::Primary => &counters.primary_reads,
                Target::Replica => &counters.replica_reads,
            };
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if relayed.errored {
            self.statements.uncertain(target, &unit.uses);
        } else if target == Target::Primary {
            if unit.deallocates_all {
                self.statements.deallocated_all();
            }
            for name in &unit.deallocates {
                self.statements.deallocated(name);
            }
            // Kept until DISCARD even when dropped or rolled back: a read of a name that
            // is no longer temporary only costs a trip to the primary.
            if unit.discards_temp {
                self.temp_relations.clear();
            }
            self.temp_relations
                .extend(unit.temp_creates.iter().cloned());
        }
        for name in &unit.closes {
            self.statements.closed(name);
        }
        if !relayed.errored && target == Target::Primary {
            self.pending_sets.extend(unit.sets.iter().cloned());
        }
        let status = relayed.status.unwrap_or(self.status);
        self.status = status;
        let rolled_back = relayed.rolled_back;
        let mut wrote = target == Target::Primary && unit.writes && !relayed.errored;
        match status {
            TxStatus::Idle => {
                let ended = self.in_transaction.take();
                wrote |= ended == Some(Target::Primary) && !rolled_back;
                let pending = std::mem::take(&mut self.pending_sets);
                if !rolled_back {
                    self.replay_later(pending);
                }
            }
            TxStatus::InTransaction | TxStatus::Failed => {
                self.in_transaction = Some(target);
                wrote = false;
            }
        }
        if wrote {
            self.wrote();
        }
    }

    /// Adds settings to the replay list, compacted: a later SET of a variable replaces an
    /// earlier one, RESET ALL and DISCARD ALL replace everything.
    fn replay_later(&mut self, sets: Vec<SessionSet>) {
        for set in sets {
            match &set.variable {
                None => self.sets.clear(),
                Some(name) => self
                    .sets
                    .retain(|earlier| earlier.variable.as_ref() != Some(name)),
            }
            self.serializable_set = match set.isolation {
                IsolationChange::Unchanged => self.serializable_set,
                IsolationChange::Serializable => Some(true),
                IsolationChange::NotSerializable => Some(false),
                IsolationChange::Reset => None,
            };
            self.sets.push(set);
            self.sets_version += 1;
        }
    }

    /// A write committed: the token is the primary's insert position read after the
    /// COMMIT's acknowledgement, fetched in the background so the client's next query is
    /// not held up unless it needs the token.
    fn wrote(&mut self) {
        self.shared
            .stats
            .counters()
            .writes
            .fetch_add(1, Ordering::Relaxed);
        self.last_write = Some(Instant::now());
        self.token = Some(audit::fetch_token(self.shared.databases.clone()));
    }

    /// The replica connection, connected (on first use or after a failure, once the retry
    /// pause has passed) and with the session's settings replayed.
    async fn replica_ready(&mut self) -> bool {
        if self.replica.is_none() {
            if self
                .replica_retry_at
                .is_some_and(|retry| Instant::now() < retry)
            {
                return false;
            }
            let Some(params) = self.backends.replicas.get(self.replica_index) else {
                return false;
            };
            let settings = &self.shared.settings;
            match Backend::connect(
                params,
                &self.startup,
                settings.connect_timeout,
                settings.max_message_bytes,
            )
            .await
            {
                Ok(mut backend) => {
                    if let Err(error) = self.learn_default_isolation(&mut backend).await {
                        self.replica_failed(&error);
                        return false;
                    }
                    self.statements.reconnected(Target::Replica);
                    self.replica = Some(ReplicaConnection {
                        backend,
                        sets_version: 0,
                    });
                    // The cancel key must follow to the new connection.
                    self.cancel_points_at = None;
                }
                Err(error) => {
                    self.replica_failed(&error);
                    return false;
                }
            }
        }
        let Some(replica) = self.replica.as_mut() else {
            return false;
        };
        if replica.sets_version == self.sets_version {
            return true;
        }
        let mut statements: Vec<&str> = Vec::new();
        if replica.sets_version != 0 {
            statements.push(session_sql::RESET_ALL);
        }
        statements.extend(self.sets.iter().map(|set| set.text.as_str()));
        match run_internal(&mut replica.backend, &statements).await {
            Ok(()) => {
                replica.sets_version = self.sets_version;
                true
            }
            Err(error) => {
                self.replica_failed(&error);
                false
            }
        }
    }

    /// Learns, once per set of startup parameters in the whole proxy, whether the session's
    /// transactions are serializable by default: the role's and the database's settings
    /// and the startup options decide it, and no statement of the session shows them.
    async fn learn_default_isolation(&mut self, replica: &mut Backend) -> Result<(), BackendError> {
        if self.serializable_by_default.is_some() {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        let serializable = match shared.default_isolations.get(&self.startup) {
            Some(known) => known,
            None => {
                let level = replica
                    .query_text(session_sql::SHOW_DEFAULT_ISOLATION)
                    .await?;
                let serializable = level.is_some_and(|level| level == "serializable");
                shared
                    .default_isolations
                    .remember(&self.startup, serializable);
                serializable
            }
        };
        self.serializable_by_default = Some(serializable);
        Ok(())
    }

    /// remote-apply: the primary connection's COMMITs wait for the standby while the
    /// session uses it; the setting is undone when the session leaves the strategy.
    async fn sync_remote_apply(&mut self) -> Result<(), ProxyError> {
        let wanted = self.strategy == ProxyStrategy::Probe(Strategy::RemoteApply);
        if wanted == self.remote_apply_on_primary {
            return Ok(());
        }
        let statement = if wanted {
            session_sql::REMOTE_APPLY
        } else {
            session_sql::RESET_SYNCHRONOUS_COMMIT
        };
        run_internal(&mut self.primary, &[statement])
            .await
            .map_err(primary_lost)?;
        self.remote_apply_on_primary = wanted;
        Ok(())
    }

    fn set_variable(&mut self, name: &str, value: Option<&str>) -> Result<(), CommandError> {
        match (name, value) {
            ("strategy", None) => self.strategy = self.shared.settings.strategy,
            ("strategy", Some(text)) => {
                self.strategy = text.parse().map_err(|error: crate::settings::Invalid| {
                    CommandError::InvalidValue(error.reason)
                })?;
            }
            ("min_lsn", None) => self.min_lsn = None,
            ("min_lsn", Some(text)) => {
                let lsn = text
                    .parse::<Lsn>()
                    .map_err(|error| CommandError::InvalidValue(error.to_string()))?;
                self.min_lsn = Some(lsn);
            }
            ("last_commit_lsn", _) => {
                return Err(CommandError::ReadOnly("lagprobe.last_commit_lsn".into()));
            }
            _ => return Err(CommandError::Unknown(format!("lagprobe.{name}"))),
        }
        Ok(())
    }

    async fn show_variable(&mut self, name: &str) -> Result<String, CommandError> {
        let text = |lsn: Option<Lsn>| lsn.map(|lsn| lsn.to_string()).unwrap_or_default();
        Ok(match name {
            "strategy" => self.strategy.name().to_owned(),
            "min_lsn" => text(self.min_lsn),
            "last_commit_lsn" => {
                self.token().await;
                text(self.last_commit_lsn)
            }
            _ => return Err(CommandError::Unknown(format!("lagprobe.{name}"))),
        })
    }

    /// `SET/RESET/SHOW lagprobe.*` in a simple Query, answered by the proxy itself.
    async fn proxy_command(&mut self, command: &ProxyCommand) -> Result<(), ProxyError> {
        let mut out = BytesMut::new();
        let mut answer = BytesMut::new();
        match self.execute_command(command, &mut answer).await {
            Ok(()) => {
                local::describe(command, false, &mut out);
                out.extend_from_slice(&answer);
            }
            Err(error) => {
                wire::error_response(false, error.sqlstate(), &error.to_string(), &mut out)
            }
        }
        self.after_commands().await?;
        wire::ready_for_query(self.status, &mut out);
        self.client.send(&out).await
    }

    /// A strategy change to or from remote-apply applies to the primary connection now,
    /// unless a transaction is open there.
    async fn after_commands(&mut self) -> Result<(), ProxyError> {
        if self.in_transaction.is_none() {
            self.sync_remote_apply().await?;
        }
        Ok(())
    }
}

/// Classifies a statement through the session's cache (and the proxy's), admitting a
/// fingerprint parsed for the first time to the audit. A function of the fields it uses,
/// not of the session, so that the statement's text can stay borrowed from the client's
/// buffer meanwhile.
fn classify_sql(cache: &mut classify::Cache, shared: &Shared, sql: &str) -> Arc<Classified> {
    cache.classify(sql, &shared.classified, |fingerprint| {
        shared
            .stats
            .admit(fingerprint, || classify::normalized(sql));
    })
}

fn unreachable_replica<T>() -> Result<T, RelayError> {
    Err(RelayError::Session(ProxyError::ReplicaLost(
        "no replica connection".into(),
    )))
}

fn primary_lost(error: BackendError) -> ProxyError {
    ProxyError::PrimaryUnavailable(error.to_string())
}

/// Statements the proxy runs on a backend for the session's sake (settings replayed on the
/// replica, remote-apply on the primary), each its own Query so one failure does not undo
/// the rest; their answers never reach the client.
async fn run_internal(backend: &mut Backend, statements: &[&str]) -> Result<(), BackendError> {
    if statements.is_empty() {
        return Ok(());
    }
    let mut out = BytesMut::new();
    for statement in statements {
        wire::put(
            &pgwire::messages::simplequery::Query::new((*statement).to_owned()),
            &mut out,
        );
    }
    backend.send(&out).await?;
    let mut remaining = statements.len();
    while remaining > 0 {
        let frame = backend.next_frame().await?;
        match frame.tag {
            b'Z' => remaining -= 1,
            b'E' => tracing::debug!(addr = %backend.addr, "a replayed session statement failed"),
            _ => {}
        }
    }
    Ok(())
}

/// Relays a backend's answer to the client until the unit's last ReadyForQuery, swallowing
/// the answers to statements the proxy prepared, and streaming the client's COPY data (or
/// the rest of a Flush-ended batch) to the same backend meanwhile. Frames are relayed from
/// the backend's buffer in place: each read from the backend is one write to the client.
async fn relay(
    client: &mut Client,
    backend: &mut Backend,
    mut swallow: usize,
    mut syncs: usize,
    mut open: bool,
) -> Result<Relayed, RelayError> {
    let mut relayed = Relayed::default();
    let mut replied = false;
    let mut copy_in = false;
    let backend_failed = |error, replied| RelayError::Backend { error, replied };
    loop {
        // The first `ready` bytes of the backend's buffer are frames to relay as they are.
        let mut ready = 0;
        while let Some((tag, length)) = backend
            .frame_at(ready)
            .map_err(|error| backend_failed(error, replied))?
        {
            let body = &backend.received()[ready + 5..ready + length];
            match tag {
                b'1' | b'3' if swallow > 0 => {
                    if ready > 0 {
                        client.send(&backend.received()[..ready]).await?;
                        backend.consume(ready);
                        (ready, replied) = (0, true);
                    }
                    backend.consume(length);
                    swallow -= 1;
                    continue;
                }
                b'E' => {
                    swallow = 0;
                    relayed.errored = true;
                }
                b'G' => copy_in = true,
                b'W' => {
                    return Err(RelayError::Session(ProxyError::Unsupported(
                        "COPY BOTH (replication) is not supported by the proxy".into(),
                    )));
                }
                b'C' => relayed.rolled_back = body == b"ROLLBACK\0",
                b'Z' => {
                    relayed.status = body.first().copied().and_then(TxStatus::from_byte);
                    syncs = syncs.saturating_sub(1);
                }
                _ => {}
            }
            ready += length;
            if tag == b'Z' && syncs == 0 && !open {
                client.send(&backend.received()[..ready]).await?;
                backend.consume(ready);
                return Ok(relayed);
            }
        }
        if ready > 0 {
            client.send(&backend.received()[..ready]).await?;
            backend.consume(ready);
            replied = true;
        }
        let from_client = copy_in || open;
        // Otherwise the client is still watched, so that one that leaves mid-query ends
        // the session (which cancels the query); what it pipelines meanwhile stays
        // buffered, up to one message's limit.
        let watch_client = from_client || client.buffer.len() < client.max_message_bytes;
        let client_sent = tokio::select! {
            biased;
            received = backend.receive() => {
                received.map_err(|error| backend_failed(error, replied))?;
                false
            }
            filled = client.fill(), if watch_client => {
                filled?;
                from_client
            }
        };
        if client_sent {
            stream_client(
                client,
                backend,
                &mut copy_in,
                &mut open,
                &mut syncs,
                replied,
            )
            .await?;
        }
    }
}

/// Forwards the client's buffered messages during a COPY FROM STDIN or an open batch, up
/// to the message that ends it.
async fn stream_client(
    client: &mut Client,
    backend: &mut Backend,
    copy_in: &mut bool,
    open: &mut bool,
    syncs: &mut usize,
    replied: bool,
) -> Result<(), RelayError> {
    // The frames to forward, at the front of the client's buffer.
    let mut end = 0;
    while *copy_in || *open {
        let Some((tag, length)) = client.frame_at(end)? else {
            break;
        };
        if tag == b'X' {
            return Err(RelayError::Session(ProxyError::ClientGone));
        }
        match tag {
            b'c' | b'f' => *copy_in = false,
            b'S' if *open => {
                *open = false;
                *syncs += 1;
            }
            _ => {}
        }
        end += length;
    }
    let sent = backend.send(&client.buffer[..end]).await;
    client.buffer.advance(end);
    sent.map_err(|error| RelayError::Backend { error, replied })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_unit_keeps_a_small_buffer_for_the_next_and_drops_a_large_one() {
        let mut unit = Unit::default();
        unit.wire.extend_from_slice(&[b'Q'; 512]);
        let small = unit.wire.capacity();
        unit.clear();
        assert!(unit.wire.is_empty());
        assert_eq!(unit.wire.capacity(), small, "kept for the next unit");
        unit.wire
            .extend_from_slice(&vec![b'B'; 4 * KEPT_BUFFER_BYTES]);
        (unit.writes, unit.syncs, unit.open) = (true, 3, true);
        unit.clear();
        assert!(unit.wire.capacity() <= KEPT_BUFFER_BYTES);
        assert_eq!((unit.writes, unit.syncs, unit.open), (false, 0, false));
    }
}
