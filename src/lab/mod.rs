//! The embedded lab: a PostgreSQL primary and streaming replicas started from the local
//! server binaries, with the [delay link](DelayLink) between them.
//!
//! [`Lab::start`] is the one way in, and returns a lab with its delay engaged. Start-up
//! order matters for speed: the replicas are built and start streaming while the link's
//! delay is still 0 (a replication handshake across a 1 s link takes about 8 s); the
//! caller's preparation (migrations) runs then too, and the configured delay is switched on
//! only once every replica has replayed it. SSL is off and fsync is off: this is a throwaway
//! cluster on loopback, and its job is to be fast to start.

mod binaries;
mod delay_link;
mod faults;
mod node;
mod sql;
mod template;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use sqlx::{Connection, postgres::PgConnectOptions, postgres::PgConnection, postgres::PgSslMode};
use tokio::process::Command;

use crate::settings::{self, LabSettings};
pub use binaries::PgBinaries;
pub use delay_link::{BufferStats, DelayControl, DelayLink, DelaySettings};
pub use faults::{LabStatus, Promotion, ServerStatus};
pub use node::{NodeState, StopMode};
use node::{PgNode, RunAs, lab_command, reap_in_background, run_to_completion};

/// The database the lab creates for lagprobe (and for the user to play in).
const LAB_DATABASE: &str = "lagprobe";
/// The superuser initdb creates; trusted on loopback only.
const LAB_USER: &str = "postgres";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How often readiness is polled: servers answer on loopback within a millisecond, and a
/// lab that starts in about a second should not lose much of it to sleeping.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Slower for new connections: each failed attempt costs the starting server a fork.
const CONNECT_POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What can go wrong starting or running the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found: {tried}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`; Nix: `nix develop`) \
         or set LAGPROBE_PG_BINDIR (flag --pg-bindir) to the directory that holds them"
    )]
    BinariesNotFound { tried: String },

    #[error("PostgreSQL {version} in {bindir} is too old: the lab needs 13 or newer")]
    TooOld { bindir: PathBuf, version: String },

    #[error("a lab has 1 to {MAX_REPLICAS} replicas, not {0}")]
    InvalidReplicas(u8),

    #[error(
        "running as root, and neither a `postgres` nor a `nobody` account exists to run \
         PostgreSQL as (it refuses to run as root)"
    )]
    NoUnprivilegedUser,

    #[error("{what} failed ({status}):\n{output}")]
    CommandFailed {
        what: String,
        status: String,
        output: String,
    },

    #[error(
        "the {node} server did not accept connections within {timeout:?}: {cause}\nlog tail:\n{log_tail}"
    )]
    NotReady {
        node: &'static str,
        timeout: Duration,
        cause: String,
        log_tail: String,
    },

    #[error("the {node} server exited unexpectedly ({status}); log tail:\n{log_tail}")]
    NodeExited {
        node: &'static str,
        status: String,
        log_tail: String,
    },

    #[error("{node} server: {source}")]
    Sql {
        node: &'static str,
        #[source]
        source: sqlx::Error,
    },

    /// A fault operation named a server the lab does not have; `field` is the request's.
    #[error("no lab server named {name:?} ({field}); the lab's servers are {known}")]
    NoSuchServer {
        field: &'static str,
        name: String,
        known: String,
    },

    /// A fault operation that does not fit the server's state (starting a running one).
    #[error("{0}")]
    WrongState(String),

    /// The caller's `before_delay` step of [`Lab::start`] failed.
    #[error("preparing the lab before engaging its delay: {0}")]
    BeforeDelay(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }

    fn sql(node: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| LabError::Sql { node, source }
    }
}

/// The most replicas a lab starts: the settings table's bound.
const MAX_REPLICAS: u8 = settings::REPLICAS.max as u8;

/// Where the lab keeps its clusters: a temporary directory, or one the user keeps.
#[derive(Debug)]
enum LabDir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl LabDir {
    /// Creates the directory (and finds the user to run as, who must own it). Off the
    /// runtime: it reads the user database and probes /dev/shm.
    async fn create(data_dir: Option<PathBuf>) -> Result<(LabDir, Option<RunAs>), LabError> {
        off_runtime("preparing the lab's directory", move || {
            let run_as = RunAs::for_this_process()?;
            let dir = match data_dir {
                Some(path) => {
                    std::fs::create_dir_all(&path)
                        .map_err(LabError::io(format!("creating {}", path.display())))?;
                    LabDir::Kept(path)
                }
                None => LabDir::Temporary(
                    tempfile::Builder::new()
                        .prefix("lagprobe-lab-")
                        .tempdir_in(temporary_parent())
                        .map_err(LabError::io("creating the lab's temporary directory"))?,
                ),
            };
            if let Some(user) = &run_as {
                user.chown(dir.path())?;
            }
            Ok((dir, run_as))
        })
        .await
    }

    fn path(&self) -> &Path {
        match self {
            LabDir::Temporary(dir) => dir.path(),
            LabDir::Kept(path) => path,
        }
    }

    /// Removes a temporary directory off the runtime (a data directory is hundreds of
    /// files). Only once its servers are gone, or they could write into it meanwhile.
    async fn remove(self) {
        if let LabDir::Temporary(dir) = self {
            let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
        }
    }
}

/// Runs blocking `work` on tokio's blocking pool.
async fn off_runtime<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, LabError> + Send + 'static,
) -> Result<T, LabError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| LabError::Io {
            context: what.to_owned(),
            source: std::io::Error::other(error),
        })?
}

/// A lab server's part in replication now. Names stay with the servers (`primary` is the
/// first primary's name, whatever it became); roles change with failovers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerRole {
    Primary,
    Replica,
    /// The primary before a failover, left down: its WAL has diverged from the new
    /// primary's, so it can only come back as a fresh copy (a failover's `rejoin`).
    FormerPrimary,
}

/// One of the lab's servers: its name, data directory and port stay; its process is
/// replaced when it is started again.
#[derive(Debug, Clone)]
struct Server {
    name: &'static str,
    role: ServerRole,
    port: u16,
    node: Arc<PgNode>,
}

/// A running primary with its replicas, shared by the service (which stops, starts and
/// fails over its servers on request) and the app (which stops it). A server that exits is
/// reported and the lab carries on without it. Call [`Lab::shutdown`] to stop it in order;
/// dropping it stops the servers without waiting (a background thread removes a temporary
/// directory once they are gone).
#[derive(Debug)]
pub struct Lab {
    binaries: PgBinaries,
    run_as: Option<RunAs>,
    root: PathBuf,
    /// Held only to read or swap entries, never across an await.
    servers: std::sync::Mutex<Vec<Server>>,
    /// One fault operation (and the shutdown) at a time.
    operation: tokio::sync::Mutex<()>,
    /// Set by the shutdown: no server is started after it.
    closed: AtomicBool,
    link: DelayLink,
    sync_replica: bool,
    /// The replica that streams from the primary without the link, if any.
    direct_replica: Option<&'static str>,
    dir: std::sync::Mutex<Option<LabDir>>,
    /// How long `start` took until every replica streamed (the caller's `before_delay` and
    /// the catch-up after it not included).
    pub startup: Duration,
}

/// Space a throwaway lab needs in memory-backed storage before it is used.
const MIN_SHM_BYTES: u64 = 1 << 30;

/// Where a temporary lab lives: `/dev/shm` when it is a roomy tmpfs (initdb and
/// pg_basebackup are several times faster there than on a disk: 0.5 s instead of 1.3 s and
/// 0.1 s instead of 0.9 s measured here), else the system's temporary directory. Containers
/// often have a 64 MB /dev/shm, hence the size check. Blocking.
fn temporary_parent() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let roomy = std::ffi::CString::new("/dev/shm").ok().is_some_and(|path| {
        // SAFETY: statvfs writes only into the zeroed struct we pass.
        let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::statvfs(path.as_ptr(), &mut stats) } == 0;
        ok && (stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64) >= MIN_SHM_BYTES
    });
    let writable = tempfile::tempdir_in(shm).is_ok();
    if roomy && writable {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// A loopback port nothing listens on right now.
pub(crate) fn free_port() -> Result<u16, LabError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(LabError::io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(LabError::io("finding a free port"))?
        .port())
}

fn lab_connect_options(port: u16, database: &str) -> PgConnectOptions {
    PgConnectOptions::new_without_pgpass()
        .host("127.0.0.1")
        .port(port)
        .username(LAB_USER)
        .database(database)
        .ssl_mode(PgSslMode::Disable)
        .application_name("lagprobe-lab")
}

async fn connect(node: &PgNode) -> Result<PgConnection, LabError> {
    PgConnection::connect_with(&lab_connect_options(node.port, LAB_DATABASE))
        .await
        .map_err(LabError::sql(node.name))
}

/// A `postgres://` URL for a lab server.
fn lab_url(port: u16) -> String {
    format!("postgres://{LAB_USER}@127.0.0.1:{port}/{LAB_DATABASE}?sslmode=disable")
}

