//! `lagprobe bench`: the benchmark behind lagprobe's speed and memory targets. It starts real
//! lab clusters, measures, and prints markdown tables; nothing here asserts, so the numbers
//! are read, compared with the targets printed beside them, and quoted.

use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use lagprobe::{
    DelayLink, Error, ProbeOptions, Result, RunSummary, markdown_table,
    server::{self, App},
    service::{CompareRequest, RunRequest, Schedule, Service},
    settings::{DatabaseSettings, LabSettings, PoolSettings, Settings, Strategy},
};

/// What to measure, and how often.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Lab start-ups to time.
    pub lab_starts: u32,
    /// Probes per strategy and delay in the strategy table.
    pub strategy_probes: u32,
    /// Probes per concurrency level in the probe-rate table.
    pub rate_probes: u32,
    /// Which tables to produce: startup, memory, strategies, link, rate (all when empty).
    pub sections: Vec<String>,
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

/// The app on a default lab with `delay_ms` (and these changes), on free loopback ports.
async fn lab_app(options: &BenchOptions, delay_ms: u64, lab: LabSettings) -> Result<App> {
    let lab = LabSettings {
        pg_bindir: options.pg_bindir.clone(),
        delay: Duration::from_millis(delay_ms),
        ..lab
    };
    server::build(Settings::on_free_ports(DatabaseSettings::Lab(lab))).await
}

/// The lab of a running app (every app here starts one).
fn lab_of(app: &App) -> &lagprobe::Lab {
    app.lab().expect("bench apps run a lab")
}

/// Runs every measurement and returns the report as markdown.
pub async fn run(options: &BenchOptions, lagprobe_binary: &Path) -> Result<String> {
    const SECTIONS: [&str; 5] = ["startup", "memory", "strategies", "link", "rate"];
    if let Some(unknown) = options
        .sections
        .iter()
        .find(|s| !SECTIONS.contains(&s.as_str()))
    {
        return Err(Error::invalid(
            "sections",
            format!("{unknown:?} is not one of {}", SECTIONS.join(", ")),
        ));
    }
    let wanted = |section: &str| {
        options.sections.is_empty() || options.sections.iter().any(|s| s == section)
    };
    let mut report = String::from("# lagprobe bench\n\n");
    if wanted("startup") {
        report.push_str(&lab_startup(options).await?);
    }
    if wanted("memory") {
        report.push_str(&idle_rss(options, lagprobe_binary).await?);
    }
    if wanted("strategies") {
        report.push_str(&strategy_table(options).await?);
    }
    if wanted("link") {
        report.push_str(&delay_link_accuracy().await?);
    }
    if wanted("rate") {
        report.push_str(&probe_rate(options).await?);
    }
    Ok(report)
}

