//! Runs: many probes on a schedule with bounded concurrency; comparisons of strategies on
//! one interleaved workload; and a stream of probes for watching.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use super::{ProbeEngine, ProbeOptions, ProbeResult, ReplicaSummary, RunSummary, checked_millis};
use crate::{
    db::strategy::{Strategy, StrategySettings},
    error::{Error, Result},
};

/// Parameters as a caller gives them: `None` means "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunParams {
    pub count: Option<u64>,
    pub interval_ms: Option<u64>,
    pub visibility_timeout_ms: Option<u64>,
    pub poll_interval_ms: Option<u64>,
    pub concurrency: Option<u64>,
    pub strategy: Option<Strategy>,
    pub pin_window_ms: Option<u64>,
    pub lsn_wait_timeout_ms: Option<u64>,
}

/// A checked run: every value in range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSpec {
    pub count: u32,
    /// Between the starts of consecutive probes.
    pub interval: Duration,
    pub concurrency: u32,
    pub probe: ProbeOptions,
}

/// A checked comparison: `count` probes of each strategy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompareSpec {
    pub strategies: Vec<Strategy>,
    pub run: RunSpec,
}

/// A checked stream of probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchSpec {
    pub interval: Duration,
    pub probe: ProbeOptions,
}

fn bounded(field: &'static str, value: Option<u64>, max: u64, default: u64) -> Result<u32> {
    let value = value.unwrap_or(default);
    if (1..=max).contains(&value) {
        Ok(value as u32)
    } else {
        Err(Error::invalid(
            field,
            format!("{value} is out of range 1..={max}"),
        ))
    }
}

impl RunParams {
    /// The probe options these parameters ask for, on top of the server's defaults.
    pub fn probe_options(&self, defaults: &ProbeOptions) -> Result<ProbeOptions> {
        let settings = StrategySettings {
            pin_window: checked_millis(
                "pin_window_ms",
                self.pin_window_ms,
                0..=600_000,
                defaults.strategy_settings.pin_window,
            )?,
            lsn_wait_timeout: checked_millis(
                "lsn_wait_timeout_ms",
                self.lsn_wait_timeout_ms,
                1..=600_000,
                defaults.strategy_settings.lsn_wait_timeout,
            )?,
            ..defaults.strategy_settings
        };
        ProbeOptions::from_millis(
            self.visibility_timeout_ms,
            self.poll_interval_ms,
            self.strategy.unwrap_or(defaults.strategy),
            settings,
        )
    }
}

impl RunSpec {
    pub const MAX_COUNT: u64 = 10_000;
    pub const MAX_CONCURRENCY: u64 = 256;

    /// Validates caller input on top of the server's defaults; errors name the field.
    pub fn from_params(params: &RunParams, defaults: &ProbeOptions) -> Result<Self> {
        Self::with_default_count(params, defaults, 1)
    }

    fn with_default_count(params: &RunParams, defaults: &ProbeOptions, count: u64) -> Result<Self> {
        Ok(RunSpec {
            count: bounded("count", params.count, Self::MAX_COUNT, count)?,
            interval: checked_millis(
                "interval_ms",
                params.interval_ms,
                0..=60_000,
                Duration::ZERO,
            )?,
            concurrency: bounded("concurrency", params.concurrency, Self::MAX_CONCURRENCY, 1)?,
            probe: params.probe_options(defaults)?,
        })
    }
}

impl CompareSpec {
    /// `strategies` empty means all of them; each may appear once. Default count 10.
    pub fn from_params(
        strategies: &[Strategy],
        params: &RunParams,
        defaults: &ProbeOptions,
    ) -> Result<Self> {
        let mut chosen: Vec<Strategy> = Vec::new();
        for strategy in strategies {
            if chosen.contains(strategy) {
                return Err(Error::invalid(
                    "strategies",
                    format!("{strategy} is listed twice"),
                ));
            }
            chosen.push(*strategy);
        }
        if chosen.is_empty() {
            chosen = Strategy::ALL.to_vec();
        }
        Ok(CompareSpec {
            strategies: chosen,
            run: RunSpec::with_default_count(params, defaults, 10)?,
        })
    }
}