/// Settings both servers run with, on the command line so a kept data directory picks up
/// whatever this version of lagprobe wants.
fn common_server_args() -> Vec<String> {
    [
        "listen_addresses=127.0.0.1",
        // No Unix socket: a lab must not collide with a system server's socket directory.
        "unix_socket_directories=",
        "ssl=off",
        "fsync=off",
        "full_page_writes=off",
        "wal_level=replica",
        "max_wal_senders=10",
        "wal_keep_size=256MB",
        "hot_standby=on",
        // A replica cut off by the link (or the primary restarting) reconnects within
        // 100 ms of the link being back, not the default 5 s.
        "wal_retrieve_retry_interval=100ms",
        "max_connections=200",
        // Dynamic shared memory as files in the data directory, not /dev/shm segments: a
        // server stopped hard (a dropped lab, a killed lagprobe) then leaves nothing behind
        // once the lab's directory is removed.
        "dynamic_shared_memory_type=mmap",
        "shared_buffers=32MB",
    ]
    .iter()
    .flat_map(|setting| ["-c".to_owned(), (*setting).to_owned()])
    .collect()
}

impl Lab {
    /// Builds (or reuses, with `data_dir`) and starts the primary and its replicas, all at
    /// zero delay; once every replica streams (and, with `sync_replica`, is synchronous)
    /// runs `before_delay` (migrations go here, so they need not cross the delay); waits
    /// until every replica has replayed everything written so far; then engages
    /// `options.delay`. On failure every server started is stopped again.
    pub async fn start<F, E>(options: &LabSettings, before_delay: F) -> Result<Lab, LabError>
    where
        F: AsyncFnOnce(&Lab) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let started = Instant::now();
        if !(1..=MAX_REPLICAS).contains(&options.replicas) {
            return Err(LabError::InvalidReplicas(options.replicas));
        }
        let binaries = PgBinaries::find(options.pg_bindir.as_deref()).await?;
        let (dir, run_as) = LabDir::create(options.data_dir.clone()).await?;
        tracing::info!(
            bindir = %binaries.bindir.display(),
            version = %binaries.version,
            dir = %dir.path().display(),
            user = run_as.as_ref().map_or("(current)", |user| user.name.as_str()),
            "starting the lab"
        );
        let programs = Programs {
            binaries: &binaries,
            run_as: run_as.as_ref(),
            root: dir.path(),
        };
        let (primary, link) = match programs.start_primary(options, started).await {
            Ok(running) => running,
            Err(error) => {
                dir.remove().await;
                return Err(error);
            }
        };
        let lab = Lab {
            root: dir.path().to_path_buf(),
            binaries,
            run_as,
            servers: std::sync::Mutex::new(vec![Server {
                name: primary.name,
                role: ServerRole::Primary,
                port: primary.port,
                node: primary,
            }]),
            operation: tokio::sync::Mutex::new(()),
            closed: AtomicBool::new(false),
            link,
            sync_replica: options.sync_replica,
            direct_replica: options
                .direct_replica
                .then(|| replica_node_name(options.replicas - 1)),
            dir: std::sync::Mutex::new(Some(dir)),
            startup: Duration::ZERO,
        };
        let mut lab = lab;
        match lab.finish_start(options, started, before_delay).await {
            Ok(()) => Ok(lab),
            Err(error) => {
                lab.shutdown().await;
                Err(error)
            }
        }
    }

    /// [`Lab::start`] from a running primary on: replicas, readiness, `before_delay`, delay.
    async fn finish_start<F, E>(
        &mut self,
        options: &LabSettings,
        started: Instant,
        before_delay: F,
    ) -> Result<(), LabError>
    where
        F: AsyncFnOnce(&Lab) -> Result<(), E>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        for index in 0..options.replicas {
            self.add_replica(index, options.replica_port).await?;
            tracing::debug!(elapsed = ?started.elapsed(), index, "replica accepting connections");
        }
        for replica in self.replicas() {
            self.wait_until_streaming(&replica.node).await?;
        }
        if options.sync_replica {
            self.wait_until_synchronous().await?;
        }
        self.startup = started.elapsed();
        before_delay(&*self)
            .await
            .map_err(|error| LabError::BeforeDelay(error.into()))?;
        self.wait_until_replayed().await?;
        self.link.control().set_delay(options.delay);
        tracing::info!(
            delay_ms = options.delay.as_millis() as u64,
            "delay link engaged"
        );
        Ok(())
    }

    fn programs(&self) -> Programs<'_> {
        Programs {
            binaries: &self.binaries,
            run_as: self.run_as.as_ref(),
            root: &self.root,
        }
    }

    /// Builds replica `index` from the primary unless it exists, and starts it.
    async fn add_replica(&mut self, index: u8, base_port: u16) -> Result<(), LabError> {
        let name = replica_node_name(index);
        let data_dir = self.root.join(name);
        if !has_cluster(&data_dir).await {
            self.programs()
                .base_backup(self.primary().port, &data_dir)
                .await?;
        }
        let port = match base_port {
            0 => 0,
            base => base
                .checked_add(u16::from(index))
                .ok_or_else(|| LabError::Io {
                    context: format!("--replica-port {base}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        "port out of range",
                    ),
                })?,
        };
        let args = replica_args(self.upstream_of(name), name);
        let node = self
            .programs()
            .start_node(name, &data_dir, port, &args, LAB_DATABASE)
            .await?;
        self.lock_servers().push(Server {
            name,
            role: ServerRole::Replica,
            port: node.port,
            node,
        });
        Ok(())
    }

    /// Where replica `name` streams from: the delay link, or for the direct replica the
    /// primary itself (whichever server is primary now).
    fn upstream_of(&self, name: &str) -> SocketAddr {
        match self.direct_replica {
            Some(direct) if direct == name => {
                SocketAddr::from(([127, 0, 0, 1], self.primary().port))
            }
            _ => self.link.local_addr(),
        }
    }

    fn lock_servers(&self) -> std::sync::MutexGuard<'_, Vec<Server>> {
        self.servers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn servers(&self) -> Vec<Server> {
        self.lock_servers().clone()
    }

    /// The server that is primary now (there is always one: a failover swaps roles).
    fn primary(&self) -> Server {
        self.servers()
            .into_iter()
            .find(|server| server.role == ServerRole::Primary)
            .expect("a lab always has a primary")
    }

    /// The servers that are replicas now, in order.
    fn replicas(&self) -> Vec<Server> {
        self.servers()
            .into_iter()
            .filter(|server| server.role == ServerRole::Replica)
            .collect()
    }

    /// The primary's URL (after a failover, the promoted server's).
    pub fn primary_url(&self) -> String {
        lab_url(self.primary().port)
    }

    /// The first replica's URL.
    pub fn replica_url(&self) -> String {
        lab_url(self.replicas()[0].port)
    }

    /// `(name, url)` of every replica, in order.
    pub fn replica_urls(&self) -> Vec<(String, String)> {
        self.replicas()
            .iter()
            .map(|server| (server.name.to_owned(), lab_url(server.port)))
            .collect()
    }

    /// The live delay setting (shared with every relayed connection).
    pub fn delay_control(&self) -> DelayControl {
        self.link.control().clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.root
    }

    pub fn binaries(&self) -> &PgBinaries {
        &self.binaries
    }

    fn nodes(&self) -> Vec<Arc<PgNode>> {
        self.servers()
            .into_iter()
            .map(|server| server.node)
            .collect()
    }

    /// Waits until every replica has replayed everything the primary has written so far
    /// (the caller's migrations included), so none of it is held up by the delay.
    async fn wait_until_replayed(&self) -> Result<(), LabError> {
        let primary = self.primary().node;
        let mut connection = connect(&primary).await?;
        let target: String = sqlx::query_scalar(sql::CURRENT_WAL_LSN)
            .fetch_one(&mut connection)
            .await
            .map_err(LabError::sql(primary.name))?;
        let watched = self.nodes();
        for replica in self.replicas() {
            let node = &replica.node;
            let mut replica = connect(node).await?;
            let patience = Patience::new(node, &watched, POLL_INTERVAL);
            loop {
                patience.alive().await?;
                let caught_up: Option<bool> = sqlx::query_scalar(sql::REPLAYED_UP_TO)
                    .bind(&target)
                    .fetch_one(&mut replica)
                    .await
                    .map_err(LabError::sql(node.name))?;
                if caught_up == Some(true) {
                    break;
                }
                patience
                    .not_yet(format!("never replayed up to {target}"))
                    .await?;
            }
        }
        Ok(())
    }

    /// Polls until the replica's WAL receiver reports `streaming`.
    async fn wait_until_streaming(&self, node: &Arc<PgNode>) -> Result<(), LabError> {
        let mut replica = connect(node).await?;
        let watched = self.nodes();
        let patience = Patience::new(node, &watched, POLL_INTERVAL);
        loop {
            patience.alive().await?;
            let status: Option<String> = sqlx::query_scalar(sql::WAL_RECEIVER_STATUS)
                .fetch_optional(&mut replica)
                .await
                .map_err(LabError::sql(node.name))?;
            if status.as_deref() == Some("streaming") {
                return Ok(());
            }
            patience
                .not_yet(format!("WAL receiver status {status:?}"))
                .await?;
        }
    }

    /// Polls until the primary lists every replica as a synchronous standby.
    async fn wait_until_synchronous(&self) -> Result<(), LabError> {
        let node = self.primary().node;
        let mut primary = connect(&node).await?;
        let expected = self.replicas().len() as i64;
        let watched = self.nodes();
        let patience = Patience::new(&node, &watched, POLL_INTERVAL);
        loop {
            patience.alive().await?;
            let synchronous: i64 = sqlx::query_scalar(sql::SYNCHRONOUS_STANDBYS)
                .fetch_one(&mut primary)
                .await
                .map_err(LabError::sql(node.name))?;
            if synchronous == expected {
                return Ok(());
            }
            patience
                .not_yet(format!("{synchronous} of {expected} replicas synchronous"))
                .await?;
        }
    }

    /// Stops every server, replicas first, including any started again through the fault
    /// operations, and only then removes a temporary directory. Waits for an operation in
    /// progress to finish; no server is started after it.
    pub async fn shutdown(&self) {
        let _operation = self.operation.lock().await;
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let servers = self.servers();
        let (primaries, replicas): (Vec<_>, Vec<_>) = servers
            .iter()
            .partition(|server| server.role == ServerRole::Primary);
        for server in replicas.into_iter().chain(primaries) {
            server.node.stop(StopMode::Fast).await;
        }
        let dir = self
            .dir
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(dir) = dir {
            dir.remove().await;
        }
    }
}

