//! Shared position queries, so that waiting costs the databases the same whether one
//! session waits or a thousand: one replay watcher per replica (one position query per poll
//! interval for every waiting session, and none while nobody waits), and one primary
//! position fetcher for the `global` strategy.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::{db::Databases, lsn::Lsn};

/// Counts a waiter while it lives and wakes the poller when it arrives.
struct Demand<'a> {
    count: &'a AtomicUsize,
}

impl<'a> Demand<'a> {
    fn new(count: &'a AtomicUsize, wake: &Notify) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        wake.notify_one();
        Demand { count }
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Waits in a poll loop until `demand` is non-zero.
async fn until_wanted(demand: &AtomicUsize, wake: &Notify) {
    loop {
        let notified = wake.notified();
        if demand.load(Ordering::SeqCst) > 0 {
            return;
        }
        notified.await;
    }
}

/// What the watcher has seen so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    /// Completed polls.
    polls: u64,
    /// The highest replay position seen, and when the last poll that saw it answered:
    /// the replica had replayed at least that much by then.
    best: Option<(Lsn, Instant)>,
    /// The last poll that answered: when it was sent, and what it said.
    last: Option<(Instant, Lsn)>,
}

struct WatcherState {
    position: watch::Sender<Seen>,
    demand: AtomicUsize,
    wake: Notify,
}

/// One replica's replay position, polled while anyone waits on it. Replay positions only
/// grow, so any position seen is evidence: a session whose token is at or below it may read
/// the replica without asking again.
pub struct ReplayWatcher {
    state: Arc<WatcherState>,
    task: JoinHandle<()>,
}

impl ReplayWatcher {
    /// Watches `databases.replicas()[index]` of topology `generation`, polling every
    /// `poll_interval` while wanted, until the topology is re-pointed.
    pub fn spawn(
        databases: Databases,
        generation: u64,
        index: usize,
        poll_interval: Duration,
    ) -> Self {
        let state = Arc::new(WatcherState {
            position: watch::channel(Seen::default()).0,
            demand: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        let task = tokio::spawn(poll_replay(
            Arc::clone(&state),
            databases,
            generation,
            index,
            poll_interval,
        ));
        ReplayWatcher { state, task }
    }

    /// The latest position seen, without waiting.
    pub fn latest(&self) -> Option<Lsn> {
        self.seen().map(|(lsn, _)| lsn)
    }

    /// The latest position seen, and when the poll that saw it answered (its age is the
    /// evidence's uncertainty: the replica may have replayed more since).
    pub fn seen(&self) -> Option<(Lsn, Instant)> {
        self.state.position.borrow().best
    }

    /// The answer of the first poll sent at or after `after` (at most `timeout`): the
    /// replica had replayed no more than that when `after` came. Asks for the poll, so it
    /// costs one position query shared by every caller waiting at the time.
    pub async fn polled_after(&self, after: Instant, timeout: Duration) -> Option<(Instant, Lsn)> {
        let _demand = Demand::new(&self.state.demand, &self.state.wake);
        let mut receiver = self.state.position.subscribe();
        let polled = receiver.wait_for(|seen| seen.last.is_some_and(|(sent, _)| sent >= after));
        match tokio::time::timeout(timeout, polled).await {
            Ok(Ok(seen)) => seen.last,
            _ => None,
        }
    }

    /// Waits until the replica has replayed `min_lsn`, at most `timeout`; whether it did.
    pub async fn wait_for(&self, min_lsn: Lsn, timeout: Duration) -> bool {
        if self.latest().is_some_and(|replayed| replayed >= min_lsn) {
            return true;
        }
        let _demand = Demand::new(&self.state.demand, &self.state.wake);
        let mut receiver = self.state.position.subscribe();
        let reached = receiver.wait_for(|seen| seen.best.is_some_and(|(lsn, _)| lsn >= min_lsn));
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }

    /// The position after one more poll (at most `timeout`), for a decision that cannot
    /// wait longer (lsn-route).
    pub async fn fresh(&self, timeout: Duration) -> Option<Lsn> {
        let _demand = Demand::new(&self.state.demand, &self.state.wake);
        let mut receiver = self.state.position.subscribe();
        let polls = receiver.borrow_and_update().polls;
        let next = receiver.wait_for(|seen| seen.polls > polls);
        let _ = tokio::time::timeout(timeout, next).await;
        self.latest()
    }
}

impl Drop for ReplayWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn poll_replay(
    state: Arc<WatcherState>,
    databases: Databases,
    generation: u64,
    index: usize,
    poll_interval: Duration,
) {
    loop {
        until_wanted(&state.demand, &state.wake).await;
        // After a failover the index names another server, which this watcher's evidence
        // says nothing about: its waiters time out (and read the primary), and the new
        // generation's watcher takes over.
        if databases.urls().generation != generation {
            return;
        }
        let Some(replica) = databases.replicas().get(index).cloned() else {
            return;
        };
        let sent = Instant::now();
        match databases.replay_lsn(&replica).await {
            Ok(replayed) => {
                let answered = Instant::now();
                state.position.send_modify(|seen| {
                    seen.polls += 1;
                    if let Some(lsn) = replayed {
                        seen.last = Some((sent, lsn));
                        // A restarted replica may report less for a moment; keep the
                        // evidence.
                        if seen.best.is_none_or(|(best, _)| lsn >= best) {
                            seen.best = Some((lsn, answered));
                        }
                    }
                });
            }
            Err(error) => {
                tracing::debug!(replica = %replica.name, %error, "replay position");
                state.position.send_modify(|seen| seen.polls += 1);
            }
        }
        tokio::time::sleep(poll_interval).await;
    }
}

struct FetcherState {
    /// The last position fetched and when its query was sent.
    fetched: watch::Sender<Option<(Instant, Lsn)>>,
    demand: AtomicUsize,
    wake: Notify,
}

/// The primary's current WAL position for `global` reads. One query at a time serves every
/// read that started before it was sent. A read never uses a query already in flight when
/// it started: that query may have run before a commit the reader was told about, so the
/// reader waits for the next one, which starts as soon as the current one returns.
pub struct PrimaryPosition {
    state: Arc<FetcherState>,
    task: JoinHandle<()>,
}

impl PrimaryPosition {
    pub fn spawn(databases: Databases) -> Self {
        let state = Arc::new(FetcherState {
            fetched: watch::channel(None).0,
            demand: AtomicUsize::new(0),
            wake: Notify::new(),
        });
        let task = tokio::spawn(fetch_primary(Arc::clone(&state), databases));
        PrimaryPosition { state, task }
    }

    /// A position taken after `started`; `None` if none came within `timeout`.
    pub async fn after(&self, started: Instant, timeout: Duration) -> Option<Lsn> {
        let _demand = Demand::new(&self.state.demand, &self.state.wake);
        let mut receiver = self.state.fetched.subscribe();
        let fresh = receiver.wait_for(|fetched| fetched.is_some_and(|(sent, _)| sent >= started));
        match tokio::time::timeout(timeout, fresh).await {
            Ok(Ok(fetched)) => fetched.map(|(_, lsn)| lsn),
            _ => None,
        }
    }
}

impl Drop for PrimaryPosition {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn fetch_primary(state: Arc<FetcherState>, databases: Databases) {
    loop {
        until_wanted(&state.demand, &state.wake).await;
        let sent = Instant::now();
        match databases.primary_insert_lsn().await {
            Ok(lsn) => {
                state.fetched.send_replace(Some((sent, lsn)));
            }
            Err(error) => {
                tracing::debug!(%error, "primary position");
                // Do not spin on an outage: waiters time out and read the primary.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
