//! One supervised PostgreSQL server process, and running lab programs as an unprivileged user.
//!
//! PostgreSQL refuses to run as root, so when lagprobe is root every lab program runs as
//! `postgres` (or `nobody`). Each postmaster gets its own process group, so a terminal's
//! Ctrl-C reaches only lagprobe, which then shuts the servers down in order; and a
//! parent-death signal, so a killed lagprobe does not leave a postmaster behind.

use std::{
    fs::File,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use tokio::{process::Command, sync::watch};

use super::LabError;

/// The unprivileged account lab programs run as when lagprobe runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `None` when not root (programs run as the current user), else `postgres` if that
    /// account exists, else `nobody`.
    pub fn for_this_process() -> Result<Option<RunAs>, LabError> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        ["postgres", "nobody"]
            .iter()
            .find_map(|name| lookup_user(name))
            .map(Some)
            .ok_or(LabError::NoUnprivilegedUser)
    }

    /// Hands `path` to this account, as the server must own its data directory.
    pub fn chown(&self, path: &Path) -> Result<(), LabError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(LabError::io(
            format!("chown {} to {}", path.display(), self.name),
        ))
    }
}

fn lookup_user(name: &str) -> Option<RunAs> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam reads a static buffer; lagprobe calls it once, at lab start, and
    // copies the fields out before anything else can call it.
    unsafe {
        let entry = libc::getpwnam(c_name.as_ptr());
        if entry.is_null() {
            return None;
        }
        Some(RunAs {
            name: name.to_owned(),
            uid: (*entry).pw_uid,
            gid: (*entry).pw_gid,
        })
    }
}

/// A command for a lab program, as the lab's user, with a predictable environment.
pub fn lab_command(program: &Path, run_as: Option<&RunAs>, home: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("HOME", home)
        .env("LC_ALL", "C")
        .env_remove("PGOPTIONS")
        .env_remove("PGDATA")
        .stdin(Stdio::null());
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// Runs a lab program to completion; a failure carries its output.
pub async fn run_to_completion(mut command: Command, what: &str) -> Result<(), LabError> {
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .await
        .map_err(LabError::io(format!("starting {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    Err(LabError::CommandFailed {
        what: what.to_owned(),
        status: output.status.to_string(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// A running postmaster that lagprobe started and watches.
#[derive(Debug)]
pub struct PgNode {
    pub name: &'static str,
    pub port: u16,
    pub data_dir: PathBuf,
    log_path: PathBuf,
    pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
    stopping: bool,
}

impl PgNode {
    /// Starts `postgres -D data_dir -p port <args>`, logging to `log_path`.
    pub fn spawn(
        mut command: Command,
        name: &'static str,
        data_dir: &Path,
        port: u16,
        log_path: &Path,
    ) -> Result<PgNode, LabError> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(LabError::io(format!("opening {}", log_path.display())))?;
        let log_for_stderr = log
            .try_clone()
            .map_err(LabError::io(format!("opening {}", log_path.display())))?;
        command
            .arg("-D")
            .arg(data_dir)
            .arg("-p")
            .arg(port.to_string())
            .stdout(log)
            .stderr(log_for_stderr)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; the closure allocates nothing. It runs after
        // the uid switch (which would clear the setting), right before exec.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .map_err(LabError::io(format!("starting the {name} postmaster")))?;
        let pid = child.id().map_or(-1, |pid| pid as i32);
        let (exit_sender, exit) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exit_sender.send(Some(status.unwrap_or_else(|_| failed_status())));
        });
        Ok(PgNode {
            name,
            port,
            data_dir: data_dir.to_path_buf(),
            log_path: log_path.to_path_buf(),
            pid,
            exit,
            stopping: false,
        })
    }

    /// The exit status, if the process has ended.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// Resolves when the process ends without having been asked to; never resolves for
    /// a node being stopped.
    pub async fn unexpected_exit(&self) -> LabError {
        let mut exit = self.exit.clone();
        let status = match exit.wait_for(Option::is_some).await {
            Ok(status) => status.expect("waited for Some"),
            Err(_) => failed_status(),
        };
        if self.stopping {
            std::future::pending::<()>().await;
        }
        LabError::NodeExited {
            node: self.name,
            status: status.to_string(),
            log_tail: self.log_tail(),
        }
    }

    /// The end of the server log, for error reports.
    pub fn log_tail(&self) -> String {
        tail_of_file(&self.log_path, 4096)
    }

    /// Fast shutdown (SIGINT: roll back sessions, checkpoint, exit), escalating to an
    /// immediate one (SIGQUIT) and then SIGKILL if the server dawdles.
    pub async fn stop(&mut self) {
        self.stopping = true;
        for (signal, grace) in [
            (libc::SIGINT, Duration::from_secs(15)),
            (libc::SIGQUIT, Duration::from_secs(5)),
            (libc::SIGKILL, Duration::from_secs(5)),
        ] {
            if self.exit_status().is_some() {
                return;
            }
            self.signal(signal);
            let mut exit = self.exit.clone();
            if tokio::time::timeout(grace, exit.wait_for(Option::is_some))
                .await
                .is_ok()
            {
                return;
            }
            tracing::warn!(
                node = self.name,
                signal,
                "postmaster still running after {grace:?}"
            );
        }
    }

    fn signal(&self, signal: i32) {
        if self.pid > 0 {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }
}

impl Drop for PgNode {
    /// Last resort when a lab is dropped without `shutdown` (a failing test, a panic):
    /// an immediate shutdown, waited for briefly so no postmaster outlives the lab.
    fn drop(&mut self) {
        if self.exit_status().is_some() || self.pid <= 0 {
            return;
        }
        self.signal(libc::SIGQUIT);
        for _ in 0..250 {
            if !process_alive(self.pid) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
    }
}

/// Whether `pid` is still a live process (a zombie awaiting its reaper counts as gone).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn failed_status() -> ExitStatus {
    use std::os::unix::process::ExitStatusExt;
    ExitStatus::from_raw(1 << 8)
}

/// The last `max_bytes` of a file, starting at a line boundary.
pub fn tail_of_file(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(no log at {})", path.display());
    };
    let length = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = length.saturating_sub(max_bytes);
    let mut text = String::new();
    if file.seek(SeekFrom::Start(start)).is_ok() {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    if start > 0
        && let Some((_, rest)) = text.split_once('\n')
    {
        text = rest.to_owned();
    }
    text
}
