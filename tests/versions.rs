//! The smoke suite on every supported PostgreSQL, 13 to 19: the lab starts and streams (with
//! a synchronous replica), the migrations apply, at 200 ms a probe is stale while lsn-wait and
//! remote-apply probes are fresh, every lag method has a value, and lsn-wait waits with
//! `WAIT FOR LSN` on 19 and by polling before, falling back to the primary on its timeout;
//! and through the proxy, with sqlx, the replica strategy reads its own write stale and
//! lsn-wait fresh.
//!
//! The binaries come from `scripts/pg-binaries MAJOR` (npm's embedded-postgres builds for
//! 13 to 18, which have no pg_basebackup, so these labs also test the copied replicas; Debian
//! experimental's for 19), cached between runs. The full suite runs on the machine's own
//! PostgreSQL (tests/integration).

#[path = "integration/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::{path::PathBuf, process::Command, time::Duration};

use lagprobe::{
    ServedBy, Verdict, WaitMethod,
    service::{ProbeParams, ProbeRequest, StrategyParams},
    settings::{LabSettings, Strategy},
};

/// The bindir of PostgreSQL `major`, fetched into the cache if need be.
fn bindir(major: u32) -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/pg-binaries");
    let output = Command::new("bash")
        .arg(script)
        .arg(major.to_string())
        .output()
        .expect("bash runs scripts/pg-binaries");
    assert!(
        output.status.success(),
        "could not get PostgreSQL {major} binaries: {}\n(13 to 18 need npm: apt-get install npm; \
         19 needs apt-get, dpkg-deb and patchelf: apt-get install patchelf)",
        String::from_utf8_lossy(&output.stderr)
    );
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

