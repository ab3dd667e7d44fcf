//! The proxy's statistics and its audit: which of the application's queries read a replica
//! that had not yet replayed the same session's last write.
//!
//! The proxy (a transport) records into [`ProxyStats`]; HTTP, gRPC and `/metrics` read
//! [`ProxyStats::report`] through the service, so every view shows the same numbers. The
//! audit is per normalized query (the parser's fingerprint, with its normalized text), and
//! its memory is bounded: once [`ProxyStats::new`]'s cap of distinct fingerprints is reached,
//! new ones are counted together in [`ProxyReport::other`] instead of growing the table.
//!
//! A verdict rests on the shared replay watcher's evidence, and replay positions only grow:
//! a position at or past the session's token seen before the read was sent proves the
//! replica had the write (`replayed`); one below the token from a poll sent after the read
//! returned proves it had not (`at_risk`). Anything in between is `unsure`. Each verdict keeps
//! the watcher position it rests on and that evidence's age, its uncertainty.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Serialize;

use crate::lsn::Lsn;

/// Counters over every session.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    pub sessions: AtomicU64,
    pub primary_reads: AtomicU64,
    pub replica_reads: AtomicU64,
    /// Reads the strategy sent to a replica that went to the primary instead (the replica
    /// was unreachable, or lsn-wait timed out).
    pub fallbacks: AtomicU64,
    pub waits: AtomicU64,
    /// Replay waits a replica's own `WAIT FOR LSN` ended (PostgreSQL 19 and later), rather
    /// than the watcher's next poll.
    pub server_waits: AtomicU64,
    pub writes: AtomicU64,
}

/// A snapshot of [`ProxyCounters`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ProxyCounts {
    pub sessions: u64,
    pub primary_reads: u64,
    pub replica_reads: u64,
    pub fallbacks: u64,
    pub waits: u64,
    pub server_waits: u64,
    pub writes: u64,
}

impl ProxyCounters {
    pub fn snapshot(&self) -> ProxyCounts {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyCounts {
            sessions: get(&self.sessions),
            primary_reads: get(&self.primary_reads),
            replica_reads: get(&self.replica_reads),
            fallbacks: get(&self.fallbacks),
            waits: get(&self.waits),
            server_waits: get(&self.server_waits),
            writes: get(&self.writes),
        }
    }
}

/// Whether a replica read saw the session's own last write, and the evidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum ReplayVerdict {
    /// The read went to the primary, or the session had no token (no write, no min_lsn).
    NotApplicable,
    /// The watcher had seen the replica at or past the token before the read was sent.
    Replayed(Evidence),
    /// A poll sent after the read returned still showed the replica short of the token:
    /// the read ran before the replica had the session's write.
    AtRisk(Evidence),
    /// Only evidence from before the read that the replica was short, or none: it may or
    /// may not have caught up in time.
    Unsure(Evidence),
}

/// What a verdict rests on: the session's token, the watcher position compared with it,
/// and how far that position's poll was from the read (ms before it was sent for
/// `replayed`, after it returned for `at_risk`; the uncertainty).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Evidence {
    pub token: Lsn,
    pub watcher_lsn: Option<Lsn>,
    pub watcher_age_ms: Option<f64>,
}

/// One read the strategy placed (outside a transaction block).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadRecord {
    pub on_replica: bool,
    /// The strategy wanted a replica; the read went to the primary.
    pub fallback: bool,
    /// How long the read waited for replay, if it waited.
    pub waited: Option<Duration>,
    pub verdict: ReplayVerdict,
}

/// One normalized query's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct QueryCounts {
    pub reads: u64,
    pub replica_reads: u64,
    pub primary_reads: u64,
    /// Replica reads that ran before the replica had replayed the session's last write.
    pub reads_at_risk: u64,
    /// Replica reads whose freshness the watcher's evidence cannot settle.
    pub reads_unsure: u64,
    /// Replica reads proven to have seen the session's last write.
    pub reads_replayed: u64,
    pub waits: u64,
    pub wait_seconds: f64,
    pub fallbacks: u64,
}

impl QueryCounts {
    fn add(&mut self, record: &ReadRecord) {
        self.reads += 1;
        if record.on_replica {
            self.replica_reads += 1;
        } else {
            self.primary_reads += 1;
        }
        match record.verdict {
            ReplayVerdict::AtRisk(_) => self.reads_at_risk += 1,
            ReplayVerdict::Unsure(_) => self.reads_unsure += 1,
            ReplayVerdict::Replayed(_) => self.reads_replayed += 1,
            ReplayVerdict::NotApplicable => {}
        }
        if let Some(waited) = record.waited {
            self.waits += 1;
            self.wait_seconds += waited.as_secs_f64();
        }
        self.fallbacks += u64::from(record.fallback);
    }
}

/// One normalized query in the audit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryReport {
    /// pg_query's fingerprint, 16 hex digits (constants and parameters do not change it).
    pub fingerprint: String,
    /// The query as normalized by the parser (constants replaced by `$1`, `$2`, ...).
    pub text: String,
    #[serde(flatten)]
    pub counts: QueryCounts,
    /// The evidence of the last at-risk read, if any.
    pub last_at_risk: Option<Evidence>,
}

