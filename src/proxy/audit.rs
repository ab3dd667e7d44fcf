//! The proxy's half of the audit: for each read a strategy placed, whether the replica had
//! already replayed the session's last commit when the read ran, judged from the shared
//! replay watcher and recorded in the service's [`ProxyStats`](crate::service::ProxyStats).
//!
//! The verdict never holds the read up. Evidence from before the read (a watcher position
//! at or past the token) settles it at once; otherwise a task waits for the token if its
//! fetch is still in flight, then for one watcher poll sent after the read returned, and
//! records the verdict when it has one. That poll is shared with every session waiting at
//! the time, and reads of sessions that never wrote ask for none.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::watch;

use super::{Shared, watcher::ReplayWatcher};
use crate::{
    db::Databases,
    lsn::Lsn,
    service::{Evidence, ReadRecord, ReplayVerdict},
};

/// The session's token fetched after a write: `None` while the fetch is in flight, then
/// the position (`None` if the primary could not say).
pub(super) type TokenFetch = watch::Receiver<Option<Option<Lsn>>>;

/// Fetches the primary's position after a write in a task of its own. Not inlined: the
/// sqlx future is about 9 KB, and built inside a session's poll function it made that
/// function reserve (and probe) 45 KB of stack on every poll, write or not.
#[inline(never)]
pub(super) fn fetch_token(databases: Databases) -> TokenFetch {
    let (fetched, fetch) = watch::channel(None);
    tokio::spawn(Box::pin(async move {
        let lsn = match databases.primary_insert_lsn().await {
            Ok(lsn) => Some(lsn),
            Err(error) => {
                tracing::warn!(%error, "reading the primary's position after a write");
                None
            }
        };
        fetched.send_replace(Some(lsn));
    }));
    fetch
}

/// The fetched token, once the fetch is done.
pub(super) async fn fetched(fetch: &mut TokenFetch) -> Option<Lsn> {
    match fetch.wait_for(Option::is_some).await {
        Ok(value) => (*value).flatten(),
        Err(_) => None,
    }
}

/// What a read's routing learnt, for the audit.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ReadNote {
    pub fingerprint: Option<u64>,
    pub waited: Option<Duration>,
    pub fallback: bool,
}

/// The session's token as of a read: what it knew, and a fetch still in flight.
pub(super) struct TokenAtRead {
    pub known: Option<Lsn>,
    pub pending: Option<TokenFetch>,
}

/// When a replica read ran, and what the watcher had seen before it was sent.
#[derive(Clone)]
pub(super) struct ReplicaRead {
    /// The watcher of the replica read, if one could vouch for it.
    pub watcher: Option<Arc<ReplayWatcher>>,
    pub sent: Instant,
    pub answered: Instant,
    pub seen_before: Option<(Lsn, Instant)>,
}

fn millis_between(later: Instant, earlier: Instant) -> f64 {
    later.saturating_duration_since(earlier).as_secs_f64() * 1000.0
}

impl ReplicaRead {
    /// The evidence from before the read: the watcher's position and its age at the read.
    fn before(&self, token: Lsn) -> Evidence {
        Evidence {
            token,
            watcher_lsn: self.seen_before.map(|(lsn, _)| lsn),
            watcher_age_ms: self
                .seen_before
                .map(|(_, answered)| millis_between(self.sent, answered)),
        }
    }

    fn replayed_before(&self, token: Lsn) -> bool {
        self.seen_before.is_some_and(|(lsn, _)| lsn >= token)
    }

    /// The verdict, polling the replica once more after the read if need be.
    async fn judge(&self, watcher: &ReplayWatcher, token: Lsn, timeout: Duration) -> ReplayVerdict {
        if self.replayed_before(token) {
            return ReplayVerdict::Replayed(self.before(token));
        }
        match watcher.polled_after(self.answered, timeout).await {
            Some((sent, lsn)) if lsn < token => ReplayVerdict::AtRisk(Evidence {
                token,
                watcher_lsn: Some(lsn),
                watcher_age_ms: Some(millis_between(sent, self.answered)),
            }),
            _ => ReplayVerdict::Unsure(self.before(token)),
        }
    }
}

/// Records one read: at once when the evidence is at hand, else from a task. `read` is a
/// replica read's timing, taken only when the session has a token to judge it by (reads of
/// a session that never wrote need no clock); a primary read has none.
pub(super) fn record(
    shared: &Arc<Shared>,
    note: ReadNote,
    on_replica: bool,
    read: Option<ReplicaRead>,
    token: TokenAtRead,
) {
    let record = move |verdict| ReadRecord {
        on_replica,
        fallback: note.fallback,
        waited: note.waited,
        verdict,
    };
    let Some(read) = read else {
        let verdict = ReplayVerdict::NotApplicable;
        return shared.stats.record(note.fingerprint, &record(verdict));
    };
    match (token.known, token.pending) {
        (None, None) => shared
            .stats
            .record(note.fingerprint, &record(ReplayVerdict::NotApplicable)),
        (Some(known), None) if read.replayed_before(known) => shared.stats.record(
            note.fingerprint,
            &record(ReplayVerdict::Replayed(read.before(known))),
        ),
        (known, pending) => {
            let shared = Arc::clone(shared);
            tokio::spawn(async move {
                let timeout = shared.settings.connect_timeout;
                let fetched = match pending {
                    Some(mut fetch) => tokio::time::timeout(timeout, fetched(&mut fetch))
                        .await
                        .ok()
                        .flatten(),
                    None => None,
                };
                let verdict = match (known.max(fetched), read.watcher.as_deref()) {
                    (Some(token), Some(watcher)) => read.judge(watcher, token, timeout).await,
                    (Some(token), None) => ReplayVerdict::Unsure(read.before(token)),
                    (None, _) => ReplayVerdict::NotApplicable,
                };
                shared.stats.record(note.fingerprint, &record(verdict));
            });
        }
    }
}
