//! The HTTP transport (axum): the `/test/` page, the JSON API and health endpoints.
//!
//! Like the gRPC transport it is thin: handlers parse input, call the probe engine through
//! [`AppState`], and render. Errors become status codes in one function, [`status_of`].

mod metrics;
mod test_page;

use std::future::Future;

use axum::{
    Json, Router,
    extract::{
        Query, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{
    app::AppState,
    db::strategy::Strategy,
    error::{Error, ErrorKind, Result},
    lab::DelaySettings,
    probe::{ProbeResult, RunParams, Verdict},
};

/// The one place library errors become HTTP statuses.
pub fn status_of(error: &Error) -> StatusCode {
    match error.kind() {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as the JSON API returns it.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
}

struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.0.to_string(),
            field: self.0.field(),
        };
        (status_of(&self.0), Json(body)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(error: Error) -> Self {
        ApiError(error)
    }
}

/// Parameters of probes, runs and comparisons, as query strings or JSON bodies.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeQuery {
    count: Option<u64>,
    interval_ms: Option<u64>,
    visibility_timeout_ms: Option<u64>,
    poll_interval_ms: Option<u64>,
    concurrency: Option<u64>,
    strategy: Option<String>,
    pin_window_ms: Option<u64>,
    lsn_wait_timeout_ms: Option<u64>,
    /// Compare only; comma-separated in a query string, a list in JSON.
    #[serde(default, deserialize_with = "strategy_list")]
    strategies: Vec<String>,
}

fn strategy_list<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Joined(String),
        List(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(deserializer)? {
        OneOrMany::Joined(joined) => joined
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(str::to_owned)
            .collect(),
        OneOrMany::List(list) => list,
    })
}

impl ProbeQuery {
    fn params(&self) -> Result<RunParams> {
        Ok(RunParams {
            count: self.count,
            interval_ms: self.interval_ms,
            visibility_timeout_ms: self.visibility_timeout_ms,
            poll_interval_ms: self.poll_interval_ms,
            concurrency: self.concurrency,
            strategy: self.strategy.as_deref().map(str::parse).transpose()?,
            pin_window_ms: self.pin_window_ms,
            lsn_wait_timeout_ms: self.lsn_wait_timeout_ms,
        })
    }

    fn strategies(&self) -> Result<Vec<Strategy>> {
        self.strategies
            .iter()
            .map(|name| {
                name.parse().map_err(|_| {
                    Error::invalid("strategies", format!("{name:?} is not a strategy"))
                })
            })
            .collect()
    }
}

fn rejected(field: &'static str, text: String) -> Error {
    Error::invalid(
        field,
        text.replace("Failed to deserialize query string: ", "")
            .replace(
                "Failed to deserialize the JSON body into the target type: ",
                "",
            ),
    )
}

fn probe_query(query: Result<Query<ProbeQuery>, QueryRejection>) -> Result<ProbeQuery> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| rejected("query", rejection.body_text()))
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T> {
    body.map(|Json(body)| body)
        .map_err(|rejection| rejected("body", rejection.body_text()))
}

/// A probe result with the lab context the page and API show beside it.
#[derive(Debug, Serialize)]
struct ProbeResponse {
    #[serde(flatten)]
    probe: ProbeResult,
    /// The lab's current primary-to-replica delay; absent outside a lab.
    lab_delay_ms: Option<u64>,
}

