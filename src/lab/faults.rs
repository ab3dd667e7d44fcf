//! Faults on command: stopping, starting, killing and restarting the lab's servers, failing
//! over to a replica, and the status report that shows what came of it.
//!
//! Operations run one at a time (a second waits for the first), each on a server named as
//! the status report names it. Nothing here restarts a server by itself: a lab is where
//! people break things on purpose, and a server that came back unasked would hide what
//! they are looking at.

use std::{sync::Arc, time::Duration};

use serde::Serialize;
use sqlx::Row;

use super::{
    DelaySettings, LAB_DATABASE, Lab, LabError, NodeState, PgNode, Server, ServerRole, StopMode,
    connect, lab_connect_options, primary_args, replica_args, sql,
};
use crate::lsn::Lsn;

/// Every server of the lab and its delay link, as they are now.
#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub servers: Vec<ServerStatus>,
    pub link: DelaySettings,
}

/// One server: what it is, whether it runs, and how far it has got in the WAL.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    pub name: String,
    pub role: ServerRole,
    pub port: u16,
    pub state: NodeState,
    /// The postmaster's pid while it runs.
    pub pid: Option<i32>,
    /// How the process ended, once it has.
    pub exit_status: Option<String>,
    /// The end of the server's log, once it has ended: why it stopped.
    pub log_tail: Option<String>,
    /// A replica's `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// The primary's `pg_current_wal_lsn()`.
    pub wal_lsn: Option<Lsn>,
    /// A replica's WAL receiver is `streaming`.
    pub streaming: Option<bool>,
    /// The status query's failure on a server that runs but does not answer (yet).
    pub error: Option<String>,
}

/// What a failover did.
#[derive(Debug, Clone, Serialize)]
pub struct Promotion {
    pub promoted: String,
    pub former_primary: String,
    /// The promoted replica's `pg_last_wal_replay_lsn()` after the primary died and before
    /// promotion: every commit past it was lost.
    pub replay_lsn_at_promotion: Option<Lsn>,
    /// The former primary came back as a standby of the new one.
    pub rejoined: bool,
    /// From the kill to the promoted server accepting writes, in ms.
    pub took_ms: f64,
}

/// How long a status query may take on a server that is up.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a promotion may take (pg_promote's own wait).
const PROMOTE_TIMEOUT_S: i32 = 60;

impl Lab {
    /// Every server's state, role, pid and WAL position, and the link's settings.
    pub async fn status(&self) -> LabStatus {
        let mut servers = Vec::new();
        for server in self.servers() {
            servers.push(server_status(&server).await);
        }
        LabStatus {
            servers,
            link: self.link.control().settings(),
        }
    }

    /// Every server's name, role, port and state as the lab's supervision knows them,
    /// without asking the servers anything (no positions, no log tails): cheap enough for
    /// every view of the `/test/` page, where [`Lab::status`] opens a connection per server.
    pub fn server_states(&self) -> Vec<ServerStatus> {
        let status = |server: &Server| {
            let state = server.node.state();
            ServerStatus {
                name: server.name.to_owned(),
                role: server.role,
                port: server.port,
                state,
                pid: (state == NodeState::Running).then_some(server.node.pid),
                exit_status: server.node.exit_status().map(|status| status.to_string()),
                log_tail: None,
                replay_lsn: None,
                wal_lsn: None,
                streaming: None,
                error: None,
            }
        };
        self.servers().iter().map(status).collect()
    }

    /// Stops a running server (`fast`: sessions rolled back and a checkpoint; `immediate`:
    /// at once, crash recovery on the next start).
    pub async fn stop_server(&self, name: &str, mode: StopMode) -> Result<ServerStatus, LabError> {
        let _operation = self.begin().await?;
        let server = self.server_named("name", name)?;
        require_running(&server)?;
        server.node.stop(mode).await;
        tracing::info!(server = server.name, ?mode, "lab server stopped on request");
        Ok(server_status(&server).await)
    }

    /// SIGKILL to a running server's postmaster and its processes: a crash.
    pub async fn kill_server(&self, name: &str) -> Result<ServerStatus, LabError> {
        let _operation = self.begin().await?;
        let server = self.server_named("name", name)?;
        require_running(&server)?;
        server.node.kill().await;
        tracing::info!(server = server.name, "lab server killed on request");
        Ok(server_status(&server).await)
    }