/// Everything the proxy has counted, as every transport shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProxyReport {
    /// Whether a proxy records here (false: `--proxy-addr none`).
    pub running: bool,
    pub totals: ProxyCounts,
    /// At-risk queries first (most at-risk reads first), then by reads.
    pub queries: Vec<QueryReport>,
    /// Reads of queries that arrived after the table was full (`max_queries`).
    pub other: QueryCounts,
    pub max_queries: usize,
}

#[derive(Debug)]
struct Entry {
    text: String,
    counts: QueryCounts,
    last_at_risk: Option<Evidence>,
}

/// Every read takes one lookup here. Fingerprints are already hashes, and the table is
/// bounded, so foldhash (not SipHash) is enough.
#[derive(Debug, Default)]
struct Table {
    queries: HashMap<u64, Entry, foldhash::fast::RandomState>,
    other: QueryCounts,
}

#[derive(Debug)]
struct Inner {
    counters: ProxyCounters,
    running: AtomicBool,
    max_queries: usize,
    table: Mutex<Table>,
}

/// The proxy's counters and per-query audit; clones share them.
#[derive(Debug, Clone)]
pub struct ProxyStats {
    inner: Arc<Inner>,
}

impl ProxyStats {
    /// Statistics that keep at most `max_queries` distinct fingerprints.
    pub fn new(max_queries: usize) -> Self {
        ProxyStats {
            inner: Arc::new(Inner {
                counters: ProxyCounters::default(),
                running: AtomicBool::new(false),
                max_queries,
                table: Mutex::default(),
            }),
        }
    }

    pub fn counters(&self) -> &ProxyCounters {
        &self.inner.counters
    }

    /// A proxy now records here.
    pub fn mark_running(&self) {
        self.inner.running.store(true, Ordering::Relaxed);
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes room for `fingerprint` before its reads are recorded; `text` is called only
    /// for a fingerprint not yet known (normalizing parses the query again). Returns
    /// whether it is in the table (false once the table is full: its reads go to `other`).
    pub fn admit(&self, fingerprint: u64, text: impl FnOnce() -> String) -> bool {
        let mut table = self.table();
        if table.queries.contains_key(&fingerprint) {
            return true;
        }
        if table.queries.len() >= self.inner.max_queries {
            return false;
        }
        table.queries.insert(
            fingerprint,
            Entry {
                text: text(),
                counts: QueryCounts::default(),
                last_at_risk: None,
            },
        );
        true
    }

    /// Counts one read of `fingerprint` (`None`: a read the parser could not fingerprint,
    /// counted in `other`).
    pub fn record(&self, fingerprint: Option<u64>, record: &ReadRecord) {
        let mut table = self.table();
        let entry = fingerprint.and_then(|fingerprint| table.queries.get_mut(&fingerprint));
        match entry {
            Some(entry) => {
                entry.counts.add(record);
                if let ReplayVerdict::AtRisk(evidence) = record.verdict {
                    entry.last_at_risk = Some(evidence);
                }
            }
            None => table.other.add(record),
        }
    }

    /// Everything counted, at-risk queries first.
    pub fn report(&self) -> ProxyReport {
        let table = self.table();
        let mut queries: Vec<QueryReport> = table
            .queries
            .iter()
            .map(|(fingerprint, entry)| QueryReport {
                fingerprint: format!("{fingerprint:016x}"),
                text: entry.text.clone(),
                counts: entry.counts,
                last_at_risk: entry.last_at_risk,
            })
            .collect();
        queries.sort_by(|a, b| {
            (b.counts.reads_at_risk, b.counts.reads, &a.fingerprint).cmp(&(
                a.counts.reads_at_risk,
                a.counts.reads,
                &b.fingerprint,
            ))
        });
        ProxyReport {
            running: self.inner.running.load(Ordering::Relaxed),
            totals: self.inner.counters.snapshot(),
            queries,
            other: table.other,
            max_queries: self.inner.max_queries,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(verdict: ReplayVerdict) -> ReadRecord {
        ReadRecord {
            on_replica: true,
            fallback: false,
            waited: None,
            verdict,
        }
    }

    #[test]
    fn at_risk_queries_come_first_and_the_table_is_bounded() {
        let stats = ProxyStats::new(2);
        let evidence = Evidence {
            token: Lsn(0x10),
            watcher_lsn: Some(Lsn(0x8)),
            watcher_age_ms: Some(1.5),
        };
        assert!(stats.admit(1, || "SELECT $1".into()));
        assert!(stats.admit(2, || "SELECT * FROM t WHERE id = $1".into()));
        assert!(!stats.admit(3, || unreachable!("the table is full")));
        assert!(stats.admit(1, || unreachable!("already known")));
        stats.record(Some(1), &read(ReplayVerdict::NotApplicable));
        stats.record(Some(1), &read(ReplayVerdict::NotApplicable));
        stats.record(Some(2), &read(ReplayVerdict::AtRisk(evidence)));
        stats.record(Some(3), &read(ReplayVerdict::Unsure(evidence)));
        let report = stats.report();
        assert_eq!(report.queries[0].fingerprint, "0000000000000002");
        assert_eq!(report.queries[0].counts.reads_at_risk, 1);
        assert_eq!(report.queries[0].last_at_risk, Some(evidence));
        assert_eq!(report.queries[1].counts.reads, 2);
        assert_eq!(report.other.reads_unsure, 1);
    }
}
