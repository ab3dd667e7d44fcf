//! The HTTP transport (axum): the `/test/` page, the JSON API and health endpoints.
//!
//! Like the gRPC transport it is thin: handlers parse input, call the probe engine through
//! the [service](crate::service), and render. Errors become status codes in one function, [`status_of`].

mod fields;
mod metrics;
mod page;
mod proxy_metrics;
mod proxy_page;
mod test_page;

use std::future::Future;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, FromRequest, Path, RawQuery, Request, State},
    http::{StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::{
    error::{Error, ErrorKind, Result},
    probe::{ProbeResult, Verdict},
    service::Service,
    settings::HTTP_BODY_LIMIT_BYTES,
};
use fields::Fields;

/// The one place library errors become HTTP statuses.
fn status_of(error: &Error) -> StatusCode {
    error.log_request_failure("http");
    match error.kind() {
        ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::FailedPrecondition => StatusCode::CONFLICT,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as the JSON API returns it.
#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
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

/// A request's body, read up to [`HTTP_BODY_LIMIT_BYTES`]: a bigger body is a 413 in the
/// API's JSON error shape (axum alone answers it in plain text), one that cannot be read a
/// 400.
async fn body_bytes<S: Send + Sync>(mut request: Request, state: &S) -> Result<Bytes> {
    DefaultBodyLimit::max(HTTP_BODY_LIMIT_BYTES).apply(&mut request);
    Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Error::TooLarge {
                    what: "body",
                    limit_bytes: HTTP_BODY_LIMIT_BYTES,
                }
            } else {
                Error::invalid("body", rejection.body_text())
            }
        })
}

/// A JSON body's fields, converted by [`Fields`], which names the field at fault.
struct JsonBody(Fields);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let body = body_bytes(request, state).await?;
        Ok(JsonBody(Fields::from_json(&body)?))
    }
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
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = Fields::from_query(query.as_deref())?.probe_request()?;
    let probe = service.probe(&request).await?;
    let status = probe_status(&probe);
    let lab_delay_ms = service.lab_delay_ms();
    Ok((
        status,
        Json(ProbeResponse {
            probe,
            lab_delay_ms,
        }),
    )
        .into_response())
}

async fn api_run_get(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = Fields::from_query(query.as_deref())?.run_request()?;
    Ok(Json(service.run(&request).await?).into_response())
}

async fn api_run_post(
    State(service): State<Service>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.run_request()?;
    Ok(Json(service.run(&request).await?).into_response())
}

async fn api_compare_get(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = Fields::from_query(query.as_deref())?.compare_request()?;
    Ok(Json(service.compare(&request).await?).into_response())
}

async fn api_compare_post(
    State(service): State<Service>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.compare_request()?;
    Ok(Json(service.compare(&request).await?).into_response())
}

async fn api_lag(State(service): State<Service>) -> Result<Response, ApiError> {
    Ok(Json(service.lag().await?).into_response())
}

async fn api_delay_get(State(service): State<Service>) -> Result<Response, ApiError> {
    Ok(Json(service.delay()?).into_response())
}

async fn api_delay_put(
    State(service): State<Service>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.delay_request()?;
    Ok(Json(service.set_delay(&request)?).into_response())
}

async fn api_write(
    State(service): State<Service>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.write_request()?;
    Ok(Json(service.write(&request).await?).into_response())
}

async fn api_read(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let request = Fields::from_query(query.as_deref())?.read_request()?;
    Ok(Json(service.read(&request).await?).into_response())
}

async fn api_lab(State(service): State<Service>) -> Result<Response, ApiError> {
    Ok(Json(service.lab_status().await?).into_response())
}

/// `POST /api/lab/servers/{name}/{stop|start|restart|kill}`; stop and restart take an
/// optional `{"mode": "fast" | "immediate"}`.
async fn api_lab_server(
    State(service): State<Service>,
    Path((name, action)): Path<(String, String)>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.server_request(name, &action)?;
    Ok(Json(service.control_server(&request).await?).into_response())
}

async fn api_failover(
    State(service): State<Service>,
    JsonBody(fields): JsonBody,
) -> Result<Response, ApiError> {
    let request = fields.failover_request()?;
    Ok(Json(service.failover(&request).await?).into_response())
}

async fn metrics_text(State(service): State<Service>) -> Response {
    let snapshot = service.metrics();
    let lag = service.lag().await.map_err(|error| error.to_string());
    let link = service.delay().ok().map(|settings| {
        (
            settings.delay.as_secs_f64(),
            settings.jitter.as_secs_f64(),
            settings.link_down,
        )
    });
    let mut text = metrics::render(&snapshot, lag.as_ref().map_err(Clone::clone), link);
    proxy_metrics::render(&mut text, &service.proxy_report());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn api_proxy(State(service): State<Service>) -> Response {
    Json(service.proxy_report()).into_response()
}

async fn proxy_page(State(service): State<Service>) -> Response {
    Html(proxy_page::render(&service.proxy_report())).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(service): State<Service>) -> Response {
    let readiness = service.readiness().await;
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
fn router(service: Service) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/test/") }))
        .route("/test", get(|| async { Redirect::permanent("/test/") }))
        .route("/test/", get(page::test_page))
        .route("/test/events", get(page::test_events))
        .route("/test/live.js", get(page::live_js))
        .route("/test/delay", post(page::set_delay))
        .route("/test/servers/{name}/{action}", post(page::control_server))
        .route("/api/probe", get(api_probe))
        .route("/api/run", get(api_run_get).post(api_run_post))
        .route("/api/compare", get(api_compare_get).post(api_compare_post))
        .route("/api/lag", get(api_lag))
        .route("/api/delay", get(api_delay_get).put(api_delay_put))
        .route("/api/write", post(api_write))
        .route("/api/read", get(api_read))
        .route("/api/lab", get(api_lab))
        .route("/api/lab/servers/{name}/{action}", post(api_lab_server))
        .route("/api/lab/failover", post(api_failover))
        .route("/api/proxy", get(api_proxy))
        .route("/proxy", get(|| async { Redirect::permanent("/proxy/") }))
        .route("/proxy/", get(proxy_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .with_state(service)
}

/// Serves the router on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    axum::serve(listener, router(service))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(Error::io("HTTP server"))
}
