//! The command line's flags and `LAGPROBE_*` variables, as clap argument groups that turn
//! into the library's [settings](lagprobe::settings) and [requests](lagprobe::service).
//! Every range and default comes from the settings table, so `--help` and the API agree.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, ValueEnum, builder::RangedU64ValueParser};
use lagprobe::{
    service::{CompareRequest, ProbeParams, RunRequest, Schedule, StrategyParams},
    settings::{
        self, Bound, DatabaseSettings, LabSettings, PoolSettings, ProxySettings, ProxyStrategy,
        Secret, Settings, Strategy, StrategyDefaults,
    },
};

/// A flag's parser, checking the setting's range.
fn within(bound: &Bound) -> RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(bound.range())
}

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
    #[arg(long, env = "LAGPROBE_HTTP_ADDR", default_value = settings::HTTP_ADDR)]
    pub http_addr: SocketAddr,

    /// gRPC address (lagprobe.v1.ConsistencyProbe, reflection, health).
    #[arg(long, env = "LAGPROBE_GRPC_ADDR", default_value = settings::GRPC_ADDR)]
    pub grpc_addr: SocketAddr,

    /// Skip running migrations on the primary at start.
    #[arg(long, env = "LAGPROBE_NO_MIGRATE")]
    pub no_migrate: bool,

    /// Update the heartbeat row on the primary this often (ms), for heartbeat lag; 0 turns
    /// it off (for a primary where lagprobe should write nothing unasked).
    #[arg(long, env = "LAGPROBE_HEARTBEAT_MS", default_value_t = settings::HEARTBEAT_MS.default, value_parser = within(&settings::HEARTBEAT_MS))]
    pub heartbeat_ms: u64,

    /// Probes kept for the /test/ page's history charts; 0 keeps none.
    #[arg(long, env = "LAGPROBE_PROBE_HISTORY", default_value_t = settings::PROBE_HISTORY.default, value_parser = within(&settings::PROBE_HISTORY))]
    pub probe_history: u64,

    #[command(flatten)]
    pub pool: PoolArgs,

    #[command(flatten)]
    pub strategy: StrategyArgs,

    #[command(flatten)]
    pub proxy: ProxyArgs,
}

impl ServiceArgs {
    /// The library's settings for serving `databases`.
    pub fn settings(&self, databases: DatabaseSettings) -> Settings {
        Settings {
            databases,
            http_addr: self.http_addr,
            grpc_addr: self.grpc_addr,
            migrate: !self.no_migrate,
            heartbeat: (self.heartbeat_ms > 0).then(|| Duration::from_millis(self.heartbeat_ms)),
            pool: self.pool.settings(),
            defaults: self.strategy.defaults(),
            proxy: self.proxy.settings(self.proxy.proxy_addr.0),
            probe_history: self.probe_history as usize,
        }
    }
}

/// An address, or `none` to turn the listener off.
#[derive(Debug, Clone, Copy)]
pub struct OptionalAddr(pub Option<SocketAddr>);

fn parse_optional_addr(text: &str) -> Result<OptionalAddr, String> {
    if text == "none" {
        return Ok(OptionalAddr(None));
    }
    text.parse()
        .map(|addr| OptionalAddr(Some(addr)))
        .map_err(|error| format!("{error} (or `none`)"))
}

fn parse_proxy_strategy(text: &str) -> Result<ProxyStrategy, String> {
    text.parse()
        .map_err(|error: settings::Invalid| error.to_string())
}

/// The PostgreSQL-protocol proxy of `lab` and `serve`.
#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// The proxy's address; `none` turns it off.
    #[arg(long, env = "LAGPROBE_PROXY_ADDR", default_value = settings::PROXY_ADDR, value_parser = parse_optional_addr)]
    pub proxy_addr: OptionalAddr,

    #[command(flatten)]
    pub options: ProxyOptions,
}