    /// Starts a stopped server again, in its role, on its port; returns once it accepts
    /// connections (a replica may still be connecting to its primary).
    pub async fn start_server(&self, name: &str) -> Result<ServerStatus, LabError> {
        let _operation = self.begin().await?;
        let server = self.server_named("name", name)?;
        if server.node.exit_status().is_none() {
            return Err(LabError::WrongState(format!(
                "{} is already running (pid {})",
                server.name, server.node.pid
            )));
        }
        let server = self.start_process(&server).await?;
        Ok(server_status(&server).await)
    }

    /// Stops a server if it runs (in `mode`), then starts it again.
    pub async fn restart_server(
        &self,
        name: &str,
        mode: StopMode,
    ) -> Result<ServerStatus, LabError> {
        let _operation = self.begin().await?;
        let server = self.server_named("name", name)?;
        server.node.stop(mode).await;
        let server = self.start_process(&server).await?;
        Ok(server_status(&server).await)
    }

    /// Kills the primary, promotes the replica `promote`, and points the delay link (so
    /// every other replica's streaming) at it. The bytes the link held die with the old
    /// primary, as a queue on its egress would. The old primary stays down, as
    /// [`ServerRole::FormerPrimary`], until [`Lab::rejoin`].
    pub async fn failover(&self, promote: &str) -> Result<Promotion, LabError> {
        let _operation = self.begin().await?;
        let target = self.server_named("promote", promote)?;
        if target.role != ServerRole::Replica {
            return Err(LabError::WrongState(format!(
                "{} is not a replica ({:?}): promote one of the replicas",
                target.name, target.role
            )));
        }
        require_running(&target)?;
        let former = self.primary();
        let started = std::time::Instant::now();
        former.node.kill().await;
        self.link.redirect(None);
        let replay_lsn_at_promotion = promote_replica(&target.node).await?;
        self.set_role(target.name, ServerRole::Primary);
        self.set_role(former.name, ServerRole::FormerPrimary);
        self.link
            .redirect(Some(format!("127.0.0.1:{}", target.port)));
        let took = started.elapsed();
        tracing::warn!(
            promoted = target.name,
            former_primary = former.name,
            replay_lsn = ?replay_lsn_at_promotion,
            ?took,
            "failover: the primary was killed and a replica promoted"
        );
        Ok(Promotion {
            promoted: target.name.to_owned(),
            former_primary: former.name.to_owned(),
            replay_lsn_at_promotion,
            rejoined: false,
            took_ms: took.as_secs_f64() * 1000.0,
        })
    }

    /// Brings a former primary back: its data directory rebuilt as a copy of the primary,
    /// started as a replica streaming through the delay link.
    pub async fn rejoin(&self, name: &str) -> Result<(), LabError> {
        let _operation = self.begin().await?;
        let server = self.server_named("name", name)?;
        if server.role != ServerRole::FormerPrimary || server.node.exit_status().is_none() {
            return Err(LabError::WrongState(format!(
                "only a former primary that is down rejoins; {} is {:?}, {:?}",
                server.name,
                server.role,
                server.node.state()
            )));
        }
        let name = server.name;
        let data_dir = self.root.join(name);
        tokio::fs::remove_dir_all(&data_dir)
            .await
            .map_err(LabError::io(format!("removing {}", data_dir.display())))?;
        self.programs()
            .base_backup(self.primary().port, &data_dir)
            .await?;
        self.set_role(name, ServerRole::Replica);
        let server = self.server_named("name", name)?;
        self.start_process(&server).await?;
        tracing::info!(server = name, "former primary rejoined as a replica");
        Ok(())
    }

