//! One request type per kind of request, shared by every transport (HTTP, gRPC, the CLI):
//! each holds what a caller may give, `None` meaning "the default", and nothing a kind
//! ignores. Each checks itself once, against the [settings table](crate::settings), into
//! the probe engine's specs.
//!
//! Probe, run, compare and watch share [`ProbeParams`] (how each probe reads back and
//! waits); run and compare share [`Schedule`]. A new probe parameter is a field of
//! [`ProbeParams`] and a row of the settings table.

use std::time::Duration;

use crate::{
    error::{Error, Result},
    lab::{DelaySettings, StopMode},
    lsn::Lsn,
    probe::{CompareSpec, ProbeOptions, RunSpec, StrategySettings, WatchSpec},
    settings::{self, Bound, Strategy, StrategyDefaults},
};

/// Strategy settings a request may override.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StrategyParams {
    /// pin-window ([`settings::PIN_WINDOW_MS`]).
    pub pin_window_ms: Option<u64>,
    /// lsn-wait ([`settings::LSN_WAIT_TIMEOUT_MS`]).
    pub lsn_wait_timeout_ms: Option<u64>,
}

/// How each probe reads back and waits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeParams {
    /// [`settings::VISIBILITY_TIMEOUT_MS`].
    pub visibility_timeout_ms: Option<u64>,
    /// [`settings::POLL_INTERVAL_MS`]; also lsn-wait's pause between position checks.
    pub poll_interval_ms: Option<u64>,
    pub strategy_options: StrategyParams,
}

/// How many probes, how often, how many at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schedule {
    /// [`settings::COUNT`] (per strategy in a comparison: [`settings::COMPARE_COUNT`]).
    pub count: Option<u64>,
    /// [`settings::INTERVAL_MS`].
    pub interval_ms: Option<u64>,
    /// [`settings::CONCURRENCY`].
    pub concurrency: Option<u64>,
}

/// One probe (`/test/`, `/api/probe`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeRequest {
    /// `None`: the server's default strategy.
    pub strategy: Option<Strategy>,
    pub probe: ProbeParams,
}

/// Many probes of one strategy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunRequest {
    pub strategy: Option<Strategy>,
    pub probe: ProbeParams,
    pub schedule: Schedule,
}

/// Several strategies on one interleaved workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompareRequest {
    /// Each at most once; empty means every strategy.
    pub strategies: Vec<Strategy>,
    pub probe: ProbeParams,
    pub schedule: Schedule,
}

/// A stream of probes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchRequest {
    pub strategy: Option<Strategy>,
    pub probe: ProbeParams,
    /// [`settings::WATCH_INTERVAL_MS`].
    pub interval_ms: Option<u64>,
}

/// A value to write on the primary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteRequest {
    /// At most [`settings::VALUE_CHARS`] characters.
    pub value: String,
    /// Identifies the writer for pin-window reads; empty: anonymous.
    pub client_id: String,
}

/// A read of a key from a write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadRequest {
    pub key: String,
    /// A consistency token ("X/Y") from a write; empty: none.
    pub min_lsn: String,
    /// The writer's id, for pin-window.
    pub client_id: String,
    pub strategy: Option<Strategy>,
    pub strategy_options: StrategyParams,
}

/// A change of the lab's delay link: only the fields given change.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayRequest {
    /// [`settings::DELAY_MS`].
    pub delay_ms: Option<u64>,
    /// [`settings::JITTER_MS`].
    pub jitter_ms: Option<u64>,
    /// Cut (`true`) or heal (`false`) the link.
    pub link_down: Option<bool>,
}

/// What to do to one lab server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAction {
    Stop(StopMode),
    Start,
    /// Stop (in this mode) if running, then start.
    Restart(StopMode),
    /// SIGKILL to the postmaster and its processes: a crash.
    Kill,
}

/// A fault operation on one lab server, by the name the lab status reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerRequest {
    pub name: String,
    pub action: ServerAction,
}

/// Kill the primary and promote a replica (`promote`: its name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailoverRequest {
    pub promote: String,
    /// Bring the old primary back as a fresh copy of the new one, streaming through the
    /// delay link; without, it stays down.
    pub rejoin: bool,
}

impl ServerRequest {
    pub(super) fn validate(&self) -> Result<()> {
        Ok(settings::check_text(
            &settings::SERVER_NAME_CHARS,
            &self.name,
        )?)
    }
}

impl FailoverRequest {
    pub(super) fn validate(&self) -> Result<()> {
        Ok(settings::check_text(
            &settings::PROMOTE_CHARS,
            &self.promote,
        )?)
    }
}

