//! Settings from command-line flags and `LAGPROBE_*` environment variables.
//!
//! Each subcommand's flags live here as clap argument groups, so `main.rs` only dispatches
//! and every setting is documented once, with its flag, its variable and its default.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum};

use crate::{
    db::{
        PoolSettings,
        strategy::{Strategy, StrategySettings},
    },
    lab::LabOptions,
    probe::ProbeOptions,
};

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

    /// Update the heartbeat row on the primary this often (ms), for heartbeat lag; 0 turns
    /// it off (for a primary where lagprobe should write nothing unasked).
    #[arg(long, env = "LAGPROBE_HEARTBEAT_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub heartbeat_ms: u64,

    #[command(flatten)]
    pub pool: PoolArgs,

    #[command(flatten)]
    pub strategy: StrategyArgs,
}

/// The server's default read-your-writes strategy and its settings; requests may override.
#[derive(Debug, Clone, Args)]
pub struct StrategyArgs {
    /// Default strategy: replica, primary, pin-window, lsn-wait, lsn-route or remote-apply.
    #[arg(long = "strategy", env = "LAGPROBE_STRATEGY", default_value = "replica", value_parser = parse_strategy)]
    pub default_strategy: Strategy,

    /// pin-window: reads stay on the primary this long after a write (ms).
    #[arg(long, env = "LAGPROBE_PIN_WINDOW_MS", default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub pin_window_ms: u64,

    /// lsn-wait: wait this long for the replica before reading the primary (ms).
    #[arg(long, env = "LAGPROBE_LSN_WAIT_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub lsn_wait_timeout_ms: u64,
}

fn parse_strategy(text: &str) -> Result<Strategy, String> {
    text.parse()
        .map_err(|error: crate::Error| error.to_string())
}

impl Default for StrategyArgs {
    fn default() -> Self {
        StrategyArgs {
            default_strategy: Strategy::Replica,
            pin_window_ms: 2000,
            lsn_wait_timeout_ms: 10_000,
        }
    }
}

impl StrategyArgs {
    /// The probe options a request gets when it sets nothing.
    pub fn probe_defaults(&self) -> ProbeOptions {
        ProbeOptions {
            strategy: self.default_strategy,
            strategy_settings: StrategySettings {
                pin_window: Duration::from_millis(self.pin_window_ms),
                lsn_wait_timeout: Duration::from_millis(self.lsn_wait_timeout_ms),
                ..StrategySettings::default()
            },
            ..ProbeOptions::default()
        }
    }
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

    /// A replica: reads go here (postgres:// URL). Repeat the flag (or separate URLs with
    /// commas in the variable) for several; probes use them in turn.
    #[arg(
        long,
        env = "LAGPROBE_REPLICA_URL",
        hide_env_values = true,
        value_delimiter = ',',
        required = true
    )]
    pub replica_url: Vec<String>,
}

impl DatabaseArgs {
    /// `(name, url)` per replica, named by host:port (made unique if two coincide).
    pub fn replicas(&self) -> Vec<(String, String)> {
        let mut named: Vec<(String, String)> = Vec::new();
        for url in &self.replica_url {
            let base = crate::db::replica_name_from_url(url);
            let mut name = base.clone();
            let mut suffix = 2;
            while named.iter().any(|(taken, _)| *taken == name) {
                name = format!("{base}#{suffix}");
                suffix += 1;
            }
            named.push((name, url.clone()));
        }
        named
    }
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

    /// First replica's port on 127.0.0.1 (0: free ports); replica N gets this + N - 1.
    #[arg(long, env = "LAGPROBE_REPLICA_PORT", default_value_t = 0)]
    pub replica_port: u16,

    /// Streaming replicas to start, 1 to 9, all behind the one delay link.
    #[arg(long, env = "LAGPROBE_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub replicas: u8,

    /// Make the replicas synchronous standbys, so the remote-apply strategy takes effect.
    /// Ordinary writes still commit locally (synchronous_commit = local).
    #[arg(long, env = "LAGPROBE_SYNC_REPLICA")]
    pub sync_replica: bool,
}

impl LabArgs {
    pub fn options(&self) -> LabOptions {
        LabOptions {
            pg_bindir: self.pg_bindir.clone(),
            data_dir: self.data_dir.clone(),
            delay: Duration::from_millis(self.delay_ms),
            primary_port: self.primary_port,
            replica_port: self.replica_port,
            replicas: self.replicas,
            sync_replica: self.sync_replica,
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
    /// Strategy for the read-back (default: --strategy).
    #[arg(long = "read-strategy", value_parser = parse_strategy)]
    pub read_strategy: Option<Strategy>,
    /// Compare these strategies (comma-separated; `all` for every one) instead of one run.
    #[arg(long, value_delimiter = ',')]
    pub compare: Vec<String>,
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
            strategy: self.read_strategy,
            pin_window_ms: None,
            lsn_wait_timeout_ms: None,
        }
    }

    /// The strategies of `--compare`; `None` when not comparing.
    pub fn compared(&self) -> crate::Result<Option<Vec<Strategy>>> {
        if self.compare.is_empty() {
            return Ok(None);
        }
        if self.compare.iter().any(|name| name == "all") {
            return Ok(Some(Vec::new()));
        }
        self.compare
            .iter()
            .map(|name| name.parse())
            .collect::<crate::Result<Vec<_>>>()
            .map(Some)
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
