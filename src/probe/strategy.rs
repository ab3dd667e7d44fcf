//! Read-your-writes strategies: each decides where a read goes after a write, and how it
//! makes sure the read sees that write.
//!
//! | strategy | read goes to | anchors |
//! |---|---|---|
//! | `replica` | the replica, always (the baseline, stale under lag) | the old demo |
//! | `primary` | the primary, always | |
//! | `pin-window` | the primary for W ms after the client's last write, else the replica | Rails `database_selector`, django-multidb-router |
//! | `lsn-wait` | the replica once it has replayed the write's LSN; the primary after a timeout | MaxScale `causal_reads=local`, GitLab |
//! | `lsn-route` | the replica if it has replayed the LSN already, else the primary | MaxScale `causal_reads=fast` |
//! | `remote-apply` | the replica; the write's COMMIT waited for the standby to apply it | `synchronous_commit = remote_apply` |

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{
    db::{Databases, DbError, Replica, ReplicaRead, RowSeen, WaitOutcome},
    lsn::Lsn,
    settings::{self, Strategy},
};

/// Settings of the strategies that have any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrategySettings {
    /// pin-window: reads stay on the primary this long after a write.
    pub pin_window: Duration,
    /// lsn-wait: give up waiting on the replica and read the primary after this long.
    pub lsn_wait_timeout: Duration,
    /// lsn-wait: pause between replay-position checks.
    pub lsn_poll_interval: Duration,
}

impl Default for StrategySettings {
    fn default() -> Self {
        StrategySettings {
            pin_window: settings::PIN_WINDOW_MS.default_duration(),
            lsn_wait_timeout: settings::LSN_WAIT_TIMEOUT_MS.default_duration(),
            lsn_poll_interval: settings::POLL_INTERVAL_MS.default_duration(),
        }
    }
}

/// Which server answered a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServedBy {
    Replica,
    Primary,
    /// The primary, after waiting on the replica timed out.
    Fallback,
}

/// How lsn-wait waited for the replica's replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitMethod {
    /// One server-side `WAIT FOR LSN` (PostgreSQL 19 and later).
    WaitForLsn,
    /// `pg_last_wal_replay_lsn()` every poll interval.
    Poll,
}

impl WaitMethod {
    pub fn name(self) -> &'static str {
        match self {
            WaitMethod::WaitForLsn => "wait_for_lsn",
            WaitMethod::Poll => "poll",
        }
    }
}

/// What a strategy knows about the caller's writes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadContext {
    /// The caller's last write position (a consistency token).
    pub min_lsn: Option<Lsn>,
    /// When the caller last wrote (pin-window).
    pub last_write: Option<Instant>,
}

/// A read as a strategy served it.
#[derive(Debug, Clone)]
pub struct RoutedRead {
    pub served_by: ServedBy,
    /// The primary's answer, when the primary served the read.
    pub primary_row: Option<RowSeen>,
    /// The replica read's full answer, when the replica served the read.
    pub replica_read: Option<ReplicaRead>,
    /// Time spent waiting for the replica's replay position (lsn-wait).
    pub waited: Option<Duration>,
    /// How lsn-wait waited.
    pub wait_method: Option<WaitMethod>,
    /// When the replica read that served it was sent, if one did.
    pub replica_read_sent: Option<Instant>,
}

impl RoutedRead {
    /// The row the read found, from whichever server answered.
    pub fn row(&self) -> Option<&RowSeen> {
        match &self.replica_read {
            Some(read) => read.row.as_ref(),
            None => self.primary_row.as_ref(),
        }
    }
}

/// Reads `token` where `strategy` says, on `replica` when it says replica. A replica that
/// cannot be reached is an error, whatever the strategy: the point is to see it.
pub(crate) async fn routed_read(
    db: &Databases,
    replica: &Replica,
    strategy: Strategy,
    settings: &StrategySettings,
    context: ReadContext,
    token: &str,
) -> Result<RoutedRead, DbError> {
    let pinned = || {
        context
            .last_write
            .is_some_and(|wrote| wrote.elapsed() < settings.pin_window)
    };
    match (strategy, context.min_lsn) {
        (Strategy::Primary, _) => from_primary(db, token, ServedBy::Primary, None).await,
        (Strategy::PinWindow, _) if pinned() => {
            from_primary(db, token, ServedBy::Primary, None).await
        }
        (Strategy::LsnRoute, Some(min_lsn)) if !replayed(db, replica, min_lsn).await? => {
            from_primary(db, token, ServedBy::Primary, None).await
        }
        (Strategy::LsnWait, Some(min_lsn)) => {
            wait_then_read(db, replica, settings, min_lsn, token).await
        }
        _ => from_replica(db, replica, token, None).await,
    }
}

/// lsn-wait: waits until the replica has replayed `min_lsn`, then reads there; past the
/// timeout (or if the replica was promoted meanwhile), reads the primary and says it fell
/// back. On PostgreSQL 19 and later the replica waits itself (`WAIT FOR LSN`, the timeout
/// as its TIMEOUT); before, lagprobe polls the replay position.
async fn wait_then_read(
    db: &Databases,
    replica: &Replica,
    settings: &StrategySettings,
    min_lsn: Lsn,
    token: &str,
) -> Result<RoutedRead, DbError> {
    let started = Instant::now();
    let (replayed, method) = match db
        .wait_for_lsn(replica, min_lsn, settings.lsn_wait_timeout)
        .await?
    {
        Some(outcome) => (outcome == WaitOutcome::Replayed, WaitMethod::WaitForLsn),
        None => (
            poll_until_replayed(db, replica, settings, min_lsn, started).await?,
            WaitMethod::Poll,
        ),
    };
    let waited = Some(started.elapsed());
    let mut read = if replayed {
        from_replica(db, replica, token, waited).await?
    } else {
        from_primary(db, token, ServedBy::Fallback, waited).await?
    };
    read.wait_method = Some(method);
    Ok(read)
}

/// Whether the replica replayed `min_lsn` before the timeout, checked every poll interval.
async fn poll_until_replayed(
    db: &Databases,
    replica: &Replica,
    settings: &StrategySettings,
    min_lsn: Lsn,
    started: Instant,
) -> Result<bool, DbError> {
    loop {
        if replayed(db, replica, min_lsn).await? {
            return Ok(true);
        }
        if started.elapsed() >= settings.lsn_wait_timeout {
            return Ok(false);
        }
        tokio::time::sleep(settings.lsn_poll_interval).await;
    }
}

async fn replayed(db: &Databases, replica: &Replica, min_lsn: Lsn) -> Result<bool, DbError> {
    Ok(db
        .replay_lsn(replica)
        .await?
        .is_some_and(|replayed| replayed >= min_lsn))
}

async fn from_primary(
    db: &Databases,
    token: &str,
    served_by: ServedBy,
    waited: Option<Duration>,
) -> Result<RoutedRead, DbError> {
    Ok(RoutedRead {
        served_by,
        primary_row: db.read_on_primary(token).await?,
        replica_read: None,
        waited,
        wait_method: None,
        replica_read_sent: None,
    })
}

async fn from_replica(
    db: &Databases,
    replica: &Replica,
    token: &str,
    waited: Option<Duration>,
) -> Result<RoutedRead, DbError> {
    let sent = Instant::now();
    let read = db.read_on_replica(replica, token).await?;
    Ok(RoutedRead {
        served_by: ServedBy::Replica,
        primary_row: None,
        replica_read: Some(read),
        waited,
        wait_method: None,
        replica_read_sent: Some(sent),
    })
}
