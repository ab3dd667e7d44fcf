#!/bin/sh
# netem-delay: hold back the WAL stream from the PostgreSQL primary to its replica, and nothing else.
#
# It runs as a sidecar inside the primary's network namespace (compose: network_mode
# "service:postgresql-primary", cap_add NET_ADMIN), so the Bitnami PostgreSQL image stays unmodified
# and unprivileged: no root, no tc in the database container.
#
# Why the delay sits on the primary's egress: tc/netem acts on packets as they leave an interface.
# Streaming replication is the replica connecting to the primary and the primary sending WAL back on
# that connection, so delaying what leaves the primary towards the replica's address delays exactly
# the WAL stream (and ping echo requests, which is how `ping postgresql-replica` shows the delay).
# Everything else leaving the primary, above all the answers to the application's queries, goes to
# other addresses and passes untouched. Delaying the replica's egress would only slow its
# acknowledgements, not the data.
#
# The tree it keeps on the device that routes to the replica (eth0 under compose):
#   qdisc htb 1: root, default class 1:1
#     class 1:1   everything else: not delayed (100gbit: HTB shapes nothing at that rate)
#     class 1:2   qdisc 20: netem delay NETEM_DELAY_MS ms [NETEM_JITTER_MS ms]
#   filter u32 "match ip dst <replica address>/32" -> class 1:2 (pref 10, handles 800::800 and up;
#   a new address gets its filter before the old address's filter is deleted)
# The classic recipe has prio at the root; HTB is used because some kernels (CI's among them) are
# built with HTB and without prio, and HTB does the same job here.
#
# It resolves the replica's name again every NETEM_POLL_SECONDS and moves the filter when the address
# changes (a recreated replica gets a new address: the old demo resolved it once and silently lost its
# delay). Qdiscs, classes and filters are written with tc "replace" and read back from the kernel,
# so running it again over an existing tree (a restart) is harmless. It logs what it applies, and
# removes its qdisc on SIGTERM/SIGINT (docker stop).
#
# Usage: netem-delay [run|check|clear]
#   run     (default) apply, follow the replica's address, clean up on stop
#   check   exit 0 if the tree and a filter for the replica's current address are in place
#           (the container's healthcheck)
#   clear   remove the qdisc and exit
# Environment:
#   NETEM_DELAY_MS      one-way delay in milliseconds (default 1000)
#   NETEM_JITTER_MS     +/- jitter in milliseconds (default 0: none)
#   NETEM_TARGET_HOST   the replica's host name or IPv4 address (default postgresql-replica)
#   NETEM_POLL_SECONDS  how often the name is resolved again (default 5)
#   NETEM_LIMIT         packets netem may hold (default 10000; 1 s of WAL needs room)
#   NETEM_DEV           device to shape (default: the device of the route to the replica)
#   REPLICA_UPSTREAM_HOST, NETEM_PRIMARY_HOST  when these differ, the replica streams through
#                       something else (the proxy-delay profile's delay-link): stay idle
# Only IPv4 is matched: compose networks are IPv4 unless IPv6 is enabled on purpose.
# POSIX sh (Debian's dash); needs tc and ip (iproute2), getent, awk, grep, sed, sort, tr.

set -u

DELAY_MS=${NETEM_DELAY_MS:-1000}
JITTER_MS=${NETEM_JITTER_MS:-0}
TARGET=${NETEM_TARGET_HOST:-postgresql-replica}
POLL=${NETEM_POLL_SECONDS:-5}
LIMIT=${NETEM_LIMIT:-10000}
DEV_OVERRIDE=${NETEM_DEV:-}
UPSTREAM=${REPLICA_UPSTREAM_HOST:-postgresql-primary}
PRIMARY=${NETEM_PRIMARY_HOST:-postgresql-primary}

# state of the run loop
CUR_DEV=""       # device the tree is on
CUR_ADDRS=""     # addresses the filters match, space separated, sorted
LAST_NOTE=""     # last repeated notice, to log it once
SLEEP_PID=""

log() {
    printf 'netem-delay: %s\n' "$*"
}

note_once() {
    if [ "$1" != "$LAST_NOTE" ]; then
        log "$1"
        LAST_NOTE=$1
    fi
}

is_uint() {
    case $1 in
        '' | *[!0-9]*) return 1 ;;
        *) return 0 ;;
    esac
}

validate() {
    for pair in "NETEM_DELAY_MS=$DELAY_MS" "NETEM_JITTER_MS=$JITTER_MS" \
        "NETEM_POLL_SECONDS=$POLL" "NETEM_LIMIT=$LIMIT"; do
        if ! is_uint "${pair#*=}"; then
            log "error: ${pair%%=*} must be a whole number, got '${pair#*=}'"
            return 1
        fi
    done
    if [ "$POLL" -lt 1 ]; then
        log "error: NETEM_POLL_SECONDS must be at least 1"
        return 1
    fi
    return 0
}

# proxy-delay profile: the replica streams from a delay-link, not from this namespace
idle_mode() {
    [ "$UPSTREAM" != "$PRIMARY" ]
}

