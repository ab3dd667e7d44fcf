//! `lagprobe bench`: the benchmark behind lagprobe's speed and memory targets. It starts real
//! lab clusters, measures, and prints markdown tables; nothing here asserts, so the numbers
//! are read, compared with the targets printed beside them, and quoted.

use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use crate::{
    app,
    config::{PoolArgs, ServiceArgs, StrategyArgs},
    error::{Error, Result},
    lab::{Lab, LabOptions},
};

/// What to measure, and how often.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Lab start-ups to time.
    pub lab_starts: u32,
    pub pg_bindir: Option<std::path::PathBuf>,
}

/// min / median / max of a sample, in ms.
fn spread_ms(samples: &mut [Duration]) -> (f64, f64, f64) {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1]),
    )
}

fn loopback_service() -> ServiceArgs {
    ServiceArgs {
        http_addr: "127.0.0.1:0".parse().expect("static address"),
        grpc_addr: "127.0.0.1:0".parse().expect("static address"),
        no_migrate: false,
        heartbeat_ms: 100,
        pool: PoolArgs {
            pool_size: 16,
            acquire_timeout_ms: 3000,
        },
        strategy: StrategyArgs::default(),
    }
}

/// Runs every measurement and returns the report as markdown.
pub async fn run(options: &BenchOptions, lagprobe_binary: &Path) -> Result<String> {
    let mut report = String::from("# lagprobe bench\n\n");
    report.push_str(&lab_startup(options).await?);
    report.push_str(&idle_rss(options, lagprobe_binary).await?);
    Ok(report)
}

/// Time from `lagprobe lab` starting to the replica streaming, and to the configured delay
/// being engaged (migrations applied and replayed), at D = 1000 ms.
async fn lab_startup(options: &BenchOptions) -> Result<String> {
    let lab_options = LabOptions {
        pg_bindir: options.pg_bindir.clone(),
        delay: Duration::from_millis(1000),
        ..LabOptions::default()
    };
    let mut streaming = Vec::new();
    let mut engaged = Vec::new();
    for _ in 0..options.lab_starts.max(1) {
        let started = Instant::now();
        let (lab, _state, servers) =
            app::start_lab_service(&lab_options, &loopback_service()).await?;
        engaged.push(started.elapsed());
        streaming.push(lab.startup);
        servers.shutdown().await;
        lab.shutdown().await;
    }
    let mut table = format!(
        "## Lab start-up at D = 1000 ms ({} runs)\n\n\
         | measure | min ms | median ms | max ms | target |\n|---|---:|---:|---:|---|\n",
        streaming.len()
    );
    for (label, samples, target) in [
        (
            "initdb + basebackup + start, to replica streaming",
            &mut streaming,
            "<= 3000 ms",
        ),
        (
            "... plus migrations replayed and delay engaged",
            &mut engaged,
            "",
        ),
    ] {
        let (min, median, max) = spread_ms(samples);
        let _ = writeln!(
            table,
            "| {label} | {min:.0} | {median:.0} | {max:.0} | {target} |"
        );
    }
    table.push('\n');
    Ok(table)
}

/// Resident memory of an idle `lagprobe serve` process (a separate process, so the lab and
/// this benchmark do not count), after it has served a few probes and then sat idle.
async fn idle_rss(options: &BenchOptions, lagprobe_binary: &Path) -> Result<String> {
    let lab = Lab::start(&LabOptions {
        pg_bindir: options.pg_bindir.clone(),
        delay: Duration::from_millis(1000),
        ..LabOptions::default()
    })
    .await?;
    crate::db::Databases::connect_lazy(
        &lab.primary_url(),
        &lab.replica_urls(),
        &Default::default(),
    )?
    .migrate()
    .await?;
    lab.apply_configured_delay().await?;

    let http_port = free_port()?;
    let mut child = tokio::process::Command::new(lagprobe_binary)
        .args(["serve", "--no-migrate", "--primary-url", &lab.primary_url()])
        .args(["--replica-url", &lab.replica_url()])
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--grpc-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io("starting lagprobe serve"))?;
    let pid = child.id().unwrap_or_default();
    let probe_url = format!("http://127.0.0.1:{http_port}/api/probe");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut served = 0;
    while served < 5 && Instant::now() < deadline {
        match crate::healthcheck::http_get_status(&probe_url, Duration::from_secs(10)).await {
            Ok(200) => served += 1,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_kib = resident_kib(pid);
    let _ = child.kill().await;
    lab.shutdown().await;

    let rss = rss_kib.map_or_else(
        || "unknown".to_owned(),
        |kib| format!("{:.1}", kib as f64 / 1024.0),
    );
    Ok(format!(
        "## Idle service memory\n\n| measure | MiB | target |\n|---|---:|---|\n\
         | `lagprobe serve` RSS, idle after {served} probes | {rss} | < 50 MB |\n\n"
    ))
}

fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("finding a free port"))?
        .port())
}

/// VmRSS of a process, in KiB.
fn resident_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}
