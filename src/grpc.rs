//! The gRPC transport: `lagprobe.v1.ConsistencyProbe`, with reflection (v1 and v1alpha, so
//! grpcurl needs no .proto file) and the standard health service. Thin by design: it turns
//! messages into the [service](crate::service)'s requests and results into messages,
//! nothing more; one converter per request shape. Requests decode through [`codec`], which
//! refuses malformed protobuf as the caller's mistake.

mod codec;

use std::{future::Future, pin::Pin, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream, wrappers::TcpListenerStream};
use tonic::{Request, Response, Status};

use crate::{
    error::{Error, ErrorKind, Result},
    lab::{DelaySettings, NodeState, ServerRole, ServerStatus, StopMode},
    probe::{
        self, LagMeasures, Percentiles, ProbeResult, ReplicaSummary, RunSummary, ServedBy, Verdict,
    },
    service::{
        CompareRequest, DelayRequest, FailoverReport, FailoverRequest, ProbeParams, ProxyReport,
        QueryCounts, ReadRequest, RunRequest, Schedule, ServerAction, ServerRequest, Service,
        StrategyParams, WatchRequest, WriteRequest,
    },
    settings::Strategy,
};

/// Code generated from `proto/lagprobe/v1/probe.proto`.
pub mod pb {
    tonic::include_proto!("lagprobe.v1");

    /// The encoded descriptors of lagprobe's API, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/lagprobe_descriptor.bin"));
}

use pb::consistency_probe_server::{ConsistencyProbe, ConsistencyProbeServer};

/// The one place library errors become gRPC statuses.
fn status_of(error: Error) -> Status {
    error.log_request_failure("grpc");
    let message = error.to_string();
    match error.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::Unavailable => Status::unavailable(message),
        ErrorKind::FailedPrecondition => Status::failed_precondition(message),
        ErrorKind::NotFound => Status::not_found(message),
        // What tonic itself answers for a message over its size limit.
        ErrorKind::TooLarge => Status::resource_exhausted(message),
        ErrorKind::Internal => Status::internal(message),
    }
}

#[derive(Debug, Clone)]
struct Transport {
    service: Service,
}

/// A request's strategy; unspecified means the server's default.
fn strategy_of(value: i32, field: &'static str) -> Result<Option<Strategy>> {
    match pb::Strategy::try_from(value) {
        Ok(pb::Strategy::Unspecified) => Ok(None),
        Ok(pb::Strategy::Replica) => Ok(Some(Strategy::Replica)),
        Ok(pb::Strategy::Primary) => Ok(Some(Strategy::Primary)),
        Ok(pb::Strategy::PinWindow) => Ok(Some(Strategy::PinWindow)),
        Ok(pb::Strategy::LsnWait) => Ok(Some(Strategy::LsnWait)),
        Ok(pb::Strategy::LsnRoute) => Ok(Some(Strategy::LsnRoute)),
        Ok(pb::Strategy::RemoteApply) => Ok(Some(Strategy::RemoteApply)),
        Err(_) => Err(Error::invalid(field, format!("{value} is not a Strategy"))),
    }
}

fn strategy_message(strategy: Strategy) -> pb::Strategy {
    match strategy {
        Strategy::Replica => pb::Strategy::Replica,
        Strategy::Primary => pb::Strategy::Primary,
        Strategy::PinWindow => pb::Strategy::PinWindow,
        Strategy::LsnWait => pb::Strategy::LsnWait,
        Strategy::LsnRoute => pb::Strategy::LsnRoute,
        Strategy::RemoteApply => pb::Strategy::RemoteApply,
    }
}

fn served_by_message(served_by: Option<ServedBy>) -> pb::ServedBy {
    match served_by {
        None => pb::ServedBy::Unspecified,
        Some(ServedBy::Replica) => pb::ServedBy::Replica,
        Some(ServedBy::Primary) => pb::ServedBy::Primary,
        Some(ServedBy::Fallback) => pb::ServedBy::Fallback,
    }
}

fn strategy_params(message: Option<pb::StrategyOptions>) -> StrategyParams {
    let message = message.unwrap_or_default();
    StrategyParams {
        pin_window_ms: message.pin_window_ms,
        lsn_wait_timeout_ms: message.lsn_wait_timeout_ms,
    }
}

fn probe_params(message: Option<pb::ProbeOptions>) -> ProbeParams {
    let message = message.unwrap_or_default();
    ProbeParams {
        visibility_timeout_ms: message.visibility_timeout_ms,
        poll_interval_ms: message.poll_interval_ms,
        strategy_options: strategy_params(message.strategy_options),
    }
}

