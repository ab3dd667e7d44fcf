//! The library's error type, and the one classification every transport maps to its own
//! status codes (gRPC in `grpc.rs`, HTTP in `http/`).

use crate::lab::LabError;

/// Which database an operation talked to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Primary,
    Replica,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// Everything that can go wrong in lagprobe's library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input out of range or malformed; `field` names it as the caller spelled it.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// A database could not be reached or failed a query.
    #[error("{role} database: {source}")]
    Database {
        role: Role,
        #[source]
        source: sqlx::Error,
    },

    /// Schema migrations on the primary failed.
    #[error("migrations on the primary failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),

    /// A database URL could not be understood.
    #[error("invalid {role} database URL: {reason}")]
    DatabaseUrl { role: Role, reason: String },

    /// The embedded lab cluster failed.
    #[error(transparent)]
    Lab(#[from] LabError),

    /// The request makes sense, but not on this server (e.g. lab-only calls without a lab).
    #[error("{0}")]
    FailedPrecondition(String),

    /// No such resource (an unknown HTTP path).
    #[error("not found")]
    NotFound,

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
    Internal,
}

impl Error {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn database(role: Role) -> impl FnOnce(sqlx::Error) -> Self {
        move |source| Error::Database { role, source }
    }

    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::InvalidArgument { .. } => ErrorKind::InvalidArgument,
            Error::Database { .. } => ErrorKind::Unavailable,
            Error::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            Error::NotFound => ErrorKind::NotFound,
            Error::Migrate(_) | Error::DatabaseUrl { .. } | Error::Lab(_) | Error::Io { .. } => {
                ErrorKind::Internal
            }
        }
    }

    /// The field an [`ErrorKind::InvalidArgument`] error is about.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Error::InvalidArgument { field, .. } => Some(field),
            _ => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
