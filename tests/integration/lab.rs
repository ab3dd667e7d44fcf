//! The lab's life cycle: it streams and it stops cleanly, whether shut down or dropped.
//! (Outages and failovers on purpose: `faults.rs`.)

use std::{path::Path, time::Duration};

use lagprobe::settings::{DatabaseSettings, LabSettings};

use crate::harness::spawn_app;

pub fn postmaster_pid(data_dir: &Path) -> i32 {
    let pid_file = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
    pid_file.lines().next().unwrap().trim().parse().unwrap()
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_leaves_no_postmaster_and_no_directory() {
    let app = spawn_app(1000).await;
    let dir = app.lab().data_dir().to_path_buf();
    let primary = postmaster_pid(&dir.join("primary"));
    let replica = postmaster_pid(&dir.join("replica1"));
    assert!(alive(primary) && alive(replica));

    app.shutdown().await;
    assert!(
        !alive(primary),
        "primary postmaster {primary} still running"
    );
    assert!(
        !alive(replica),
        "replica postmaster {replica} still running"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_lab_without_shutdown_still_stops_the_servers() {
    let app = spawn_app(0).await;
    let dir = app.lab().data_dir().to_path_buf();
    let primary = postmaster_pid(&dir.join("primary"));
    let replica = postmaster_pid(&dir.join("replica1"));
    drop(app);
    // Dropping does not wait (it must not block a runtime worker): the servers end, and then
    // the directory goes, shortly after.
    let gone = |pid| !alive(pid);
    assert!(
        eventually(|| gone(primary) && gone(replica)).await,
        "postmasters still running"
    );
    assert!(
        eventually(|| !dir.exists()).await,
        "{} left behind",
        dir.display()
    );
}

/// Whether `condition` holds within 10 s.
pub async fn eventually(condition: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_http_address_fails_before_any_cluster_is_built() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let data_dir = tempfile::tempdir().unwrap();
    let lab = LabSettings {
        data_dir: Some(data_dir.path().join("cluster")),
        ..LabSettings::with_delay(Duration::ZERO)
    };
    let mut settings = crate::harness::settings(DatabaseSettings::Lab(lab));
    settings.http_addr = taken.local_addr().unwrap();
    let error = lagprobe::server::build(settings).await.unwrap_err();
    assert_eq!(error.field(), Some("http_addr"), "{error}");
    assert!(error.to_string().contains("cannot listen"), "{error}");
    assert!(
        !data_dir.path().join("cluster").exists(),
        "a cluster was built although the service could not listen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_port_held_by_another_server_fails_with_the_bind_error() {
    // Another lab's primary answers on the port this lab's replica is told to use: the
    // replica cannot bind it, and the lab must say so rather than take the other server,
    // which accepts connections just as well, for its own.
    let other = spawn_app(0).await;
    let (_, taken_port) = ports(&other.lab().primary_url()).await;
    let lab = LabSettings {
        replica_port: u16::try_from(taken_port).unwrap(),
        ..LabSettings::with_delay(Duration::ZERO)
    };
    let built = lagprobe::server::build(crate::harness::settings(DatabaseSettings::Lab(lab))).await;
    let Err(error) = built else {
        panic!("a lab whose replica could not bind its port started anyway");
    };
    let message = error.to_string();
    assert!(message.contains("replica1"), "{message}");
    assert!(message.contains("could not bind"), "{message}");
    probes_fine(&other).await;
    other.shutdown().await;
}

/// The newest Debian-layout bindir that has pg_basebackup (the machine's own PostgreSQL).
fn system_bindir() -> std::path::PathBuf {
    let mut bindirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries in /usr/lib/postgresql (apt-get install postgresql)")
        .filter_map(|entry| Some(entry.ok()?.path().join("bin")))
        .filter(|bin| bin.join("pg_basebackup").exists())
        .collect();
    bindirs.sort();
    bindirs.pop().expect("a bindir with pg_basebackup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_pg_basebackup_replicas_are_copies_of_the_new_primary() {
    // Only initdb and postgres, as the npm builds of PostgreSQL ship them.
    let bindir = tempfile::tempdir().unwrap();
    for program in ["initdb", "postgres"] {
        std::os::unix::fs::symlink(system_bindir().join(program), bindir.path().join(program))
            .unwrap();
    }
    // The lab's servers run as `postgres` when the tests run as root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(bindir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();

    // No template either: the replicas are copies of the freshly initialised primary.
    let app = crate::harness::spawn_app_with(LabSettings {
        pg_bindir: Some(bindir.path().to_path_buf()),
        replicas: 2,
        cache_dir: None,
        ..LabSettings::with_delay(Duration::from_millis(200))
    })
    .await;
    assert!(!app.lab().binaries().has_base_backup);
    let (status, readiness) = app.get_json("/readyz").await;
    assert_eq!(status, reqwest::StatusCode::OK, "{readiness}");
    for _ in 0..2 {
        let probe = app
            .service()
            .probe(&lagprobe::service::ProbeRequest::default())
            .await
            .unwrap();
        assert_eq!(probe.verdict, lagprobe::Verdict::Stale, "{probe:?}");
        assert!(probe.visible_after.is_some(), "{probe:?}");
    }
    app.shutdown().await;
}

/// Probes once and checks the write became visible on the replica.
async fn probes_fine(app: &crate::harness::TestApp) {
    let probe = app
        .service()
        .probe(&lagprobe::service::ProbeRequest::default())
        .await
        .unwrap();
    assert!(probe.visible_after.is_some(), "{probe:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labs_copy_one_cached_template_and_run_initdb_without_a_cache() {
    use std::os::unix::fs::PermissionsExt;
    let cache = tempfile::tempdir().unwrap();
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let with_cache = || LabSettings {
        cache_dir: Some(cache.path().to_path_buf()),
        replicas: 2,
        ..LabSettings::with_delay(Duration::ZERO)
    };
    let first = crate::harness::spawn_app_with(with_cache()).await;
    probes_fine(&first).await;
    first.shutdown().await;
    let templates: Vec<_> = std::fs::read_dir(cache.path().join("templates"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    assert_eq!(
        templates.len(),
        1,
        "one template, no scratch left: {templates:?}"
    );
    assert!(templates[0].join("PG_VERSION").exists());
    let built = std::fs::metadata(templates[0].join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();

    let second = crate::harness::spawn_app_with(with_cache()).await;
    probes_fine(&second).await;
    second.shutdown().await;
    let reused = std::fs::metadata(templates[0].join("PG_VERSION"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(built, reused, "the second lab reused the template");

    // No cache: initdb for the primary, pg_basebackup for the replicas.
    let without = crate::harness::spawn_app_with(LabSettings {
        cache_dir: None,
        ..LabSettings::with_delay(Duration::ZERO)
    })
    .await;
    probes_fine(&without).await;
    without.shutdown().await;
}

/// The port `url`'s server streams from (its WAL receiver's), and its own.
async fn ports(url: &str) -> (Option<i32>, i32) {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url).await.unwrap();
    let sender: Option<i32> = sqlx::query_scalar("SELECT sender_port FROM pg_stat_wal_receiver")
        .fetch_optional(&mut connection)
        .await
        .unwrap()
        .flatten();
    let own: i32 = sqlx::query_scalar("SELECT inet_server_port()")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    (sender, own)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_direct_replica_streams_from_the_primary_and_the_other_through_the_link() {
    let app = crate::harness::spawn_app_with(LabSettings {
        replicas: 2,
        direct_replica: true,
        ..LabSettings::with_delay(Duration::from_millis(1000))
    })
    .await;
    let (_, primary_port) = ports(&app.lab().primary_url()).await;
    let replicas = app.lab().replica_urls();
    let (linked_sender, _) = ports(&replicas[0].1).await;
    let (direct_sender, _) = ports(&replicas[1].1).await;
    assert_eq!(replicas[1].0, "replica2");
    assert_eq!(direct_sender, Some(primary_port));
    assert!(linked_sender.is_some());
    assert_ne!(
        linked_sender,
        Some(primary_port),
        "replica1 bypasses the link"
    );
    app.shutdown().await;
}
