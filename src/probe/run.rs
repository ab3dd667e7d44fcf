//! Runs: many probes on a schedule with bounded concurrency; comparisons of strategies on
//! one interleaved workload; and a stream of probes for watching.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use tokio::{sync::Semaphore, task::JoinSet, time::Instant};

use super::{ProbeEngine, ProbeOptions, ProbeResult, ReplicaSummary, RunSummary};
use crate::{error::Result, settings::Strategy};

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