impl Drop for Lab {
    /// Without [`Lab::shutdown`] (a failing test, a panic): an immediate shutdown of every
    /// server, waited for on a thread of its own rather than a runtime worker, and only
    /// then the directory's removal, so no server writes into a directory being removed.
    fn drop(&mut self) {
        let servers = self
            .servers
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let leftovers: Vec<_> = servers
            .iter()
            .filter_map(|server| server.node.quit_without_waiting())
            .collect();
        let dir = self
            .dir
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if leftovers.is_empty() && !matches!(dir, Some(LabDir::Temporary(_))) {
            return;
        }
        reap_in_background(leftovers, move || drop(dir));
    }
}

/// Whether `data_dir` already holds a cluster (a kept lab directory from an earlier run).
async fn has_cluster(data_dir: &Path) -> bool {
    tokio::fs::try_exists(data_dir.join("PG_VERSION"))
        .await
        .unwrap_or(false)
}

/// How long the lab waits for a condition, and on whom: fails as soon as a server in
/// `watched` exits (its log tells why), or after [`READY_TIMEOUT`] with `blame`'s log tail.
/// Callers loop: [`Patience::alive`], look, then [`Patience::not_yet`] with what they saw.
/// (A loop rather than a closure-taking helper: async closures that borrow make futures
/// that are not `Send`, and the fault operations run on spawned request handlers.)
struct Patience<'a> {
    blame: &'a PgNode,
    watched: &'a [Arc<PgNode>],
    interval: Duration,
    deadline: Instant,
}

