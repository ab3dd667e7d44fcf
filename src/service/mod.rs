//! The service: what every transport calls. It holds the probe engine, the server's
//! default strategy, the pin-window memory of the Write API and, in a lab, the delay link's
//! control; each operation takes one request type ([`RunRequest`] and its kin) and validates it once, so
//! HTTP, gRPC and the CLI behave the same. Starting servers is [`crate::server`]'s job.

mod proxy_stats;
mod request;

pub use proxy_stats::{
    Evidence, ProxyCounters, ProxyCounts, ProxyReport, ProxyStats, QueryCounts, QueryReport,
    ReadRecord, ReplayVerdict,
};

pub use request::{
    CompareRequest, DelayRequest, FailoverRequest, ProbeParams, ProbeRequest, ReadRequest,
    RunRequest, Schedule, ServerAction, ServerRequest, StrategyParams, WatchRequest, WriteRequest,
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
    lab::{DelaySettings, Lab, LabStatus, Promotion, ServerStatus},
    probe::{
        CompareReport, LagReport, LostWrites, MetricsSnapshot, ProbeEngine, ProbeResult,
        ReadContext, ReadOutcome, RunReport, WriteOutcome,
    },
    settings::{self, PoolSettings, StrategyDefaults},
};

/// What the transports share; cheap to clone.
#[derive(Debug, Clone)]
pub struct Service {
    engine: ProbeEngine,
    lab: Option<Arc<Lab>>,
    defaults: StrategyDefaults,
    /// client id -> when it last wrote through the Write API (pin-window across calls).
    last_writes: Arc<Mutex<HashMap<String, Instant>>>,
    /// What the proxy in front of the same databases records.
    proxy_stats: ProxyStats,
}

/// What a failover did, and what it cost: the acknowledged writes the new primary lacks.
#[derive(Debug, Clone, Serialize)]
pub struct FailoverReport {
    #[serde(flatten)]
    pub promotion: Promotion,
    #[serde(flatten)]
    pub lost: LostWrites,
}

