//! `lagprobe bench`: the benchmark behind lagprobe's speed and memory targets. It starts real
//! lab clusters, measures, and prints markdown tables; nothing here asserts, so the numbers
//! are read, compared with the targets printed beside them, and quoted.

use std::{
    fmt::Write as _,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

mod floor;
mod link;
mod proxy;
mod startup;

use lagprobe::{
    Error, ProbeOptions, Result, RunSummary, markdown_table,
    server::{self, App},
    service::{CompareRequest, RunRequest, Schedule, Service},
    settings::{DatabaseSettings, LabSettings, PROBE_HISTORY, PoolSettings, Settings, Strategy},
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
    /// pgbench clients (`-c`) in the proxy throughput table.
    pub proxy_clients: u32,
    /// pgbench seconds (`-T`) per run in the proxy throughput table.
    pub proxy_seconds: u32,
    /// Rounds of the three ways per mode in the proxy throughput table.
    pub proxy_rounds: u32,
    /// Which tables to produce: startup, floor, memory, strategies, link, link-memory, pgbench,
    /// rate, page, proxy (all when empty).
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
    const SECTIONS: [&str; 10] = [
        "startup",
        "floor",
        "memory",
        "strategies",
        "link",
        "link-memory",
        "pgbench",
        "rate",
        "page",
        "proxy",
    ];
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
        report.push_str(&startup::readyz(options.lab_starts, lagprobe_binary).await?);
    }
    if wanted("floor") {
        report.push_str(&floor::floor(options).await?);
    }
    if wanted("memory") {
        report.push_str(&idle_rss(options, lagprobe_binary).await?);
    }
    if wanted("strategies") {
        report.push_str(&strategy_table(options).await?);
    }
    if wanted("link") {
        report.push_str(&link::accuracy(options, lagprobe_binary).await?);
    }
    if wanted("link-memory") {
        report.push_str(&link::throughput(lagprobe_binary).await?);
    }
    if wanted("pgbench") {
        report.push_str(&link::pgbench(options).await?);
    }
    if wanted("rate") {
        report.push_str(&probe_rate(options).await?);
    }
    if wanted("page") {
        report.push_str(&test_page_rate(options).await?);
    }
    if wanted("proxy") {
        report.push_str(&proxy::proxy(options, lagprobe_binary).await?);
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
    status_kib(pid, "VmRSS").await
}

/// A memory field of `/proc/PID/status` (VmRSS, VmHWM, ...), in KiB.
async fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = tokio::fs::read_to_string(format!("/proc/{pid}/status"))
        .await
        .ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

/// CPU time a process has used since it started (user plus system, all its threads;
/// fields 14 and 15 of `/proc/PID/stat`), in ms.
async fn process_cpu_ms(pid: u32) -> Option<f64> {
    let stat = tokio::fs::read_to_string(format!("/proc/{pid}/stat"))
        .await
        .ok()?;
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user_ticks: f64 = fields.next()?.parse().ok()?;
    let system_ticks: f64 = fields.next()?.parse().ok()?;
    ticks_to_ms(user_ticks + system_ticks)
}

/// Clock ticks (`/proc`'s unit of CPU time) in ms.
fn ticks_to_ms(ticks: f64) -> Option<f64> {
    // SAFETY: sysconf only reads a constant of the system.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (ticks_per_second > 0).then(|| ticks * 1000.0 / ticks_per_second as f64)
}

/// CPU time the hypervisor has taken from this machine since boot (steal, summed over the
/// CPUs; `/proc/stat`), in ms: a virtual machine's stalls that no program here causes.
async fn stolen_ms() -> Option<f64> {
    let stat = tokio::fs::read_to_string("/proc/stat").await.ok()?;
    let cpu = stat.lines().find_map(|line| line.strip_prefix("cpu "))?;
    let steal_ticks: f64 = cpu.split_whitespace().nth(7)?.parse().ok()?;
    ticks_to_ms(steal_ticks)
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

/// `/test/` requests per second at D = 0 from 8 keep-alive clients, with the probe history
/// and its charts (the default, 100 probes) and without (`probe_history` 0: the page as it
/// was, apart from its empty history section). Like for like: two services built the same
/// way, outside the same lab (a third app holds it, idle but for its heartbeat), differing
/// only in `probe_history`; rounds alternate, each pass in the opposite order to the last,
/// so that drift hits both alike; three passes so that noise shows. The target: within
/// 10%. Then what the drawing itself costs: the same page with no probe behind it (a
/// refused query still draws the history), so the difference is the charts alone.
async fn test_page_rate(options: &BenchOptions) -> Result<String> {
    const CLIENTS: usize = 8;
    const PASSES: usize = 3;
    const ROUNDS: u32 = 4;
    let holder = lab_app(options, 0, LabSettings::default()).await?;
    let with_history = page_app(&holder, PROBE_HISTORY.default as usize).await?;
    let without_history = page_app(&holder, 0).await?;
    let apps = [&without_history, &with_history];
    let requests = options.rate_probes.max(CLIENTS as u32);
    // Fills the history (and warms both apps' pools) before anything is timed.
    for app in apps {
        page_round(app.http_addr, PAGE, CLIENTS, requests.max(200)).await?;
    }
    let mut passes = Vec::new();
    for pass in 0..PASSES {
        let mut elapsed = [Duration::ZERO; 2];
        for round in 0..ROUNDS {
            for slot in turn_order(round as usize + pass) {
                elapsed[slot] += page_round(apps[slot].http_addr, PAGE, CLIENTS, requests).await?;
            }
        }
        passes.push(elapsed.map(|e| f64::from(requests * ROUNDS) / e.as_secs_f64()));
    }
    let mut drawn = [Duration::ZERO; 2];
    let drawn_requests = requests * 4;
    for round in 0..ROUNDS {
        for slot in turn_order(round as usize) {
            drawn[slot] +=
                page_round(apps[slot].http_addr, NO_PROBE_PAGE, CLIENTS, drawn_requests).await?;
        }
    }
    let drawn_rates = drawn.map(|e| f64::from(drawn_requests * ROUNDS) / e.as_secs_f64());
    for app in [without_history, with_history, holder] {
        app.shutdown().await;
    }
    Ok(page_rate_table(
        CLIENTS,
        requests * ROUNDS,
        &passes,
        drawn_rates,
    ))
}

/// Which app goes first in round `turn`: each in turn, so that drift hits both alike.
fn turn_order(turn: usize) -> [usize; 2] {
    if turn.is_multiple_of(2) {
        [0, 1]
    } else {
        [1, 0]
    }
}

/// The page every probe-rate client asks for, and the same page refused before any probe
/// (an unknown strategy): still drawn, history and all, with the default strategy's charts.
const PAGE: &str = "/test/";
const NO_PROBE_PAGE: &str = "/test/?strategy=none";

/// A service outside `holder`'s lab that keeps `probe_history` probes; nothing else differs
/// between the two the page bench compares.
async fn page_app(holder: &App, probe_history: usize) -> Result<App> {
    let lab = lab_of(holder);
    let mut settings = Settings::on_free_ports(DatabaseSettings::External {
        primary_url: lab.primary_url(),
        replica_urls: lab.replica_urls().into_iter().map(|(_, url)| url).collect(),
    });
    settings.migrate = false;
    settings.heartbeat = None;
    settings.proxy.addr = None;
    settings.probe_history = probe_history;
    server::build(settings).await
}

/// The page bench's table: each pass's rates ([without, with] history), and the drawing's.
fn page_rate_table(clients: usize, requests: u32, passes: &[[f64; 2]], drawn: [f64; 2]) -> String {
    let change = |rates: [f64; 2]| 100.0 * (rates[1] / rates[0] - 1.0);
    let mut table = format!(
        "## /test/ at D = 0, {clients} clients ({requests} requests each way per pass, \
         alternating)\n\n| pass | without history (probe_history 0), requests/s | \
         with history (last {} probes, charts), requests/s | with vs without (target: within \
         10%) |\n|---|---:|---:|---:|\n",
        PROBE_HISTORY.default
    );
    for (pass, rates) in passes.iter().enumerate() {
        let _ = writeln!(
            table,
            "| {} | {:.0} | {:.0} | {:+.1}% |",
            pass + 1,
            rates[0],
            rates[1],
            change(*rates)
        );
    }
    let per_page_us = |rate: f64| 1e6 / rate;
    let _ = write!(
        table,
        "\nThe page drawn with no probe behind it (`{NO_PROBE_PAGE}`, refused before probing; \
         the history section is still drawn): {:.0} requests/s without history, {:.0} with; \
         {:.0} µs of the machine per page with the charts against {:.0} µs without, where a \
         probed page takes {:.0} µs.\n\n",
        drawn[0],
        drawn[1],
        per_page_us(drawn[1]),
        per_page_us(drawn[0]),
        per_page_us(passes.iter().map(|r| r[1]).sum::<f64>() / passes.len() as f64),
    );
    table
}

/// `requests` GETs of `path` shared by `clients` keep-alive connections; the time taken.
async fn page_round(
    addr: std::net::SocketAddr,
    path: &'static str,
    clients: usize,
    requests: u32,
) -> Result<Duration> {
    let started = Instant::now();
    let per_client = requests / clients as u32;
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(page_client(addr, path, per_client)))
        .collect();
    for task in tasks {
        task.await
            .map_err(|error| Error::io("a /test/ client")(std::io::Error::other(error)))??;
    }
    Ok(started.elapsed())
}

/// One keep-alive HTTP/1.1 client: `count` GETs of `path`, each body read to its
/// Content-Length (the benchmark has no HTTP client library, and needs none).
async fn page_client(addr: std::net::SocketAddr, path: &str, count: u32) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let connected = tokio::net::TcpStream::connect(addr).await;
    let mut stream = BufReader::new(connected.map_err(Error::io("a /test/ client"))?);
    for _ in 0..count {
        let request = format!("GET {path} HTTP/1.1\r\nHost: lagprobe\r\n\r\n");
        stream
            .get_mut()
            .write_all(request.as_bytes())
            .await
            .map_err(Error::io("a /test/ client"))?;
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            stream
                .read_line(&mut line)
                .await
                .map_err(Error::io("a /test/ client"))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        stream
            .read_exact(&mut body)
            .await
            .map_err(Error::io("a /test/ client"))?;
    }
    Ok(())
}
