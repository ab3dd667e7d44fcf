//! The PostgreSQL-protocol proxy: one connection URL for any application, which sends reads
//! to a replica and everything else to the primary, and makes the reads see the session's
//! own writes with the strategy it chooses.
//!
//! Session mode: each client connection gets its own primary connection and, on its first
//! read, its own replica connection. Statements are classified by PostgreSQL's parser
//! ([`classify`]); transaction boundaries come from ReadyForQuery's status byte; extended
//! protocol batches (everything up to Sync) go to one backend, and named prepared
//! statements are prepared on whichever backend executes them ([`statements`]). Waiting for
//! replay uses one shared watcher per replica ([`watcher`]). The proxy has no SQL of its
//! own: positions come from [`Databases`], the pools every other layer uses.

mod audit;
mod backend;
mod classify;
mod scram;
mod session;
mod statements;
mod watcher;
mod wire;

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock, atomic::AtomicUsize},
    time::Duration,
};

use tokio::net::TcpListener;

use crate::{
    db::{Databases, TopologyUrls},
    service::{ProxyCounts, ProxyStats},
    settings::{ProxySettings, Secret, StrategyDefaults},
};
pub use backend::BackendParams;
use watcher::{PrimaryPosition, ReplayWatcher, Watched};

/// Which of a session's two backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Primary,
    Replica,
}

impl Target {
    fn index(self) -> usize {
        match self {
            Target::Primary => 0,
            Target::Replica => 1,
        }
    }
}

/// Why a session ends, and what (if anything) the client is told: every error the proxy
/// itself reports is mapped to its SQLSTATE here, in one place.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The client broke the protocol (malformed or over-long message, garbage).
    #[error("{0}")]
    Protocol(String),
    /// Replication connections, COPY BOTH, GSS encryption.
    #[error("{0}")]
    Unsupported(String),
    /// The primary could not be reached or was lost.
    #[error("primary unavailable: {0}")]
    PrimaryUnavailable(String),
    /// The replica was lost in the middle of a read the client had partly received.
    #[error("replica connection lost: {0}")]
    ReplicaLost(String),
    #[error("{0}")]
    WrongDatabase(String),
    #[error("password authentication failed")]
    AuthFailed,
    /// lagprobe is stopping: every session ends, its backend work cancelled.
    #[error("terminating connection: lagprobe is shutting down")]
    ShuttingDown,
    /// The client went away (EOF, reset, Terminate): nobody to tell.
    #[error("client disconnected")]
    ClientGone,
}

impl ProxyError {
    /// The SQLSTATE the client gets, `None` when there is nobody to tell.
    pub fn sqlstate(&self) -> Option<&'static str> {
        Some(match self {
            ProxyError::Protocol(_) => "08P01",
            ProxyError::Unsupported(_) => "0A000",
            ProxyError::PrimaryUnavailable(_) | ProxyError::ReplicaLost(_) => "08006",
            ProxyError::WrongDatabase(_) => "3D000",
            ProxyError::AuthFailed => "28P01",
            ProxyError::ShuttingDown => "57P01",
            ProxyError::ClientGone => return None,
        })
    }
}

/// A `lagprobe.*` command the proxy refuses; the session carries on.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("invalid value: {0}")]
    InvalidValue(String),
    #[error("parameter \"{0}\" cannot be changed")]
    ReadOnly(String),
    #[error("unrecognized configuration parameter \"{0}\"")]
    Unknown(String),
}

impl CommandError {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            CommandError::InvalidValue(_) => "22023",
            CommandError::ReadOnly(_) => "55P02",
            CommandError::Unknown(_) => "42704",
        }
    }
}

impl From<wire::WireError> for ProxyError {
    fn from(error: wire::WireError) -> Self {
        ProxyError::Protocol(error.to_string())
    }
}

/// Where a session's query runs now, for forwarding a cancel: the server and its key.
pub type CancelTarget = Arc<Mutex<Option<(SocketAddr, (i32, i32))>>>;

/// The proxy's own BackendKeyData, handed to clients, mapped to where each session's query
/// runs.
#[derive(Debug, Default)]
struct CancelRegistry {
    sessions: Mutex<HashMap<i32, (i32, CancelTarget)>>,
}

impl CancelRegistry {
    /// A fresh (pid, secret) for a session.
    fn register(&self, target: CancelTarget) -> (i32, i32) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let pid = fastrand::i32(1..i32::MAX);
            if let std::collections::hash_map::Entry::Vacant(slot) = sessions.entry(pid) {
                let secret = fastrand::i32(..);
                slot.insert((secret, target));
                return (pid, secret);
            }
        }
    }

    fn unregister(&self, pid: i32) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&pid);
    }

    /// The backend to cancel for a client's (pid, secret), if it matches a session.
    fn lookup(&self, pid: i32, secret: i32) -> Option<(SocketAddr, (i32, i32))> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let (expected, target) = sessions.get(&pid)?;
        if *expected != secret {
            return None;
        }
        *target.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What every session shares.
