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

use std::{
    fmt,
    str::FromStr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{Databases, Replica, ReplicaRead, RowSeen};
use crate::{
    error::{Error, Result},
    lsn::Lsn,
};

/// A read-your-writes strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Replica,
    Primary,
    PinWindow,
    LsnWait,
    LsnRoute,
    RemoteApply,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Replica,
        Strategy::Primary,
        Strategy::PinWindow,
        Strategy::LsnWait,
        Strategy::LsnRoute,
        Strategy::RemoteApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Replica => "replica",
            Strategy::Primary => "primary",
            Strategy::PinWindow => "pin-window",
            Strategy::LsnWait => "lsn-wait",
            Strategy::LsnRoute => "lsn-route",
            Strategy::RemoteApply => "remote-apply",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == text)
            .ok_or_else(|| {
                let names: Vec<_> = Strategy::ALL.iter().map(|s| s.name()).collect();
                Error::invalid(
                    "strategy",
                    format!("{text:?} is not one of {}", names.join(", ")),
                )
            })
    }
}

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
            pin_window: Duration::from_millis(2000),
            lsn_wait_timeout: Duration::from_secs(10),
            lsn_poll_interval: Duration::from_millis(2),
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

impl Databases {
    /// Reads `token` where `strategy` says, on `replica` when it says replica. A replica
    /// that cannot be reached is an error, whatever the strategy: the point is to see it.
    pub async fn routed_read(
        &self,
        replica: &Replica,
        strategy: Strategy,
        settings: &StrategySettings,
        context: ReadContext,
        token: &str,
    ) -> Result<RoutedRead> {
        let from_primary = |served_by, primary_row, waited| RoutedRead {
            served_by,
            primary_row,
            replica_read: None,
            waited,
            replica_read_sent: None,
        };
        match strategy {
            Strategy::Primary => Ok(from_primary(
                ServedBy::Primary,
                self.read_on_primary(token).await?,
                None,
            )),
            Strategy::PinWindow
                if context
                    .last_write
                    .is_some_and(|wrote| wrote.elapsed() < settings.pin_window) =>
            {
                Ok(from_primary(
                    ServedBy::Primary,
                    self.read_on_primary(token).await?,
                    None,
                ))
            }
            Strategy::LsnRoute => match context.min_lsn {
                Some(min_lsn) if !self.replayed(replica, min_lsn).await? => Ok(from_primary(
                    ServedBy::Primary,
                    self.read_on_primary(token).await?,
                    None,
                )),
                _ => self.replica_routed(replica, token, None).await,
            },
            Strategy::LsnWait => {
                let Some(min_lsn) = context.min_lsn else {
                    return self.replica_routed(replica, token, None).await;
                };
                let started = Instant::now();
                loop {
                    if self.replayed(replica, min_lsn).await? {
                        return self
                            .replica_routed(replica, token, Some(started.elapsed()))
                            .await;
                    }
                    if started.elapsed() >= settings.lsn_wait_timeout {
                        let row = self.read_on_primary(token).await?;
                        return Ok(from_primary(
                            ServedBy::Fallback,
                            row,
                            Some(started.elapsed()),
                        ));
                    }
                    tokio::time::sleep(settings.lsn_poll_interval).await;
                }
            }
            Strategy::Replica | Strategy::PinWindow | Strategy::RemoteApply => {
                self.replica_routed(replica, token, None).await
            }
        }
    }

    async fn replayed(&self, replica: &Replica, min_lsn: Lsn) -> Result<bool> {
        Ok(self
            .replay_lsn(replica)
            .await?
            .is_some_and(|replayed| replayed >= min_lsn))
    }

    async fn replica_routed(
        &self,
        replica: &Replica,
        token: &str,
        waited: Option<Duration>,
    ) -> Result<RoutedRead> {
        let sent = Instant::now();
        let read = self.read_on_replica(replica, token).await?;
        Ok(RoutedRead {
            served_by: ServedBy::Replica,
            primary_row: None,
            replica_read: Some(read),
            waited,
            replica_read_sent: Some(sent),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_rejected() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>().unwrap(), strategy);
            let json = serde_json::to_string(&strategy).unwrap();
            assert_eq!(json, format!("\"{}\"", strategy.name()));
        }
        let error = "lsn_wait".parse::<Strategy>().unwrap_err();
        assert_eq!(error.field(), Some("strategy"));
        assert!(error.to_string().contains("lsn-wait"), "{error}");
    }
}