async fn smoke(major: u32) {
    let bindir = bindir(major);
    // Synchronous, so remote-apply is tried too; ordinary commits stay local.
    let app = harness::spawn_app_with(LabSettings {
        pg_bindir: Some(bindir),
        sync_replica: true,
        ..LabSettings::with_delay(Duration::from_millis(200))
    })
    .await;
    let version = app.lab().binaries().version.clone();
    assert!(
        version.starts_with(&major.to_string()),
        "{version} is not {major}"
    );
    let (status, readiness) = app.get_json("/readyz").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{major}: {readiness}");

    // The second probe: the first learns the replica's standby name, which the
    // pg_stat_replication lags are looked up by.
    app.service().probe(&ProbeRequest::default()).await.unwrap();
    let stale = app.service().probe(&ProbeRequest::default()).await.unwrap();
    assert_eq!(stale.verdict, Verdict::Stale, "{major}: {stale:?}");
    assert!(stale.visible_after.is_some(), "{major}: {stale:?}");
    let lag = stale.lag;
    for (method, value) in [
        ("lsn_gap_bytes", lag.lsn_gap_bytes.map(|v| v as f64)),
        ("replay_timestamp_lag_ms", lag.replay_timestamp_lag_ms),
        (
            "receive_replay_gap_bytes",
            lag.receive_replay_gap_bytes.map(|v| v as f64),
        ),
        ("heartbeat_lag_ms", lag.heartbeat_lag_ms),
        ("stat_write_lag_ms", lag.stat_write_lag_ms),
        ("stat_flush_lag_ms", lag.stat_flush_lag_ms),
        ("stat_replay_lag_ms", lag.stat_replay_lag_ms),
    ] {
        assert!(value.is_some(), "PostgreSQL {major}: no {method}: {lag:?}");
    }

    let lsn_wait = app
        .service()
        .probe(&ProbeRequest {
            strategy: Some(Strategy::LsnWait),
            ..ProbeRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(lsn_wait.verdict, Verdict::Fresh, "{major}: {lsn_wait:?}");
    let expected = if major >= 19 {
        WaitMethod::WaitForLsn
    } else {
        WaitMethod::Poll
    };
    assert_eq!(
        lsn_wait.wait_method,
        Some(expected),
        "{major}: {lsn_wait:?}"
    );
    let waited = lsn_wait.waited.unwrap();
    assert!(
        waited >= Duration::from_millis(150),
        "{major}: waited only {waited:?}"
    );

    let remote_apply = app
        .service()
        .probe(&ProbeRequest {
            strategy: Some(Strategy::RemoteApply),
            ..ProbeRequest::default()
        })
        .await
        .unwrap();
    assert_eq!(
        remote_apply.verdict,
        Verdict::Fresh,
        "{major}: {remote_apply:?}"
    );
    assert_eq!(remote_apply.remote_apply_effective, Some(true), "{major}");

    // A timeout shorter than the delay: the read falls back to the primary, still fresh.
    let fallback = app
        .service()
        .probe(&ProbeRequest {
            strategy: Some(Strategy::LsnWait),
            probe: ProbeParams {
                strategy_options: StrategyParams {
                    lsn_wait_timeout_ms: Some(50),
                    ..StrategyParams::default()
                },
                ..ProbeParams::default()
            },
        })
        .await
        .unwrap();
    assert_eq!(
        fallback.served_by,
        Some(ServedBy::Fallback),
        "{major}: {fallback:?}"
    );
    assert_eq!(fallback.verdict, Verdict::Fresh, "{major}: {fallback:?}");
    assert_eq!(
        fallback.wait_method,
        Some(expected),
        "{major}: {fallback:?}"
    );
    proxy_reads_its_own_writes(&app, major).await;
    app.shutdown().await;
}

/// Through the proxy with sqlx (extended protocol, named statements, `lagprobe.*` answered
/// by the proxy): the replica strategy reads its own write stale, lsn-wait fresh, both on
/// the replica.
async fn proxy_reads_its_own_writes(app: &harness::TestApp, major: u32) {
    use sqlx::{Connection, Row};
    let addr = app.app.proxy_addr.expect("the test app runs the proxy");
    let url = format!("postgres://postgres@{addr}/lagprobe?sslmode=disable");
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    // Through lsn-wait, the table is on the replica before the first read of it.
    sqlx::query("CREATE TABLE smoke (id int)")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut read_back = async |strategy: &str, id: i32| -> (i64, bool) {
        let set = format!("SET lagprobe.strategy = '{strategy}'");
        sqlx::query(sqlx::AssertSqlSafe(set))
            .execute(&mut conn)
            .await
            .unwrap();
        let shown: String = sqlx::query_scalar("SHOW lagprobe.strategy")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(shown, strategy, "PostgreSQL {major}");
        sqlx::query("INSERT INTO smoke VALUES ($1)")
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
        let row = sqlx::query("SELECT count(*), pg_is_in_recovery() FROM smoke WHERE id = $1")
            .bind(id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        read_back("lsn-wait", 1).await,
        (1, true),
        "PostgreSQL {major}"
    );
    assert_eq!(
        read_back("replica", 2).await,
        (0, true),
        "PostgreSQL {major}"
    );
    assert_eq!(
        read_back("lsn-wait", 3).await,
        (1, true),
        "PostgreSQL {major}"
    );
    // At 200 ms each lsn-wait read waited; from 19 on, the replica's WAIT FOR LSN ended
    // the waits (before, only the watcher's polls can).
    let (_, report) = app.get_json("/api/proxy").await;
    let totals = &report["totals"];
    let waits = totals["waits"].as_u64().unwrap();
    let server_waits = totals["server_waits"].as_u64().unwrap();
    assert!(waits >= 2, "PostgreSQL {major}: {totals}");
    if major >= 19 {
        assert!(server_waits >= 2, "PostgreSQL {major}: {totals}");
    } else {
        assert_eq!(server_waits, 0, "PostgreSQL {major}: {totals}");
    }
}

macro_rules! smoke_tests {
    ($($name:ident => $major:literal),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                smoke($major).await;
            }
        )*
    };
}

smoke_tests! {
    postgresql_13 => 13,
    postgresql_14 => 14,
    postgresql_15 => 15,
    postgresql_16 => 16,
    postgresql_17 => 17,
    postgresql_18 => 18,
    postgresql_19 => 19,
}
