#!/usr/bin/env bash
# Benchmarks gearbox against gearmand on this machine, alternating the two servers within one
# run (gearmand, gearbox, gearmand, gearbox, ...), each on a fresh server and spare port, with
# `gearbox bench` as the load generator for both. Scenarios:
#   bg   200,000 background jobs, 4 clients x 64 in flight, 4 workers
#        vs gearmand --threads=0 --hashtable-buckets=500009
#   fg   100,000 foreground jobs, 8 clients one job at a time, 4 workers
#        vs gearmand --threads=0
#   mem  500,000 queued background jobs, no worker (RSS per job), then drained by 4 workers
#        vs gearmand --threads=0 --hashtable-buckets=500009
# Prints, per scenario, the median of each metric per server and the ratio gearbox/gearmand.
#
# Environment: ROUNDS (3), SCENARIOS ("bg fg mem"), BG_JOBS, FG_JOBS, MEM_JOBS,
# BENCH_TIMEOUT (120 s per bench run), GEARMAND (/usr/sbin/gearmand),
# GEARBOX_EXTRA_FLAGS (e.g. "--queue memory"; the default is gearbox's default, the durable
# embedded queue and the embedded job log, in a fresh data directory per run),
# ALT_FLAGS (when set, a third server, gearbox with these flags added, joins the rotation and
# the tables gain an alt/gearbox column: e.g. ALT_FLAGS="--job-log none" measures what the job
# log costs), ALT_GEARBOX (the alt server runs this gearbox binary instead, e.g. a build of an
# earlier commit, to compare two versions in one run).
# Exits non-zero if any run failed (timeout, lost or duplicated job).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"bg fg mem"}
BG_JOBS=${BG_JOBS:-200000}
FG_JOBS=${FG_JOBS:-100000}
MEM_JOBS=${MEM_JOBS:-500000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
GEARMAND=${GEARMAND:-/usr/sbin/gearmand}
BUILD_TIMEOUT=1800
START_TIMEOUT=10
STOP_TIMEOUT=10

cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-vs-gearmand.XXXXXX")
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

[[ -x $GEARMAND ]] || die "gearmand not found at $GEARMAND (set GEARMAND)"

log "building gearbox (release)..."
timeout "$BUILD_TIMEOUT" cargo build --release -p gearbox >&2 || die "cargo build failed"
GEARBOX=$PWD/target/release/gearbox
[[ -x $GEARBOX ]] || die "no $GEARBOX after the build"

BENCH=("$GEARBOX" bench)

GEARBOX_FLAGS=(--listen 127.0.0.1 ${GEARBOX_EXTRA_FLAGS:-})
KINDS=(gearmand gearbox)
ALT_GEARBOX=${ALT_GEARBOX:-}
if [[ -n ${ALT_FLAGS:-} || -n $ALT_GEARBOX ]]; then
    KINDS+=(alt)
fi

# start_server KIND SCENARIO PORT: starts the server in the background, sets SERVER_PID.
start_server() {
    local kind=$1 scenario=$2 port=$3
    local args
    case $kind in
    gearmand)
        args=("$GEARMAND" --port "$port" --listen 127.0.0.1 --threads=0 --log-file none
            --pid-file "$WORK/gearmand-$port.pid")
        [[ $scenario == fg ]] || args+=(--hashtable-buckets=500009)
        ;;
    gearbox) args=("$GEARBOX" server --port "$port" --data-dir "$WORK/data-$port" "${GEARBOX_FLAGS[@]}") ;;
    # shellcheck disable=SC2206
    alt) args=("${ALT_GEARBOX:-$GEARBOX}" server --port "$port" --data-dir "$WORK/data-$port" "${GEARBOX_FLAGS[@]}" ${ALT_FLAGS:-}) ;;
    esac
    "${args[@]}" >"$WORK/$kind-$port.log" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    local deadline=$((SECONDS + START_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            cat "$WORK/$kind-$port.log" >&2
            die "$kind exited at startup: ${args[*]}"
        fi
        ((SECONDS < deadline)) || die "$kind did not listen on port $port within ${START_TIMEOUT}s"
        sleep 0.05
    done
}

stop_server() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 20; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=() p
    for p in "${PIDS[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
    PIDS=("${kept[@]}")
}

bench_args() {
    case $1 in
    bg) echo --mode bg --jobs "$BG_JOBS" --clients 4 --workers 4 --inflight 64 ;;
    fg) echo --mode fg --jobs "$FG_JOBS" --clients 8 --workers 4 ;;
    mem) echo --mode mem --jobs "$MEM_JOBS" --workers 4 ;;
    esac
}

FAILED=0

