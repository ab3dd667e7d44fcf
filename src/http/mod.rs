//! The HTTP transport (axum): the `/test/` page, the JSON API and health endpoints.
//!
//! Like the gRPC transport it is thin: handlers parse input, call the probe engine through
//! [`AppState`], and render. Errors become status codes in one function, [`status_of`].

mod test_page;

use std::future::Future;

use axum::{
    Json, Router,
    extract::{Query, State, rejection::QueryRejection},
    http::StatusCode,
    response::{Html, IntoResponse, Redirect, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;

use crate::{
    app::AppState,
    error::{Error, ErrorKind, Result},
    probe::{ProbeResult, Verdict},
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

/// Query parameters of a single probe.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProbeQuery {
    visibility_timeout_ms: Option<u64>,
    poll_interval_ms: Option<u64>,
}

fn probe_query(query: Result<Query<ProbeQuery>, QueryRejection>) -> Result<ProbeQuery> {
    query.map(|Query(query)| query).map_err(|rejection| {
        Error::invalid(
            "query",
            rejection
                .body_text()
                .replace("Failed to deserialize query string: ", ""),
        )
    })
}

/// A probe result with the lab context the page and API show beside it.
#[derive(Debug, Serialize)]
struct ProbeResponse {
    #[serde(flatten)]
    probe: ProbeResult,
    /// The lab's current primary-to-replica delay; absent outside a lab.
    lab_delay_ms: Option<u64>,
}

fn lab_delay_ms(state: &AppState) -> Option<u64> {
    state.lab_delay().map(|delay| delay.as_millis() as u64)
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
    let query = probe_query(query)?;
    let probe = state
        .probe(query.visibility_timeout_ms, query.poll_interval_ms)
        .await?;
    let status = probe_status(&probe);
    let lab_delay_ms = lab_delay_ms(&state);
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
    let lab_delay_ms = lab_delay_ms(&state);
    let outcome = match probe_query(query) {
        Ok(query) => {
            state
                .probe(query.visibility_timeout_ms, query.poll_interval_ms)
                .await
        }
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