/// The proxy's settings other than its address (shared with `lagprobe proxy`).
#[derive(Debug, Clone, Args)]
pub struct ProxyOptions {
    /// The proxy sessions' default strategy: replica, primary, pin-window, lsn-wait,
    /// lsn-route, remote-apply or global (`SET lagprobe.strategy` changes a session's).
    #[arg(long, env = "LAGPROBE_PROXY_STRATEGY", default_value = "replica", value_parser = parse_proxy_strategy)]
    pub proxy_strategy: ProxyStrategy,

    /// The password clients must give; required to listen on a non-loopback address.
    #[arg(long, env = "LAGPROBE_PROXY_PASSWORD", hide_env_values = true)]
    pub proxy_password: Option<String>,

    /// Longest message accepted from a client or a server (bytes).
    #[arg(long, env = "LAGPROBE_PROXY_MAX_MESSAGE_BYTES", default_value_t = settings::PROXY_MAX_MESSAGE_BYTES.default, value_parser = within(&settings::PROXY_MAX_MESSAGE_BYTES))]
    pub proxy_max_message_bytes: u64,

    /// How long to wait for a backend to accept and authenticate a connection (ms).
    #[arg(long, env = "LAGPROBE_PROXY_CONNECT_TIMEOUT_MS", default_value_t = settings::PROXY_CONNECT_TIMEOUT_MS.default, value_parser = within(&settings::PROXY_CONNECT_TIMEOUT_MS))]
    pub proxy_connect_timeout_ms: u64,

    /// The shared replay watcher's poll interval while sessions wait (ms).
    #[arg(long, env = "LAGPROBE_PROXY_POLL_INTERVAL_MS", default_value_t = settings::PROXY_POLL_INTERVAL_MS.default, value_parser = within(&settings::PROXY_POLL_INTERVAL_MS))]
    pub proxy_poll_interval_ms: u64,

    /// Distinct normalized queries the proxy's audit keeps counts for (later ones are
    /// counted together as "other").
    #[arg(long, env = "LAGPROBE_PROXY_AUDIT_QUERIES", default_value_t = settings::PROXY_AUDIT_QUERIES.default, value_parser = within(&settings::PROXY_AUDIT_QUERIES))]
    pub proxy_audit_queries: u64,
}

impl ProxyArgs {
    pub fn settings(&self, addr: Option<SocketAddr>) -> ProxySettings {
        self.options.settings(addr)
    }
}

/// `lagprobe proxy`: the proxy alone.
#[derive(Debug, Clone, Args)]
pub struct ProxyCommandArgs {
    /// Where clients connect.
    #[arg(long, env = "LAGPROBE_PROXY_LISTEN", default_value = settings::PROXY_ADDR)]
    pub listen: SocketAddr,

    /// The primary: writes, transactions and session commands go here (postgres:// URL).
    #[arg(long, env = "LAGPROBE_PROXY_PRIMARY_URL", hide_env_values = true)]
    pub primary_url: String,

