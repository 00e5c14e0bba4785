#!/usr/bin/env bash
# Deep-queue benchmark of one gearbox queue store: fill, restart, drain.
#
#   scripts/bench-depth.sh STORE N
#
# STORE is embedded (in a fresh temporary data directory), postgres://USER@HOST:PORT/DB or
# mysql://USER[:PASS]@HOST:PORT/DB; a database store uses the table gearbox_bench_depth
# (unless the URL names one with ?table=), dropped before and after the run with psql or
# mariadb/mysql. N is the number of jobs.
#
# 1. Starts target/release/gearbox server on a free port (--http off, a temporary --data-dir)
#    and fills its queue with N background jobs and no worker: `gearbox bench --mode depth`,
#    a line per step of STEP jobs (depth, JOB_CREATED per second, server RSS).
# 2. Stops the server with SIGTERM (SIGNAL=KILL for a crash) and starts it again on the same
#    store; the restart time runs from starting the process until the admin `status` line of
#    the function says N jobs are queued (the server answers only once its queue is loaded).
#    The server's own figure, from its log line "queued jobs loaded in", is shown beside it.
# 3. Drains the queue: `gearbox bench --mode drain`, WORKERS workers, each job checked to run
#    exactly once; then reads the server's RSS IDLE seconds after the last job ran.
# Prints each bench's output as it goes and, at the end, a summary table in Markdown.
#
# Environment: STEP (N/10), SIGNAL (TERM or KILL), WORKERS (4), IDLE (10 s),
# BENCH_TIMEOUT (3600 s for each phase), GEARBOX (a gearbox binary to use instead of building
# target/release/gearbox), GEARBOX_EXTRA_FLAGS (added to the server's flags, e.g.
# "--job-log none").
# Exits non-zero if a phase failed (timeout, lost or duplicated job, a wrong depth).
set -euo pipefail

usage() { echo "usage: $0 embedded|postgres://...|mysql://... JOBS" >&2; exit 2; }
(($# == 2)) || usage
STORE=$1
JOBS=$2
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || usage
STEP=${STEP:-}
SIGNAL=${SIGNAL:-TERM}
WORKERS=${WORKERS:-4}
IDLE=${IDLE:-10}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-3600}
FUNCTION=bench
START_TIMEOUT=30
STOP_TIMEOUT=60
BUILD_TIMEOUT=1800
[[ $SIGNAL == TERM || $SIGNAL == KILL ]] || { echo "SIGNAL must be TERM or KILL" >&2; exit 2; }

cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-depth.XXXXXX")
SERVER_PID=

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

# The queue flag and, for a database, how to drop its table.
TABLE=
case $STORE in
embedded) QUEUE=embedded ;;
postgres://* | postgresql://* | mysql://*)
    QUEUE=$STORE
    if [[ $QUEUE =~ [?\&]table=([A-Za-z0-9_]+) ]]; then
        TABLE=${BASH_REMATCH[1]}
    else
        TABLE=gearbox_bench_depth
        [[ $QUEUE == *\?* ]] && QUEUE+="&table=$TABLE" || QUEUE+="?table=$TABLE"
    fi
    ;;
*) usage ;;
esac

# drop_table: empties the database of the run's table, so each run starts from nothing.
drop_table() {
    [[ -n $TABLE ]] || return 0
    local url=${STORE%%\?*}
    case $url in
    postgres*)
        psql -q "$url" -c "DROP TABLE IF EXISTS $TABLE, ${TABLE}_dead, ${TABLE}_state" >/dev/null 2>&1 ;;
    mysql://*)
        # mysql://USER[:PASS]@HOST[:PORT]/DB
        [[ $url =~ ^mysql://([^:@/]+)(:([^@]*))?@([^:/]+)(:([0-9]+))?/(.+)$ ]] ||
            { log "cannot parse $url"; return 1; }
        local client
        client=$(command -v mariadb || command -v mysql) || { log "no mariadb/mysql client"; return 1; }
        MYSQL_PWD=${BASH_REMATCH[3]} "$client" -u "${BASH_REMATCH[1]}" -h "${BASH_REMATCH[4]}" \
            -P "${BASH_REMATCH[6]:-3306}" -e "DROP TABLE IF EXISTS $TABLE, ${TABLE}_dead, ${TABLE}_state" "${BASH_REMATCH[7]}" ;;
    esac
}

cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    drop_table || log "warning: could not drop the table $TABLE"
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -n ${GEARBOX:-} ]]; then
    [[ -x $GEARBOX ]] || die "GEARBOX=$GEARBOX is not an executable"
else
    log "building gearbox (release)..."
    timeout "$BUILD_TIMEOUT" cargo build --release -p gearbox >&2 || die "cargo build failed"
    GEARBOX=${CARGO_TARGET_DIR:-$PWD/target}/release/gearbox
fi

