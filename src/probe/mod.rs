//! The probe engine: one probe (write, commit, read back from the replica, wait for
//! visibility), a run of many, and their statistics.
//!
//! A probe judges only its own row (a fresh random token), so any number can run at once
//! without spoiling each other's verdicts. All durations are measured on one monotonic clock
//! from the moment the primary acknowledged the COMMIT. The engine knows nothing of HTTP or
//! gRPC; transports turn its results into their own shapes.

mod run;
mod stats;

pub use run::{RunParams, RunReport, RunSpec};
pub use stats::RunSummary;

use std::time::{Duration, Instant};

use serde::Serialize;

use crate::{
    db::{Databases, ReplicaRead},
    error::{Error, Result},
    lsn::Lsn,
};

/// Limits of one probe's wait for visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Give up waiting for the write to appear on the replica after this long.
    pub visibility_timeout: Duration,
    /// Pause between replica reads while waiting.
    pub poll_interval: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            visibility_timeout: Duration::from_secs(5),
            poll_interval: Duration::from_millis(2),
        }
    }
}

/// The immediate replica read's judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The replica already showed the write.
    Fresh,
    /// The replica did not show the write yet: a read-after-write anomaly.
    Stale,
    /// The replica could not be read.
    ReplicaError,
}

/// Everything one probe saw. Durations are offsets from the acknowledged COMMIT.
#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub token: String,
    /// The primary's commit-time timestamp and the token.
    pub written_value: String,
    /// What the immediate replica read returned (the same text when fresh).
    pub read_value: Option<String>,
    pub verdict: Verdict,
    #[serde(serialize_with = "as_text")]
    pub commit_lsn: Lsn,
    #[serde(serialize_with = "as_optional_text")]
    pub replica_replay_lsn: Option<Lsn>,
    /// `commit_lsn - replica_replay_lsn` at the immediate read.
    pub lsn_gap_bytes: Option<u64>,
    /// The old demo's figure; grows without bound while the primary is idle.
    pub replay_timestamp_lag_ms: Option<f64>,
    #[serde(rename = "write_latency_ms", serialize_with = "as_ms")]
    pub write_latency: Duration,
    #[serde(rename = "read_latency_ms", serialize_with = "as_optional_ms")]
    pub read_latency: Option<Duration>,
    /// Upper bound of commit-to-visible: the first read that showed the row had returned.
    #[serde(rename = "visible_after_ms", serialize_with = "as_optional_ms")]
    pub visible_after: Option<Duration>,
    /// Lower bound of commit-to-visible: the last read that missed the row was sent.
    #[serde(rename = "still_stale_at_ms", serialize_with = "as_optional_ms")]
    pub still_stale_at: Option<Duration>,
    pub visibility_timed_out: bool,
    pub replica_reads: u32,
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

fn as_text<S: serde::Serializer>(lsn: &Lsn, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(lsn)
}

fn as_optional_text<S: serde::Serializer>(
    lsn: &Option<Lsn>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match lsn {
        Some(lsn) => as_text(lsn, serializer),
        None => serializer.serialize_none(),
    }
}

/// Runs probes against a pair of databases.
#[derive(Debug, Clone)]
pub struct ProbeEngine {
    db: Databases,
}

/// A replica read with its send and return times relative to the commit.
struct TimedRead {
    sent_at: Duration,
    returned_at: Duration,
    outcome: Result<ReplicaRead>,
}

fn probe_value(written_at: &str, token: &str) -> String {
    format!("{written_at} {token}")
}

impl ProbeEngine {
    pub fn new(db: Databases) -> Self {
        ProbeEngine { db }
    }

    pub fn databases(&self) -> &Databases {
        &self.db
    }

    async fn timed_read(&self, token: &str, committed: Instant) -> TimedRead {
        let sent_at = committed.elapsed();
        let outcome = self.db.read_probe_row_on_replica(token).await;
        TimedRead {
            sent_at,
            returned_at: committed.elapsed(),
            outcome,
        }
    }

