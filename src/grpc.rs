//! The gRPC transport: `lagprobe.v1.ConsistencyProbe`, with reflection (v1 and v1alpha, so
//! grpcurl needs no .proto file) and the standard health service. Thin by design: it turns
//! requests into probe-engine calls and results into messages, nothing more.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::{
    app::AppState,
    error::{Error, ErrorKind, Result},
    probe::{self, ProbeResult, RunParams, RunSummary, Verdict},
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
pub fn status_of(error: Error) -> Status {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::Unavailable => Status::unavailable(message),
        ErrorKind::FailedPrecondition => Status::failed_precondition(message),
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::Internal => Status::internal(message),
    }
}

#[derive(Debug, Clone)]
struct Service {
    state: AppState,
}

#[tonic::async_trait]
impl ConsistencyProbe for Service {
    async fn run(
        &self,
        request: Request<pb::RunRequest>,
    ) -> Result<Response<pb::RunReport>, Status> {
        let request = request.into_inner();
        let params = RunParams {
            count: request.count.map(u64::from),
            interval_ms: request.interval_ms.map(u64::from),
            visibility_timeout_ms: request.visibility_timeout_ms.map(u64::from),
            poll_interval_ms: request.poll_interval_ms.map(u64::from),
            concurrency: request.concurrency.map(u64::from),
        };
        let lab_delay_ms = self.state.lab_delay().map(|delay| delay.as_millis() as u64);
        let report = self.state.run(&params).await.map_err(status_of)?;
        Ok(Response::new(pb::RunReport {
            probes: report
                .probes
                .iter()
                .enumerate()
                .map(|(index, probe)| probe_message(index as u32, probe))
                .collect(),
            summary: Some(summary_message(&report.summary)),
            lab_delay_ms,
        }))
    }
}

fn ms(duration: Duration) -> f64 {
    probe::millis(duration)
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
        visible_after_p50_ms: summary.visible_after_p50_ms,
        visible_after_p90_ms: summary.visible_after_p90_ms,
        visible_after_p99_ms: summary.visible_after_p99_ms,
        visible_after_max_ms: summary.visible_after_max_ms,
        lsn_gap_max_bytes: summary.lsn_gap_max_bytes,
        elapsed_ms: summary.elapsed_ms,
    }
}

/// Serves the probe, reflection and health services on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
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
        .set_serving::<ConsistencyProbeServer<Service>>()
        .await;

    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(ConsistencyProbeServer::new(Service { state }))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(|error| Error::FailedPrecondition(format!("gRPC server: {error}")))
}
