//! The binary itself: `lagprobe lab` and `lagprobe delay-link` start, work and stop on
//! SIGTERM with exit 0, leaving nothing behind, and on SIGINT at any moment of start-up;
//! `lagprobe run --compare` prints a table that says when remote-apply did nothing.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

fn lagprobe(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_lagprobe"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the lagprobe binary starts")
}

/// Reads stdout lines until one contains `marker`; returns everything read.
fn read_until(child: &mut Child, marker: &str) -> String {
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let read = stdout.read_line(&mut line).unwrap();
        assert!(
            read > 0,
            "lagprobe ended before printing {marker:?}; it printed:\n{seen}"
        );
        seen.push_str(&line);
        if line.contains(marker) {
            return seen;
        }
    }
}

fn terminate_and_wait(child: &mut Child) -> std::process::ExitStatus {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "lagprobe did not stop within 30 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Postmasters whose command line names `dir`. A backend the postmaster has just forked
/// still shows the postmaster's command line until it renames itself, so processes whose
/// parent also matches are not counted: they are that postmaster's children.
fn postgres_processes_under(dir: &str) -> usize {
    postmasters_under(dir).len()
}

/// The pids of [`postgres_processes_under`].
fn postmasters_under(dir: &str) -> Vec<u32> {
    let matching: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let pid: u32 = path.file_name()?.to_str()?.parse().ok()?;
            let cmdline =
                String::from_utf8_lossy(&std::fs::read(path.join("cmdline")).ok()?).into_owned();
            if !(cmdline.contains("postgres") && cmdline.contains(dir)) {
                return None;
            }
            // The parent pid is the second field after the parenthesised command name.
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            let parent = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, parent))
        })
        .collect();
    matching
        .iter()
        .filter(|(_, parent)| !matching.iter().any(|(pid, _)| pid == parent))
        .map(|(pid, _)| *pid)
        .collect()
}

#[test]
fn lab_stops_on_sigterm_with_exit_0_and_leaves_no_postmaster() {
    let mut child = lagprobe(&[
        "lab",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--proxy-addr",
        "127.0.0.1:0",
    ]);
    let banner = read_until(&mut child, "Ctrl-C stops everything");
    assert!(banner.contains("lagprobe lab is up"), "{banner}");
    assert!(banner.contains("1000 ms delay"), "{banner}");
    assert!(banner.contains("proxy      psql \"postgres://"), "{banner}");
    let data_dir = banner_field(&banner, "data");
    assert_eq!(postgres_processes_under(&data_dir), 2, "{banner}");
    terminate_and_check_nothing_is_left(&mut child, &data_dir);
}

/// The first word after `name` on the banner line that starts with it.
fn banner_field(banner: &str, name: &str) -> String {
    banner
        .lines()
        .find_map(|line| line.trim().strip_prefix(name))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("the banner has no {name}: {banner}"))
        .to_owned()
}

/// SIGTERM, then: exit 0, no postmaster under `data_dir`, and the directory gone.
fn terminate_and_check_nothing_is_left(child: &mut Child, data_dir: &str) {
    let status = terminate_and_wait(child);
    assert!(status.success(), "{status:?}");
    assert_eq!(postgres_processes_under(data_dir), 0);
    assert!(
        !std::path::Path::new(data_dir).exists(),
        "{data_dir} left behind"
    );
}

/// One HTTP/1.1 request, by hand (the binary's own API; no client library in the loop).
fn http(addr: &str, method: &str, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"));
    (status, response)
}

#[test]
fn lab_outlives_a_killed_server_and_stops_the_one_started_again_on_exit() {
    let mut child = lagprobe(&[
        "lab",
        "--delay-ms",
        "0",
        "--http-addr",
        "127.0.0.1:0",
        "--grpc-addr",
        "127.0.0.1:0",
        "--proxy-addr",
        "127.0.0.1:0",
    ]);
    let banner = read_until(&mut child, "Ctrl-C stops everything");
    let data_dir = banner_field(&banner, "data");
    let http_addr = banner_field(&banner, "test page")
        .trim_start_matches("http://")
        .trim_end_matches("/test/")
        .to_owned();

    let (status, killed) = http(&http_addr, "POST", "/api/lab/servers/replica1/kill");
    assert_eq!(status, 200, "{killed}");
    assert!(killed.contains(r#""state":"killed""#), "{killed}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "the lab exited");
    assert_eq!(http(&http_addr, "GET", "/healthz").0, 200);
    assert_eq!(postgres_processes_under(&data_dir), 1);

    let (status, started) = http(&http_addr, "POST", "/api/lab/servers/replica1/start");
    assert_eq!(status, 200, "{started}");
    assert_eq!(postgres_processes_under(&data_dir), 2);
    terminate_and_check_nothing_is_left(&mut child, &data_dir);
}

#[test]
fn delay_link_command_delays_the_upstream_direction_and_stops_on_sigterm() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream_addr = upstream.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut socket, _) = upstream.accept().unwrap();
        let mut buffer = [0u8; 5];
        socket.read_exact(&mut buffer).unwrap();
        socket.write_all(&buffer).unwrap();
    });
    let mut child = lagprobe(&[
        "delay-link",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream_addr,
        "--delay-ms",
        "300",
    ]);
    let banner = read_until(&mut child, "delay link");
    // "delay link 127.0.0.1:PORT -> UPSTREAM: holding ..."
    let listen = banner.split_whitespace().nth(2).unwrap().to_owned();

    let mut client = TcpStream::connect(&listen).unwrap();
    let sent = Instant::now();
    client.write_all(b"hello").unwrap();
    let mut echoed = [0u8; 5];
    client.read_exact(&mut echoed).unwrap();
    let took = sent.elapsed();
    assert_eq!(&echoed, b"hello");
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_millis(2000), "{took:?}");

    let status = terminate_and_wait(&mut child);
    assert!(status.success(), "{status:?}");
}

