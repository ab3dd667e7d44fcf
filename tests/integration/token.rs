//! The consistency token: read-your-writes across separate calls and connections.

use std::time::Duration;

use lagprobe::pb::{ReadRequest, ServedBy, Strategy, Verdict, WatchRequest, WriteRequest};
use reqwest::StatusCode;
use tokio_stream::StreamExt;

use crate::harness::{grpc_client_at, spawn_app, spawn_service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_from_one_grpc_call_gives_read_your_writes_in_another() {
    let app = spawn_app(1000).await;
    let written = app
        .grpc()
        .await
        .write(WriteRequest {
            value: "saved profile".into(),
            client_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(written.commit_lsn.contains('/'), "{written:?}");

    // A second client on its own connection, as another process would be.
    let mut reader = app.grpc().await;
    let plain = reader
        .read(ReadRequest {
            key: written.key.clone(),
            strategy: Strategy::Replica.into(),
            ..ReadRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        !plain.found,
        "without the token the replica read is stale: {plain:?}"
    );

    let with_token = reader
        .read(ReadRequest {
            key: written.key.clone(),
            min_lsn: written.commit_lsn.clone(),
            strategy: Strategy::LsnWait.into(),
            ..ReadRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(with_token.found, "{with_token:?}");
    assert_eq!(with_token.value.as_deref(), Some("saved profile"));
    assert_eq!(with_token.served_by(), ServedBy::Replica);
    assert!(with_token.waited_ms > 500.0, "{with_token:?}");

    let status = reader
        .read(ReadRequest {
            key: written.key,
            min_lsn: "not-an-lsn".into(),
            strategy: Strategy::LsnWait.into(),
            ..ReadRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("min_lsn"), "{}", status.message());
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_window_follows_the_client_across_calls() {
    let app = spawn_app(1000).await;
    let mut client = app.grpc().await;
    let written = client
        .write(WriteRequest {
            value: "v".into(),
            client_id: "user-7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let read = |client_id: &str| ReadRequest {
        key: written.key.clone(),
        strategy: Strategy::PinWindow.into(),
        client_id: client_id.into(),
        ..ReadRequest::default()
    };
    let pinned = client.read(read("user-7")).await.unwrap().into_inner();
    assert_eq!(pinned.served_by(), ServedBy::Primary);
    assert!(pinned.found);
    let other = client.read(read("user-8")).await.unwrap().into_inner();
    assert_eq!(other.served_by(), ServedBy::Replica);
    assert!(!other.found, "another client is not pinned and reads stale");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_works_over_http_too() {
    let app = spawn_app(1000).await;
    let response = app
        .http
        .post(app.http_url("/api/write"))
        .json(&serde_json::json!({"value": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let written: serde_json::Value = response.json().await.unwrap();
    let key = written["key"].as_str().unwrap();
    let token = written["commit_lsn"].as_str().unwrap();

    let (status, read) = app
        .get_json(&format!(
            "/api/read?key={key}&min_lsn={token}&strategy=lsn-route"
        ))
        .await;
    assert_eq!(status, StatusCode::OK, "{read}");
    assert_eq!(read["found"], true, "{read}");
    assert_eq!(read["served_by"], "primary", "{read}");
    assert_eq!(read["value"], "hello");

    let (status, error) = app
        .get_json(&format!(
            "/api/read?key={key}&min_lsn=12&strategy=lsn-route"
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["field"], "min_lsn", "{error}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_probes_and_stops_when_cancelled() {
    let app = spawn_app(0).await;
    let mut stream = app
        .grpc()
        .await
        .watch(WatchRequest {
            interval_ms: Some(50),
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    for expected in 0..3 {
        let probe = stream.next().await.unwrap().unwrap();
        assert_eq!(probe.index, expected);
        assert!(probe.visible_after_ms.is_some(), "{probe:?}");
    }
    drop(stream);

    let probes_run = || -> u64 { app.service().metrics().probes.values().sum() };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let after_cancel = probes_run();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        probes_run(),
        after_cancel,
        "probing went on after the client cancelled"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reports_a_primary_outage_per_probe_and_carries_on_after_it() {
    let app = spawn_app(0).await;
    // A second service whose primary sits behind a link this test can cut.
    let primary = url::Url::parse(&app.lab().primary_url()).unwrap();
    let upstream = format!("127.0.0.1:{}", primary.port().unwrap());
    let link = lagprobe::DelayLink::bind("127.0.0.1:0", upstream, Duration::ZERO)
        .await
        .unwrap();
    let mut through_link = primary.clone();
    through_link
        .set_port(Some(link.local_addr().port()))
        .unwrap();
    let service = spawn_service(through_link.to_string(), app.replica_urls(), true).await;
    let mut stream = grpc_client_at(service.grpc_addr)
        .await
        .watch(WatchRequest {
            interval_ms: Some(100),
            ..WatchRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let next_verdict = async |stream: &mut tonic::Streaming<lagprobe::pb::ProbeResult>| {
        let probe = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("the stream keeps sending")
            .expect("the stream is still open")
            .expect("an outage is an item, not the stream's end");
        (probe.verdict(), probe.error)
    };
    // A probe that wrote and read: at D = 0 an immediate read-back is stale part of the time.
    let wrote_and_read = |verdict| matches!(verdict, Verdict::Fresh | Verdict::Stale);
    let (first, error) = next_verdict(&mut stream).await;
    assert!(wrote_and_read(first), "{first:?}: {error:?}");

    let cut = |link_down| lagprobe::DelaySettings {
        link_down,
        ..lagprobe::DelaySettings::default()
    };
    link.control().apply(cut(true));
    let mut outage = None;
    for _ in 0..20 {
        let (verdict, error) = next_verdict(&mut stream).await;
        if verdict == Verdict::PrimaryError {
            outage = error;
            break;
        }
    }
    let outage = outage.expect("a probe reported the primary down");
    assert!(outage.contains("primary"), "{outage}");
    // Still reporting the outage, probe after probe.
    assert_eq!(next_verdict(&mut stream).await.0, Verdict::PrimaryError);

    link.control().apply(cut(false));
    let mut recovered = false;
    for _ in 0..30 {
        if wrote_and_read(next_verdict(&mut stream).await.0) {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "probes succeed again once the primary is back");
    drop(stream);
    service.shutdown().await;
    app.shutdown().await;
}
