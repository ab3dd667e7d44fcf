//! Settings from command-line flags and `LAGPROBE_*` environment variables.
//!
//! Each subcommand's flags live here as clap argument groups, so `main.rs` only dispatches
//! and every setting is documented once, with its flag, its variable and its default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::{db::PoolSettings, lab::LabOptions};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where the service listens, and how it treats its databases.
#[derive(Debug, Clone, Args)]
pub struct ServiceArgs {
    /// HTTP address (the /test/ page, JSON API, health). Port 0 picks a free port.
    #[arg(long, env = "LAGPROBE_HTTP_ADDR", default_value = "127.0.0.1:8000")]
    pub http_addr: SocketAddr,

    /// gRPC address (lagprobe.v1.ConsistencyProbe, reflection, health).
    #[arg(long, env = "LAGPROBE_GRPC_ADDR", default_value = "127.0.0.1:50051")]
    pub grpc_addr: SocketAddr,

    /// Skip running migrations on the primary at start.
    #[arg(long, env = "LAGPROBE_NO_MIGRATE")]
    pub no_migrate: bool,

    #[command(flatten)]
    pub pool: PoolArgs,
}

/// Connection pool sizing.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Connections per database pool at most.
    #[arg(long, env = "LAGPROBE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub pool_size: u32,

    /// How long a query waits for a connection before the database counts as unavailable (ms).
    #[arg(long, env = "LAGPROBE_ACQUIRE_TIMEOUT_MS", default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub acquire_timeout_ms: u64,
}

impl PoolArgs {
    pub fn settings(&self) -> PoolSettings {
        PoolSettings {
            max_connections: self.pool_size,
            acquire_timeout: Duration::from_millis(self.acquire_timeout_ms),
        }
    }
}

/// The two databases of `serve` and `run`.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// The primary: all writes go here (postgres:// URL).
    #[arg(long, env = "LAGPROBE_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: String,

    /// The replica: reads go here (postgres:// URL).
    #[arg(long, env = "LAGPROBE_REPLICA_URL", hide_env_values = true)]
    pub replica_url: String,
}

/// The embedded lab.
#[derive(Debug, Clone, Args)]
pub struct LabArgs {
    /// Directory holding initdb, postgres and pg_basebackup (default: pg_config --bindir,
    /// then PATH, then the newest /usr/lib/postgresql/*/bin).
    #[arg(long, env = "LAGPROBE_PG_BINDIR")]
    pub pg_bindir: Option<PathBuf>,

    /// Keep the clusters in this directory across runs (default: a temporary directory,
    /// removed on exit).
    #[arg(long, env = "LAGPROBE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// One-way delay from primary to replica, in milliseconds.
    #[arg(long, env = "LAGPROBE_DELAY_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub delay_ms: u64,

    /// Primary port on 127.0.0.1 (0: a free port).
    #[arg(long, env = "LAGPROBE_PRIMARY_PORT", default_value_t = 0)]
    pub primary_port: u16,

    /// Replica port on 127.0.0.1 (0: a free port).
    #[arg(long, env = "LAGPROBE_REPLICA_PORT", default_value_t = 0)]
    pub replica_port: u16,
}

impl LabArgs {
    pub fn options(&self) -> LabOptions {
        LabOptions {
            pg_bindir: self.pg_bindir.clone(),
            data_dir: self.data_dir.clone(),
            delay: Duration::from_millis(self.delay_ms),
            primary_port: self.primary_port,
            replica_port: self.replica_port,
        }
    }
}

/// A run of probes from the command line.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Number of probes (1 to 10000).
    #[arg(long, default_value_t = 10)]
    pub count: u64,
    /// Milliseconds between probe starts.
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// How long each probe waits for its write to show on the replica (ms).
    #[arg(long)]
    pub visibility_timeout_ms: Option<u64>,
    /// Milliseconds between replica reads while waiting.
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
    /// Probes in flight at once.
    #[arg(long)]
    pub concurrency: Option<u64>,
    /// Print the whole report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    pub fn params(&self) -> crate::probe::RunParams {
        crate::probe::RunParams {
            count: Some(self.count),
            interval_ms: self.interval_ms,
            visibility_timeout_ms: self.visibility_timeout_ms,
            poll_interval_ms: self.poll_interval_ms,
            concurrency: self.concurrency,
        }
    }
}

/// The standalone delay link.
#[derive(Debug, Clone, Args)]
pub struct DelayLinkArgs {
    /// Address to accept the replica's connections on.
    #[arg(
        long,
        env = "LAGPROBE_DELAY_LINK_LISTEN",
        default_value = "127.0.0.1:5433"
    )]
    pub listen: String,

    /// The primary, as HOST:PORT (resolved for every new connection).
    #[arg(long, env = "LAGPROBE_DELAY_LINK_UPSTREAM")]
    pub upstream: String,

    /// Milliseconds to hold bytes flowing from the primary to the replica.
    #[arg(long, env = "LAGPROBE_DELAY_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub delay_ms: u64,
}
