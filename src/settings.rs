//! Every default and bound lagprobe has, in one table, and the settings the library starts
//! from.
//!
//! The CLI (flags and `LAGPROBE_*` variables), HTTP, gRPC, the benchmark and the tests all
//! default and validate through the [`Bound`]s here, so a range or a default is written
//! once. This module sits at the top of the crate's layers and imports none of them: the
//! lab, the pools and the probe engine take their inputs from it.

use std::{
    borrow::Cow, fmt, net::SocketAddr, ops::RangeInclusive, path::PathBuf, str::FromStr,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// A caller's value that is out of range or malformed; `field` names it as the caller
/// spelled it. Usually a name lagprobe knows; owned when only the caller's input has it
/// (a misspelt field, one given twice).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {reason}")]
pub struct Invalid {
    pub field: Cow<'static, str>,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// One row of the table: a whole-number setting's name, its range and its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The field name callers use (`count`, `delay_ms`): error messages name it.
    pub field: &'static str,
    pub min: u64,
    pub max: u64,
    pub default: u64,
}

impl Bound {
    const fn new(field: &'static str, min: u64, max: u64, default: u64) -> Self {
        Bound {
            field,
            min,
            max,
            default,
        }
    }

    pub const fn range(&self) -> RangeInclusive<u64> {
        self.min..=self.max
    }

    /// The same range and field with another default (a server's own default).
    pub const fn defaulting_to(self, default: u64) -> Self {
        Bound { default, ..self }
    }

    /// `value` if in range, the default when absent.
    pub fn check(&self, value: Option<u64>) -> Result<u64, Invalid> {
        let value = value.unwrap_or(self.default);
        if self.range().contains(&value) {
            Ok(value)
        } else {
            Err(Invalid::new(
                self.field,
                format!("{value} is out of range {}..={}", self.min, self.max),
            ))
        }
    }

    /// [`Bound::check`] for a count that fits in `u32` (every count bound does).
    pub fn count(&self, value: Option<u64>) -> Result<u32, Invalid> {
        self.check(value).map(|value| value as u32)
    }

    /// [`Bound::check`] of a millisecond setting, as a duration.
    pub fn millis(&self, value: Option<u64>) -> Result<Duration, Invalid> {
        self.check(value).map(Duration::from_millis)
    }

    /// The default as a duration, for millisecond settings.
    pub const fn default_duration(&self) -> Duration {
        Duration::from_millis(self.default)
    }

    /// Checks a byte count a caller gave against a setting in MiB (the link's buffer).
    pub fn check_mib(&self, bytes: u64) -> Result<u64, Invalid> {
        let range = self.min.saturating_mul(MIB)..=self.max.saturating_mul(MIB);
        if range.contains(&bytes) {
            Ok(bytes)
        } else {
            Err(Invalid::new(
                self.field,
                format!(
                    "{bytes} bytes is out of range {}..={} MiB",
                    self.min, self.max
                ),
            ))
        }
    }

    /// Checks a duration a caller gave (the delay link's settings).
    pub fn check_duration(&self, value: Duration) -> Result<Duration, Invalid> {
        let ms = u64::try_from(value.as_millis()).unwrap_or(u64::MAX);
        self.check(Some(ms)).map(|_| value)
    }
}

/// Probes in one run (per strategy in a comparison, where the default is 10).
pub const COUNT: Bound = Bound::new("count", 1, 10_000, 1);
/// Probes per strategy in a comparison.
pub const COMPARE_COUNT: Bound = COUNT.defaulting_to(10);
/// Probes `lagprobe run` makes unless told.
pub const CLI_RUN_COUNT: Bound = COUNT.defaulting_to(10);
/// Milliseconds between the starts of a run's probes; 0: as soon as a slot is free.
pub const INTERVAL_MS: Bound = Bound::new("interval_ms", 0, 60_000, 0);
/// Milliseconds between the probes of a watch.
pub const WATCH_INTERVAL_MS: Bound = Bound::new("interval_ms", 1, 60_000, 1000);
/// Probes in flight at once.
pub const CONCURRENCY: Bound = Bound::new("concurrency", 1, 256, 1);
/// How long a probe waits for its write to show on the replica.
pub const VISIBILITY_TIMEOUT_MS: Bound = Bound::new("visibility_timeout_ms", 1, 60_000, 5000);
/// Pause between replica reads while waiting (and between lsn-wait's position checks).
pub const POLL_INTERVAL_MS: Bound = Bound::new("poll_interval_ms", 1, 1000, 2);
/// pin-window: reads stay on the primary this long after a write.
pub const PIN_WINDOW_MS: Bound = Bound::new("pin_window_ms", 0, 600_000, 2000);
/// lsn-wait: how long to wait for the replica before reading the primary.
pub const LSN_WAIT_TIMEOUT_MS: Bound = Bound::new("lsn_wait_timeout_ms", 1, 600_000, 10_000);
/// The lab's one-way delay from primary to replica (the old demo's 1 s).
pub const DELAY_MS: Bound = Bound::new("delay_ms", 0, 600_000, 1000);
/// What the delay link holds per connection and direction at most, in MiB; beyond it the
/// link stops reading from the sender. At 1000 ms, 64 MiB lets about 64 MiB/s through.
pub const LINK_BUFFER_MB: Bound = Bound::new("link_buffer_mb", 1, 16_384, 64);
/// Bytes in a MiB.
pub const MIB: u64 = 1024 * 1024;
/// Uniform jitter on the lab's delay.
pub const JITTER_MS: Bound = Bound::new("jitter_ms", 0, 600_000, 0);
/// Heartbeat period on the primary; 0 turns it off.
pub const HEARTBEAT_MS: Bound = Bound::new("heartbeat_ms", 0, 60_000, 100);
/// Connections per database pool at most.
pub const POOL_SIZE: Bound = Bound::new("pool_size", 1, 1000, 16);
/// How long a query waits for a pooled connection before the database counts as down.
pub const ACQUIRE_TIMEOUT_MS: Bound = Bound::new("acquire_timeout_ms", 1, 600_000, 3000);
/// Streaming replicas in a lab.
pub const REPLICAS: Bound = Bound::new("replicas", 1, 9, 1);
/// Characters of a value written through the Write API.
pub const VALUE_CHARS: Bound = Bound::new("value", 0, 1000, 0);
/// Characters of a client id (pin-window across calls).
pub const CLIENT_ID_CHARS: Bound = Bound::new("client_id", 0, 200, 0);
/// Characters of a key returned by a write (32 hex digits; some room to spare).
pub const KEY_CHARS: Bound = Bound::new("key", 1, 64, 1);
/// Characters of a lab server's name in a fault operation (`primary`, `replica1`, ...).
pub const SERVER_NAME_CHARS: Bound = Bound::new("name", 1, 64, 1);
/// The same, for the replica a failover promotes.
pub const PROMOTE_CHARS: Bound = Bound::new("promote", 1, 64, 1);
/// Probes the service keeps for the `/test/` page's history charts (0: none).
pub const PROBE_HISTORY: Bound = Bound::new("probe_history", 0, 10_000, 100);
/// Clients remembered for pin-window at most; all are forgotten when it fills.
pub const PINNED_CLIENTS: usize = 100_000;
/// Acknowledged writes the service remembers for counting lost writes after a failover:
/// at most this many (the last 10 s at 1000 probes/s)...
pub const ACKED_WRITES: usize = 10_000;
/// ...and none older than this; rows older than this are swept from the probe table too.
pub const ACKED_WRITES_MAX_AGE: Duration = Duration::from_secs(600);
/// The most an HTTP request body may hold. lagprobe's largest body is a write: 1000
/// characters of value and 200 of client id, at most 12 bytes each as JSON escapes, under
/// 15 KB; anything much bigger is not a lagprobe request and is refused before it is read.
pub const HTTP_BODY_LIMIT_BYTES: usize = 64 * 1024;

/// The proxy's largest accepted message (a client's Query, Parse or CopyData, a server's
/// DataRow); longer lengths, such as a 2 GB one, close the connection with 08P01.
pub const PROXY_MAX_MESSAGE_BYTES: Bound =
    Bound::new("proxy_max_message_bytes", 1024, (1 << 30) - 1, 256 << 20);
/// How long the proxy waits for a backend to accept a connection and authenticate it.
pub const PROXY_CONNECT_TIMEOUT_MS: Bound =
    Bound::new("proxy_connect_timeout_ms", 1, 600_000, 5000);
/// How long a client may take to send its startup packet before it is disconnected.
pub const PROXY_STARTUP_TIMEOUT_MS: Bound =
    Bound::new("proxy_startup_timeout_ms", 1, 600_000, 10_000);
/// The shared replay watcher's pause between position queries while sessions wait.
pub const PROXY_POLL_INTERVAL_MS: Bound = Bound::new("proxy_poll_interval_ms", 1, 1000, 2);
/// After a replica connection fails, a session reads the primary this long before trying
/// the replica again (so an outage does not add a connect timeout to every read).
pub const PROXY_REPLICA_RETRY_MS: Bound = Bound::new("proxy_replica_retry_ms", 0, 600_000, 1000);
/// Distinct normalized queries the proxy's audit keeps counts for; reads of any later one
/// are counted together (about 1 KB each with its text, so 1 MB at the default).
pub const PROXY_AUDIT_QUERIES: Bound = Bound::new("proxy_audit_queries", 1, 100_000, 1000);
/// `lagprobe proxy`'s runtime worker threads. One, like PgBouncer: a proxy mostly waits
/// for sockets, and on a busy machine every extra thread it wakes waits for a core; the
/// bench measured one worker ahead of two in both query modes (pgbench -S, 2 shared cores).
pub const PROXY_THREADS: Bound = Bound::new("proxy_threads", 1, 256, 1);
/// The default proxy address (PgBouncer's port).
pub const PROXY_ADDR: &str = "127.0.0.1:6432";

/// Checks that `text` has at most `bound.max` characters (and at least `bound.min`), and no
/// NUL: PostgreSQL's text cannot hold one, and the database's refusal would read as an
/// outage (UNAVAILABLE, which gRPC clients retry) instead of the caller's mistake.
pub fn check_text(bound: &Bound, text: &str) -> Result<(), Invalid> {
    if text.contains('\0') {
        return Err(Invalid::new(
            bound.field,
            "contains a NUL byte, which PostgreSQL text cannot hold",
        ));
    }
    let chars = text.chars().count() as u64;
    if chars < bound.min {
        return Err(Invalid::new(bound.field, "must not be empty"));
    }
    if chars > bound.max {
        return Err(Invalid::new(
            bound.field,
            format!("{chars} characters; at most {}", bound.max),
        ));
    }
    Ok(())
}

/// A read-your-writes strategy: where a read goes after a write, and how it sees that
/// write. A setting (the server's default) as much as a request field, hence here; the
/// routing itself lives in the probe engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    Replica,
    Primary,
    PinWindow,
    LsnWait,
    LsnRoute,
    RemoteApply,
}

