#!/bin/sh
# Bitnami init script for the primary (docker-compose.yml mounts this folder read-only on
# /docker-entrypoint-initdb.d of postgresql-primary only). The image runs it once, on the first boot of
# an empty data volume, while its temporary server is up; the replica inherits the result through
# pg_basebackup and the WAL.
#
# What: grant pg_monitor to the application role (POSTGRESQL_USERNAME).
# Why: lagprobe connects as that role, not as a superuser, and PostgreSQL hides the interesting columns
# of pg_stat_wal_receiver (status, which /readyz waits for) and pg_stat_replication (state, the *_lag
# columns, replay_lsn) from roles without pg_read_all_stats, which pg_monitor includes.
# How: psql as postgres over 127.0.0.1 with POSTGRESQL_POSTGRES_PASSWORD (the image has switched
# pg_hba to password authentication by the time init scripts run). A failure is reported, not fatal:
# the database still starts, lagprobe just sees fewer statistics.
# Safe both ways the image runs init scripts: executed when executable, sourced into its own bash
# (errexit, nounset) when not. So: no `exit`, no failing bare command, prefixed variables.

lagprobe_role=${POSTGRESQL_USERNAME:-postgres}
if [ "$lagprobe_role" = postgres ]; then
    echo "lagprobe init: the application role is postgres, a superuser: nothing to grant"
elif [ -z "${POSTGRESQL_POSTGRES_PASSWORD:-}" ]; then
    echo "lagprobe init: POSTGRESQL_POSTGRES_PASSWORD is empty: cannot grant pg_monitor to $lagprobe_role" >&2
elif PGPASSWORD=$POSTGRESQL_POSTGRES_PASSWORD psql -X -q -v ON_ERROR_STOP=1 -v role="$lagprobe_role" \
    -h 127.0.0.1 -p "${POSTGRESQL_PORT_NUMBER:-5432}" -U postgres -d postgres <<'SQL'
GRANT pg_monitor TO :"role";
SQL
then
    echo "lagprobe init: granted pg_monitor to $lagprobe_role"
else
    echo "lagprobe init: could not grant pg_monitor to $lagprobe_role (see the psql error above)" >&2
fi
unset lagprobe_role