struct Shared {
    settings: ProxySettings,
    /// The password's SCRAM verifier, when clients must give one.
    verifier: Option<scram::Verifier>,
    defaults: StrategyDefaults,
    /// Where new sessions connect, and the topology generation it came from.
    backends: RwLock<(u64, Arc<Backends>)>,
    databases: Databases,
    /// One replay watcher per replica of the topology's current generation.
    watchers: RwLock<Watchers>,
    primary_position: PrimaryPosition,
    cancels: CancelRegistry,
    next_replica: AtomicUsize,
    /// The service's: counters and the per-query audit.
    stats: ProxyStats,
    /// Statements any session has classified.
    classified: classify::SharedCache,
    /// Whether sessions with these startup parameters are serializable by default.
    default_isolations: DefaultIsolations,
}

/// Whether sessions are serializable by default, by their startup parameters (the role
/// and database are the proxy's own, from its URLs): learnt from the first session's
/// replica connection, so that the others need not ask. Bounded like the other caches: a
/// client that varies its startup parameters costs a question per session, no memory.
#[derive(Debug, Default)]
struct DefaultIsolations {
    serializable: Mutex<HashMap<Vec<(String, String)>, bool>>,
}

impl DefaultIsolations {
    const ENTRIES: usize = 1024;

    fn get(&self, startup: &[(String, String)]) -> Option<bool> {
        let known = self.serializable.lock().unwrap_or_else(|p| p.into_inner());
        known.get(startup).copied()
    }

    fn remember(&self, startup: &[(String, String)], serializable: bool) {
        let mut known = self.serializable.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= Self::ENTRIES {
            known.clear();
        }
        known.insert(startup.to_vec(), serializable);
    }
}

/// The replay watchers of one topology generation. A failover re-points the replicas, and
/// then a position seen on the old ones is no evidence about the new: the watchers are
/// replaced, one per replica there is now (so replicas that appear later are watched too).
struct Watchers {
    generation: u64,
    replicas: Vec<Arc<ReplayWatcher>>,
}

impl Watchers {
    fn spawn(
        databases: &Databases,
        generation: u64,
        poll_interval: Duration,
        stats: &ProxyStats,
    ) -> Self {
        let replicas = (0..databases.replicas().len())
            .map(|index| {
                let watched = Watched {
                    databases: databases.clone(),
                    generation,
                    index,
                };
                Arc::new(ReplayWatcher::spawn(watched, poll_interval, stats.clone()))
            })
            .collect();
        Watchers {
            generation,
            replicas,
        }
    }
}

/// A running proxy's handle: its counters.
#[derive(Clone)]
pub struct ProxyHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle").finish_non_exhaustive()
    }
}

impl ProxyHandle {
    pub fn counts(&self) -> ProxyCounts {
        self.shared.stats.counters().snapshot()
    }

    /// A psql connection string for the proxy at `addr` (the primary URL's user and
    /// database; no password in it).
    pub fn psql_url(&self, addr: SocketAddr) -> String {
        let backends = self.shared.backends();
        let primary = &backends.primary;
        format!(
            "postgres://{}@{addr}/{}?sslmode=disable",
            primary.user, primary.database
        )
    }
}

/// The backends a proxy forwards to, as URLs (replicas in the order of
/// `databases.replicas()`, whose pools the watchers use).
#[derive(Debug, Clone)]
pub struct Backends {
    pub primary: BackendParams,
    pub replicas: Vec<BackendParams>,
}

