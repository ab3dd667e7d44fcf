//! Shared position queries, so that waiting costs the databases the same whether one
//! session waits or a thousand: one replay watcher per replica (one position query per poll
//! interval for every waiting session, and none while nobody waits), and one primary
//! position fetcher for the `global` strategy.
//!
//! On PostgreSQL 19 and later a replica can also say when it has replayed a position
//! (`WAIT FOR LSN`): while sessions wait, the watcher keeps one such wait open for the
//! lowest position waited for, so that a wait ends when replay gets there instead of at
//! the next poll. The polls go on beside it: they serve every other wait, the audit and
//! lsn-route, and every older replica.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::{
    db::{Databases, WaitOutcome},
    lsn::Lsn,
    service::ProxyStats,
};

/// How long one server-side wait may hold a replica connection before it is asked again
/// (its waiters have their own timeouts; this only bounds a wait nobody needs any more).
const SERVER_WAIT_TIMEOUT: Duration = Duration::from_secs(1);

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
    /// The positions sessions wait for (with how many wait for each), for the server-side
    /// wait; `targeted` wakes it when one is added.
    targets: Mutex<BTreeMap<Lsn, usize>>,
    targeted: Notify,
}

impl WatcherState {
    fn targets(&self) -> std::sync::MutexGuard<'_, BTreeMap<Lsn, usize>> {
        self.targets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lowest position waited for that the watcher has not yet seen replayed.
    fn lowest_unreplayed_target(&self) -> Option<Lsn> {
        let best = self.position.borrow().best.map(|(lsn, _)| lsn);
        self.targets()
            .keys()
            .copied()
            .find(|&target| best.is_none_or(|best| target > best))
    }

    /// Evidence from outside the polls: the replica had replayed at least `lsn` by now.
    fn replayed_at_least(&self, lsn: Lsn) {
        let now = Instant::now();
        self.position.send_modify(|seen| {
            if seen.best.is_none_or(|(best, _)| lsn > best) {
                seen.best = Some((lsn, now));
            }
        });
    }
}

/// A wait for one position, registered while it lives.
struct Target<'a> {
    state: &'a WatcherState,
    lsn: Lsn,
}

impl<'a> Target<'a> {
    fn new(state: &'a WatcherState, lsn: Lsn) -> Self {
        *state.targets().entry(lsn).or_default() += 1;
        state.targeted.notify_one();
        Target { state, lsn }
    }
}

impl Drop for Target<'_> {
    fn drop(&mut self) {
        let mut targets = self.state.targets();
        if let Some(count) = targets.get_mut(&self.lsn) {
            *count -= 1;
            if *count == 0 {
                targets.remove(&self.lsn);
            }
        }
    }
}

/// The replica a watcher watches: `databases.replicas()[index]` of topology `generation`.
pub struct Watched {
    pub databases: Databases,
    pub generation: u64,
    pub index: usize,
}

impl Watched {
    /// The replica, while the topology is still the one watched. After a failover the
    /// index names another server, which this watcher's evidence says nothing about.
    fn replica(&self) -> Option<crate::db::Replica> {
        if self.databases.urls().generation != self.generation {
            return None;
        }
        self.databases.replicas().get(self.index).cloned()
    }
}

/// One replica's replay position, polled while anyone waits on it. Replay positions only
/// grow, so any position seen is evidence: a session whose token is at or below it may read
/// the replica without asking again.
pub struct ReplayWatcher {
    state: Arc<WatcherState>,
    tasks: [JoinHandle<()>; 2],
}

impl ReplayWatcher {
    /// Watches a replica, polling every `poll_interval` while wanted and waiting on the
    /// server where it can (counted in `stats`), until the topology is re-pointed.
    pub fn spawn(watched: Watched, poll_interval: Duration, stats: ProxyStats) -> Self {
        let state = Arc::new(WatcherState {
            position: watch::channel(Seen::default()).0,
            demand: AtomicUsize::new(0),
            wake: Notify::new(),
            targets: Mutex::default(),
            targeted: Notify::new(),
        });
        let watched = Arc::new(watched);
        let tasks = [
            tokio::spawn(poll_replay(
                Arc::clone(&state),
                Arc::clone(&watched),
                poll_interval,
            )),
            tokio::spawn(wait_on_server(
                Arc::clone(&state),
                watched,
                poll_interval,
                stats,
            )),
        ];
        ReplayWatcher { state, tasks }
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
        let _target = Target::new(&self.state, min_lsn);
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
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn poll_replay(state: Arc<WatcherState>, watched: Arc<Watched>, poll_interval: Duration) {
    loop {
        until_wanted(&state.demand, &state.wake).await;
        // After a failover the waiters time out (and read the primary), and the new
        // generation's watcher takes over.
        let Some(replica) = watched.replica() else {
            return;
        };
        let sent = Instant::now();
        match watched.databases.replay_lsn(&replica).await {
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

/// Keeps one `WAIT FOR LSN` open on the replica for the lowest position sessions wait for,
/// while there is one; on replicas before PostgreSQL 19 it ends at its first wait.
async fn wait_on_server(
    state: Arc<WatcherState>,
    watched: Arc<Watched>,
    poll_interval: Duration,
    stats: ProxyStats,
) {
    loop {
        let Some(target) = next_target(&state).await else {
            continue;
        };
        let Some(replica) = watched.replica() else {
            return;
        };
        let waited = watched
            .databases
            .wait_for_lsn(&replica, target, SERVER_WAIT_TIMEOUT);
        match waited.await {
            Ok(None) => return,
            Ok(Some(WaitOutcome::Replayed)) => {
                state.replayed_at_least(target);
                stats
                    .counters()
                    .server_waits
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(WaitOutcome::TimedOut)) => {}
            // Promoted, or unreachable: the polls and the waiters' timeouts take it from
            // here; ask again no faster than they poll.
            Ok(Some(WaitOutcome::NotInRecovery)) | Err(_) => {
                tokio::time::sleep(poll_interval).await;
            }
        }
    }
}

/// The lowest position waited for and not yet seen replayed, once there is one.
async fn next_target(state: &WatcherState) -> Option<Lsn> {
    let targeted = state.targeted.notified();
    match state.lowest_unreplayed_target() {
        Some(target) => Some(target),
        None => {
            targeted.await;
            None
        }
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
