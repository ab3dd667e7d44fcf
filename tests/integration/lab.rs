//! The lab's life cycle: it streams, it stops cleanly, and a replica outage is reported
//! by probes while the service keeps answering.

use std::{path::Path, time::Duration};

use lagprobe::{
    Verdict,
    service::{ProbeRequest, RunRequest, Schedule},
    settings::{DatabaseSettings, LabSettings},
};
use reqwest::StatusCode;

use crate::harness::spawn_app;

fn postmaster_pid(data_dir: &Path) -> i32 {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    pid_file.lines().next().unwrap().trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_postmaster_and_no_directory() {
    let app = spawn_app(1000).await;
    let dir = app.lab().data_dir().to_path_buf();
    let primary = postmaster_pid(&dir.join("primary"));
    let replica = postmaster_pid(&dir.join("replica1"));
    assert!(alive(primary) && alive(replica));

    app.shutdown().await;
    assert!(
        !alive(primary),
        "primary postmaster {primary} still running"
    );
    assert!(
        !alive(replica),
        "replica postmaster {replica} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_lab_without_shutdown_still_stops_the_servers() {
    let app = spawn_app(0).await;
    let dir = app.lab().data_dir().to_path_buf();
    let primary = postmaster_pid(&dir.join("primary"));
    let replica = postmaster_pid(&dir.join("replica1"));
    drop(app);
    // Dropping does not wait (it must not block a runtime worker): the servers end, and then
    // the directory goes, shortly after.
    let gone = |pid| !alive(pid);
    assert!(
        eventually(|| gone(primary) && gone(replica)).await,
        "postmasters still running"
    );
    assert!(
        eventually(|| !dir.exists()).await,
        "{} left behind",
        dir.display()
    );
}

/// Whether `condition` holds within 10 s.
async fn eventually(condition: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_outage_is_reported_and_probes_recover_after_restart() {
    let mut app = spawn_app(0).await;
    let (status, _) = app.get_json("/api/probe").await;
    assert_eq!(status, StatusCode::OK);

    app.lab_mut().stop_replica(0).await;

    let (status, body) = app.get_json("/api/probe").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["verdict"], "replica_error", "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("replica"),
        "{body}"
    );

    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["ready"], false);
    assert_eq!(body["replicas"][0]["reachable"], false, "{body}");

    // The process keeps answering, and a bulk run reports the errors instead of failing.
    let health = app.http.get(app.http_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let report = app
        .service()
        .run(&RunRequest {
            schedule: Schedule {
                count: Some(2),
                ..Schedule::default()
            },
            ..RunRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(report.summary.replica_error_count, 2);

    app.lab_mut().start_replica(0).await.unwrap();
    let mut recovered = None;
    for _ in 0..50 {
        let probe = app.service().probe(&ProbeRequest::default()).await.unwrap();
        if probe.verdict != Verdict::ReplicaError {
            recovered = Some(probe);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe = recovered.expect("probes succeed again once the replica is back");
    assert!(probe.visible_after.is_some(), "{probe:?}");
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_dies_is_reported_with_its_log_tail() {
    let app = spawn_app(0).await;
    let replica = postmaster_pid(&app.lab().data_dir().join("replica1"));
    // SAFETY: kill has no memory-safety preconditions; the pid is the lab's own postmaster.
    unsafe {
        libc::kill(replica, libc::SIGKILL);
    }
    let error = tokio::time::timeout(Duration::from_secs(10), app.lab().unexpected_exit())
        .await
        .expect("the death is noticed");
    let text = error.to_string();
    assert!(
        text.contains("replica1 server exited unexpectedly"),
        "{text}"
    );
    assert!(text.contains("log tail"), "{text}");
    // The tail is the server's own log: it shows the replica starting up.
    assert!(
        text.contains("database system is ready to accept read-only connections"),
        "{text}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_address_fails_before_any_cluster_is_built() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let lab = LabSettings {
        data_dir: Some(data_dir.path().join("cluster")),
        ..LabSettings::with_delay(Duration::ZERO)
    };
    let mut settings = crate::harness::settings(DatabaseSettings::Lab(lab));
    settings.http_addr = taken.local_addr().unwrap();
    let error = lagprobe::server::build(settings).await.unwrap_err();
    assert_eq!(error.field(), Some("http_addr"), "{error}");
    assert!(error.to_string().contains("cannot listen"), "{error}");
    assert!(
        !data_dir.path().join("cluster").exists(),
        "a cluster was built although the service could not listen"
    );
}
