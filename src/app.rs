//! The service assembled from its parts: the state transports share, the two servers
//! (HTTP and gRPC) on their listeners, and the lab variant that starts a cluster first.
//!
//! Tests build the app exactly as `main` does, bound to port 0 (the zero2prod pattern), so
//! what they check is what users run.

use std::{net::SocketAddr, time::Duration};

use serde::Serialize;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    config::ServiceArgs,
    db::{Databases, ReplicaState},
    error::{Error, Result},
    lab::{DelayControl, Lab, LabOptions},
    probe::{ProbeEngine, ProbeOptions, ProbeResult, RunParams, RunReport, RunSpec},
};

/// What the transports share: the probe engine and, when running a lab, its delay link.
#[derive(Debug, Clone)]
pub struct AppState {
    engine: ProbeEngine,
    lab_delay: Option<DelayControl>,
}

/// Whether both databases can serve probes.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    /// Primary reachable, replica reachable, in recovery and streaming.
    pub ready: bool,
    pub primary: DatabaseReadiness,
    pub replica: DatabaseReadiness,
}

/// One database's part of [`Readiness`].
#[derive(Debug, Clone, Serialize)]
pub struct DatabaseReadiness {
    pub reachable: bool,
    /// The replica's recovery and WAL receiver state (absent for the primary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<ReplicaState>,
    pub error: Option<String>,
}

impl AppState {
    pub fn new(databases: Databases, lab_delay: Option<DelayControl>) -> Self {
        AppState {
            engine: ProbeEngine::new(databases),
            lab_delay,
        }
    }

    pub fn engine(&self) -> &ProbeEngine {
        &self.engine
    }

    /// One probe with caller-given limits (milliseconds; `None` for defaults).
    pub async fn probe(
        &self,
        visibility_timeout_ms: Option<u64>,
        poll_interval_ms: Option<u64>,
    ) -> Result<ProbeResult> {
        let options = ProbeOptions::from_millis(visibility_timeout_ms, poll_interval_ms)?;
        self.engine.probe(&options).await
    }

    pub async fn run(&self, params: &RunParams) -> Result<RunReport> {
        let spec = RunSpec::from_params(params)?;
        self.engine.run(&spec).await
    }

    /// The lab's current primary-to-replica delay; `None` when not running a lab.
    pub fn lab_delay(&self) -> Option<Duration> {
        self.lab_delay.as_ref().map(DelayControl::delay)
    }

    pub async fn readiness(&self) -> Readiness {
        let databases = self.engine.databases();
        let (primary, replica) = tokio::join!(databases.primary_ping(), databases.replica_state());
        let ready = primary.is_ok() && replica.as_ref().is_ok_and(ReplicaState::is_streaming);
        Readiness {
            ready,
            primary: DatabaseReadiness {
                reachable: primary.is_ok(),
                state: None,
                error: primary.err().map(|error| error.to_string()),
            },
            replica: match replica {
                Ok(state) => DatabaseReadiness {
                    reachable: true,
                    state: Some(state),
                    error: None,
                },
                Err(error) => DatabaseReadiness {
                    reachable: false,
                    state: None,
                    error: Some(error.to_string()),
                },
            },
        }
    }
}

/// The HTTP and gRPC servers, running until [`Servers::shutdown`].
#[derive(Debug)]
pub struct Servers {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: watch::Sender<bool>,
    http_task: JoinHandle<Result<()>>,
    grpc_task: JoinHandle<Result<()>>,
}

async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(Error::io(format!("binding the {what} address {addr}")))
}

impl Servers {
    /// Binds both addresses (port 0 picks a free port) and starts serving.
    pub async fn start(
        state: AppState,
        http_addr: SocketAddr,
        grpc_addr: SocketAddr,
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

    /// Stops accepting, lets requests in flight finish, and waits for both servers.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.http_task.await;
        let _ = self.grpc_task.await;
    }
}

/// `serve`: the service against databases someone else runs.
pub async fn start_service(
    primary_url: &str,
    replica_url: &str,
    service: &ServiceArgs,
    lab_delay: Option<DelayControl>,
) -> Result<(AppState, Servers)> {
    let databases = Databases::connect_lazy(primary_url, replica_url, &service.pool.settings())?;
    if !service.no_migrate {
        databases.migrate().await?;
        tracing::info!("migrations applied on the primary");
    }
    let state = AppState::new(databases, lab_delay);
    let servers = Servers::start(state.clone(), service.http_addr, service.grpc_addr).await?;
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
        &lab.replica_url(),
        service,
        Some(lab.delay_control()),
    )
    .await?;
    lab.apply_configured_delay().await?;
    Ok((lab, state, servers))
}
