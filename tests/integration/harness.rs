//! The shared test harness: a real lab cluster (primary, streaming replica, delay link) on
//! free ports in a temporary directory, and the real service built from it exactly as
//! `lagprobe lab` builds it, bound to port 0.

use std::{net::SocketAddr, time::Duration};

use lagprobe::{
    app::{self, AppState, Servers},
    config::{PoolArgs, ServiceArgs, StrategyArgs},
    grpc::pb::consistency_probe_client::ConsistencyProbeClient,
    lab::{Lab, LabOptions},
};
use tonic::transport::Channel;

/// How much sooner than the link's delay a write may show up, counted from the COMMIT's
/// acknowledgement. The primary ships a commit's WAL as soon as it is flushed, a moment
/// before the acknowledgement reaches the client; on a loaded 2-core machine that moment
/// (the client's own scheduling included) has been seen at 0.1 ms. Measured from the
/// INSERT being sent, no slack is needed, and the tests check that too.
pub const COMMIT_ACK_SLACK_MS: f64 = 5.0;

/// A lab cluster and the service on it. Dropping it stops the servers at once; tests that
/// finish call [`TestApp::shutdown`] to also check the orderly path.
pub struct TestApp {
    pub lab: Lab,
    pub state: AppState,
    pub servers: Servers,
    pub http: reqwest::Client,
}

pub fn service_args() -> ServiceArgs {
    ServiceArgs {
        http_addr: "127.0.0.1:0".parse().unwrap(),
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        no_migrate: false,
        heartbeat_ms: 100,
        pool: PoolArgs {
            pool_size: 32,
            // Short, so an outage shows up as a replica error quickly.
            acquire_timeout_ms: 1500,
        },
        strategy: StrategyArgs::default(),
    }
}

/// Starts a lab with `delay_ms` from primary to replica and serves on it. A machine without
/// PostgreSQL's server binaries fails here with the message that says how to install them.
pub async fn spawn_app(delay_ms: u64) -> TestApp {
    spawn_app_with(LabOptions {
        delay: Duration::from_millis(delay_ms),
        ..LabOptions::default()
    })
    .await
}

/// [`spawn_app`] with any lab options (several replicas, synchronous replicas).
pub async fn spawn_app_with(options: LabOptions) -> TestApp {
    let (lab, state, servers) = app::start_lab_service(&options, &service_args())
        .await
        .unwrap_or_else(|error| panic!("could not start the lab cluster for this test: {error}"));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    TestApp {
        lab,
        state,
        servers,
        http,
    }
}

async fn channel_to(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gRPC server")
}

/// A client for a gRPC server at `addr` (a second service a test starts itself).
pub async fn grpc_client_at(addr: SocketAddr) -> ConsistencyProbeClient<Channel> {
    ConsistencyProbeClient::new(channel_to(addr).await)
}

impl TestApp {
    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.servers.http_addr)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.servers.grpc_addr
    }

    pub async fn grpc_channel(&self) -> Channel {
        channel_to(self.grpc_addr()).await
    }

    pub async fn grpc(&self) -> ConsistencyProbeClient<Channel> {
        grpc_client_at(self.grpc_addr()).await
    }

    pub async fn get_json(&self, path: &str) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self.http.get(self.http_url(path)).send().await.unwrap();
        let status = response.status();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }

    pub async fn shutdown(self) {
        self.servers.shutdown().await;
        self.lab.shutdown().await;
    }
}
