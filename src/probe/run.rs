//! A run: many probes on a schedule, with bounded concurrency, gathered into one report.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use super::{ProbeEngine, ProbeOptions, ProbeResult, RunSummary, checked_millis};
use crate::error::{Error, Result};

/// A run's parameters as a caller gives them: `None` means "the default".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunParams {
    pub count: Option<u64>,
    pub interval_ms: Option<u64>,
    pub visibility_timeout_ms: Option<u64>,
    pub poll_interval_ms: Option<u64>,
    pub concurrency: Option<u64>,
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

impl RunSpec {
    pub const MAX_COUNT: u64 = 10_000;
    pub const MAX_CONCURRENCY: u64 = 256;

    /// Validates caller input; errors name the offending field.
    pub fn from_params(params: &RunParams) -> Result<Self> {
        let bounded = |field: &'static str, value: Option<u64>, max: u64, default: u64| {
            let value = value.unwrap_or(default);
            if (1..=max).contains(&value) {
                Ok(value as u32)
            } else {
                Err(Error::invalid(
                    field,
                    format!("{value} is out of range 1..={max}"),
                ))
            }
        };
        Ok(RunSpec {
            count: bounded("count", params.count, Self::MAX_COUNT, 1)?,
            interval: checked_millis(
                "interval_ms",
                params.interval_ms,
                0..=60_000,
                Duration::ZERO,
            )?,
            concurrency: bounded("concurrency", params.concurrency, Self::MAX_CONCURRENCY, 1)?,
            probe: ProbeOptions::from_millis(
                params.visibility_timeout_ms,
                params.poll_interval_ms,
            )?,
        })
    }
}

/// Every probe of a run, in start order, and their summary.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    pub probes: Vec<ProbeResult>,
    pub summary: RunSummary,
}

impl ProbeEngine {
    /// Starts probes every `spec.interval` with at most `spec.concurrency` in flight. The
    /// first probe that cannot write to the primary ends the run with its error, since
    /// the rest would fail the same way; dropping the future cancels probes in flight.
    pub async fn run(&self, spec: &RunSpec) -> Result<RunReport> {
        let started = Instant::now();
        let slots = Arc::new(Semaphore::new(spec.concurrency as usize));
        let mut in_flight = JoinSet::new();
        let mut probes = Vec::with_capacity(spec.count as usize);

        for index in 0..spec.count {
            tokio::time::sleep_until(started + spec.interval * index).await;
            let slot = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the run never closes its semaphore");
            while let Some(done) = in_flight.try_join_next() {
                probes.push(finished(done)?);
            }
            let engine = self.clone();
            let options = spec.probe;
            in_flight.spawn(async move {
                let outcome = engine.probe(&options).await;
                drop(slot);
                (index, outcome)
            });
        }
        while let Some(done) = in_flight.join_next().await {
            probes.push(finished(done)?);
        }
        probes.sort_by_key(|(index, _)| *index);
        let probes: Vec<ProbeResult> = probes.into_iter().map(|(_, probe)| probe).collect();
        let summary = RunSummary::of(&probes, started.elapsed());
        Ok(RunReport { probes, summary })
    }
}

fn finished(
    done: Result<(u32, Result<ProbeResult>), tokio::task::JoinError>,
) -> Result<(u32, ProbeResult)> {
    match done {
        Ok((index, outcome)) => Ok((index, outcome?)),
        // A probe task only ends abnormally if it panicked; surface that loudly.
        Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_one_sequential_probe() {
        let spec = RunSpec::from_params(&RunParams::default()).unwrap();
        assert_eq!(spec.count, 1);
        assert_eq!(spec.concurrency, 1);
        assert_eq!(spec.interval, Duration::ZERO);
        assert_eq!(spec.probe, ProbeOptions::default());
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
        ];
        for (params, field) in cases {
            let error = RunSpec::from_params(&params).unwrap_err();
            assert_eq!(error.field(), Some(field), "{params:?}");
            assert!(error.to_string().contains(field), "{error}");
        }
    }

    #[test]
    fn edge_values_are_accepted() {
        let spec = RunSpec::from_params(&RunParams {
            count: Some(10_000),
            interval_ms: Some(0),
            visibility_timeout_ms: Some(60_000),
            poll_interval_ms: Some(1),
            concurrency: Some(256),
        })
        .unwrap();
        assert_eq!(spec.count, 10_000);
        assert_eq!(spec.concurrency, 256);
    }
}