    /// A replica: reads go here. Repeat the flag (or separate URLs with commas in the
    /// variable) for several; sessions use them in turn.
    #[arg(
        long,
        env = "LAGPROBE_PROXY_REPLICA_URL",
        hide_env_values = true,
        value_delimiter = ',',
        required = true
    )]
    pub replica_url: Vec<String>,

    /// Sessions' default strategy: replica, primary, pin-window, lsn-wait, lsn-route,
    /// remote-apply or global.
    #[arg(long, env = "LAGPROBE_PROXY_STRATEGY", default_value = "replica", value_parser = parse_proxy_strategy)]
    pub strategy: ProxyStrategy,

    /// pin-window: reads stay on the primary this long after a session's write (ms).
    #[arg(long, env = "LAGPROBE_PROXY_PIN_WINDOW_MS", default_value_t = settings::PIN_WINDOW_MS.default, value_parser = within(&settings::PIN_WINDOW_MS))]
    pub pin_window_ms: u64,

    /// lsn-wait and global: wait this long for the replica before reading the primary (ms).
    #[arg(long, env = "LAGPROBE_PROXY_LSN_WAIT_TIMEOUT_MS", default_value_t = settings::LSN_WAIT_TIMEOUT_MS.default, value_parser = within(&settings::LSN_WAIT_TIMEOUT_MS))]
    pub lsn_wait_timeout_ms: u64,

    /// The password clients must give; required to listen on a non-loopback address.
    #[arg(long, env = "LAGPROBE_PROXY_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,

    /// Longest message accepted from a client or a server (bytes).
    #[arg(long, env = "LAGPROBE_PROXY_MAX_MESSAGE_BYTES", default_value_t = settings::PROXY_MAX_MESSAGE_BYTES.default, value_parser = within(&settings::PROXY_MAX_MESSAGE_BYTES))]
    pub max_message_bytes: u64,

    /// How long to wait for a backend to accept and authenticate a connection (ms).
    #[arg(long, env = "LAGPROBE_PROXY_CONNECT_TIMEOUT_MS", default_value_t = settings::PROXY_CONNECT_TIMEOUT_MS.default, value_parser = within(&settings::PROXY_CONNECT_TIMEOUT_MS))]
    pub connect_timeout_ms: u64,

    /// The shared replay watcher's poll interval while sessions wait (ms).
    #[arg(long, env = "LAGPROBE_PROXY_POLL_INTERVAL_MS", default_value_t = settings::PROXY_POLL_INTERVAL_MS.default, value_parser = within(&settings::PROXY_POLL_INTERVAL_MS))]
    pub poll_interval_ms: u64,

    /// Distinct normalized queries the audit keeps counts for.
    #[arg(long, env = "LAGPROBE_PROXY_AUDIT_QUERIES", default_value_t = settings::PROXY_AUDIT_QUERIES.default, value_parser = within(&settings::PROXY_AUDIT_QUERIES))]
    pub audit_queries: u64,

    /// Runtime worker threads serving the sessions.
    #[arg(long, env = "LAGPROBE_PROXY_THREADS", default_value_t = settings::PROXY_THREADS.default, value_parser = within(&settings::PROXY_THREADS))]
    pub threads: u64,

    #[command(flatten)]
    pub pool: PoolArgs,
}

impl ProxyCommandArgs {
    pub fn settings(&self) -> ProxySettings {
        ProxySettings {
            addr: Some(self.listen),
            strategy: self.strategy,
            password: self.password.clone().map(Secret),
            // In range by the flags' parsers.
            max_message_bytes: self.max_message_bytes as usize,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            poll_interval: Duration::from_millis(self.poll_interval_ms),
            audit_queries: self.audit_queries as usize,
            ..ProxySettings::default()
        }
    }

    pub fn defaults(&self) -> StrategyDefaults {
        StrategyDefaults {
            pin_window: Duration::from_millis(self.pin_window_ms),
            lsn_wait_timeout: Duration::from_millis(self.lsn_wait_timeout_ms),
            ..StrategyDefaults::default()
        }
    }
}

impl ProxyOptions {
    pub fn settings(&self, addr: Option<SocketAddr>) -> ProxySettings {
        ProxySettings {
            addr,
            strategy: self.proxy_strategy,
            password: self.proxy_password.clone().map(Secret),
            // In range by the flags' parsers.
            max_message_bytes: self.proxy_max_message_bytes as usize,
            connect_timeout: Duration::from_millis(self.proxy_connect_timeout_ms),
            poll_interval: Duration::from_millis(self.proxy_poll_interval_ms),
            audit_queries: self.proxy_audit_queries as usize,
            ..ProxySettings::default()
        }
    }
}

/// The server's default read-your-writes strategy and its settings; requests may override.
#[derive(Debug, Clone, Args)]
pub struct StrategyArgs {
    /// Default strategy: replica, primary, pin-window, lsn-wait, lsn-route or remote-apply.
    #[arg(long = "strategy", env = "LAGPROBE_STRATEGY", default_value = "replica", value_parser = parse_strategy)]
    pub default_strategy: Strategy,

