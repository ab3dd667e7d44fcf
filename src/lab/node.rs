//! One supervised PostgreSQL server process, and running lab programs as an unprivileged user.
//!
//! PostgreSQL refuses to run as root, so when lagprobe is root every lab program runs as
//! `postgres` (or `nobody`). Each postmaster gets its own process group, so a terminal's
//! Ctrl-C reaches only lagprobe, which then shuts the servers down in order; and a
//! parent-death signal, so a killed lagprobe does not leave a postmaster behind.
//!
//! The orderly stop is the async [`PgNode::stop`]. Dropping a node instead must not block a
//! runtime worker, so it only signals the server and leaves the waiting (and any escalation
//! to SIGKILL) to a plain thread: see [`Leftover`].

use std::{
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncSeekExt},
    process::Command,
    sync::watch,
};

use super::LabError;

/// The unprivileged account lab programs run as when lagprobe runs as root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RunAs {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

impl RunAs {
    /// `None` when not root (programs run as the current user), else `postgres` if that
    /// account exists, else `nobody`. Reads the user database: call it off the runtime.
    pub(super) fn for_this_process() -> Result<Option<RunAs>, LabError> {
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
    pub(super) fn chown(&self, path: &Path) -> Result<(), LabError> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).map_err(LabError::io(
            format!("chown {} to {}", path.display(), self.name),
        ))
    }
}

/// The reentrant lookup: labs start in parallel (the tests do), and `getpwnam`'s static
/// buffer would be shared between them.
fn lookup_user(name: &str) -> Option<RunAs> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut buffer: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: an all-zero passwd is a valid value for getpwnam_r to overwrite.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live storage of the stated size, and the strings
        // getpwnam_r stores in `entry` point into `buffer`, which outlives their use here.
        let code = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr(),
                buffer.len(),
                &mut found,
            )
        };
        // ERANGE: the entry does not fit; a directory service may return long ones.
        if code == libc::ERANGE && buffer.len() < 1 << 20 {
            buffer.resize(buffer.len() * 2, 0);
            continue;
        }
        if code != 0 || found.is_null() {
            return None;
        }
        return Some(RunAs {
            name: name.to_owned(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
        });
    }
}

/// A command for a lab program, as the lab's user, with a predictable environment, in a
/// process group of its own: a terminal's Ctrl-C during start-up must reach only lagprobe,
/// not kill initdb or pg_basebackup under it (which would fail the start instead of
/// letting lagprobe stop it in order).
pub(super) fn lab_command(program: &Path, run_as: Option<&RunAs>, home: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .env("HOME", home)
        .env("LC_ALL", "C")
        .env_remove("PGOPTIONS")
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .process_group(0);
    if let Some(user) = run_as {
        command.uid(user.uid).gid(user.gid);
    }
    command
}

/// Runs a lab program to completion; a failure carries its output.
pub(super) async fn run_to_completion(mut command: Command, what: &str) -> Result<(), LabError> {
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

/// How a server was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// SIGINT: roll back sessions, checkpoint, exit (`pg_ctl stop -m fast`).
    Fast,
    /// SIGQUIT: exit at once, crash recovery on the next start (`pg_ctl stop -m immediate`).
    Immediate,
}

/// What has been asked of a node's process, so its end can be told apart from a crash.
const ASKED_NOTHING: u8 = 0;
const ASKED_TO_STOP: u8 = 1;
const ASKED_TO_DIE: u8 = 2;

/// The state of a node's process as the lab reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Running,
    /// Asked to stop, not gone yet.
    Stopping,
    /// Stopped on request.
    Stopped,
    /// Killed on request (SIGKILL to the postmaster and its processes, like a crash).
    Killed,
    /// Ended without being asked: a crash, or someone else's signal.
    Exited,
}

/// A running postmaster that lagprobe started and watches. Every operation takes `&self`, so
/// the lab can share a node with the tasks that stop or report it.
#[derive(Debug)]
pub(super) struct PgNode {
    pub(super) name: &'static str,
    pub(super) port: u16,
    pub(super) pid: i32,
    log_path: PathBuf,
    exit: watch::Receiver<Option<ExitStatus>>,
    asked: Arc<AtomicU8>,
    /// Signalled and handed to a [`Leftover`]; nothing is left for this value to do.
    handed_off: AtomicBool,
}

