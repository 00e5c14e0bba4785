#!/usr/bin/env bash
# Benchmarks gearbox's cluster mode on one database, with `gearbox bench` as the load generator.
#
#   scripts/bench-cluster.sh [postgres|mysql]      (default postgres)
#
# 1. Throughput: ROUNDS rounds, each running in turn
#      single   one server, not a cluster, on --queue DB?table=... (the reference);
#      node1    one --cluster node;
#      node3    three --cluster nodes on one table, `gearbox bench --mode bg --server n1,n2,n3`
#               (clients spread over the nodes, WORKERS workers on every node);
#    each with BG_JOBS background jobs, on a fresh table and fresh servers (--job-log none).
#    Prints the median jobs/s and server CPU per job of each, and the ratios node3/node1 and
#    node3/single.
# 2. Takeover: TAKEOVER_ROUNDS runs of three nodes (lease NODE_LEASE, or gearbox's default),
#    `gearbox bench --mode takeover --server victim,n2,n3`: the victim is SIGKILLed holding
#    WORKERS running jobs and the rest of TAKEOVER_JOBS queued; prints per run how long after
#    the kill the survivors ran the first and the last job, and the medians.
# After each run, with every server stopped, the table must be empty (a row left is a job
# the cluster kept after it ran). The tables the script made (TABLE, TABLE_nodes, TABLE_leases,
# TABLE_dead, TABLE_state) are dropped. On one machine the nodes, the database and the load
# generator share the cores, so node3 measures the cluster's overhead more than its scaling.
#
# Environment: ROUNDS (3), BG_JOBS (100000), TAKEOVER_ROUNDS (3), TAKEOVER_JOBS (10000),
# NODE_LEASE (e.g. 3s; unset: gearbox's default), CLIENTS (6 client connections, spread over
# the servers), WORKERS (4 a server), BENCH_TIMEOUT (120 s a bench run), DB_URL (default
# postgres://root@127.0.0.1:5432/test or mysql://root@127.0.0.1:3306/test), GEARBOX (a gearbox
# binary to use instead of building the release one).
# Exits non-zero if any run failed (timeout, lost or duplicated job, a row left).
set -euo pipefail

DB=${1:-postgres}
ROUNDS=${ROUNDS:-3}
BG_JOBS=${BG_JOBS:-100000}
TAKEOVER_ROUNDS=${TAKEOVER_ROUNDS:-3}
TAKEOVER_JOBS=${TAKEOVER_JOBS:-10000}
NODE_LEASE=${NODE_LEASE:-}
CLIENTS=${CLIENTS:-6}
WORKERS=${WORKERS:-4}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
BUILD_TIMEOUT=1800
START_TIMEOUT=30
STOP_TIMEOUT=15

case $DB in
postgres) DB_URL=${DB_URL:-postgres://root@127.0.0.1:5432/test} ;;
mysql) DB_URL=${DB_URL:-mysql://root@127.0.0.1:3306/test} ;;
*) echo "usage: $0 [postgres|mysql]" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-cluster.XXXXXX")
PIDS=()
TABLE=
RUN=0

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

