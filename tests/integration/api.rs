//! The JSON API beyond single probes: runs, comparisons, lag, the delay link, metrics.

use reqwest::StatusCode;

use crate::harness::{spawn_app, spawn_service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_compare_lag_delay_and_metrics_over_http() {
    let app = spawn_app(0).await;

    let response = app
        .http
        .post(app.http_url("/api/run"))
        .json(&serde_json::json!({"count": 3, "strategy": "lsn-route"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let run: serde_json::Value = response.json().await.unwrap();
    assert_eq!(run["strategy"], "lsn-route");
    assert_eq!(run["summary"]["probe_count"], 3);
    assert_eq!(run["probes"].as_array().unwrap().len(), 3);

    let (status, compare) = app
        .get_json("/api/compare?strategies=replica,primary&count=2")
        .await;
    assert_eq!(status, StatusCode::OK, "{compare}");
    let rows = compare["strategies"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[1]["strategy"], "primary");
    assert_eq!(rows[1]["summary"]["primary_share"], 1.0);

    let (status, lag) = app.get_json("/api/lag").await;
    assert_eq!(status, StatusCode::OK, "{lag}");
    assert_eq!(lag["replicas"][0]["replica"], "replica1");
    assert!(
        lag["methods"]["heartbeat_lag_ms"]
            .as_str()
            .unwrap()
            .contains("heartbeat")
    );

    let response = app
        .http
        .put(app.http_url("/api/delay"))
        .json(&serde_json::json!({"delay_ms": 250, "jitter_ms": 10}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (_, delay) = app.get_json("/api/delay").await;
    assert_eq!(
        delay,
        serde_json::json!({"delay_ms": 250, "jitter_ms": 10, "link_down": false})
    );

    let metrics = app.http.get(app.http_url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    assert!(
        text.contains("lagprobe_probes_total{strategy=\"lsn-route\""),
        "{text}"
    );
    assert!(
        text.contains(
            "lagprobe_commit_to_visible_seconds_bucket{strategy=\"replica\",le=\"+Inf\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("lagprobe_delay_link_delay_seconds 0.25"),
        "{text}"
    );
    assert!(
        text.contains("lagprobe_lag_seconds{replica=\"replica1\",method=\"heartbeat\"}"),
        "{text}"
    );

    // A real Prometheus text parser files every sample under its own family.
    let families = parsed_by_prometheus_client(&text);
    let family = |name: &str| {
        families
            .iter()
            .find(|family| family["name"] == name)
            .unwrap_or_else(|| panic!("no family {name} in {families:?}"))
    };
    let scrape_ok = family("lagprobe_lag_scrape_ok");
    assert_eq!(scrape_ok["type"], "gauge");
    let samples = scrape_ok["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1, "{scrape_ok}");
    assert_eq!(samples[0][0], "lagprobe_lag_scrape_ok");
    assert_eq!(samples[0][1].as_f64(), Some(1.0), "{scrape_ok}");
    let lag_bytes = family("lagprobe_lag_bytes");
    assert_eq!(lag_bytes["type"], "gauge");
    assert_eq!(
        lag_bytes["samples"].as_array().unwrap().len(),
        2,
        "{lag_bytes}"
    );
    assert_eq!(family("lagprobe_probes")["type"], "counter");
    assert_eq!(
        family("lagprobe_commit_to_visible_seconds")["type"],
        "histogram"
    );
    assert!(
        families.iter().all(|family| family["type"] != "unknown"),
        "{families:?}"
    );
    app.shutdown().await;
}

/// `/metrics` text as Python's prometheus_client reads it: `[{name, type, samples}]`, each
/// sample `[name, value, labels]`.
pub(crate) fn parsed_by_prometheus_client(text: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    const SCRIPT: &str = "import json, sys\n\
        from prometheus_client.parser import text_string_to_metric_families as parse\n\
        print(json.dumps([{'name': f.name, 'type': f.type, \
        'samples': [[s.name, s.value, s.labels] for s in f.samples]} for f in parse(sys.stdin.read())]))";
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 runs (Debian: apt-get install python3)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client could not parse /metrics (install it: pip install prometheus-client): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_input_names_the_field() {
    let app = spawn_app(0).await;
    let (status, body) = app.get_json("/api/run?strategy=fastest").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "strategy", "{body}");

    let (status, body) = app
        .get_json("/api/compare?strategies=replica,replica")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "strategies", "{body}");

    let put_delay =
        |body: serde_json::Value| app.http.put(app.http_url("/api/delay")).json(&body).send();
    let response = put_delay(serde_json::json!({"delay_ms": 700000}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["field"], "delay_ms", "{body}");

    let response = app
        .http
        .put(app.http_url("/api/delay"))
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A partial change keeps what it does not name; a misspelt field is refused.
    let response = put_delay(serde_json::json!({"delay_ms": 300, "jitter_ms": 7}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cut: serde_json::Value = put_delay(serde_json::json!({"link_down": true}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        cut,
        serde_json::json!({"delay_ms": 300, "jitter_ms": 7, "link_down": true})
    );
    let response = put_delay(serde_json::json!({"jiter_ms": 5})).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["field"], "jiter_ms", "{body}");
    let response = put_delay(serde_json::json!([300])).await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A NUL byte is the caller's mistake (400 naming the field), not an outage.
    let response = app
        .http
        .post(app.http_url("/api/write"))
        .json(&serde_json::json!({"value": "a\u{0}b"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["field"], "value", "{body}");
    let (status, body) = app.get_json("/api/read?key=a%00b").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "key", "{body}");
    let status = app
        .grpc()
        .await
        .write(lagprobe::pb::WriteRequest {
            value: "a\0b".into(),
            client_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("value"), "{}", status.message());

    let response = app
        .http
        .post(app.http_url("/api/write"))
        .json(&serde_json::json!({"value": "x".repeat(1001)}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["field"], "value", "{body}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413_in_the_api_error_shape() {
    let limit = lagprobe::settings::HTTP_BODY_LIMIT_BYTES;
    let app = spawn_app(0).await;
    let over = serde_json::json!({"value": "x".repeat(limit)});
    let response = app
        .http
        .post(app.http_url("/api/write"))
        .json(&over)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body: serde_json::Value = response.json().await.expect("a JSON error body");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains(&limit.to_string()), "{body}");
    assert!(body.get("field").is_none(), "no field is at fault: {body}");

    // Whitespace is valid JSON padding: the size alone decides, on every body route, and
    // before anything is done (replica1 is not stopped, nothing fails over).
    for (method, path, json) in [
        (reqwest::Method::PUT, "/api/delay", r#"{"delay_ms": 5}"#),
        (reqwest::Method::POST, "/api/run", "{}"),
        (reqwest::Method::POST, "/api/compare", "{}"),
        (
            reqwest::Method::POST,
            "/api/lab/servers/replica1/stop",
            "{}",
        ),
        (
            reqwest::Method::POST,
            "/api/lab/failover",
            r#"{"promote": "replica1"}"#,
        ),
    ] {
        let response = app
            .http
            .request(method, app.http_url(path))
            .header("content-type", "application/json")
            .body(format!("{json}{}", " ".repeat(limit)))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    let (status, ready) = app.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{ready}");

    // Under the limit, a value that is too long is still a 400 naming it.
    let under = serde_json::json!({"value": "x".repeat(limit / 2)});
    let (status, body) = app.post_json("/api/write", under).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "value", "{body}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_calls_without_a_lab_are_failed_precondition() {
    let app = spawn_app(0).await;
    // The same service, pointed at the lab's servers but without the lab's link handle.
    let servers = spawn_service(app.lab().primary_url(), app.replica_urls(), true).await;
    let mut client = crate::harness::grpc_client_at(servers.grpc_addr).await;
    let status = client
        .get_delay(lagprobe::pb::GetDelayRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    let status = client
        .set_delay(lagprobe::pb::DelayChange::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);

    let response = app
        .http
        .get(format!("http://{}/api/delay", servers.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    servers.shutdown().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_primary_is_unavailable_with_the_cause() {
    let app = spawn_app(0).await;
    // A socket bound but not listening holds its port for the whole test (no parallel
    // test's server can take it), and connecting to it is refused.
    let held = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    held.bind(&loopback.into()).unwrap();
    let closed_port = held.local_addr().unwrap().as_socket().unwrap().port();
    let down_primary = format!("postgres://postgres@127.0.0.1:{closed_port}/lagprobe");
    let servers = spawn_service(down_primary, app.replica_urls(), false).await;

    let mut client = crate::harness::grpc_client_at(servers.grpc_addr).await;
    let status = client
        .run(lagprobe::pb::RunRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("primary database"),
        "{}",
        status.message()
    );
    // Why, not "pool timed out": the address and the refusal.
    let address = format!("127.0.0.1:{closed_port}");
    assert!(
        status.message().contains(&address) && status.message().contains("refused"),
        "{}",
        status.message()
    );

    let base = format!("http://{}", servers.http_addr);
    let response = app
        .http
        .get(format!("{base}/api/probe"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("primary"),
        "{body}"
    );
    let page = app.http.get(format!("{base}/test/")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.text().await.unwrap().contains("NO PROBE"));
    let (status, ready) = {
        let response = app.http.get(format!("{base}/readyz")).send().await.unwrap();
        (
            response.status(),
            response.json::<serde_json::Value>().await.unwrap(),
        )
    };
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(ready["primary"]["reachable"], false, "{ready}");
    servers.shutdown().await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_error_shows_postgresql_s_message_and_sqlstate_only() {
    let app = spawn_app(0).await;
    // The lab's `postgres` database has no lagprobe schema, and this service migrates none.
    let bare = app.lab().primary_url().replace("/lagprobe?", "/postgres?");
    let replicas = app
        .replica_urls()
        .iter()
        .map(|url| url.replace("/lagprobe?", "/postgres?"))
        .collect();
    let service = spawn_service(bare, replicas, false).await;
    let response = app
        .http
        .get(format!("http://{}/api/probe", service.http_addr))
        .send()
        .await
        .unwrap();
    let body: serde_json::Value = response.json().await.unwrap();
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("does not exist"), "{error}");
    assert!(error.contains("SQLSTATE 42P01"), "{error}");
    assert!(!error.contains(" at line "), "{error}");
    service.shutdown().await;
    app.shutdown().await;
}
