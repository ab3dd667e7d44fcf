//! The probe engine: one probe (write, commit, read back where a strategy says, wait for
//! visibility on the replica), runs and comparisons of many, a stream of them, their
//! statistics, and lag by every method.
//!
//! A probe judges only its own row (a fresh random token), so any number can run at once
//! without spoiling each other's verdicts. All durations are measured on one monotonic clock
//! from the moment the primary acknowledged the COMMIT. The engine knows nothing of HTTP or
//! gRPC; transports turn its results into their own shapes.

mod acked;
mod history;
mod lag;
mod metrics;
mod run;
mod stats;
mod strategy;

pub use history::ProbeHistory;
pub use lag::{LagMeasures, LagReport, ReplicaLag};
pub use metrics::{BUCKETS_SECONDS, Histogram, MetricsSnapshot};
pub use run::{CompareReport, CompareSpec, RunReport, RunSpec, StrategyReport, WatchSpec};
pub use stats::{
    Percentiles, ReplicaSummary, RunSummary, VISIBILITY_CURVE_MS, VisibilityPoint, markdown_table,
    visibility_steps, wilson_interval_95,
};
pub use strategy::{ReadContext, ServedBy, StrategySettings, WaitMethod};

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    db::{CommitPosition, Databases, DbError, Replica, ReplicaRead},
    error::Result,
    lsn::Lsn,
    settings::{self, ACKED_WRITES_MAX_AGE, Strategy},
};
use acked::AckedWrites;
pub use acked::{AckedWrite, LostWrites};
use strategy::RoutedRead;

/// How one probe reads and how long it waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Give up waiting for the write to appear on the replica after this long.
    pub visibility_timeout: Duration,
    /// Pause between replica reads while waiting.
    pub poll_interval: Duration,
    /// Where the read-back goes.
    pub strategy: Strategy,
    pub strategy_settings: StrategySettings,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            visibility_timeout: settings::VISIBILITY_TIMEOUT_MS.default_duration(),
            poll_interval: settings::POLL_INTERVAL_MS.default_duration(),
            strategy: Strategy::Replica,
            strategy_settings: StrategySettings::default(),
        }
    }
}

/// The read-back's judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The read saw the write.
    Fresh,
    /// The read did not see the write: a read-after-write anomaly.
    Stale,
    /// The replica could not be read.
    ReplicaError,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Fresh => "fresh",
            Verdict::Stale => "stale",
            Verdict::ReplicaError => "replica_error",
        }
    }
}

/// Everything one probe saw. Durations are offsets from the acknowledged COMMIT.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub token: String,
    pub strategy: Strategy,
    /// The replica this probe read and measured.
    pub replica: String,
    /// The primary's commit-time timestamp and the token.
    pub written_value: String,
    /// What the strategy's read returned (the same text when fresh).
    pub read_value: Option<String>,
    pub verdict: Verdict,
    /// Which server answered the strategy's read; `None` when it failed.
    pub served_by: Option<ServedBy>,
    pub commit_lsn: Lsn,
    pub replica_replay_lsn: Option<Lsn>,
    /// `commit_lsn - replica_replay_lsn` at the first replica read.
    pub lsn_gap_bytes: Option<u64>,
    /// The old demo's figure; grows without bound while the primary is idle.
    pub replay_timestamp_lag_ms: Option<f64>,
    #[serde(rename = "write_latency_ms", serialize_with = "as_ms")]
    pub write_latency: Duration,
    /// From the acknowledged COMMIT to the strategy's read returning.
    #[serde(rename = "read_latency_ms", serialize_with = "as_optional_ms")]
    pub read_latency: Option<Duration>,
    /// lsn-wait's wait for the replica's replay position.
    #[serde(rename = "waited_ms", serialize_with = "as_optional_ms")]
    pub waited: Option<Duration>,
    /// How lsn-wait waited (`wait_for_lsn` on PostgreSQL 19 and later, else `poll`).
    pub wait_method: Option<WaitMethod>,
    /// Upper bound of commit-to-visible: the first replica read that showed the row had returned.
    #[serde(rename = "visible_after_ms", serialize_with = "as_optional_ms")]
    pub visible_after: Option<Duration>,
    /// Lower bound of commit-to-visible: the last replica read that missed the row was sent.
    #[serde(rename = "still_stale_at_ms", serialize_with = "as_optional_ms")]
    pub still_stale_at: Option<Duration>,
    /// `visible_after - still_stale_at`: how exactly the moment of visibility is known.
    #[serde(rename = "visibility_resolution_ms", serialize_with = "as_optional_ms")]
    pub visibility_resolution: Option<Duration>,
    pub visibility_timed_out: bool,
    pub replica_reads: u32,
    /// remote-apply: whether the COMMIT had a synchronous standby to wait for.
    pub remote_apply_effective: Option<bool>,
    /// Lag by every method at the first replica read.
    pub lag: LagMeasures,
    pub error: Option<String>,
}

