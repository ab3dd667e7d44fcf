//! The lab as a fault lab: servers stopped, started, killed and failed over through the
//! HTTP and gRPC APIs while the service keeps answering, lost writes counted and checked
//! with psql against the new primary, and a clean exit after all of it.

use std::{process::Command, time::Duration};

use lagprobe::{
    pb::{self, Verdict},
    service::{ProbeRequest, WriteRequest},
    settings::{LabSettings, Strategy},
};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::{
    harness::{TestApp, grpc_client_at, spawn_app, spawn_app_with, spawn_service},
    lab::{alive, eventually, postmaster_pid},
};

/// Polls `GET /readyz` until it answers `expected`, for at most `within`.
async fn ready_within(app: &TestApp, expected: StatusCode, within: Duration) -> Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (status, body) = app.get_json("/readyz").await;
        if status == expected {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "/readyz still {status} after {within:?}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next item of a Watch stream.
async fn next_verdict(stream: &mut tonic::Streaming<pb::ProbeResult>) -> Verdict {
    tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .expect("the stream keeps sending")
        .expect("the stream is still open")
        .expect("an outage is an item, not the stream's end")
        .verdict()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replica_is_reported_and_comes_back_when_started() {
    let app = spawn_app(0).await;
    let mut watch = app
        .grpc()
        .await
        .watch(pb::WatchRequest {
            interval_ms: Some(100),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(next_verdict(&mut watch).await, Verdict::ReplicaError);

    let (status, stopped) = app
        .post_json("/api/lab/servers/replica1/stop", json!({"mode": "fast"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(
        stopped["log_tail"].as_str().unwrap().contains("shut down"),
        "{stopped}"
    );

    // The lab and the service stay up; readiness names the server; probes say why.
    let health = app.http.get(app.http_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let readiness = ready_within(&app, StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    assert_eq!(readiness["not_ready"], json!(["replica1"]), "{readiness}");
    let (status, probe) = app.get_json("/api/probe").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{probe}");
    assert_eq!(probe["verdict"], "replica_error", "{probe}");
    let mut saw_outage = false;
    for _ in 0..30 {
        if next_verdict(&mut watch).await == Verdict::ReplicaError {
            saw_outage = true;
            break;
        }
    }
    assert!(saw_outage, "Watch reported the replica outage");

    let (status, again) = app
        .post_json("/api/lab/servers/replica1/stop", json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{again}");

    let (status, started) = app
        .post_json("/api/lab/servers/replica1/start", json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    assert_eq!(started["state"], "running", "{started}");
    assert_eq!(started["port"], stopped["port"], "same port after a start");
    ready_within(&app, StatusCode::OK, Duration::from_secs(5)).await;
    let probe = app.service().probe(&ProbeRequest::default()).await.unwrap();
    assert!(probe.visible_after.is_some(), "{probe:?}");
    let mut recovered = false;
    for _ in 0..50 {
        if next_verdict(&mut watch).await != Verdict::ReplicaError {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "Watch carried on once the replica was back");
    let replica = app.lab_server("replica1").await;
    assert_eq!(replica["streaming"], true, "{replica}");
    drop(watch);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_restarts_and_the_replica_streams_from_it_again() {
    let app = spawn_app(0).await;
    let mut grpc = app.grpc().await;
    let killed = grpc
        .kill_server(pb::ServerName {
            name: "primary".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(killed.state(), pb::ServerState::Killed, "{killed:?}");
    let write = WriteRequest {
        value: "while down".into(),
        client_id: String::new(),
    };
    assert!(app.service().write(&write).await.is_err());
    let readiness = ready_within(&app, StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    assert_eq!(readiness["not_ready"][0], "primary", "{readiness}");

    let started = grpc
        .start_server(pb::ServerName {
            name: "primary".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.state(), pb::ServerState::Running, "{started:?}");
    assert!(
        started.pid.is_some() && !started.wal_lsn.is_empty(),
        "{started:?}"
    );
    ready_within(&app, StatusCode::OK, Duration::from_secs(10)).await;
    let written = app.service().write(&write).await.unwrap();
    let status = grpc
        .lab_status(pb::LabStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    let replica = status
        .servers
        .iter()
        .find(|s| s.name == "replica1")
        .unwrap();
    assert_eq!(replica.streaming, Some(true), "{replica:?}");
    assert!(!written.key.is_empty());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_unasked_is_reported_with_its_log_tail_and_the_lab_carries_on() {
    let app = spawn_app(0).await;
    let replica = postmaster_pid(&app.lab().data_dir().join("replica1"));
    // SAFETY: kill has no memory-safety preconditions; the pid is the lab's own postmaster.
    unsafe {
        libc::kill(replica, libc::SIGKILL);
    }
    assert!(eventually(|| !alive(replica)).await);
    let mut server = Value::Null;
    for _ in 0..100 {
        server = app.lab_server("replica1").await;
        if server["state"] == "exited" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server["state"], "exited", "{server}");
    assert!(
        server["exit_status"].as_str().unwrap().contains("9"),
        "{server}"
    );
    // The tail is the server's own log: it shows the replica starting up.
    assert!(
        server["log_tail"]
            .as_str()
            .unwrap()
            .contains("database system is ready to accept read-only connections"),
        "{server}"
    );
    let health = app.http.get(app.http_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let readiness = ready_within(&app, StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    assert_eq!(readiness["not_ready"], json!(["replica1"]), "{readiness}");
    // Nothing started it again by itself.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(app.lab_server("replica1").await["state"], "exited");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_servers_are_not_found_and_a_service_without_a_lab_refuses() {
    let app = spawn_app(0).await;
    // (path, body, status, field named)
    let refused = [
        (
            "/api/lab/servers/nope/stop",
            json!({}),
            StatusCode::NOT_FOUND,
            Some("name"),
        ),
        (
            "/api/lab/servers/replica1/pause",
            json!({}),
            StatusCode::NOT_FOUND,
            None,
        ),
        (
            "/api/lab/servers/replica1/stop",
            json!({"mode": "gentle"}),
            StatusCode::BAD_REQUEST,
            Some("mode"),
        ),
        (
            "/api/lab/servers/replica1/start",
            json!({"mode": "fast"}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            "/api/lab/failover",
            json!({"promote": "replica7"}),
            StatusCode::NOT_FOUND,
            Some("promote"),
        ),
        (
            "/api/lab/failover",
            json!({"promote": "primary"}),
            StatusCode::CONFLICT,
            None,
        ),
        (
            "/api/lab/failover",
            json!({}),
            StatusCode::BAD_REQUEST,
            Some("promote"),
        ),
    ];
    for (path, request, expected, field) in refused {
        let (status, body) = app.post_json(path, request.clone()).await;
        assert_eq!(status, expected, "{path} {request}: {body}");
        if let Some(field) = field {
            assert_eq!(body["field"], field, "{path} {request}: {body}");
        }
    }
    let (_, unknown) = app.post_json("/api/lab/servers/nope/stop", json!({})).await;
    assert!(
        unknown["error"].as_str().unwrap().contains("replica1"),
        "the error lists the servers there are: {unknown}"
    );
    let missing = app
        .grpc()
        .await
        .stop_server(pb::StopServerRequest {
            name: "nope".into(),
            mode: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    assert!(missing.message().contains("(name)"), "{missing:?}");
    // Nothing was touched.
    assert_eq!(app.lab_server("replica1").await["state"], "running");

    let service = spawn_service(app.lab().primary_url(), app.replica_urls(), false).await;
    let no_lab = reqwest::get(format!("http://{}/api/lab", service.http_addr))
        .await
        .unwrap();
    assert_eq!(no_lab.status(), StatusCode::CONFLICT);
    let no_lab = grpc_client_at(service.grpc_addr)
        .await
        .lab_status(pb::LabStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(no_lab.code(), tonic::Code::FailedPrecondition, "{no_lab:?}");
    service.shutdown().await;
    app.shutdown().await;
}

/// Writes through the service as fast as it answers, from `writers` tasks, until told to
/// stop; errors (the primary being down) are expected and retried.
fn write_load(
    app: &TestApp,
    writers: usize,
) -> (
    tokio::sync::watch::Sender<bool>,
    Vec<tokio::task::JoinHandle<u64>>,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let tasks = (0..writers)
        .map(|writer| {
            let service = app.service().clone();
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let mut acknowledged = 0;
                while !*stopped.borrow() {
                    let request = WriteRequest {
                        value: format!("load {writer}"),
                        client_id: String::new(),
                    };
                    match service.write(&request).await {
                        Ok(_) => acknowledged += 1,
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
                acknowledged
            })
        })
        .collect();
    (stop, tasks)
}

/// How many of `tokens` the server at `url` has, asked with psql.
fn rows_with_tokens(url: &str, tokens: &[String]) -> u64 {
    let list = tokens.join(",");
    let output = Command::new("psql")
        .args([url, "-At", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "SELECT count(*) FROM lagprobe.probe_write WHERE token = ANY(string_to_array('{list}', ','))"
        ))
        .output()
        .expect("psql runs (Debian: apt-get install postgresql-client)");
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_at_1000_ms_loses_the_last_second_of_acknowledged_writes() {
    let app = spawn_app(1000).await;
    let dir = app.lab().data_dir().to_path_buf();
    let (stop, writers) = write_load(&app, 4);
    tokio::time::sleep(Duration::from_millis(2500)).await;

    let (status, report) = app
        .post_json("/api/lab/failover", json!({"promote": "replica1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["promoted"], "replica1");
    assert_eq!(report["former_primary"], "primary");
    let acknowledged = report["acknowledged"].as_u64().unwrap();
    let lost = report["lost"].as_u64().unwrap();
    assert!(lost > 0 && lost < acknowledged, "{report}");
    // About the last second: what the link held when the primary died.
    let span = report["lost_span_ms"].as_f64().unwrap();
    assert!(
        (500.0..2500.0).contains(&span),
        "lost span {span} ms: {report}"
    );
    assert!(report["replay_lsn_at_promotion"].is_string(), "{report}");

    // Each lost write really is absent from the new primary; the others are there.
    let new_primary = app.lab().primary_url();
    let lost_tokens: Vec<String> = report["lost_writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|write| write["token"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(lost_tokens.len() as u64, lost.min(1000));
    assert_eq!(rows_with_tokens(&new_primary, &lost_tokens), 0);

    // Writes go to the new primary now.
    let written = app
        .service()
        .write(&WriteRequest {
            value: "after failover".into(),
            client_id: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(rows_with_tokens(&new_primary, &[written.key]), 1);
    let _ = stop.send(true);
    for writer in writers {
        writer.await.unwrap();
    }
    let status = app.get_json("/api/lab").await.1;
    assert_eq!(status["servers"][0]["role"], "former_primary", "{status}");
    assert_eq!(status["servers"][0]["state"], "killed", "{status}");
    assert_eq!(status["servers"][1]["role"], "primary", "{status}");
    let (status, body) = app
        .post_json("/api/lab/servers/primary/start", json!({}))
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a diverged former primary: {body}"
    );

    let pids: Vec<i32> = ["primary", "replica1"]
        .iter()
        .filter_map(|name| std::fs::read_to_string(dir.join(name).join("postmaster.pid")).ok())
        .filter_map(|text| text.lines().next()?.trim().parse().ok())
        .collect();
    app.shutdown().await;
    assert!(
        pids.iter().all(|pid| !alive(*pid)),
        "a postmaster outlived the lab"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_with_a_synchronous_replica_loses_no_remote_apply_write_and_rejoins() {
    let app = spawn_app_with(LabSettings {
        delay: Duration::from_millis(1000),
        sync_replica: true,
        ..LabSettings::default()
    })
    .await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let probers: Vec<_> = (0..6)
        .map(|_| {
            let service = app.service().clone();
            let stopped = stopped.clone();
            tokio::spawn(async move {
                let request = ProbeRequest {
                    strategy: Some(Strategy::RemoteApply),
                    ..ProbeRequest::default()
                };
                while !*stopped.borrow() {
                    if service.probe(&request).await.is_err() {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(3500)).await;

    let report = app
        .grpc()
        .await
        .failover(pb::FailoverRequest {
            promote: "replica1".into(),
            rejoin: true,
        })
        .await
        .unwrap()
        .into_inner();
    let _ = stop.send(true);
    for prober in probers {
        prober.await.unwrap();
    }
    assert!(report.acknowledged > 0, "{report:?}");
    assert_eq!(report.lost, 0, "{report:?}");
    assert!(report.rejoined, "{report:?}");

    // The former primary is a replica of the new one now, streaming through the link.
    let mut former = Value::Null;
    for _ in 0..300 {
        former = app.lab_server("primary").await;
        if former["streaming"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(former["role"], "replica", "{former}");
    assert_eq!(former["streaming"], true, "{former}");
    let probe = app.service().probe(&ProbeRequest::default()).await.unwrap();
    assert_eq!(
        probe.replica, "primary",
        "reads go to the rejoined server: {probe:?}"
    );
    assert!(probe.visible_after.is_some(), "{probe:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_without_a_replica_after_failover_says_so() {
    let app = spawn_app(0).await;
    let (status, report) = app
        .post_json("/api/lab/failover", json!({"promote": "replica1"}))
        .await;
    assert_eq!(status, StatusCode::OK, "{report}");
    let (status, probe) = app.get_json("/api/probe").await;
    assert_eq!(status, StatusCode::CONFLICT, "{probe}");
    assert!(
        probe["error"].as_str().unwrap().contains("replica"),
        "{probe}"
    );
    let readiness = ready_within(&app, StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO).await;
    assert_eq!(readiness["replicas"], json!([]), "{readiness}");
    app.shutdown().await;
}