# IPv4 addresses of the target, sorted, space separated (empty if it does not resolve)
resolve() {
    getent ahostsv4 "$TARGET" 2>/dev/null | awk '{ print $1 }' | sort -u | tr '\n' ' ' | sed 's/ $//'
}

route_dev() {
    ip -4 route get "$1" 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }'
}

pick_dev() {
    if [ -n "$DEV_OVERRIDE" ]; then
        printf '%s\n' "$DEV_OVERRIDE"
    else
        route_dev "${1%% *}"
    fi
}

# 198.18.0.2 -> c6120002, the form `tc filter show` prints u32 keys in
ip_hex() {
    old_ifs=$IFS
    IFS=.
    # shellcheck disable=SC2086 # split the address on dots on purpose
    set -- $1
    IFS=$old_ifs
    printf '%02x%02x%02x%02x' "$1" "$2" "$3" "$4"
}

netem_args() {
    if [ "$JITTER_MS" -gt 0 ]; then
        printf 'delay %sms %sms limit %s' "$DELAY_MS" "$JITTER_MS" "$LIMIT"
    else
        printf 'delay %sms limit %s' "$DELAY_MS" "$LIMIT"
    fi
}

tree_present() {
    qdiscs=$(tc qdisc show dev "$1" 2>/dev/null) || return 1
    case $qdiscs in
        *"qdisc htb 1: root"*) ;;
        *) return 1 ;;
    esac
    case $qdiscs in
        *" 20: parent 1:2"*) return 0 ;;
        *) return 1 ;;
    esac
}

# remove our root qdisc (and with it the classes, the netem child and the filters)
clear_dev() {
    case $(tc qdisc show dev "$1" 2>/dev/null) in
        *"qdisc htb 1: root"*)
            if tc qdisc del dev "$1" root; then
                log "removed the delay from $1"
            fi
            ;;
    esac
}

# run a tc command; on failure log it with its error and a hint, return 1
tc_do() {
    if err=$(tc "$@" 2>&1); then
        return 0
    fi
    log "error: tc $* failed: $err"
    case $err in
        *"qdisc kind is unknown"* | *"Unknown qdisc"*)
            log "hint: this kernel has no sch_netem (rootless Docker, some WSL kernels):" \
                "use the proxy-delay profile instead (README, section docker compose)"
            ;;
        *"Operation not permitted"*)
            log "hint: the container needs cap_add: [NET_ADMIN]"
            ;;
    esac
    return 1
}

apply_tree() {
    dev=$1
    # htb cannot "change" an existing root in place: replace it only if it is not ours already
    if ! tc qdisc show dev "$dev" 2>/dev/null | grep -q '^qdisc htb 1: root'; then
        tc_do qdisc replace dev "$dev" root handle 1: htb default 1 || return 1
    fi
    tc_do class replace dev "$dev" parent 1: classid 1:1 htb rate 100gbit burst 4m cburst 4m quantum 60000 || return 1
    tc_do class replace dev "$dev" parent 1: classid 1:2 htb rate 100gbit burst 4m cburst 4m quantum 60000 || return 1
    # shellcheck disable=SC2046 # netem_args is a list of words on purpose
    tc_do qdisc replace dev "$dev" parent 1:2 handle 20: netem $(netem_args) || return 1
    log "applied on $dev: root htb 1:, class 1:2 -> netem $(netem_args); other traffic not delayed"
    return 0
}

# our filters as the kernel has them, one "handle hexaddress" per line (e.g. "800::800 c6124202");
# the kernel is the record, so a restart picks up whatever an earlier run left
current_filters() {
    tc filter show dev "$1" parent 1: 2>/dev/null | awk '
        / fh 800::/ { h = ""; for (i = 1; i < NF; i++) if ($i == "fh") h = $(i + 1); next }
        / match / && h != "" { split($2, m, "/"); print h, m[1]; h = "" }'
}

# the lowest u32 node handle (800::800 .. 800::fff) not in use
free_handle() {
    n=$((0x800))
    while [ "$n" -le $((0xfff)) ]; do
        h=$(printf '800::%x' "$n")
        case " $(printf '%s\n' "$1" | awk '{ print $1 }' | tr '\n' ' ') " in
            *" $h "*) n=$((n + 1)) ;;
            *)
                printf '%s\n' "$h"
                return 0
                ;;
        esac
    done
    return 1
}

# Make the u32 filters match exactly the addresses in $2. A u32 filter's key cannot be changed in
# place (a replace on the same handle keeps the old key), so a new address gets a new handle first
# and the filter of an address that went away is deleted after: no moment without a filter.
set_filters() {
    dev=$1
    addrs=$2
    cur=$(current_filters "$dev")
    want=""
    for addr in $addrs; do
        hex=$(ip_hex "$addr")
        want="$want $hex"
        case " $(printf '%s\n' "$cur" | awk '{ print $2 }' | tr '\n' ' ') " in
            *" $hex "*) continue ;;
        esac
        handle=$(free_handle "$cur") || {
            log "error: no free u32 handle left on $dev"
            return 1
        }
        tc_do filter replace dev "$dev" parent 1: protocol ip pref 10 handle "$handle" \
            u32 match ip dst "$addr/32" flowid 1:2 || return 1
        cur=$(printf '%s\n%s %s' "$cur" "$handle" "$hex")
    done
    while read -r handle hex; do
        [ -n "$handle" ] || continue
        case "$want " in
            *" $hex "*) ;;
            *) tc_do filter del dev "$dev" parent 1: protocol ip pref 10 handle "$handle" u32 || return 1 ;;
        esac
    done <<EOF