/// Milliseconds with microsecond precision, the unit every report uses.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn as_ms<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(millis(*duration))
}

fn as_optional_ms<S: serde::Serializer>(
    duration: &Option<Duration>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match duration {
        Some(duration) => as_ms(duration, serializer),
        None => serializer.serialize_none(),
    }
}

/// A value written through [`ProbeEngine::write_value`].
#[derive(Debug, Clone, Serialize)]
pub struct WriteOutcome {
    pub key: String,
    /// The consistency token.
    pub commit_lsn: Lsn,
    #[serde(rename = "write_latency_ms", serialize_with = "as_ms")]
    pub write_latency: Duration,
}

/// A read through [`ProbeEngine::read_value`].
#[derive(Debug, Clone, Serialize)]
pub struct ReadOutcome {
    pub found: bool,
    pub value: Option<String>,
    pub served_by: ServedBy,
    pub replica: String,
    #[serde(rename = "waited_ms", serialize_with = "as_ms")]
    pub waited: Duration,
    #[serde(rename = "read_latency_ms", serialize_with = "as_ms")]
    pub read_latency: Duration,
}

/// Runs probes against a primary and its replicas.
#[derive(Debug, Clone)]
pub struct ProbeEngine {
    db: Databases,
    next_replica: Arc<AtomicUsize>,
    metrics: Arc<metrics::ProbeMetrics>,
    acked: Arc<AckedWrites>,
    history: Arc<ProbeHistory>,
}

/// A replica read with its send and return times relative to the commit.
struct TimedRead {
    sent_at: Duration,
    returned_at: Duration,
    outcome: Result<ReplicaRead, DbError>,
}

/// The write side of one probe: when the primary acknowledged the COMMIT, where the commit
/// sits in the WAL, and the row it wrote.
struct ProbeWrite {
    committed: Instant,
    position: CommitPosition,
    written: crate::db::WrittenRow,
}

/// A probe's result before its read is judged: what was written, nothing read yet.
fn unjudged_result(
    token: String,
    strategy: Strategy,
    replica: &Replica,
    write: &ProbeWrite,
    write_latency: Duration,
) -> ProbeResult {
    ProbeResult {
        written_value: probe_value(&write.written.written_at, &token),
        token,
        strategy,
        replica: replica.name.clone(),
        read_value: None,
        verdict: Verdict::ReplicaError,
        served_by: None,
        commit_lsn: write.position.wal_lsn,
        replica_replay_lsn: None,
        lsn_gap_bytes: None,
        replay_timestamp_lag_ms: None,
        write_latency,
        read_latency: None,
        waited: None,
        wait_method: None,
        visible_after: None,
        still_stale_at: None,
        visibility_resolution: None,
        visibility_timed_out: false,
        replica_reads: 0,
        remote_apply_effective: write.written.remote_apply_effective,
        lag: LagMeasures::default(),
        error: None,
    }
}

