"""One application session through the lagprobe proxy with psycopg 3 (libpq), which sends
every statement through the extended protocol. Prints one JSON object of what it saw; the
Rust test asserts on it. Usage: psycopg_session.py PROXY_URL"""
import json
import sys

import psycopg
from psycopg import sql

url = sys.argv[1]
seen = {}


def read_back(conn, key):
    """count of rows with id = key, and whether a replica answered."""
    return list(conn.execute(
        "SELECT count(*), pg_is_in_recovery() FROM notes WHERE id = %s", (key,)
    ).fetchone())


with psycopg.connect(url, autocommit=True) as writer, \
        psycopg.connect(url, autocommit=True) as reader:
    seen["server_version"] = writer.info.server_version
    seen["strategy_at_start"] = writer.execute("SHOW lagprobe.strategy").fetchone()[0]

    # The replica strategy: the session's own write, read straight back, is stale.
    writer.execute("INSERT INTO notes VALUES (%s, %s)", (1, "saved"))
    seen["replica_read"] = read_back(writer, 1)

    # lsn-wait, set through the extended protocol: the same read is fresh, on the replica.
    writer.execute("SET lagprobe.strategy = 'lsn-wait'")
    seen["strategy_after_set"] = writer.execute("SHOW lagprobe.strategy").fetchone()[0]
    writer.execute("INSERT INTO notes VALUES (%s, %s)", (2, "saved"))
    seen["lsn_wait_read"] = read_back(writer, 2)

    # Prepared statements (psycopg names them after a few uses): still fresh.
    for key in (3, 4, 5, 6, 7, 8):
        writer.execute("INSERT INTO notes VALUES (%s, %s)", (key, "again"), prepare=True)
        seen.setdefault("prepared_reads", []).append(
            list(writer.execute(
                "SELECT count(*), pg_is_in_recovery() FROM notes WHERE id = %s",
                (key,), prepare=True,
            ).fetchone())
        )

    # The token, carried to another connection as an app carries it between requests.
    writer.execute("INSERT INTO notes VALUES (%s, %s)", (9, "carried"))
    token = writer.execute("SHOW lagprobe.last_commit_lsn").fetchone()[0]
    seen["token"] = token
    reader.execute("SET lagprobe.strategy = 'lsn-wait'")
    reader.execute(sql.SQL("SET lagprobe.min_lsn = {}").format(token))
    seen["min_lsn_on_reader"] = reader.execute("SHOW lagprobe.min_lsn").fetchone()[0]
    seen["carried_read"] = read_back(reader, 9)

    # A transaction runs on the primary, reads included.
    with writer.transaction():
        writer.execute("INSERT INTO notes VALUES (%s, %s)", (10, "in a transaction"))
        seen["read_in_transaction"] = read_back(writer, 10)

    # A bad value is the error PostgreSQL would give, and the session carries on.
    try:
        writer.execute("SET lagprobe.strategy = 'sometimes'")
        seen["bad_strategy"] = "accepted"
    except psycopg.Error as error:
        seen["bad_strategy"] = error.sqlstate
    try:
        writer.execute("SHOW lagprobe.nonsense")
        seen["unknown_setting"] = "accepted"
    except psycopg.Error as error:
        seen["unknown_setting"] = error.sqlstate
    seen["after_errors"] = writer.execute("SELECT 41 + 1").fetchone()[0]

    # Binary results pass through unchanged.
    with writer.cursor(binary=True) as cursor:
        cursor.execute("SELECT body FROM notes WHERE id = %s", (10,))
        seen["binary_read"] = cursor.fetchone()[0]

print(json.dumps(seen))
