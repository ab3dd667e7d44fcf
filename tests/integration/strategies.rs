//! Read-your-writes strategies on real replication, through the gRPC API.

use std::time::Duration;

use lagprobe::{
    pb::{
        CompareRequest, DelayChange, GetDelayRequest, ProbeOptions, RunRequest, Schedule, ServedBy,
        Strategy, StrategyOptions, Verdict,
    },
    settings::LabSettings,
};

use crate::harness::{COMMIT_ACK_SLACK_MS, spawn_app, spawn_app_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_reads_at_1000_ms_are_stale_at_least_90_percent_of_the_time() {
    let app = spawn_app(1000).await;
    let report = app
        .grpc()
        .await
        .run(RunRequest {
            schedule: Some(Schedule {
                count: Some(20),
                concurrency: Some(20),
                ..Schedule::default()
            }),
            strategy: Strategy::Replica.into(),
            ..RunRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let summary = report.summary.unwrap();
    assert_eq!(summary.probe_count, 20);
    assert!(summary.stale_count >= 18, "{summary:?}");
    assert!(summary.stale_ratio_ci95_low > 0.6, "{summary:?}");
    assert_eq!(summary.primary_share, 0.0);
    // Nothing is visible 500 ms after the commit; everything is by 2000 ms.
    let curve = |after: u32| {
        summary
            .visibility_curve
            .iter()
            .find(|point| point.after_ms == after)
            .unwrap()
            .fresh_probability
    };
    assert!(curve(500) <= 0.1, "{:?}", summary.visibility_curve);
    assert_eq!(curve(2000), 1.0, "{:?}", summary.visibility_curve);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fix_reads_its_writes_at_200_ms_while_the_replica_baseline_does_not() {
    let app = spawn_app_with(LabSettings {
        delay: Duration::from_millis(200),
        sync_replica: true,
        ..LabSettings::default()
    })
    .await;
    let fixes = [
        Strategy::Primary,
        Strategy::LsnWait,
        Strategy::LsnRoute,
        Strategy::PinWindow,
        Strategy::RemoteApply,
    ];
    let report = app
        .grpc()
        .await
        .compare(CompareRequest {
            strategies: std::iter::once(Strategy::Replica)
                .chain(fixes)
                .map(Into::into)
                .collect(),
            schedule: Some(Schedule {
                count: Some(30),
                concurrency: Some(12),
                ..Schedule::default()
            }),
            ..CompareRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.strategies.len(), 6);
    assert_eq!(report.lab_delay_ms, Some(200));
    for row in &report.strategies {
        let strategy = row.strategy();
        let summary = row.summary.as_ref().unwrap();
        assert_eq!(summary.probe_count, 30, "{strategy:?}");
        assert_eq!(summary.replica_error_count, 0, "{strategy:?}: {summary:?}");
        match strategy {
            Strategy::Replica => assert!(summary.stale_count >= 20, "{summary:?}"),
            _ => assert_eq!(
                summary.stale_count, 0,
                "{strategy:?} read stale: {summary:?}"
            ),
        }
        match strategy {
            Strategy::Replica => assert_eq!(summary.primary_share, 0.0),
            Strategy::Primary | Strategy::PinWindow => assert_eq!(summary.primary_share, 1.0),
            // It waits out the delay on the replica instead of going to the primary.
            Strategy::LsnWait => {
                assert_eq!(summary.primary_share, 0.0, "{summary:?}");
                assert_eq!(summary.wait_count, 30);
                assert_eq!(summary.fallback_count, 0);
                let read = summary.read_latency.as_ref().unwrap();
                assert!(read.p50_ms >= 150.0, "{read:?}");
            }
            Strategy::LsnRoute => assert!(summary.primary_share >= 0.8, "{summary:?}"),
            // The COMMIT waited for the replica, so the replica read right after is fresh.
            Strategy::RemoteApply => {
                assert_eq!(summary.remote_apply_ineffective_count, 0, "{summary:?}");
                assert_eq!(summary.primary_share, 0.0);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_apply_without_a_synchronous_standby_is_reported_ineffective() {
    let app = spawn_app(200).await;
    let report = app
        .grpc()
        .await
        .run(RunRequest {
            schedule: Some(Schedule {
                count: Some(3),
                ..Schedule::default()
            }),
            strategy: Strategy::RemoteApply.into(),
            ..RunRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    for probe in &report.probes {
        assert_eq!(probe.remote_apply_effective, Some(false), "{probe:?}");
        // It did nothing: the commit did not wait for the 200 ms link.
        assert!(probe.write_latency_ms < 150.0, "{probe:?}");
    }
    assert_eq!(report.summary.unwrap().remote_apply_ineffective_count, 3);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lsn_wait_falls_back_to_the_primary_when_the_link_is_cut_and_counts_it() {
    let app = spawn_app(0).await;
    let mut client = app.grpc().await;
    let cut = client
        .set_delay(DelayChange {
            link_down: Some(true),
            ..DelayChange::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Only the field given changed.
    assert!(cut.link_down);
    assert_eq!((cut.delay_ms, cut.jitter_ms), (0, 0));
    let lsn_wait = |count| RunRequest {
        schedule: Some(Schedule {
            count: Some(count),
            ..Schedule::default()
        }),
        strategy: Strategy::LsnWait.into(),
        probe: Some(ProbeOptions {
            strategy_options: Some(StrategyOptions {
                lsn_wait_timeout_ms: Some(300),
                pin_window_ms: None,
            }),
            visibility_timeout_ms: Some(200),
            ..ProbeOptions::default()
        }),
    };
    let report = client.run(lsn_wait(2)).await.unwrap().into_inner();
    for probe in &report.probes {
        assert_eq!(probe.served_by(), ServedBy::Fallback, "{probe:?}");
        assert_eq!(probe.verdict(), Verdict::Fresh, "{probe:?}");
        assert!(probe.waited_ms.unwrap() >= 300.0, "{probe:?}");
        assert!(probe.visibility_timed_out, "{probe:?}");
    }
    let summary = report.summary.unwrap();
    assert_eq!(summary.fallback_count, 2);
    assert_eq!(summary.primary_share, 1.0);

    // Restore the link: the replica reconnects and lsn-wait reads it again.
    client
        .set_delay(DelayChange {
            link_down: Some(false),
            ..DelayChange::default()
        })
        .await
        .unwrap();
    let mut served_by_replica = false;
    for _ in 0..50 {
        let report = client.run(lsn_wait(1)).await.unwrap().into_inner();
        if report.probes[0].served_by() == ServedBy::Replica {
            served_by_replica = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served_by_replica, "lsn-wait never went back to the replica");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_delay_changes_commit_to_visible_live() {
    let app = spawn_app(0).await;
    let mut client = app.grpc().await;
    let visible_p50 =
        |report: lagprobe::pb::RunReport| report.summary.unwrap().visible_after.unwrap().p50_ms;
    let run = RunRequest {
        schedule: Some(Schedule {
            count: Some(3),
            concurrency: Some(3),
            ..Schedule::default()
        }),
        ..RunRequest::default()
    };
    let fast = visible_p50(client.run(run).await.unwrap().into_inner());
    assert!(fast < 300.0, "{fast}");

    let applied = client
        .set_delay(DelayChange {
            delay_ms: Some(600),
            ..DelayChange::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(applied.delay_ms, 600);
    let current = client
        .get_delay(GetDelayRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.delay_ms, 600);
    let slow = visible_p50(client.run(run).await.unwrap().into_inner());
    assert!(slow >= 600.0 - COMMIT_ACK_SLACK_MS, "{slow}");
    assert!(slow < 1500.0, "{slow}");

    let status = client
        .set_delay(DelayChange {
            delay_ms: Some(600_001),
            ..DelayChange::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(
        status.message().contains("delay_ms"),
        "{}",
        status.message()
    );
    // 2^32 + 5 is refused, not wrapped around to a 5 ms delay.
    let status = client
        .set_delay(DelayChange {
            delay_ms: Some((1 << 32) + 5),
            ..DelayChange::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let current = client
        .get_delay(GetDelayRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(current.delay_ms, 600);
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_replicas_are_named_and_broken_down() {
    let app = spawn_app_with(LabSettings {
        delay: Duration::from_millis(100),
        replicas: 2,
        ..LabSettings::default()
    })
    .await;
    let mut client = app.grpc().await;
    let report = client
        .run(RunRequest {
            schedule: Some(Schedule {
                count: Some(4),
                concurrency: Some(4),
                ..Schedule::default()
            }),
            ..RunRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut names: Vec<_> = report.probes.iter().map(|p| p.replica.clone()).collect();
    names.sort();
    assert_eq!(names, ["replica1", "replica1", "replica2", "replica2"]);
    let per_replica: Vec<_> = report
        .replicas
        .iter()
        .map(|r| (r.replica.as_str(), r.summary.as_ref().unwrap().probe_count))
        .collect();
    assert_eq!(per_replica, [("replica1", 2), ("replica2", 2)]);

    let lag = client
        .lag(lagprobe::pb::LagRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lag.replicas.len(), 2);
    for replica in &lag.replicas {
        assert_eq!(replica.error, None, "{replica:?}");
        let measures = replica.lag.as_ref().unwrap();
        assert!(measures.heartbeat_lag_ms.is_some(), "{replica:?}");
        assert!(measures.lsn_gap_bytes.is_some(), "{replica:?}");
    }
    assert_eq!(lag.methods.len(), 7);
    app.shutdown().await;
}