/// Time from `lagprobe lab` starting to the replica streaming, and to the configured delay
/// being engaged (migrations applied and replayed), at D = 1000 ms.
async fn lab_startup(options: &BenchOptions) -> Result<String> {
    let mut streaming = Vec::new();
    let mut engaged = Vec::new();
    for _ in 0..options.lab_starts.max(1) {
        let started = Instant::now();
        let app = lab_app(options, 1000, LabSettings::default()).await?;
        engaged.push(started.elapsed());
        streaming.push(lab_of(&app).startup);
        app.shutdown().await;
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
    let lab = server::start_lab(
        &LabSettings {
            pg_bindir: options.pg_bindir.clone(),
            ..LabSettings::default()
        },
        true,
        &PoolSettings::default(),
    )
    .await?;

    let http_port = free_port()?;
    let mut child = tokio::process::Command::new(lagprobe_binary)
        .args(["serve", "--no-migrate", "--primary-url", &lab.primary_url()])
        .args(["--replica-url", &lab.replica_url()])
        .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
        .args(["--grpc-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0"])
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
        match super::healthcheck::http_get_status(&probe_url, Duration::from_secs(10)).await {
            Ok(200) => served += 1,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_kib = resident_kib(pid).await;
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

/// VmRSS of a process, in KiB.
async fn resident_kib(pid: u32) -> Option<u64> {
    let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
        .await
        .ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// Every strategy on the same interleaved workload at D = 0, 50, 200 and 1000 ms, on a lab
/// with a synchronous replica (so remote-apply takes effect).
async fn strategy_table(options: &BenchOptions) -> Result<String> {
    let mut reports = Vec::new();
    for delay_ms in [0u64, 50, 200, 1000] {
        let sync_replica = LabSettings {
            sync_replica: true,
            ..LabSettings::default()
        };
        let app = lab_app(options, delay_ms, sync_replica).await?;
        let request = CompareRequest {
            schedule: Schedule {
                count: Some(u64::from(options.strategy_probes)),
                concurrency: Some(8),
                ..Schedule::default()
            },
            ..CompareRequest::default()
        };
        reports.push((delay_ms, app.service().compare(&request).await?));
        app.shutdown().await;
    }
    let rows: Vec<(String, &RunSummary)> = reports
        .iter()
        .flat_map(|(delay_ms, report)| {
            report
                .strategies
                .iter()
                .map(move |row| (format!("D={delay_ms} ms {}", row.strategy), &row.summary))
        })
        .collect();
    Ok(format!(
        "## Strategies compared ({} probes each, 8 in flight, synchronous replica)\n\n{}\n",
        options.strategy_probes,
        markdown_table(&rows)
    ))
}

/// An upstream that echoes whatever it is sent.
async fn echo_upstream() -> Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(Error::io("binding the echo server"))?;
    let addr = listener
        .local_addr()
        .map_err(Error::io("echo server address"))?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = socket.set_nodelay(true);
            tokio::spawn(async move {
                let (mut reader, mut writer) = socket.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    Ok(addr)
}

/// Per-message one-way latency added by the link: messages sent every 5 ms through the
/// link to an echo server come back `delay` later; the same run against the echo server
/// directly is the baseline subtracted.
async fn echo_latencies(addr: std::net::SocketAddr, messages: u32) -> Result<Vec<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Error::io("connecting for the latency run"))?;
    stream.set_nodelay(true).map_err(Error::io("nodelay"))?;
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    // Each message carries the moment it was really sent (ns since `started`), so the
    // sender's own timer lateness does not count as link delay.
    let sender = tokio::spawn(async move {
        for index in 0..messages {
            tokio::time::sleep_until((started + Duration::from_millis(5) * index).into()).await;
            let sent_ns = started.elapsed().as_nanos() as u64;
            if writer.write_all(&sent_ns.to_le_bytes()).await.is_err() {
                return;
            }
        }
    });
    let mut latencies = Vec::with_capacity(messages as usize);
    let mut buffer = [0u8; 8];
    for _ in 0..messages {
        reader
            .read_exact(&mut buffer)
            .await
            .map_err(Error::io("reading an echo"))?;
        let sent = started + Duration::from_nanos(u64::from_le_bytes(buffer));
        latencies.push(sent.elapsed());
    }
    let _ = sender.await;
    Ok(latencies)
}

/// Bytes per second from an upstream that streams `total` bytes to each client, read at
/// `addr` (directly or through a link).
async fn streamed_throughput(addr: std::net::SocketAddr, total: u64) -> Result<f64> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Error::io("connecting for the throughput run"))?;
    let started = Instant::now();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    while received < total {
        let read = stream
            .read(&mut buffer)
            .await
            .map_err(Error::io("reading the stream"))?;
        if read == 0 {
            break;
        }
        received += read as u64;
    }
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

async fn streaming_upstream(total: u64) -> Result<std::net::SocketAddr> {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(Error::io("binding the stream server"))?;
    let addr = listener
        .local_addr()
        .map_err(Error::io("stream server address"))?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 256 * 1024];
                let mut sent = 0u64;
                while sent < total {
                    if socket.write_all(&chunk).await.is_err() {
                        return;
                    }
                    sent += chunk.len() as u64;
                }
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// How exactly the delay link holds bytes, and how fast it passes them at D = 0.
async fn delay_link_accuracy() -> Result<String> {
    let echo = echo_upstream().await?;
    let mut direct = echo_latencies(echo, 200).await?;
    let (_, baseline_ms, _) = spread_ms(&mut direct);
    let mut table = String::from(
        "## Delay link accuracy\n\n\
         Added delay = latency through the link minus the configured delay minus the direct \
         loopback round trip (median). Target: within 1 ms at p99.\n\n\
         | configured ms | messages | added p50 ms | added p99 ms | added max ms |\n\
         |---:|---:|---:|---:|---:|\n",
    );
    for delay_ms in [50u64, 1000] {
        let link = DelayLink::bind(
            "127.0.0.1:0",
            echo.to_string(),
            Duration::from_millis(delay_ms),
        )
        .await
        .map_err(Error::io("starting a delay link"))?;
        let mut through = echo_latencies(link.local_addr(), 400).await?;
        through.sort();
        let added = |quantile: f64| {
            let index = ((through.len() - 1) as f64 * quantile).round() as usize;
            through[index].as_secs_f64() * 1000.0 - delay_ms as f64 - baseline_ms
        };
        let _ = writeln!(
            table,
            "| {delay_ms} | {} | {:.3} | {:.3} | {:.3} |",
            through.len(),
            added(0.5),
            added(0.99),
            added(1.0)
        );
    }

    let total = 512 * 1024 * 1024;
    let source = streaming_upstream(total).await?;
    let direct_rate = streamed_throughput(source, total).await?;
    let link = DelayLink::bind("127.0.0.1:0", source.to_string(), Duration::ZERO)
        .await
        .map_err(Error::io("starting a delay link"))?;
    let link_rate = streamed_throughput(link.local_addr(), total).await?;
    let _ = write!(
        table,
        "\n| throughput at D = 0 (512 MiB, primary to replica direction) | MiB/s |\n|---|---:|\n\
         | direct loopback | {:.0} |\n| through the delay link | {:.0} ({:.0}% of direct; target >= 50%) |\n\n",
        direct_rate / 1048576.0,
        link_rate / 1048576.0,
        100.0 * link_rate / direct_rate
    );
    Ok(table)
}

/// Probes per second with the replica strategy at D = 0 from 1, 8 and 32 concurrent
/// clients, and what the engine adds over the same statements sent directly.
async fn probe_rate(options: &BenchOptions) -> Result<String> {
    let mut settings = Settings::on_free_ports(DatabaseSettings::Lab(LabSettings {
        pg_bindir: options.pg_bindir.clone(),
        delay: Duration::ZERO,
        ..LabSettings::default()
    }));
    settings.pool.max_connections = 64;
    let app = server::build(settings).await?;
    let service = app.service();
    let mut table = format!(
        "## Probe rate, replica strategy, D = 0 ({} probes per row)\n\n\
         | concurrent clients | probes/s | probe p50 ms | probe p99 ms |\n|---:|---:|---:|---:|\n",
        options.rate_probes
    );
    for clients in [1u64, 8, 32] {
        let started = Instant::now();
        let request = RunRequest {
            strategy: Some(Strategy::Replica),
            schedule: Schedule {
                count: Some(u64::from(options.rate_probes)),
                concurrency: Some(clients),
                ..Schedule::default()
            },
            ..RunRequest::default()
        };
        let report = service.run(&request).await?;
        let elapsed = started.elapsed().as_secs_f64();
        let mut probe_times: Vec<Duration> = report
            .probes
            .iter()
            .map(|probe| {
                probe.write_latency
                    + probe
                        .visible_after
                        .or(probe.read_latency)
                        .unwrap_or_default()
            })
            .collect();
        let (_, p50, _) = spread_ms(&mut probe_times);
        let p99 =
            probe_times[((probe_times.len() - 1) as f64 * 0.99) as usize].as_secs_f64() * 1000.0;
        let _ = writeln!(
            table,
            "| {clients} | {:.0} | {p50:.2} | {p99:.2} |",
            f64::from(options.rate_probes) / elapsed
        );
    }

    table.push_str(&probe_overhead(service, options.rate_probes.max(50)).await?);
    app.shutdown().await;
    Ok(table)
}

/// What the engine adds over the same statements sent directly, in the same order on the
/// same pools, alternating so drift hits both alike.
async fn probe_overhead(service: &Service, rounds: u32) -> Result<String> {
    let engine = service.engine();
    let databases = engine.databases();
    let replica = &databases.replicas()[0];
    let probe_options = ProbeOptions::default();
    let mut engine_time = Duration::ZERO;
    let mut direct_time = Duration::ZERO;
    // The engine deletes its rows in batches, outside the probe: so do the direct probes.
    let mut direct_tokens = Vec::new();
    for round in 0..rounds {
        let token = format!("bench-{round}");
        let started = Instant::now();
        databases.write_row(&token, None, None).await?;
        let standby = databases.standby_name(replica).await.ok();
        let (position, first) = tokio::join!(
            databases.commit_position(standby.as_deref()),
            databases.read_on_replica(replica, &token)
        );
        position?;
        let mut seen = first?.row.is_some();
        while !seen {
            tokio::time::sleep(probe_options.poll_interval).await;
            seen = databases
                .read_on_replica(replica, &token)
                .await?
                .row
                .is_some();
        }
        direct_time += started.elapsed();
        direct_tokens.push(token);

        let started = Instant::now();
        engine.probe(&probe_options).await?;
        engine_time += started.elapsed();
    }
    databases
        .delete_probe_rows(&direct_tokens, Duration::from_secs(600))
        .await?;
    let engine_ms = engine_time.as_secs_f64() * 1000.0 / f64::from(rounds);
    let direct_ms = direct_time.as_secs_f64() * 1000.0 / f64::from(rounds);
    Ok(format!(
        "\n| probe overhead ({rounds} alternating rounds) | mean ms |\n|---|---:|\n\
         | same statements sent directly | {direct_ms:.3} |\n| engine probe | {engine_ms:.3} |\n\
         | overhead | {:+.1}% (target <= 10%) |\n\n",
        100.0 * (engine_ms - direct_ms) / direct_ms
    ))
}

/// A loopback port nothing listens on right now.
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(Error::io("finding a free port"))?;
    Ok(listener
        .local_addr()
        .map_err(Error::io("finding a free port"))?
        .port())
}