impl<'a> Patience<'a> {
    fn new(blame: &'a PgNode, watched: &'a [Arc<PgNode>], interval: Duration) -> Self {
        Patience {
            blame,
            watched,
            interval,
            deadline: Instant::now() + READY_TIMEOUT,
        }
    }

    /// Fails if a watched server has exited.
    async fn alive(&self) -> Result<(), LabError> {
        for node in self.watched {
            if let Some(status) = node.exit_status() {
                return Err(node.exited(status).await);
            }
        }
        Ok(())
    }

    /// Sleeps before the next look, or fails with `cause` (what was seen) past the deadline.
    async fn not_yet(&self, cause: String) -> Result<(), LabError> {
        if Instant::now() > self.deadline {
            return Err(LabError::NotReady {
                node: self.blame.name,
                timeout: READY_TIMEOUT,
                cause,
                log_tail: self.blame.log_tail().await,
            });
        }
        tokio::time::sleep(self.interval).await;
        Ok(())
    }
}

const REPLICA_NAMES: [&str; MAX_REPLICAS as usize] = [
    "replica1", "replica2", "replica3", "replica4", "replica5", "replica6", "replica7", "replica8",
    "replica9",
];

/// Replica `index`'s name in reports and logs, and its data directory's.
fn replica_node_name(index: u8) -> &'static str {
    REPLICA_NAMES[usize::from(index)]
}