impl PgNode {
    /// Starts `postgres -D data_dir -p port <args>`, logging to `log_path`. An exit nobody
    /// asked for is logged at warn with the log's tail: the lab goes on without the server.
    pub(super) async fn spawn(
        mut command: Command,
        name: &'static str,
        data_dir: &Path,
        port: u16,
        log_path: &Path,
    ) -> Result<PgNode, LabError> {
        let (log, log_for_stderr) = open_log(log_path).await?;
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
        let asked = Arc::new(AtomicU8::new(ASKED_NOTHING));
        let watched = (Arc::clone(&asked), log_path.to_path_buf());
        tokio::spawn(async move {
            let status = child.wait().await.unwrap_or_else(|_| failed_status());
            let _ = exit_sender.send(Some(status));
            let (asked, log_path) = watched;
            if asked.load(Ordering::Acquire) == ASKED_NOTHING {
                let log_tail = tail_of_file(&log_path, 2048).await;
                tracing::warn!(
                    node = name,
                    %status,
                    log_tail,
                    "lab server exited unexpectedly; the lab keeps running without it \
                     (start it again through the lab API)"
                );
            }
        });
        Ok(PgNode {
            name,
            port,
            pid,
            log_path: log_path.to_path_buf(),
            exit,
            asked,
            handed_off: AtomicBool::new(false),
        })
    }