impl DelayRequest {
    /// `current` with the given fields changed, every one in range.
    pub(super) fn applied_to(&self, current: DelaySettings) -> Result<DelaySettings> {
        let change = |bound: &Bound, value: Option<u64>, now: Duration| -> Result<Duration> {
            Ok(match value {
                Some(_) => bound.millis(value)?,
                None => now,
            })
        };
        Ok(DelaySettings {
            delay: change(&settings::DELAY_MS, self.delay_ms, current.delay)?,
            jitter: change(&settings::JITTER_MS, self.jitter_ms, current.jitter)?,
            link_down: self.link_down.unwrap_or(current.link_down),
        })
    }
}

impl StrategyParams {
    fn settings(&self, defaults: &StrategyDefaults, poll: Duration) -> Result<StrategySettings> {
        let pin_window = settings::PIN_WINDOW_MS.defaulting_to(millis(defaults.pin_window));
        let lsn_wait =
            settings::LSN_WAIT_TIMEOUT_MS.defaulting_to(millis(defaults.lsn_wait_timeout));
        Ok(StrategySettings {
            pin_window: pin_window.millis(self.pin_window_ms)?,
            lsn_wait_timeout: lsn_wait.millis(self.lsn_wait_timeout_ms)?,
            lsn_poll_interval: poll,
        })
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ProbeParams {
    /// The probe options these parameters ask for, on top of the server's defaults.
    pub fn options(
        &self,
        strategy: Option<Strategy>,
        defaults: &StrategyDefaults,
    ) -> Result<ProbeOptions> {
        let poll_interval = settings::POLL_INTERVAL_MS.millis(self.poll_interval_ms)?;
        Ok(ProbeOptions {
            visibility_timeout: settings::VISIBILITY_TIMEOUT_MS
                .millis(self.visibility_timeout_ms)?,
            poll_interval,
            strategy: strategy.unwrap_or(defaults.strategy),
            strategy_settings: self.strategy_options.settings(defaults, poll_interval)?,
        })
    }
}

impl Schedule {
    fn spec(&self, count: &Bound, probe: ProbeOptions) -> Result<RunSpec> {
        Ok(RunSpec {
            count: count.count(self.count)?,
            interval: settings::INTERVAL_MS.millis(self.interval_ms)?,
            concurrency: settings::CONCURRENCY.count(self.concurrency)?,
            probe,
        })
    }
}

impl ProbeRequest {
    pub fn spec(&self, defaults: &StrategyDefaults) -> Result<ProbeOptions> {
        self.probe.options(self.strategy, defaults)
    }
}

impl RunRequest {
    pub fn spec(&self, defaults: &StrategyDefaults) -> Result<RunSpec> {
        let probe = self.probe.options(self.strategy, defaults)?;
        self.schedule.spec(&settings::COUNT, probe)
    }
}

impl CompareRequest {
    pub fn spec(&self, defaults: &StrategyDefaults) -> Result<CompareSpec> {
        let mut strategies: Vec<Strategy> = Vec::new();
        for strategy in &self.strategies {
            if strategies.contains(strategy) {
                return Err(Error::invalid(
                    "strategies",
                    format!("{strategy} is listed twice"),
                ));
            }
            strategies.push(*strategy);
        }
        if strategies.is_empty() {
            strategies = Strategy::ALL.to_vec();
        }
        // Each row's own strategy replaces this one; the server default only fills the type.
        let probe = self.probe.options(None, defaults)?;
        Ok(CompareSpec {
            strategies,
            run: self.schedule.spec(&settings::COMPARE_COUNT, probe)?,
        })
    }
}

impl WatchRequest {
    pub fn spec(&self, defaults: &StrategyDefaults) -> Result<WatchSpec> {
        Ok(WatchSpec {
            interval: settings::WATCH_INTERVAL_MS.millis(self.interval_ms)?,
            probe: self.probe.options(self.strategy, defaults)?,
        })
    }
}

impl WriteRequest {
    pub(super) fn validate(&self) -> Result<()> {
        settings::check_text(&settings::VALUE_CHARS, &self.value)?;
        settings::check_text(&settings::CLIENT_ID_CHARS, &self.client_id)?;
        Ok(())
    }
}

impl ReadRequest {
    /// Checks the key and client id; returns the token and the strategy's settings.
    pub(super) fn checked(
        &self,
        defaults: &StrategyDefaults,
    ) -> Result<(Option<Lsn>, Strategy, StrategySettings)> {
        if self.key.is_empty() {
            return Err(Error::invalid("key", "a key from a write is required"));
        }
        settings::check_text(&settings::KEY_CHARS, &self.key)?;
        settings::check_text(&settings::CLIENT_ID_CHARS, &self.client_id)?;
        let min_lsn = parse_min_lsn(&self.min_lsn)?;
        let poll = settings::POLL_INTERVAL_MS.default_duration();
        let strategy_settings = self.strategy_options.settings(defaults, poll)?;
        Ok((
            min_lsn,
            self.strategy.unwrap_or(defaults.strategy),
            strategy_settings,
        ))
    }
}

/// Parses a consistency token; empty means none.
fn parse_min_lsn(text: &str) -> Result<Option<Lsn>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|error: crate::lsn::LsnParseError| Error::invalid("min_lsn", error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> StrategyDefaults {
        StrategyDefaults::default()
    }

    #[test]
    fn defaults_are_one_sequential_probe_with_the_server_strategy() {
        let server = StrategyDefaults {
            strategy: Strategy::LsnWait,
            ..defaults()
        };
        let spec = RunRequest::default().spec(&server).unwrap();
        assert_eq!(spec.count, 1);
        assert_eq!(spec.concurrency, 1);
        assert_eq!(spec.interval, Duration::ZERO);
        assert_eq!(spec.probe.strategy, Strategy::LsnWait);
        let request = RunRequest {
            strategy: Some(Strategy::Primary),
            probe: ProbeParams {
                strategy_options: StrategyParams {
                    pin_window_ms: Some(0),
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let spec = request.spec(&server).unwrap();
        assert_eq!(spec.probe.strategy, Strategy::Primary);
        assert_eq!(spec.probe.strategy_settings.pin_window, Duration::ZERO);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let schedule = |count, interval_ms, concurrency| RunRequest {
            schedule: Schedule {
                count,
                interval_ms,
                concurrency,
            },
            ..Default::default()
        };
        let probe = |visibility_timeout_ms, poll_interval_ms, pin, lsn| RunRequest {
            probe: ProbeParams {
                visibility_timeout_ms,
                poll_interval_ms,
                strategy_options: StrategyParams {
                    pin_window_ms: pin,
                    lsn_wait_timeout_ms: lsn,
                },
            },
            ..Default::default()
        };
        let cases = [
            (schedule(Some(0), None, None), "count"),
            (schedule(Some(10_001), None, None), "count"),
            (schedule(None, Some(60_001), None), "interval_ms"),
            (schedule(None, None, Some(0)), "concurrency"),
            (schedule(None, None, Some(257)), "concurrency"),
            (probe(Some(0), None, None, None), "visibility_timeout_ms"),
            (probe(None, Some(1_001), None, None), "poll_interval_ms"),
            (probe(None, None, Some(600_001), None), "pin_window_ms"),
            (probe(None, None, None, Some(0)), "lsn_wait_timeout_ms"),
        ];
        for (request, field) in cases {
            let error = request.spec(&defaults()).unwrap_err();
            assert_eq!(error.field(), Some(field), "{request:?}");
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn compare_defaults_to_every_strategy_and_rejects_repeats() {
        let spec = CompareRequest::default().spec(&defaults()).unwrap();
        assert_eq!(spec.strategies, Strategy::ALL.to_vec());
        assert_eq!(spec.run.count, 10);
        let repeated = CompareRequest {
            strategies: vec![Strategy::Primary, Strategy::Primary],
            ..Default::default()
        };
        let error = repeated.spec(&defaults()).unwrap_err();
        assert_eq!(error.field(), Some("strategies"));
    }

    #[test]
    fn watch_interval_must_be_positive() {
        let request = WatchRequest {
            interval_ms: Some(0),
            ..Default::default()
        };
        let error = request.spec(&defaults()).unwrap_err();
        assert_eq!(error.field(), Some("interval_ms"));
    }

    #[test]
    fn a_delay_change_changes_only_the_fields_given() {
        let current = DelaySettings {
            delay: Duration::from_millis(300),
            jitter: Duration::from_millis(20),
            link_down: false,
        };
        let cut = DelayRequest {
            link_down: Some(true),
            ..Default::default()
        };
        let changed = cut.applied_to(current).unwrap();
        assert_eq!(changed.delay, current.delay);
        assert_eq!(changed.jitter, current.jitter);
        assert!(changed.link_down);
        let too_long = DelayRequest {
            jitter_ms: Some(600_001),
            ..Default::default()
        };
        assert_eq!(
            too_long.applied_to(current).unwrap_err().field(),
            Some("jitter_ms")
        );
    }

    #[test]
    fn reads_need_a_key_and_a_well_formed_token() {
        let read = |key: &str, min_lsn: &str| ReadRequest {
            key: key.into(),
            min_lsn: min_lsn.into(),
            ..Default::default()
        };
        let field = |request: ReadRequest| {
            let error = request.checked(&defaults()).unwrap_err();
            error.field().map(str::to_owned)
        };
        assert_eq!(field(read("", "")).as_deref(), Some("key"));
        assert_eq!(field(read("k", "nope")).as_deref(), Some("min_lsn"));
        let (min_lsn, _, _) = read("k", "0/10").checked(&defaults()).unwrap();
        assert_eq!(min_lsn, Some(Lsn(16)));
    }
}