impl WatchSpec {
    pub fn from_params(params: &RunParams, defaults: &ProbeOptions) -> Result<Self> {
        Ok(WatchSpec {
            interval: checked_millis(
                "interval_ms",
                params.interval_ms,
                1..=60_000,
                Duration::from_secs(1),
            )?,
            probe: params.probe_options(defaults)?,
        })
    }
}

/// Every probe of a run, in start order, and their statistics.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub strategy: Strategy,
    pub probes: Vec<ProbeResult>,
    pub summary: RunSummary,
    pub replicas: Vec<ReplicaSummary>,
}

/// One strategy's row of a comparison.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    pub strategy: Strategy,
    pub summary: RunSummary,
    pub replicas: Vec<ReplicaSummary>,
}

/// A comparison table, one row per strategy in request order.
#[derive(Debug, Clone, Serialize)]
pub struct CompareReport {
    pub strategies: Vec<StrategyReport>,
    pub elapsed_ms: f64,
}

impl ProbeEngine {
    fn replica_names(&self) -> Vec<String> {
        self.databases()
            .replicas()
            .iter()
            .map(|replica| replica.name.clone())
            .collect()
    }

    /// Runs `spec.count` probes of one strategy.
    pub async fn run(&self, spec: &RunSpec) -> Result<RunReport> {
        let started = Instant::now();
        let jobs = vec![spec.probe; spec.count as usize];
        let probes = self
            .run_scheduled(jobs, spec.interval, spec.concurrency)
            .await?;
        let elapsed = started.elapsed();
        Ok(RunReport {
            strategy: spec.probe.strategy,
            summary: RunSummary::of(&probes, elapsed),
            replicas: RunSummary::per_replica(&probes, &self.replica_names(), elapsed),
            probes,
        })
    }

    /// Runs the strategies one after another in turn (A, B, C, A, B, C, ...), so slow
    /// drifts in lag or load hit them all alike.
    pub async fn compare(&self, spec: &CompareSpec) -> Result<CompareReport> {
        let started = Instant::now();
        let jobs: Vec<ProbeOptions> = (0..spec.run.count)
            .flat_map(|_| {
                spec.strategies.iter().map(|strategy| ProbeOptions {
                    strategy: *strategy,
                    ..spec.run.probe
                })
            })
            .collect();
        let probes = self
            .run_scheduled(jobs, spec.run.interval, spec.run.concurrency)
            .await?;
        let elapsed = started.elapsed();
        let names = self.replica_names();
        let strategies = spec
            .strategies
            .iter()
            .map(|strategy| {
                let own: Vec<ProbeResult> = probes
                    .iter()
                    .filter(|p| p.strategy == *strategy)
                    .cloned()
                    .collect();
                StrategyReport {
                    strategy: *strategy,
                    summary: RunSummary::of(&own, elapsed),
                    replicas: RunSummary::per_replica(&own, &names, elapsed),
                }
            })
            .collect();
        Ok(CompareReport {
            strategies,
            elapsed_ms: super::millis(elapsed),
        })
    }

    /// Probes every `spec.interval` (or right after the previous one, if it took longer),
    /// sending each result; ends when the receiver is dropped.
    pub fn watch(&self, spec: WatchSpec) -> tokio::sync::mpsc::Receiver<Result<ProbeResult>> {
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        let engine = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(spec.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sender.closed() => return,
                    _ = ticks.tick() => {}
                }
                let outcome = tokio::select! {
                    _ = sender.closed() => return,
                    outcome = engine.probe(&spec.probe) => outcome,
                };
                if sender.send(outcome).await.is_err() {
                    return;
                }
            }
        });
        receiver
    }

    /// Starts the jobs every `interval` with at most `concurrency` in flight, returning
    /// results in job order. The first probe that cannot reach the primary ends the run
    /// with its error, since the rest would fail the same way; dropping the future cancels
    /// probes in flight.
    async fn run_scheduled(
        &self,
        jobs: Vec<ProbeOptions>,
        interval: Duration,
        concurrency: u32,
    ) -> Result<Vec<ProbeResult>> {
        let started = Instant::now();
        let slots = Arc::new(Semaphore::new(concurrency as usize));
        let mut in_flight = JoinSet::new();
        let mut done = Vec::with_capacity(jobs.len());
        for (index, options) in jobs.into_iter().enumerate() {
            tokio::time::sleep_until(started + interval * index as u32).await;
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the run never closes its semaphore");
            while let Some(finished) = in_flight.try_join_next() {
                done.push(finished_probe(finished)?);
            }
            let engine = self.clone();
            in_flight.spawn(async move {
                let outcome = engine.probe(&options).await;
                drop(slot);
                (index, outcome)
            });
        }
        while let Some(finished) = in_flight.join_next().await {
            done.push(finished_probe(finished)?);
        }
        done.sort_by_key(|(index, _)| *index);
        Ok(done.into_iter().map(|(_, probe)| probe).collect())
    }
}