#[test]
fn request_errors_are_logged_at_warn_with_the_field_in_plain_text() {
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lagprobe"))
        .args(["lab", "--delay-ms", "0", "--http-addr", "127.0.0.1:0"])
        .args(["--grpc-addr", "127.0.0.1:0", "--proxy-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log.reopen().unwrap()))
        .spawn()
        .expect("the lagprobe binary starts");
    let banner = read_until(&mut child, "Ctrl-C stops everything");
    let http = banner
        .lines()
        .find_map(|line| line.trim().strip_prefix("test page  http://"))
        .and_then(|rest| rest.strip_suffix("/test/"))
        .expect("the banner names the test page")
        .to_owned();
    let mut socket = TcpStream::connect(&http).unwrap();
    socket
        .write_all(
            b"GET /api/probe?visibility_timeout_ms=0 HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut answer = String::new();
    socket.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let status = terminate_and_wait(&mut child);
    assert!(status.success(), "{status:?}");
    let logged = std::fs::read_to_string(log.path()).unwrap();
    let line = logged
        .lines()
        .find(|line| line.contains("request refused"))
        .unwrap_or_else(|| panic!("no warning for the refused request in:\n{logged}"));
    assert!(line.contains("WARN"), "{line}");
    assert!(line.contains("field=\"visibility_timeout_ms\""), "{line}");
    // stderr is a file here, not a terminal: no colour codes.
    assert!(
        !logged.contains('\u{1b}'),
        "ANSI codes in a log file:\n{logged}"
    );
}

/// `lagprobe run --compare replica,remote-apply` on `app`'s lab: the printed table.
async fn compare_table(app: &crate::harness::TestApp) -> String {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_lagprobe"))
        .args(["run", "--primary-url", &app.lab().primary_url()])
        .args(["--replica-url", &app.lab().replica_url()])
        .args(["--count", "3", "--compare", "replica,remote-apply"])
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .output()
        .await
        .expect("lagprobe run starts");
    assert!(output.status.success(), "{:?}", output.status);
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_compare_marks_remote_apply_ineffective_without_a_synchronous_standby() {
    let app = crate::harness::spawn_app(50).await;
    let table = compare_table(&app).await;
    assert!(
        table.contains("| remote-apply (ineffective) | 3 |"),
        "{table}"
    );
    assert!(table.contains("ineffective for 3 of 3 probes"), "{table}");
    assert!(table.contains("--sync-replica"), "{table}");
    app.shutdown().await;

    // With a synchronous standby remote-apply works, and nothing is marked.
    let app = crate::harness::spawn_app_with(lagprobe::settings::LabSettings {
        sync_replica: true,
        ..lagprobe::settings::LabSettings::with_delay(Duration::from_millis(50))
    })
    .await;
    let table = compare_table(&app).await;
    assert!(table.contains("| remote-apply | 3 | 0 |"), "{table}");
    assert!(!table.contains("ineffective"), "{table}");
    app.shutdown().await;
}

/// When during start-up [`lab_stops_cleanly_on_sigint_at_every_moment_of_start_up`]
/// sends its SIGINT.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Before lagprobe's `main` runs: the child is spawned with SIGINT blocked (a process
    /// cannot catch a signal before its first instruction), so the signal is pending when
    /// lagprobe starts and must reach its handler rather than kill it.
    AtExec,
    /// When the lab has its directory, with an empty cache: the template's initdb runs.
    BuildingTheTemplate,
    /// Likewise with `--no-template`: the primary's own initdb runs.
    Initdb,
    /// The primary accepts connections, `--no-template`: the replica's pg_basebackup is next.
    BaseBackup,
    /// At the first `/readyz` 200, before the banner.
    Readyz,
    /// After the banner.
    Banner,
}

#[test]
fn lab_stops_cleanly_on_sigint_at_every_moment_of_start_up() {
    for moment in [
        Moment::AtExec,
        Moment::BuildingTheTemplate,
        Moment::Initdb,
        Moment::BaseBackup,
        Moment::Readyz,
        Moment::Banner,
    ] {
        interrupt_lab_start(moment);
    }
}

/// One `lagprobe lab` in a process group of its own, sent SIGINT at `moment` as a terminal's
/// Ctrl-C is (to the whole group); then exit 0 and nothing of its lab left.
fn interrupt_lab_start(moment: Moment) {
    use std::os::unix::process::CommandExt;
    let cache = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_lagprobe"));
    command
        .args([
            "lab",
            "--http-addr",
            "127.0.0.1:0",
            "--grpc-addr",
            "127.0.0.1:0",
        ])
        .args(["--proxy-addr", "127.0.0.1:0"])
        .env("RUST_LOG", "warn,lagprobe=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match moment {
        Moment::BuildingTheTemplate => {
            command.arg("--cache-dir").arg(cache.path());
        }
        Moment::Initdb | Moment::BaseBackup => {
            command.arg("--no-template");
        }
        _ => {}
    }
    if let Moment::AtExec = moment {
        // SAFETY: sigprocmask is async-signal-safe and the closure allocates nothing.
        unsafe {
            command.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, libc::SIGINT);
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    }
    let mut child = command.spawn().expect("the lagprobe binary starts");
    let log = LogLines::follow(child.stderr.take().unwrap());
    match moment {
        Moment::AtExec => {}
        Moment::BuildingTheTemplate | Moment::Initdb => log.wait_for("starting the lab"),
        Moment::BaseBackup => log.wait_for("primary accepting connections"),
        Moment::Readyz => {
            // The lab binds its own port (one picked here could be taken before it binds).
            log.wait_for("serving http_addr=");
            let http_addr = log.field("serving http_addr=", "http_addr=").unwrap();
            while http_status(&http_addr, "/readyz") != Some(200) {}
        }
        Moment::Banner => {
            read_until(&mut child, "Ctrl-C stops everything");
        }
    }
    // SAFETY: kill has no memory-safety preconditions; -pid is the group our child leads.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGINT);
    }
    let (status, postmasters) = wait_recording_postmasters(&mut child, &log);
    let context = format!("{moment:?}, log:\n{}", log.text());
    assert!(status.success(), "{status:?} at {context}");
    let data_dir = log
        .data_dir()
        .unwrap_or_else(|| panic!("no lab dir at {context}"));
    assert_eq!(
        processes_naming(&data_dir),
        Vec::<String>::new(),
        "{context}"
    );
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "{data_dir} left at {context}"
    );
    assert!(!postmasters.is_empty(), "no postmaster seen at {context}");
    let segments = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
    for segment in segments.lines().skip(1) {
        // key shmid perms size cpid ...: the creator's pid is the fifth field.
        let creator: u32 = segment.split_whitespace().nth(4).unwrap().parse().unwrap();
        assert!(
            !postmasters.contains(&creator),
            "shared memory of postmaster {creator} left: {segment} at {context}"
        );
    }
    let building = std::fs::read_dir(cache.path().join("templates"))
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(".building"))
        .count();
    assert_eq!(building, 0, "a half-built template left at {context}");
}

