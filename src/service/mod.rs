//! The service: what every transport calls. It holds the probe engine, the server's
//! default strategy, the pin-window memory of the Write API and, in a lab, the delay link's
//! control; each operation takes one request type ([`RunRequest`] and its kin) and validates it once, so
//! HTTP, gRPC and the CLI behave the same. Starting servers is [`crate::server`]'s job.

mod request;

pub use request::{
    CompareRequest, DelayRequest, ProbeParams, ProbeRequest, ReadRequest, RunRequest, Schedule,
    StrategyParams, WatchRequest, WriteRequest,
};

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    db::{Databases, ReplicaState},
    error::{Error, Result},
    lab::{DelayControl, DelaySettings},
    probe::{
        CompareReport, LagReport, MetricsSnapshot, ProbeEngine, ProbeResult, ReadContext,
        ReadOutcome, RunReport, WriteOutcome,
    },
    settings::{self, PoolSettings, StrategyDefaults},
};

/// What the transports share; cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    engine: ProbeEngine,
    lab_delay: Option<DelayControl>,
    defaults: StrategyDefaults,
    /// client id -> when it last wrote through the Write API (pin-window across calls).
    last_writes: Arc<Mutex<HashMap<String, Instant>>>,
}

/// Whether the databases can serve probes.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Primary reachable, and every replica reachable, in recovery and streaming.
    pub ready: bool,
    pub primary: DatabaseReadiness,
    pub replicas: Vec<DatabaseReadiness>,
}

/// One database's part of [`Readiness`].
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseReadiness {
    pub name: String,
    pub reachable: bool,
    /// A replica's recovery and WAL receiver state (absent for the primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ReplicaState>,
    pub error: Option<String>,
}

impl Service {
    pub fn new(
        databases: Databases,
        lab_delay: Option<DelayControl>,
        defaults: StrategyDefaults,
    ) -> Self {
        Service {
            engine: ProbeEngine::new(databases),
            lab_delay,
            defaults,
            last_writes: Arc::default(),
        }
    }

    /// A service on databases someone else runs, without servers (`lagprobe run`).
    pub fn connect(
        primary_url: &str,
        replica_urls: &[String],
        pool: &PoolSettings,
        defaults: StrategyDefaults,
    ) -> Result<Self> {
        let replicas = crate::db::name_replicas(replica_urls);
        let databases = Databases::connect_lazy(primary_url, &replicas, pool)?;
        Ok(Service::new(databases, None, defaults))
    }

    pub fn engine(&self) -> &ProbeEngine {
        &self.engine
    }

    /// The probe counters behind `/metrics`.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.engine.metrics().snapshot()
    }

    pub async fn probe(&self, request: &ProbeRequest) -> Result<ProbeResult> {
        let options = request.spec(&self.defaults)?;
        self.engine.probe(&options).await
    }

    pub async fn run(&self, request: &RunRequest) -> Result<RunReport> {
        let spec = request.spec(&self.defaults)?;
        self.engine.run(&spec).await
    }

    pub async fn compare(&self, request: &CompareRequest) -> Result<CompareReport> {
        let spec = request.spec(&self.defaults)?;
        self.engine.compare(&spec).await
    }

    pub fn watch(
        &self,
        request: &WatchRequest,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<ProbeResult>>> {
        let spec = request.spec(&self.defaults)?;
        Ok(self.engine.watch(spec))
    }

    pub async fn lag(&self) -> Result<LagReport> {
        self.engine.lag().await
    }

    /// Writes a value; remembers the write time of `client_id` for pin-window reads.
    pub async fn write(&self, request: &WriteRequest) -> Result<WriteOutcome> {
        request.validate()?;
        let outcome = self.engine.write_value(&request.value).await?;
        if !request.client_id.is_empty() {
            let mut last_writes = self.last_writes.lock().unwrap_or_else(|p| p.into_inner());
            if last_writes.len() >= settings::PINNED_CLIENTS {
                last_writes.clear();
            }
            last_writes.insert(request.client_id.clone(), Instant::now());
        }
        Ok(outcome)
    }

    /// Reads a key where the strategy says, honouring a consistency token and the client's
    /// pin window.
    pub async fn read(&self, request: &ReadRequest) -> Result<ReadOutcome> {
        let (min_lsn, strategy, strategy_settings) = request.checked(&self.defaults)?;
        let last_write = (!request.client_id.is_empty())
            .then(|| {
                self.last_writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&request.client_id)
                    .copied()
            })
            .flatten();
        let context = ReadContext {
            min_lsn,
            last_write,
        };
        self.engine
            .read_value(&request.key, strategy, &strategy_settings, context)
            .await
    }

    fn lab(&self) -> Result<&DelayControl> {
        self.lab_delay.as_ref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this server runs no lab (lagprobe serve): there is no delay link to read or \
                 change; with docker compose, set NETEM_DELAY_MS instead"
                    .into(),
            )
        })
    }

    /// The lab's delay link settings.
    pub fn delay(&self) -> Result<DelaySettings> {
        Ok(self.lab()?.settings())
    }

    /// Changes the lab's delay link live: the fields the request gives, nothing else.
    pub fn set_delay(&self, request: &DelayRequest) -> Result<DelaySettings> {
        let control = self.lab()?;
        let settings = request.applied_to(control.settings())?;
        control.apply(settings);
        tracing::info!(
            delay_ms = settings.delay.as_millis() as u64,
            jitter_ms = settings.jitter.as_millis() as u64,
            link_down = settings.link_down,
            "delay link changed"
        );
        Ok(control.settings())
    }

    /// The lab's current primary-to-replica delay in ms; `None` when not running a lab.
    pub fn lab_delay_ms(&self) -> Option<u64> {
        self.lab_delay
            .as_ref()
            .map(|control| control.delay().as_millis() as u64)
    }

    pub async fn readiness(&self) -> Readiness {
        let databases = self.engine.databases();
        let primary = databases.primary_ping().await;
        let mut replicas = Vec::new();
        for replica in databases.replicas() {
            let state = databases.replica_state(replica).await;
            replicas.push(DatabaseReadiness {
                name: replica.name.clone(),
                reachable: state.is_ok(),
                error: state.as_ref().err().map(ToString::to_string),
                state: state.ok(),
            });
        }
        let ready = primary.is_ok()
            && replicas.iter().all(|replica| {
                replica
                    .state
                    .as_ref()
                    .is_some_and(ReplicaState::is_streaming)
            });
        Readiness {
            ready,
            primary: DatabaseReadiness {
                name: "primary".into(),
                reachable: primary.is_ok(),
                state: None,
                error: primary.err().map(|error| error.to_string()),
            },
            replicas,
        }
    }

    /// Moves the heartbeat row every `period`, forever; failures are logged once per
    /// outage.
    pub async fn heartbeat(self, period: Duration) {
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut failing = false;
        loop {
            ticks.tick().await;
            match self.engine.databases().beat().await {
                Ok(()) if failing => {
                    tracing::info!("heartbeat writes work again");
                    failing = false;
                }
                Ok(()) => {}
                Err(error) if !failing => {
                    tracing::warn!(%error, "heartbeat write failed; heartbeat lag will grow");
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}
