//! The `lagprobe` command line: a thin dispatcher over the library.

use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use lagprobe::{
    app,
    config::{
        DatabaseArgs, DelayLinkArgs, LabArgs, LogFormat, PoolArgs, RunArgs, ServiceArgs,
        StrategyArgs,
    },
    db::{self, Databases},
    lab::DelayLink,
    probe::{CompareSpec, ProbeEngine, RunSpec, markdown_table},
    telemetry,
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
        /// Only these tables (comma-separated): startup, memory, strategies, link, rate.
        #[arg(long, value_delimiter = ',')]
        sections: Vec<String>,
        #[arg(long, env = "LAGPROBE_PG_BINDIR")]
        pg_bindir: Option<std::path::PathBuf>,
    },
    /// GET a URL and exit 0 on a 2xx answer (for container health checks).
    Healthcheck {
        #[arg(long, default_value = "http://127.0.0.1:8000/readyz")]
        url: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    match cli.command {
        Command::Lab { lab, service } => run_lab(&lab, &service).await,
        Command::Serve { databases, service } => serve(&databases, &service).await,
        Command::Migrate { primary_url, pool } => {
            let primary = db::lazy_pool(
                &primary_url,
                lagprobe::error::Role::Primary,
                &pool.settings(),
            )?;
            db::migrate_primary(&primary).await?;
            println!("migrations applied to {}", db::redact_url(&primary_url));
            Ok(())
        }
        Command::Run {
            databases,
            run,
            pool,
            strategy,
        } => run_probes(&databases, &run, &pool, &strategy).await,
        Command::DelayLink { link } => delay_link(&link).await,
        Command::Bench {
            lab_starts,
            strategy_probes,
            rate_probes,
            sections,
            pg_bindir,
        } => {
            let options = lagprobe::bench::BenchOptions {
                lab_starts,
                strategy_probes,
                rate_probes,
                sections,
                pg_bindir,
            };
            let binary = std::env::current_exe().context("locating the lagprobe binary")?;
            print!("{}", lagprobe::bench::run(&options, &binary).await?);
            Ok(())
        }
        Command::Healthcheck { url } => {
            let status =
                lagprobe::healthcheck::http_get_status(&url, Duration::from_secs(5)).await?;
            anyhow::ensure!((200..300).contains(&status), "GET {url} answered {status}");
            Ok(())
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn stop_requested() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("waiting for Ctrl-C")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

async fn run_lab(lab_args: &LabArgs, service: &ServiceArgs) -> anyhow::Result<()> {
    let (lab, _state, mut servers) = app::start_lab_service(&lab_args.options(), service)
        .await
        .context("starting the lab")?;
    let replicas: String = lab
        .replica_urls()
        .iter()
        .map(|(name, url)| format!("\n  {name:<10} psql \"{url}\""))
        .collect();
    println!(
        "lagprobe lab is up in {:.1} s: PostgreSQL {} primary and {} streaming replica(s){}, \
         {} ms delay from primary to replica\n\
         \n  test page  http://{}/test/\
         \n  gRPC       {} (try: grpcurl -plaintext {} list)\
         \n  primary    psql \"{}\"{replicas}\
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
        servers.http_addr,
        servers.grpc_addr,
        servers.grpc_addr,
        lab.primary_url(),
        lab.data_dir().display(),
        if lab_args.data_dir.is_some() {
            ""
        } else {
            " (temporary, removed on exit)"
        },
    );
    let outcome = tokio::select! {
        stop = stop_requested() => stop,
        error = lab.unexpected_exit() => Err(anyhow::Error::new(error)),
        error = servers.failed() => Err(anyhow::Error::new(error)),
    };
    tracing::info!("stopping");
    servers.shutdown().await;
    lab.shutdown().await;
    outcome
}

async fn serve(databases: &DatabaseArgs, service: &ServiceArgs) -> anyhow::Result<()> {
    tracing::info!(
        primary = %db::redact_url(&databases.primary_url),
        replicas = ?databases.replica_url.iter().map(|url| db::redact_url(url)).collect::<Vec<_>>(),
        "serving against external databases"
    );
    let (_state, mut servers) =
        app::start_service(&databases.primary_url, &databases.replicas(), service, None)
            .await
            .context("starting the service")?;
    println!(
        "lagprobe serving: http://{}/test/ and gRPC {}",
        servers.http_addr, servers.grpc_addr
    );
    let outcome = tokio::select! {
        stop = stop_requested() => stop,
        error = servers.failed() => Err(anyhow::Error::new(error)),
    };
    servers.shutdown().await;
    outcome
}

async fn run_probes(
    databases: &DatabaseArgs,
    run: &RunArgs,
    pool: &PoolArgs,
    strategy: &StrategyArgs,
) -> anyhow::Result<()> {
    let defaults = strategy.probe_defaults();
    let engine = ProbeEngine::new(Databases::connect_lazy(
        &databases.primary_url,
        &databases.replicas(),
        &pool.settings(),
    )?);
    if let Some(strategies) = run.compared()? {
        let spec = CompareSpec::from_params(&strategies, &run.params(), &defaults)?;
        let report = engine.compare(&spec).await?;
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
        return Ok(());
    }
    let spec = RunSpec::from_params(&run.params(), &defaults)?;
    let report = engine.run(&spec).await?;
    if run.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!(
            "{}",
            markdown_table(&[(report.strategy.to_string(), &report.summary)])
        );
    }
    Ok(())
}

async fn delay_link(args: &DelayLinkArgs) -> anyhow::Result<()> {
    let link = DelayLink::bind(
        args.listen.as_str(),
        args.upstream.clone(),
        Duration::from_millis(args.delay_ms),
    )
    .await
    .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "delay link {} -> {}: holding upstream-to-client bytes {} ms",
        link.local_addr(),
        args.upstream,
        args.delay_ms
    );
    stop_requested().await?;
    drop(link);
    Ok(())
}