/// Lag by every method from the probe's first replica read, sent `sent_at` after the commit.
fn record_first_read(
    result: &mut ProbeResult,
    write: &ProbeWrite,
    replica_read: &ReplicaRead,
    sent_at: Duration,
) {
    let primary_now_ms = write.written.written_at_epoch_ms + millis(sent_at);
    result.lag = LagMeasures::from_reads(
        write.position.wal_lsn,
        Some(&write.position),
        replica_read,
        primary_now_ms,
    );
    result.replica_replay_lsn = replica_read.replay_lsn;
    result.lsn_gap_bytes = result.lag.lsn_gap_bytes;
    result.replay_timestamp_lag_ms = replica_read.replay_timestamp_lag_ms;
}

fn probe_value(written_at: &str, token: &str) -> String {
    format!("{written_at} {token}")
}

impl ProbeEngine {
    pub fn new(db: Databases) -> Self {
        ProbeEngine {
            db,
            next_replica: Arc::default(),
            metrics: Arc::default(),
            acked: Arc::default(),
            history: Arc::new(ProbeHistory::new(settings::PROBE_HISTORY.default as usize)),
        }
    }

    /// The same engine keeping the last `capacity` probes instead (0: none).
    pub fn with_history(mut self, capacity: usize) -> Self {
        self.history = Arc::new(ProbeHistory::new(capacity));
        self
    }

    /// The last probes, oldest first.
    pub fn history(&self) -> &ProbeHistory {
        &self.history
    }

    pub fn databases(&self) -> &Databases {
        &self.db
    }

    pub fn metrics(&self) -> &metrics::ProbeMetrics {
        &self.metrics
    }

    /// Probes spread over the replicas in turn, as a load balancer would.
    fn pick_replica(&self) -> Result<Replica, DbError> {
        let replicas = self.db.replicas();
        if replicas.is_empty() {
            return Err(DbError::NoReplica);
        }
        let turn = self.next_replica.fetch_add(1, Ordering::Relaxed) % replicas.len();
        Ok(replicas[turn].clone())
    }

    /// The writes the primary acknowledged, oldest first, within the window.
    pub fn acked_writes(&self) -> Vec<AckedWrite> {
        self.acked.snapshot()
    }

    /// Reads `acknowledged` back from the primary (after a failover: the new one) and
    /// counts the writes it does not have.
    pub async fn lost_writes(&self, acknowledged: &[AckedWrite]) -> Result<LostWrites> {
        let tokens: Vec<String> = acknowledged.iter().map(|w| w.token.clone()).collect();
        let present = self.db.tokens_present(&tokens).await?;
        Ok(LostWrites::count(acknowledged, &present))
    }

    async fn timed_read(&self, replica: &Replica, token: &str, committed: Instant) -> TimedRead {
        let sent_at = committed.elapsed();
        let outcome = self.db.read_on_replica(replica, token).await;
        TimedRead {
            sent_at,
            returned_at: committed.elapsed(),
            outcome,
        }
    }

    /// Current lag of every replica, by every method.
    pub async fn lag(&self) -> Result<LagReport> {
        lag::current_lag(&self.db).await
    }

