//! The primary and replica connection pools, and every SQL statement lagprobe sends.
//!
//! Writes go to the primary pool, reads to the replica pool. Keeping all SQL here means the
//! probe engine speaks in probe terms and the transports never see a query.

use std::{str::FromStr, time::Duration};

use sqlx::{
    Row,
    postgres::{PgConnectOptions, PgPool, PgPoolOptions},
};

use crate::{
    error::{Error, Result, Role},
    lsn::Lsn,
};

/// How the pools connect.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Connections per pool at most.
    pub max_connections: u32,
    /// How long a query waits for a connection before the database counts as unavailable.
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// The two pools: writes to `primary`, reads from `replica`.
#[derive(Debug, Clone)]
pub struct Databases {
    primary: PgPool,
    replica: PgPool,
}

/// A probe's row as the primary stored it.
#[derive(Debug, Clone)]
pub struct WrittenRow {
    pub id: i64,
    /// The primary's commit-time clock, as PostgreSQL prints a timestamptz.
    pub written_at: String,
}

/// One read of a probe's row on the replica, with the replica's replay state at that moment.
#[derive(Debug, Clone)]
pub struct ReplicaRead {
    /// `written_at` of the row, when the replica already had it.
    pub written_at: Option<String>,
    /// `pg_last_wal_replay_lsn()`; `None` when the server is not in recovery.
    pub replay_lsn: Option<Lsn>,
    /// `clock_timestamp() - pg_last_xact_replay_timestamp()` in ms; `None` before any replay.
    pub replay_timestamp_lag_ms: Option<f64>,
}

/// What the replica says about itself, for readiness.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaState {
    pub in_recovery: bool,
    /// `pg_stat_wal_receiver.status` (e.g. `streaming`), `None` when no WAL receiver runs.
    pub wal_receiver_status: Option<String>,
}

impl ReplicaState {
    pub fn is_streaming(&self) -> bool {
        self.in_recovery && self.wal_receiver_status.as_deref() == Some("streaming")
    }
}

/// Parses a `postgres://` URL into connect options, tagging errors with the database's role.
pub fn connect_options(url: &str, role: Role) -> Result<PgConnectOptions> {
    PgConnectOptions::from_str(url)
        .map(|options| options.application_name("lagprobe"))
        .map_err(|error| Error::DatabaseUrl {
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
            parsed.to_string()
        }
        Err(_) => "<unparsable URL>".to_owned(),
    }
}

fn lsn_column(text: Option<String>) -> Result<Option<Lsn>, sqlx::Error> {
    text.map(|text| text.parse::<Lsn>())
        .transpose()
        .map_err(|error| sqlx::Error::Decode(Box::new(error)))
}

impl Databases {
    /// Pools that connect on first use, so a server can start while a database is down and
    /// report it through readiness instead of refusing to start.
    pub fn connect_lazy(
        primary_url: &str,
        replica_url: &str,
        settings: &PoolSettings,
    ) -> Result<Self> {
        Ok(Databases {
            primary: lazy_pool(primary_url, Role::Primary, settings)?,
            replica: lazy_pool(replica_url, Role::Replica, settings)?,
        })
    }

    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    pub fn replica(&self) -> &PgPool {
        &self.replica
    }

    /// Applies `migrations/` to the primary. Everything lagprobe owns lives in the schema
    /// `lagprobe`, the migration ledger included, so user schemas are never touched.
    pub async fn migrate(&self) -> Result<()> {
        migrate_primary(&self.primary).await
    }

    /// Inserts a probe row on the primary (autocommit: the statement returning means the
    /// COMMIT was acknowledged) and returns it.
    pub async fn insert_probe_row(&self, token: &str) -> Result<WrittenRow> {
        let row = sqlx::query(
            "INSERT INTO lagprobe.probe_write (token) VALUES ($1) RETURNING id, written_at::text",
        )
        .bind(token)
        .fetch_one(&self.primary)
        .await
        .map_err(Error::database(Role::Primary))?;
        Ok(WrittenRow {
            id: row.get(0),
            written_at: row.get(1),
        })
    }

    /// The primary's WAL write position. Taken after a COMMIT returned, it is at or past
    /// that commit's record: a replica replayed up to it shows the write.
    pub async fn primary_wal_lsn(&self) -> Result<Lsn> {
        let text: String = sqlx::query_scalar("SELECT pg_current_wal_lsn()::text")
            .fetch_one(&self.primary)
            .await
            .map_err(Error::database(Role::Primary))?;
        text.parse::<Lsn>()
            .map_err(|error| Error::database(Role::Primary)(sqlx::Error::Decode(Box::new(error))))
    }

    /// Reads a probe row on the replica together with the replica's replay position and
    /// replay-timestamp lag, in one round trip so all three describe the same moment.
    pub async fn read_probe_row_on_replica(&self, token: &str) -> Result<ReplicaRead> {
        let row = sqlx::query(
            "SELECT p.written_at::text, \
                    pg_last_wal_replay_lsn()::text, \
                    (extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp()) \
                        * 1000)::float8 \
             FROM (SELECT 1) AS one \
             LEFT JOIN lagprobe.probe_write p ON p.token = $1",
        )
        .bind(token)
        .fetch_one(&self.replica)
        .await
        .map_err(Error::database(Role::Replica))?;
        Ok(ReplicaRead {
            written_at: row.get(0),
            replay_lsn: lsn_column(row.get(1)).map_err(Error::database(Role::Replica))?,
            replay_timestamp_lag_ms: row.get(2),
        })
    }

    /// Deletes a finished probe's row, and any row a cancelled probe left behind, so the
    /// table never grows without bound.
    pub async fn delete_probe_row(&self, id: i64) -> Result<()> {
        sqlx::query(
            "DELETE FROM lagprobe.probe_write \
             WHERE id = $1 OR written_at < clock_timestamp() - interval '10 minutes'",
        )
        .bind(id)
        .execute(&self.primary)
        .await
        .map_err(Error::database(Role::Primary))?;
        Ok(())
    }

    /// Succeeds when the primary answers a query.
    pub async fn primary_ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.primary)
            .await
            .map_err(Error::database(Role::Primary))?;
        Ok(())
    }

    /// Whether the replica is in recovery and what its WAL receiver is doing.
    pub async fn replica_state(&self) -> Result<ReplicaState> {
        let row = sqlx::query(
            "SELECT pg_is_in_recovery(), (SELECT status FROM pg_stat_wal_receiver LIMIT 1)",
        )
        .fetch_one(&self.replica)
        .await
        .map_err(Error::database(Role::Replica))?;
        Ok(ReplicaState {
            in_recovery: row.get(0),
            wal_receiver_status: row.get(1),
        })
    }
}

/// Runs the migrations against one primary pool (also used by `lagprobe migrate`, which has
/// no replica).
pub async fn migrate_primary(primary: &PgPool) -> Result<()> {
    let mut migrator = sqlx::migrate!("./migrations");
    migrator.create_schema("lagprobe");
    migrator.dangerous_set_table_name("lagprobe._sqlx_migrations");
    migrator.run(primary).await?;
    Ok(())
}

/// A pool that connects on first use; `test_before_acquire` weeds out connections a
/// restarted server has broken, so a replica that comes back is used again.
pub fn lazy_pool(url: &str, role: Role, settings: &PoolSettings) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .test_before_acquire(true)
        .connect_lazy_with(connect_options(url, role)?))
}
