//! The delay link's part of the benchmark: how exactly it holds bytes as an outside client
//! sees it, how fast it passes them, and what it costs in memory.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::Path,
    process::Stdio,
    time::{Duration, Instant},
};

use lagprobe::{DelayLink, Error, ProbeOptions, Result, service::Service};

use super::{BenchOptions, free_port, lab_app, lab_of, status_kib, stolen_ms};

/// Times the accuracy table is measured, so that a noisy pass shows as noise.
const ACCURACY_PASSES: u32 = 3;

/// One row of the accuracy table: sequential round trips on parallel connections, so that
/// 2000 samples at 50 ms take 4 s instead of 100 s. Each connection's first round trip is
/// counted apart (it includes the link setting the connection up), hence one more each.
struct PingPlan {
    delay_ms: u64,
    connections: u32,
    round_trips: u32,
}

const PING_PLANS: [PingPlan; 2] = [
    PingPlan {
        delay_ms: 50,
        connections: 25,
        round_trips: 81,
    },
    PingPlan {
        delay_ms: 1000,
        connections: 100,
        round_trips: 21,
    },
];

/// Quantiles of a sample, in ms.
struct Spread {
    samples: usize,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
}

impl Spread {
    fn of(mut samples: Vec<f64>) -> Spread {
        samples.sort_by(f64::total_cmp);
        let at = |quantile: f64| {
            let rank = (quantile * samples.len() as f64).ceil() as usize;
            samples[rank.clamp(1, samples.len()) - 1]
        };
        Spread {
            samples: samples.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            p999_ms: at(0.999),
            max_ms: at(1.0),
        }
    }
}

/// One accuracy measure: how far past the configured delay the echoes came back, and what
/// round trips straight to the echo server took over the baseline meanwhile (the floor).
struct Accuracy {
    added: Spread,
    /// Each connection's first round trip, counted apart from `added`.
    first: Spread,
    floor: Spread,
    /// The client really ran at real-time priority.
    realtime: bool,
    /// CPU time the hypervisor took during the run (all CPUs), if the system says.
    stolen_ms: Option<f64>,
}

/// `link-ping`'s output by kind (`direct`, `first`, `link`, `floor`), as ms.
fn parse_ping_output(text: &str, kind: &str) -> Vec<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(kind)?.trim().parse::<u64>().ok())
        .map(|ns| ns as f64 / 1e6)
        .collect()
}

/// Round trips through a fresh in-process link at `plan.delay_ms`, from `lagprobe
/// link-ping` in a child process, minus the delay and the direct loopback round trip
/// (the child's median).
async fn added_delay(binary: &Path, plan: &PingPlan, realtime: bool) -> Result<Accuracy> {
    let echo_port = free_port()?;
    let link = DelayLink::bind(
        "127.0.0.1:0",
        format!("127.0.0.1:{echo_port}"),
        Duration::from_millis(plan.delay_ms),
    )
    .await
    .map_err(Error::io("starting a delay link"))?;
    let stagger_us = plan.delay_ms * 1000 / u64::from(plan.connections);
    let stolen_before = stolen_ms().await;
    let output = tokio::process::Command::new(binary)
        .arg("link-ping")
        .args(["--echo-listen", &format!("127.0.0.1:{echo_port}")])
        .args(["--link", &link.local_addr().to_string()])
        .args(["--connections", &plan.connections.to_string()])
        .args(["--round-trips", &plan.round_trips.to_string()])
        .args(["--stagger-us", &stagger_us.to_string()])
        .args(realtime.then_some("--realtime"))
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(Error::io("running lagprobe link-ping"))?;
    if !output.status.success() {
        return Err(Error::io("running lagprobe link-ping")(
            std::io::Error::other(format!("link-ping exited with {}", output.status)),
        ));
    }
    let stolen_ms = stolen_ms()
        .await
        .zip(stolen_before)
        .map(|(after, before)| after - before);
    let text = String::from_utf8_lossy(&output.stdout);
    let baseline_ms = Spread::of(parse_ping_output(&text, "direct ")).p50_ms;
    let over = |kind: &str, offset_ms: f64| {
        let samples = parse_ping_output(&text, kind);
        Spread::of(samples.into_iter().map(|ms| ms - offset_ms).collect())
    };
    Ok(Accuracy {
        added: over("link ", plan.delay_ms as f64 + baseline_ms),
        first: over("first ", plan.delay_ms as f64 + baseline_ms),
        floor: over("floor ", baseline_ms),
        realtime: text.lines().any(|line| line == "realtime yes"),
        stolen_ms,
    })
}