impl Strategy {
    pub const ALL: [Strategy; 6] = [
        Strategy::Replica,
        Strategy::Primary,
        Strategy::PinWindow,
        Strategy::LsnWait,
        Strategy::LsnRoute,
        Strategy::RemoteApply,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Replica => "replica",
            Strategy::Primary => "primary",
            Strategy::PinWindow => "pin-window",
            Strategy::LsnWait => "lsn-wait",
            Strategy::LsnRoute => "lsn-route",
            Strategy::RemoteApply => "remote-apply",
        }
    }

    /// Parses a strategy name; errors name `field`.
    pub fn parse_field(text: &str, field: &'static str) -> Result<Self, Invalid> {
        Strategy::ALL
            .into_iter()
            .find(|strategy| strategy.name() == text)
            .ok_or_else(|| {
                let names: Vec<_> = Strategy::ALL.iter().map(|s| s.name()).collect();
                Invalid::new(
                    field,
                    format!("{text:?} is not one of {}", names.join(", ")),
                )
            })
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Self, Invalid> {
        Strategy::parse_field(text, "strategy")
    }
}

/// The proxy's strategies: the probe engine's six, plus `global`, where every replica read
/// first waits for the replica to replay the primary's position at the moment the read
/// started (read-your-writes across connections, MaxScale's `causal_reads=universal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyStrategy {
    Probe(Strategy),
    Global,
}