/// The name the primary knows a standby by (pg_stat_replication.application_name).
fn standby_name(server: &str) -> String {
    format!("lagprobe_{server}")
}

/// With `sync_replica`, every standby named is synchronous (remote_apply then takes effect)
/// while ordinary commits stay local.
fn primary_args(standbys: &[&str], sync_replica: bool) -> Vec<String> {
    if !sync_replica || standbys.is_empty() {
        return Vec::new();
    }
    let names: Vec<String> = standbys.iter().map(|name| standby_name(name)).collect();
    vec![
        "-c".into(),
        format!(
            "synchronous_standby_names=FIRST {} ({})",
            names.len(),
            names.join(", ")
        ),
        "-c".into(),
        "synchronous_commit=local".into(),
    ]
}

fn replica_args(upstream: SocketAddr, server: &str) -> Vec<String> {
    vec![
        "-c".into(),
        // On the command line, so a kept replica follows the link's new port every run.
        format!(
            "primary_conninfo=host={} port={} user={LAB_USER} application_name={} sslmode=disable",
            upstream.ip(),
            upstream.port(),
            standby_name(server)
        ),
    ]
}

/// The lab's programs, run as its user with its directory as home.
#[derive(Debug, Clone, Copy)]
struct Programs<'a> {
    binaries: &'a PgBinaries,
    run_as: Option<&'a RunAs>,
    root: &'a Path,
}

