//! `lagprobe bench --sections proxy`: the proxy against the replica direct and against
//! PgBouncer (session mode) in front of the same replica, with pgbench's read-only workload
//! in every query mode; the memory of both with 100 idle clients; and write-then-read on
//! one connection through the proxy with each strategy.
//!
//! The proxy runs as its own `lagprobe proxy` process, like PgBouncer, so that its RSS is
//! its own and both compete for the same cores the same way.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use lagprobe::{Error, Result, bench_sql, server::App, settings::LabSettings};
use sqlx::{Connection, postgres::PgConnection};
use tokio::process::{Child, Command};

use super::{BenchOptions, free_port, lab_app, lab_of, process_cpu_ms, resident_kib};

/// pgbench's query modes, in the order.
const MODES: [&str; 3] = ["simple", "extended", "prepared"];
/// Clients held open for the memory measurement.
const IDLE_CLIENTS: usize = 100;
/// Every strategy the proxy offers, in the README's order.
const STRATEGIES: [&str; 7] = [
    "replica",
    "primary",
    "pin-window",
    "lsn-wait",
    "lsn-route",
    "remote-apply",
    "global",
];

/// What one pgbench run reported.
#[derive(Debug, Clone, Copy)]
struct PgbenchRun {
    tps: f64,
    latency_avg_ms: f64,
    /// From the per-transaction log.
    latency_p50_us: Option<f64>,
    failed: u64,
    /// CPU time (user plus system) the relay in the path (the proxy, PgBouncer) used per
    /// transaction: what the hop costs, whatever the machine's noise does to tps.
    relay_cpu_us_per_tx: Option<f64>,
}

/// A server process the bench started, killed when dropped.
struct Process {
    child: Child,
    port: u16,
}

impl Process {
    fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }
}

/// Runs the whole section on one lab (a synchronous replica, so remote-apply takes effect).
pub async fn proxy(options: &BenchOptions, binary: &Path) -> Result<String> {
    let sync_replica = LabSettings {
        sync_replica: true,
        ..LabSettings::default()
    };
    let app = lab_app(options, 0, sync_replica).await?;
    let result = proxy_on(options, binary, &app).await;
    app.shutdown().await;
    result
}

async fn proxy_on(options: &BenchOptions, binary: &Path, app: &App) -> Result<String> {
    let lab = lab_of(app);
    let bindir = lab.binaries().bindir.clone();
    let pgbench_dir = tempfile::tempdir().map_err(Error::io("a pgbench log directory"))?;
    let init = pgbench(&bindir, &lab.primary_url(), &["-i", "-s", "1", "-q"]).await;
    init.map_err(Error::io("pgbench -i"))?;
    let mut primary = connect(&lab.primary_url()).await?;
    sqlx::raw_sql(bench_sql::CREATE_ROW)
        .execute(&mut primary)
        .await
        .map_err(sql_failed)?;
    replayed(app).await?;

    let proxy = start_proxy(binary, &lab.primary_url(), &lab.replica_url()).await?;
    let bouncer_dir = tempfile::tempdir().map_err(Error::io("a pgbouncer directory"))?;
    let bouncer = start_pgbouncer(bouncer_dir.path(), &lab.replica_url()).await?;
    let urls = [
        Way {
            label: "direct to the replica",
            url: lab.replica_url(),
            relay_pid: None,
        },
        Way {
            label: "lagprobe proxy (replica)",
            url: with_port(&lab.replica_url(), proxy.port)?,
            relay_pid: Some(proxy.pid()),
        },
        Way {
            label: "PgBouncer (session mode)",
            url: with_port(&lab.replica_url(), bouncer.port)?,
            relay_pid: Some(bouncer.pid()),
        },
    ];

    let log_dir = pgbench_dir.path();
    let loaded = Load {
        clients: options.proxy_clients,
        seconds: options.proxy_seconds,
    };
    let mut report = throughput_table(options, &bindir, log_dir, &urls, loaded).await?;
    report.push_str(&throughput_table(options, &bindir, log_dir, &urls, ONE_CLIENT).await?);
    report.push_str(&memory_table(&proxy, &bouncer, &urls[1].url, &urls[2].url).await?);
    report.push_str(&write_then_read_table(options, app, &urls[1].url).await?);
    Ok(report)
}