# sql STATEMENT: runs it on DB_URL, printing rows tab-separated without headers.
sql() {
    case $DB_URL in
    postgres*) PGOPTIONS=--client-min-messages=warning psql -qAtX -F $'\t' "$DB_URL" -c "$1" ;;
    mysql://*)
        # mysql://USER[:PASS]@HOST[:PORT]/DB
        [[ $DB_URL =~ ^mysql://([^:@/]+)(:([^@]*))?@([^:/]+)(:([0-9]+))?/([^?]+) ]] ||
            die "cannot parse $DB_URL"
        local client
        client=$(command -v mariadb || command -v mysql) || die "no mariadb/mysql client"
        MYSQL_PWD=${BASH_REMATCH[3]} "$client" -N -B -u "${BASH_REMATCH[1]}" -h "${BASH_REMATCH[4]}" \
            -P "${BASH_REMATCH[6]:-3306}" -e "$1" "${BASH_REMATCH[7]}" ;;
    esac
}

# drop_table: drops the run's queue table and its nodes table, if there is a run's table.
drop_table() {
    [[ -n $TABLE ]] || return 0
    if ! sql "DROP TABLE IF EXISTS ${TABLE}_nodes, ${TABLE}_leases, ${TABLE}_dead, ${TABLE}_state, $TABLE" >/dev/null; then
        log "warning: could not drop the table $TABLE"
    fi
    TABLE=
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    drop_table
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

sql "SELECT 1" >/dev/null || die "cannot reach $DB_URL"
if [[ -n ${GEARBOX:-} ]]; then
    [[ -x $GEARBOX ]] || die "GEARBOX=$GEARBOX is not an executable"
else
    log "building gearbox (release)..."
    timeout "$BUILD_TIMEOUT" cargo build --release -p gearbox >&2 || die "cargo build failed"
    GEARBOX=${CARGO_TARGET_DIR:-$PWD/target}/release/gearbox
fi

# start_servers N CLUSTER: starts N servers on TABLE (as cluster nodes when CLUSTER is 1),
# each on a free port; waits until each answers `getpid` with its own PID. Sets ADDRS and
# SPIDS, comma-separated, in the same order.
start_servers() {
    local n=$1 cluster=$2 i port pid args
    ADDRS='' SPIDS=''
    for ((i = 0; i < n; i++)); do
        port=$(free_port)
        args=(server --listen 127.0.0.1 --port "$port" --http off --job-log none
            --data-dir "$WORK/data-$port" --queue "$DB_URL?table=$TABLE")
        if ((cluster)); then
            args+=(--cluster)
            [[ -z $NODE_LEASE ]] || args+=(--node-lease "$NODE_LEASE")
        fi
        "$GEARBOX" "${args[@]}" >"$WORK/server-$port.log" 2>&1 &
        pid=$!
        PIDS+=("$pid")
        wait_serving "$port" "$pid" "$WORK/server-$port.log" "$START_TIMEOUT"
        ADDRS+=${ADDRS:+,}127.0.0.1:$port
        SPIDS+=${SPIDS:+,}$pid
    done
}

# stop_servers: SIGTERM to every server still running (a victim is reaped), then waits.
stop_servers() {
    local pid i
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for ((i = 0; i < STOP_TIMEOUT * 20; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            # A SIGKILLed victim stays a zombie until reaped: kill -0 still succeeds on it.
            [[ $(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null) == Z ]] && break
            sleep 0.05
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

FAILED=0

# run_one KIND BENCH_ARGS...: one bench run on a fresh table and fresh servers (KIND: single,
# node1, node3 or takeover); appends its JSON line to $WORK/KIND.
run_one() {
    local kind=$1 out json rc=0 rows
    shift
    RUN=$((RUN + 1))
    TABLE=gbench_cluster_$$_$RUN
    case $kind in
    single) start_servers 1 0 ;;
    node1) start_servers 1 1 ;;
    node3 | takeover) start_servers 3 1 ;;
    esac
    out=$(timeout $((BENCH_TIMEOUT + 30)) "$GEARBOX" bench --server "$ADDRS" --server-pid "$SPIDS" \
        --timeout "$BENCH_TIMEOUT" --json "$@" 2>"$WORK/bench.err") || rc=$?
    stop_servers
    rows=$(sql "SELECT COUNT(*) FROM $TABLE" 2>/dev/null || echo "?")
    drop_table
    json=$(grep '^{' <<<"$out" | tail -n 1 || true)
    if ((rc != 0)) || [[ $json != *'"ok":true'* ]] || [[ $rows != 0 ]]; then
        FAILED=1
        log "  $kind FAILED (exit $rc, $rows rows left in the table after the servers stopped):"
        sed 's/^/    /' - "$WORK/bench.err" <<<"$out" >&2
        tail -n 20 "$WORK"/server-*.log | sed 's/^/    /' >&2
        rm -f "$WORK"/server-*.log
        return 0
    fi
    rm -f "$WORK"/server-*.log
    echo "$json" >>"$WORK/$kind"
    log "  $kind: $(grep -v '^[{]' <<<"$out" | sed -n 's/^  //p' | paste -sd';' | sed 's/  */ /g')"
}

# field KEY JSON: the value of a field, or "null".
field() { sed -n "s/.*\"$1\":\\([^,}]*\\).*/\\1/p" <<<"$2"; }

# med KIND KEY: the median of KEY over KIND's successful runs, or "n/a".
med() {
    [[ -s $WORK/$1 ]] || { echo n/a; return; }
    while read -r line; do field "$2" "$line"; done <"$WORK/$1" | median
}

runs() { [[ -s $WORK/$1 ]] && wc -l <"$WORK/$1" || echo 0; }

BG=(--mode bg --jobs "$BG_JOBS" --clients "$CLIENTS" --workers "$WORKERS" --inflight 64)
log "$DB_URL; ${GEARBOX##*/} bench ${BG[*]}; server flags --job-log none${NODE_LEASE:+, --node-lease $NODE_LEASE}"
log "throughput: $ROUNDS rounds (load average $(cut -d' ' -f1-3 /proc/loadavg))"
for ((round = 1; round <= ROUNDS; round++)); do
    for kind in single node1 node3; do
        run_one "$kind" "${BG[@]}"
    done
done

TO=(--mode takeover --jobs "$TAKEOVER_JOBS" --clients "$CLIENTS" --workers "$WORKERS")
log "takeover: $TAKEOVER_ROUNDS runs of ${TO[*]}"
for ((round = 1; round <= TAKEOVER_ROUNDS; round++)); do
    run_one takeover "${TO[@]}"
done

printf '\n== bg on %s: %s jobs, %s clients, %s workers a server (median of successful runs) ==\n' \
    "${DB_URL%%\?*}" "$BG_JOBS" "$CLIENTS" "$WORKERS"
printf '%-30s %12s %12s %12s %14s %14s\n' metric single node1 node3 node3/node1 node3/single
for pair in "jobs_per_sec jobs/s" "server_cpu_us_per_job server CPU µs/job (all nodes)"; do
    key=${pair%% *} label=${pair#* }
    a=$(med single "$key") b=$(med node1 "$key") c=$(med node3 "$key")
    printf '%-30s %12s %12s %12s %14s %14s\n' "$label" "$a" "$b" "$c" "$(ratio "$c" "$b")" "$(ratio "$c" "$a")"
done
printf '%-30s %12s %12s %12s\n' "successful runs" "$(runs single)/$ROUNDS" "$(runs node1)/$ROUNDS" \
    "$(runs node3)/$ROUNDS"

printf '\n== takeover on %s: 3 nodes, lease %s, %s jobs, %s holding workers on the victim ==\n' \
    "${DB_URL%%\?*}" "${NODE_LEASE:-default}" "$TAKEOVER_JOBS" "$WORKERS"
printf '%-8s %14s %14s %18s\n' run "first ms" "last ms" "drain jobs/s"
i=0
if [[ -s $WORK/takeover ]]; then
    while read -r line; do
        i=$((i + 1))
        printf '%-8s %14s %14s %18s\n' "$i" "$(field takeover_first_ms "$line")" \
            "$(field takeover_last_ms "$line")" "$(field takeover_drain_jobs_per_sec "$line")"
    done <"$WORK/takeover"
fi
printf '%-8s %14s %14s %18s\n' median "$(med takeover takeover_first_ms)" "$(med takeover takeover_last_ms)" \
    "$(med takeover takeover_drain_jobs_per_sec)"
printf 'successful runs: %s/%s\n' "$(runs takeover)" "$TAKEOVER_ROUNDS"

((FAILED == 0)) || die "some runs failed (see above)"
