//! The proxy with clients nobody here wrote: psycopg 3 (a libpq-based driver that sends
//! everything through the extended protocol) and psql, with the same answers through the
//! proxy as straight from the server.

use crate::{
    harness::{PythonClient, TestApp, spawn_app},
    proxy::{audited, proxy_url, psql_lines, psql_with, until_answers, until_replica_has},
};

/// Runs one of the psycopg client scripts; its stdout is one JSON document.
async fn psycopg_script(name: &'static str, args: &[&str]) -> serde_json::Value {
    let client = PythonClient {
        script: name,
        modules: "psycopg",
        install_hint: "psycopg 3 is missing: python3 -m pip install psycopg \
                       (it uses the system's libpq5)",
    };
    client.run(args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_reads_its_own_writes_with_lsn_wait_and_the_token_through_the_proxy() {
    let app = spawn_app(1000).await;
    let url = proxy_url(&app);
    psql_lines(&url, "CREATE TABLE notes (id int PRIMARY KEY, body text)").await;
    until_replica_has(&app, "notes").await;

    let seen = psycopg_script("psycopg_session.py", &[&url]).await;
    let pair = |count: u64, on_replica: bool| serde_json::json!([count, on_replica]);
    assert_eq!(seen["strategy_at_start"], "replica", "{seen}");
    assert_eq!(seen["replica_read"], pair(0, true), "stale: {seen}");
    assert_eq!(seen["strategy_after_set"], "lsn-wait", "{seen}");
    assert_eq!(seen["lsn_wait_read"], pair(1, true), "{seen}");
    let prepared = seen["prepared_reads"].as_array().unwrap();
    assert_eq!(prepared.len(), 6, "{seen}");
    assert!(prepared.iter().all(|read| read == &pair(1, true)), "{seen}");
    let token: lagprobe::Lsn = seen["token"].as_str().unwrap().parse().unwrap();
    assert_eq!(seen["min_lsn_on_reader"], token.to_string(), "{seen}");
    assert_eq!(seen["carried_read"], pair(1, true), "{seen}");
    assert_eq!(seen["read_in_transaction"], pair(1, false), "{seen}");
    assert_eq!(seen["bad_strategy"], "22023", "{seen}");
    assert_eq!(seen["unknown_setting"], "42704", "{seen}");
    assert_eq!(seen["after_errors"], 42, "{seen}");
    assert_eq!(seen["binary_read"], "in a transaction", "{seen}");

    // The audit names the query that read stale: psycopg's $1 form, normalized.
    let query = audited(&app, "FROM notes WHERE id", 9).await;
    assert_eq!(query["reads_at_risk"], 1, "{query}");
    assert!(query["waits"].as_u64().unwrap() >= 8, "{query}");
    app.shutdown().await;
}

/// psql, not quiet: command tags, notices and errors (verbose, with SQLSTATE) included.
async fn psql_transcript(url: &str, script: &str) -> (String, String) {
    let output = psql_with(&[], url, script).await;
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (text(&output.stdout), text(&output.stderr))
}

/// What psql answers through the proxy must be what the server answers: results, command
/// tags, COPY, notices, errors, transactions and session settings.
const SAME_RESULTS_SCRIPT: &str = r#"
\set VERBOSITY verbose
\pset null '(null)'
SELECT id, body, amount, payload, seen_at FROM facts ORDER BY id;
SELECT count(*), sum(amount), string_agg(body, ',' ORDER BY id) FROM facts;
SELECT 1 \; SELECT 2;
SELECT 1 / 0;
SELECT * FROM facts WHERE id = 'x';
SELECT no_such_column FROM facts;
;
COPY (SELECT * FROM facts ORDER BY id) TO STDOUT;
COPY facts TO STDOUT WITH (FORMAT csv, HEADER);
DO $$ BEGIN RAISE NOTICE 'from %', 'a DO block'; END $$;
SHOW DateStyle;
SET TimeZone = 'Asia/Kolkata';
SELECT seen_at, current_setting('TimeZone') FROM facts ORDER BY id;
BEGIN;
CREATE TEMP TABLE scratch (x int);
INSERT INTO scratch SELECT generate_series(1, 3);
SELECT sum(x) FROM scratch;
ROLLBACK;
BEGIN READ ONLY;
SELECT count(*) FROM facts;
COMMIT;
BEGIN;
SELECT 1 / 0;
SELECT 1;
ROLLBACK;
BEGIN;
CREATE TEMP TABLE pasted (x int, y text);
COPY pasted FROM STDIN WITH (FORMAT csv);
1,one
2,"two, quoted"
\.
SELECT * FROM pasted ORDER BY x;
ROLLBACK;
EXPLAIN (COSTS OFF) SELECT * FROM facts WHERE id = 1;
SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
PREPARE by_id(int) AS SELECT body FROM facts WHERE id = $1;
EXECUTE by_id(2);
DEALLOCATE by_id;
SELECT '{"a": [1, 2]}'::jsonb -> 'a', ARRAY[1, NULL, 3], '\x00ff'::bytea, 'é ✓'::text;
"#;

/// The first line where two transcripts part: (line number, proxied, direct).
fn first_difference(proxied: &str, direct: &str) -> Option<(usize, String, String)> {
    let (mut proxied, mut direct) = (proxied.lines(), direct.lines());
    for number in 1.. {
        match (proxied.next(), direct.next()) {
            (None, None) => return None,
            (one, other) if one == other => continue,
            (one, other) => {
                let text = |line: Option<&str>| line.unwrap_or("<end>").to_owned();
                return Some((number, text(one), text(other)));
            }
        }
    }
    None
}

/// Waits until the replica has every row of `facts` the primary has.
async fn until_replica_caught_up(app: &TestApp, rows: usize) {
    let replica = app.replica_urls().remove(0);
    until_answers(&replica, "SELECT count(*) FROM facts", &rows.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_psycopg_get_the_same_results_through_the_proxy_as_direct() {
    let app = spawn_app(0).await;
    let url = proxy_url(&app);
    let primary = app.lab().primary_url();
    psql_lines(
        &primary,
        "CREATE TABLE facts (id int, body text, amount numeric, payload jsonb, seen_at timestamptz);
         INSERT INTO facts VALUES
           (1, 'one', 1.50, '{\"k\": 1}', '2026-01-02 03:04:05+00'),
           (2, 'two', NULL, '[]', '2026-06-30 23:59:59.999+00'),
           (3, 'three', -7, NULL, NULL);",
    )
    .await;
    until_replica_has(&app, "facts").await;
    until_replica_caught_up(&app, 3).await;

    let direct = psql_transcript(&primary, SAME_RESULTS_SCRIPT).await;
    let proxied = psql_transcript(&url, SAME_RESULTS_SCRIPT).await;
    assert!(
        direct.1.contains("ERROR:  22012: division by zero"),
        "{}",
        direct.1
    );
    assert!(
        direct.1.contains("NOTICE:  00000: from a DO block"),
        "{}",
        direct.1
    );
    assert!(direct.0.contains("INSERT 0 3\n6\nROLLBACK"), "{}", direct.0);
    assert!(
        direct.0.contains("COPY 2\n1|one\n2|two, quoted\nROLLBACK"),
        "{}",
        direct.0
    );
    assert_eq!(
        first_difference(&proxied.0, &direct.0),
        None,
        "psql's output"
    );
    assert_eq!(
        first_difference(&proxied.1, &direct.1),
        None,
        "psql's errors"
    );

    let compared = psycopg_script("psycopg_compare.py", &[&primary, &url]).await;
    let compared = compared.as_array().unwrap();
    assert_eq!(compared.len(), 24, "{compared:?}");
    for row in compared {
        assert_eq!(row[1], row[2], "{}", row[0]);
    }
    // Flush-ended batches (a pipeline fetched from before its Sync) and COPY FROM STDIN
    // stream through the proxy to the backend that began them.
    let answer = |label: &str| {
        let row = compared.iter().find(|row| row[0] == label);
        row.map(|row| row[2].clone()).unwrap_or_default()
    };
    assert_eq!(answer("pipeline: fetched after a flush"), "[('one',)]");
    assert_eq!(answer("pipeline: sent after the flush"), "[(3,)]");
    assert_eq!(
        answer("copy in: 2000 rows, read back"),
        "[(2000, 2001000, 'row 999')]"
    );
    assert!(
        compared.iter().any(|row| row[1] == "error 22012"),
        "{compared:?}"
    );
    // The proxy sent the reads to the replica: these were real comparisons.
    let counts = app.app.proxy().unwrap().counts();
    assert!(counts.replica_reads >= 20, "{counts:?}");
    app.shutdown().await;
}
