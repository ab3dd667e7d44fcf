//! The `lagprobe` command line: clap commands dispatched to the library, the lab banner,
//! and the binary-only parts (the benchmark, the container health check, logging).

mod args;
mod bench;
mod healthcheck;
mod link_ping;
mod telemetry;

use std::time::Duration;

use anyhow::Context;
use args::{
    DatabaseArgs, DelayLinkArgs, LabArgs, LogFormat, PoolArgs, ProxyCommandArgs, RunArgs, RunKind,
    ServiceArgs, StrategyArgs,
};
use clap::{Parser, Subcommand};
use lagprobe::{
    DelayControl, DelayLink, markdown_table,
    server::{self, App},
    service::Service,
    settings::DatabaseSettings,
};

/// Make read-after-write anomalies between a PostgreSQL primary and its replica visible.
#[derive(Debug, Parser)]
#[command(name = "lagprobe", version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LAGPROBE_LOG_FORMAT",
        value_enum,
        default_value_t
    )]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a primary and a streaming replica with a delay link between them, then serve.
    Lab {
        #[command(flatten)]
        lab: LabArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Serve against a primary and a replica that someone else runs.
    Serve {
        #[command(flatten)]
        databases: DatabaseArgs,
        #[command(flatten)]
        service: ServiceArgs,
    },
    /// Apply lagprobe's migrations (schema `lagprobe`) to the primary and exit.
    Migrate {
        /// The primary (postgres:// URL).
        #[arg(long, env = "LAGPROBE_PRIMARY_URL", hide_env_values = true)]
        primary_url: String,
        #[command(flatten)]
        pool: PoolArgs,
    },
    /// Run probes against a primary and a replica and print the report.
    Run {
        #[command(flatten)]
        databases: DatabaseArgs,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        pool: PoolArgs,
        #[command(flatten)]
        strategy: StrategyArgs,
    },
    /// A PostgreSQL-protocol proxy: reads to a replica, everything else to the primary, with
    /// a read-your-writes strategy.
    Proxy {
        #[command(flatten)]
        proxy: ProxyCommandArgs,
    },
    /// Relay TCP connections to an upstream, holding upstream-to-client bytes for a delay.
    DelayLink {
        #[command(flatten)]
        link: DelayLinkArgs,
    },
    /// Measure lab start-up, memory, strategies, the delay link and probe rate; prints markdown.
    Bench {
        /// Lab start-ups to time.
        #[arg(long, default_value_t = 5)]
        lab_starts: u32,
        /// Probes per strategy and delay in the strategy table.
        #[arg(long, default_value_t = 30)]
        strategy_probes: u32,
        /// Probes per row of the probe-rate table.
        #[arg(long, default_value_t = 400)]
        rate_probes: u32,
        /// pgbench clients (-c) in the proxy table.
        #[arg(long, default_value_t = 8)]
        proxy_clients: u32,
        /// pgbench seconds (-T) per run in the proxy table.
        #[arg(long, default_value_t = 10)]
        proxy_seconds: u32,
        /// Rounds per mode in the proxy table (medians and min-max over them).
        #[arg(long, default_value_t = 3)]
        proxy_rounds: u32,
        /// Only these tables (comma-separated): startup, floor, memory, strategies, link,
        /// link-memory, pgbench, rate, page, proxy (it needs pgbouncer installed).
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
        #[arg(long, env = "LAGPROBE_PG_BINDIR")]
        pg_bindir: Option<std::path::PathBuf>,
    },
    /// The benchmark's outside client for the delay link (an echo server and pingers).
    #[command(hide = true)]
    LinkPing {
        #[command(flatten)]
        ping: link_ping::LinkPingArgs,
    },
    /// GET a URL and exit 0 on a 2xx answer (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8000/readyz")]
        url: String,
    },
}