    /// One probe. Fails only when the primary cannot take the write or answer; a replica
    /// that cannot be read is a result ([`Verdict::ReplicaError`]), not an error.
    pub async fn probe(&self, options: &ProbeOptions) -> Result<ProbeResult> {
        let replica = &self.pick_replica()?;
        // Learnt from the replica after its first good read (in `finish`), never waited for
        // here: a replica that is down must not delay the write.
        let standby = self.db.known_standby_name(replica);
        let token = uuid::Uuid::new_v4().simple().to_string();
        let remote_apply =
            (options.strategy == Strategy::RemoteApply).then_some(standby.as_deref());

        let write_started = Instant::now();
        let written = self.db.write_row(&token, None, remote_apply).await?;
        let committed = Instant::now();
        let write_latency = committed - write_started;
        self.acked.record(&token, written.written_at_epoch_ms, true);

        let (position, routed) = self
            .read_after_commit(replica, options, standby.as_deref(), &token, committed)
            .await?;
        self.acked.set_commit_lsn(&token, position.wal_lsn);
        let read_returned = committed.elapsed();
        let write = ProbeWrite {
            committed,
            position,
            written,
        };
        let mut result = unjudged_result(token, options.strategy, replica, &write, write_latency);

        match routed {
            Err(error) if error.is_primary_unavailable() => return Err(error.into()),
            Err(error) => {
                result.replica_reads = 1;
                result.error = Some(error.to_string());
            }
            Ok(routed) => {
                self.judge(&mut result, &routed, read_returned);
                let first = self
                    .first_read(replica, routed, read_returned, committed, &result.token)
                    .await;
                self.measure_visibility(replica, options, &write, first, &mut result)
                    .await;
            }
        }
        self.finish(replica, standby.as_deref(), &mut result).await;
        Ok(result)
    }

    /// The strategy's read-back and the commit's position in the WAL. LSN strategies need
    /// the position before they read; the others read at once and fetch it alongside, so
    /// their read stays "immediately after commit".
    async fn read_after_commit(
        &self,
        replica: &Replica,
        options: &ProbeOptions,
        standby: Option<&str>,
        token: &str,
        committed: Instant,
    ) -> Result<(CommitPosition, Result<RoutedRead, DbError>)> {
        let mut context = ReadContext {
            min_lsn: None,
            last_write: Some(committed),
        };
        let read_back = |context| {
            strategy::routed_read(
                &self.db,
                replica,
                options.strategy,
                &options.strategy_settings,
                context,
                token,
            )
        };
        if matches!(options.strategy, Strategy::LsnWait | Strategy::LsnRoute) {
            let position = self.db.commit_position(standby).await?;
            context.min_lsn = Some(position.wal_lsn);
            Ok((position, read_back(context).await))
        } else {
            let (position, routed) =
                tokio::join!(self.db.commit_position(standby), read_back(context));
            Ok((position?, routed))
        }
    }

    fn judge(&self, result: &mut ProbeResult, routed: &RoutedRead, read_returned: Duration) {
        result.served_by = Some(routed.served_by);
        result.read_latency = Some(read_returned);
        result.waited = routed.waited;
        result.wait_method = routed.wait_method;
        match routed.row() {
            Some(row) => {
                result.verdict = Verdict::Fresh;
                result.read_value = Some(probe_value(&row.written_at, &result.token));
            }
            None => result.verdict = Verdict::Stale,
        }
    }

    /// The replica read that opens the visibility bracket: the strategy's own when it read
    /// the replica, a new one otherwise.
    async fn first_read(
        &self,
        replica: &Replica,
        routed: RoutedRead,
        read_returned: Duration,
        committed: Instant,
        token: &str,
    ) -> TimedRead {
        match (routed.replica_read, routed.replica_read_sent) {
            (Some(read), Some(sent)) => TimedRead {
                sent_at: sent.saturating_duration_since(committed),
                returned_at: read_returned,
                outcome: Ok(read),
            },
            _ => self.timed_read(replica, token, committed).await,
        }
    }

    /// Records lag from the first replica read, then polls the replica until the row shows
    /// up or the timeout passes, bracketing the moment it became visible between the last
    /// miss and the first hit.
    async fn measure_visibility(
        &self,
        replica: &Replica,
        options: &ProbeOptions,
        write: &ProbeWrite,
        first: TimedRead,
        result: &mut ProbeResult,
    ) {
        let mut read = first;
        loop {
            result.replica_reads += 1;
            match read.outcome {
                Err(error) => {
                    result.error = Some(if result.replica_reads == 1 {
                        error.to_string()
                    } else {
                        format!("while waiting for visibility: {error}")
                    });
                    return;
                }
                Ok(replica_read) => {
                    if result.replica_reads == 1 {
                        record_first_read(result, write, &replica_read, read.sent_at);
                    }
                    if replica_read.row.is_some() {
                        result.visible_after = Some(read.returned_at);
                        return;
                    }
                    result.still_stale_at = Some(read.sent_at);
                }
            }
            if write.committed.elapsed() >= options.visibility_timeout {
                result.visibility_timed_out = true;
                return;
            }
            tokio::time::sleep(options.poll_interval).await;
            read = self
                .timed_read(replica, &result.token, write.committed)
                .await;
        }
    }