impl ProxyStrategy {
    pub fn name(self) -> &'static str {
        match self {
            ProxyStrategy::Probe(strategy) => strategy.name(),
            ProxyStrategy::Global => "global",
        }
    }

    /// Parses a strategy name; errors name `field`.
    pub fn parse_field(text: &str, field: &'static str) -> Result<Self, Invalid> {
        if text == "global" {
            return Ok(ProxyStrategy::Global);
        }
        Strategy::parse_field(text, field)
            .map(ProxyStrategy::Probe)
            .map_err(|error| Invalid::new(field, format!("{}, or global", error.reason)))
    }
}

impl fmt::Display for ProxyStrategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ProxyStrategy {
    type Err = Invalid;

    fn from_str(text: &str) -> Result<Self, Invalid> {
        ProxyStrategy::parse_field(text, "proxy_strategy")
    }
}

/// A secret that never shows in `Debug` output or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The PostgreSQL-protocol proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    /// Where clients connect; `None` turns the proxy off.
    pub addr: Option<SocketAddr>,
    /// Sessions start with this strategy (`SET lagprobe.strategy` changes a session's).
    pub strategy: ProxyStrategy,
    /// Clients must prove they know this password (SCRAM-SHA-256); required when `addr`
    /// is not loopback.
    pub password: Option<Secret>,
    pub max_message_bytes: usize,
    pub connect_timeout: Duration,
    pub startup_timeout: Duration,
    pub poll_interval: Duration,
    pub replica_retry: Duration,
    /// The audit's cap on distinct fingerprints ([`PROXY_AUDIT_QUERIES`]).
    pub audit_queries: usize,
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            addr: Some(ANY_LOOPBACK_PORT),
            strategy: ProxyStrategy::Probe(Strategy::Replica),
            password: None,
            max_message_bytes: PROXY_MAX_MESSAGE_BYTES.default as usize,
            connect_timeout: PROXY_CONNECT_TIMEOUT_MS.default_duration(),
            startup_timeout: PROXY_STARTUP_TIMEOUT_MS.default_duration(),
            poll_interval: PROXY_POLL_INTERVAL_MS.default_duration(),
            replica_retry: PROXY_REPLICA_RETRY_MS.default_duration(),
            audit_queries: PROXY_AUDIT_QUERIES.default as usize,
        }
    }
}

