//! lagprobe makes read-after-write anomalies between a PostgreSQL primary and its streaming
//! replica visible, measurable and fixable.
//!
//! Data flows one way through the modules:
//!
//! - [`config`]: settings from flags and `LAGPROBE_*` environment variables.
//! - [`lab`] (optional): an embedded primary and streaming replica started from the local
//!   PostgreSQL binaries, with a [delay link](lab::delay_link) holding the WAL stream back.
//! - [`db`]: the primary and replica pools, and every SQL statement lagprobe sends.
//! - [`probe`]: one probe (write, commit, read back, wait for visibility), runs of many, and
//!   their statistics.
//! - [`app`]: the state the transports share and the servers that carry them.
//! - transports: [`grpc`] (`lagprobe.v1.ConsistencyProbe`, reflection, health) and [`http`]
//!   (the `/test/` page, JSON, health); the CLI lives in the binary.
//!
//! Supporting modules: [`lsn`] (WAL positions), [`error`] (the error type every transport
//! maps in one place), [`telemetry`] (logging), [`healthcheck`] (a dependency-free HTTP
//! probe for container health checks), [`bench`] (the benchmark behind the speed and memory
//! targets).

pub mod app;
pub mod bench;
pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod healthcheck;
pub mod http;
pub mod lab;
pub mod lsn;
pub mod probe;
pub mod telemetry;

pub use error::{Error, Result};