/// One way to the replica: its label, URL, and the relay process in between, if any.
struct Way {
    label: &'static str,
    url: String,
    relay_pid: Option<u32>,
}

/// `pgbench -S` in every mode, the three ways interleaved per mode and repeated in rounds
/// (each round in another order), so that drift and the machine's noise hit all alike and
/// show as a spread; rows give medians with min-max.
async fn throughput_table(
    options: &BenchOptions,
    bindir: &Path,
    log_dir: &Path,
    urls: &[Way; 3],
    load: Load,
) -> Result<String> {
    let Load { clients, seconds } = load;
    let rounds = options.proxy_rounds.max(1);
    // With several clients on few cores the added latency is mostly queueing (a client
    // waits clients / tps); one client shows what the extra hop itself costs.
    let why = if clients == 1 {
        "One client, so that no transaction queues behind another: the added p50 is what \
         the extra hop itself costs. "
    } else {
        ""
    };
    let mut table = format!(
        "## Proxy throughput: `pgbench -S -c{clients} -T{seconds}` on a lab replica at D = 0\n\n\
         {why}{rounds} rounds per mode, the three ways in a rotating order; tps is the median \
         with min-max, the ratios are of medians, and \"rounds ahead\" counts the rounds in \
         which the proxy's tps was at least PgBouncer's. p50 is the median of pgbench's \
         per-transaction log (`--log`), so it is the latency a client sees; the rounds' \
         median. Relay CPU is the user plus system time the proxy's or PgBouncer's process \
         used per transaction (`/proc/PID/stat`), the rounds' median: the hop's own cost, \
         which the machine's noise moves far less than tps. Targets: the proxy's tps at \
         least PgBouncer's in every mode, and under 50 us of p50 added over direct.\n\n\
         | mode | via | tps (min-max) | vs direct | vs PgBouncer | rounds ahead | latency avg ms | p50 us | p50 added us | relay CPU us/tx | failed |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    for mode in MODES {
        let mut runs: [Vec<PgbenchRun>; 3] = Default::default();
        for round in 0..rounds as usize {
            for way in 0..urls.len() {
                let way = (way + round) % urls.len();
                let run = pgbench_select(bindir, log_dir, &urls[way], mode, load).await?;
                runs[way].push(run);
            }
        }
        let ahead = runs[1]
            .iter()
            .zip(&runs[2])
            .filter(|(proxy, bouncer)| proxy.tps >= bouncer.tps)
            .count();
        let summaries = runs.each_ref().map(|runs| RunSummary::of(runs));
        for (way, (Way { label, .. }, summary)) in urls.iter().zip(&summaries).enumerate() {
            let ahead = if way == 1 {
                format!("{ahead}/{rounds}")
            } else {
                String::new()
            };
            table.push_str(&summary.row(mode, label, &summaries[0], &summaries[2], &ahead));
        }
    }
    table.push('\n');
    Ok(table)
}

/// pgbench's clients and seconds for one throughput table.
#[derive(Debug, Clone, Copy)]
struct Load {
    clients: u32,
    seconds: u32,
}

/// The latency table's load: one client, long enough for a stable median.
const ONE_CLIENT: Load = Load {
    clients: 1,
    seconds: 5,
};

/// The rounds of one mode and way, summarised.
struct RunSummary {
    tps: [f64; 3],
    latency_avg_ms: f64,
    latency_p50_us: Option<f64>,
    failed: u64,
    relay_cpu_us_per_tx: Option<f64>,
}

impl RunSummary {
    fn of(runs: &[PgbenchRun]) -> Self {
        let middle = |mut values: Vec<f64>| {
            values.sort_by(f64::total_cmp);
            values.get(values.len() / 2).copied()
        };
        let tps = middle(runs.iter().map(|run| run.tps).collect()).unwrap_or(0.0);
        let min = runs.iter().map(|run| run.tps).fold(f64::INFINITY, f64::min);
        let max = runs.iter().map(|run| run.tps).fold(0.0, f64::max);
        RunSummary {
            tps: [min, tps, max],
            latency_avg_ms: middle(runs.iter().map(|run| run.latency_avg_ms).collect())
                .unwrap_or(0.0),
            latency_p50_us: middle(runs.iter().filter_map(|run| run.latency_p50_us).collect()),
            failed: runs.iter().map(|run| run.failed).sum(),
            relay_cpu_us_per_tx: middle(
                runs.iter()
                    .filter_map(|run| run.relay_cpu_us_per_tx)
                    .collect(),
            ),
        }
    }

