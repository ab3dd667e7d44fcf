//! Replication lag by every method lagprobe knows, side by side, each with its bias named.
//! No single number is "the lag": each method is blind somewhere, and showing them together
//! is what lets a user see which one their monitoring is fooled by.

use serde::Serialize;

use crate::{
    db::{CommitPosition, Databases, ReplicaRead, StandbyStats},
    error::Result,
    lsn::Lsn,
};

/// Lag at one moment, by method. `None` where a method gave nothing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LagMeasures {
    pub lsn_gap_bytes: Option<u64>,
    pub replay_timestamp_lag_ms: Option<f64>,
    pub receive_replay_gap_bytes: Option<u64>,
    pub heartbeat_lag_ms: Option<f64>,
    pub stat_write_lag_ms: Option<f64>,
    pub stat_flush_lag_ms: Option<f64>,
    pub stat_replay_lag_ms: Option<f64>,
}

/// What each [`LagMeasures`] field measures, and how it is biased.
pub const METHODS: [(&str, &str); 7] = [
    (
        "lsn_gap_bytes",
        "primary WAL position minus the replica's pg_last_wal_replay_lsn(), bytes: exact for \
         'has my write arrived'; bytes, not time; 0 when idle",
    ),
    (
        "replay_timestamp_lag_ms",
        "replica now() - pg_last_xact_replay_timestamp(): grows without bound while the primary \
         is idle (the old demo's figure); needs the two clocks to agree",
    ),
    (
        "receive_replay_gap_bytes",
        "replica pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn(): blind to WAL still on the \
         network, which is exactly the injected-delay case (postgres_exporter reports this)",
    ),
    (
        "heartbeat_lag_ms",
        "primary clock now minus the newest heartbeat row visible on the replica: true data lag, \
         at the heartbeat's resolution (--heartbeat-ms); primary clock on both sides",
    ),
    (
        "stat_write_lag_ms",
        "pg_stat_replication.write_lag on the primary: includes the standby reply's return trip \
         (about 2x a one-way delay when both directions are delayed); NULL when idle",
    ),
    (
        "stat_flush_lag_ms",
        "pg_stat_replication.flush_lag: as write_lag, up to the standby's flush",
    ),
    (
        "stat_replay_lag_ms",
        "pg_stat_replication.replay_lag: as write_lag, up to the standby's replay",
    ),
];

impl LagMeasures {
    /// Combines the primary's view at commit with a replica read. `primary_now_ms` is the
    /// primary's clock at the moment of the replica read (ms since the epoch).
    pub fn from_reads(
        reference_lsn: Lsn,
        position: Option<&CommitPosition>,
        read: &ReplicaRead,
        primary_now_ms: f64,
    ) -> Self {
        LagMeasures {
            lsn_gap_bytes: read
                .replay_lsn
                .map(|replay| reference_lsn.bytes_after(replay)),
            replay_timestamp_lag_ms: read.replay_timestamp_lag_ms,
            receive_replay_gap_bytes: match (read.receive_lsn, read.replay_lsn) {
                (Some(received), Some(replayed)) => Some(received.bytes_after(replayed)),
                _ => None,
            },
            heartbeat_lag_ms: read
                .heartbeat_epoch_ms
                .map(|beat| (primary_now_ms - beat).max(0.0)),
            stat_write_lag_ms: position.and_then(|p| p.stat_write_lag_ms),
            stat_flush_lag_ms: position.and_then(|p| p.stat_flush_lag_ms),
            stat_replay_lag_ms: position.and_then(|p| p.stat_replay_lag_ms),
        }
    }
}

/// One replica's current lag.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicaLag {
    pub replica: String,
    pub lag: LagMeasures,
    pub error: Option<String>,
}

/// Current lag of every replica.
#[derive(Debug, Clone, Serialize)]
pub struct LagReport {
    pub primary_lsn: Lsn,
    pub replicas: Vec<ReplicaLag>,
    /// Field name -> what it measures and its bias.
    pub methods: std::collections::BTreeMap<&'static str, &'static str>,
}

/// Measures every replica now. The primary must answer; a replica that does not is
/// reported with its error.
pub async fn current_lag(db: &Databases) -> Result<LagReport> {
    let ((primary_lsn, primary_now_ms), standbys) =
        tokio::try_join!(db.primary_now(), db.standbys())?;
    let mut replicas = Vec::new();
    for replica in db.replicas().iter() {
        let measured = async {
            let standby = db.standby_name(replica).await?;
            let read = db.read_on_replica(replica, "").await?;
            Ok::<_, crate::Error>((standby, read))
        }
        .await;
        replicas.push(match measured {
            Ok((standby, read)) => {
                let stats: Option<&StandbyStats> =
                    standbys.iter().find(|s| s.application_name == standby);
                let position = stats.map(|stats| CommitPosition {
                    wal_lsn: primary_lsn,
                    stat_write_lag_ms: stats.write_lag_ms,
                    stat_flush_lag_ms: stats.flush_lag_ms,
                    stat_replay_lag_ms: stats.replay_lag_ms,
                });
                ReplicaLag {
                    replica: replica.name.clone(),
                    lag: LagMeasures::from_reads(
                        primary_lsn,
                        position.as_ref(),
                        &read,
                        primary_now_ms,
                    ),
                    error: None,
                }
            }
            Err(error) => ReplicaLag {
                replica: replica.name.clone(),
                lag: LagMeasures::default(),
                error: Some(error.to_string()),
            },
        });
    }
    Ok(LagReport {
        primary_lsn,
        replicas,
        methods: METHODS.into_iter().collect(),
    })
}
