"""The same queries with psycopg 3, text and binary results, on two URLs (straight to a
server, and through the lagprobe proxy), then a pipeline and a COPY FROM STDIN. Prints a JSON list of [query, direct, proxied],
each result the repr of the rows or the error's SQLSTATE. Usage: psycopg_compare.py URL URL"""
import json
import sys

import psycopg

QUERIES = [
    ("SELECT id, body, amount, payload, seen_at FROM facts ORDER BY id", ()),
    ("SELECT * FROM facts WHERE id = %s", (2,)),
    ("SELECT * FROM facts WHERE body = ANY(%s) ORDER BY id", (["one", "three"],)),
    ("SELECT count(*), sum(amount), min(seen_at), max(payload) FROM facts", ()),
    ("SELECT %s::int + 1, %s::text || '!', %s::numeric * 2", (41, "hi", "1.25")),
    ("SELECT g, md5(g::text) FROM generate_series(1, 5000) g", ()),
    ("SELECT NULL::int, ''::text, '{}'::int[], '{\"a\": [1, 2]}'::jsonb", ()),
    ("SELECT 1 / 0", ()),
    ("SELECT no_such_column FROM facts", ()),
    ("SELECT * FROM no_such_table", ()),
]


def run(url, binary):
    results = []
    with psycopg.connect(url, autocommit=True) as conn:
        for query, params in QUERIES:
            try:
                with conn.cursor(binary=binary) as cursor:
                    cursor.execute(query, params)
                    results.append(repr(cursor.fetchall()))
            except psycopg.Error as error:
                results.append("error " + str(error.sqlstate))
    return results


PIPELINED = [
    "pipeline: fetched after a flush",
    "pipeline: sent before the flush",
    "pipeline: sent after the flush",
    "copy in: 2000 rows, read back",
]


def pipelined(url):
    """A pipeline, whose first fetch comes before its Sync (psycopg sends a Flush, so the
    proxy gets an open batch and the rest follows it), then COPY FROM STDIN."""
    results = []
    with psycopg.connect(url, autocommit=True) as conn:
        with conn.pipeline():
            first = conn.execute("SELECT body FROM facts WHERE id = %s", (1,))
            second = conn.execute("SELECT body FROM facts WHERE id = %s", (3,))
            results.append(repr(first.fetchall()))
            third = conn.execute("SELECT count(*) FROM facts")
            results.append(repr(second.fetchall()))
            results.append(repr(third.fetchall()))
        with conn.transaction(), conn.cursor() as cursor:
            cursor.execute("CREATE TEMP TABLE pasted (x int, y text) ON COMMIT DROP")
            with cursor.copy("COPY pasted FROM STDIN") as copy:
                for x in range(1, 2001):
                    copy.write_row((x, f"row {x}"))
            cursor.execute("SELECT count(*), sum(x), max(y) FROM pasted")
            results.append(repr(cursor.fetchall()))
    return results


direct_url, proxy_url = sys.argv[1], sys.argv[2]
compared = []
for binary in (False, True):
    direct, proxied = run(direct_url, binary), run(proxy_url, binary)
    for (query, _), one, other in zip(QUERIES, direct, proxied):
        compared.append([f"{'binary' if binary else 'text'}: {query}", one, other])
for label, one, other in zip(PIPELINED, pipelined(direct_url), pipelined(proxy_url)):
    compared.append([label, one, other])
print(json.dumps(compared))