    fn row(&self, mode: &str, label: &str, direct: &Self, bouncer: &Self, ahead: &str) -> String {
        let added = match (self.latency_p50_us, direct.latency_p50_us) {
            (Some(run), Some(direct)) => format!("{:+.0}", run - direct),
            _ => String::new(),
        };
        let [min, tps, max] = self.tps;
        format!(
            "| {mode} | {label} | {tps:.0} ({min:.0}-{max:.0}) | {:.2} | {:.2} | {ahead} | {:.3} | {} | {added} | {} | {} |\n",
            tps / direct.tps[1],
            tps / bouncer.tps[1],
            self.latency_avg_ms,
            self.latency_p50_us
                .map_or_else(String::new, |p50| format!("{p50:.0}")),
            self.relay_cpu_us_per_tx
                .map_or_else(String::new, |cpu| format!("{cpu:.1}")),
            self.failed,
        )
    }
}

/// Resident memory of the proxy and of PgBouncer, idle, then with 100 clients connected
/// that each ran one query (so that every client holds its backend connections) and sit
/// idle.
async fn memory_table(
    proxy: &Process,
    bouncer: &Process,
    proxy_url: &str,
    bouncer_url: &str,
) -> Result<String> {
    let mut table = format!(
        "## Proxy memory with {IDLE_CLIENTS} idle clients\n\n\
         After the throughput runs; each client connected, ran `SELECT 1` once and sat \
         idle. Target: the proxy under 30 MB.\n\n\
         | process | RSS MiB, no clients | RSS MiB, {IDLE_CLIENTS} idle clients |\n\
         |---|---:|---:|\n"
    );
    for (label, process, url) in [
        ("`lagprobe proxy`", proxy, proxy_url),
        ("PgBouncer", bouncer, bouncer_url),
    ] {
        let before = resident_kib(process.pid()).await;
        let mut clients = Vec::with_capacity(IDLE_CLIENTS);
        for _ in 0..IDLE_CLIENTS {
            let mut client = connect(url).await?;
            sqlx::raw_sql(bench_sql::TOUCH)
                .execute(&mut client)
                .await
                .map_err(sql_failed)?;
            clients.push(client);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let with_clients = resident_kib(process.pid()).await;
        for client in clients {
            let _ = client.close().await;
        }
        let mib = |kib: Option<u64>| {
            kib.map_or_else(
                || "unknown".to_owned(),
                |kib| format!("{:.1}", kib as f64 / 1024.0),
            )
        };
        let _ = writeln!(
            table,
            "| {label} | {} | {} |",
            mib(before),
            mib(with_clients)
        );
    }
    table.push('\n');
    Ok(table)
}

/// One connection per strategy: UPDATE the row, SELECT it back; was the read fresh, and
/// how long did each take, at D = 0 and 200 ms.
async fn write_then_read_table(
    options: &BenchOptions,
    app: &App,
    proxy_url: &str,
) -> Result<String> {
    let rounds = options.strategy_probes.max(1);
    let mut table = format!(
        "## Write-then-read through the proxy ({rounds} rounds per row, one connection)\n\n\
         Each round UPDATEs one row to a new value and SELECTs it back on the same \
         connection (sqlx, named prepared statements); fresh: the read saw the new value.\n\n\
         | D ms | strategy | fresh | write p50 ms | read p50 ms | read max ms |\n\
         |---:|---|---:|---:|---:|---:|\n"
    );
    let control = lab_of(app).delay_control();
    let mut value = 0i64;
    for delay_ms in [0u64, 200] {
        control.set_delay(Duration::from_millis(delay_ms));
        for strategy in STRATEGIES {
            let mut client = connect(proxy_url).await?;
            // The names are this file's own constants.
            sqlx::raw_sql(sqlx::AssertSqlSafe(bench_sql::set_strategy(strategy)))
                .execute(&mut client)
                .await
                .map_err(sql_failed)?;
            let (mut writes, mut reads, mut fresh) = (Vec::new(), Vec::new(), 0);
            for _ in 0..rounds {
                value += 1;
                let started = Instant::now();
                sqlx::query(bench_sql::WRITE_ROW)
                    .bind(value)
                    .execute(&mut client)
                    .await
                    .map_err(sql_failed)?;
                let written = Instant::now();
                let seen: i64 = sqlx::query_scalar(bench_sql::READ_ROW)
                    .fetch_one(&mut client)
                    .await
                    .map_err(sql_failed)?;
                writes.push(written - started);
                reads.push(written.elapsed());
                fresh += u32::from(seen == value);
            }
            let _ = client.close().await;
            let (_, write_p50, _) = super::spread_ms(&mut writes);
            let (_, read_p50, read_max) = super::spread_ms(&mut reads);
            let _ = writeln!(
                table,
                "| {delay_ms} | {strategy} | {fresh}/{rounds} | {write_p50:.2} | {read_p50:.2} | {read_max:.1} |"
            );
        }
    }
    control.set_delay(Duration::ZERO);
    table.push('\n');
    Ok(table)
}

/// Waits until the replica has replayed everything the primary has written so far.
async fn replayed(app: &App) -> Result<()> {
    let databases = app.service().engine().databases();
    let (target, _) = databases.primary_now().await?;
    let replica = &databases.replicas()[0];
    let deadline = Instant::now() + Duration::from_secs(60);
    while databases
        .replay_lsn(replica)
        .await?
        .is_none_or(|lsn| lsn < target)
    {
        if Instant::now() > deadline {
            return Err(Error::FailedPrecondition(
                "the replica did not replay pgbench's tables in 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn connect(url: &str) -> Result<PgConnection> {
    PgConnection::connect(url).await.map_err(sql_failed)
}

fn sql_failed(error: sqlx::Error) -> Error {
    Error::io("a bench connection")(std::io::Error::other(error))
}

/// `url` with another port (the same host, user and database).
fn with_port(url: &str, port: u16) -> Result<String> {
    let mut parsed =
        url::Url::parse(url).map_err(|error| Error::invalid("url", error.to_string()))?;
    let _ = parsed.set_port(Some(port));
    Ok(parsed.into())
}

/// Runs pgbench to completion; its stdout, or why it failed.
async fn pgbench(bindir: &Path, url: &str, args: &[&str]) -> std::io::Result<String> {
    let output = Command::new(bindir.join("pgbench"))
        .args(args)
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "pgbench {args:?} exited with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `pgbench -S -M mode` (no vacuum: a replica cannot), with a per-transaction log in
/// `log_dir` for the median, removed afterwards.
async fn pgbench_select(
    bindir: &Path,
    log_dir: &Path,
    way: &Way,
    mode: &str,
    load: Load,
) -> Result<PgbenchRun> {
    let Load { clients, seconds } = load;
    let prefix = log_dir.join("tx");
    let (clients, seconds) = (clients.to_string(), seconds.to_string());
    let log_prefix = format!("--log-prefix={}", prefix.display());
    let args = [
        "-n",
        "-S",
        "-M",
        mode,
        "-c",
        &clients,
        "-T",
        &seconds,
        "--log",
        &log_prefix,
    ];
    let relay_cpu_ms = async || process_cpu_ms(way.relay_pid?).await;
    let cpu_before = relay_cpu_ms().await;
    let text = pgbench(bindir, &way.url, &args)
        .await
        .map_err(Error::io(format!("pgbench -S -M {mode}")))?;
    let cpu_after = relay_cpu_ms().await;
    let value = |prefix: &str| -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(prefix))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
    };
    let latencies = transaction_latencies_us(log_dir).await;
    let transactions = value("number of transactions actually processed: ")
        .filter(|&transactions| transactions > 0.0);
    let relay_cpu_us_per_tx = match (cpu_before, cpu_after, transactions) {
        (Some(before), Some(after), Some(transactions)) => {
            Some((after - before) * 1000.0 / transactions)
        }
        _ => None,
    };
    Ok(PgbenchRun {
        tps: value("tps = ").unwrap_or(0.0),
        latency_avg_ms: value("latency average = ").unwrap_or(0.0),
        latency_p50_us: median(latencies),
        failed: value("number of failed transactions: ").unwrap_or(0.0) as u64,
        relay_cpu_us_per_tx,
    })
}

/// Every transaction's latency (the third field of pgbench's log lines), from every log
/// file in `dir`, which are then removed.
async fn transaction_latencies_us(dir: &Path) -> Vec<u64> {
    let mut latencies = Vec::new();
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else {
        return latencies;
    };
    while let Ok(Some(entry)) = entries.next_entry().await {
        if let Ok(text) = tokio::fs::read_to_string(entry.path()).await {
            latencies.extend(
                text.lines()
                    .filter_map(|line| line.split_whitespace().nth(2)?.parse::<u64>().ok()),
            );
        }
        let _ = tokio::fs::remove_file(entry.path()).await;
    }
    latencies
}

fn median(mut samples: Vec<u64>) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let middle = samples.len() / 2;
    let (_, value, _) = samples.select_nth_unstable(middle);
    Some(*value as f64)
}

/// Waits until something accepts connections on the loopback `port`.
async fn until_listening(port: u16, what: &str, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            return Err(Error::FailedPrecondition(format!(
                "{what} did not start listening on port {port} ({exited:?})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `lagprobe proxy` in front of the lab, replica strategy, as its own process.
async fn start_proxy(binary: &Path, primary_url: &str, replica_url: &str) -> Result<Process> {
    let port = free_port()?;
    let mut child = Command::new(binary)
        .args(["proxy", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--primary-url", primary_url, "--replica-url", replica_url])
        .args(["--strategy", "replica"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io("starting lagprobe proxy"))?;
    until_listening(port, "lagprobe proxy", &mut child).await?;
    Ok(Process { child, port })
}

/// The pgbouncer binary: on PATH, or where Debian puts it.
fn pgbouncer_binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("pgbouncer"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            Error::FailedPrecondition(
                "the proxy bench compares with PgBouncer, and no pgbouncer binary was found \
                 on PATH or in /usr/sbin: install it (Debian/Ubuntu: apt-get install -y \
                 pgbouncer)"
                    .into(),
            )
        })
}

/// PgBouncer in session mode in front of the replica, with a generated configuration in
/// `dir`. It refuses to run as root, so as root it switches to `postgres` (`-u`).
async fn start_pgbouncer(dir: &Path, replica_url: &str) -> Result<Process> {
    use std::os::unix::fs::PermissionsExt as _;
    let binary = pgbouncer_binary()?;
    let replica = url::Url::parse(replica_url)
        .map_err(|error| Error::invalid("replica_url", error.to_string()))?;
    let database = replica.path().trim_start_matches('/').to_owned();
    let user = replica.username().to_owned();
    let port = free_port()?;
    let config = format!(
        "[databases]\n\
         {database} = host=127.0.0.1 port={} dbname={database} user={user}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
         auth_type = trust\nauth_file = {}\npool_mode = session\n\
         max_client_conn = {}\ndefault_pool_size = {}\n\
         ignore_startup_parameters = extra_float_digits,search_path,options\n\
         logfile =\npidfile =\n",
        replica.port().unwrap_or(5432),
        dir.join("users.txt").display(),
        IDLE_CLIENTS * 2,
        IDLE_CLIENTS * 2,
    );
    let config_path = dir.join("pgbouncer.ini");
    let write = |path: &Path, text: String| {
        std::fs::write(path, text)
            .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)))
            .map_err(Error::io(format!("writing {}", path.display())))
    };
    write(&config_path, config)?;
    write(&dir.join("users.txt"), format!("\"{user}\" \"\"\n"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io("opening the pgbouncer directory"))?;
    let mut command = Command::new(&binary);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        command.args(["-u", "postgres"]);
    }
    let mut child = command
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io(format!("starting {}", binary.display())))?;
    until_listening(port, "pgbouncer", &mut child).await?;
    Ok(Process { child, port })
}
