//! The primary and replica connection pools, and every SQL statement lagprobe sends.
//!
//! Primitives only: a write, a read on the primary or on one replica, positions, health.
//! Where a read goes (the read-your-writes strategies) is the probe engine's decision.
//! Keeping all of lagprobe's probe SQL here means the probe engine speaks in probe terms
//! and the transports never see a query. (The lab's few bootstrap statements are its own:
//! it sits below this module.)

use std::{
    collections::HashSet,
    str::FromStr,
    sync::{
        Arc, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;
use sqlx::{
    ConnectOptions, Connection, Postgres, Row,
    pool::PoolConnection,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};

use crate::{
    lsn::Lsn,
    settings::{PoolSettings, Secret},
};

/// Which database an operation talked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// What can go wrong talking to the databases.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// A database could not be reached or failed a query.
    #[error("{role} database: {}", describe(.source))]
    Query {
        role: Role,
        #[source]
        source: sqlx::Error,
    },

    /// Schema migrations on the primary failed.
    #[error("migrations on the primary failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A database URL could not be understood.
    #[error("invalid {role} database URL: {reason}")]
    Url { role: Role, reason: String },

    /// No pooled connection came in time; `cause` is what a direct connection attempt
    /// said (so the error reads "connection refused", not "pool timed out").
    #[error("{role} database at {addr} is unreachable: {cause}")]
    Unreachable {
        role: Role,
        addr: String,
        cause: String,
    },

    /// Probes need somewhere to read.
    #[error("at least one replica is needed")]
    NoReplica,
}

/// PostgreSQL's message and SQLSTATE, without the "at line N" sqlx appends (a line of
/// PostgreSQL's own source code, which reads as if it were the caller's).
fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(database) => match database.code() {
            Some(code) => format!("{} (SQLSTATE {code})", database.message()),
            None => database.message().to_owned(),
        },
        other => other.to_string(),
    }
}

impl DbError {
    /// Whether the primary failed (no probe can run without a write).
    pub fn is_primary_unavailable(&self) -> bool {
        matches!(
            self,
            DbError::Query {
                role: Role::Primary,
                ..
            } | DbError::Unreachable {
                role: Role::Primary,
                ..
            }
        )
    }

    /// Whether the database could not be reached or failed a query (not a setup error).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DbError::Query { .. } | DbError::Unreachable { .. })
    }
}

type Result<T, E = DbError> = std::result::Result<T, E>;

/// One replica: its name in reports, and its pool.
#[derive(Debug, Clone)]
pub struct Replica {
    pub name: String,
    pool: PgPool,
    /// The name the primary knows this replica's WAL receiver by (pg_stat_replication's
    /// application_name), learnt on first use.
    application_name: Arc<OnceLock<String>>,
    /// `server_version_num`, learnt on first use (WAIT FOR LSN needs 19).
    version_num: Arc<OnceLock<u32>>,
}

/// What `WAIT FOR LSN` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitOutcome {
    /// The replica has replayed the position.
    Replayed,
    TimedOut,
    /// The server is not a standby (any more): promoted.
    NotInRecovery,
}

/// The first PostgreSQL version with `WAIT FOR LSN` (as server_version_num).
const WAIT_FOR_LSN_VERSION_NUM: u32 = 190_000;

/// The primary and the replicas. Clones share one topology, which a failover re-points
/// ([`Databases::repoint`]) for every holder at once.
#[derive(Debug, Clone)]
pub struct Databases {
    topology: Arc<RwLock<Arc<Topology>>>,
    /// The topology's generation, readable without the lock: sessions check it per read.
    generation: Arc<AtomicU64>,
    settings: PoolSettings,
}

/// The pools of one arrangement of servers.
#[derive(Debug)]
struct Topology {
    primary: PgPool,
    replicas: Arc<[Replica]>,
    urls: Arc<TopologyUrls>,
}

/// The URLs of one arrangement of servers, numbered so that a holder that connects by URL
/// rather than through the pools (the proxy's sessions) can tell when a failover has
/// re-pointed them. Secrets, because the URLs may carry passwords.
#[derive(Debug)]
pub struct TopologyUrls {
    /// 0 at first, one more at each [`Databases::repoint`].
    pub generation: u64,
    pub primary: Secret,
    /// In the order of [`Databases::replicas`].
    pub replicas: Vec<Secret>,
}