impl Programs<'_> {
    fn command(&self, program: &str) -> Command {
        lab_command(&self.binaries.program(program), self.run_as, self.root)
    }

    /// Creates the primary's cluster unless it exists, starts it, creates the lab's
    /// database and binds the delay link to it (at zero delay).
    async fn start_primary(
        &self,
        options: &LabSettings,
        started: Instant,
    ) -> Result<(Arc<PgNode>, DelayLink), LabError> {
        let data_dir = self.root.join("primary");
        let standbys: Vec<&str> = (0..options.replicas).map(replica_node_name).collect();
        if !has_cluster(&data_dir).await {
            self.create_clusters(options.cache_dir.as_deref(), &data_dir, &standbys)
                .await?;
            tracing::debug!(elapsed = ?started.elapsed(), "clusters created");
        }
        let args = primary_args(&standbys, options.sync_replica);
        let primary = self
            .start_node(
                "primary",
                &data_dir,
                options.primary_port,
                &args,
                "postgres",
            )
            .await?;
        tracing::debug!(elapsed = ?started.elapsed(), "primary accepting connections");
        let upstream = format!("127.0.0.1:{}", primary.port);
        let link = match create_lab_database(&primary).await {
            Ok(()) => {
                let control = DelayControl::with_buffer(Duration::ZERO, options.link_buffer_bytes);
                DelayLink::bind_with("127.0.0.1:0", upstream, control)
                    .await
                    .map_err(LabError::io("starting the delay link"))
            }
            Err(error) => Err(error),
        };
        match link {
            Ok(link) => Ok((primary, link)),
            Err(error) => {
                primary.stop(StopMode::Fast).await;
                Err(error)
            }
        }
    }

    async fn initdb(&self, data_dir: &Path) -> Result<(), LabError> {
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(data_dir)
            .args(["-U", LAB_USER, "--auth=trust"])
            .args(["--encoding=UTF8", "--locale=C", "--no-sync"])
            // 1 MB WAL segments, not 16: a new cluster is then 30 MB instead of 46, and the
            // lab copies one per server.
            .arg("--wal-segsize=1");
        // Added in PostgreSQL 14; 13 prints its hints to the output nobody reads.
        if self.binaries.major >= 14 {
            initdb.arg("--no-instructions");
        }
        run_to_completion(initdb, "initdb").await
    }

    /// A new lab's clusters: the primary and every replica copied from the cached template
    /// (see [`template`]); without a cache (or if the template cannot be made), initdb for
    /// the primary, and replicas copied from it when there is no pg_basebackup (else
    /// pg_basebackup makes them once the primary runs). A replica copied from a cluster
    /// that has never run as a primary has the primary's system identifier and a clean
    /// shutdown; standby.signal makes it a standby, and primary_conninfo comes on its
    /// command line as always.
    async fn create_clusters(
        &self,
        cache_dir: Option<&Path>,
        primary_dir: &Path,
        standbys: &[&str],
    ) -> Result<(), LabError> {
        let template = match cache_dir {
            Some(cache) => self.template(cache).await.map_err(|error| {
                tracing::warn!(%error, "no cluster template; running initdb instead");
            }),
            None => Err(()),
        };
        let source = match &template {
            Ok(template) => template.as_path(),
            Err(()) if self.binaries.has_base_backup => return self.initdb(primary_dir).await,
            Err(()) => {
                self.initdb(primary_dir).await?;
                primary_dir
            }
        };
        let mut targets: Vec<PathBuf> = standbys.iter().map(|name| self.root.join(name)).collect();
        if template.is_ok() {
            targets.push(primary_dir.to_path_buf());
        }
        self.copy_clusters(source, &targets).await?;
        for name in standbys {
            self.mark_standby(&self.root.join(name)).await?;
        }
        Ok(())
    }

    /// Writes standby.signal, as the lab's user.
    async fn mark_standby(&self, data_dir: &Path) -> Result<(), LabError> {
        let mut signal = lab_command(Path::new("touch"), self.run_as, self.root);
        signal.arg(data_dir.join("standby.signal"));
        run_to_completion(signal, "writing standby.signal").await
    }

    /// Straight from the primary: the copy need not cross the link.
    async fn base_backup(&self, primary_port: u16, data_dir: &Path) -> Result<(), LabError> {
        if !self.binaries.has_base_backup {
            return Err(LabError::WrongState(format!(
                "{} has no pg_basebackup, and a replica can only be copied from a primary that \
                 has never run (a new lab, not a kept --data-dir or a rejoin); install the \
                 server package with pg_basebackup or point --pg-bindir at one",
                self.binaries.bindir.display()
            )));
        }
        let mut basebackup = self.command("pg_basebackup");
        basebackup
            .args(["-h", "127.0.0.1", "-p", &primary_port.to_string()])
            .args(["-U", LAB_USER])
            .arg("-D")
            .arg(data_dir)
            .args(["--write-recovery-conf", "--wal-method=stream"])
            .args(["--checkpoint=fast", "--no-sync"]);
        run_to_completion(basebackup, "pg_basebackup").await
    }

    /// Starts a server and waits until it accepts connections. With an automatic port, a
    /// port taken between choosing and binding it is retried with another. A server that
    /// never gets ready is stopped again.
    async fn start_node(
        &self,
        name: &'static str,
        data_dir: &Path,
        requested_port: u16,
        extra_args: &[String],
        ready_database: &str,
    ) -> Result<Arc<PgNode>, LabError> {
        let log_path = self.root.join(format!("{name}.log"));
        let mut attempts = 0;
        loop {
            attempts += 1;
            let port = match requested_port {
                0 => free_port()?,
                port => port,
            };
            let mut command = self.command("postgres");
            command.args(common_server_args()).args(extra_args);
            let node = Arc::new(PgNode::spawn(command, name, data_dir, port, &log_path).await?);
            match wait_until_accepting(&node, data_dir, ready_database).await {
                Ok(()) => return Ok(node),
                Err(LabError::NodeExited { log_tail, .. })
                    if requested_port == 0
                        && attempts < 3
                        && log_tail.contains("could not bind") =>
                {
                    tracing::info!(name, port, "port was taken; retrying with another");
                }
                Err(error) => {
                    node.stop(StopMode::Fast).await;
                    return Err(error);
                }
            }
        }
    }
}

