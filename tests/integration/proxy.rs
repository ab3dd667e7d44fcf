//! The PostgreSQL-protocol proxy on a real lab, with real clients: psql scripts, pgbench in
//! every query mode, and sqlx (named prepared statements).

use std::{
    path::PathBuf,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use lagprobe::PgBinaries;
use sqlx::{Connection, Row};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::Command,
    sync::OnceCell,
};

use crate::harness::{TestApp, spawn_app};

/// A PostgreSQL client program (psql, pgbench, pg_dump) from the directory the lab's
/// servers come from: Debian's /usr/lib/postgresql/N/bin here, nixpkgs' PostgreSQL in the
/// Nix build (LAGPROBE_PG_BINDIR), so that both run the tests with the same clients.
pub(crate) async fn pg_program(name: &str) -> PathBuf {
    static BINARIES: OnceCell<PgBinaries> = OnceCell::const_new();
    let binaries = BINARIES
        .get_or_init(|| async {
            PgBinaries::find(None)
                .await
                .expect("PostgreSQL's programs: apt-get install postgresql")
        })
        .await;
    let program = binaries.program(name);
    assert!(
        program.exists(),
        "{} is missing: install PostgreSQL's client programs (apt-get install postgresql-client)",
        program.display()
    );
    program
}

pub(crate) fn proxy_url(app: &TestApp) -> String {
    let addr = app.app.proxy_addr.expect("the test app runs the proxy");
    format!("postgres://postgres@{addr}/lagprobe?sslmode=disable&connect_timeout=10")
}

/// Runs a psql script on one connection; stdout is unaligned, tuples only.
pub(crate) async fn psql(url: &str, script: &str) -> Output {
    psql_with(&["-q", "-v", "ON_ERROR_STOP=1"], url, script).await
}

/// Runs a psql script on one connection with `options` besides `-X -A -t`.
pub(crate) async fn psql_with(options: &[&str], url: &str, script: &str) -> Output {
    let mut child = Command::new(pg_program("psql").await)
        .args(["-X", "-A", "-t"])
        .args(options)
        .args([url, "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql starts");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(script.as_bytes()).await.unwrap();
    drop(stdin);
    child.wait_with_output().await.unwrap()
}

/// The script's output lines; panics with psql's stderr when it failed.
pub(crate) async fn psql_lines(url: &str, script: &str) -> Vec<String> {
    let output = psql(url, script).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "psql failed: {stderr}\nscript:\n{script}"
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_transactions_and_writes_to_the_primary() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let lines = psql_lines(
        &url,
        "SELECT 'read', pg_is_in_recovery();
         BEGIN READ ONLY;
         SELECT 'read only', pg_is_in_recovery();
         SELECT 'still read only', pg_is_in_recovery();
         COMMIT;
         BEGIN;
         SELECT 'in transaction', pg_is_in_recovery();
         CREATE TABLE scratch (x int);
         SELECT 'after a write', pg_is_in_recovery();
         COMMIT;
         CREATE TEMP SEQUENCE counter;
         SELECT 'nextval', pg_is_in_recovery(), nextval('counter');
         /* lagprobe:primary */ SELECT 'hinted', pg_is_in_recovery();
         SET timezone = 'Asia/Tokyo';
         SELECT 'timezone', current_setting('TimeZone'), pg_is_in_recovery();
         /* lagprobe:replica */ SHOW timezone;",
    )
    .await;
    assert_eq!(
        lines,
        [
            "read|t",
            "read only|t",
            "still read only|t",
            "in transaction|f",
            "after a write|f",
            "nextval|f|1",
            "hinted|f",
            "timezone|Asia/Tokyo|t",
            "Asia/Tokyo",
        ],
        "{lines:?}"
    );
    app.shutdown().await;
}

/// pg_dump empties its search_path with `set_config` (so that nobody's functions in
/// `public` can take over its catalog queries) and then reads in a READ ONLY transaction,
/// which the proxy runs on the replica: a session-level set_config must hold there too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_level_set_config_follows_the_client_to_the_replica() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let lines = psql_lines(
        &url,
        r"SELECT set_config('search_path', '', false) = '';
         SELECT 'emptied', current_setting('search_path'), pg_is_in_recovery();
         BEGIN READ ONLY;
         SELECT 'read only', current_setting('search_path'), pg_is_in_recovery();
         COMMIT;
         SELECT set_config('application_name', 'it''s \ mine', false) IS NOT NULL;
         SELECT 'named', current_setting('application_name'), pg_is_in_recovery();
         SELECT set_config('application_name', 'for one statement', true) IS NOT NULL;
         SELECT 'local', current_setting('application_name'), pg_is_in_recovery();
         RESET ALL;
         SELECT 'reset', current_setting('search_path'), pg_is_in_recovery();",
    )
    .await;
    assert_eq!(
        lines,
        [
            "t",
            "emptied||t",
            "read only||t",
            "t",
            r"named|it's \ mine|t",
            "t",
            r"local|it's \ mine|t",
            r#"reset|"$user", public|t"#,
        ],
        "{lines:?}"
    );

    // With Bind parameters (sqlx sends them in binary format), as an application that keeps
    // its tenant in a session variable for row-level security policies does.
    let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("SELECT set_config($1, $2, $3)")
        .bind("app.tenant")
        .bind("42")
        .bind(false)
        .execute(&mut connection)
        .await
        .unwrap();
    let (tenant, on_replica): (String, bool) =
        sqlx::query_as("SELECT current_setting('app.tenant'), pg_is_in_recovery()")
            .fetch_one(&mut connection)
            .await
            .unwrap();
    assert_eq!((tenant.as_str(), on_replica), ("42", true));
    connection.close().await.unwrap();

    // And pg_dump itself, a client nobody here wrote, through the proxy as direct.
    let through_proxy = schema_dump(&url).await;
    assert!(
        through_proxy.contains("CREATE TABLE lagprobe."),
        "{through_proxy}"
    );
    assert_eq!(through_proxy, schema_dump(&app.lab().primary_url()).await);
    app.shutdown().await;
}