PORT=$(free_port)
LOG=$WORK/server.log

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# start_server: starts the server in the background (its log appended to $LOG), sets
# SERVER_PID, and waits until the port accepts connections (it may not answer yet).
start_server() {
    # shellcheck disable=SC2086
    "$GEARBOX" server --listen 127.0.0.1 --port "$PORT" --http off --data-dir "$WORK/data" \
        --queue "$QUEUE" ${GEARBOX_EXTRA_FLAGS:-} >>"$LOG" 2>&1 &
    SERVER_PID=$!
    local deadline=$((SECONDS + START_TIMEOUT))
    until (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; do
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$LOG" >&2; die "the server exited at startup"; }
        ((SECONDS < deadline)) || die "the server did not listen on port $PORT within ${START_TIMEOUT}s"
        sleep 0.02
    done
}

# stop_server SIGNAL: sends it and waits for the exit; sets STOP_MS to how long that took.
stop_server() {
    local start i
    start=$(now_ms)
    kill -"$1" "$SERVER_PID"
    # Without the redirection, bash reports the job it reaps as "Killed" after a SIGKILL.
    {
        for ((i = 0; i < STOP_TIMEOUT * 100; i++)); do
            if ! kill -0 "$SERVER_PID"; then
                wait "$SERVER_PID" || true
                SERVER_PID=
                break
            fi
            sleep 0.01
        done
    } 2>/dev/null
    [[ -z $SERVER_PID ]] || die "the server did not exit within ${STOP_TIMEOUT}s of SIG$1"
    STOP_MS=$(($(now_ms) - start))
}

# queued: the function's queued jobs per the admin `status` (total less running). The server
# answers once it has loaded its queue, so this waits for that (up to BENCH_TIMEOUT).
queued() {
    local name total running _ found=0
    { exec 3<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
    printf 'status\n' >&3
    while IFS=$'\t' read -r -t "$BENCH_TIMEOUT" name total running _; do
        name=${name%$'\r'}
        [[ $name == . ]] && break
        [[ $name == "$FUNCTION" ]] && found=$((total - running))
    done <&3
    exec 3<&-
    echo "$found"
}

# bench ARGS...: runs gearbox bench against the server, its output to stderr as it comes;
# prints its JSON line, and fails as the bench does.
bench() {
    local rc=0
    timeout $((BENCH_TIMEOUT + 60)) "$GEARBOX" bench --server "127.0.0.1:$PORT" --server-pid "$SERVER_PID" \
        --function "$FUNCTION" --jobs "$JOBS" --timeout "$BENCH_TIMEOUT" --json "$@" >"$WORK/bench.out" || rc=$?
    grep -v '^{' "$WORK/bench.out" >&2 || true
    grep '^{' "$WORK/bench.out" | tail -n 1
    return "$rc"
}

# field KEY JSON: the first value of KEY.
field() { grep -o "\"$1\":[^,}]*" <<<"$2" | head -n 1 | cut -d: -f2; }

drop_table || die "could not drop the table $TABLE before the run"
log "store $STORE, $JOBS jobs; server: $GEARBOX server --queue $QUEUE ${GEARBOX_EXTRA_FLAGS:-}"

start_server
fill=$(bench --mode depth ${STEP:+--step "$STEP"}) || die "the fill failed (server log: see above)"

stop_server "$SIGNAL"
stop_ms=$STOP_MS
log "server stopped by SIG$SIGNAL in $stop_ms ms; restarting"
restart_start=$(now_ms)
start_server
deadline=$((SECONDS + BENCH_TIMEOUT))
until [[ $(queued || echo 0) -ge $JOBS ]]; do
    ((SECONDS < deadline)) || die "the restarted server did not show $JOBS queued jobs within ${BENCH_TIMEOUT}s"
    sleep 0.02
done
restart_ms=$(($(now_ms) - restart_start))
loaded=$(grep -o 'queued jobs loaded in [^ ]*' "$LOG" | tail -n 1 | sed 's/.* in //')
log "restarted: $JOBS jobs queued after $restart_ms ms (the server logged: loaded in ${loaded:-?})"

drain=$(bench --mode drain --workers "$WORKERS" --rss-after "$IDLE") || die "the drain failed"
stop_server TERM

# The summary.
acks=$(grep -o '"ack_per_sec":[0-9.]*' <<<"$fill" | cut -d: -f2)
first=$(head -n 1 <<<"$acks")
last=$(tail -n 1 <<<"$acks")
min=$(sort -g <<<"$acks" | head -n 1)
mb() { awk -v b="$1" 'BEGIN { if (b == "" || b == "null") print "n/a"; else printf "%.1f MB", b / 1e6 }'; }
round() { awk -v v="$1" 'BEGIN { if (v == "" || v == "null") print "n/a"; else printf "%.0f", v }'; }
printf '\n| store | depth | ack/s first step | ack/s last step | ack/s min | RSS/job at full depth | stop (SIG%s) | restart until %s queued (server: loaded in) | drain jobs/s | RSS %s s after drain |\n' \
    "$SIGNAL" "$JOBS" "$IDLE"
printf '|---|---|---|---|---|---|---|---|---|---|\n'
printf '| %s | %s | %s | %s | %s | %s B | %.2f s | %.2f s (%s) | %s | %s |\n' \
    "${STORE%%\?*}" "$JOBS" "$(round "$first")" "$(round "$last")" "$(round "$min")" \
    "$(round "$(field rss_bytes_per_job "$fill")")" "$(awk -v ms="$stop_ms" 'BEGIN { print ms / 1000 }')" \
    "$(awk -v ms="$restart_ms" 'BEGIN { print ms / 1000 }')" "${loaded:-?}" \
    "$(round "$(field jobs_per_sec "$drain")")" "$(mb "$(field rss_bytes_idle "$drain")")"
