//! The bench's start-up figure as a user sees it: from starting the `lagprobe lab` process
//! to its `/readyz` answering 200 (every replica streaming, migrations replayed, the 1000 ms
//! delay engaged), with a warm template cache, with an empty one, and without templates.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use lagprobe::{Error, Result};

use super::{free_port, spread_ms};

/// How `/readyz` is polled: often enough that the poll adds little to the figure.
const READYZ_POLL: Duration = Duration::from_millis(2);
const READY_DEADLINE: Duration = Duration::from_secs(120);

/// Which cache a timed start gets.
enum Cache<'a> {
    /// The given folder, holding a template already.
    Warm(&'a Path),
    /// A new empty folder each time: the template is built on the way.
    Empty,
    /// `--no-template`: initdb and pg_basebackup, as before templates.
    None,
}

/// The table: `runs` timed starts each way.
pub async fn readyz(runs: u32, binary: &Path) -> Result<String> {
    let warm = cache_folder()?;
    // Untimed: fills the warm cache.
    start_to_readyz(binary, &Cache::Warm(warm.path())).await?;
    let mut table = format!(
        "## `lagprobe lab` process start to `/readyz` 200 at D = 1000 ms ({runs} runs each)\n\n\
         | cache | min ms | median ms | max ms | target |\n|---|---:|---:|---:|---|\n"
    );
    for (label, cache, target) in [
        ("warm template cache", Cache::Warm(warm.path()), "<= 500 ms"),
        ("empty cache (template built first)", Cache::Empty, ""),
        ("--no-template (initdb, pg_basebackup)", Cache::None, ""),
    ] {
        let mut samples = Vec::new();
        for _ in 0..runs.max(1) {
            samples.push(start_to_readyz(binary, &cache).await?);
        }
        let (min, median, max) = spread_ms(&mut samples);
        let _ = writeln!(
            table,
            "| {label} | {min:.0} | {median:.0} | {max:.0} | {target} |"
        );
    }
    table.push('\n');
    Ok(table)
}

/// A new folder the lab's user (not root) can enter, as a cache folder must be.
fn cache_folder() -> Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let folder = tempfile::Builder::new()
        .prefix("lagprobe-bench-cache-")
        .tempdir()
        .map_err(Error::io("creating a cache folder"))?;
    std::fs::set_permissions(folder.path(), std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io("opening the cache folder to the lab's user"))?;
    Ok(folder)
}

/// One `lagprobe lab`: the time from spawning it to its first `/readyz` 200; then SIGTERM,
/// and its exit waited for (so the next start does not share the machine with its stop).
async fn start_to_readyz(binary: &Path, cache: &Cache<'_>) -> Result<Duration> {
    let empty = cache_folder()?;
    let cache_args: Vec<PathBuf> = match cache {
        Cache::Warm(folder) => vec!["--cache-dir".into(), folder.to_path_buf()],
        Cache::Empty => vec!["--cache-dir".into(), empty.path().to_path_buf()],
        Cache::None => vec!["--no-template".into()],
    };
    let http_addr = format!("127.0.0.1:{}", free_port()?);
    let started = Instant::now();
    let mut child = tokio::process::Command::new(binary)
        .args(["lab", "--delay-ms", "1000", "--http-addr", &http_addr])
        .args(["--grpc-addr", "127.0.0.1:0", "--proxy-addr", "none"])
        .args(&cache_args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::io("starting lagprobe lab"))?;
    let url = format!("http://{http_addr}/readyz");
    let ready = loop {
        let answer = super::super::healthcheck::http_get_status(&url, READY_DEADLINE).await;
        if matches!(answer, Ok(200)) {
            break started.elapsed();
        }
        if started.elapsed() > READY_DEADLINE || child.try_wait().ok().flatten().is_some() {
            return Err(Error::io("lagprobe lab never answered /readyz 200")(
                std::io::Error::other(format!("{answer:?}")),
            ));
        }
        tokio::time::sleep(READYZ_POLL).await;
    };
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    let _ = child.wait().await;
    Ok(ready)
}
