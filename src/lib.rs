//! lagprobe makes read-after-write anomalies between a PostgreSQL primary and its streaming
//! replicas visible, measurable and fixable.
//!
//! Data flows one way through the modules, and each imports only modules above it in this
//! list (`.ci/check-layers.sh` checks it on every CI run):
//!
//! | module | what it is for |
//! |---|---|
//! | [`settings`] | every default and bound, the strategy names, and the [`Settings`](settings::Settings) the library starts from, validated once |
//! | `lab` (optional) | an embedded primary and streaming replicas from the local PostgreSQL binaries, with a [`DelayLink`] holding the WAL stream back; [`Lab`] |
//! | `db` | the pools and every SQL statement a probe sends: [`Databases`] |
//! | `error` | the crate's [`Error`] (each layer's own error wrapped) and the one [`ErrorKind`] the transports map to their codes |
//! | `probe` | one probe (write, commit, read back where a strategy says, wait for visibility), runs, comparisons, streams, statistics, the strategies: [`ProbeEngine`] |
//! | [`service`] | what every transport calls, with one request type per kind of request |
//! | `grpc`, `http`, `proxy` | the transports: `lagprobe.v1.ConsistencyProbe` with reflection and health ([`pb`] is its generated code); the `/test/` page, JSON API, health and metrics; and the PostgreSQL-protocol proxy that splits reads from writes with a read-your-writes strategy ([`ProxyHandle`]) |
//! | [`server`] | builds the whole app from settings and starts the transports; the only module that imports them |
//!
//! The CLI, the benchmark and the container health check are the binary's (`src/cli/`).
//! `lsn` ([`Lsn`], WAL positions) is a leaf any layer may use. Modules are private; what a
//! caller needs is re-exported here, so the compiler reports anything nothing uses.

mod db;
mod error;
mod grpc;
mod http;
mod lab;
mod lsn;
mod probe;
mod proxy;
pub mod server;
pub mod service;
pub mod settings;

pub use db::{Databases, DbError, Replica, Role, TopologyUrls, bench_sql, migrate, redact_url};
pub use error::{Error, ErrorKind, Result};
pub use grpc::pb;
pub use lab::{BufferStats, DelayControl, DelayLink, DelaySettings, Lab, LabError, PgBinaries};
pub use lsn::{Lsn, LsnParseError};
pub use probe::{
    CompareReport, LagMeasures, LagReport, Percentiles, ProbeEngine, ProbeOptions, ProbeResult,
    ReadOutcome, ReplicaLag, ReplicaSummary, RunReport, RunSummary, ServedBy, StrategyReport,
    Verdict, VisibilityPoint, WaitMethod, WriteOutcome, markdown_table,
};
pub use proxy::ProxyHandle;
pub use service::ProxyCounts;