impl ProxySettings {
    /// Ranges, and no trust authentication off loopback.
    pub fn validate(&self) -> Result<(), Invalid> {
        PROXY_MAX_MESSAGE_BYTES.check(Some(self.max_message_bytes as u64))?;
        PROXY_CONNECT_TIMEOUT_MS.check_duration(self.connect_timeout)?;
        PROXY_STARTUP_TIMEOUT_MS.check_duration(self.startup_timeout)?;
        PROXY_POLL_INTERVAL_MS.check_duration(self.poll_interval)?;
        PROXY_REPLICA_RETRY_MS.check_duration(self.replica_retry)?;
        PROXY_AUDIT_QUERIES.check(Some(self.audit_queries as u64))?;
        match self.addr {
            Some(addr) if !addr.ip().is_loopback() && self.password.is_none() => Err(Invalid::new(
                "proxy_addr",
                format!(
                    "{addr} is not a loopback address: set LAGPROBE_PROXY_PASSWORD, or \
                         listen on 127.0.0.1"
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// How the pools connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolSettings {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_connections: POOL_SIZE.default as u32,
            acquire_timeout: ACQUIRE_TIMEOUT_MS.default_duration(),
        }
    }
}

/// What a request gets when it names no strategy or strategy setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StrategyDefaults {
    pub strategy: Strategy,
    pub pin_window: Duration,
    pub lsn_wait_timeout: Duration,
}

impl Default for StrategyDefaults {
    fn default() -> Self {
        StrategyDefaults {
            strategy: Strategy::Replica,
            pin_window: PIN_WINDOW_MS.default_duration(),
            lsn_wait_timeout: LSN_WAIT_TIMEOUT_MS.default_duration(),
        }
    }
}

/// How to build the embedded lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSettings {
    /// Directory with initdb/postgres/pg_basebackup; found automatically when `None`.
    pub pg_bindir: Option<PathBuf>,
    /// Keep the clusters here across runs; a temporary directory (removed on exit) when `None`.
    pub data_dir: Option<PathBuf>,
    /// One-way delay from primary to replica once the lab is up.
    pub delay: Duration,
    /// What the delay link holds per connection and direction at most ([`LINK_BUFFER_MB`]).
    pub link_buffer_bytes: u64,
    /// Loopback ports; 0 picks a free one. Replica `i` (from 0) gets `replica_port + i`.
    pub primary_port: u16,
    pub replica_port: u16,
    /// Streaming replicas, all behind the one delay link ([`REPLICAS`]).
    pub replicas: u8,
    /// Name every replica in `synchronous_standby_names`, so that `remote_apply` commits wait
    /// for them. The server default becomes `synchronous_commit = local`, so ordinary writes
    /// still do not wait: only writes that ask for remote_apply do.
    pub sync_replica: bool,
    /// Where initialised clusters are kept as templates, one per PostgreSQL binary set, so
    /// that a lab copies one instead of running initdb; `None`: initdb every time.
    pub cache_dir: Option<PathBuf>,
    /// The last replica streams straight from the primary, not through the delay link: a
    /// measurement aid (the bench's D = 0 floor compares it with a linked replica on the same
    /// storage). Needs at least two replicas, so that one still crosses the link.
    pub direct_replica: bool,
}

/// The user's cache folder for lagprobe: `$LAGPROBE_CACHE_DIR`, else `/var/cache/lagprobe`
/// for root (the lab's servers run as another user, who cannot enter `/root`), else
/// `$XDG_CACHE_HOME/lagprobe` or `~/.cache/lagprobe`. `scripts/pg-binaries` uses the same.
pub fn default_cache_dir() -> Option<PathBuf> {
    let from_env = |name| std::env::var_os(name).filter(|value| !value.is_empty());
    if let Some(dir) = from_env("LAGPROBE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from("/var/cache/lagprobe"));
    }
    let base = from_env("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| from_env("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
    Some(base.join("lagprobe"))
}

impl Default for LabSettings {
    fn default() -> Self {
        LabSettings {
            pg_bindir: None,
            data_dir: None,
            cache_dir: default_cache_dir(),
            delay: DELAY_MS.default_duration(),
            link_buffer_bytes: LINK_BUFFER_MB.default * MIB,
            primary_port: 0,
            replica_port: 0,
            replicas: REPLICAS.default as u8,
            sync_replica: false,
            direct_replica: false,
        }
    }
}

impl LabSettings {
    /// A default lab with this delay.
    pub fn with_delay(delay: Duration) -> Self {
        LabSettings {
            delay,
            ..LabSettings::default()
        }
    }

    pub fn validate(&self) -> Result<(), Invalid> {
        REPLICAS.check(Some(u64::from(self.replicas)))?;
        DELAY_MS.check_duration(self.delay)?;
        LINK_BUFFER_MB.check_mib(self.link_buffer_bytes)?;
        if self.direct_replica && self.replicas < 2 {
            return Err(Invalid::new(
                "direct_replica",
                format!(
                    "a replica without the delay link needs a second one behind it, and the lab \
                     has {} replica(s)",
                    self.replicas
                ),
            ));
        }
        Ok(())
    }
}

/// The databases the service probes: someone else's, or a lab it starts itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseSettings {
    External {
        primary_url: String,
        replica_urls: Vec<String>,
    },
    Lab(LabSettings),
}

/// Everything the service needs to start (`lagprobe serve` and `lagprobe lab`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub databases: DatabaseSettings,
    /// The `/test/` page, JSON API and health; port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// `lagprobe.v1.ConsistencyProbe`, reflection and health.
    pub grpc_addr: SocketAddr,
    /// Apply lagprobe's migrations on the primary at start.
    pub migrate: bool,
    /// Move the heartbeat row this often; `None`: write nothing unasked.
    pub heartbeat: Option<Duration>,
    pub pool: PoolSettings,
    pub defaults: StrategyDefaults,
    /// The PostgreSQL-protocol proxy in front of the same databases.
    pub proxy: ProxySettings,
    /// Probes kept for the `/test/` page's history ([`PROBE_HISTORY`]).
    pub probe_history: usize,
}

