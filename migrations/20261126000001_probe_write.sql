-- Rows written by probes. Each probe inserts one row with its own token, reads it back from
-- the replica, and deletes it when done, so the table holds only probes in flight (plus any
-- left by cancelled probes, which later probes prune after ten minutes).
CREATE TABLE lagprobe.probe_write (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token text NOT NULL UNIQUE,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

CREATE INDEX probe_write_written_at ON lagprobe.probe_write (written_at);

COMMENT ON TABLE lagprobe.probe_write IS
    'lagprobe: one row per probe in flight; each probe reads only its own token';