impl Backends {
    /// Parses the URLs; an error names the bad one by role (never its password).
    pub fn from_urls(primary_url: &str, replica_urls: &[String]) -> Result<Self, String> {
        let primary = BackendParams::from_url(primary_url)
            .map_err(|reason| format!("primary URL: {reason}"))?;
        let replicas = replica_urls
            .iter()
            .map(|url| {
                BackendParams::from_url(url).map_err(|reason| format!("replica URL: {reason}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if replicas.is_empty() {
            return Err("at least one replica is needed".into());
        }
        Ok(Backends { primary, replicas })
    }

    /// The backends of the databases' topology now; a failover may have left no replica.
    fn of(urls: &TopologyUrls) -> Result<Self, String> {
        let parse = |url: &Secret| BackendParams::from_url(&url.0);
        Ok(Backends {
            primary: parse(&urls.primary)?,
            replicas: urls.replicas.iter().map(parse).collect::<Result<_, _>>()?,
        })
    }
}

impl Shared {
    /// The watcher of replica `index` of topology `generation`, while that is the current
    /// one: a session opened before a failover has no watcher to vouch for its replica.
    fn watcher(&self, generation: u64, index: usize) -> Option<Arc<ReplayWatcher>> {
        let now = self.generation();
        if now != generation {
            return None;
        }
        {
            let watchers = self.watchers.read().unwrap_or_else(|p| p.into_inner());
            if watchers.generation == now {
                return watchers.replicas.get(index).cloned();
            }
        }
        let mut watchers = self.watchers.write().unwrap_or_else(|p| p.into_inner());
        if watchers.generation != now {
            *watchers = Watchers::spawn(
                &self.databases,
                now,
                self.settings.poll_interval,
                &self.stats,
            );
        }
        watchers.replicas.get(index).cloned()
    }

    /// The topology's generation now: it changes when a failover re-points the servers.
    fn generation(&self) -> u64 {
        self.databases.generation()
    }

    /// Where a new session connects: the databases' topology, re-read after a failover
    /// re-pointed it ([`Databases::repoint`]), so that new sessions follow the new primary
    /// and replicas while sessions already open keep (and lose) theirs.
    fn backends(&self) -> Arc<Backends> {
        self.topology().1
    }

    /// The topology generation new sessions connect to, and its backends.
    fn topology(&self) -> (u64, Arc<Backends>) {
        let urls = self.databases.urls();
        {
            let current = self.backends.read().unwrap_or_else(|p| p.into_inner());
            if current.0 == urls.generation {
                return (current.0, Arc::clone(&current.1));
            }
        }
        let mut current = self.backends.write().unwrap_or_else(|p| p.into_inner());
        if current.0 != urls.generation {
            match Backends::of(&urls) {
                Ok(backends) => {
                    tracing::info!(
                        generation = urls.generation,
                        replicas = backends.replicas.len(),
                        "proxy: new sessions follow the re-pointed primary and replicas"
                    );
                    *current = (urls.generation, Arc::new(backends));
                }
                // Cannot happen with URLs the pools accepted; keep the old ones if it does.
                Err(reason) => tracing::error!(%reason, "proxy: re-pointed URLs unusable"),
            }
        }
        (current.0, Arc::clone(&current.1))
    }
}

/// Builds the proxy's shared state (watchers included) for `listener`'s sessions. The
/// password's PBKDF2 (4096 rounds of HMAC) runs on the blocking pool, off the runtime.
pub async fn handle(
    settings: &ProxySettings,
    defaults: StrategyDefaults,
    backends: Backends,
    databases: Databases,
    stats: ProxyStats,
) -> ProxyHandle {
    let verifier = match settings.password.as_ref() {
        Some(password) => {
            let password = password.0.clone();
            // Never `None` on failure: that would let clients in without the password.
            match tokio::task::spawn_blocking(move || scram::Verifier::new(&password)).await {
                Ok(verifier) => Some(verifier),
                Err(failed) => std::panic::resume_unwind(failed.into_panic()),
            }
        }
        None => None,
    };
    stats.mark_running();
    let generation = databases.urls().generation;
    let watchers = Watchers::spawn(&databases, generation, settings.poll_interval, &stats);
    ProxyHandle {
        shared: Arc::new(Shared {
            settings: settings.clone(),
            verifier,
            defaults,
            backends: RwLock::new((generation, Arc::new(backends))),
            primary_position: PrimaryPosition::spawn(databases.clone()),
            databases,
            watchers: RwLock::new(watchers),
            cancels: CancelRegistry::default(),
            next_replica: AtomicUsize::new(0),
            stats,
            classified: classify::SharedCache::default(),
            default_isolations: DefaultIsolations::default(),
        }),
    }
}

/// How long sessions get to tell their clients and close their backends on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Accepts clients until `shutdown` resolves; each session runs on its own task, and one
/// session's failure (or panic) never touches another's. Then every session ends: its
/// client gets 57P01, a query still running is cancelled and both backends are closed.
pub async fn serve(
    listener: TcpListener,
    proxy: ProxyHandle,
    shutdown: impl std::future::Future<Output = ()>,
) -> crate::error::Result<()> {
    tokio::pin!(shutdown);
    // One stop signal per session, dropped to stop it: a session checks its own on every
    // wake-up, and a oneshot's check is an atomic load where a shared watch channel takes
    // the channel's lock each time.
    let mut stops: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut sessions = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        while sessions.try_join_next().is_some() {}
        stops.retain(|stop| !stop.is_closed());
        match accepted {
            Ok((stream, peer)) => {
                let shared = Arc::clone(&proxy.shared);
                let (stop, stopping) = tokio::sync::oneshot::channel();
                stops.push(stop);
                sessions.spawn(session::run(shared, stream, peer, stopping));
            }
            // Out of file descriptors and the like: wait a moment rather than spin.
            Err(error) => {
                tracing::warn!(%error, "proxy accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(stops);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while sessions.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!(left = sessions.len(), "proxy sessions cut off at shutdown");
        sessions.shutdown().await;
    }
    Ok(())
}
