//! The writes the primary acknowledged, remembered for a bounded window, so that after a
//! failover lagprobe can say which of them the new primary does not have: asynchronous
//! replication's lost commits, counted one by one.
//!
//! A probe's row stays in the table while its write is in the window (it is the evidence
//! the count reads back) and is deleted, in batches, once the window lets go of it.
//! Writes are known by their token, never their id: a promoted replica's identity sequence
//! may hand out again the ids of commits it never received.

use std::{collections::VecDeque, sync::Mutex, time::Instant};

use serde::Serialize;

use crate::{lsn::Lsn, settings};

/// Probe rows deleted together once the window has let go of them.
const DELETE_BATCH: usize = 64;

/// One acknowledged write.
#[derive(Debug, Clone, Serialize)]
pub struct AckedWrite {
    pub token: String,
    /// The primary's clock at the write, in ms since the Unix epoch.
    pub written_at_epoch_ms: f64,
    /// Where its commit sits in the WAL, once the probe has learnt it.
    pub commit_lsn: Option<Lsn>,
    /// A probe's row (deleted once out of the window), not a value written through the API.
    #[serde(skip)]
    pub probe: bool,
    #[serde(skip)]
    recorded: Instant,
}

#[derive(Debug, Default)]
struct Window {
    writes: VecDeque<AckedWrite>,
    /// Probe rows out of the window, waiting for their batched delete.
    expired_probe_tokens: Vec<String>,
}

/// The window: at most [`settings::ACKED_WRITES`] writes, none older than
/// [`settings::ACKED_WRITES_MAX_AGE`].
#[derive(Debug, Default)]
pub struct AckedWrites {
    window: Mutex<Window>,
}

impl AckedWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers a write the primary acknowledged.
    pub fn record(&self, token: &str, written_at_epoch_ms: f64, probe: bool) {
        let mut window = self.lock();
        window.writes.push_back(AckedWrite {
            token: token.to_owned(),
            written_at_epoch_ms,
            commit_lsn: None,
            probe,
            recorded: Instant::now(),
        });
        window.expire(Instant::now());
    }

    /// Adds the commit position of a write recorded before (searched from the newest).
    pub fn set_commit_lsn(&self, token: &str, commit_lsn: Lsn) {
        let mut window = self.lock();
        if let Some(write) = window.writes.iter_mut().rev().find(|w| w.token == token) {
            write.commit_lsn = Some(commit_lsn);
        }
    }

    /// Probe rows to delete now: a batch, once enough have left the window.
    pub fn take_expired_batch(&self) -> Option<Vec<String>> {
        let mut window = self.lock();
        window.expire(Instant::now());
        (window.expired_probe_tokens.len() >= DELETE_BATCH)
            .then(|| std::mem::take(&mut window.expired_probe_tokens))
    }

    /// Every write in the window, oldest first.
    pub fn snapshot(&self) -> Vec<AckedWrite> {
        let mut window = self.lock();
        window.expire(Instant::now());
        window.writes.iter().cloned().collect()
    }
}

impl Window {
    fn expire(&mut self, now: Instant) {
        let too_old = |write: &AckedWrite| {
            now.saturating_duration_since(write.recorded) > settings::ACKED_WRITES_MAX_AGE
        };
        while self.writes.len() > settings::ACKED_WRITES || self.writes.front().is_some_and(too_old)
        {
            let Some(write) = self.writes.pop_front() else {
                break;
            };
            if write.probe {
                self.expired_probe_tokens.push(write.token);
            }
        }
    }
}

/// What the window says of a failover: how many acknowledged writes the new primary lost.
#[derive(Debug, Clone, Serialize)]
pub struct LostWrites {
    /// Acknowledged writes in the window when the old primary died.
    pub acknowledged: usize,
    /// Of those, how many the new primary does not have (each read back from it).
    pub lost: usize,
    /// The primary-clock time span from the first to the last lost write, in ms.
    pub lost_span_ms: Option<f64>,
    /// The lost writes, oldest first, up to `listed_at_most`.
    pub lost_writes: Vec<AckedWrite>,
    /// Lost writes are listed up to this many (the count is complete).
    pub listed_at_most: usize,
}

/// The lost writes listed in a report at most.
pub const LOST_WRITES_LISTED: usize = 1000;

impl LostWrites {
    /// Sorts `acknowledged` into kept and lost by `present` (the new primary's answer).
    pub fn count(acknowledged: &[AckedWrite], present: &std::collections::HashSet<String>) -> Self {
        let lost: Vec<&AckedWrite> = acknowledged
            .iter()
            .filter(|write| !present.contains(&write.token))
            .collect();
        let span = lost
            .first()
            .zip(lost.last())
            .map(|(first, last)| last.written_at_epoch_ms - first.written_at_epoch_ms);
        LostWrites {
            acknowledged: acknowledged.len(),
            lost: lost.len(),
            lost_span_ms: span,
            lost_writes: lost.into_iter().take(LOST_WRITES_LISTED).cloned().collect(),
            listed_at_most: LOST_WRITES_LISTED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_keeps_the_newest_writes_and_batches_the_deletes_of_probe_rows() {
        let acked = AckedWrites::default();
        let total = settings::ACKED_WRITES + DELETE_BATCH;
        for n in 0..total {
            acked.record(&format!("t{n}"), n as f64, n.is_multiple_of(2));
        }
        let kept = acked.snapshot();
        assert_eq!(kept.len(), settings::ACKED_WRITES);
        assert_eq!(kept[0].token, format!("t{DELETE_BATCH}"));
        // Half the writes that left were probes; API values are never deleted by the window.
        assert!(acked.take_expired_batch().is_none());
        for n in total..total + DELETE_BATCH {
            acked.record(&format!("t{n}"), n as f64, true);
        }
        let batch = acked.take_expired_batch().expect("a full batch");
        assert_eq!(batch.len(), DELETE_BATCH);
        assert!(batch.iter().all(|token| {
            let n: usize = token[1..].parse().unwrap();
            n.is_multiple_of(2) && n < total
        }));
    }

    #[test]
    fn lost_writes_are_those_the_new_primary_lacks() {
        let acked = AckedWrites::default();
        for n in 0..10 {
            acked.record(&format!("t{n}"), 1000.0 + 100.0 * n as f64, true);
        }
        acked.set_commit_lsn("t3", Lsn(42));
        let present = (0..7).map(|n| format!("t{n}")).collect();
        let report = LostWrites::count(&acked.snapshot(), &present);
        assert_eq!(report.acknowledged, 10);
        assert_eq!(report.lost, 3);
        assert_eq!(report.lost_span_ms, Some(200.0));
        let tokens: Vec<_> = report
            .lost_writes
            .iter()
            .map(|w| w.token.as_str())
            .collect();
        assert_eq!(tokens, ["t7", "t8", "t9"]);
        assert_eq!(acked.snapshot()[3].commit_lsn, Some(Lsn(42)));
    }
}
