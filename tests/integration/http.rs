//! The HTTP transport: the /test/ page, the JSON probe, health, and bad input.

use reqwest::StatusCode;

use crate::harness::spawn_app;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_page_shows_a_stale_verdict_at_1000_ms() {
    let app = spawn_app(1000).await;
    let response = app.http.get(app.http_url("/test/")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = response.text().await.unwrap();
    assert!(html.contains("id=\"verdict\">STALE"), "{html}");
    assert!(
        html.contains("1000 ms"),
        "the page shows the lab delay: {html}"
    );
    assert!(html.contains("Commit to visible"), "{html}");
    assert!(html.contains("pg_last_xact_replay_timestamp"), "{html}");

    // Without the trailing slash, users are sent to the page.
    let redirect = app.http.get(app.http_url("/test")).send().await.unwrap();
    assert_eq!(redirect.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers()["location"], "/test/");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_probe_health_and_readiness() {
    let app = spawn_app(0).await;
    let (status, body) = app.get_json("/api/probe").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        matches!(body["verdict"].as_str(), Some("fresh" | "stale")),
        "{body}"
    );
    assert_eq!(body["lab_delay_ms"], 0);
    assert!(body["visible_after_ms"].as_f64().unwrap() < 500.0, "{body}");
    assert_eq!(body["token"].as_str().unwrap().len(), 32);

    let health = app.http.get(app.http_url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let (status, body) = app.get_json("/readyz").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["replicas"][0]["state"]["wal_receiver_status"],
        "streaming"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_4xx_naming_the_problem() {
    let app = spawn_app(0).await;
    let (status, body) = app.get_json("/api/probe?visibility_timeout_ms=0").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["field"], "visibility_timeout_ms", "{body}");

    let (status, body) = app.get_json("/api/probe?poll_interval_ms=soon").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().contains("poll_interval_ms"),
        "{body}"
    );

    let (status, body) = app.get_json("/api/probe?visibilty_timeout_ms=5").await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a misspelt parameter is not ignored"
    );
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("visibilty_timeout_ms"),
        "{body}"
    );

    // A single probe has no schedule: a run's parameter is refused, not ignored.
    let (status, body) = app.get_json("/api/probe?count=3").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("count"), "{body}");
    // The same fields work as a JSON body, numbers or text alike.
    let response = app
        .http
        .post(app.http_url("/api/run"))
        .json(&serde_json::json!({"count": 2, "poll_interval_ms": "5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let report: serde_json::Value = response.json().await.unwrap();
    assert_eq!(report["probes"].as_array().unwrap().len(), 2, "{report}");

    let page = app
        .http
        .get(app.http_url("/test/?visibility_timeout_ms=-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::BAD_REQUEST);
    assert!(page.text().await.unwrap().contains("NO PROBE"));

    // Fields that do not apply to a kind of request are refused, not ignored, and so is a
    // field given twice; the API's error names the field itself, not `query`.
    for path in [
        "/test/?strategies=primary",
        "/api/probe?concurrency=2",
        "/api/probe?interval_ms=5",
        "/api/run?strategies=primary",
        "/api/run?count=1&count=2",
        "/api/compare?strategy=primary",
    ] {
        let response = app.http.get(app.http_url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let field = path.split(['?', '=']).nth(1).unwrap();
        let text = response.text().await.unwrap();
        assert!(text.contains(field), "{path}: {text}");
        if path.starts_with("/api/") {
            let body: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(body["field"], field, "{path}: {body}");
        }
    }

    let (status, _) = app.get_json("/no/such/page").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    app.shutdown().await;
}