/// A row as a server returned it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowSeen {
    /// The primary's commit-time clock, as PostgreSQL prints a timestamptz.
    pub written_at: String,
    pub value: Option<String>,
}

/// A probe's row as the primary stored it.
#[derive(Debug, Clone)]
pub struct WrittenRow {
    pub id: i64,
    pub written_at: String,
    /// `written_at` as ms since the Unix epoch (primary clock), for heartbeat arithmetic.
    pub written_at_epoch_ms: f64,
    /// With remote_apply: whether a synchronous standby made the COMMIT wait.
    pub remote_apply_effective: Option<bool>,
}

/// The primary's position right after a commit, and what pg_stat_replication says of the
/// replica at that moment.
#[derive(Debug, Clone, Default)]
pub struct CommitPosition {
    pub wal_lsn: Lsn,
    pub stat_write_lag_ms: Option<f64>,
    pub stat_flush_lag_ms: Option<f64>,
    pub stat_replay_lag_ms: Option<f64>,
}

/// One read of a row on a replica, with the replica's replication state at that moment.
#[derive(Debug, Clone, Default)]
pub struct ReplicaRead {
    pub row: Option<RowSeen>,
    /// `pg_last_wal_replay_lsn()`; `None` when the server is not in recovery.
    pub replay_lsn: Option<Lsn>,
    /// `pg_last_wal_receive_lsn()`.
    pub receive_lsn: Option<Lsn>,
    /// `clock_timestamp() - pg_last_xact_replay_timestamp()` in ms.
    pub replay_timestamp_lag_ms: Option<f64>,
    /// The newest heartbeat the replica shows, ms since the epoch (primary clock).
    pub heartbeat_epoch_ms: Option<f64>,
}

/// What the replica says about itself, for readiness.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplicaState {
    pub in_recovery: bool,
    /// `pg_stat_wal_receiver.status` (e.g. `streaming`), `None` when no WAL receiver runs
    /// (or the role may not see it: it needs `pg_monitor`).
    pub wal_receiver_status: Option<String>,
    /// Whether lagprobe's tables have replicated to it yet (right after migrating a
    /// delayed replica, they arrive one delay later).
    pub schema_replicated: bool,
}

impl ReplicaState {
    /// Ready to serve probes: in recovery, streaming, with lagprobe's tables.
    pub fn is_streaming(&self) -> bool {
        self.in_recovery
            && self.wal_receiver_status.as_deref() == Some("streaming")
            && self.schema_replicated
    }
}

/// pg_stat_replication's view of one standby.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StandbyStats {
    pub application_name: String,
    pub write_lag_ms: Option<f64>,
    pub flush_lag_ms: Option<f64>,
    pub replay_lag_ms: Option<f64>,
}

/// Parses a `postgres://` URL into connect options, tagging errors with the database's role.
fn connect_options(url: &str, role: Role) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map(|options| {
            options
                .application_name("lagprobe")
                // A remote_apply COMMIT waits out the replication delay by design: not a
                // warning. Slow statements still show at debug level.
                .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(1))
        })
        .map_err(|error| DbError::Url {
            role,
            reason: error.to_string(),
        })
}

/// The URL with its password masked, for logs and pages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            // libpq takes the password as a query parameter too.
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(name, value)| {
                    let secret = name == "password" || name == "sslpassword";
                    let value = if secret {
                        "***".into()
                    } else {
                        value.into_owned()
                    };
                    (name.into_owned(), value)
                })
                .collect();
            if !pairs.is_empty() {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

/// `(name, url)` per replica, named by host:port of its URL (made unique if two coincide).
pub fn name_replicas(urls: &[String]) -> Vec<(String, String)> {
    let mut named: Vec<(String, String)> = Vec::new();
    for url in urls {
        let base = replica_name_from_url(url);
        let mut name = base.clone();
        let mut suffix = 2;
        while named.iter().any(|(taken, _)| *taken == name) {
            name = format!("{base}#{suffix}");
            suffix += 1;
        }
        named.push((name, url.clone()));
    }
    named
}

/// A replica's default report name: host:port of its URL.
fn replica_name_from_url(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|parsed| {
            let host = parsed.host_str()?.to_owned();
            Some(match parsed.port() {
                Some(port) => format!("{host}:{port}"),
                None => host,
            })
        })
        .unwrap_or_else(|| "replica".to_owned())
}