# run_one KIND SCENARIO: one bench run on a fresh server; appends its JSON line to the results.
run_one() {
    local kind=$1 scenario=$2 port out json rc=0
    port=$(free_port)
    start_server "$kind" "$scenario" "$port"
    # shellcheck disable=SC2046
    out=$(timeout $((BENCH_TIMEOUT + 30)) "${BENCH[@]}" --server "127.0.0.1:$port" \
        --server-pid "$SERVER_PID" --timeout "$BENCH_TIMEOUT" --json $(bench_args "$scenario") \
        2>"$WORK/bench.err") || rc=$?
    stop_server "$SERVER_PID"
    json=$(grep '^{' <<<"$out" | tail -n 1 || true)
    if ((rc != 0)) || [[ -z $json ]] || [[ $json != *'"ok":true'* ]]; then
        FAILED=1
        log "  $kind FAILED (exit $rc):"
        sed 's/^/    /' <<<"$out" >&2
        sed 's/^/    /' "$WORK/bench.err" >&2
        return 0
    fi
    echo "$json" >>"$WORK/$scenario.$kind"
    log "  $kind: $(grep -v '^[{]' <<<"$out" | sed -n 's/^  //p' | paste -sd';' | sed 's/  */ /g')"
}

# field KEY JSON: the value of a number field, or "null".
field() { sed -n "s/.*\"$1\":\\([^,}]*\\).*/\\1/p" <<<"$2"; }

# med KIND SCENARIO KEY: the median over the successful runs, or "n/a".
med() {
    local file=$WORK/$2.$1
    [[ -s $file ]] || { echo n/a; return; }
    while read -r line; do field "$3" "$line"; done <"$file" | median
}

runs() { [[ -s $WORK/$2.$1 ]] && wc -l <"$WORK/$2.$1" || echo 0; }

table() {
    local scenario=$1
    shift
    printf '\n== %s: %s (median of successful runs; gearmand %s/%s ok, gearbox %s/%s ok) ==\n' \
        "$scenario" "$(bench_args "$scenario")" "$(runs gearmand "$scenario")" "$ROUNDS" \
        "$(runs gearbox "$scenario")" "$ROUNDS"
    if [[ " ${KINDS[*]} " == *" alt "* ]]; then
        printf 'alt = %s with "%s" added (%s/%s ok)\n' "${ALT_GEARBOX:-gearbox}" "${ALT_FLAGS:-}" \
            "$(runs alt "$scenario")" "$ROUNDS"
        printf '%-28s %14s %14s %18s %14s %14s\n' metric gearmand gearbox gearbox/gearmand alt alt/gearbox
    else
        printf '%-28s %14s %14s %18s\n' metric gearmand gearbox gearbox/gearmand
    fi
    local key label a b c
    while (($#)); do
        key=$1 label=$2
        shift 2
        a=$(med gearmand "$scenario" "$key")
        b=$(med gearbox "$scenario" "$key")
        if [[ " ${KINDS[*]} " == *" alt "* ]]; then
            c=$(med alt "$scenario" "$key")
            printf '%-28s %14s %14s %18s %14s %14s\n' "$label" "$a" "$b" "$(ratio "$b" "$a")" "$c" "$(ratio "$c" "$b")"
        else
            printf '%-28s %14s %14s %18s\n' "$label" "$a" "$b" "$(ratio "$b" "$a")"
        fi
    done
}

log "load generator: ${BENCH[*]}; gearbox server flags: ${GEARBOX_FLAGS[*]:-(none)}"
for scenario in $SCENARIOS; do
    case $scenario in bg | fg | mem) ;; *) die "unknown scenario $scenario" ;; esac
    log "scenario $scenario: $ROUNDS rounds (load average $(cut -d" " -f1-3 /proc/loadavg))"
    for ((round = 1; round <= ROUNDS; round++)); do
        for kind in "${KINDS[@]}"; do
            run_one "$kind" "$scenario"
        done
    done
done

for scenario in $SCENARIOS; do
    case $scenario in
    bg) table bg jobs_per_sec "jobs/s" server_cpu_us_per_job "server CPU µs/job" ;;
    fg) table fg jobs_per_sec "jobs/s" server_cpu_us_per_job "server CPU µs/job" \
        p50_us "p50 latency µs" p99_us "p99 latency µs" max_us "max latency µs" ;;
    mem) table mem rss_bytes_per_job "RSS bytes/queued job" submit_jobs_per_sec "submit jobs/s" \
        jobs_per_sec "drain jobs/s" server_cpu_us_per_job "drain server CPU µs/job" ;;
    esac
done

((FAILED == 0)) || die "some runs failed (see above)"