    /// One probe. Fails only when the primary cannot take the write; a replica that cannot
    /// be read is a result ([`Verdict::ReplicaError`]), not an error.
    pub async fn probe(&self, options: &ProbeOptions) -> Result<ProbeResult> {
        let token = uuid::Uuid::new_v4().simple().to_string();
        let write_started = Instant::now();
        let written = self.db.insert_probe_row(&token).await?;
        let committed = Instant::now();
        let write_latency = committed - write_started;

        // The commit LSN comes from a second primary round trip; running it alongside the
        // replica read keeps that read "immediately after commit".
        let (commit_lsn, first) = tokio::join!(
            self.db.primary_wal_lsn(),
            self.timed_read(&token, committed)
        );
        let commit_lsn = commit_lsn?;

        let mut result = ProbeResult {
            written_value: probe_value(&written.written_at, &token),
            token,
            read_value: None,
            verdict: Verdict::ReplicaError,
            commit_lsn,
            replica_replay_lsn: None,
            lsn_gap_bytes: None,
            replay_timestamp_lag_ms: None,
            write_latency,
            read_latency: None,
            visible_after: None,
            still_stale_at: None,
            visibility_timed_out: false,
            replica_reads: 1,
            error: None,
        };

        match first.outcome {
            Err(error) => result.error = Some(error.to_string()),
            Ok(read) => {
                result.read_latency = Some(first.returned_at - first.sent_at);
                result.replica_replay_lsn = read.replay_lsn;
                result.lsn_gap_bytes = read.replay_lsn.map(|replay| commit_lsn.bytes_after(replay));
                result.replay_timestamp_lag_ms = read.replay_timestamp_lag_ms;
                match read.written_at {
                    Some(written_at) => {
                        result.verdict = Verdict::Fresh;
                        result.read_value = Some(probe_value(&written_at, &result.token));
                        result.visible_after = Some(first.returned_at);
                    }
                    None => {
                        result.verdict = Verdict::Stale;
                        result.still_stale_at = Some(first.sent_at);
                        self.wait_until_visible(options, committed, &mut result)
                            .await;
                    }
                }
            }
        }

        if let Err(error) = self.db.delete_probe_row(written.id).await {
            tracing::warn!(%error, "could not delete a finished probe's row; a later probe prunes it");
        }
        Ok(result)
    }

    /// Polls the replica until the row shows up or the timeout passes, bracketing the
    /// moment it became visible between the last miss and the first hit.
    async fn wait_until_visible(
        &self,
        options: &ProbeOptions,
        committed: Instant,
        result: &mut ProbeResult,
    ) {
        loop {
            if committed.elapsed() >= options.visibility_timeout {
                result.visibility_timed_out = true;
                return;
            }
            tokio::time::sleep(options.poll_interval).await;
            let read = self.timed_read(&result.token, committed).await;
            result.replica_reads += 1;
            match read.outcome {
                Err(error) => {
                    result.error = Some(format!("while waiting for visibility: {error}"));
                    return;
                }
                Ok(ReplicaRead {
                    written_at: Some(_),
                    ..
                }) => {
                    result.visible_after = Some(read.returned_at);
                    return;
                }
                Ok(_) => result.still_stale_at = Some(read.sent_at),
            }
        }
    }
}

impl ProbeOptions {
    /// Checks and converts caller input (milliseconds; `None` means the default).
    pub fn from_millis(
        visibility_timeout_ms: Option<u64>,
        poll_interval_ms: Option<u64>,
    ) -> Result<Self> {
        let defaults = ProbeOptions::default();
        Ok(ProbeOptions {
            visibility_timeout: checked_millis(
                "visibility_timeout_ms",
                visibility_timeout_ms,
                1..=60_000,
                defaults.visibility_timeout,
            )?,
            poll_interval: checked_millis(
                "poll_interval_ms",
                poll_interval_ms,
                1..=1_000,
                defaults.poll_interval,
            )?,
        })
    }
}

/// `value` as a Duration if it lies in `range`, `default` when absent.
pub(crate) fn checked_millis(
    field: &'static str,
    value: Option<u64>,
    range: std::ops::RangeInclusive<u64>,
    default: Duration,
) -> Result<Duration> {
    match value {
        None => Ok(default),
        Some(ms) if range.contains(&ms) => Ok(Duration::from_millis(ms)),
        Some(ms) => Err(Error::invalid(
            field,
            format!("{ms} is out of range {}..={}", range.start(), range.end()),
        )),
    }
}