/// Parses the command line, and runs the command on a runtime for it: `lagprobe proxy` on
/// its `--threads` workers, everything else on one worker per core.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(
        cli.command,
        Command::Lab { .. }
            | Command::Serve { .. }
            | Command::Proxy { .. }
            | Command::DelayLink { .. }
    ) {
        // The other commands keep the default: Ctrl-C ends them at once.
        release_stop_signals();
    }
    let mut runtime = match &cli.command {
        // One thread: the proxy's sessions on the main thread itself, with no scheduler
        // hand-offs between worker and driver.
        Command::Proxy { proxy } if proxy.threads == 1 => {
            tokio::runtime::Builder::new_current_thread()
        }
        Command::Proxy { proxy } => {
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            // In range by the flag's parser.
            runtime.worker_threads(proxy.threads as usize);
            runtime
        }
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Lab { lab, service } => {
            let databases = DatabaseSettings::Lab(lab.settings());
            run_lab(&lab, service.settings(databases)).await
        }
        Command::Serve { databases, service } => {
            serve(&databases, service.settings(databases.settings())).await
        }
        Command::Migrate { primary_url, pool } => {
            lagprobe::migrate(&primary_url, &pool.settings()).await?;
            println!(
                "migrations applied to {}",
                lagprobe::redact_url(&primary_url)
            );
            Ok(())
        }
        Command::Run {
            databases,
            run,
            pool,
            strategy,
        } => run_probes(&databases, &run, &pool, &strategy).await,
        Command::Proxy { proxy } => run_proxy(&proxy).await,
        Command::DelayLink { link } => delay_link(&link).await,
        Command::Bench {
            lab_starts,
            strategy_probes,
            rate_probes,
            proxy_clients,
            proxy_seconds,
            proxy_rounds,
            sections,
            pg_bindir,
        } => {
            let options = bench::BenchOptions {
                lab_starts,
                strategy_probes,
                rate_probes,
                proxy_clients,
                proxy_seconds,
                proxy_rounds,
                sections,
                pg_bindir,
            };
            let binary = std::env::current_exe().context("locating the lagprobe binary")?;
            print!("{}", bench::run(&options, &binary).await?);
            Ok(())
        }
        Command::LinkPing { ping } => link_ping::run(&ping),
        Command::Healthcheck { url } => {
            let status = healthcheck::http_get_status(&url, Duration::from_secs(5)).await?;
            anyhow::ensure!((200..300).contains(&status), "GET {url} answered {status}");
            Ok(())
        }
    }
}