    /// The operation lock, unless the lab is shutting down.
    async fn begin(&self) -> Result<tokio::sync::MutexGuard<'_, ()>, LabError> {
        let operation = self.operation.lock().await;
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(LabError::WrongState("the lab is shutting down".into()));
        }
        Ok(operation)
    }

    /// The server called `name`; `field` is the request field that named it.
    fn server_named(&self, field: &'static str, name: &str) -> Result<Server, LabError> {
        let servers = self.servers();
        let found = servers.iter().find(|server| server.name == name).cloned();
        found.ok_or_else(|| LabError::NoSuchServer {
            field,
            name: name.to_owned(),
            known: servers
                .iter()
                .map(|server| server.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    fn set_role(&self, name: &str, role: ServerRole) {
        for server in self.lock_servers().iter_mut() {
            if server.name == name {
                server.role = role;
            }
        }
    }

    /// Starts `server`'s postmaster as its role wants and puts the new process in its place.
    async fn start_process(&self, server: &Server) -> Result<Server, LabError> {
        let args = match server.role {
            ServerRole::Primary => {
                let replicas = self.replicas();
                let standbys: Vec<&str> = replicas.iter().map(|replica| replica.name).collect();
                primary_args(&standbys, self.sync_replica)
            }
            ServerRole::Replica => replica_args(self.upstream_of(server.name), server.name),
            ServerRole::FormerPrimary => {
                return Err(LabError::WrongState(format!(
                    "{} was the primary before a failover and its WAL has diverged; fail \
                     over with \"rejoin\": true to bring it back as a copy of the new primary",
                    server.name
                )));
            }
        };
        let data_dir = self.root.join(server.name);
        let node = self
            .programs()
            .start_node(server.name, &data_dir, server.port, &args, LAB_DATABASE)
            .await?;
        tracing::info!(
            server = server.name,
            pid = node.pid,
            "lab server started on request"
        );
        let mut servers = self.lock_servers();
        let slot = servers
            .iter_mut()
            .find(|slot| slot.name == server.name)
            .expect("servers are never removed");
        slot.node = node;
        Ok(slot.clone())
    }
}

fn require_running(server: &Server) -> Result<(), LabError> {
    match server.node.state() {
        NodeState::Running => Ok(()),
        state => Err(LabError::WrongState(format!(
            "{} is not running ({state:?})",
            server.name
        ))),
    }
}

/// Reads the replica's replay position, then promotes it and waits for the promotion.
async fn promote_replica(node: &Arc<PgNode>) -> Result<Option<Lsn>, LabError> {
    let mut connection = connect(node).await?;
    let replay_lsn: Option<String> = sqlx::query_scalar(sql::REPLAY_LSN)
        .fetch_one(&mut connection)
        .await
        .map_err(LabError::sql(node.name))?;
    let promoted: bool = sqlx::query_scalar(sql::PROMOTE)
        .bind(PROMOTE_TIMEOUT_S)
        .fetch_one(&mut connection)
        .await
        .map_err(LabError::sql(node.name))?;
    if !promoted {
        return Err(LabError::WrongState(format!(
            "{} did not finish promotion within {PROMOTE_TIMEOUT_S} s",
            node.name
        )));
    }
    Ok(replay_lsn.and_then(|text| text.parse().ok()))
}

async fn server_status(server: &Server) -> ServerStatus {
    let node = &server.node;
    let state = node.state();
    let mut status = ServerStatus {
        name: server.name.to_owned(),
        role: server.role,
        port: server.port,
        state,
        pid: None,
        exit_status: node.exit_status().map(|status| status.to_string()),
        log_tail: None,
        replay_lsn: None,
        wal_lsn: None,
        streaming: None,
        error: None,
    };
    if state != NodeState::Running {
        status.log_tail = Some(last_lines(&node.log_tail().await, 20));
        return status;
    }
    status.pid = Some(node.pid);
    match tokio::time::timeout(STATUS_TIMEOUT, wal_position(server.port)).await {
        Ok(Ok((in_recovery, lsn, receiver))) => {
            if in_recovery {
                status.replay_lsn = lsn;
                status.streaming = Some(receiver.as_deref() == Some("streaming"));
            } else {
                status.wal_lsn = lsn;
            }
        }
        Ok(Err(error)) => status.error = Some(error.to_string()),
        Err(_) => status.error = Some(format!("no answer within {STATUS_TIMEOUT:?}")),
    }
    status
}

/// `(in recovery, replay or WAL position, WAL receiver status)` of the server on `port`.
async fn wal_position(port: u16) -> Result<(bool, Option<Lsn>, Option<String>), sqlx::Error> {
    use sqlx::Connection;
    let mut connection =
        sqlx::PgConnection::connect_with(&lab_connect_options(port, LAB_DATABASE)).await?;
    let row = sqlx::query(sql::WAL_POSITION)
        .fetch_one(&mut connection)
        .await?;
    let _ = connection.close().await;
    let lsn: Option<String> = row.get(1);
    Ok((
        row.get(0),
        lsn.and_then(|text| text.parse().ok()),
        row.get(2),
    ))
}

fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}