/// A pool that connects on first use, so a server can start while a database is down and
/// report it through readiness; `test_before_acquire` weeds out connections a restarted
/// server has broken, so a replica that comes back is used again.
fn lazy_pool(url: &str, role: Role, settings: &PoolSettings) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(connect_options(url, role)?))
}

fn decode_lsn(text: Option<String>) -> Result<Option<Lsn>, sqlx::Error> {
    text.map(|text| text.parse::<Lsn>())
        .transpose()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

/// A connection from `pool`. When none comes within the acquire timeout, the reason is
/// learnt by connecting directly, once, so the error names it.
async fn acquire(pool: &PgPool, role: Role) -> Result<PoolConnection<Postgres>> {
    match pool.acquire().await {
        Ok(connection) => Ok(connection),
        Err(sqlx::Error::PoolTimedOut) => Err(unreachable(pool, role).await),
        Err(source) => Err(DbError::Query { role, source }),
    }
}

async fn unreachable(pool: &PgPool, role: Role) -> DbError {
    let options = pool.connect_options();
    let addr = format!("{}:{}", options.get_host(), options.get_port());
    let timeout = pool.options().get_acquire_timeout();
    let cause = match tokio::time::timeout(timeout, options.connect()).await {
        Ok(Ok(connection)) => {
            let _ = connection.close().await;
            "it answers, but every pooled connection stayed busy (raise --pool-size)".to_owned()
        }
        Ok(Err(error)) => error.to_string(),
        Err(_) => format!("no answer within {timeout:?}"),
    };
    DbError::Unreachable { role, addr, cause }
}

fn primary_error(source: sqlx::Error) -> DbError {
    DbError::Query {
        role: Role::Primary,
        source,
    }
}

fn replica_error(source: sqlx::Error) -> DbError {
    DbError::Query {
        role: Role::Replica,
        source,
    }
}

impl Topology {
    fn lazy(
        primary_url: &str,
        replicas: &[(String, String)],
        settings: &PoolSettings,
        generation: u64,
    ) -> Result<Self> {
        let urls = Arc::new(TopologyUrls {
            generation,
            primary: Secret(primary_url.to_owned()),
            replicas: replicas
                .iter()
                .map(|(_, url)| Secret(url.clone()))
                .collect(),
        });
        let replicas = replicas
            .iter()
            .map(|(name, url)| {
                Ok(Replica {
                    name: name.clone(),
                    pool: lazy_pool(url, Role::Replica, settings)?,
                    application_name: Arc::default(),
                    version_num: Arc::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Topology {
            primary: lazy_pool(primary_url, Role::Primary, settings)?,
            replicas: replicas.into(),
            urls,
        })
    }
}

impl Databases {
    /// Lazy pools for the primary and each `(name, url)` replica.
    pub fn connect_lazy(
        primary_url: &str,
        replicas: &[(String, String)],
        settings: &PoolSettings,
    ) -> Result<Self> {
        if replicas.is_empty() {
            return Err(DbError::NoReplica);
        }
        Ok(Databases {
            topology: Arc::new(RwLock::new(Arc::new(Topology::lazy(
                primary_url,
                replicas,
                settings,
                0,
            )?))),
            generation: Arc::new(AtomicU64::new(0)),
            settings: *settings,
        })
    }

    fn topology(&self) -> Arc<Topology> {
        Arc::clone(&self.topology.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The servers' URLs now, and how many times they have been re-pointed.
    pub fn urls(&self) -> Arc<TopologyUrls> {
        Arc::clone(&self.topology().urls)
    }

    /// How many times the servers have been re-pointed: the generation [`Databases::urls`]
    /// would carry, without taking the topology's lock.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The replicas now (none after a failover that left no standby).
    pub fn replicas(&self) -> Arc<[Replica]> {
        Arc::clone(&self.topology().replicas)
    }

    /// Points every holder of these pools at a new primary and replicas, as after a
    /// failover. Operations already running finish on the old pools, which then close.
    pub fn repoint(&self, primary_url: &str, replicas: &[(String, String)]) -> Result<()> {
        let mut current = self.topology.write().unwrap_or_else(|p| p.into_inner());
        let generation = current.urls.generation + 1;
        let topology = Arc::new(Topology::lazy(
            primary_url,
            replicas,
            &self.settings,
            generation,
        )?);
        let old = std::mem::replace(&mut *current, topology);
        self.generation.store(generation, Ordering::Release);
        drop(current);
        tokio::spawn(async move {
            old.primary.close().await;
            for replica in old.replicas.iter() {
                replica.pool.close().await;
            }
        });
        Ok(())
    }

    async fn on_primary(&self) -> Result<PoolConnection<Postgres>> {
        acquire(&self.topology().primary, Role::Primary).await
    }

    async fn on_replica(&self, replica: &Replica) -> Result<PoolConnection<Postgres>> {
        acquire(&replica.pool, Role::Replica).await
    }

    /// Applies `migrations/` to the primary.
    pub async fn migrate(&self) -> Result<()> {
        migrate_primary(&self.topology().primary).await
    }

    /// Inserts a row on the primary and commits. With `remote_apply` the transaction sets
    /// `synchronous_commit = remote_apply` and also reports whether a synchronous standby
    /// (`standby`, or any when unknown) existed to make that COMMIT wait.
    pub async fn write_row(
        &self,
        token: &str,
        value: Option<&str>,
        remote_apply: Option<Option<&str>>,
    ) -> Result<WrittenRow> {
        const INSERT: &str = "INSERT INTO lagprobe.probe_write (token, value) VALUES ($1, $2) \
             RETURNING id, written_at::text, (extract(epoch FROM written_at) * 1000)::float8";
        let Some(standby) = remote_apply else {
            // Autocommit: the statement returning means the COMMIT was acknowledged.
            let row = sqlx::query(INSERT)
                .bind(token)
                .bind(value)
                .fetch_one(&mut *self.on_primary().await?)
                .await
                .map_err(primary_error)?;
            return Ok(WrittenRow {
                id: row.get(0),
                written_at: row.get(1),
                written_at_epoch_ms: row.get(2),
                remote_apply_effective: None,
            });
        };
        let mut connection = self.on_primary().await?;
        let mut transaction = connection.begin().await.map_err(primary_error)?;
        sqlx::query("SET LOCAL synchronous_commit = remote_apply")
            .execute(&mut *transaction)
            .await
            .map_err(primary_error)?;
        let effective: bool = sqlx::query_scalar(
            "SELECT current_setting('synchronous_standby_names') <> '' AND EXISTS ( \
                 SELECT 1 FROM pg_stat_replication \
                 WHERE sync_state IN ('sync', 'quorum') \
                   AND ($1::text IS NULL OR application_name = $1))",
        )
        .bind(standby)
        .fetch_one(&mut *transaction)
        .await
        .map_err(primary_error)?;
        let row = sqlx::query(INSERT)
            .bind(token)
            .bind(value)
            .fetch_one(&mut *transaction)
            .await
            .map_err(primary_error)?;
        transaction.commit().await.map_err(primary_error)?;
        Ok(WrittenRow {
            id: row.get(0),
            written_at: row.get(1),
            written_at_epoch_ms: row.get(2),
            remote_apply_effective: Some(effective),
        })
    }

    /// The primary's WAL write position (taken after a COMMIT returned, it is at or past
    /// that commit's record), and pg_stat_replication's lags for `standby`, in one round trip.
    pub async fn commit_position(&self, standby: Option<&str>) -> Result<CommitPosition> {
        let row = sqlx::query(
            "SELECT pg_current_wal_lsn()::text, \
                    (extract(epoch FROM s.write_lag) * 1000)::float8, \
                    (extract(epoch FROM s.flush_lag) * 1000)::float8, \
                    (extract(epoch FROM s.replay_lag) * 1000)::float8 \
             FROM (SELECT 1) AS one LEFT JOIN LATERAL ( \
                 SELECT write_lag, flush_lag, replay_lag FROM pg_stat_replication \
                 WHERE application_name = $1 LIMIT 1) AS s ON true",
        )
        .bind(standby)
        .fetch_one(&mut *self.on_primary().await?)
        .await
        .map_err(primary_error)?;
        Ok(CommitPosition {
            wal_lsn: decode_lsn(row.get(0))
                .map_err(primary_error)?
                .unwrap_or_default(),
            stat_write_lag_ms: row.get(1),
            stat_flush_lag_ms: row.get(2),
            stat_replay_lag_ms: row.get(3),
        })
    }

    /// Reads a row on a replica together with the replica's replication state, in one round
    /// trip so all of it describes the same moment.
    pub async fn read_on_replica(&self, replica: &Replica, token: &str) -> Result<ReplicaRead> {
        let row = sqlx::query(
            "SELECT p.written_at::text, p.value, \
                    pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, \
                    (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) \
                        * 1000)::float8, \
                    (SELECT (extract(epoch FROM beat_at) * 1000)::float8 FROM lagprobe.heartbeat) \
             FROM (SELECT 1) AS one \
             LEFT JOIN lagprobe.probe_write p ON p.token = $1",
        )
        .bind(token)
        .fetch_one(&mut *self.on_replica(replica).await?)
        .await
        .map_err(replica_error)?;
        let written_at: Option<String> = row.get(0);
        Ok(ReplicaRead {
            row: written_at.map(|written_at| RowSeen {
                written_at,
                value: row.get(1),
            }),
            replay_lsn: decode_lsn(row.get(2)).map_err(replica_error)?,
            receive_lsn: decode_lsn(row.get(3)).map_err(replica_error)?,
            replay_timestamp_lag_ms: row.get(4),
            heartbeat_epoch_ms: row.get(5),
        })
    }

    /// Reads a row on the primary.
    pub async fn read_on_primary(&self, token: &str) -> Result<Option<RowSeen>> {
        let row = sqlx::query(
            "SELECT written_at::text, value FROM lagprobe.probe_write WHERE token = $1",
        )
        .bind(token)
        .fetch_optional(&mut *self.on_primary().await?)
        .await
        .map_err(primary_error)?;
        Ok(row.map(|row| RowSeen {
            written_at: row.get(0),
            value: row.get(1),
        }))
    }

    /// The replica's replay position.
    pub async fn replay_lsn(&self, replica: &Replica) -> Result<Option<Lsn>> {
        let text: Option<String> = sqlx::query_scalar("SELECT pg_last_wal_replay_lsn()::text")
            .fetch_one(&mut *self.on_replica(replica).await?)
            .await
            .map_err(replica_error)?;
        decode_lsn(text).map_err(replica_error)
    }

    /// Waits on the replica, server-side, until it has replayed `lsn` or `timeout` passes
    /// (`WAIT FOR LSN`, PostgreSQL 19 and later); `None` when the replica is older.
    pub async fn wait_for_lsn(
        &self,
        replica: &Replica,
        lsn: Lsn,
        timeout: Duration,
    ) -> Result<Option<WaitOutcome>> {
        if self.replica_version_num(replica).await? < WAIT_FOR_LSN_VERSION_NUM {
            return Ok(None);
        }
        // A utility command takes no bind parameters. Both values are lagprobe's own
        // types printed as PostgreSQL reads them ("X/Y" hex, whole ms): nothing to inject.
        let statement = format!(
            "WAIT FOR LSN '{lsn}' WITH (MODE 'standby_replay', TIMEOUT '{}ms', NO_THROW)",
            timeout.as_millis().max(1)
        );
        let status: String = sqlx::query_scalar(sqlx::AssertSqlSafe(statement))
            .persistent(false)
            .fetch_one(&mut *self.on_replica(replica).await?)
            .await
            .map_err(replica_error)?;
        Ok(Some(match status.as_str() {
            "success" => WaitOutcome::Replayed,
            "not in recovery" => WaitOutcome::NotInRecovery,
            _ => WaitOutcome::TimedOut,
        }))
    }

    async fn replica_version_num(&self, replica: &Replica) -> Result<u32> {
        if let Some(version) = replica.version_num.get() {
            return Ok(*version);
        }
        let version: i32 = sqlx::query_scalar("SELECT current_setting('server_version_num')::int")
            .fetch_one(&mut *self.on_replica(replica).await?)
            .await
            .map_err(replica_error)?;
        Ok(*replica.version_num.get_or_init(|| version as u32))
    }

    /// Deletes the probe rows named by `tokens`, and any row older than `max_age` (cancelled
    /// probes, values written through the API), so the table never grows without bound.
    pub async fn delete_probe_rows(&self, tokens: &[String], max_age: Duration) -> Result<()> {
        sqlx::query(
            "DELETE FROM lagprobe.probe_write \
             WHERE token = ANY($1) OR written_at < clock_timestamp() - make_interval(secs => $2)",
        )
        .bind(tokens)
        .bind(max_age.as_secs_f64())
        .execute(&mut *self.on_primary().await?)
        .await
        .map_err(primary_error)?;
        Ok(())
    }

    /// Which of `tokens` the primary has a row for: lost writes are read back this way.
    pub async fn tokens_present(&self, tokens: &[String]) -> Result<HashSet<String>> {
        let present: Vec<String> =
            sqlx::query_scalar("SELECT token FROM lagprobe.probe_write WHERE token = ANY($1)")
                .bind(tokens)
                .fetch_all(&mut *self.on_primary().await?)
                .await
                .map_err(primary_error)?;
        Ok(present.into_iter().collect())
    }

    /// Moves the heartbeat on the primary to now.
    pub async fn beat(&self) -> Result<()> {
        sqlx::query("UPDATE lagprobe.heartbeat SET beat_at = clock_timestamp() WHERE id = 1")
            .execute(&mut *self.on_primary().await?)
            .await
            .map_err(primary_error)?;
        Ok(())
    }

    /// The primary's current WAL position and clock (ms since the epoch).
    pub async fn primary_now(&self) -> Result<(Lsn, f64)> {
        let row = sqlx::query(
            "SELECT pg_current_wal_lsn()::text, \
                    (extract(epoch FROM clock_timestamp()) * 1000)::float8",
        )
        .fetch_one(&mut *self.on_primary().await?)
        .await
        .map_err(primary_error)?;
        let lsn = decode_lsn(row.get(0))
            .map_err(primary_error)?
            .unwrap_or_default();
        Ok((lsn, row.get(1)))
    }

    /// The primary's WAL insert position. Read after a COMMIT was acknowledged it is at or
    /// past the end of that commit record, under any synchronous_commit (the write position,
    /// pg_current_wal_lsn(), is not when the commit did not flush): the proxy's token.
    pub async fn primary_insert_lsn(&self) -> Result<Lsn> {
        let text: Option<String> = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
            .fetch_one(&mut *self.on_primary().await?)
            .await
            .map_err(primary_error)?;
        Ok(decode_lsn(text).map_err(primary_error)?.unwrap_or_default())
    }

    /// Every standby pg_stat_replication lists.
    pub async fn standbys(&self) -> Result<Vec<StandbyStats>> {
        let rows = sqlx::query(
            "SELECT application_name, \
                    (extract(epoch FROM write_lag) * 1000)::float8, \
                    (extract(epoch FROM flush_lag) * 1000)::float8, \
                    (extract(epoch FROM replay_lag) * 1000)::float8 \
             FROM pg_stat_replication ORDER BY application_name",
        )
        .fetch_all(&mut *self.on_primary().await?)
        .await
        .map_err(primary_error)?;
        Ok(rows
            .into_iter()
            .map(|row| StandbyStats {
                application_name: row.get(0),
                write_lag_ms: row.get(1),
                flush_lag_ms: row.get(2),
                replay_lag_ms: row.get(3),
            })
            .collect())
    }

    /// The standby name, if already learnt ([`Databases::standby_name`]); never waits.
    pub fn known_standby_name(&self, replica: &Replica) -> Option<String> {
        replica.application_name.get().cloned()
    }

    /// The name the primary's pg_stat_replication shows for this replica: the
    /// application_name in its primary_conninfo, else its cluster_name, else `walreceiver`
    /// (PostgreSQL's own fallbacks, in that order). Cached once learnt.
    pub async fn standby_name(&self, replica: &Replica) -> Result<String> {
        if let Some(name) = replica.application_name.get() {
            return Ok(name.clone());
        }
        let row = sqlx::query(
            "SELECT (SELECT conninfo FROM pg_stat_wal_receiver LIMIT 1), \
                    current_setting('cluster_name')",
        )
        .fetch_one(&mut *self.on_replica(replica).await?)
        .await
        .map_err(replica_error)?;
        let conninfo: Option<String> = row.get(0);
        let cluster_name: String = row.get(1);
        let Some(conninfo) = conninfo else {
            // Not streaming right now: do not cache a guess.
            return Ok(if cluster_name.is_empty() {
                "walreceiver".into()
            } else {
                cluster_name
            });
        };
        let name = conninfo
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix("application_name="))
            .map(|name| name.trim_matches('\'').to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or(if cluster_name.is_empty() {
                "walreceiver".into()
            } else {
                cluster_name
            });
        Ok(replica.application_name.get_or_init(|| name).clone())
    }

    /// Succeeds when the primary answers a query.
    pub async fn primary_ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&mut *self.on_primary().await?)
            .await
            .map_err(primary_error)?;
        Ok(())
    }

    /// Whether a replica is in recovery and what its WAL receiver is doing.
    pub async fn replica_state(&self, replica: &Replica) -> Result<ReplicaState> {
        let row = sqlx::query(
            "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1), \
                    to_regclass('lagprobe.heartbeat') IS NOT NULL",
        )
        .fetch_one(&mut *self.on_replica(replica).await?)
        .await
        .map_err(replica_error)?;
        Ok(ReplicaState {
            in_recovery: row.get(0),
            wal_receiver_status: row.get(1),
            schema_replicated: row.get(2),
        })
    }
}

/// The statements the proxy sends on a client session's own backend connections (which do
/// not go through these pools): kept here with the rest of lagprobe's SQL.
pub mod session_sql {
    /// Before replaying a session's settings on a replica connection that had older ones.
    pub const RESET_ALL: &str = "RESET ALL";
    /// remote-apply: the session's COMMITs wait for the standby to apply them.
    pub const REMOTE_APPLY: &str = "SET synchronous_commit = remote_apply";
    /// Leaving remote-apply.
    pub const RESET_SYNCHRONOUS_COMMIT: &str = "RESET synchronous_commit";
    /// On a session's first replica connection: a standby cannot run serializable
    /// transactions, so a session whose role, database or startup options make them the
    /// default reads from the primary.
    pub const SHOW_DEFAULT_ISOLATION: &str = "SHOW default_transaction_isolation";

    /// A client's session-level `set_config(name, value, false)`, replayed on a replica
    /// connection. Not `SET name = value`: for some variables the two differ (`''` is an
    /// empty search_path to set_config and a schema named "" to SET).
    pub fn set_config(name: &str, value: &str) -> String {
        format!(
            "SELECT pg_catalog.set_config({}, {}, false)",
            literal(name),
            literal(value)
        )
    }

    /// A string constant that reads the same whatever `standard_conforming_strings` is:
    /// an E'' string always takes backslash escapes.
    fn literal(text: &str) -> String {
        format!("E'{}'", text.replace('\\', "\\\\").replace('\'', "''"))
    }
}

/// What `lagprobe bench --sections proxy` sends through the proxy (and PgBouncer) on its
/// own connections: one row it updates and reads back, and a query each idle client runs
/// once so that every proxy has its backend connections open.
pub mod bench_sql {
    /// In `public`, not lagprobe's schema: it is the bench's stand-in for an app's table.
    pub const CREATE_ROW: &str = "CREATE TABLE IF NOT EXISTS lagprobe_bench_rw \
        (id int PRIMARY KEY, v bigint NOT NULL); \
        INSERT INTO lagprobe_bench_rw VALUES (1, 0) ON CONFLICT (id) DO NOTHING";
    pub const WRITE_ROW: &str = "UPDATE lagprobe_bench_rw SET v = $1 WHERE id = 1";
    pub const READ_ROW: &str = "SELECT v FROM lagprobe_bench_rw WHERE id = 1";
    pub const TOUCH: &str = "SELECT 1";

    /// The session's strategy, answered by the proxy itself.
    pub fn set_strategy(name: &str) -> String {
        format!("SET lagprobe.strategy = '{name}'")
    }
}

/// Applies `migrations/` to the primary at `primary_url` (`lagprobe migrate`).
pub async fn migrate(primary_url: &str, settings: &PoolSettings) -> Result<()> {
    migrate_primary(&lazy_pool(primary_url, Role::Primary, settings)?).await
}

/// Runs the migrations against one primary pool. Everything lagprobe owns lives in the
/// schema `lagprobe`, the migration ledger included, so user schemas are never touched.
async fn migrate_primary(primary: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.create_schema("lagprobe");
    migrator.dangerous_set_table_name("lagprobe._sqlx_migrations");
    migrator.run(primary).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_and_names_are_host_port() {
        let url = "postgres://app:s3cret@db.example:6543/app";
        assert_eq!(redact_url(url), "postgres://app:***@db.example:6543/app");
        assert!(!redact_url(url).contains("s3cret"));
        let in_query = "postgres://app@db/app?sslmode=disable&password=s3cret";
        assert_eq!(
            redact_url(in_query),
            "postgres://app@db/app?sslmode=disable&password=***"
        );
        assert_eq!(replica_name_from_url(url), "db.example:6543");
        assert_eq!(replica_name_from_url("postgres://h/db"), "h");
        let named = name_replicas(&["postgres://h/a".into(), "postgres://h/b".into()]);
        assert_eq!(named[0].0, "h");
        assert_eq!(named[1].0, "h#2");
    }
}
