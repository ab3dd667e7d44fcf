//! The crate's error type: each layer's own error (settings, lab, databases) wrapped, plus
//! what the service adds, and the one classification every transport maps to its own
//! status codes (gRPC in `grpc/`, HTTP in `http/`).

use std::borrow::Cow;

use crate::{db::DbError, lab::LabError, settings::Invalid};

/// Everything that can go wrong in lagprobe's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input out of range or malformed; its `field` names it as the caller spelled it.
    #[error(transparent)]
    InvalidArgument(#[from] Invalid),

    /// A database could not be reached, failed a query or its migrations.
    #[error(transparent)]
    Database(#[from] DbError),

    /// The embedded lab cluster failed.
    #[error(transparent)]
    Lab(#[from] LabError),

    /// The request makes sense, but not on this server (e.g. lab-only calls without a lab).
    #[error("{0}")]
    FailedPrecondition(String),

    /// No such resource (an unknown HTTP path).
    #[error("not found")]
    NotFound,

    /// A request larger than a transport reads (an HTTP body over its limit).
    #[error("the request {what} is over the limit of {limit_bytes} bytes")]
    TooLarge {
        what: &'static str,
        limit_bytes: usize,
    },

    /// A socket or file operation failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// How a transport should present an [`Error`]: the single place that decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    Unavailable,
    FailedPrecondition,
    NotFound,
    TooLarge,
    Internal,
}

impl Error {
    pub fn invalid(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Error::InvalidArgument(Invalid::new(field, reason))
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Error::Database(error) if error.is_unavailable() => ErrorKind::Unavailable,
            Error::FailedPrecondition(_)
            | Error::Lab(LabError::WrongState(_))
            | Error::Database(DbError::NoReplica) => ErrorKind::FailedPrecondition,
            Error::Lab(LabError::NoSuchServer { .. }) => ErrorKind::NotFound,
            Error::NotFound => ErrorKind::NotFound,
            Error::TooLarge { .. } => ErrorKind::TooLarge,
            Error::Database(_) | Error::Lab(_) | Error::Io { .. } => ErrorKind::Internal,
        }
    }

    /// Logs a failed request once, where a transport maps it to its status: the caller's
    /// mistakes and outages at warn with the field, lagprobe's own failures at error.
    /// Messages never hold a password: URLs are redacted before they reach an error.
    pub fn log_request_failure(&self, transport: &'static str) {
        let field = self.field().unwrap_or("");
        match self.kind() {
            ErrorKind::Internal => tracing::error!(transport, error = %self, "request failed"),
            ErrorKind::NotFound if field.is_empty() => {
                tracing::debug!(transport, error = %self, "not found")
            }
            _ => tracing::warn!(transport, field, error = %self, "request refused"),
        }
    }

    /// The field an [`ErrorKind::InvalidArgument`] error is about.
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidArgument(invalid) => Some(&invalid.field),
            Error::Lab(LabError::NoSuchServer { field, .. }) => Some(field),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
