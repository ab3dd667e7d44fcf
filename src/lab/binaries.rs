//! Finding the local PostgreSQL server binaries the lab runs.
//!
//! Async throughout (tokio's process and fs), as it runs on the runtime at lab start.

use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::LabError;

/// Programs the lab runs; a directory counts only if it has all of them. pg_basebackup is
/// optional: without it replicas are copies of the freshly initialised primary (the npm
/// builds of PostgreSQL ship no pg_basebackup).
const REQUIRED: [&str; 2] = ["initdb", "postgres"];
const BASE_BACKUP: &str = "pg_basebackup";
/// Oldest major version the lab supports (for `pg_stat_wal_receiver`, `wal_keep_size`).
const MIN_MAJOR: u32 = 13;

/// A directory with PostgreSQL's server programs, and their version.
#[derive(Debug, Clone)]
pub struct PgBinaries {
    pub bindir: PathBuf,
    /// As `postgres --version` prints it, e.g. `15.18`.
    pub version: String,
    /// The major version, e.g. 15.
    pub major: u32,
    /// Whether the directory has pg_basebackup (else replicas are built by copying).
    pub has_base_backup: bool,
}

impl PgBinaries {
    /// The program `name` in this directory (psql, pgbench and pg_dump sit beside the
    /// servers in Debian's and nixpkgs' layouts).
    pub fn program(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// Looks in order: `explicit` (the flag), LAGPROBE_PG_BINDIR, `pg_config --bindir`,
    /// `initdb` on PATH, then the newest `/usr/lib/postgresql/*/bin` (Debian's layout,
    /// which does not put server programs on PATH).
    pub async fn find(explicit: Option<&Path>) -> Result<Self, LabError> {
        let from_env = std::env::var_os("LAGPROBE_PG_BINDIR")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from);
        if let Some(dir) = explicit.or(from_env.as_deref()) {
            return if has_server_programs(dir).await {
                Self::at(dir).await
            } else {
                Err(LabError::BinariesNotFound {
                    tried: format!(
                        "{} (given explicitly) lacks {}",
                        dir.display(),
                        REQUIRED.join("/")
                    ),
                })
            };
        }
        let mut tried = Vec::new();
        let candidates = [
            pg_config_bindir().await,
            initdb_on_path().await,
            newest_debian_bindir().await,
        ];
        for dir in candidates.into_iter().flatten() {
            if has_server_programs(&dir).await {
                return Self::at(&dir).await;
            }
            tried.push(dir.display().to_string());
        }
        tried.push("PATH".into());
        tried.push("/usr/lib/postgresql/*/bin".into());
        Err(LabError::BinariesNotFound {
            tried: format!("looked in {}", tried.join(", ")),
        })
    }

    async fn at(dir: &Path) -> Result<Self, LabError> {
        let postgres = dir.join("postgres");
        let output = Command::new(&postgres)
            .arg("--version")
            .output()
            .await
            .map_err(LabError::io(format!(
                "running {} --version",
                postgres.display()
            )))?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = text
            .split_whitespace()
            .nth(2)
            .unwrap_or_default()
            .to_owned();
        let major: u32 = version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|major| major.parse().ok())
            .ok_or_else(|| LabError::BinariesNotFound {
                tried: format!("{} printed no version: {text:?}", postgres.display()),
            })?;
        if major < MIN_MAJOR {
            return Err(LabError::TooOld {
                bindir: dir.to_path_buf(),
                version,
            });
        }
        Ok(PgBinaries {
            bindir: dir.to_path_buf(),
            version,
            major,
            has_base_backup: is_file(&dir.join(BASE_BACKUP)).await,
        })
    }
}

async fn has_server_programs(dir: &Path) -> bool {
    for name in REQUIRED {
        if !is_file(&dir.join(name)).await {
            return false;
        }
    }
    true
}

async fn is_file(path: &Path) -> bool {
    tokio::fs::metadata(path)
        .await
        .is_ok_and(|metadata| metadata.is_file())
}

async fn pg_config_bindir() -> Option<PathBuf> {
    let output = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .await
        .ok()?;
    output
        .status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

async fn initdb_on_path() -> Option<PathBuf> {
    for dir in std::env::split_paths(&std::env::var_os("PATH")?) {
        if is_file(&dir.join("initdb")).await {
            return Some(dir);
        }
    }
    None
}

async fn newest_debian_bindir() -> Option<PathBuf> {
    let mut entries = tokio::fs::read_dir("/usr/lib/postgresql").await.ok()?;
    let mut newest: Option<(u32, PathBuf)> = None;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let Some(major) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse().ok())
        else {
            continue;
        };
        if newest.as_ref().is_none_or(|(best, _)| major > *best) {
            newest = Some((major, entry.path().join("bin")));
        }
    }
    newest.map(|(_, bin)| bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn explicit_dir_without_programs_is_a_clear_error() {
        let empty = tempfile::tempdir().unwrap();
        let error = PgBinaries::find(Some(empty.path()))
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains("apt-get install postgresql"), "{error}");
        assert!(error.contains("LAGPROBE_PG_BINDIR"), "{error}");
        assert!(
            error.contains(&empty.path().display().to_string()),
            "{error}"
        );
    }
}
