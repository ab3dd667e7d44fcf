//! The service assembled from its parts: the state transports share (probe engine, server
//! defaults, pin-window memory, the lab's delay link), the two servers (HTTP and gRPC) with
//! the heartbeat beside them, and the lab variant that starts a cluster first.
//!
//! Every request-level operation lives here once, so gRPC and HTTP validate and behave the
//! same. Tests build the app exactly as `main` does, bound to port 0 (the zero2prod pattern).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    config::ServiceArgs,
    db::{
        Databases, ReplicaState,
        strategy::{ReadContext, Strategy},
    },
    error::{Error, Result},
    lab::{DelayControl, DelaySettings, Lab, LabOptions},
    lsn::Lsn,
    probe::{
        CompareReport, CompareSpec, LagReport, ProbeEngine, ProbeOptions, ProbeResult, ReadOutcome,
        RunParams, RunReport, RunSpec, WatchSpec, WriteOutcome,
    },
};

/// Clients remembered for pin-window at most; the oldest are forgotten first.
const MAX_PINNED_CLIENTS: usize = 100_000;
const MAX_VALUE_CHARS: usize = 1000;
const MAX_CLIENT_ID_CHARS: usize = 200;
const MAX_DELAY_MS: u64 = 600_000;

/// What the transports share.
#[derive(Debug, Clone)]
pub struct AppState {
    engine: ProbeEngine,
    lab_delay: Option<DelayControl>,
    defaults: ProbeOptions,
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

fn checked_text(field: &'static str, text: &str, max_chars: usize) -> Result<()> {
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(Error::invalid(
            field,
            format!("{chars} characters; at most {max_chars}"),
        ));
    }
    Ok(())
}

/// Parses a consistency token; empty means none.
pub fn parse_min_lsn(text: &str) -> Result<Option<Lsn>> {
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|error: crate::lsn::LsnParseError| Error::invalid("min_lsn", error.to_string()))
}

impl AppState {
    pub fn new(
        databases: Databases,
        lab_delay: Option<DelayControl>,
        defaults: ProbeOptions,
    ) -> Self {
        AppState {
            engine: ProbeEngine::new(databases),
            lab_delay,
            defaults,
            last_writes: Arc::default(),
        }
    }

    pub fn engine(&self) -> &ProbeEngine {
        &self.engine
    }

    /// One probe; `count`, `interval_ms` and `concurrency` of `params` are ignored.
    pub async fn probe(&self, params: &RunParams) -> Result<ProbeResult> {
        let options = params.probe_options(&self.defaults)?;
        self.engine.probe(&options).await
    }

    pub async fn run(&self, params: &RunParams) -> Result<RunReport> {
        let spec = RunSpec::from_params(params, &self.defaults)?;
        self.engine.run(&spec).await
    }

    pub async fn compare(
        &self,
        strategies: &[Strategy],
        params: &RunParams,
    ) -> Result<CompareReport> {
        let spec = CompareSpec::from_params(strategies, params, &self.defaults)?;
        self.engine.compare(&spec).await
    }