/// 200 for a judged probe, 503 when the replica could not be read.
fn probe_status(probe: &ProbeResult) -> StatusCode {
    if probe.verdict == Verdict::ReplicaError {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}

async fn api_probe(
    State(state): State<AppState>,
    query: Result<Query<ProbeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = probe_query(query)?.params()?;
    let probe = state.probe(&params).await?;
    let status = probe_status(&probe);
    let lab_delay_ms = state.lab_delay_ms();
    Ok((
        status,
        Json(ProbeResponse {
            probe,
            lab_delay_ms,
        }),
    )
        .into_response())
}

async fn test_page(
    State(state): State<AppState>,
    query: Result<Query<ProbeQuery>, QueryRejection>,
) -> Response {
    let lab_delay_ms = state.lab_delay_ms();
    let outcome = match probe_query(query).and_then(|query| query.params()) {
        Ok(params) => state.probe(&params).await,
        Err(error) => Err(error),
    };
    match outcome {
        Ok(probe) => (
            probe_status(&probe),
            Html(test_page::render(&probe, lab_delay_ms)),
        )
            .into_response(),
        Err(error) => (
            status_of(&error),
            Html(test_page::render_error(&error, lab_delay_ms)),
        )
            .into_response(),
    }
}

async fn api_run_get(
    State(state): State<AppState>,
    query: Result<Query<ProbeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = probe_query(query)?.params()?;
    Ok(Json(state.run(&params).await?).into_response())
}

async fn api_run_post(
    State(state): State<AppState>,
    body: Result<Json<ProbeQuery>, JsonRejection>,
) -> Result<Response, ApiError> {
    let params = json_body(body)?.params()?;
    Ok(Json(state.run(&params).await?).into_response())
}

async fn compare(state: &AppState, query: ProbeQuery) -> Result<Response, ApiError> {
    let report = state
        .compare(&query.strategies()?, &query.params()?)
        .await?;
    Ok(Json(report).into_response())
}

async fn api_compare_get(
    State(state): State<AppState>,
    query: Result<Query<ProbeQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    compare(&state, probe_query(query)?).await
}

async fn api_compare_post(
    State(state): State<AppState>,
    body: Result<Json<ProbeQuery>, JsonRejection>,
) -> Result<Response, ApiError> {
    compare(&state, json_body(body)?).await
}

async fn api_lag(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.lag().await?).into_response())
}

async fn api_delay_get(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.delay()?).into_response())
}

async fn api_delay_put(
    State(state): State<AppState>,
    body: Result<Json<DelaySettings>, JsonRejection>,
) -> Result<Response, ApiError> {
    Ok(Json(state.set_delay(json_body(body)?)?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriteBody {
    value: String,
    #[serde(default)]
    client_id: String,
}

async fn api_write(
    State(state): State<AppState>,
    body: Result<Json<WriteBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body = json_body(body)?;
    Ok(Json(state.write(&body.value, &body.client_id).await?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    key: String,
    #[serde(default)]
    min_lsn: String,
    #[serde(default)]
    client_id: String,
    strategy: Option<String>,
    pin_window_ms: Option<u64>,
    lsn_wait_timeout_ms: Option<u64>,
}

async fn api_read(
    State(state): State<AppState>,
    query: Result<Query<ReadQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let query = query
        .map(|Query(query)| query)
        .map_err(|rejection| rejected("query", rejection.body_text()))?;
    let params = RunParams {
        strategy: query.strategy.as_deref().map(str::parse).transpose()?,
        pin_window_ms: query.pin_window_ms,
        lsn_wait_timeout_ms: query.lsn_wait_timeout_ms,
        ..RunParams::default()
    };
    let outcome = state
        .read(&query.key, &query.min_lsn, &query.client_id, &params)
        .await?;
    Ok(Json(outcome).into_response())
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let snapshot = state.engine().metrics().snapshot();
    let lag = state.lag().await.map_err(|error| error.to_string());
    let link = state.delay().ok().map(|settings| {
        (
            settings.delay.as_secs_f64(),
            settings.jitter.as_secs_f64(),
            settings.link_down,
        )
    });
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics::render(&snapshot, lag.as_ref().map_err(Clone::clone), link),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> Response {
    let readiness = state.readiness().await;
    let status = if readiness.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness)).into_response()
}

async fn not_found() -> ApiError {
    ApiError(Error::NotFound)
}

/// Every route of the HTTP transport.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/test/") }))
        .route("/test", get(|| async { Redirect::permanent("/test/") }))
        .route("/test/", get(test_page))
        .route("/api/probe", get(api_probe))
        .route("/api/run", get(api_run_get).post(api_run_post))
        .route("/api/compare", get(api_compare_get).post(api_compare_post))
        .route("/api/lag", get(api_lag))
        .route("/api/delay", get(api_delay_get).put(api_delay_put))
        .route("/api/write", post(api_write))
        .route("/api/read", get(api_read))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(state)
}

/// Serves the router on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::io("HTTP server"))
}
