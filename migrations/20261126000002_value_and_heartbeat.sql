-- A caller's value for rows written through the Write API (probes leave it NULL).
ALTER TABLE lagprobe.probe_write ADD COLUMN value text;

-- The heartbeat: one row the service updates on the primary every --heartbeat-ms. Reading
-- it on a replica gives true data lag at that resolution (primary clock on both sides).
CREATE TABLE lagprobe.heartbeat (
    id smallint PRIMARY KEY CHECK (id = 1),
    beat_at timestamptz NOT NULL
);

INSERT INTO lagprobe.heartbeat (id, beat_at) VALUES (1, clock_timestamp());