    /// pin-window: reads stay on the primary this long after a write (ms).
    #[arg(long, env = "LAGPROBE_PIN_WINDOW_MS", default_value_t = settings::PIN_WINDOW_MS.default, value_parser = within(&settings::PIN_WINDOW_MS))]
    pub pin_window_ms: u64,

    /// lsn-wait: wait this long for the replica before reading the primary (ms).
    #[arg(long, env = "LAGPROBE_LSN_WAIT_TIMEOUT_MS", default_value_t = settings::LSN_WAIT_TIMEOUT_MS.default, value_parser = within(&settings::LSN_WAIT_TIMEOUT_MS))]
    pub lsn_wait_timeout_ms: u64,
}

fn parse_strategy(text: &str) -> Result<Strategy, String> {
    text.parse()
        .map_err(|error: settings::Invalid| error.to_string())
}

impl StrategyArgs {
    pub fn defaults(&self) -> StrategyDefaults {
        StrategyDefaults {
            strategy: self.default_strategy,
            pin_window: Duration::from_millis(self.pin_window_ms),
            lsn_wait_timeout: Duration::from_millis(self.lsn_wait_timeout_ms),
        }
    }
}

/// Connection pool sizing.
#[derive(Debug, Clone, Args)]
pub struct PoolArgs {
    /// Connections per database pool at most.
    #[arg(long, env = "LAGPROBE_POOL_SIZE", default_value_t = settings::POOL_SIZE.default, value_parser = within(&settings::POOL_SIZE))]
    pub pool_size: u64,

    /// How long a query waits for a connection before the database counts as unavailable (ms).
    #[arg(long, env = "LAGPROBE_ACQUIRE_TIMEOUT_MS", default_value_t = settings::ACQUIRE_TIMEOUT_MS.default, value_parser = within(&settings::ACQUIRE_TIMEOUT_MS))]
    pub acquire_timeout_ms: u64,
}

