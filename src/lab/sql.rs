//! The lab's own SQL: the statements that bootstrap a fresh cluster and tell the lab when
//! its servers are ready. Every statement the lab sends is here, so they are easy to review
//! against the oldest server version the lab supports.
//!
//! They are not in `db/` on purpose: the layering is settings -> lab -> db -> probe, and the
//! lab sits below db, so it must not import it. These statements are about running the
//! cluster, not about anything lagprobe measures, and they go over single connections the
//! lab opens itself rather than db's pools.

/// Whether a database named `$1` exists.
pub(super) const DATABASE_EXISTS: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)";

/// Creates the lab's database. A literal: sqlx refuses built SQL strings, and the name is
/// the constant [`super::LAB_DATABASE`] anyway (a unit test checks they agree).
pub(super) const CREATE_LAB_DATABASE: &str = "CREATE DATABASE lagprobe";

/// On a replica: its WAL receiver's status (`streaming` once it follows the primary).
pub(super) const WAL_RECEIVER_STATUS: &str = "SELECT status FROM pg_stat_wal_receiver LIMIT 1";

/// Any server: its data directory, to tell the lab's own server from another one that
/// holds the same port.
pub(super) const DATA_DIRECTORY: &str = "SELECT current_setting('data_directory')";

/// On the primary: how many standbys it treats as synchronous.
pub(super) const SYNCHRONOUS_STANDBYS: &str =
    "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'";

/// On the primary: where its WAL ends now, as text (the target replicas must replay to).
pub(super) const CURRENT_WAL_LSN: &str = "SELECT pg_current_wal_lsn()::text";

/// On a replica: whether it has replayed up to the position `$1` (text); NULL while it has
/// replayed nothing.
pub(super) const REPLAYED_UP_TO: &str = "SELECT pg_last_wal_replay_lsn() >= $1::text::pg_lsn";

/// On a replica: where its replay has got, as text (NULL when it replayed nothing).
pub(super) const REPLAY_LSN: &str = "SELECT pg_last_wal_replay_lsn()::text";

/// On a replica: promotes it and waits up to `$1` seconds; true once it is a primary.
pub(super) const PROMOTE: &str = "SELECT pg_promote(true, $1)";

/// Any server: whether it is in recovery, its replay position (replica) or WAL end
/// (primary) as text, and its WAL receiver's status.
pub(super) const WAL_POSITION: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END::text, \
     (SELECT status FROM pg_stat_wal_receiver LIMIT 1)";