/// Polls until `node` accepts connections. A connection is only taken as ready once the
/// server that answered reports `data_dir` as its own: with automatic ports, a parallel
/// lab can bind the chosen port first, and then this node's bind fails while the port
/// answers for somebody else's server.
async fn wait_until_accepting(
    node: &Arc<PgNode>,
    data_dir: &Path,
    database: &str,
) -> Result<(), LabError> {
    let options = lab_connect_options(node.port, database);
    let patience = Patience::new(node, std::slice::from_ref(node), CONNECT_POLL_INTERVAL);
    let own_dir = tokio::fs::canonicalize(data_dir)
        .await
        .unwrap_or_else(|_| data_dir.to_path_buf());
    loop {
        patience.alive().await?;
        let mut connection = match PgConnection::connect_with(&options).await {
            Ok(connection) => connection,
            Err(error) => {
                patience.not_yet(error.to_string()).await?;
                continue;
            }
        };
        let answered: Result<String, _> = sqlx::query_scalar(sql::DATA_DIRECTORY)
            .fetch_one(&mut connection)
            .await;
        let _ = connection.close().await;
        let answered = answered.map_err(LabError::sql(node.name))?;
        let answered_dir = tokio::fs::canonicalize(&answered)
            .await
            .unwrap_or_else(|_| PathBuf::from(&answered));
        if answered_dir == own_dir {
            return Ok(());
        }
        patience
            .not_yet(format!(
                "port {} answers for another server (data directory {answered})",
                node.port
            ))
            .await?;
    }
}