impl PoolArgs {
    pub fn settings(&self) -> PoolSettings {
        PoolSettings {
            // In range by the flag's parser.
            max_connections: self.pool_size as u32,
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
    pub fn settings(&self) -> DatabaseSettings {
        DatabaseSettings::External {
            primary_url: self.primary_url.clone(),
            replica_urls: self.replica_url.clone(),
        }
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

    /// Cache folder for the cluster template a lab copies instead of running initdb (default:
    /// ~/.cache/lagprobe, /var/cache/lagprobe for root).
    #[arg(long, env = "LAGPROBE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Run initdb for every lab instead of copying the cached template.
    #[arg(long, env = "LAGPROBE_NO_TEMPLATE")]
    pub no_template: bool,

    /// One-way delay from primary to replica, in milliseconds.
    #[arg(long, env = "LAGPROBE_DELAY_MS", default_value_t = settings::DELAY_MS.default, value_parser = within(&settings::DELAY_MS))]
    pub delay_ms: u64,

    /// Primary port on 127.0.0.1 (0: a free port).
    #[arg(long, env = "LAGPROBE_PRIMARY_PORT", default_value_t = 0)]
    pub primary_port: u16,

    /// First replica's port on 127.0.0.1 (0: free ports); replica N gets this + N - 1.
    #[arg(long, env = "LAGPROBE_REPLICA_PORT", default_value_t = 0)]
    pub replica_port: u16,

    /// Streaming replicas to start, all behind the one delay link.
    #[arg(long, env = "LAGPROBE_REPLICAS", default_value_t = settings::REPLICAS.default, value_parser = within(&settings::REPLICAS))]
    pub replicas: u64,

    /// Make the replicas synchronous standbys, so the remote-apply strategy takes effect.
    /// Ordinary writes still commit locally (synchronous_commit = local).
    #[arg(long, env = "LAGPROBE_SYNC_REPLICA")]
    pub sync_replica: bool,

    #[command(flatten)]
    pub link_buffer: LinkBufferArgs,
}

/// The delay link's memory cap (the lab's and the standalone link's).
#[derive(Debug, Clone, Args)]
pub struct LinkBufferArgs {
    /// MiB the delay link holds per connection and direction at most; when full it stops
    /// reading from the primary (backpressure). At delay D it passes about this much per D:
    /// 64 MiB at 1000 ms is about 0.5 Gbit/s.
    #[arg(long, env = "LAGPROBE_LINK_BUFFER_MB", default_value_t = settings::LINK_BUFFER_MB.default, value_parser = within(&settings::LINK_BUFFER_MB))]
    pub link_buffer_mb: u64,
}

impl LinkBufferArgs {
    pub fn buffer_bytes(&self) -> u64 {
        self.link_buffer_mb * settings::MIB
    }
}

impl LabArgs {
    pub fn settings(&self) -> LabSettings {
        LabSettings {
            pg_bindir: self.pg_bindir.clone(),
            data_dir: self.data_dir.clone(),
            cache_dir: match self.no_template {
                true => None,
                false => self.cache_dir.clone().or_else(settings::default_cache_dir),
            },
            delay: Duration::from_millis(self.delay_ms),
            link_buffer_bytes: self.link_buffer.buffer_bytes(),
            primary_port: self.primary_port,
            replica_port: self.replica_port,
            // In range by the flag's parser.
            replicas: self.replicas as u8,
            sync_replica: self.sync_replica,
            direct_replica: false,
        }
    }
}

/// How each probe reads back and waits (the API's ProbeOptions; the strategy settings are
/// the command's --pin-window-ms and --lsn-wait-timeout-ms).
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    /// How long each probe waits for its write to show on the replica (ms).
    #[arg(long)]
    pub visibility_timeout_ms: Option<u64>,
    /// Milliseconds between replica reads while waiting.
    #[arg(long)]
    pub poll_interval_ms: Option<u64>,
}

impl ProbeArgs {
    fn params(&self) -> ProbeParams {
        ProbeParams {
            visibility_timeout_ms: self.visibility_timeout_ms,
            poll_interval_ms: self.poll_interval_ms,
            strategy_options: StrategyParams::default(),
        }
    }
}

/// How many probes, how often, how many at once (the API's Schedule).
#[derive(Debug, Clone, Args)]
pub struct ScheduleArgs {
    /// Number of probes (per strategy with --compare).
    #[arg(long, default_value_t = settings::CLI_RUN_COUNT.default)]
    pub count: u64,
    /// Milliseconds between probe starts.
    #[arg(long)]
    pub interval_ms: Option<u64>,
    /// Probes in flight at once.
    #[arg(long)]
    pub concurrency: Option<u64>,
}

impl ScheduleArgs {
    fn schedule(&self) -> Schedule {
        Schedule {
            count: Some(self.count),
            interval_ms: self.interval_ms,
            concurrency: self.concurrency,
        }
    }
}

/// A run of probes from the command line.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub schedule: ScheduleArgs,
    #[command(flatten)]
    pub probe: ProbeArgs,
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

/// What `lagprobe run` was asked for.
pub enum RunKind {
    Run(RunRequest),
    Compare(CompareRequest),
}

impl RunArgs {
    pub fn request(&self) -> Result<RunKind, settings::Invalid> {
        let probe = self.probe.params();
        let schedule = self.schedule.schedule();
        if self.compare.is_empty() {
            return Ok(RunKind::Run(RunRequest {
                strategy: self.read_strategy,
                probe,
                schedule,
            }));
        }
        let strategies = if self.compare.iter().any(|name| name == "all") {
            Vec::new()
        } else {
            self.compare
                .iter()
                .map(|name| Strategy::parse_field(name, "compare"))
                .collect::<Result<_, _>>()?
        };
        Ok(RunKind::Compare(CompareRequest {
            strategies,
            probe,
            schedule,
        }))
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
    #[arg(long, env = "LAGPROBE_DELAY_MS", default_value_t = settings::DELAY_MS.default, value_parser = within(&settings::DELAY_MS))]
    pub delay_ms: u64,

    #[command(flatten)]
    pub link_buffer: LinkBufferArgs,
}
