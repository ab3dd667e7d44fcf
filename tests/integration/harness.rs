//! The shared test harness: a real lab cluster (primary, streaming replica, delay link) on
//! free ports in a temporary directory, and the real service built from it exactly as
//! `lagprobe lab` builds it, bound to port 0.

use std::{net::SocketAddr, time::Duration};

use lagprobe::{
    Lab,
    pb::consistency_probe_client::ConsistencyProbeClient,
    server::{self, App},
    service::Service,
    settings::{DatabaseSettings, LabSettings, PoolSettings, Settings},
};
use tokio::process::Command;
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
    pub app: App,
    pub http: reqwest::Client,
}

/// The app's settings for `databases`, as `main` would build them with default flags but
/// on free ports, and with a short acquire timeout so an outage shows up quickly.
pub fn settings(databases: DatabaseSettings) -> Settings {
    let mut settings = Settings::on_free_ports(databases);
    settings.pool = PoolSettings {
        max_connections: 32,
        acquire_timeout: Duration::from_millis(1500),
    };
    settings
}

/// Starts a lab with `delay_ms` from primary to replica and serves on it. A machine without
/// PostgreSQL's server binaries fails here with the message that says how to install them.
pub async fn spawn_app(delay_ms: u64) -> TestApp {
    spawn_app_with(LabSettings::with_delay(Duration::from_millis(delay_ms))).await
}

/// [`spawn_app`] with any lab settings (several replicas, synchronous replicas).
pub async fn spawn_app_with(lab: LabSettings) -> TestApp {
    let app = server::build(settings(DatabaseSettings::Lab(lab)))
        .await
        .unwrap_or_else(|error| panic!("could not start the lab cluster for this test: {error}"));
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    TestApp { app, http }
}

/// A second service on databases someone else runs (here: a test's lab), without a lab of
/// its own.
pub async fn spawn_service(primary_url: String, replica_urls: Vec<String>, migrate: bool) -> App {
    let mut settings = settings(DatabaseSettings::External {
        primary_url,
        replica_urls,
    });
    settings.migrate = migrate;
    server::build(settings)
        .await
        .expect("the service starts, whatever state its databases are in")
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
    pub fn lab(&self) -> &Lab {
        self.app.lab().expect("test apps run a lab")
    }

    pub fn service(&self) -> &Service {
        self.app.service()
    }

    /// The lab's replica URLs, as `serve --replica-url` takes them.
    pub fn replica_urls(&self) -> Vec<String> {
        self.lab()
            .replica_urls()
            .into_iter()
            .map(|(_, url)| url)
            .collect()
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.app.http_addr)
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.app.grpc_addr
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

    pub async fn post_json(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (reqwest::StatusCode, serde_json::Value) {
        let response = self
            .http
            .post(self.http_url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.json().await.expect("a JSON body");
        (status, body)
    }

    /// The lab server called `name`, as `GET /api/lab` reports it.
    pub async fn lab_server(&self, name: &str) -> serde_json::Value {
        let (status, body) = self.get_json("/api/lab").await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
        body["servers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|server| server["name"] == name)
            .unwrap_or_else(|| panic!("no server {name} in {body}"))
            .clone()
    }

    pub async fn shutdown(self) {
        self.app.shutdown().await;
    }
}

/// A client script in `tests/integration/clients/`, written against a Python library nobody
/// here wrote, and what it needs installed.
pub struct PythonClient {
    pub script: &'static str,
    /// Imported first (`import {modules}`), so that a missing library fails the test with
    /// `install_hint` instead of a traceback.
    pub modules: &'static str,
    pub install_hint: &'static str,
}

impl PythonClient {
    /// Runs the script with `args` (without blocking the runtime); its stdout is one JSON
    /// document.
    pub async fn run(&self, args: &[&str]) -> serde_json::Value {
        self.check_modules().await;
        let script = format!(
            "{}/tests/integration/clients/{}",
            env!("CARGO_MANIFEST_DIR"),
            self.script
        );
        let output = Command::new("python3")
            .arg(script)
            .args(args)
            .kill_on_drop(true)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{} failed: {stderr}", self.script);
        serde_json::from_slice(&output.stdout).unwrap_or_else(|error| {
            panic!(
                "{} printed no JSON ({error}): {}",
                self.script,
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    async fn check_modules(&self) {
        let import = Command::new("python3")
            .args(["-c", &format!("import {}", self.modules)])
            .output()
            .await
            .expect("python3 runs (Debian: apt-get install python3)");
        assert!(import.status.success(), "{}", self.install_hint);
    }
}
