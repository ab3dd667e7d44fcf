//! The embedded lab: a PostgreSQL primary and a streaming replica started from the local
//! server binaries, with the [delay link](delay_link) between them.
//!
//! Start-up order matters for speed: the replica is built and starts streaming while the
//! link's delay is still 0 (a replication handshake across a 1 s link takes about 8 s), and
//! the configured delay is switched on only once the replica has caught up
//! ([`Lab::apply_configured_delay`]). SSL is off and fsync is off: this is a throwaway
//! cluster on loopback, and its job is to be fast to start.

pub mod binaries;
pub mod delay_link;
pub mod node;

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use sqlx::{Connection, postgres::PgConnectOptions, postgres::PgConnection, postgres::PgSslMode};

pub use binaries::PgBinaries;
pub use delay_link::{DelayControl, DelayLink, DelaySettings};
use node::{PgNode, RunAs, lab_command, run_to_completion};

/// The database the lab creates for lagprobe (and for the user to play in).
pub const LAB_DATABASE: &str = "lagprobe";
/// The superuser initdb creates; trusted on loopback only.
const LAB_USER: &str = "postgres";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What can go wrong starting or running the lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres, pg_basebackup) not found: {tried}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql`; Nix: `nix develop`) \
         or set LAGPROBE_PG_BINDIR (flag --pg-bindir) to the directory that holds them"
    )]
    BinariesNotFound { tried: String },

    #[error("PostgreSQL {version} in {bindir} is too old: the lab needs 13 or newer")]
    TooOld { bindir: PathBuf, version: String },

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

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl LabError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| LabError::Io { context, source }
    }

    fn sql(node: &'static str) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| LabError::Sql { node, source }
    }
}

/// How to build the lab.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// Directory with initdb/postgres/pg_basebackup; found automatically when `None`.
    pub pg_bindir: Option<PathBuf>,
    /// Keep the clusters here across runs; a temporary directory (removed on exit) when `None`.
    pub data_dir: Option<PathBuf>,
    /// One-way delay from primary to replica once the lab is up.
    pub delay: Duration,
    /// Loopback ports; 0 picks a free one. Replica `i` (from 0) gets `replica_port + i`.
    pub primary_port: u16,
    pub replica_port: u16,
    /// Streaming replicas, 1 to [`MAX_REPLICAS`], all behind the one delay link.
    pub replicas: u8,
    /// Name every replica in `synchronous_standby_names`, so that `remote_apply` commits wait
    /// for them. The server default becomes `synchronous_commit = local`, so ordinary writes
    /// still do not wait: only writes that ask for remote_apply do.
    pub sync_replica: bool,
}

/// The most replicas a lab starts.
pub const MAX_REPLICAS: u8 = 9;

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            pg_bindir: None,
            data_dir: None,
            delay: Duration::from_millis(1000),
            primary_port: 0,
            replica_port: 0,
            replicas: 1,
            sync_replica: false,
        }
    }
}

/// Where the lab keeps its clusters: a temporary directory, or one the user keeps.
#[derive(Debug)]
enum LabDir {
    Temporary(tempfile::TempDir),
    Kept(PathBuf),
}

impl LabDir {
    fn path(&self) -> &Path {
        match self {
            LabDir::Temporary(dir) => dir.path(),
            LabDir::Kept(path) => path,
        }
    }
}

/// A running primary/replica pair. Call [`Lab::shutdown`] to stop it in order; dropping it
/// stops the servers immediately.
#[derive(Debug)]
pub struct Lab {
    binaries: PgBinaries,
    run_as: Option<RunAs>,
    // Field order is drop order: servers first, then the link, then the directory.
    replicas: Vec<PgNode>,
    primary: PgNode,
    sync_replica: bool,
    link: DelayLink,
    configured_delay: Duration,
    dir: LabDir,
    /// How long `start` took until the replica streamed.
    pub startup: Duration,
}

/// Space a throwaway lab needs in memory-backed storage before it is used.
const MIN_SHM_BYTES: u64 = 1 << 30;

/// Where a temporary lab lives: `/dev/shm` when it is a roomy tmpfs (initdb and
/// pg_basebackup are several times faster there than on a disk: 0.5 s instead of 1.3 s and
/// 0.1 s instead of 0.9 s measured here), else the system's temporary directory. Containers
/// often have a 64 MB /dev/shm, hence the size check.
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

/// A `postgres://` URL for a lab server.
pub fn lab_url(port: u16) -> String {
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
    /// Builds (or reuses, with `data_dir`) and starts the pair; returns once the replica
    /// streams, with the link's delay still 0. Call [`Lab::apply_configured_delay`] next.
    pub async fn start(options: &LabOptions) -> Result<Lab, LabError> {
        let started = Instant::now();
        let binaries = PgBinaries::find(options.pg_bindir.as_deref())?;
        let run_as = RunAs::for_this_process()?;
        let dir = match &options.data_dir {
            Some(path) => {
                std::fs::create_dir_all(path)
                    .map_err(LabError::io(format!("creating {}", path.display())))?;
                LabDir::Kept(path.clone())
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
        let root = dir.path().to_path_buf();
        tracing::info!(
            bindir = %binaries.bindir.display(),
            version = %binaries.version,
            dir = %root.display(),
            user = run_as.as_ref().map_or("(current)", |user| user.name.as_str()),
            "starting the lab"
        );

        let primary_dir = root.join("primary");
        if !primary_dir.join("PG_VERSION").exists() {
            let mut initdb = lab_command(&binaries.program("initdb"), run_as.as_ref(), &root);
            initdb
                .arg("-D")
                .arg(&primary_dir)
                .args([
                    "-U",
                    LAB_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                ])
                .args(["--no-sync", "--no-instructions"]);
            run_to_completion(initdb, "initdb").await?;
            tracing::debug!(elapsed = ?started.elapsed(), "initdb done");
        }
        if options.replicas == 0 || options.replicas > MAX_REPLICAS {
            return Err(LabError::Io {
                context: format!("--replicas {}", options.replicas),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("a lab has 1 to {MAX_REPLICAS} replicas"),
                ),
            });
        }
        let primary = start_node(
            &binaries,
            run_as.as_ref(),
            &root,
            "primary",
            &primary_dir,
            options.primary_port,
            primary_args(options.replicas, options.sync_replica),
            "postgres",
        )
        .await?;
        create_lab_database(primary.port).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "primary accepting connections");

        let link = DelayLink::bind(
            "127.0.0.1:0",
            format!("127.0.0.1:{}", primary.port),
            Duration::ZERO,
        )
        .await
        .map_err(LabError::io("starting the delay link"))?;

        let mut replicas = Vec::new();
        for index in 0..options.replicas {
            let replica_dir = root.join(replica_node_name(index));
            if !replica_dir.join("PG_VERSION").exists() {
                // Straight from the primary: the copy need not cross the link.
                let mut basebackup =
                    lab_command(&binaries.program("pg_basebackup"), run_as.as_ref(), &root);
                basebackup
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &primary.port.to_string(),
                        "-U",
                        LAB_USER,
                    ])
                    .arg("-D")
                    .arg(&replica_dir)
                    .args(["--write-recovery-conf", "--wal-method=stream"])
                    .args(["--checkpoint=fast", "--no-sync"]);
                run_to_completion(basebackup, "pg_basebackup").await?;
                tracing::debug!(elapsed = ?started.elapsed(), index, "base backup taken");
            }
            let port = match options.replica_port {
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
            replicas.push(
                start_node(
                    &binaries,
                    run_as.as_ref(),
                    &root,
                    replica_node_name(index),
                    &replica_dir,
                    port,
                    replica_args(link.local_addr(), index),
                    LAB_DATABASE,
                )
                .await?,
            );
        }
        tracing::debug!(elapsed = ?started.elapsed(), "replicas accepting connections");
        let mut lab = Lab {
            binaries,
            run_as,
            replicas,
            primary,
            sync_replica: options.sync_replica,
            link,
            configured_delay: options.delay,
            dir,
            startup: Duration::ZERO,
        };
        for index in 0..lab.replicas.len() {
            lab.wait_until_streaming(index).await?;
        }
        if lab.sync_replica {
            lab.wait_until_synchronous().await?;
        }
        lab.startup = started.elapsed();
        Ok(lab)
    }

    pub fn primary_url(&self) -> String {
        lab_url(self.primary.port)
    }

    /// The first replica's URL.
    pub fn replica_url(&self) -> String {
        lab_url(self.replicas[0].port)
    }

    /// `(name, url)` of every replica, in order.
    pub fn replica_urls(&self) -> Vec<(String, String)> {
        self.replicas
            .iter()
            .map(|node| (node.name.to_owned(), lab_url(node.port)))
            .collect()
    }

    pub fn primary_port(&self) -> u16 {
        self.primary.port
    }

    pub fn replica_ports(&self) -> Vec<u16> {
        self.replicas.iter().map(|node| node.port).collect()
    }

    /// Where the replica's WAL stream enters the delay link.
    pub fn link_addr(&self) -> SocketAddr {
        self.link.local_addr()
    }

    /// The live delay setting (shared with every relayed connection).
    pub fn delay_control(&self) -> DelayControl {
        self.link.control().clone()
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn binaries(&self) -> &PgBinaries {
        &self.binaries
    }

    /// Waits until the replica has replayed everything the primary has written so far
    /// (migrations included), then switches the link to the configured delay.
    pub async fn apply_configured_delay(&self) -> Result<(), LabError> {
        let mut primary =
            PgConnection::connect_with(&lab_connect_options(self.primary.port, LAB_DATABASE))
                .await
                .map_err(LabError::sql("primary"))?;
        let target: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&mut primary)
            .await
            .map_err(LabError::sql("primary"))?;
        for node in &self.replicas {
            let mut replica =
                PgConnection::connect_with(&lab_connect_options(node.port, LAB_DATABASE))
                    .await
                    .map_err(LabError::sql(node.name))?;
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let caught_up: Option<bool> =
                    sqlx::query_scalar("SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn")
                        .bind(&target)
                        .fetch_one(&mut replica)
                        .await
                        .map_err(LabError::sql(node.name))?;
                if caught_up == Some(true) {
                    break;
                }
                self.check_alive()?;
                if Instant::now() > deadline {
                    return Err(not_ready(node, format!("never replayed up to {target}")));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        self.link.control().set_delay(self.configured_delay);
        tracing::info!(
            delay_ms = self.configured_delay.as_millis() as u64,
            "delay link engaged"
        );
        Ok(())
    }

    /// Polls until replica `index`'s WAL receiver reports `streaming`.
    async fn wait_until_streaming(&self, index: usize) -> Result<(), LabError> {
        let node = &self.replicas[index];
        let mut replica = PgConnection::connect_with(&lab_connect_options(node.port, LAB_DATABASE))
            .await
            .map_err(LabError::sql(node.name))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM pg_stat_wal_receiver LIMIT 1")
                    .fetch_optional(&mut replica)
                    .await
                    .map_err(LabError::sql(node.name))?;
            if status.as_deref() == Some("streaming") {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(not_ready(node, format!("WAL receiver status {status:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until the primary lists every replica as a synchronous standby.
    async fn wait_until_synchronous(&self) -> Result<(), LabError> {
        let mut primary =
            PgConnection::connect_with(&lab_connect_options(self.primary.port, LAB_DATABASE))
                .await
                .map_err(LabError::sql("primary"))?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let synchronous: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'",
            )
            .fetch_one(&mut primary)
            .await
            .map_err(LabError::sql("primary"))?;
            if synchronous == self.replicas.len() as i64 {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() > deadline {
                return Err(not_ready(
                    &self.primary,
                    format!(
                        "{synchronous} of {} replicas synchronous",
                        self.replicas.len()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn check_alive(&self) -> Result<(), LabError> {
        for node in std::iter::once(&self.primary).chain(&self.replicas) {
            if let Some(status) = node.exit_status() {
                return Err(LabError::NodeExited {
                    node: node.name,
                    status: status.to_string(),
                    log_tail: node.log_tail(),
                });
            }
        }
        Ok(())
    }

    /// Resolves with an error when any server exits without being asked to.
    pub async fn unexpected_exit(&self) -> LabError {
        let mut watched: Vec<
            std::pin::Pin<Box<dyn std::future::Future<Output = LabError> + Send + '_>>,
        > = vec![Box::pin(self.primary.unexpected_exit())];
        for node in &self.replicas {
            watched.push(Box::pin(node.unexpected_exit()));
        }
        std::future::poll_fn(|context| {
            for future in watched.iter_mut() {
                if let std::task::Poll::Ready(error) = future.as_mut().poll(context) {
                    return std::task::Poll::Ready(error);
                }
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Stops replica `index` (fast shutdown), as an outage would.
    pub async fn stop_replica(&mut self, index: usize) {
        self.replicas[index].stop().await;
    }

    /// Starts replica `index` again after [`Lab::stop_replica`], on the same port.
    pub async fn start_replica(&mut self, index: usize) -> Result<(), LabError> {
        let root = self.dir.path().to_path_buf();
        let replica = start_node(
            &self.binaries,
            self.run_as.as_ref(),
            &root,
            replica_node_name(index as u8),
            &root.join(replica_node_name(index as u8)),
            self.replicas[index].port,
            replica_args(self.link.local_addr(), index as u8),
            LAB_DATABASE,
        )
        .await?;
        let _stopped = std::mem::replace(&mut self.replicas[index], replica);
        self.wait_until_streaming(index).await
    }

    /// Stops the replicas, then the primary, then the link; removes a temporary directory.
    pub async fn shutdown(mut self) {
        for node in &mut self.replicas {
            node.stop().await;
        }
        self.primary.stop().await;
    }
}

fn not_ready(node: &PgNode, cause: String) -> LabError {
    LabError::NotReady {
        node: node.name,
        timeout: READY_TIMEOUT,
        cause,
        log_tail: node.log_tail(),
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

/// The name the primary knows replica `index` by (pg_stat_replication.application_name).
pub fn standby_name(index: u8) -> String {
    format!("lagprobe_{}", replica_node_name(index))
}

fn primary_args(replicas: u8, sync_replica: bool) -> Vec<String> {
    if !sync_replica {
        return Vec::new();
    }
    let names: Vec<String> = (0..replicas).map(standby_name).collect();
    vec![
        "-c".into(),
        format!(
            "synchronous_standby_names=FIRST {replicas} ({})",
            names.join(", ")
        ),
        "-c".into(),
        "synchronous_commit=local".into(),
    ]
}

fn replica_args(link: SocketAddr, index: u8) -> Vec<String> {
    vec![
        "-c".into(),
        // On the command line, so a kept replica follows the link's new port every run.
        format!(
            "primary_conninfo=host={} port={} user={LAB_USER} application_name={} sslmode=disable",
            link.ip(),
            link.port(),
            standby_name(index)
        ),
    ]
}

/// Starts a server and waits until it accepts connections. With an automatic port, a
/// port taken between choosing and binding it is retried with another.
#[allow(clippy::too_many_arguments)]
async fn start_node(
    binaries: &PgBinaries,
    run_as: Option<&RunAs>,
    root: &Path,
    name: &'static str,
    data_dir: &Path,
    requested_port: u16,
    extra_args: Vec<String>,
    ready_database: &str,
) -> Result<PgNode, LabError> {
    let log_path = root.join(format!("{name}.log"));
    let mut attempts = 0;
    loop {
        attempts += 1;
        let port = if requested_port == 0 {
            free_port()?
        } else {
            requested_port
        };
        let mut command = lab_command(&binaries.program("postgres"), run_as, root);
        command.args(common_server_args()).args(&extra_args);
        let node = PgNode::spawn(command, name, data_dir, port, &log_path)?;
        match wait_until_accepting(&node, ready_database).await {
            Ok(()) => return Ok(node),
            Err(LabError::NodeExited { log_tail, .. })
                if requested_port == 0 && attempts < 3 && log_tail.contains("could not bind") =>
            {
                tracing::info!(name, port, "port was taken; retrying with another");
            }
            Err(error) => return Err(error),
        }
    }
}

async fn wait_until_accepting(node: &PgNode, database: &str) -> Result<(), LabError> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let options = lab_connect_options(node.port, database);
    loop {
        if let Some(status) = node.exit_status() {
            return Err(LabError::NodeExited {
                node: node.name,
                status: status.to_string(),
                log_tail: node.log_tail(),
            });
        }
        match PgConnection::connect_with(&options).await {
            Ok(connection) => {
                let _ = connection.close().await;
                return Ok(());
            }
            Err(error) if Instant::now() > deadline => {
                return Err(LabError::NotReady {
                    node: node.name,
                    timeout: READY_TIMEOUT,
                    cause: error.to_string(),
                    log_tail: node.log_tail(),
                });
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

async fn create_lab_database(primary_port: u16) -> Result<(), LabError> {
    let mut connection = PgConnection::connect_with(&lab_connect_options(primary_port, "postgres"))
        .await
        .map_err(LabError::sql("primary"))?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(LAB_DATABASE)
            .fetch_one(&mut connection)
            .await
            .map_err(LabError::sql("primary"))?;
    if !exists {
        // A literal: sqlx refuses built SQL strings, and the name is a constant anyway.
        sqlx::query("CREATE DATABASE lagprobe")
            .execute(&mut connection)
            .await
            .map_err(LabError::sql("primary"))?;
    }
    Ok(())
}
