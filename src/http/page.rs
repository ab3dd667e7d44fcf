//! The `/test/` page's handlers: the page itself, its live stream (server-sent events of
//! the page's live part, one per probe), its script, and the controls' form posts, which
//! call the service and send the browser back to the page with its query (303).

use std::convert::Infallible;

use axum::{
    extract::{Path, RawQuery, Request, State},
    http::header,
    response::{
        Html, IntoResponse, Redirect, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use tokio_stream::wrappers::ReceiverStream;

use super::{
    body_bytes,
    fields::{Fields, TestPageRequest},
    probe_status, status_of,
    test_page::{self, PageView, query::PageQuery},
};
use crate::{error::Result, probe::ProbeResult, service::Service};

/// Everything but the probe, gathered from the service when the page is drawn.
async fn view_of(
    service: &Service,
    probe: Result<ProbeResult>,
    strategy: Option<crate::settings::Strategy>,
    query: PageQuery,
    watch: bool,
) -> PageView {
    PageView {
        strategy: match &probe {
            Ok(probe) => probe.strategy,
            Err(_) => strategy.unwrap_or_else(|| service.default_strategy()),
        },
        probe,
        link: service.delay().ok(),
        servers: service.lab_server_states().ok(),
        history: service.history(),
        history_capacity: service.history_capacity(),
        query,
        watch,
    }
}

fn page_request(query: Option<&str>) -> Result<TestPageRequest> {
    Fields::from_query(query)?.test_page_request()
}

/// `GET /test/`: one probe, drawn.
pub(super) async fn test_page(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Response {
    let page_query = PageQuery::parse(query.as_deref());
    let (probe, strategy, watch) = match page_request(query.as_deref()) {
        Ok(request) => (
            service.probe(&request.probe_request()).await,
            request.watch_request.strategy,
            request.watch,
        ),
        Err(error) => (Err(error), None, page_query.get("watch") == Some("1")),
    };
    let status = match &probe {
        Ok(probe) => probe_status(probe),
        Err(error) => status_of(error),
    };
    let view = view_of(&service, probe, strategy, page_query, watch).await;
    (status, Html(test_page::render(&view))).into_response()
}

/// `GET /test/events`: live mode's stream. Each probe of a watch with the page's query
/// becomes one `probe` event holding the page's live part, drawn; the watch stops when the
/// browser goes away.
pub(super) async fn test_events(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
) -> Response {
    let request = match page_request(query.as_deref()) {
        Ok(request) => request,
        Err(error) => return (status_of(&error), error.to_string()).into_response(),
    };
    let mut probes = match service.watch(&request.watch_request) {
        Ok(probes) => probes,
        Err(error) => return (status_of(&error), error.to_string()).into_response(),
    };
    let (events, stream) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(4);
    let page_query = PageQuery::parse(query.as_deref());
    let strategy = request.watch_request.strategy;
    tokio::spawn(async move {
        while let Some(probe) = probes.recv().await {
            let view = view_of(&service, probe, strategy, page_query.clone(), true).await;
            let event = Event::default()
                .event("probe")
                .data(test_page::render_live(&view));
            if events.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(ReceiverStream::new(stream))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// `GET /test/live.js`.
pub(super) async fn live_js() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        test_page::LIVE_JS,
    )
        .into_response()
}

/// The answer to a control's form: back to the page with its query, or why not.
fn back_to_page(outcome: Result<()>, query: &PageQuery) -> Response {
    match outcome {
        Ok(()) => Redirect::to(&query.url("/test/")).into_response(),
        Err(error) => (
            status_of(&error),
            Html(test_page::render_refused(&error, query)),
        )
            .into_response(),
    }
}

async fn form_fields(request: Request) -> Result<Fields> {
    Fields::from_form(&body_bytes(request, &()).await?)
}

/// `POST /test/delay?<page query>`: the delay form (`delay_ms`, `jitter_ms`) and the
/// cut/heal button (`link_down`).
pub(super) async fn set_delay(
    State(service): State<Service>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let outcome = async {
        let change = form_fields(request).await?.delay_request()?;
        service.set_delay(&change).map(drop)
    };
    back_to_page(outcome.await, &PageQuery::parse(query.as_deref()))
}

/// `POST /test/servers/{name}/{stop|start}?<page query>`: a server's button.
pub(super) async fn control_server(
    State(service): State<Service>,
    Path((name, action)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let outcome = async {
        let change = form_fields(request).await?.server_request(name, &action)?;
        service.control_server(&change).await.map(drop)
    };
    back_to_page(outcome.await, &PageQuery::parse(query.as_deref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_live_script_is_served_whole() {
        assert!(test_page::LIVE_JS.contains("new EventSource(\"/test/events\""));
    }
}