$cur
EOF
    return 0
}

# one pass: make the tree and the filters match the replica's current address
sync_once() {
    if [ -n "$CUR_DEV" ] && ! ip link show dev "$CUR_DEV" >/dev/null 2>&1; then
        log "error: device $CUR_DEV is gone (was the primary's container restarted?);" \
            "exiting so the restart policy joins its new network namespace"
        exit 1
    fi
    addrs=$(resolve)
    if [ -z "$addrs" ]; then
        if [ -z "$CUR_ADDRS" ]; then
            note_once "waiting for $TARGET to resolve"
        else
            note_once "cannot resolve $TARGET right now; keeping the filter for $CUR_ADDRS"
        fi
        return 0
    fi
    dev=$(pick_dev "$addrs")
    if [ -z "$dev" ]; then
        note_once "no route to $TARGET ($addrs) yet"
        return 0
    fi
    if [ -n "$CUR_DEV" ] && [ "$dev" != "$CUR_DEV" ]; then
        clear_dev "$CUR_DEV"
        CUR_DEV=""
    fi
    if [ -z "$CUR_DEV" ] || ! tree_present "$dev"; then
        CUR_DEV=$dev
        CUR_ADDRS=""
        apply_tree "$dev" || return 1
    fi
    if [ "$addrs" != "$CUR_ADDRS" ]; then
        set_filters "$dev" "$addrs" || return 1
        if [ -z "$CUR_ADDRS" ]; then
            log "delaying packets to $TARGET ($addrs) on $dev by ${DELAY_MS} ms"
        else
            log "$TARGET moved from $CUR_ADDRS to $addrs: filter follows"
        fi
        CUR_ADDRS=$addrs
        LAST_NOTE=""
    fi
    return 0
}

stop() {
    if [ -n "$SLEEP_PID" ]; then
        kill "$SLEEP_PID" 2>/dev/null || true
    fi
    if [ -n "$CUR_DEV" ]; then
        clear_dev "$CUR_DEV"
    fi
    log "stopped"
    exit 0
}

# wait for a signal without busy looping; the trap runs as soon as one arrives
pause() {
    sleep "$1" &
    SLEEP_PID=$!
    wait "$SLEEP_PID" 2>/dev/null || true
    SLEEP_PID=""
}

# a problem that restarting will not fix: say so, take the partial tree down, stay (unhealthy) until stopped
give_up() {
    if [ -n "$CUR_DEV" ]; then
        clear_dev "$CUR_DEV"
        CUR_DEV=""
    fi
    log "not delaying anything; the healthcheck reports unhealthy until this is fixed"
    while :; do
        pause 3600
    done
}

cmd_run() {
    trap stop TERM INT HUP
    validate || give_up
    if idle_mode; then
        log "the replica streams through $UPSTREAM (proxy-delay profile): netem stays idle"
        while :; do
            pause 3600
        done
    fi
    log "target $TARGET, delay ${DELAY_MS} ms, jitter ${JITTER_MS} ms, re-resolving every ${POLL} s"
    while :; do
        sync_once || give_up
        pause "$POLL"
    done
}

cmd_check() {
    validate || exit 1
    if idle_mode; then
        echo "idle: the replica streams through $UPSTREAM"
        exit 0
    fi
    addrs=$(resolve)
    if [ -z "$addrs" ]; then
        echo "unhealthy: $TARGET does not resolve"
        exit 1
    fi
    dev=$(pick_dev "$addrs")
    if [ -z "$dev" ] || ! tree_present "$dev"; then
        echo "unhealthy: no delay tree on ${dev:-any device}"
        exit 1
    fi
    shown=$(tc filter show dev "$dev" parent 1:)
    for addr in $addrs; do
        case $shown in
            *"match $(ip_hex "$addr")/ffffffff at 16"*) ;;
            *)
                echo "unhealthy: no filter for $TARGET ($addr) on $dev"
                exit 1
                ;;
        esac
    done
    echo "ok: packets to $TARGET ($addrs) on $dev are delayed"
    exit 0
}

cmd_clear() {
    if [ -n "$DEV_OVERRIDE" ]; then
        clear_dev "$DEV_OVERRIDE"
    else
        addrs=$(resolve)
        if [ -n "$addrs" ]; then
            dev=$(route_dev "${addrs%% *}")
            [ -z "$dev" ] || clear_dev "$dev"
        fi
    fi
    exit 0
}

case ${1:-run} in
    run) cmd_run ;;
    check) cmd_check ;;
    clear) cmd_clear ;;
    *)
        echo "usage: netem-delay [run|check|clear]" >&2
        exit 2
        ;;
esac
