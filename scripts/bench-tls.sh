#!/usr/bin/env bash
# What TLS costs: one gearbox server with a plaintext port and a TLS port (--ssl-port, client
# certificates required), and `gearbox bench` run against the two ports alternately within
# one run (plain, tls, plain, tls, ...), on the same server process. Certificates are made
# with openssl in a temporary directory. Scenarios:
#   bg   200,000 background jobs, 4 clients x 64 in flight, 4 workers
#   fg   50,000 foreground jobs, 8 clients one job at a time, 4 workers
# Prints, per scenario, the median of each metric per port and the ratio tls/plain.
#
# Environment: ROUNDS (3), SCENARIOS ("bg fg"), BG_JOBS, FG_JOBS, BENCH_TIMEOUT (120 s per
# bench run), SERVER_FLAGS ("--queue memory --job-log none"; e.g. "" for gearbox's default
# durable embedded queue and job log), CARGO_TARGET_DIR (where the release build goes).
# Exits non-zero if any run failed (timeout, lost or duplicated job).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-"bg fg"}
BG_JOBS=${BG_JOBS:-200000}
FG_JOBS=${FG_JOBS:-50000}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-120}
SERVER_FLAGS=${SERVER_FLAGS-"--queue memory --job-log none"}
BUILD_TIMEOUT=1800
START_TIMEOUT=10
STOP_TIMEOUT=10

cd "$(dirname "$0")/.."
export RUST_BACKTRACE=0
WORK=$(mktemp -d "${TMPDIR:-/tmp}/bench-tls.XXXXXX")
SERVER_PID=

cleanup() {
    if [[ -n $SERVER_PID ]]; then
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# shellcheck source=scripts/bench-common.sh
source scripts/bench-common.sh

command -v openssl >/dev/null || die "openssl is needed to make the test certificates"

log "building gearbox (release)..."
timeout "$BUILD_TIMEOUT" cargo build --release -p gearbox >&2 || die "cargo build failed"
GEARBOX=${CARGO_TARGET_DIR:-$PWD/target}/release/gearbox
[[ -x $GEARBOX ]] || die "no $GEARBOX after the build"

# A CA, a server certificate for 127.0.0.1 and a client certificate, all P-256.
make_certs() {
    local dir=$WORK/tls
    mkdir -p "$dir"
    (
        cd "$dir"
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
            -subj "/CN=bench CA" -keyout ca.key -out ca.pem
        printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
        printf 'extendedKeyUsage=clientAuth\n' >client.ext
        for who in server client; do
            openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=bench-$who" \
                -keyout "$who.key" -out "$who.csr"
            openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
                -out "$who.pem" -extfile "$who.ext"
        done
    ) >"$WORK/openssl.log" 2>&1 || { cat "$WORK/openssl.log" >&2; die "openssl failed"; }
}
make_certs
TLS=$WORK/tls

PLAIN_PORT=$(free_port)
TLS_PORT=$(free_port)
[[ $PLAIN_PORT != "$TLS_PORT" ]] || TLS_PORT=$(free_port)
# shellcheck disable=SC2206
args=("$GEARBOX" server --listen 127.0.0.1 --port "$PLAIN_PORT" --ssl-port "$TLS_PORT" --http off
    --data-dir "$WORK/data" --ssl-certificate "$TLS/server.pem" --ssl-key "$TLS/server.key"
    --ssl-ca-file "$TLS/ca.pem" $SERVER_FLAGS)
"${args[@]}" >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
wait_serving "$PLAIN_PORT" "$SERVER_PID" "$WORK/server.log" "$START_TIMEOUT"

bench_args() {
    case $1 in
    bg) echo --mode bg --jobs "$BG_JOBS" --clients 4 --workers 4 --inflight 64 ;;
    fg) echo --mode fg --jobs "$FG_JOBS" --clients 8 --workers 4 ;;
    esac
}

FAILED=0

# run_one KIND SCENARIO: one bench run against the plain or the TLS port; appends its JSON
# line to the results.
run_one() {
    local kind=$1 scenario=$2 out json rc=0 target
    if [[ $kind == tls ]]; then
        target=(--server "127.0.0.1:$TLS_PORT" --ssl-ca-file "$TLS/ca.pem"
            --ssl-certificate "$TLS/client.pem" --ssl-key "$TLS/client.key")
    else
        target=(--server "127.0.0.1:$PLAIN_PORT")
    fi
    # shellcheck disable=SC2046
    out=$(timeout $((BENCH_TIMEOUT + 30)) "$GEARBOX" bench "${target[@]}" --server-pid "$SERVER_PID" \
        --timeout "$BENCH_TIMEOUT" --json $(bench_args "$scenario") 2>"$WORK/bench.err") || rc=$?
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
    local scenario=$1 key label a b
    shift
    printf '\n== %s: %s (median of successful runs; plain %s/%s ok, tls %s/%s ok) ==\n' \
        "$scenario" "$(bench_args "$scenario")" "$(runs plain "$scenario")" "$ROUNDS" \
        "$(runs tls "$scenario")" "$ROUNDS"
    printf '%-28s %14s %14s %12s\n' metric plain tls tls/plain
    while (($#)); do
        key=$1 label=$2
        shift 2
        a=$(med plain "$scenario" "$key")
        b=$(med tls "$scenario" "$key")
        printf '%-28s %14s %14s %12s\n' "$label" "$a" "$b" "$(ratio "$b" "$a")"
    done
}

log "server: ${args[*]}"
for scenario in $SCENARIOS; do
    case $scenario in bg | fg) ;; *) die "unknown scenario $scenario" ;; esac
    log "scenario $scenario: $ROUNDS rounds (load average $(cut -d" " -f1-3 /proc/loadavg))"
    for ((round = 1; round <= ROUNDS; round++)); do
        for kind in plain tls; do
            run_one "$kind" "$scenario"
        done
    done
done

for scenario in $SCENARIOS; do
    case $scenario in
    bg) table bg jobs_per_sec "jobs/s" server_cpu_us_per_job "server CPU µs/job" ;;
    fg) table fg jobs_per_sec "jobs/s" server_cpu_us_per_job "server CPU µs/job" \
        p50_us "p50 latency µs" p99_us "p99 latency µs" ;;
    esac
done

((FAILED == 0)) || die "some runs failed (see above)"