fn schedule(message: Option<pb::Schedule>) -> Schedule {
    let message = message.unwrap_or_default();
    Schedule {
        count: message.count,
        interval_ms: message.interval_ms,
        concurrency: message.concurrency,
    }
}

fn run_request(message: pb::RunRequest) -> Result<RunRequest> {
    Ok(RunRequest {
        strategy: strategy_of(message.strategy, "strategy")?,
        probe: probe_params(message.probe),
        schedule: schedule(message.schedule),
    })
}

fn compare_request(message: pb::CompareRequest) -> Result<CompareRequest> {
    let strategies = message
        .strategies
        .iter()
        .map(|value| {
            strategy_of(*value, "strategies")?.ok_or_else(|| {
                Error::invalid("strategies", "STRATEGY_UNSPECIFIED cannot be compared")
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CompareRequest {
        strategies,
        probe: probe_params(message.probe),
        schedule: schedule(message.schedule),
    })
}

fn watch_request(message: pb::WatchRequest) -> Result<WatchRequest> {
    Ok(WatchRequest {
        strategy: strategy_of(message.strategy, "strategy")?,
        probe: probe_params(message.probe),
        interval_ms: message.interval_ms,
    })
}

fn read_request(message: pb::ReadRequest) -> Result<ReadRequest> {
    Ok(ReadRequest {
        strategy: strategy_of(message.strategy, "strategy")?,
        strategy_options: strategy_params(message.strategy_options),
        key: message.key,
        min_lsn: message.min_lsn,
        client_id: message.client_id,
    })
}

fn ms(duration: Duration) -> f64 {
    probe::millis(duration)
}

fn lag_message(lag: &LagMeasures) -> pb::LagMeasures {
    pb::LagMeasures {
        lsn_gap_bytes: lag.lsn_gap_bytes,
        replay_timestamp_lag_ms: lag.replay_timestamp_lag_ms,
        receive_replay_gap_bytes: lag.receive_replay_gap_bytes,
        heartbeat_lag_ms: lag.heartbeat_lag_ms,
        stat_write_lag_ms: lag.stat_write_lag_ms,
        stat_flush_lag_ms: lag.stat_flush_lag_ms,
        stat_replay_lag_ms: lag.stat_replay_lag_ms,
    }
}

fn probe_message(index: u32, probe: &ProbeResult) -> pb::ProbeResult {
    pb::ProbeResult {
        index,
        token: probe.token.clone(),
        written_value: probe.written_value.clone(),
        read_value: probe.read_value.clone(),
        verdict: match probe.verdict {
            Verdict::Fresh => pb::Verdict::Fresh,
            Verdict::Stale => pb::Verdict::Stale,
            Verdict::ReplicaError => pb::Verdict::ReplicaError,
        }
        .into(),
        commit_lsn: probe.commit_lsn.to_string(),
        replica_replay_lsn: probe.replica_replay_lsn.map(|lsn| lsn.to_string()),
        lsn_gap_bytes: probe.lsn_gap_bytes,
        replay_timestamp_lag_ms: probe.replay_timestamp_lag_ms,
        write_latency_ms: ms(probe.write_latency),
        read_latency_ms: probe.read_latency.map(ms),
        visible_after_ms: probe.visible_after.map(ms),
        still_stale_at_ms: probe.still_stale_at.map(ms),
        visibility_timed_out: probe.visibility_timed_out,
        replica_reads: probe.replica_reads,
        error: probe.error.clone(),
        strategy: strategy_message(probe.strategy).into(),
        served_by: served_by_message(probe.served_by).into(),
        replica: probe.replica.clone(),
        waited_ms: probe.waited.map(ms),
        wait_method: probe
            .wait_method
            .map(|method| method.name().to_owned())
            .unwrap_or_default(),
        remote_apply_effective: probe.remote_apply_effective,
        lag: Some(lag_message(&probe.lag)),
        visibility_resolution_ms: probe.visibility_resolution.map(ms),
    }
}

fn percentiles_message(percentiles: &Percentiles) -> pb::Percentiles {
    pb::Percentiles {
        count: percentiles.count,
        p50_ms: percentiles.p50_ms,
        p90_ms: percentiles.p90_ms,
        p99_ms: percentiles.p99_ms,
        p999_ms: percentiles.p999_ms,
        max_ms: percentiles.max_ms,
    }
}

fn summary_message(summary: &RunSummary) -> pb::RunSummary {
    pb::RunSummary {
        probe_count: summary.probe_count,
        fresh_count: summary.fresh_count,
        stale_count: summary.stale_count,
        replica_error_count: summary.replica_error_count,
        visibility_timeout_count: summary.visibility_timeout_count,
        stale_ratio: summary.stale_ratio,
        // The flat fields predate `visible_after`; both stay in the API.
        visible_after_p50_ms: summary.visible_after.p50_ms,
        visible_after_p90_ms: summary.visible_after.p90_ms,
        visible_after_p99_ms: summary.visible_after.p99_ms,
        visible_after_max_ms: summary.visible_after.max_ms,
        lsn_gap_max_bytes: summary.lsn_gap_max_bytes,
        elapsed_ms: summary.elapsed_ms,
        stale_ratio_ci95_low: summary.stale_ratio_ci95_low,
        stale_ratio_ci95_high: summary.stale_ratio_ci95_high,
        visible_after: Some(percentiles_message(&summary.visible_after)),
        read_latency: Some(percentiles_message(&summary.read_latency)),
        write_latency: Some(percentiles_message(&summary.write_latency)),
        primary_share: summary.primary_share,
        wait_count: summary.wait_count,
        fallback_count: summary.fallback_count,
        wait_methods: summary
            .wait_methods
            .iter()
            .map(|method| method.name().to_owned())
            .collect(),
        visibility_curve: summary
            .visibility_curve
            .iter()
            .map(|point| pb::VisibilityPoint {
                after_ms: point.after_ms,
                fresh_probability: point.fresh_probability,
            })
            .collect(),
        remote_apply_ineffective_count: summary.remote_apply_ineffective_count,
    }
}

fn replica_messages(replicas: &[ReplicaSummary]) -> Vec<pb::ReplicaSummary> {
    replicas
        .iter()
        .map(|replica| pb::ReplicaSummary {
            replica: replica.replica.clone(),
            summary: Some(summary_message(&replica.summary)),
        })
        .collect()
}

fn delay_message(settings: DelaySettings) -> pb::DelaySettings {
    pb::DelaySettings {
        delay_ms: settings.delay.as_millis() as u32,
        jitter_ms: settings.jitter.as_millis() as u32,
        link_down: settings.link_down,
    }
}

type ProbeStream = Pin<Box<dyn Stream<Item = Result<pb::ProbeResult, Status>> + Send>>;

#[tonic::async_trait]
impl ConsistencyProbe for Transport {
    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunReport>, Status> {
        let request = run_request(request.into_inner()).map_err(status_of)?;
        let lab_delay_ms = self.service.lab_delay_ms();
        let report = self.service.run(&request).await.map_err(status_of)?;
        Ok(Response::new(pb::RunReport {
            probes: report
                .probes
                .iter()
                .enumerate()
                .map(|(index, probe)| probe_message(index as u32, probe))
                .collect(),
            summary: Some(summary_message(&report.summary)),
            lab_delay_ms,
            strategy: strategy_message(report.strategy).into(),
            replicas: replica_messages(&report.replicas),
        }))
    }

    async fn compare(
        &self,
        request: Request<pb::CompareRequest>,
    ) -> Result<Response<pb::CompareReport>, Status> {
        let request = compare_request(request.into_inner()).map_err(status_of)?;
        let lab_delay_ms = self.service.lab_delay_ms();
        let report = self.service.compare(&request).await.map_err(status_of)?;
        Ok(Response::new(pb::CompareReport {
            strategies: report
                .strategies
                .iter()
                .map(|row| pb::StrategyReport {
                    strategy: strategy_message(row.strategy).into(),
                    summary: Some(summary_message(&row.summary)),
                    replicas: replica_messages(&row.replicas),
                })
                .collect(),
            lab_delay_ms,
            elapsed_ms: report.elapsed_ms,
        }))
    }

    type WatchStream = ProbeStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<ProbeStream>, Status> {
        let request = watch_request(request.into_inner()).map_err(status_of)?;
        let receiver = self.service.watch(&request).map_err(status_of)?;
        let mut index = 0u32;
        let stream = ReceiverStream::new(receiver).map(move |outcome| {
            index += 1;
            Ok(match outcome {
                Ok(probe) => probe_message(index - 1, &probe),
                // An error item would end the stream; an outage should not.
                Err(error) => pb::ProbeResult {
                    index: index - 1,
                    verdict: pb::Verdict::PrimaryError.into(),
                    error: Some(error.to_string()),
                    ..pb::ProbeResult::default()
                },
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn lag(&self, _: Request<pb::LagRequest>) -> Result<Response<pb::LagReport>, Status> {
        let report = self.service.lag().await.map_err(status_of)?;
        Ok(Response::new(pb::LagReport {
            primary_lsn: report.primary_lsn.to_string(),
            replicas: report
                .replicas
                .iter()
                .map(|replica| pb::ReplicaLag {
                    replica: replica.replica.clone(),
                    lag: Some(lag_message(&replica.lag)),
                    error: replica.error.clone(),
                })
                .collect(),
            methods: report
                .methods
                .iter()
                .map(|(name, bias)| ((*name).to_owned(), (*bias).to_owned()))
                .collect(),
        }))
    }

    async fn write(
        &self,
        request: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteResult>, Status> {
        let request = request.into_inner();
        let request = WriteRequest {
            value: request.value,
            client_id: request.client_id,
        };
        let outcome = self.service.write(&request).await.map_err(status_of)?;
        Ok(Response::new(pb::WriteResult {
            key: outcome.key,
            commit_lsn: outcome.commit_lsn.to_string(),
            write_latency_ms: ms(outcome.write_latency),
        }))
    }

    async fn read(
        &self,
        request: Request<pb::ReadRequest>,
    ) -> Result<Response<pb::ReadResult>, Status> {
        let request = read_request(request.into_inner()).map_err(status_of)?;
        let outcome = self.service.read(&request).await.map_err(status_of)?;
        Ok(Response::new(pb::ReadResult {
            value: outcome.value,
            found: outcome.found,
            served_by: served_by_message(Some(outcome.served_by)).into(),
            replica: outcome.replica,
            waited_ms: ms(outcome.waited),
            read_latency_ms: ms(outcome.read_latency),
        }))
    }

    async fn get_delay(
        &self,
        _: Request<pb::GetDelayRequest>,
    ) -> Result<Response<pb::DelaySettings>, Status> {
        let settings = self.service.delay().map_err(status_of)?;
        Ok(Response::new(delay_message(settings)))
    }

    async fn set_delay(
        &self,
        request: Request<pb::DelayChange>,
    ) -> Result<Response<pb::DelaySettings>, Status> {
        let request = request.into_inner();
        let request = DelayRequest {
            delay_ms: request.delay_ms,
            jitter_ms: request.jitter_ms,
            link_down: request.link_down,
        };
        let settings = self.service.set_delay(&request).map_err(status_of)?;
        Ok(Response::new(delay_message(settings)))
    }

    async fn lab_status(
        &self,
        _: Request<pb::LabStatusRequest>,
    ) -> Result<Response<pb::LabStatusReport>, Status> {
        let status = self.service.lab_status().await.map_err(status_of)?;
        Ok(Response::new(pb::LabStatusReport {
            servers: status.servers.into_iter().map(server_message).collect(),
            link: Some(delay_message(status.link)),
        }))
    }

    async fn stop_server(
        &self,
        request: Request<pb::StopServerRequest>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        let request = request.into_inner();
        let mode = stop_mode_of(request.mode).map_err(status_of)?;
        self.control(request.name, ServerAction::Stop(mode)).await
    }

    async fn start_server(
        &self,
        request: Request<pb::ServerName>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        self.control(request.into_inner().name, ServerAction::Start)
            .await
    }

    async fn restart_server(
        &self,
        request: Request<pb::StopServerRequest>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        let request = request.into_inner();
        let mode = stop_mode_of(request.mode).map_err(status_of)?;
        self.control(request.name, ServerAction::Restart(mode))
            .await
    }

    async fn kill_server(
        &self,
        request: Request<pb::ServerName>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        self.control(request.into_inner().name, ServerAction::Kill)
            .await
    }

    async fn failover(
        &self,
        request: Request<pb::FailoverRequest>,
    ) -> Result<Response<pb::FailoverReport>, Status> {
        let request = request.into_inner();
        let request = FailoverRequest {
            promote: request.promote,
            rejoin: request.rejoin,
        };
        let report = self.service.failover(&request).await.map_err(status_of)?;
        Ok(Response::new(failover_message(report)))
    }

    async fn proxy_stats(
        &self,
        _: Request<pb::ProxyStatsRequest>,
    ) -> Result<Response<pb::ProxyStatsReport>, Status> {
        Ok(Response::new(proxy_stats_message(
            self.service.proxy_report(),
        )))
    }
}

impl Transport {
    async fn control(
        &self,
        name: String,
        action: ServerAction,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        let request = ServerRequest { name, action };
        let status = self
            .service
            .control_server(&request)
            .await
            .map_err(status_of)?;
        Ok(Response::new(server_message(status)))
    }
}

fn stop_mode_of(value: i32) -> Result<StopMode> {
    match pb::StopMode::try_from(value) {
        Ok(pb::StopMode::Unspecified | pb::StopMode::Fast) => Ok(StopMode::Fast),
        Ok(pb::StopMode::Immediate) => Ok(StopMode::Immediate),
        Err(_) => Err(Error::invalid("mode", format!("{value} is not a StopMode"))),
    }
}

fn server_message(status: ServerStatus) -> pb::ServerStatus {
    let role = match status.role {
        ServerRole::Primary => pb::ServerRole::Primary,
        ServerRole::Replica => pb::ServerRole::Replica,
        ServerRole::FormerPrimary => pb::ServerRole::FormerPrimary,
    };
    let state = match status.state {
        NodeState::Running => pb::ServerState::Running,
        NodeState::Stopping => pb::ServerState::Stopping,
        NodeState::Stopped => pb::ServerState::Stopped,
        NodeState::Killed => pb::ServerState::Killed,
        NodeState::Exited => pb::ServerState::Exited,
    };
    pb::ServerStatus {
        name: status.name,
        role: role.into(),
        port: u32::from(status.port),
        state: state.into(),
        pid: status.pid,
        exit_status: status.exit_status.unwrap_or_default(),
        log_tail: status.log_tail.unwrap_or_default(),
        replay_lsn: lsn_text(status.replay_lsn),
        wal_lsn: lsn_text(status.wal_lsn),
        streaming: status.streaming,
        error: status.error.unwrap_or_default(),
    }
}

fn lsn_text(lsn: Option<crate::lsn::Lsn>) -> String {
    lsn.map(|lsn| lsn.to_string()).unwrap_or_default()
}

fn failover_message(report: FailoverReport) -> pb::FailoverReport {
    let FailoverReport { promotion, lost } = report;
    pb::FailoverReport {
        promoted: promotion.promoted,
        former_primary: promotion.former_primary,
        replay_lsn_at_promotion: lsn_text(promotion.replay_lsn_at_promotion),
        rejoined: promotion.rejoined,
        took_ms: promotion.took_ms,
        acknowledged: lost.acknowledged as u64,
        lost: lost.lost as u64,
        lost_span_ms: lost.lost_span_ms,
        lost_writes: lost
            .lost_writes
            .into_iter()
            .map(|write| pb::AckedWrite {
                token: write.token,
                written_at_epoch_ms: write.written_at_epoch_ms,
                commit_lsn: lsn_text(write.commit_lsn),
            })
            .collect(),
    }
}

fn proxy_counts_message(counts: &QueryCounts) -> pb::ProxyQueryCounts {
    pb::ProxyQueryCounts {
        reads: counts.reads,
        replica_reads: counts.replica_reads,
        primary_reads: counts.primary_reads,
        reads_at_risk: counts.reads_at_risk,
        reads_unsure: counts.reads_unsure,
        reads_replayed: counts.reads_replayed,
        waits: counts.waits,
        wait_seconds: counts.wait_seconds,
        fallbacks: counts.fallbacks,
    }
}

fn proxy_stats_message(report: ProxyReport) -> pb::ProxyStatsReport {
    let totals = report.totals;
    pb::ProxyStatsReport {
        running: report.running,
        totals: Some(pb::ProxyTotals {
            sessions: totals.sessions,
            primary_reads: totals.primary_reads,
            replica_reads: totals.replica_reads,
            fallbacks: totals.fallbacks,
            waits: totals.waits,
            writes: totals.writes,
            server_waits: totals.server_waits,
        }),
        queries: report
            .queries
            .into_iter()
            .map(|query| pb::ProxyQuery {
                counts: Some(proxy_counts_message(&query.counts)),
                last_at_risk: query.last_at_risk.map(|evidence| pb::ReplayEvidence {
                    token: evidence.token.to_string(),
                    watcher_lsn: lsn_text(evidence.watcher_lsn),
                    watcher_age_ms: evidence.watcher_age_ms,
                }),
                fingerprint: query.fingerprint,
                text: query.text,
            })
            .collect(),
        other: Some(proxy_counts_message(&report.other)),
        max_queries: report.max_queries as u64,
    }
}

/// Serves the probe, reflection and health services on `listener` until `shutdown`.
pub(crate) async fn serve(
    listener: TcpListener,
    service: Service,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|error| Error::FailedPrecondition(format!("reflection descriptors: {error}")))?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|error| Error::FailedPrecondition(format!("reflection descriptors: {error}")))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ConsistencyProbeServer<Transport>>()
        .await;

    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ConsistencyProbeServer::new(Transport { service }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|error| Error::FailedPrecondition(format!("gRPC server: {error}")))
}