fn finished_probe(
    finished: Result<(usize, Result<ProbeResult>), tokio::task::JoinError>,
) -> Result<(usize, ProbeResult)> {
    match finished {
        Ok((index, outcome)) => Ok((index, outcome?)),
        // A probe task only ends abnormally if it panicked; surface that loudly.
        Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> ProbeOptions {
        ProbeOptions::default()
    }

    #[test]
    fn defaults_are_one_sequential_probe_with_the_server_strategy() {
        let server = ProbeOptions {
            strategy: Strategy::LsnWait,
            ..defaults()
        };
        let spec = RunSpec::from_params(&RunParams::default(), &server).unwrap();
        assert_eq!(spec.count, 1);
        assert_eq!(spec.concurrency, 1);
        assert_eq!(spec.interval, Duration::ZERO);
        assert_eq!(spec.probe.strategy, Strategy::LsnWait);
        let spec = RunSpec::from_params(
            &RunParams {
                strategy: Some(Strategy::Primary),
                pin_window_ms: Some(0),
                ..Default::default()
            },
            &server,
        )
        .unwrap();
        assert_eq!(spec.probe.strategy, Strategy::Primary);
        assert_eq!(spec.probe.strategy_settings.pin_window, Duration::ZERO);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (
                RunParams {
                    count: Some(0),
                    ..Default::default()
                },
                "count",
            ),
            (
                RunParams {
                    count: Some(10_001),
                    ..Default::default()
                },
                "count",
            ),
            (
                RunParams {
                    interval_ms: Some(60_001),
                    ..Default::default()
                },
                "interval_ms",
            ),
            (
                RunParams {
                    concurrency: Some(0),
                    ..Default::default()
                },
                "concurrency",
            ),
            (
                RunParams {
                    concurrency: Some(257),
                    ..Default::default()
                },
                "concurrency",
            ),
            (
                RunParams {
                    visibility_timeout_ms: Some(0),
                    ..Default::default()
                },
                "visibility_timeout_ms",
            ),
            (
                RunParams {
                    poll_interval_ms: Some(1_001),
                    ..Default::default()
                },
                "poll_interval_ms",
            ),
            (
                RunParams {
                    pin_window_ms: Some(600_001),
                    ..Default::default()
                },
                "pin_window_ms",
            ),
            (
                RunParams {
                    lsn_wait_timeout_ms: Some(0),
                    ..Default::default()
                },
                "lsn_wait_timeout_ms",
            ),
        ];
        for (params, field) in cases {
            let error = RunSpec::from_params(&params, &defaults()).unwrap_err();
            assert_eq!(error.field(), Some(field), "{params:?}");
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn compare_defaults_to_every_strategy_and_rejects_repeats() {
        let spec = CompareSpec::from_params(&[], &RunParams::default(), &defaults()).unwrap();
        assert_eq!(spec.strategies, Strategy::ALL.to_vec());
        assert_eq!(spec.run.count, 10);
        let error = CompareSpec::from_params(
            &[Strategy::Primary, Strategy::Primary],
            &RunParams::default(),
            &defaults(),
        )
        .unwrap_err();
        assert_eq!(error.field(), Some("strategies"));
    }

    #[test]
    fn watch_interval_must_be_positive() {
        let params = RunParams {
            interval_ms: Some(0),
            ..Default::default()
        };
        let error = WatchSpec::from_params(&params, &defaults()).unwrap_err();
        assert_eq!(error.field(), Some("interval_ms"));
    }
}