    /// After the reads: learns the replica's standby name if it was not known and the probe
    /// saw no error, closes the visibility bracket, deletes the rows the acknowledged-writes
    /// window has let go of, and counts the probe.
    async fn finish(&self, replica: &Replica, standby: Option<&str>, result: &mut ProbeResult) {
        if standby.is_none() && result.error.is_none() {
            let _ = self.db.standby_name(replica).await;
        }
        result.visibility_resolution = result
            .visible_after
            .zip(result.still_stale_at)
            .map(|(after, before)| after.saturating_sub(before));
        if let Some(tokens) = self.acked.take_expired_batch()
            && let Err(error) = self
                .db
                .delete_probe_rows(&tokens, ACKED_WRITES_MAX_AGE)
                .await
        {
            tracing::warn!(%error, "could not delete old probe rows; a later batch sweeps them by age");
        }
        self.metrics.record(result);
        self.history.record(result);
    }

    /// Writes `value` on the primary; the result's commit LSN is the consistency token.
    pub async fn write_value(&self, value: &str) -> Result<WriteOutcome> {
        let key = uuid::Uuid::new_v4().simple().to_string();
        let started = Instant::now();
        let written = self.db.write_row(&key, Some(value), None).await?;
        let write_latency = started.elapsed();
        self.acked.record(&key, written.written_at_epoch_ms, false);
        let position = self.db.commit_position(None).await?;
        self.acked.set_commit_lsn(&key, position.wal_lsn);
        Ok(WriteOutcome {
            key,
            commit_lsn: position.wal_lsn,
            write_latency,
        })
    }

    /// Reads a key written with [`ProbeEngine::write_value`] where `strategy` says.
    pub async fn read_value(
        &self,
        key: &str,
        strategy: Strategy,
        settings: &StrategySettings,
        context: ReadContext,
    ) -> Result<ReadOutcome> {
        let replica = &self.pick_replica()?;
        let started = Instant::now();
        let routed =
            strategy::routed_read(&self.db, replica, strategy, settings, context, key).await?;
        let row = routed.row();
        Ok(ReadOutcome {
            found: row.is_some(),
            value: row.and_then(|row| row.value.clone()),
            served_by: routed.served_by,
            replica: replica.name.clone(),
            waited: routed.waited.unwrap_or_default(),
            read_latency: started.elapsed(),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stale replica-strategy probe that saw its row 1003 ms after the commit, for the
    /// unit tests of what consumes results (the history, the `/test/` page).
    pub(crate) fn probe_with_token(token: &str) -> ProbeResult {
        ProbeResult {
            token: token.into(),
            strategy: Strategy::Replica,
            replica: "replica1".into(),
            written_value: format!("2026-01-01 00:00:00+00 {token}"),
            read_value: None,
            verdict: Verdict::Stale,
            served_by: Some(ServedBy::Replica),
            commit_lsn: Lsn(2),
            replica_replay_lsn: Some(Lsn(1)),
            lsn_gap_bytes: Some(1),
            replay_timestamp_lag_ms: None,
            write_latency: Duration::from_millis(1),
            read_latency: Some(Duration::from_millis(1)),
            waited: None,
            wait_method: None,
            visible_after: Some(Duration::from_millis(1003)),
            still_stale_at: Some(Duration::from_millis(1000)),
            visibility_resolution: Some(Duration::from_millis(3)),
            visibility_timed_out: false,
            replica_reads: 3,
            remote_apply_effective: None,
            lag: LagMeasures::default(),
            error: None,
        }
    }
}
