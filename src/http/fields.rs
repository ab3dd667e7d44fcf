//! Request fields by name, from a query string or a JSON object, and the one converter per
//! request shape of the HTTP transport. Each converter takes the fields it knows; whatever
//! is left over is an unknown field, a 400 naming it. Values arrive as text in a query
//! string and as JSON numbers or strings in a body: both are accepted the same way.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::{
    error::{Error, Result},
    lab::StopMode,
    service::{
        CompareRequest, DelayRequest, FailoverRequest, ProbeParams, ProbeRequest, ReadRequest,
        RunRequest, Schedule, ServerAction, ServerRequest, StrategyParams, WatchRequest,
        WriteRequest,
    },
    settings::Strategy,
};

/// What the `/test/` page was asked for: one probe, and live mode's stream of them.
pub(super) struct TestPageRequest {
    pub watch: bool,
    /// The probe's fields, and live mode's `interval_ms`.
    pub watch_request: WatchRequest,
}

impl TestPageRequest {
    /// The page's own probe.
    pub fn probe_request(&self) -> ProbeRequest {
        ProbeRequest {
            strategy: self.watch_request.strategy,
            probe: self.watch_request.probe,
        }
    }
}

/// The fields of one request, consumed as they are converted, and where they came from
/// (`query` or `body`): errors about a field name the field; only a body that is not a
/// JSON object at all, which has no field to name, is an error about `body`.
pub(super) struct Fields(BTreeMap<String, Value>, &'static str);

impl Fields {
    /// A query string's fields; a field given twice is an error, not a silent choice.
    pub(super) fn from_query(query: Option<&str>) -> Result<Self> {
        Self::from_urlencoded(query.unwrap_or("").as_bytes(), "query")
    }

    /// An HTML form's fields (`application/x-www-form-urlencoded`, the `/test/` controls).
    pub(super) fn from_form(body: &[u8]) -> Result<Self> {
        Self::from_urlencoded(body, "form")
    }

    fn from_urlencoded(text: &[u8], source: &'static str) -> Result<Self> {
        let mut fields = BTreeMap::new();
        for (name, value) in url::form_urlencoded::parse(text) {
            if fields
                .insert(name.to_string(), Value::String(value.into_owned()))
                .is_some()
            {
                return Err(Error::invalid(
                    name.into_owned(),
                    format!("given twice in the {source} (give it once)"),
                ));
            }
        }
        Ok(Fields(fields, source))
    }

    /// A JSON body's fields; the body must be an object.
    pub(super) fn from_json(body: &[u8]) -> Result<Self> {
        let fields: BTreeMap<String, Value> = if body.iter().all(u8::is_ascii_whitespace) {
            BTreeMap::new()
        } else {
            serde_json::from_slice(body)
                .map_err(|error| Error::invalid("body", format!("not a JSON object: {error}")))?
        };
        Ok(Fields(fields, "body"))
    }

    fn u64(&mut self, name: &'static str) -> Result<Option<u64>> {
        let number = |text: &str| text.trim().parse::<u64>().ok();
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(value)) if value.as_u64().is_some() => Ok(value.as_u64()),
            Some(Value::String(text)) if number(&text).is_some() => Ok(number(&text)),
            Some(other) => Err(Error::invalid(
                name,
                format!("{other} is not a whole number of 0 or more"),
            )),
        }
    }

    fn text(&mut self, name: &'static str) -> Result<Option<String>> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(text)) => Ok(Some(text)),
            Some(other) => Err(Error::invalid(name, format!("{other} is not a string"))),
        }
    }

    fn bool(&mut self, name: &'static str) -> Result<Option<bool>> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(value)) => Ok(Some(value)),
            Some(Value::String(text)) if matches!(text.as_str(), "true" | "false") => {
                Ok(Some(text == "true"))
            }
            Some(other) => Err(Error::invalid(
                name,
                format!("{other} is not true or false"),
            )),
        }
    }

    fn strategy(&mut self) -> Result<Option<Strategy>> {
        self.text("strategy")?
            .map(|name| Strategy::parse_field(&name, "strategy"))
            .transpose()
            .map_err(Error::from)
    }

    /// Comma-separated in a query string, a list (or the same joined text) in JSON.
    fn strategies(&mut self) -> Result<Vec<Strategy>> {
        const FIELD: &str = "strategies";
        let names: Vec<String> = match self.0.remove(FIELD) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(joined)) => joined.split(',').map(str::to_owned).collect(),
            Some(Value::Array(list)) => list
                .into_iter()
                .map(|name| match name {
                    Value::String(name) => Ok(name),
                    other => Err(Error::invalid(FIELD, format!("{other} is not a name"))),
                })
                .collect::<Result<_>>()?,
            Some(other) => return Err(Error::invalid(FIELD, format!("{other} is not a list"))),
        };
        names
            .iter()
            .map(|name| name.trim())
            .filter(|name| !name.is_empty())
            .map(|name| Strategy::parse_field(name, FIELD).map_err(Error::from))
            .collect()
    }

    /// Succeeds when every field was used; a field left over is one this request does not
    /// take (misspelt, or belonging to another request), named as the caller spelled it.
    fn finish(self) -> Result<()> {
        match self.0.into_keys().next() {
            None => Ok(()),
            Some(name) => Err(Error::invalid(
                name,
                format!(
                    "not a field of this request's {} (check its spelling)",
                    self.1
                ),
            )),
        }
    }

    fn strategy_params(&mut self) -> Result<StrategyParams> {
        Ok(StrategyParams {
            pin_window_ms: self.u64("pin_window_ms")?,
            lsn_wait_timeout_ms: self.u64("lsn_wait_timeout_ms")?,
        })
    }

    fn probe_params(&mut self) -> Result<ProbeParams> {
        Ok(ProbeParams {
            visibility_timeout_ms: self.u64("visibility_timeout_ms")?,
            poll_interval_ms: self.u64("poll_interval_ms")?,
            strategy_options: self.strategy_params()?,
        })
    }

    fn schedule(&mut self) -> Result<Schedule> {
        Ok(Schedule {
            count: self.u64("count")?,
            interval_ms: self.u64("interval_ms")?,
            concurrency: self.u64("concurrency")?,
        })
    }

    pub(super) fn probe_request(mut self) -> Result<ProbeRequest> {
        let request = ProbeRequest {
            strategy: self.strategy()?,
            probe: self.probe_params()?,
        };
        self.finish().map(|()| request)
    }

    /// The `/test/` page's query: a probe's fields, plus live mode (`watch`, 1 or 0) and
    /// its probes' spacing (`interval_ms`).
    pub(super) fn test_page_request(mut self) -> Result<TestPageRequest> {
        let watch = match self.text("watch")?.as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => return Err(Error::invalid("watch", format!("{other:?} is not 1 or 0"))),
        };
        let interval_ms = self.u64("interval_ms")?;
        let request = TestPageRequest {
            watch,
            watch_request: WatchRequest {
                strategy: self.strategy()?,
                probe: self.probe_params()?,
                interval_ms,
            },
        };
        self.finish().map(|()| request)
    }

    pub(super) fn run_request(mut self) -> Result<RunRequest> {
        let request = RunRequest {
            strategy: self.strategy()?,
            probe: self.probe_params()?,
            schedule: self.schedule()?,
        };
        self.finish().map(|()| request)
    }

    pub(super) fn compare_request(mut self) -> Result<CompareRequest> {
        let request = CompareRequest {
            strategies: self.strategies()?,
            probe: self.probe_params()?,
            schedule: self.schedule()?,
        };
        self.finish().map(|()| request)
    }

    pub(super) fn write_request(mut self) -> Result<WriteRequest> {
        let request = WriteRequest {
            value: self
                .text("value")?
                .ok_or_else(|| Error::invalid("value", "a value to write is required"))?,
            client_id: self.text("client_id")?.unwrap_or_default(),
        };
        self.finish().map(|()| request)
    }

    pub(super) fn delay_request(mut self) -> Result<DelayRequest> {
        let request = DelayRequest {
            delay_ms: self.u64("delay_ms")?,
            jitter_ms: self.u64("jitter_ms")?,
            link_down: self.bool("link_down")?,
        };
        self.finish().map(|()| request)
    }

    /// `action` is the path's last segment; an unknown one is an unknown path (404).
    pub(super) fn server_request(mut self, name: String, action: &str) -> Result<ServerRequest> {
        let action = match action {
            "stop" => ServerAction::Stop(self.stop_mode()?),
            "restart" => ServerAction::Restart(self.stop_mode()?),
            "start" => ServerAction::Start,
            "kill" => ServerAction::Kill,
            _ => return Err(Error::NotFound),
        };
        self.finish().map(|()| ServerRequest { name, action })
    }

    fn stop_mode(&mut self) -> Result<StopMode> {
        match self.text("mode")?.as_deref() {
            None | Some("fast") => Ok(StopMode::Fast),
            Some("immediate") => Ok(StopMode::Immediate),
            Some(other) => Err(Error::invalid(
                "mode",
                format!("{other:?} is not a stop mode: fast or immediate"),
            )),
        }
    }

    pub(super) fn failover_request(mut self) -> Result<FailoverRequest> {
        let request = FailoverRequest {
            promote: self
                .text("promote")?
                .ok_or_else(|| Error::invalid("promote", "the replica to promote is required"))?,
            rejoin: self.bool("rejoin")?.unwrap_or(false),
        };
        self.finish().map(|()| request)
    }

    pub(super) fn read_request(mut self) -> Result<ReadRequest> {
        let request = ReadRequest {
            key: self.text("key")?.unwrap_or_default(),
            min_lsn: self.text("min_lsn")?.unwrap_or_default(),
            client_id: self.text("client_id")?.unwrap_or_default(),
            strategy: self.strategy()?,
            strategy_options: self.strategy_params()?,
        };
        self.finish().map(|()| request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_and_json_fields_convert_alike_and_leftovers_are_unknown() {
        let query = Fields::from_query(Some("count=3&strategy=lsn-wait&pin_window_ms=0"));
        let from_query = query.unwrap().run_request().unwrap();
        let body = br#"{"count": 3, "strategy": "lsn-wait", "pin_window_ms": "0"}"#;
        let from_json = Fields::from_json(body).unwrap().run_request().unwrap();
        assert_eq!(from_query, from_json);
        assert_eq!(from_query.schedule.count, Some(3));
        assert_eq!(from_query.strategy, Some(Strategy::LsnWait));

        let error = Fields::from_query(Some("count=3"))
            .unwrap()
            .probe_request()
            .unwrap_err();
        assert!(error.to_string().contains("count"), "{error}");
        let error = Fields::from_query(Some("poll_interval_ms=soon"))
            .unwrap()
            .probe_request()
            .unwrap_err();
        assert_eq!(error.field(), Some("poll_interval_ms"));
        let error = Fields::from_query(Some("count=1&count=2")).err().unwrap();
        assert_eq!(error.field(), Some("count"));
        let error = Fields::from_query(Some("cuont=2")).unwrap().run_request();
        assert_eq!(error.unwrap_err().field(), Some("cuont"));
    }

    #[test]
    fn delay_changes_reject_typos_and_non_objects() {
        let change = Fields::from_json(br#"{"link_down": true}"#).unwrap();
        let change = change.delay_request().unwrap();
        assert_eq!(change.link_down, Some(true));
        assert_eq!(change.delay_ms, None);
        let typo = Fields::from_json(br#"{"jiter_ms": 5}"#)
            .unwrap()
            .delay_request();
        assert_eq!(typo.unwrap_err().field(), Some("jiter_ms"));
        assert_eq!(
            Fields::from_json(b"[1, 2]").err().unwrap().field(),
            Some("body")
        );
    }

    #[test]
    fn strategies_are_a_list_or_comma_separated() {
        let joined = Fields::from_query(Some("strategies=primary,%20lsn-wait"));
        let joined = joined.unwrap().compare_request().unwrap();
        let listed = Fields::from_json(br#"{"strategies": ["primary", "lsn-wait"]}"#);
        assert_eq!(joined, listed.unwrap().compare_request().unwrap());
        let error = Fields::from_query(Some("strategies=primary,nope"))
            .unwrap()
            .compare_request()
            .unwrap_err();
        assert_eq!(error.field(), Some("strategies"));
    }
}
