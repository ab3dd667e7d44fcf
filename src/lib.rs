//! lagprobe makes read-after-write anomalies between a PostgreSQL primary and its streaming
//! replicas visible, measurable and fixable.
//!
//! Data flows one way through the modules, and each imports only modules before it in this
//! list (checked by `.ci/check-layers.sh`):
//!
//! - [`settings`]: every default and bound, the strategy names, and the settings the
//!   library starts from, validated once.
//! - [`lab`] (optional): an embedded primary and streaming replicas started from the local
//!   PostgreSQL binaries, with a delay link holding the WAL stream back.
//! - [`db`]: the primary and replica pools, and every SQL statement a probe sends.
//! - [`error`]: the crate's error type (each layer's own errors wrapped) and the one
//!   classification the transports map to their status codes.
//! - [`probe`]: one probe (write, commit, read back where a strategy says, wait for
//!   visibility), runs, comparisons and streams of them, their statistics, the strategies.
//! - [`service`]: what every transport calls, with one request type per kind of request.
//! - transports: gRPC (`lagprobe.v1.ConsistencyProbe`, reflection, health; [`grpc::pb`] is
//!   its generated code) and HTTP (the `/test/` page, JSON, health, metrics).
//! - [`server`]: builds the whole app from [`settings::Settings`] and starts the
//!   transports; the only module that imports them.
//! - the CLI, the benchmark and the container health check live in the binary.
//!
//! [`lsn`] (WAL positions) is a leaf that any layer may use.

pub mod db;
pub mod error;
pub mod grpc;
mod http;
pub mod lab;
pub mod lsn;
pub mod probe;
pub mod server;
pub mod service;
pub mod settings;

pub use error::{Error, Result};