async fn create_lab_database(primary: &PgNode) -> Result<(), LabError> {
    let mut connection = PgConnection::connect_with(&lab_connect_options(primary.port, "postgres"))
        .await
        .map_err(LabError::sql(primary.name))?;
    let exists: bool = sqlx::query_scalar(sql::DATABASE_EXISTS)
        .bind(LAB_DATABASE)
        .fetch_one(&mut connection)
        .await
        .map_err(LabError::sql(primary.name))?;
    if !exists {
        sqlx::query(sql::CREATE_LAB_DATABASE)
            .execute(&mut connection)
            .await
            .map_err(LabError::sql(primary.name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_created_database_is_the_one_urls_name() {
        assert!(sql::CREATE_LAB_DATABASE.ends_with(&format!(" {LAB_DATABASE}")));
    }

    #[tokio::test]
    async fn a_bad_replica_count_fails_before_anything_is_built() {
        let kept = tempfile::tempdir().unwrap();
        for replicas in [0, MAX_REPLICAS + 1] {
            let options = LabSettings {
                // Nothing may be created here, and no binaries are looked for.
                data_dir: Some(kept.path().join("lab")),
                pg_bindir: Some(kept.path().join("no-binaries")),
                replicas,
                ..LabSettings::default()
            };
            let error = Lab::start(&options, async |_| Ok::<(), std::convert::Infallible>(()))
                .await
                .unwrap_err();
            assert!(
                matches!(error, LabError::InvalidReplicas(n) if n == replicas),
                "{error}"
            );
            assert!(!kept.path().join("lab").exists());
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_could_not_bind_is_not_taken_for_the_one_holding_its_port() {
        let lab = Lab::start(&LabSettings::with_delay(Duration::ZERO), async |_| {
            Ok::<(), std::convert::Infallible>(())
        })
        .await
        .expect("a lab starts (it needs PostgreSQL's server binaries)");
        lab.stop_server("replica1", StopMode::Fast).await.unwrap();
        // The replica's own cluster, started on the port the primary holds: the primary
        // accepts the connection, but it is not this server.
        let data_dir = lab.root.join("replica1");
        let args = replica_args(lab.upstream_of("replica1"), "replica1");
        let started = lab
            .programs()
            .start_node(
                "replica1",
                &data_dir,
                lab.primary().port,
                &args,
                LAB_DATABASE,
            )
            .await;
        let error = started.expect_err("the server that could not bind was taken as started");
        assert!(
            matches!(&error, LabError::NodeExited { log_tail, .. } if log_tail.contains("could not bind")),
            "{error}"
        );
        lab.shutdown().await;
    }
}