/// SIGINT and SIGTERM, the signals [`stop_requested`] handles.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset only writes into it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in this thread and every thread started from it (call it
/// first in `main`): one arriving meanwhile stays pending. Programs the lab starts do not
/// inherit the mask: the standard library clears it in every child it spawns.
pub fn hold_stop_signals() {
    let set = stop_signals();
    // SAFETY: the set is initialised; a null old-set pointer is allowed.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Unblocks them in this thread, the main one (the runtime's threads keep them blocked, so
/// a pending or later signal is delivered here): to the handlers if installed, else with
/// the default effect of ending the process.
fn release_stop_signals() {
    let set = stop_signals();
    // SAFETY: as in hold_stop_signals.
    unsafe {
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

/// A future that resolves on Ctrl-C or SIGTERM. The handlers are installed here, before
/// anything is started, and only then are the signals let through (a signal that came
/// earlier was held, see [`hold_stop_signals`]), so that a signal at any moment of a lab's
/// start-up is caught. The start-up then runs to its end (at most a cold start, a few
/// seconds: cutting it short would abandon initdb or a half-started server in a directory
/// being removed) and everything is stopped in order, as after the banner.
/// Must be called on the main thread (directly in [`main`]'s future, which runs there).
fn stop_requested() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    release_stop_signals();
    Ok(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    })
}

async fn run_lab(lab_args: &LabArgs, settings: lagprobe::settings::Settings) -> anyhow::Result<()> {
    let stop = stop_requested()?;
    let mut app = server::build(settings).await.context("starting the lab")?;
    print_lab_banner(&app, lab_args);
    let outcome = tokio::select! {
        () = stop => Ok(()),
        error = app.failed() => Err(anyhow::Error::new(error)),
    };
    tracing::info!("stopping");
    app.shutdown().await;
    outcome
}

fn print_lab_banner(app: &App, lab_args: &LabArgs) {
    let Some(lab) = app.lab() else { return };
    let proxy = app
        .proxy_psql_url()
        .map(|url| {
            format!("\n  proxy      psql \"{url}\" (reads to the replica, writes to the primary)")
        })
        .unwrap_or_default();
    let replicas: String = lab
        .replica_urls()
        .iter()
        .map(|(name, url)| format!("\n  {name:<10} psql \"{url}\""))
        .collect();
    println!(
        "lagprobe lab is up in {:.1} s: PostgreSQL {} primary and {} streaming replica(s){}, \
         {} ms delay from primary to replica\n\
         \n  test page  http://{}/test/\
         \n  faults     http://{}/api/lab (stop, start, kill, fail over: see the README)\
         \n  gRPC       {} (try: grpcurl -plaintext {} list)\
         \n  primary    psql \"{}\"{replicas}{proxy}\
         \n  data       {}{}\n\nCtrl-C stops everything.",
        lab.startup.as_secs_f64(),
        lab.binaries().version,
        lab_args.replicas,
        if lab_args.sync_replica {
            " (synchronous)"
        } else {
            ""
        },
        lab_args.delay_ms,
        app.http_addr,
        app.http_addr,
        app.grpc_addr,
        app.grpc_addr,
        lab.primary_url(),
        lab.data_dir().display(),
        if lab_args.data_dir.is_some() {
            ""
        } else {
            " (temporary, removed on exit)"
        },
    );
}

async fn serve(
    databases: &DatabaseArgs,
    settings: lagprobe::settings::Settings,
) -> anyhow::Result<()> {
    tracing::info!(
        primary = %lagprobe::redact_url(&databases.primary_url),
        replicas = ?databases.replica_url.iter().map(|url| lagprobe::redact_url(url)).collect::<Vec<_>>(),
        "serving against external databases"
    );
    let stop = stop_requested()?;
    let mut app = server::build(settings)
        .await
        .context("starting the service")?;
    println!(
        "lagprobe serving: http://{}/test/ and gRPC {}",
        app.http_addr, app.grpc_addr
    );
    if let Some(url) = app.proxy_psql_url() {
        println!("proxy: psql \"{url}\"");
    }
    let outcome = tokio::select! {
        () = stop => Ok(()),
        error = app.failed() => Err(anyhow::Error::new(error)),
    };
    app.shutdown().await;
    outcome
}

async fn run_probes(
    databases: &DatabaseArgs,
    run: &RunArgs,
    pool: &PoolArgs,
    strategy: &StrategyArgs,
) -> anyhow::Result<()> {
    let service = Service::connect(
        &databases.primary_url,
        &databases.replica_url,
        &pool.settings(),
        strategy.defaults(),
    )?;
    match run.request()? {
        RunKind::Compare(request) => {
            let report = service.compare(&request).await?;
            if run.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let rows: Vec<_> = report
                    .strategies
                    .iter()
                    .map(|row| (row.strategy.to_string(), &row.summary))
                    .collect();
                print!("{}", markdown_table(&rows));
            }
        }
        RunKind::Run(request) => {
            let report = service.run(&request).await?;
            if run.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                let row = (report.strategy.to_string(), &report.summary);
                print!("{}", markdown_table(&[row]));
            }
        }
    }
    Ok(())
}

async fn run_proxy(args: &ProxyCommandArgs) -> anyhow::Result<()> {
    tracing::info!(
        primary = %lagprobe::redact_url(&args.primary_url),
        replicas = ?args.replica_url.iter().map(|url| lagprobe::redact_url(url)).collect::<Vec<_>>(),
        "proxy in front of external databases"
    );
    let stop = stop_requested()?;
    let proxy = server::build_proxy(
        &args.primary_url,
        &args.replica_url,
        &args.pool.settings(),
        args.defaults(),
        &args.settings(),
    )
    .await
    .context("starting the proxy")?;
    println!(
        "lagprobe proxy on {} (strategy {}): psql \"{}\"",
        proxy.addr,
        args.strategy,
        proxy.psql_url()
    );
    stop.await;
    proxy.shutdown().await;
    Ok(())
}

async fn delay_link(args: &DelayLinkArgs) -> anyhow::Result<()> {
    let stop = stop_requested()?;
    let control = DelayControl::with_buffer(
        Duration::from_millis(args.delay_ms),
        args.link_buffer.buffer_bytes(),
    );
    let link = DelayLink::bind_with(args.listen.as_str(), args.upstream.clone(), control)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "delay link {} -> {}: holding upstream-to-client bytes {} ms, at most {} MiB per connection",
        link.local_addr(),
        args.upstream,
        args.delay_ms,
        args.link_buffer.link_buffer_mb
    );
    stop.await;
    drop(link);
    Ok(())
}
