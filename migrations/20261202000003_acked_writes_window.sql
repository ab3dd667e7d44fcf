-- Probe rows now stay while their write is in the service's window of acknowledged writes
-- (the last 10,000, at most ten minutes old), so that after a failover each one can be read
-- back from the new primary to count the writes it lost. They are deleted in batches as
-- the window lets go of them, and rows older than ten minutes are swept.
COMMENT ON TABLE lagprobe.probe_write IS
    'lagprobe: rows of recently acknowledged probe and API writes; read back after a failover';