/// `pg_dump --schema-only` of the database at `url`, less the random key each run signs
/// its script with (`\restrict`).
async fn schema_dump(url: &str) -> String {
    let output = Command::new(pg_program("pg_dump").await)
        .args(["--schema-only", "--no-owner", url])
        .output()
        .await
        .expect("pg_dump starts");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "pg_dump {url}: {stderr}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| !line.starts_with("\\restrict") && !line.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs pgbench against `url`; its output, asserting success.
async fn pgbench(url: &str, args: &[&str]) -> String {
    let output = Command::new(pg_program("pgbench").await)
        .args(args)
        .arg(url)
        .kill_on_drop(true)
        .output()
        .await
        .expect("pgbench starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "pgbench {args:?} failed:\n{text}");
    text
}

/// "tps = N (without initial connection time)" from pgbench's report.
fn tps(report: &str) -> f64 {
    report
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no tps in {report}"))
}

fn assert_no_failures(report: &str) {
    let processed = report
        .lines()
        .find_map(|line| line.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|number| number.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no transaction count in {report}"));
    assert!(processed > 0, "{report}");
    assert!(
        report.contains("number of failed transactions: 0 "),
        "{report}"
    );
}

/// Waits until the replica has what the primary has now (pgbench's tables after -i).
pub(crate) async fn until_replica_has(app: &TestApp, table: &str) {
    let replica = app.replica_urls().remove(0);
    let query = format!("SELECT to_regclass('{table}') IS NOT NULL");
    until_answers(&replica, &query, "t").await;
}

/// Runs `query` on the server at `url` until its one line of output is `expected` (30 s
/// at most).
pub(crate) async fn until_answers(url: &str, query: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while psql_lines(url, query).await != [expected] {
        assert!(
            Instant::now() < deadline,
            "{query} never answered {expected} on {url}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_runs_through_the_proxy_in_every_query_mode_without_failures() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    pgbench(&url, &["-i", "-s", "1", "-q"]).await;
    until_replica_has(&app, "pgbench_branches").await;
    let direct = app.replica_urls().remove(0);
    for mode in ["simple", "extended", "prepared"] {
        let args = ["-S", "-M", mode, "-c", "4", "-j", "2", "-T", "2"];
        let proxied = pgbench(&url, &args).await;
        assert_no_failures(&proxied);
        let straight = pgbench(&direct, &args).await;
        println!(
            "pgbench -S -M {mode}: {:.0} tps through the proxy, {:.0} tps direct to the replica",
            tps(&proxied),
            tps(&straight)
        );
    }
    let tpcb = pgbench(&url, &["-c", "4", "-j", "2", "-T", "2"]).await;
    assert_no_failures(&tpcb);
    println!("pgbench TPC-B: {:.0} tps through the proxy", tps(&tpcb));
    let counts = app.app.proxy().unwrap().counts();
    assert!(counts.replica_reads > 100, "{counts:?}");
    assert!(counts.writes > 100, "{counts:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_prepared_statement_runs_on_both_backends() {
    let app = spawn_app(0).await;
    let mut connection = sqlx::PgConnection::connect(&proxy_url(&app)).await.unwrap();
    let query = "SELECT pg_is_in_recovery(), current_setting('application_name')";
    // sqlx prepares each statement once under a name and reuses it.
    let outside: bool = sqlx::query(query)
        .fetch_one(&mut connection)
        .await
        .unwrap()
        .get(0);
    let mut transaction = connection.begin().await.unwrap();
    sqlx::query("CREATE TEMP TABLE t (x int)")
        .execute(&mut *transaction)
        .await
        .unwrap();
    let inside: bool = sqlx::query(query)
        .fetch_one(&mut *transaction)
        .await
        .unwrap()
        .get(0);
    transaction.commit().await.unwrap();
    let again: bool = sqlx::query(query)
        .fetch_one(&mut connection)
        .await
        .unwrap()
        .get(0);
    assert_eq!((outside, inside, again), (true, false, true));
    connection.close().await.unwrap();
    app.shutdown().await;
}

/// A temporary table lives in the primary connection's session only: reads that name it
/// go there (psql's simple protocol and sqlx's named statements), and so do reads of a
/// table of the same name in another schema (the classification cache cannot tell them
/// apart) and its READ ONLY transactions, while reads of other tables, and of the name once
/// DISCARD TEMP dropped it, go to the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_of_a_temporary_table_go_to_the_primary_that_has_it() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let lines = psql_lines(
        &url,
        "SET lagprobe.strategy = 'lsn-wait';
         CREATE TABLE shadowed (x int);
         INSERT INTO shadowed VALUES (1);
         CREATE TEMP TABLE shadowed (x int);
         INSERT INTO shadowed VALUES (1), (2), (3);
         SELECT 'temporary', count(*), pg_is_in_recovery() FROM shadowed;
         SELECT 'qualified', count(*), pg_is_in_recovery() FROM pg_temp.shadowed;
         SELECT 'permanent', count(*), pg_is_in_recovery() FROM public.shadowed;
         CREATE TEMP VIEW doubled AS SELECT x * 2 AS y FROM pg_temp.shadowed;
         SELECT 'view', sum(y), pg_is_in_recovery() FROM doubled;
         BEGIN READ ONLY;
         SELECT 'read only', count(*), pg_is_in_recovery() FROM shadowed;
         COMMIT;
         DISCARD TEMP;
         SELECT 'discarded', count(*), pg_is_in_recovery() FROM shadowed;
         BEGIN READ ONLY;
         SELECT 'read only after', count(*), pg_is_in_recovery() FROM shadowed;
         COMMIT;",
    )
    .await;
    assert_eq!(
        lines,
        [
            "temporary|3|f",
            "qualified|3|f",
            "permanent|1|f",
            "view|12|f",
            "read only|3|f",
            "discarded|1|t",
            "read only after|1|t",
        ],
        "{lines:?}"
    );

    let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("CREATE TEMP TABLE scratch AS SELECT 7 AS x")
        .execute(&mut connection)
        .await
        .unwrap();
    let (x, on_replica): (i32, bool) = sqlx::query_as("SELECT x, pg_is_in_recovery() FROM scratch")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!((x, on_replica), (7, false));
    let elsewhere: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert!(elsewhere, "reads of other tables still go to the replica");
    connection.close().await.unwrap();
    app.shutdown().await;
}

/// A standby cannot run a serializable transaction ("cannot use serializable mode in a hot
/// standby"): a serializable READ ONLY transaction, and every read of a session that made
/// serializable its default, run on the primary instead of failing on the replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serializable_reads_run_on_the_primary() {
    let app = spawn_app(0).await;
    let lines = psql_lines(
        &proxy_url(&app),
        "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY;
         SELECT 'serializable read only', pg_is_in_recovery();
         COMMIT;
         SET default_transaction_isolation = 'serializable';
         SELECT 'session', pg_is_in_recovery(), current_setting('transaction_isolation');
         BEGIN READ ONLY;
         SELECT 'its read only transaction', pg_is_in_recovery();
         COMMIT;
         SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ;
         SELECT 'repeatable read', pg_is_in_recovery(), current_setting('transaction_isolation');",
    )
    .await;
    assert_eq!(
        lines,
        [
            "serializable read only|f",
            "session|f|serializable",
            "its read only transaction|f",
            "repeatable read|t|repeatable read",
        ],
        "{lines:?}"
    );
    // A default the session never states (startup options here; a role's or database's
    // setting alike) is learnt from its replica connection.
    let serializable_by_default = format!(
        "{}&options=-c%20default_transaction_isolation%3Dserializable",
        proxy_url(&app)
    );
    let query = "SELECT pg_is_in_recovery(), current_setting('transaction_isolation')";
    for _ in 0..2 {
        let lines = psql_lines(&serializable_by_default, query).await;
        assert_eq!(lines, ["f|serializable"]);
    }
    assert_eq!(
        psql_lines(&proxy_url(&app), query).await,
        ["t|read committed"]
    );
    app.shutdown().await;
}

/// Whether the proxy still answers a query.
async fn still_serves(url: &str) {
    assert_eq!(psql_lines(url, "SELECT 40 + 2").await, ["42"]);
}

/// Sends raw bytes to the proxy and returns what it answered before closing.
async fn raw_exchange(app: &TestApp, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(app.app.proxy_addr.unwrap())
        .await
        .unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer));
    read.await.expect("the proxy closes the connection").ok();
    answer
}

/// A startup packet for the lab's database, then `after`.
fn startup_then(after: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(3i32 << 16).to_be_bytes());
    for part in ["user", "postgres", "database", "lagprobe", ""] {
        body.extend_from_slice(part.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet.extend_from_slice(after);
    packet
}

fn has_sqlstate(answer: &[u8], sqlstate: &str) -> bool {
    let needle = format!("C{sqlstate}\0");
    answer
        .windows(needle.len())
        .any(|window| window == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protocol_gets_08p01_and_the_proxy_keeps_serving_everyone_else() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let garbage = raw_exchange(&app, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(has_sqlstate(&garbage, "08P01"), "{garbage:?}");
    // A Query claiming 2 GB: refused at once, nothing allocated or awaited.
    let huge = raw_exchange(&app, &startup_then(&[b'Q', 0x7f, 0xff, 0xff, 0xff])).await;
    assert!(has_sqlstate(&huge, "08P01"), "{huge:?}");
    let malformed = raw_exchange(&app, &startup_then(&[b'P', 0, 0, 0, 6, b'x', 0])).await;
    assert!(has_sqlstate(&malformed, "08P01"), "{malformed:?}");
    let replication = {
        let mut body = (3i32 << 16).to_be_bytes().to_vec();
        for part in ["user", "postgres", "replication", "true", ""] {
            body.extend_from_slice(part.as_bytes());
            body.push(0);
        }
        let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&body);
        raw_exchange(&app, &packet).await
    };
    assert!(has_sqlstate(&replication, "0A000"), "{replication:?}");
    // An SSLRequest is declined with 'N', and the session goes on in plain text.
    let mut ssl = vec![0, 0, 0, 8];
    ssl.extend_from_slice(&80_877_103i32.to_be_bytes());
    ssl.extend_from_slice(&startup_then(b"X\0\0\0\x04"));
    assert_eq!(raw_exchange(&app, &ssl).await.first(), Some(&b'N'));

    // A client that leaves in the middle of a query: its query is cancelled.
    let mut leaving = Command::new(pg_program("psql").await)
        .args(["-X", "-c", "SELECT pg_sleep(60)", &url])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let replica = app.replica_urls().remove(0);
    until_sleeping(&replica, 1).await;
    leaving.kill().await.unwrap();
    until_sleeping(&replica, 0).await;
    still_serves(&url).await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_backend_running_the_query() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let started = Instant::now();
    let child = Command::new(pg_program("psql").await)
        .args(["-X", "-c", "SELECT pg_sleep(30)", &url])
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = child.id().unwrap() as i32;
    // psql sends a CancelRequest with the key the proxy gave it on SIGINT.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let output = child.wait_with_output().await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_down_sends_reads_to_the_primary_and_primary_down_is_08006() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    assert_eq!(psql_lines(&url, "SELECT pg_is_in_recovery()").await, ["t"]);
    let (status, body) = app
        .post_json(
            "/api/lab/servers/replica1/stop",
            serde_json::json!({"mode": "immediate"}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    // A session that had a replica connection and a new one both read the primary.
    assert_eq!(
        psql_lines(
            &url,
            "SELECT pg_is_in_recovery(); SELECT pg_is_in_recovery()"
        )
        .await,
        ["f", "f"]
    );
    assert!(app.app.proxy().unwrap().counts().fallbacks >= 1);

    let (status, body) = app
        .post_json(
            "/api/lab/servers/primary/stop",
            serde_json::json!({"mode": "immediate"}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    let error = sqlx::PgConnection::connect(&url).await.unwrap_err();
    let database = error.as_database_error().expect("an ErrorResponse");
    assert_eq!(database.code().as_deref(), Some("08006"), "{error}");
    assert!(
        database.message().contains("primary unavailable"),
        "{error}"
    );
    app.shutdown().await;
}

/// `INSERT` then an immediate read of the same row on one connection with `strategy`:
/// what the read saw (`count|in_recovery`).
async fn write_then_read(url: &str, strategy: &str, id: u32) -> String {
    let lines = psql_lines(
        url,
        &format!(
            "SET lagprobe.strategy = '{strategy}';
             INSERT INTO items VALUES ({id});
             SELECT count(*), pg_is_in_recovery() FROM items WHERE id = {id};"
        ),
    )
    .await;
    lines.join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_1000_ms_only_the_replica_strategy_reads_its_own_write_stale() {
    let app = spawn_app(1000).await;
    let url = proxy_url(&app);
    psql_lines(&url, "CREATE TABLE items (id int PRIMARY KEY)").await;
    until_replica_has(&app, "items").await;

    assert_eq!(write_then_read(&url, "replica", 1).await, "0|t", "stale");
    assert_eq!(write_then_read(&url, "lsn-wait", 2).await, "1|t", "waited");
    assert_eq!(write_then_read(&url, "lsn-route", 3).await, "1|f", "routed");
    assert_eq!(write_then_read(&url, "global", 4).await, "1|t", "global");
    assert_eq!(
        write_then_read(&url, "pin-window", 5).await,
        "1|f",
        "pinned"
    );
    assert_eq!(write_then_read(&url, "primary", 6).await, "1|f", "primary");
    let counts = app.app.proxy().unwrap().counts();
    assert!(counts.waits >= 2, "{counts:?}");

    // global: a write on one connection, a read on another.
    psql_lines(&url, "INSERT INTO items VALUES (7)").await;
    let other = psql_lines(
        &url,
        "SET lagprobe.strategy = 'global';
         SELECT count(*), pg_is_in_recovery() FROM items WHERE id = 7;",
    )
    .await;
    assert_eq!(other, ["1|t"]);

    // The token carried to another connection, as an app carries it between requests.
    let token = psql_lines(
        &url,
        "INSERT INTO items VALUES (8); SHOW lagprobe.last_commit_lsn;",
    )
    .await;
    assert_eq!(token.len(), 1, "{token:?}");
    token[0].parse::<lagprobe::Lsn>().expect("an LSN");
    let carried = psql_lines(
        &url,
        &format!(
            "SET lagprobe.strategy = 'lsn-wait';
             SET lagprobe.min_lsn = '{}';
             SELECT count(*), pg_is_in_recovery() FROM items WHERE id = 8;
             SHOW lagprobe.strategy;",
            token[0]
        ),
    )
    .await;
    assert_eq!(carried, ["1|t", "lsn-wait"]);

    let refused = psql(&url, "SET lagprobe.strategy = 'sometimes';").await;
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("global"),
        "{stderr}"
    );
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_apply_makes_the_commit_wait_so_the_replica_read_is_fresh() {
    let app = crate::harness::spawn_app_with(lagprobe::settings::LabSettings {
        sync_replica: true,
        ..lagprobe::settings::LabSettings::with_delay(Duration::from_millis(300))
    })
    .await;
    let url = proxy_url(&app);
    psql_lines(&url, "CREATE TABLE items (id int PRIMARY KEY)").await;
    until_replica_has(&app, "items").await;
    assert_eq!(write_then_read(&url, "remote-apply", 1).await, "1|t");
    assert_eq!(write_then_read(&url, "replica", 2).await, "0|t");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagprobe_proxy_serves_a_lab_and_refuses_a_public_address_without_a_password() {
    let app = spawn_app(0).await;
    let replica = app.replica_urls().remove(0);
    let primary = app.lab().primary_url();
    let binary = env!("CARGO_BIN_EXE_lagprobe");
    let refused = Command::new(binary)
        .args(["proxy", "--listen", "0.0.0.0:0", "--primary-url", &primary])
        .args(["--replica-url", &replica])
        .env_remove("LAGPROBE_PROXY_PASSWORD")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("LAGPROBE_PROXY_PASSWORD"), "{stderr}");

    let mut child = Command::new(binary)
        .args(["proxy", "--listen", "127.0.0.1:0", "--strategy", "lsn-wait"])
        .env("LAGPROBE_PROXY_PRIMARY_URL", &primary)
        .env("LAGPROBE_PROXY_REPLICA_URL", &replica)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut banner)
        .await
        .unwrap();
    let url = banner
        .split('"')
        .nth(1)
        .unwrap_or_else(|| panic!("no psql URL in {banner:?}"));
    assert!(banner.contains("strategy lsn-wait"), "{banner}");
    let lines = psql_lines(url, "SHOW lagprobe.strategy; SELECT pg_is_in_recovery();").await;
    assert_eq!(lines, ["lsn-wait", "t"]);

    // SIGTERM with a query running on each backend: both clients are told (57P01), both
    // queries are cancelled, and the proxy exits 0.
    let sleepers = ["SELECT pg_sleep(60)", "BEGIN; SELECT 1 FROM pg_sleep(60);"].map(|script| {
        let (url, script) = (url.to_owned(), script.to_owned());
        tokio::spawn(async move { psql(&url, &script).await })
    });
    until_sleeping(&replica, 1).await;
    until_sleeping(&primary, 1).await;
    let pid = i32::try_from(child.id().unwrap()).unwrap();
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exited = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
    assert!(
        exited
            .expect("the proxy stops on SIGTERM")
            .unwrap()
            .success()
    );
    for sleeper in sleepers {
        let output = sleeper.await.unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(stderr.contains("lagprobe is shutting down"), "{stderr}");
    }
    until_sleeping(&replica, 0).await;
    until_sleeping(&primary, 0).await;
    app.shutdown().await;
}

/// Waits until `count` backends of the server at `url` run pg_sleep.
async fn until_sleeping(url: &str, count: usize) {
    let query = "SELECT count(*) FROM pg_stat_activity \
                 WHERE state = 'active' AND query LIKE '%pg_sleep(60)%' AND pid <> pg_backend_pid()";
    until_answers(url, query, &count.to_string()).await;
}

/// The audit's entry for the query on `table`, once its reads are all recorded (verdicts
/// that need one more watcher poll are recorded a moment after the read).
pub(crate) async fn audited(app: &TestApp, table: &str, reads: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, report) = app.get_json("/api/proxy").await;
        assert_eq!(status, 200, "{report}");
        let query = report["queries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|query| query["text"].as_str().unwrap().contains(table))
            .cloned();
        if let Some(query) = query.filter(|query| query["reads"] == reads) {
            return query;
        }
        assert!(Instant::now() < deadline, "{table} not audited: {report}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_counts_the_replica_strategys_read_at_risk_and_lsn_waits_not() {
    let app = spawn_app(1000).await;
    let url = proxy_url(&app);
    psql_lines(
        &url,
        "CREATE TABLE stale_reads (id int); CREATE TABLE waited_reads (id int);",
    )
    .await;
    until_replica_has(&app, "waited_reads").await;
    let lines = psql_lines(
        &url,
        "SET lagprobe.strategy = 'replica';
         INSERT INTO stale_reads VALUES (1);
         SELECT count(*) FROM stale_reads WHERE id = 1 AND '<b>' <> '';
         SET lagprobe.strategy = 'lsn-wait';
         INSERT INTO waited_reads VALUES (1);
         SELECT count(*) FROM waited_reads WHERE id = 1;",
    )
    .await;
    assert_eq!(lines, ["0", "1"]);

    let stale = audited(&app, "stale_reads", 1).await;
    assert_eq!(stale["replica_reads"], 1, "{stale}");
    assert_eq!(stale["reads_at_risk"], 1, "{stale}");
    // The normalized text, and the evidence: the token and a watcher position short of it.
    assert_eq!(
        stale["text"],
        "SELECT count(*) FROM stale_reads WHERE id = $1 AND $2 <> $3;"
    );
    let evidence = &stale["last_at_risk"];
    let token: lagprobe::Lsn = evidence["token"].as_str().unwrap().parse().unwrap();
    let watcher: lagprobe::Lsn = evidence["watcher_lsn"].as_str().unwrap().parse().unwrap();
    assert!(watcher < token, "{evidence}");
    assert!(evidence["watcher_age_ms"].as_f64().is_some(), "{evidence}");

    let waited = audited(&app, "waited_reads", 1).await;
    assert_eq!(waited["reads_at_risk"], 0, "{waited}");
    assert_eq!(waited["reads_replayed"], 1, "{waited}");
    assert_eq!(waited["waits"], 1, "{waited}");
    assert_eq!(waited["fallbacks"], 0, "{waited}");

    // The same numbers over gRPC, at-risk queries first.
    let report = app
        .grpc()
        .await
        .proxy_stats(lagprobe::pb::ProxyStatsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(report.running);
    let first = &report.queries[0];
    assert!(first.text.contains("stale_reads"), "{report:?}");
    assert_eq!(first.counts.as_ref().unwrap().reads_at_risk, 1);
    assert_eq!(first.fingerprint, stale["fingerprint"].as_str().unwrap());
    assert!(report.totals.unwrap().writes >= 2, "{report:?}");

    // /metrics, read by a real Prometheus parser.
    let text = reqwest::get(app.http_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let families = crate::api::parsed_by_prometheus_client(&text);
    let at_risk = families
        .iter()
        .find(|family| family["name"] == "lagprobe_proxy_query_reads_at_risk")
        .unwrap_or_else(|| panic!("no at-risk family in {families:?}"));
    assert_eq!(at_risk["type"], "counter");
    let sample = at_risk["samples"]
        .as_array()
        .unwrap()
        .iter()
        .find(|sample| sample[2]["fingerprint"] == stale["fingerprint"])
        .unwrap_or_else(|| panic!("{at_risk}"));
    assert_eq!(sample[1].as_f64(), Some(1.0), "{sample}");
    assert!(
        families.iter().all(|family| family["type"] != "unknown"),
        "{families:?}"
    );

    // The page: at-risk first, the text escaped.
    let page = reqwest::get(app.http_url("/proxy/"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let stale_at = page
        .find("stale_reads")
        .expect("the at-risk query is listed");
    let waited_at = page
        .find("waited_reads")
        .expect("the waited query is listed");
    assert!(stale_at < waited_at, "{page}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_lab_failover_new_sessions_use_the_new_primary_and_replica() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let port_of = |server: serde_json::Value| server["port"].as_u64().unwrap().to_string();
    let old_primary = port_of(app.lab_server("primary").await);
    let promoted = port_of(app.lab_server("replica1").await);
    let before = psql_lines(
        &url,
        "/* lagprobe:primary */ SELECT inet_server_port(); SELECT inet_server_port();",
    )
    .await;
    assert_eq!(before, [old_primary.clone(), promoted.clone()]);

    let (status, report) = app
        .post_json(
            "/api/lab/failover",
            serde_json::json!({"promote": "replica1", "rejoin": true}),
        )
        .await;
    assert_eq!(status, 200, "{report}");
    until_replica_has(&app, "pg_class").await;

    // Writes reach the promoted server; reads the old primary, rejoined as its replica.
    let after = psql_lines(
        &url,
        "CREATE TABLE after_failover (id int);
         INSERT INTO after_failover VALUES (1);
         /* lagprobe:primary */ SELECT inet_server_port(), pg_is_in_recovery();
         SELECT inet_server_port(), pg_is_in_recovery();",
    )
    .await;
    assert_eq!(
        after,
        [format!("{promoted}|f"), format!("{old_primary}|t")],
        "{report}"
    );

    // The rejoined replica is watched: lsn-wait waits for it rather than trusting what
    // the promoted server had replayed as a replica, or reading the primary.
    psql_lines(&url, "CREATE TABLE items (id int PRIMARY KEY)").await;
    until_replica_has(&app, "items").await;
    let delayed = reqwest::Client::new()
        .put(app.http_url("/api/delay"))
        .json(&serde_json::json!({"delay_ms": 500}))
        .send()
        .await
        .unwrap();
    assert_eq!(delayed.status(), 200);
    let waits_before = app.app.proxy().unwrap().counts().waits;
    assert_eq!(write_then_read(&url, "replica", 1).await, "0|t", "stale");
    assert_eq!(write_then_read(&url, "lsn-wait", 2).await, "1|t", "waited");
    let counts = app.app.proxy().unwrap().counts();
    assert_eq!(counts.waits, waits_before + 1, "{counts:?}");
    assert_eq!(counts.fallbacks, 0, "{counts:?}");
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_password_clients_authenticate_with_scram_sha_256() {
    let app = spawn_app(0).await;
    let proxy_settings = lagprobe::settings::ProxySettings {
        password: Some(lagprobe::settings::Secret("pa$$ wörd".into())),
        ..lagprobe::settings::ProxySettings::default()
    };
    let proxy = lagprobe::server::build_proxy(
        &app.lab().primary_url(),
        &app.replica_urls(),
        &lagprobe::settings::PoolSettings::default(),
        lagprobe::settings::StrategyDefaults::default(),
        &proxy_settings,
    )
    .await
    .unwrap();
    let url = format!("{}&connect_timeout=10", proxy.psql_url());

    // The first thing a client hears is AuthenticationSASL offering SCRAM-SHA-256 (code 10),
    // not a request for a cleartext password (code 3).
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(&startup_then(&[])).await.unwrap();
    let mut answer = vec![0u8; 64];
    let read = stream.read(&mut answer).await.unwrap();
    let answer = &answer[..read];
    assert_eq!(answer[0], b'R', "{answer:?}");
    assert_eq!(&answer[5..9], &10i32.to_be_bytes(), "{answer:?}");
    assert!(
        answer.windows(13).any(|window| window == b"SCRAM-SHA-256"),
        "{answer:?}"
    );

    let psql = pg_program("psql").await;
    let with_password = |password: &str| {
        let mut command = Command::new(&psql);
        command
            .args(["-X", "-A", "-t", &url, "-c", "SELECT pg_is_in_recovery()"])
            .env("PGPASSWORD", password)
            .kill_on_drop(true);
        command
    };
    let right = with_password("pa$$ wörd").output().await.unwrap();
    assert!(
        right.status.success(),
        "{}",
        String::from_utf8_lossy(&right.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&right.stdout).trim(), "t");
    let wrong = with_password("guess").output().await.unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success(), "{stderr}");
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );

    // sqlx, another client's SCRAM implementation.
    let sqlx_url = format!(
        "postgres://postgres:pa%24%24%20w%C3%B6rd@{}/lagprobe?sslmode=disable",
        proxy.addr
    );
    let mut connection = sqlx::PgConnection::connect(&sqlx_url).await.unwrap();
    let row = sqlx::query("SELECT 1::int4")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(row.get::<i32, _>(0), 1);
    proxy.shutdown().await;
    app.shutdown().await;
}