/// Waits (up to a minute: a cold start runs to its end first) for the child to exit,
/// meanwhile noting the pid of every postmaster of its lab, for the shared memory check.
fn wait_recording_postmasters(
    child: &mut Child,
    log: &LogLines,
) -> (std::process::ExitStatus, std::collections::HashSet<u32>) {
    let mut postmasters = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(dir) = log.data_dir() {
            postmasters.extend(postmasters_under(&dir));
        }
        if let Some(status) = child.try_wait().unwrap() {
            return (status, postmasters);
        }
        assert!(
            Instant::now() < deadline,
            "lagprobe did not stop within 60 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child's stderr, read line by line on a thread of its own.
struct LogLines {
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl LogLines {
    fn follow(stderr: impl Read + Send + 'static) -> LogLines {
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let filled = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                filled.lock().unwrap().push(line);
            }
        });
        LogLines { lines }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn wait_for(&self, marker: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.text().contains(marker) {
            assert!(
                Instant::now() < deadline,
                "no {marker:?} in:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The lab's directory, from its "starting the lab" line (`dir=...`).
    fn data_dir(&self) -> Option<String> {
        self.field("starting the lab", "dir=")
    }

    /// The value after `key` on the first line containing `marker`.
    fn field(&self, marker: &str, key: &str) -> Option<String> {
        let text = self.text();
        let line = text.lines().find(|line| line.contains(marker))?;
        let value = line
            .split_whitespace()
            .find_map(|field| field.strip_prefix(key))?;
        Some(value.to_owned())
    }
}

/// A GET's status, or `None` when the server does not answer (yet).
fn http_status(addr: &str, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Every process whose command line names `dir` (servers, initdb, pg_basebackup, cp).
fn processes_naming(dir: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            path.file_name()?.to_str()?.parse::<u32>().ok()?;
            let cmdline = std::fs::read(path.join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            cmdline.contains(dir).then_some(cmdline)
        })
        .collect()
}