/// The default HTTP address (the old demo's port).
pub const HTTP_ADDR: &str = "127.0.0.1:8000";
/// The default gRPC address.
pub const GRPC_ADDR: &str = "127.0.0.1:50051";
/// Loopback, any free port: what tests and the benchmark bind to.
pub const ANY_LOOPBACK_PORT: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl Settings {
    /// Defaults everywhere, serving on free loopback ports: the zero2prod way for tests
    /// and the benchmark.
    pub fn on_free_ports(databases: DatabaseSettings) -> Self {
        Settings {
            databases,
            http_addr: ANY_LOOPBACK_PORT,
            grpc_addr: ANY_LOOPBACK_PORT,
            migrate: true,
            heartbeat: Some(HEARTBEAT_MS.default_duration()),
            pool: PoolSettings::default(),
            defaults: StrategyDefaults::default(),
            proxy: ProxySettings::default(),
            probe_history: PROBE_HISTORY.default as usize,
        }
    }

    /// Checks what the types cannot: ranges, and at least one replica.
    pub fn validate(&self) -> Result<(), Invalid> {
        match &self.databases {
            DatabaseSettings::External { replica_urls, .. } if replica_urls.is_empty() => {
                return Err(Invalid::new(
                    "replica_url",
                    "at least one replica is needed",
                ));
            }
            DatabaseSettings::External { .. } => {}
            DatabaseSettings::Lab(lab) => lab.validate()?,
        }
        POOL_SIZE.check(Some(u64::from(self.pool.max_connections)))?;
        ACQUIRE_TIMEOUT_MS.check_duration(self.pool.acquire_timeout)?;
        if let Some(heartbeat) = self.heartbeat {
            HEARTBEAT_MS.check_duration(heartbeat)?;
        }
        PIN_WINDOW_MS.check_duration(self.defaults.pin_window)?;
        LSN_WAIT_TIMEOUT_MS.check_duration(self.defaults.lsn_wait_timeout)?;
        self.proxy.validate()?;
        PROBE_HISTORY.check(Some(self.probe_history as u64))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_replica_needs_a_linked_one_beside_it() {
        let direct = |replicas| LabSettings {
            replicas,
            direct_replica: true,
            ..LabSettings::default()
        };
        let refused = direct(1).validate().unwrap_err();
        assert_eq!(refused.field, "direct_replica");
        assert_eq!(direct(2).validate(), Ok(()));
    }

    #[test]
    fn bounds_default_check_and_name_their_field() {
        assert_eq!(COUNT.check(None), Ok(1));
        assert_eq!(COMPARE_COUNT.check(None), Ok(10));
        assert_eq!(CONCURRENCY.check(Some(256)), Ok(256));
        let error = CONCURRENCY.check(Some(257)).unwrap_err();
        assert_eq!(error.field, "concurrency");
        assert!(error.to_string().contains("1..=256"), "{error}");
        assert_eq!(
            DELAY_MS
                .check_duration(Duration::from_secs(601))
                .unwrap_err()
                .field,
            "delay_ms"
        );
        assert!(check_text(&CLIENT_ID_CHARS, &"x".repeat(201)).is_err());
        assert!(check_text(&KEY_CHARS, "").is_err());
        assert_eq!(check_text(&VALUE_CHARS, "a\0b").unwrap_err().field, "value");
    }

    #[test]
    fn strategy_names_round_trip_and_unknown_names_are_rejected() {
        for strategy in Strategy::ALL {
            assert_eq!(strategy.name().parse::<Strategy>().unwrap(), strategy);
            let json = serde_json::to_string(&strategy).unwrap();
            assert_eq!(json, format!("\"{}\"", strategy.name()));
        }
        let error = "lsn_wait".parse::<Strategy>().unwrap_err();
        assert_eq!(error.field, "strategy");
        assert!(error.to_string().contains("lsn-wait"), "{error}");
    }

    #[test]
    fn settings_need_a_replica_and_lab_sizes_in_range() {
        let external = |replica_urls: Vec<String>| {
            Settings::on_free_ports(DatabaseSettings::External {
                primary_url: "postgres://p/db".into(),
                replica_urls,
            })
        };
        assert_eq!(
            external(vec![]).validate().unwrap_err().field,
            "replica_url"
        );
        assert!(external(vec!["postgres://r/db".into()]).validate().is_ok());
        let lab = LabSettings {
            replicas: 10,
            ..LabSettings::default()
        };
        let settings = Settings::on_free_ports(DatabaseSettings::Lab(lab));
        assert_eq!(settings.validate().unwrap_err().field, "replicas");
        let no_buffer = LabSettings {
            link_buffer_bytes: MIB - 1,
            ..LabSettings::default()
        };
        let settings = Settings::on_free_ports(DatabaseSettings::Lab(no_buffer));
        assert_eq!(settings.validate().unwrap_err().field, "link_buffer_mb");
        assert_eq!(LINK_BUFFER_MB.check_mib(64 * MIB), Ok(64 * MIB));
        assert!(LINK_BUFFER_MB.check_mib(16_385 * MIB).is_err());
    }
}