/// Whether the databases can serve probes.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Primary reachable, and at least one replica, every one reachable, in recovery and
    /// streaming.
    pub ready: bool,
    /// The servers that keep it from being ready, by name.
    pub not_ready: Vec<String>,
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
    pub fn new(databases: Databases, lab: Option<Arc<Lab>>, defaults: StrategyDefaults) -> Self {
        Service {
            engine: ProbeEngine::new(databases),
            lab,
            defaults,
            last_writes: Arc::default(),
            proxy_stats: ProxyStats::new(settings::PROXY_AUDIT_QUERIES.default as usize),
        }
    }

    /// The same service, its proxy statistics keeping at most `max_queries` queries.
    pub fn with_proxy_audit_queries(mut self, max_queries: usize) -> Self {
        self.proxy_stats = ProxyStats::new(max_queries);
        self
    }

    /// Where the proxy records its reads.
    pub fn proxy_stats(&self) -> &ProxyStats {
        &self.proxy_stats
    }

    /// The proxy's counters and its per-query audit, at-risk queries first.
    pub fn proxy_report(&self) -> ProxyReport {
        self.proxy_stats.report()
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

    /// The same service keeping the last `capacity` probes for the `/test/` page.
    pub fn with_history(mut self, capacity: usize) -> Self {
        self.engine = self.engine.with_history(capacity);
        self
    }

    /// The strategy of a request that names none.
    pub fn default_strategy(&self) -> settings::Strategy {
        self.defaults.strategy
    }

    /// The last probes the engine ran, oldest first.
    pub fn history(&self) -> Vec<Arc<ProbeResult>> {
        self.engine.history().snapshot()
    }

    /// How many probes [`Service::history`] keeps at most.
    pub fn history_capacity(&self) -> usize {
        self.engine.history().capacity()
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

    fn lab(&self) -> Result<&Lab> {
        self.lab.as_deref().ok_or_else(|| {
            Error::FailedPrecondition(
                "this server runs no lab (lagprobe serve): there are no lab servers or delay \
                 link to read or change; with docker compose, use docker and \
                 NETEM_DELAY_MS instead"
                    .into(),
            )
        })
    }

    /// The lab's delay link settings.
    pub fn delay(&self) -> Result<DelaySettings> {
        Ok(self.lab()?.delay_control().settings())
    }

    /// Changes the lab's delay link live: the fields the request gives, nothing else.
    pub fn set_delay(&self, request: &DelayRequest) -> Result<DelaySettings> {
        let control = self.lab()?.delay_control();
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

    /// Every lab server and the delay link, as they are now.
    pub async fn lab_status(&self) -> Result<LabStatus> {
        Ok(self.lab()?.status().await)
    }

    /// Every lab server's state as the lab knows it, without querying the servers.
    pub fn lab_server_states(&self) -> Result<Vec<ServerStatus>> {
        Ok(self.lab()?.server_states())
    }

    /// Stops, starts, restarts or kills one lab server.
    pub async fn control_server(&self, request: &ServerRequest) -> Result<ServerStatus> {
        request.validate()?;
        let lab = self.lab()?;
        let name = request.name.as_str();
        let status = match request.action {
            ServerAction::Stop(mode) => lab.stop_server(name, mode).await?,
            ServerAction::Start => lab.start_server(name).await?,
            ServerAction::Restart(mode) => lab.restart_server(name, mode).await?,
            ServerAction::Kill => lab.kill_server(name).await?,
        };
        Ok(status)
    }

    /// Kills the primary, promotes a replica, re-points the service's writes and reads at
    /// the new arrangement, and counts the acknowledged writes the new primary lacks.
    pub async fn failover(&self, request: &FailoverRequest) -> Result<FailoverReport> {
        request.validate()?;
        let lab = self.lab()?;
        let promotion = lab.failover(&request.promote).await?;
        // Every write acknowledged until now came from the old primary: the pools still
        // point at it, dead, so nothing has been written since it was killed.
        let acknowledged = self.engine.acked_writes();
        let databases = self.engine.databases();
        databases.repoint(&lab.primary_url(), &lab.replica_urls())?;
        let lost = self.engine.lost_writes(&acknowledged).await?;
        tracing::warn!(
            acknowledged = lost.acknowledged,
            lost = lost.lost,
            lost_span_ms = lost.lost_span_ms,
            "failover: acknowledged writes the new primary does not have"
        );
        let mut promotion = promotion;
        if request.rejoin {
            lab.rejoin(&promotion.former_primary).await?;
            databases.repoint(&lab.primary_url(), &lab.replica_urls())?;
            promotion.rejoined = true;
        }
        Ok(FailoverReport { promotion, lost })
    }

    /// The lab's current primary-to-replica delay in ms; `None` when not running a lab.
    pub fn lab_delay_ms(&self) -> Option<u64> {
        self.lab
            .as_ref()
            .map(|lab| lab.delay_control().delay().as_millis() as u64)
    }

    pub async fn readiness(&self) -> Readiness {
        let databases = self.engine.databases();
        let primary = databases.primary_ping().await;
        let mut replicas = Vec::new();
        for replica in databases.replicas().iter() {
            let state = databases.replica_state(replica).await;
            replicas.push(DatabaseReadiness {
                name: replica.name.clone(),
                reachable: state.is_ok(),
                error: state.as_ref().err().map(ToString::to_string),
                state: state.ok(),
            });
        }
        let mut not_ready: Vec<String> = replicas
            .iter()
            .filter(|replica| {
                !replica
                    .state
                    .as_ref()
                    .is_some_and(ReplicaState::is_streaming)
            })
            .map(|replica| replica.name.clone())
            .collect();
        if primary.is_err() {
            not_ready.insert(0, "primary".into());
        }
        let ready = not_ready.is_empty() && !replicas.is_empty();
        Readiness {
            ready,
            not_ready,
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