/// Probes one after another until dropped: the lab in use while the link is measured.
async fn background_probes(service: &Service) {
    loop {
        let _ = service.engine().probe(&ProbeOptions::default()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The accuracy table: every plan, [`ACCURACY_PASSES`] times, with the client at ordinary
/// and at real-time priority, while a lab at 1000 ms serves and probes in the same process.
pub async fn accuracy(options: &BenchOptions, binary: &Path) -> Result<String> {
    let app = lab_app(options, 1000, lagprobe::settings::LabSettings::default()).await?;
    let mut table = format!(
        "## Delay link accuracy, seen from another process\n\n\
         `lagprobe link-ping` (a child process) times small echoes through an in-process link \
         while a lab at 1000 ms runs and probes in the same process (heartbeat every 100 ms, \
         a probe every 50 ms). Each connection does sequential round trips; connections start \
         spread over one delay so that their messages are not due at once (2000 round trips \
         at 50 ms in 4 s instead of 100 s). Added = round trip minus the configured delay \
         minus the direct loopback round trip (median). Target: p99 within 1 ms, p99.9 within \
         2 ms. The floor is one more connection of the same client pinging the echo server \
         directly during the run, as often as the link's connections together: what the \
         client and the machine add with no link at all. An ordinary client is what a replica \
         is; a real-time one (SCHED_FIFO, like the link's threads) leaves mostly what the \
         link adds. Each connection's first round trip, which includes the link starting the \
         connection's thread, is left out of the quantiles and shown apart (max). Stolen is \
         the CPU time the hypervisor took from this virtual machine during the row (steal in \
         `/proc/stat`, all CPUs): stalls no program here causes. {ACCURACY_PASSES} passes.\n\n\
         | configured ms | pass | client | round trips (connections) | added p50 ms | p99 ms | p99.9 ms | max ms | first round trip max ms | floor p99 ms | floor p99.9 ms | stolen ms |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let measured = async {
        for pass in 1..=ACCURACY_PASSES {
            for plan in &PING_PLANS {
                for realtime in [false, true] {
                    let accuracy = added_delay(binary, plan, realtime).await?;
                    table.push_str(&accuracy_row(plan, pass, realtime, &accuracy));
                }
            }
        }
        Ok::<_, Error>(())
    };
    let result = tokio::select! {
        result = measured => result,
        () = background_probes(app.service()) => unreachable!("probes until dropped"),
    };
    app.shutdown().await;
    result?;
    table.push('\n');
    Ok(table)
}

fn accuracy_row(plan: &PingPlan, pass: u32, asked_realtime: bool, accuracy: &Accuracy) -> String {
    let client = match (asked_realtime, accuracy.realtime) {
        (false, _) => "ordinary",
        (true, true) => "real-time",
        (true, false) => "ordinary (real-time refused)",
    };
    let Accuracy {
        added,
        first,
        floor,
        stolen_ms,
        ..
    } = accuracy;
    let stolen = stolen_ms.map_or_else(|| "unknown".to_owned(), |ms| format!("{ms:.0}"));
    format!(
        "| {} | {pass} | {client} | {} ({}) | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {stolen} |\n",
        plan.delay_ms,
        added.samples,
        plan.connections,
        added.p50_ms,
        added.p99_ms,
        added.p999_ms,
        added.max_ms,
        first.max_ms,
        floor.p99_ms,
        floor.p999_ms,
    )
}

/// How long a throughput run reads before it counts (after its first byte), and for how
/// long it counts: the steady state, not the first hold's burst.
const THROUGHPUT_WARM_UP: Duration = Duration::from_secs(1);
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(5);

/// An upstream that streams to each client until the client goes away.
async fn endless_upstream() -> Result<SocketAddr> {
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
                while socket.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    Ok(addr)
}

/// Bytes per second read at `addr` over [`THROUGHPUT_WINDOW`], once the first byte has
/// come and [`THROUGHPUT_WARM_UP`] has passed.
async fn steady_throughput(addr: SocketAddr) -> Result<f64> {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(Error::io("connecting for the throughput run"))?;
    let mut buffer = vec![0u8; 256 * 1024];
    let mut read_for = async |until: Option<Instant>| -> Result<u64> {
        let mut received = 0u64;
        loop {
            let read = stream
                .read(&mut buffer)
                .await
                .map_err(Error::io("reading the stream"))?;
            received += read as u64;
            let done = until.is_none_or(|until| Instant::now() >= until);
            if read == 0 || (done && received > 0) {
                return Ok(received);
            }
        }
    };
    read_for(None).await?;
    read_for(Some(Instant::now() + THROUGHPUT_WARM_UP)).await?;
    let started = Instant::now();
    let received = read_for(Some(started + THROUGHPUT_WINDOW)).await?;
    Ok(received as f64 / started.elapsed().as_secs_f64())
}

/// A `lagprobe delay-link` child process relaying to `upstream`, and its address.
async fn delay_link_process(
    binary: &Path,
    upstream: SocketAddr,
    delay_ms: u64,
    buffer_mb: u64,
) -> Result<(tokio::process::Child, SocketAddr)> {
    use tokio::io::AsyncBufReadExt;
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut child = tokio::process::Command::new(binary)
        .args(["delay-link", "--listen", &listen.to_string()])
        .args(["--upstream", &upstream.to_string()])
        .args(["--delay-ms", &delay_ms.to_string()])
        .args(["--link-buffer-mb", &buffer_mb.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io("starting lagprobe delay-link"))?;
    let stdout = child.stdout.take().expect("piped");
    // The banner comes once it listens.
    tokio::io::BufReader::new(stdout)
        .lines()
        .next_line()
        .await
        .map_err(Error::io("reading the delay link's banner"))?;
    Ok((child, listen))
}

/// Streams through `lagprobe delay-link` (its own process, so its memory is its own):
/// throughput and the process's peak RSS.
async fn capped_run(binary: &Path, delay_ms: u64, buffer_mb: u64) -> Result<(f64, Option<u64>)> {
    let source = endless_upstream().await?;
    let (mut child, listen) = delay_link_process(binary, source, delay_ms, buffer_mb).await?;
    let rate = steady_throughput(listen).await;
    let peak_kib = match child.id() {
        Some(pid) => status_kib(pid, "VmHWM").await,
        None => None,
    };
    let _ = child.kill().await;
    Ok((rate?, peak_kib))
}

/// Throughput and memory with the buffer cap: at D = 0 against direct loopback, and at
/// D = 1000 ms, where a buffer of B passes about B per second.
pub async fn throughput(binary: &Path) -> Result<String> {
    let gbit = |rate: f64| rate * 8.0 / 1e9;
    let mib = |bytes: f64| bytes / 1048576.0;
    let direct = steady_throughput(endless_upstream().await?).await?;
    let mut table = format!(
        "## Delay link throughput and memory, primary-to-replica direction\n\n\
         One stream for {}s after {}s of warm-up, through `lagprobe delay-link` in its own \
         process; peak RSS is that process's VmHWM. With a buffer of B per connection and \
         direction and a delay D the link passes about B / D (it stops reading when full): \
         64 MiB at 1000 ms is 64 MiB/s, about 0.5 Gbit/s. A little more shows: bytes that wait \
         in the kernel's socket buffer while the link is full count their hold from when they \
         arrived.\n\n\
         | path | delay ms | buffer MiB | Gbit/s | MiB/s | peak RSS MiB | expected |\n\
         |---|---:|---:|---:|---:|---:|---|\n\
         | direct loopback | | | {:.2} | {:.0} | | |\n",
        THROUGHPUT_WINDOW.as_secs(),
        THROUGHPUT_WARM_UP.as_secs(),
        gbit(direct),
        mib(direct),
    );
    for (delay_ms, buffer_mb) in [(0u64, 64u64), (1000, 64), (1000, 256)] {
        let (rate, peak_kib) = capped_run(binary, delay_ms, buffer_mb).await?;
        let expected = if delay_ms == 0 {
            format!("{:.0}% of direct (target >= 50%)", 100.0 * rate / direct)
        } else {
            let ceiling = (buffer_mb * 1048576) as f64 * 1000.0 / delay_ms as f64;
            format!("about {:.0} MiB/s (buffer / delay)", mib(ceiling))
        };
        let peak = peak_kib.map_or_else(
            || "?".to_owned(),
            |kib| format!("{:.0}", kib as f64 / 1024.0),
        );
        let _ = writeln!(
            table,
            "| `lagprobe delay-link` | {delay_ms} | {buffer_mb} | {:.2} | {:.0} | {peak} | {expected} |",
            gbit(rate),
            mib(rate),
        );
    }
    table.push('\n');
    Ok(table)
}

/// One pgbench phase's effect on the lab's link.
struct WalPhase {
    seconds: f64,
    wal_bytes: u64,
    peak_held_bytes: u64,
    full_count: u64,
    /// From pgbench's end until the replica had replayed everything it wrote.
    caught_up_after: Duration,
    tps: Option<f64>,
}

/// Runs pgbench with `args` against the lab's primary, watching the link's buffer.
async fn pgbench_phase(app: &lagprobe::server::App, args: &[&str]) -> Result<WalPhase> {
    let lab = lab_of(app);
    let databases = app.service().engine().databases();
    let control = lab.delay_control();
    let (start_lsn, _) = databases.primary_now().await?;
    let full_before = control.buffer_stats().full_count;
    let started = Instant::now();
    let run = tokio::process::Command::new(lab.binaries().bindir.join("pgbench"))
        .args(args)
        .arg(lab.primary_url())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let mut peak_held_bytes = 0;
    let sample = async {
        loop {
            peak_held_bytes = peak_held_bytes.max(control.buffer_stats().held_bytes);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let output = tokio::select! {
        output = run => output.map_err(Error::io("running pgbench"))?,
        () = sample => unreachable!("samples until dropped"),
    };
    if !output.status.success() {
        return Err(Error::io("running pgbench")(std::io::Error::other(
            format!("pgbench {args:?} exited with {}", output.status),
        )));
    }
    let seconds = started.elapsed().as_secs_f64();
    let (end_lsn, _) = databases.primary_now().await?;
    let ended = Instant::now();
    let replica = &databases.replicas()[0];
    while databases
        .replay_lsn(replica)
        .await?
        .is_none_or(|lsn| lsn < end_lsn)
    {
        peak_held_bytes = peak_held_bytes.max(control.buffer_stats().held_bytes);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    Ok(WalPhase {
        seconds,
        wal_bytes: end_lsn.bytes_after(start_lsn),
        peak_held_bytes,
        full_count: control.buffer_stats().full_count - full_before,
        caught_up_after: ended.elapsed(),
        tps: stdout
            .lines()
            .find_map(|line| line.strip_prefix("tps = "))
            .and_then(|rest| rest.split_whitespace().next()?.parse().ok()),
    })
}

/// pgbench writing through a lab at 1000 ms with the default link buffer: does the WAL
/// stream fill the buffer, and what happens when it does.
pub async fn pgbench(options: &BenchOptions) -> Result<String> {
    let app = lab_app(options, 1000, lagprobe::settings::LabSettings::default()).await?;
    let buffer_mib = lab_of(&app).delay_control().buffer_bytes() as f64 / 1048576.0;
    let phases: [(&str, &[&str]); 3] = [
        ("`pgbench -i -s 10` (bulk load)", &["-i", "-s", "10", "-q"]),
        (
            "`pgbench -c 8 -j 2 -T 15` (TPC-B-like)",
            &["-c", "8", "-j", "2", "-T", "15"],
        ),
        (
            "`pgbench -i -s 50` (bigger bulk load)",
            &["-i", "-s", "50", "-q"],
        ),
    ];
    let mut table = format!(
        "## pgbench through the lab at 1000 ms, link buffer {buffer_mib:.0} MiB\n\n\
         WAL written on the primary, the most the lab's link held at once (sampled every \
         5 ms), how often its buffer filled (the link then stops reading the primary's WAL \
         sender, which waits; commits on the primary do not), and how long after pgbench \
         ended the replica had replayed everything (about 1000 ms when the delay is all).\n\n\
         | workload | s | WAL MiB | WAL MiB/s | peak held MiB | buffer full | replica caught up ms | tps |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let mut result = Ok(());
    for (label, args) in phases {
        match pgbench_phase(&app, args).await {
            Ok(phase) => {
                let mib = |bytes: u64| bytes as f64 / 1048576.0;
                let _ = writeln!(
                    table,
                    "| {label} | {:.1} | {:.0} | {:.1} | {:.1} | {} | {} | {} |",
                    phase.seconds,
                    mib(phase.wal_bytes),
                    mib(phase.wal_bytes) / phase.seconds,
                    mib(phase.peak_held_bytes),
                    phase.full_count,
                    phase.caught_up_after.as_millis(),
                    phase
                        .tps
                        .map_or_else(String::new, |tps| format!("{tps:.0}")),
                );
            }
            Err(error) => {
                result = Err(error);
                break;
            }
        }
    }
    app.shutdown().await;
    result.map(|()| table + "\n")
}