    /// The exit status, if the process has ended.
    pub(super) fn exit_status(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    pub(super) fn state(&self) -> NodeState {
        let asked = self.asked.load(Ordering::Acquire);
        match (self.exit_status(), asked) {
            (None, ASKED_NOTHING) => NodeState::Running,
            (None, _) => NodeState::Stopping,
            (Some(_), ASKED_TO_STOP) => NodeState::Stopped,
            (Some(_), ASKED_TO_DIE) => NodeState::Killed,
            (Some(_), _) => NodeState::Exited,
        }
    }

    /// The error for this server having exited with `status`.
    pub(super) async fn exited(&self, status: ExitStatus) -> LabError {
        LabError::NodeExited {
            node: self.name,
            status: status.to_string(),
            log_tail: self.log_tail().await,
        }
    }

    /// The end of the server log, for error reports.
    pub(super) async fn log_tail(&self) -> String {
        tail_of_file(&self.log_path, 4096).await
    }

    /// Stops the server and waits for it: a fast shutdown escalates to an immediate one and
    /// then to SIGKILL if the server dawdles; an immediate one only to SIGKILL.
    pub(super) async fn stop(&self, mode: StopMode) {
        let _ = self.asked.compare_exchange(
            ASKED_NOTHING,
            ASKED_TO_STOP,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        let fast = [(libc::SIGINT, Duration::from_secs(15))];
        let rest = [
            (libc::SIGQUIT, Duration::from_secs(5)),
            (libc::SIGKILL, Duration::from_secs(5)),
        ];
        let steps = match mode {
            StopMode::Fast => fast.iter().chain(&rest),
            StopMode::Immediate => [].iter().chain(&rest),
        };
        for &(signal, grace) in steps {
            if self.exit_status().is_some() {
                return;
            }
            self.signal(signal);
            if self.exited_within(grace).await {
                return;
            }
            tracing::warn!(
                node = self.name,
                signal,
                "postmaster still running after {grace:?}"
            );
        }
    }

    /// SIGKILL to the postmaster and every process of its group, as a crash would end them
    /// all at once (a postmaster killed alone leaves backends that block a restart); waits
    /// until the postmaster is gone.
    pub(super) async fn kill(&self) {
        self.asked.store(ASKED_TO_DIE, Ordering::Release);
        if self.pid > 0 && self.exit_status().is_none() {
            // SAFETY: kill has no memory-safety preconditions; the postmaster leads its own
            // process group (spawned with process_group(0)), so -pid names only the server's.
            unsafe {
                libc::kill(-self.pid, libc::SIGKILL);
            }
        }
        if !self.exited_within(QUIT_GRACE).await {
            tracing::error!(
                node = self.name,
                pid = self.pid,
                "postmaster survived SIGKILL"
            );
        }
    }

    async fn exited_within(&self, grace: Duration) -> bool {
        let mut exit = self.exit.clone();
        tokio::time::timeout(grace, exit.wait_for(Option::is_some))
            .await
            .is_ok()
    }

    /// Asks for an immediate shutdown (SIGQUIT: the postmaster ends its children, then
    /// itself) and returns at once, with what is needed to wait for the end elsewhere.
    /// `None` when the server is already gone or was handed off before.
    pub(super) fn quit_without_waiting(&self) -> Option<Leftover> {
        if self.pid <= 0 || self.exit_status().is_some() {
            return None;
        }
        if self.handed_off.swap(true, Ordering::AcqRel) {
            return None;
        }
        let _ = self.asked.compare_exchange(
            ASKED_NOTHING,
            ASKED_TO_STOP,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.signal(libc::SIGQUIT);
        Some(Leftover {
            name: self.name,
            pid: self.pid,
            exit: self.exit.clone(),
        })
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
    /// Last resort when a node is dropped without `stop` (a failing test, a panic).
    fn drop(&mut self) {
        if let Some(leftover) = self.quit_without_waiting() {
            reap_in_background(vec![leftover], || {});
        }
    }
}

/// The server log, appended to across runs, twice: for stdout and for stderr.
async fn open_log(log_path: &Path) -> Result<(std::fs::File, std::fs::File), LabError> {
    let opening = || LabError::io(format!("opening {}", log_path.display()));
    let log = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .await
        .map_err(opening())?
        .into_std()
        .await;
    let log_for_stderr = log.try_clone().map_err(opening())?;
    Ok((log, log_for_stderr))
}

/// A server that was told to quit but may not have finished yet.
#[derive(Debug)]
pub(super) struct Leftover {
    name: &'static str,
    pid: i32,
    exit: watch::Receiver<Option<ExitStatus>>,
}

/// How long a quitting server gets before SIGKILL, and how long SIGKILL gets to work.
const QUIT_GRACE: Duration = Duration::from_secs(5);

impl Leftover {
    /// The exit watch is authoritative while the runtime still reaps; /proc covers a runtime
    /// that has gone away (an unreaped zombie keeps its pid, so the pid is not reused).
    fn gone(&self) -> bool {
        self.exit.borrow().is_some() || !process_alive(self.pid)
    }

    /// Blocks until the process is gone, SIGKILLing it after [`QUIT_GRACE`]. For a plain
    /// thread only, never a runtime worker.
    fn wait_blocking(&self) {
        if self.gone_within(QUIT_GRACE) {
            return;
        }
        tracing::warn!(node = self.name, "postmaster ignored SIGQUIT; killing it");
        // SAFETY: kill has no memory-safety preconditions; `gone_within` has just seen the
        // pid still belong to our server.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        if !self.gone_within(QUIT_GRACE) {
            tracing::error!(
                node = self.name,
                pid = self.pid,
                "postmaster survived SIGKILL"
            );
        }
    }

    fn gone_within(&self, grace: Duration) -> bool {
        let deadline = Instant::now() + grace;
        while !self.gone() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

/// Waits for `leftovers` to end on a thread of its own, then runs `then` there: the lab
/// removes its directory in `then`, once no server can still write into it.
pub(super) fn reap_in_background(leftovers: Vec<Leftover>, then: impl FnOnce() + Send + 'static) {
    let work = move || {
        for leftover in &leftovers {
            leftover.wait_blocking();
        }
        then();
    };
    // Shared so that if no thread can be started the work still runs here: blocking this
    // thread is better than leaving a server running.
    let slot = Arc::new(Mutex::new(Some(work)));
    let for_thread = Arc::clone(&slot);
    let spawned = std::thread::Builder::new()
        .name("lab-reaper".into())
        .spawn(move || take_and_run(&for_thread));
    if spawned.is_err() {
        take_and_run(&slot);
    }
}

fn take_and_run(slot: &Mutex<Option<impl FnOnce()>>) {
    let work = slot
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .take();
    if let Some(work) = work {
        work();
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
async fn tail_of_file(path: &Path, max_bytes: u64) -> String {
    let Ok(mut file) = tokio::fs::File::open(path).await else {
        return format!("(no log at {})", path.display());
    };
    let length = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let start = length.saturating_sub(max_bytes);
    let mut text = String::new();
    if file.seek(std::io::SeekFrom::Start(start)).await.is_ok() {
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes).await;
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    if start > 0
        && let Some((_, rest)) = text.split_once('\n')
    {
        text = rest.to_owned();
    }
    text
}