    pub fn watch(
        &self,
        params: &RunParams,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<ProbeResult>>> {
        let spec = WatchSpec::from_params(params, &self.defaults)?;
        Ok(self.engine.watch(spec))
    }

    pub async fn lag(&self) -> Result<LagReport> {
        self.engine.lag().await
    }

    /// Writes a value; remembers the write time of `client_id` for pin-window reads.
    pub async fn write(&self, value: &str, client_id: &str) -> Result<WriteOutcome> {
        checked_text("value", value, MAX_VALUE_CHARS)?;
        checked_text("client_id", client_id, MAX_CLIENT_ID_CHARS)?;
        let outcome = self.engine.write_value(value).await?;
        if !client_id.is_empty() {
            let mut last_writes = self.last_writes.lock().unwrap_or_else(|p| p.into_inner());
            if last_writes.len() >= MAX_PINNED_CLIENTS {
                let window = self.defaults.strategy_settings.pin_window;
                last_writes.retain(|_, wrote| wrote.elapsed() < window);
                if last_writes.len() >= MAX_PINNED_CLIENTS {
                    last_writes.clear();
                }
            }
            last_writes.insert(client_id.to_owned(), Instant::now());
        }
        Ok(outcome)
    }

    /// Reads a key where the strategy says, honouring a consistency token and the client's
    /// pin window.
    pub async fn read(
        &self,
        key: &str,
        min_lsn: &str,
        client_id: &str,
        params: &RunParams,
    ) -> Result<ReadOutcome> {
        if key.is_empty() {
            return Err(Error::invalid("key", "a key from a write is required"));
        }
        checked_text("key", key, 64)?;
        checked_text("client_id", client_id, MAX_CLIENT_ID_CHARS)?;
        let min_lsn = parse_min_lsn(min_lsn)?;
        let options = params.probe_options(&self.defaults)?;
        let last_write = (!client_id.is_empty())
            .then(|| {
                self.last_writes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(client_id)
                    .copied()
            })
            .flatten();
        self.engine
            .read_value(
                key,
                options.strategy,
                &options.strategy_settings,
                ReadContext {
                    min_lsn,
                    last_write,
                },
            )
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

    /// Changes the lab's delay link live.
    pub fn set_delay(&self, settings: DelaySettings) -> Result<DelaySettings> {
        let control = self.lab()?;
        for (field, value) in [("delay_ms", settings.delay), ("jitter_ms", settings.jitter)] {
            if value > Duration::from_millis(MAX_DELAY_MS) {
                return Err(Error::invalid(
                    field,
                    format!("{} is out of range 0..={MAX_DELAY_MS}", value.as_millis()),
                ));
            }
        }
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
}

/// The HTTP and gRPC servers and the heartbeat, running until [`Servers::shutdown`].
#[derive(Debug)]
pub struct Servers {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: watch::Sender<bool>,
    http_task: JoinHandle<Result<()>>,
    grpc_task: JoinHandle<Result<()>>,
    heartbeat: Option<JoinHandle<()>>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("binding the {what} address {addr}")))
}

/// Moves the heartbeat row every `period`; failures are logged once per outage.
async fn heartbeat(databases: Databases, period: Duration) {
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match databases.beat().await {
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

impl Servers {
    /// Binds both addresses (port 0 picks a free port) and starts serving.
    pub async fn start(
        state: AppState,
        http_addr: SocketAddr,
        grpc_addr: SocketAddr,
        heartbeat_period: Option<Duration>,
    ) -> Result<Servers> {
        let http = bind(http_addr, "HTTP").await?;
        let grpc = bind(grpc_addr, "gRPC").await?;
        let http_addr = http
            .local_addr()
            .map_err(Error::io("reading the HTTP address"))?;
        let grpc_addr = grpc
            .local_addr()
            .map_err(Error::io("reading the gRPC address"))?;
        let (stop, stopped) = watch::channel(false);
        let until_stopped = |mut stopped: watch::Receiver<bool>| async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let heartbeat = heartbeat_period
            .map(|period| tokio::spawn(heartbeat(state.engine.databases().clone(), period)));
        let http_task = tokio::spawn(crate::http::serve(
            http,
            state.clone(),
            until_stopped(stopped.clone()),
        ));
        let grpc_task = tokio::spawn(crate::grpc::serve(grpc, state, until_stopped(stopped)));
        tracing::info!(%http_addr, %grpc_addr, "serving");
        Ok(Servers {
            http_addr,
            grpc_addr,
            stop,
            http_task,
            grpc_task,
            heartbeat,
        })
    }

    /// Resolves if a server stops on its own (an accept error), with what stopped it.
    pub async fn failed(&mut self) -> Error {
        let finished = tokio::select! {
            finished = &mut self.http_task => finished,
            finished = &mut self.grpc_task => finished,
        };
        match finished {
            Ok(Err(error)) => error,
            Ok(Ok(())) => Error::FailedPrecondition("a server stopped unexpectedly".into()),
            Err(join_error) => std::panic::resume_unwind(join_error.into_panic()),
        }
    }

    /// Stops accepting, lets requests in flight finish, and waits for both servers. Open
    /// streams (Watch) end with the servers.
    pub async fn shutdown(mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.abort();
        }
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.http_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), &mut self.grpc_task).await;
        self.http_task.abort();
        self.grpc_task.abort();
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        if let Some(heartbeat) = &self.heartbeat {
            heartbeat.abort();
        }
        self.http_task.abort();
        self.grpc_task.abort();
    }
}

/// `serve`: the service against databases someone else runs.
pub async fn start_service(
    primary_url: &str,
    replicas: &[(String, String)],
    service: &ServiceArgs,
    lab_delay: Option<DelayControl>,
) -> Result<(AppState, Servers)> {
    let databases = Databases::connect_lazy(primary_url, replicas, &service.pool.settings())?;
    if !service.no_migrate {
        databases.migrate().await?;
        tracing::info!("migrations applied on the primary");
    }
    let state = AppState::new(databases, lab_delay, service.strategy.probe_defaults());
    let heartbeat = (service.heartbeat_ms > 0).then(|| Duration::from_millis(service.heartbeat_ms));
    let servers = Servers::start(
        state.clone(),
        service.http_addr,
        service.grpc_addr,
        heartbeat,
    )
    .await?;
    Ok((state, servers))
}

/// `lab`: start the cluster, migrate, engage the delay, then serve.
pub async fn start_lab_service(
    lab_options: &LabOptions,
    service: &ServiceArgs,
) -> Result<(Lab, AppState, Servers)> {
    let lab = Lab::start(lab_options).await?;
    let (state, servers) = start_service(
        &lab.primary_url(),
        &lab.replica_urls(),
        service,
        Some(lab.delay_control()),
    )
    .await?;
    lab.apply_configured_delay().await?;
    Ok((lab, state, servers))
}
